"""lm-eval's run-time checks, run at submission without importing lm-eval's heavy modules.

`lm_eval run` parses its argv, then builds `EvaluatorConfig.from_cli(namespace)`
(lm_eval/config/evaluate_config.py): defaults < the `--config` YAML < the CLI, then checks that
refuse some combinations. Importing that module costs about a second and pulls numpy, requests
and jinja2 (through lm_eval.utils), so the server replays its merge and checks here, with
lm-eval's own messages. The dataclass defaults and field names are read from the module's
source with `ast` (no import), so they follow the installed lm-eval;
tests/test_differential.py holds this module to the real `from_cli`, value for value.

A few checks lm-eval only hits after loading the model (an unknown log level, a batch size no
model accepts) are added where lm-eval's own code says what it accepts.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import importlib.util
import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lm_eval_server.admission import offload
from lm_eval_server.tasks import yaml_bounds

# Logging level names, as `logging.Logger.setLevel` (lm_eval.utils.setup_logging) accepts them.
LOG_LEVELS = tuple(name for name in logging.getLevelNamesMapping() if name != "NOTSET")
# lm-eval's model classes read batch_size as an int, "auto" or "auto:N" (api_models.py,
# huggingface.py: `"auto" in batch_size`, then `int(batch_size.split(":")[1])` or `int(...)`).
_BATCH_SIZE = re.compile(r"(?:auto(?::[1-9][0-9]*)?|[1-9][0-9]*)\Z")
# Files a request names that the server reads to check them: a `config` YAML (a few hundred
# bytes in practice) and a `samples` JSON (task -> document indices). They are read and parsed
# in a worker thread (offload: a file read is I/O, and a few kilobytes of YAML with aliases
# cost PyYAML milliseconds); beyond the caps they are refused. One json.loads holds the GIL
# for its whole run (about 10 ms a megabyte), whatever thread it runs in.
MAX_CONFIG_BYTES = 256 * 1024
MAX_SAMPLES_BYTES = 1024 * 1024


class LmEvalCheckError(ValueError):
    """lm-eval would refuse this configuration at run time; the message is lm-eval's."""


@dataclass(frozen=True)
class EvaluatorFields:
    """What `EvaluatorConfig` declares: its fields with their defaults, and DICT_KEYS."""

    defaults: dict[str, Any]
    dict_keys: frozenset[str]
    default_seed: list[int | None]


def _evaluate_config_source() -> Path | None:
    spec = importlib.util.find_spec("lm_eval")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "config" / "evaluate_config.py"
    return path if path.is_file() else None


_UNKNOWN = object()


def _default_of(call: ast.Call, constants: dict[str, Any]) -> Any:
    """The default of `field(default=...)` / `field(default_factory=...)`, or _UNKNOWN."""
    for kw in call.keywords:
        if kw.arg == "default":
            try:
                return ast.literal_eval(kw.value)
            except (ValueError, TypeError, SyntaxError):
                return _UNKNOWN
        if kw.arg == "default_factory":
            factory = kw.value
            if isinstance(factory, ast.Name) and factory.id in ("dict", "list"):
                return {} if factory.id == "dict" else []
            if isinstance(factory, ast.Lambda):
                body = factory.body
                # `lambda: list(DEFAULT_SEED)`
                if (
                    isinstance(body, ast.Call)
                    and isinstance(body.func, ast.Name)
                    and body.func.id == "list"
                    and len(body.args) == 1
                    and isinstance(body.args[0], ast.Name)
                    and body.args[0].id in constants
                ):
                    return list(constants[body.args[0].id])
            return _UNKNOWN
    return _UNKNOWN


@functools.cache
def evaluator_fields() -> EvaluatorFields | None:
    """EvaluatorConfig's fields and defaults, read from its source; None if it has none."""
    source = _evaluate_config_source()
    if source is None:
        return None
    tree = ast.parse(source.read_text())
    constants: dict[str, Any] = {}
    defaults: dict[str, Any] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target = node.targets[0]
            if isinstance(target, ast.Name):
                with contextlib.suppress(ValueError, TypeError, SyntaxError):
                    constants[target.id] = ast.literal_eval(node.value)
        if isinstance(node, ast.ClassDef) and node.name == "EvaluatorConfig":
            for item in node.body:
                if not (isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)):
                    continue
                value = item.value
                if isinstance(value, ast.Call):
                    defaults[item.target.id] = _default_of(value, constants)
                elif value is not None:
                    try:
                        defaults[item.target.id] = ast.literal_eval(value)
                    except (ValueError, TypeError, SyntaxError):
                        defaults[item.target.id] = _UNKNOWN
    if not defaults:
        return None
    return EvaluatorFields(
        defaults=defaults,
        dict_keys=frozenset(constants.get("DICT_KEYS", ())),
        default_seed=list(constants.get("DEFAULT_SEED", [0, 1234, 1234, 1234])),
    )


