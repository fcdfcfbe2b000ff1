"""What an uploaded task may contain: a rule over the parsed files, never a search of their text.

An upload is one task YAML plus the data files it reads. Without ALLOW_REMOTE_CODE it must be
data only, so the YAML is held to allowlists:

- YAML: plain mappings, lists and scalars. A tag (`!function`, or any other) is refused; with
  ALLOW_REMOTE_CODE a `!function` may name a function in an uploaded `.py` file only.
- Keys: the data-only fields of lm-eval's TaskConfig (`DATA_KEYS`). Fields that only carry
  Python (`class`, `custom_dataset`, `process_docs`, `process_results`, ...) need
  ALLOW_REMOTE_CODE. `include` and `group` are refused always: an upload is one task, and an
  include would read a YAML outside it.
- Loader: `dataset_path` is `json` or `csv`, and `dataset_kwargs.data_files` names uploaded
  files by plain name (no directories, no globs). The server stores them with absolute paths
  inside the task's own directory, so the job reads exactly these files.
- Templates: lm-eval renders every prompt field with an unsandboxed Jinja environment, where a
  template can reach any Python object. Every string of the YAML is parsed as a template and
  its syntax tree held to a subset (`check_template`): names, constants, item and attribute
  access without leading underscores, a fixed set of filters, tests and string/list/dict
  methods, conditions and loops.
- Metrics: lm-eval loads an unregistered metric name through HF `evaluate`, which runs a
  script; the check in the child process (`task_check`) refuses names lm-eval has not
  registered, and `hf_evaluate` is refused here.

Pure: parses bytes and returns values; no filesystem access and no lm-eval import.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import jinja2
import jinja2.nodes as jn
import yaml

# A task name becomes a directory name and a --tasks entry: no separators, no path look.
TASK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
# Uploaded file names: plain names only (no directory part, no hidden files).
FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
YAML_SUFFIXES = (".yaml", ".yml")
# File suffix -> the HF datasets loader that reads it.
DATA_SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv"}
LOADERS = frozenset(DATA_SUFFIXES.values())
CODE_SUFFIX = ".py"
# A task YAML is a few kilobytes.
MAX_YAML_BYTES = 256 * 1024
# Bounds on walking the parsed YAML (aliases can make a small file a large graph).
MAX_DEPTH = 32
MAX_VALUES = 20_000
OUTPUT_TYPES = ("loglikelihood", "loglikelihood_rolling", "multiple_choice", "generate_until")

# TaskConfig fields that hold data (names, templates, numbers, data-only dicts).
DATA_KEYS = frozenset(
    {
        "task",
        "task_alias",
        "dataset_path",
        "dataset_kwargs",
        "training_split",
        "validation_split",
        "test_split",
        "fewshot_split",
        "doc_to_text",
        "doc_to_target",
        "doc_to_choice",
        "doc_to_image",
        "doc_to_audio",
        "description",
        "target_delimiter",
        "fewshot_delimiter",
        "fewshot_config",
        "num_fewshot",
        "metric_list",
        "output_type",
        "generation_kwargs",
        "repeats",
        "filter_list",
        "should_decontaminate",
        "doc_to_decontamination_query",
        "gen_prefix",
        "metadata",
    }
)
# Fields whose values are Python (functions, classes) or pull in code from elsewhere.
CODE_KEYS = frozenset(
    {"class", "custom_dataset", "process_docs", "process_results", "use_prompt", "unsafe_code"}
)
ALWAYS_REFUSED = {
    "include": "an upload is one self-contained task YAML; `include` would read a YAML "
    "outside the upload (copy the fields you need into this YAML)",
    "group": "upload one task (a `task:` config); groups cannot be uploaded",
    "dataset_name": "the json and csv loaders take no dataset_name; remove it",
}
# dataset_kwargs the local loaders understand.
DATASET_KWARGS = frozenset({"data_files", "field", "sep", "delimiter"})
FEWSHOT_KEYS = frozenset(
    {
        "sampler",
        "split",
        "fewshot_indices",
        "samples",
        "doc_to_text",
        "doc_to_choice",
        "doc_to_target",
        "gen_prefix",
        "fewshot_delimiter",
        "target_delimiter",
    }
)

# Jinja: the subset a data-only template may use.
_JINJA_NODES = (
    jn.Template,
    jn.Output,
    jn.TemplateData,
    jn.Const,
    jn.Name,
    jn.Getattr,
    jn.Getitem,
    jn.Slice,
    jn.Filter,
    jn.Test,
    jn.Call,
    jn.Keyword,
    jn.If,
    jn.For,
    jn.Assign,
    jn.CondExpr,
    jn.Compare,
    jn.Operand,
    jn.And,
    jn.Or,
    jn.Not,
    jn.Neg,
    jn.Pos,
    jn.Add,
    jn.Sub,
    jn.Mul,
    jn.Div,
    jn.FloorDiv,
    jn.Mod,
    jn.Pow,
    jn.Concat,
    jn.List,
    jn.Tuple,
    jn.Dict,
    jn.Pair,
)
# Jinja's globals that are plain values; the others (cycler, joiner, namespace, lipsum) are
# Python objects a template could walk from.
JINJA_GLOBALS = frozenset({"range", "dict"})
SAFE_FILTERS = frozenset(
    {
        "abs",
        "capitalize",
        "center",
        "default",
        "d",
        "first",
        "float",
        "int",
        "join",
        "last",
        "length",
        "count",
        "list",
        "lower",
        "upper",
        "replace",
        "reverse",
        "round",
        "string",
        "title",
        "trim",
        "truncate",
        "wordcount",
        "regex_replace",
        "striptags",
        "escape",
        "e",
        "indent",
        "wordwrap",
        "batch",
        "slice",
        "unique",
        "sort",
        "min",
        "max",
        "sum",
        "tojson",
        "items",
    }
)
SAFE_TESTS = frozenset(
    {
        "defined",
        "undefined",
        "none",
        "number",
        "string",
        "mapping",
        "sequence",
        "iterable",
        "boolean",
        "true",
        "false",
        "integer",
        "float",
        "lower",
        "upper",
        "even",
        "odd",
        "divisibleby",
        "eq",
        "ne",
        "lt",
        "le",
        "gt",
        "ge",
        "in",
        "equalto",
        "greaterthan",
        "lessthan",
    }
)
# Methods of str, list and dict a template may call.
SAFE_METHODS = frozenset(
    {
        "strip",
        "lstrip",
        "rstrip",
        "split",
        "rsplit",
        "splitlines",
        "lower",
        "upper",
        "title",
        "capitalize",
        "casefold",
        "replace",
        "startswith",
        "endswith",
        "join",
        "index",
        "count",
        "find",
        "rfind",
        "isdigit",
        "isalpha",
        "isalnum",
        "isspace",
        "zfill",
        "get",
        "keys",
        "values",
        "items",
    }
)
_IDENT = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
_jinja = jinja2.Environment()


class TaskRefused(ValueError):
    """The upload breaks the rule; the message names the file, the field and what to change."""


@dataclass(frozen=True)
class FunctionRef:
    """A `!function module.name` value: Python, allowed only with ALLOW_REMOTE_CODE."""

    target: str


@dataclass(frozen=True)
class CheckedTask:
    name: str
    config: dict[str, Any]  # the parsed YAML, data_files still as uploaded names
    output_type: str | None


# ------------------------------------------------------------------ file names


def check_file_name(name: str, allow_code: bool) -> str:
    """The kind of an uploaded file ("yaml", "data" or "code"), or TaskRefused."""
    if not FILE_NAME.fullmatch(name):
        raise TaskRefused(
            f"file name {name[:120]!r}: use a plain file name (letters, digits, '_', '-', '.', "
            "starting with a letter or digit, at most 100 characters), no directories"
        )
    suffix = PurePosixPath(name).suffix.lower()
    if name.lower().endswith(YAML_SUFFIXES):
        return "yaml"
    if suffix in DATA_SUFFIXES:
        return "data"
    if suffix == CODE_SUFFIX and allow_code:
        return "code"
    allowed = "a task YAML (.yaml, .yml) and its data files (.jsonl, .json, .csv)"
    if suffix == CODE_SUFFIX:
        raise TaskRefused(
            f"file {name!r}: Python files are refused by this server (the operator can allow "
            f"them with ALLOW_REMOTE_CODE=true); an upload holds {allowed}"
        )
    raise UnsupportedFile(f"file {name!r}: unsupported file type; an upload holds {allowed}")


class UnsupportedFile(TaskRefused):
    """A file whose type an upload may not hold."""


# ------------------------------------------------------------------ YAML


class _Loader(yaml.SafeLoader):
    """Safe loading; `!function` becomes a FunctionRef, any other tag is an error."""


def _function(loader: yaml.SafeLoader, node: yaml.Node) -> FunctionRef:
    return FunctionRef(str(loader.construct_scalar(node)))  # type: ignore[arg-type]


def _other_tag(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> Any:
    raise TaskRefused(f"YAML tag {node.tag!r} is not allowed in a task YAML")


_Loader.add_constructor("!function", _function)
_Loader.add_multi_constructor("!", _other_tag)
_Loader.add_multi_constructor("tag:", _other_tag)


class _Dumper(yaml.SafeDumper):
    pass


_Dumper.add_representer(
    FunctionRef, lambda dumper, ref: dumper.represent_scalar("!function", ref.target)
)


def parse_yaml(data: bytes, file_name: str) -> dict[str, Any]:
    if len(data) > MAX_YAML_BYTES:
        raise TaskRefused(f"{file_name}: a task YAML may be at most {MAX_YAML_BYTES} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise TaskRefused(f"{file_name}: not UTF-8 text") from None
    try:
        config = yaml.load(text, Loader=_Loader)
    except TaskRefused as exc:
        raise TaskRefused(f"{file_name}: {exc}") from None
    except yaml.YAMLError as exc:
        raise TaskRefused(f"{file_name} is not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(config, dict):
        raise TaskRefused(
            f"{file_name}: a task YAML is a mapping of fields (task:, dataset_path:, ...), "
            f"not {type(config).__name__}"
        )
    return config


def dump_yaml(config: Mapping[str, Any]) -> str:
    return yaml.dump(dict(config), Dumper=_Dumper, sort_keys=False, allow_unicode=True)


def _walk(value: Any, where: str, depth: int = 0) -> Iterator[tuple[str, Any]]:
    """Every (path, value) in the parsed YAML, keys included."""
    if depth > MAX_DEPTH:
        raise TaskRefused(f"{where}: nested more than {MAX_DEPTH} levels deep")
    yield where, value
    if isinstance(value, dict):
        for key, item in value.items():
            yield f"{where}.{key}", key
            yield from _walk(item, f"{where}.{key}", depth + 1)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _walk(item, f"{where}[{index}]", depth + 1)


# ------------------------------------------------------------------ the rule


def check_task(
    config: dict[str, Any], file_names: Mapping[str, str], allow_code: bool
) -> CheckedTask:
    """`config` (parse_yaml's) against the rule; `file_names` maps each other uploaded file to
    its kind (check_file_name's)."""
    name = config.get("task")
    if not isinstance(name, str) or not TASK_NAME.fullmatch(name):
        raise TaskRefused(
            "task: the YAML must name its task (task: my_task) with letters, digits, '_', '-' "
            f"and '.', starting with a letter or digit, at most 100 characters; got {name!r}"
        )
    if name.lower().endswith(YAML_SUFFIXES):
        raise TaskRefused(f"task: {name!r} ends like a file name; lm-eval would read it as a path")
    for key in config:
        if not isinstance(key, str):
            raise TaskRefused(f"field {key!r}: field names are strings")
        if key in ALWAYS_REFUSED:
            raise TaskRefused(f"{key}: {ALWAYS_REFUSED[key]}")
        if key in CODE_KEYS and not allow_code:
            raise TaskRefused(
                f"{key}: this field runs Python, which this server refuses in uploaded tasks "
                "(the operator can allow it with ALLOW_REMOTE_CODE=true)"
            )
        if key not in DATA_KEYS and key not in CODE_KEYS:
            raise TaskRefused(
                f"{key}: not a field of an lm-eval task this server accepts; allowed: "
                f"{', '.join(sorted(DATA_KEYS))}"
            )
    for count, (where, value) in enumerate(_walk(config, "yaml"), 1):
        if count > MAX_VALUES:
            raise TaskRefused(f"the YAML holds more than {MAX_VALUES} values")
        if isinstance(value, FunctionRef):
            _check_function(value, where, file_names, allow_code)
        elif isinstance(value, str) and not allow_code:
            try:
                check_template(value)
            except TaskRefused as exc:
                raise TaskRefused(f"{where[5:] or 'yaml'}: {exc}") from None
    _check_loader(config, file_names)
    _check_metrics(config.get("metric_list"))
    fewshot = config.get("fewshot_config")
    bad_fewshot = not isinstance(fewshot, dict) or not set(fewshot) <= FEWSHOT_KEYS
    if fewshot is not None and not allow_code and bad_fewshot:
        raise TaskRefused(
            f"fewshot_config: a mapping with keys among {', '.join(sorted(FEWSHOT_KEYS))}"
        )
    output_type = config.get("output_type")
    if output_type is not None and output_type not in OUTPUT_TYPES:
        raise TaskRefused(f"output_type: {output_type!r} is not one of {', '.join(OUTPUT_TYPES)}")
    return CheckedTask(name, config, output_type if isinstance(output_type, str) else None)


def _check_function(
    ref: FunctionRef, where: str, file_names: Mapping[str, str], allow_code: bool
) -> None:
    if not allow_code:
        raise TaskRefused(
            f"{where[5:]}: !function runs Python, which this server refuses in uploaded tasks "
            "(the operator can allow it with ALLOW_REMOTE_CODE=true)"
        )
    module, _, function = ref.target.rpartition(".")
    if not _IDENT.fullmatch(module or "-") or not _IDENT.fullmatch(function or "-"):
        raise TaskRefused(
            f"{where[5:]}: !function {ref.target!r}: name a function of an uploaded file as "
            "module.function (utils.process_docs for utils.py)"
        )
    if file_names.get(module + CODE_SUFFIX) != "code":
        raise TaskRefused(f"{where[5:]}: !function {ref.target!r}: upload {module}.py with it")


def _data_file_names(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    if isinstance(value, dict):
        found: list[str] = []
        for split, item in value.items():
            if not isinstance(split, str):
                raise TaskRefused("dataset_kwargs.data_files: split names are strings")
            found += _data_file_names(item) if not isinstance(item, dict) else [""]
        return found
    raise TaskRefused(
        "dataset_kwargs.data_files: a file name, a list of them, or a mapping of split names "
        "to file names"
    )


def _check_loader(config: dict[str, Any], file_names: Mapping[str, str]) -> None:
    loader = config.get("dataset_path")
    if "custom_dataset" in config:
        return  # allow_code only (checked above): the function reads what it wants
    if loader not in LOADERS:
        raise TaskRefused(
            f"dataset_path: {loader!r}: an uploaded task reads its own files with a local "
            f"loader, one of {', '.join(sorted(LOADERS))} (hub datasets are not fetched)"
        )
    kwargs = config.get("dataset_kwargs")
    if not isinstance(kwargs, dict) or "data_files" not in kwargs:
        raise TaskRefused(
            "dataset_kwargs.data_files: name the uploaded data file(s), e.g. "
            "dataset_kwargs: {data_files: {test: data.jsonl}}"
        )
    extra = set(kwargs) - DATASET_KWARGS
    if extra:
        raise TaskRefused(
            f"dataset_kwargs: {', '.join(sorted(map(str, extra)))} not allowed; the local "
            f"loaders take {', '.join(sorted(DATASET_KWARGS))}"
        )
    data = {n for n, kind in file_names.items() if kind == "data"}
    for name in _data_file_names(kwargs["data_files"]):
        if not FILE_NAME.fullmatch(name) or Path(name).name != name:
            raise TaskRefused(
                f"dataset_kwargs.data_files: {name[:200]!r}: name an uploaded file by its plain "
                "name (no directories, no globs, no absolute paths)"
            )
        if name not in data:
            listed = ", ".join(sorted(data)) or "none"
            raise TaskRefused(
                f"dataset_kwargs.data_files: {name!r} is not among the uploaded data files "
                f"({listed}); upload it in the same request"
            )
        if DATA_SUFFIXES[PurePosixPath(name).suffix.lower()] != loader:
            raise TaskRefused(
                f"dataset_kwargs.data_files: {name!r} is not read by dataset_path {loader!r}"
            )


def _check_metrics(metrics: Any) -> None:
    if metrics is None:
        return
    if not isinstance(metrics, list) or not all(isinstance(m, dict) for m in metrics):
        raise TaskRefused("metric_list: a list of mappings (- metric: exact_match ...)")
    for entry in metrics:
        if entry.get("hf_evaluate"):
            raise TaskRefused(
                "metric_list: hf_evaluate loads a metric script through HF evaluate; use a "
                "metric lm-eval registers (exact_match, acc, ...)"
            )


def data_files_in(config: Mapping[str, Any], task_dir: Path) -> dict[str, Any]:
    """`config` with dataset_kwargs.data_files made absolute paths inside `task_dir` (the job
    runs in its own directory, where a relative name would not be found)."""

    def absolute(value: Any) -> Any:
        if isinstance(value, str):
            return str(task_dir / value)
        if isinstance(value, list):
            return [absolute(v) for v in value]
        if isinstance(value, dict):
            return {k: absolute(v) for k, v in value.items()}
        return value

    out = dict(config)
    kwargs = out.get("dataset_kwargs")
    if isinstance(kwargs, dict) and "data_files" in kwargs:
        out["dataset_kwargs"] = {**kwargs, "data_files": absolute(kwargs["data_files"])}
    return out


# ------------------------------------------------------------------ templates


def check_template(source: str) -> None:
    """`source`, parsed as lm-eval's Jinja would, uses only the data-only subset."""
    if "{" not in source:
        return  # no Jinja syntax: plain text
    try:
        tree = _jinja.parse(source)
    except jinja2.TemplateSyntaxError as exc:
        raise TaskRefused(f"not a valid Jinja template ({exc.message})") from None
    for node in tree.find_all(jn.Node):
        _check_node(node)


def _refuse(what: str) -> TaskRefused:
    return TaskRefused(
        f"the template uses {what}, outside what an uploaded task may use without "
        "ALLOW_REMOTE_CODE (field names, item access, filters such as trim/lower/join, string "
        "methods such as strip/split/index, if and for)"
    )


def _check_node(node: jn.Node) -> None:
    if not isinstance(node, _JINJA_NODES):
        raise _refuse(f"{{% {type(node).__name__.lower()} %}}")
    if isinstance(node, jn.Name):
        namespace = jinja2.defaults.DEFAULT_NAMESPACE
        if node.ctx == "load" and node.name in namespace and node.name not in JINJA_GLOBALS:
            raise _refuse(f"the global {node.name!r}")
        if node.name.startswith("_"):
            raise _refuse(f"the name {node.name!r}")
    elif isinstance(node, jn.Getattr):
        if not _IDENT.fullmatch(node.attr):
            raise _refuse(f"the attribute {node.attr!r}")
    elif isinstance(node, jn.Getitem):
        if isinstance(node.arg, jn.Const):
            if isinstance(node.arg.value, str) and node.arg.value.startswith("_"):
                raise _refuse(f"the item {node.arg.value!r}")
        elif _has_dynamic_item(node.node):
            # A key taken from the data may name an attribute (Jinja falls back to getattr);
            # one such step from a data value leads nowhere, a chain of them could.
            raise _refuse("item access with a computed key on the result of another")
    elif isinstance(node, jn.Filter | jn.Test):
        allowed = SAFE_FILTERS if isinstance(node, jn.Filter) else SAFE_TESTS
        if node.name not in allowed:
            kind = "filter" if isinstance(node, jn.Filter) else "test"
            raise _refuse(f"the {kind} {node.name!r}")
        _check_call_args(node)
    elif isinstance(node, jn.Call):
        target = node.node
        method = isinstance(target, jn.Getattr) and target.attr in SAFE_METHODS
        if not method and not (isinstance(target, jn.Name) and target.name == "range"):
            raise _refuse("a call of anything but a string, list or dict method or range()")
        _check_call_args(node)
    elif isinstance(node, jn.Keyword) and node.key == "attribute":
        raise _refuse("attribute= (it reads attributes by name)")


def _check_call_args(node: jn.Call | jn.Filter | jn.Test) -> None:
    if node.dyn_args is not None or node.dyn_kwargs is not None:
        raise _refuse("*args or **kwargs")


def _has_dynamic_item(node: jn.Node) -> bool:
    while isinstance(node, jn.Getattr | jn.Getitem):
        if isinstance(node, jn.Getitem) and not isinstance(node.arg, jn.Const | jn.Slice):
            return True
        node = node.node
    return False


# ------------------------------------------------------------------ summaries

# The fields GET /tasks/{name} shows of a task config.
SUMMARY_KEYS = (
    "task",
    "task_alias",
    "group",
    "tag",
    "output_type",
    "dataset_path",
    "dataset_name",
    "training_split",
    "validation_split",
    "test_split",
    "fewshot_split",
    "num_fewshot",
    "doc_to_text",
    "doc_to_target",
    "doc_to_choice",
    "description",
    "metric_list",
    "generation_kwargs",
    "filter_list",
    "metadata",
)


def summary(config: Mapping[str, Any]) -> dict[str, Any]:
    """The main fields of a task config, JSON-ready (functions shown as `!function name`)."""

    def plain(value: Any, depth: int = 0) -> Any:
        if depth > MAX_DEPTH:
            return "..."
        if isinstance(value, FunctionRef):
            return f"!function {value.target}"
        if isinstance(value, dict):
            return {str(k): plain(v, depth + 1) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [plain(v, depth + 1) for v in value]
        if value is None or isinstance(value, str | int | float | bool):
            return value
        return str(value)

    return {key: plain(config[key]) for key in SUMMARY_KEYS if key in config}