def known_default(dest: str) -> tuple[bool, Any]:
    """(True, lm-eval's default) for an EvaluatorConfig field whose default could be read."""
    fields = evaluator_fields()
    if fields is None or dest not in fields.defaults:
        return False, None
    value = fields.defaults[dest]
    return (value is not _UNKNOWN), (None if value is _UNKNOWN else value)


def _bounded_size(path: Path, max_bytes: int, what: str) -> None:
    """Ask for a worker thread (offload); refuse a file above `max_bytes`."""
    offload.require_thread(f"reading a {what}")
    size = path.stat().st_size
    if size > max_bytes:
        raise LmEvalCheckError(
            f"{what} {path} holds {size} bytes; the server reads at most {max_bytes} to check it"
        )


def load_yaml_config(path: Path) -> dict[str, Any]:
    """`EvaluatorConfig.load_yaml_config`: safe_load, and the root must be a mapping. Loaded
    within yaml_bounds' bounds (depth, values, numbers), which give safe_load's result for any
    file within them, and at most MAX_CONFIG_BYTES."""
    import yaml  # only requests with a config file pay for it

    if not path.is_file():
        raise LmEvalCheckError(f"Config file not found: {path.resolve()}")
    try:
        _bounded_size(path, MAX_CONFIG_BYTES, "config file")
        data = yaml_bounds.load(path.read_text())
    except yaml.YAMLError as exc:
        raise LmEvalCheckError(f"Invalid YAML in {path}: {exc}") from exc
    except yaml_bounds.YamlRefused as exc:
        raise LmEvalCheckError(f"config file {path}: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise LmEvalCheckError(f"Could not read config file {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise LmEvalCheckError(
            f"YAML root must be a mapping in {path.resolve()}, got {type(data).__name__}"
        )
    return data


def cli_overrides(namespace: dict[str, Any]) -> dict[str, Any]:
    """The namespace entries `from_cli` lets override the YAML: truthy values, or == 0
    (so an explicit False or 0 wins, while None, "" and {} fall through)."""
    return {k: v for k, v in namespace.items() if (v or v == 0) and k not in ("command", "func")}


def merge(namespace: dict[str, Any], yaml_config: dict[str, Any] | None) -> dict[str, Any]:
    """`from_cli`'s precedence: CLI > YAML > built-in defaults."""
    fields = evaluator_fields()
    merged: dict[str, Any] = {}
    if fields is not None:
        merged.update({k: v for k, v in fields.defaults.items() if v is not _UNKNOWN})
    merged.update(yaml_config or {})
    merged.update(cli_overrides(namespace))
    return merged


def handle_arg_string(arg: str) -> Any:
    """lm_eval.utils.handle_arg_string (YAML string dict values go through it)."""
    arg = arg.strip()
    if len(arg) >= 2 and arg[0] == arg[-1] and arg[0] in ("'", '"'):
        return arg[1:-1]
    lower = arg.lower()
    if lower == "true":
        return True
    if lower == "false":
        return False
    if lower == "none":
        return None
    if arg.lstrip("+-").isdigit() and arg not in ("", "+", "-"):
        return int(arg)
    try:
        return float(arg)
    except ValueError:
        return arg


def simple_parse_args_string(text: str | None) -> dict[str, Any]:
    """lm_eval.utils.simple_parse_args_string: `a=1,b=x` -> {"a": 1, "b": "x"}."""
    if text is None:
        return {}
    text = text.strip()
    if not text:
        return {}
    pairs = [arg.split("=") for arg in text.split(",") if arg]
    return {kv[0]: handle_arg_string("=".join(kv[1:])) for kv in pairs}


def check(merged: dict[str, Any], base: Path) -> dict[str, Any]:
    """Replay `EvaluatorConfig(**merged)._configure()` minus its imports; returns the
    configured values. `base` is the directory a relative `samples` path is read from."""
    fields = evaluator_fields()
    config = dict(merged)
    if fields is not None:
        unknown = sorted(set(config) - set(fields.defaults))
        if unknown:
            raise LmEvalCheckError(
                f"EvaluatorConfig.__init__() got an unexpected keyword argument {unknown[0]!r}"
            )
        dict_keys = fields.dict_keys
        default_seed = fields.default_seed
    else:
        dict_keys = frozenset()
        default_seed = [0, 1234, 1234, 1234]
    # _parse_dict_args
    for key in dict_keys:
        if isinstance(config.get(key), str):
            config[key] = simple_parse_args_string(config[key])
    if fields is not None:
        # Fields whose default is a mapping are read with .get() by `lm_eval run` (e.g.
        # cache_requests); a config file can set them to anything.
        for key, default in fields.defaults.items():
            if isinstance(default, dict) and not isinstance(config.get(key, {}), dict):
                raise LmEvalCheckError(
                    f"{key} must be a mapping, got {type(config[key]).__name__} "
                    f"({config[key]!r}); lm-eval reads it as one"
                )
    _validate_arguments(config)
    _process_arguments(config, base)
    _normalize_seed(config, default_seed)
    _runtime_checks(config)
    return config


def _validate_arguments(config: dict[str, Any]) -> None:
    if "tasks" in config and config["tasks"] is None:
        raise LmEvalCheckError("Need to specify task to evaluate.")
    if config.get("predict_only"):
        config["log_samples"] = True
    if (config.get("log_samples") or config.get("predict_only")) and not config.get("output_path"):
        raise LmEvalCheckError("Specify --output_path if providing --log_samples or --predict_only")
    multiturn = config.get("fewshot_as_multiturn")
    template = config.get("apply_chat_template")
    if multiturn is None and template:
        config["fewshot_as_multiturn"] = bool(template)
    elif multiturn is True and not template:
        raise LmEvalCheckError(
            "When `fewshot_as_multiturn` is True, `apply_chat_template` must be set."
        )
    if config.get("samples") and config.get("limit") is not None:
        raise LmEvalCheckError("If --samples is not None, then --limit must be None.")


def _process_arguments(config: dict[str, Any], base: Path) -> None:
    samples = config.get("samples")
    if samples and isinstance(samples, str):
        try:
            config["samples"] = json.loads(samples)
        except RecursionError:
            raise LmEvalCheckError("samples: the JSON nests too deeply to be read") from None
        except json.JSONDecodeError:
            path = Path(samples)
            path = path if path.is_absolute() else base / path
            if not path.is_file():
                # lm-eval keeps the string and fails once the evaluation indexes it.
                raise LmEvalCheckError(
                    f"samples: {samples[:200]!r} is neither a JSON object nor a JSON file"
                ) from None
            try:
                _bounded_size(path, MAX_SAMPLES_BYTES, "samples file")
                config["samples"] = json.loads(path.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise LmEvalCheckError(f"samples: cannot read {path}: {exc}") from None
            except RecursionError:
                raise LmEvalCheckError(
                    f"samples: the JSON of {path} nests too deeply to be read"
                ) from None
    if config.get("samples") and not isinstance(config["samples"], dict):
        raise LmEvalCheckError(
            'samples: must map task names to lists of indices, e.g. {"arc_easy": [0, 1]}'
        )
    model_args = config.get("model_args") or {}
    metadata = config.get("metadata") or {}
    if not isinstance(model_args, dict) or not isinstance(metadata, dict):
        raise LmEvalCheckError("model_args and metadata must be key=value lists or mappings")
    config["model_args"] = model_args
    config["metadata"] = model_args | metadata


def _normalize_seed(config: dict[str, Any], default_seed: list[int | None]) -> None:
    seed = config.get("seed")
    if seed is None:
        return
    values = list(seed) if isinstance(seed, list | tuple) else [seed]
    if len(values) == 1:
        values = values * len(default_seed)
    elif len(values) == len(default_seed) - 1:
        values = values + default_seed[len(values) :]
    if len(values) != len(default_seed):
        raise LmEvalCheckError(
            f"seed expects a single value or {len(default_seed)} values "
            f"(random, numpy, torch, fewshot), got {len(values)}: {seed!r}"
        )
    parsed: list[int | None] = []
    for value in values:
        if value is None:
            parsed.append(None)
            continue
        try:
            parsed.append(int(value))
        except (TypeError, ValueError, OverflowError):
            raise LmEvalCheckError(f"seed values must be integers or None, got {value!r}") from None
    config["seed"] = parsed


def _runtime_checks(config: dict[str, Any]) -> None:
    """Checks lm-eval makes only after loading the model; refusing them up front saves a run."""
    verbosity = config.get("verbosity")
    if verbosity is not None and str(verbosity).upper() not in LOG_LEVELS:
        raise LmEvalCheckError(
            f"Unknown level: {verbosity!r} (verbosity takes one of: {', '.join(LOG_LEVELS)})"
        )
    batch_size = config.get("batch_size")
    if isinstance(batch_size, bool) or not (
        (isinstance(batch_size, int) and batch_size >= 1)
        or (isinstance(batch_size, str) and _BATCH_SIZE.match(batch_size.strip()))
    ):
        raise LmEvalCheckError(
            f"batch_size: {batch_size!r} is not a batch size lm-eval's models accept; use a "
            "positive integer, 'auto' or 'auto:N'"
        )
    limit = config.get("limit")
    if isinstance(limit, float) and not math.isfinite(limit):
        raise LmEvalCheckError(f"limit must be a finite number, got {limit!r}")
    # lm-eval takes a limit below 1 as a fraction of the documents (rounded up), else as a
    # count: 0 selects none ("task.build_requests() did not find any docs!"), and a negative
    # one ends in islice() ("Indices for islice() must be None or an integer: 0 <= x").
    if isinstance(limit, int | float) and not isinstance(limit, bool) and limit <= 0:
        reason = (
            "task.build_requests() did not find any docs!"
            if limit == 0
            else "Indices for islice() must be None or an integer: 0 <= x <= sys.maxsize."
        )
        raise LmEvalCheckError(
            f"limit {limit!r} selects no documents, and lm-eval stops with {reason!r}. Use a "
            "count (limit: 10) or a fraction of each task's documents (limit: 0.1)"
        )
