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
- Templates: the first of two filters. The job's launcher renders every prompt field in Jinja's
  ImmutableSandboxedEnvironment (`runtime.launcher`), which refuses attributes starting
  with `_` and changes to lists and dicts; the rule refuses, before any job runs, templates
  that could get that far. Every string of the YAML is parsed as a template and its syntax
  tree held to a subset (`check_template`): names, constants, item and attribute access
  without leading underscores, a fixed set of filters, tests and string/list/dict methods,
  conditions and loops. Jinja's item access falls back to attribute access, so `x[k]` with a
  key from the data (`"__init__"`) reaches an attribute: a computed key is allowed only on
  plain data (a document field, a literal, or what constant-key and attribute access, a
  string/list/dict method or a filter make of one), and nothing may take its result further
  (no item or attribute access, no method call), through a `{% set %}` or `{% for %}` name
  included (`_Flow`). `loop` (beyond `loop.index` and its kin), `self`, Jinja's globals, and
  what `escape`/`tojson` (Markup) or `batch`/`slice`/`unique`/`items`/`reverse` (Python
  generators) return are never subscripted either. The issue-20 chain (`loop[k]`, then
  `[k2]`, each step named by `{% set %}`) is refused here and fails in the sandbox.
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

from lm_eval_server.tasks import yaml_bounds

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


class _Loader(yaml_bounds.BoundedCSafeLoader):
    """Safe loading within bounds (yaml_bounds: depth, values with aliases counted where they are
    used, numbers), with libyaml's parser as lm-eval's task loader uses it; `!function` becomes
    a FunctionRef, any other tag is an error."""

    max_depth = MAX_DEPTH
    max_values = MAX_VALUES


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
        config = yaml_bounds.load(text, _Loader)
    except (TaskRefused, yaml_bounds.YamlRefused) as exc:
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


# Levels of brackets and of blocks ({% if %}, {% for %}, ...) a template may nest. Jinja's parser
# recurses a few frames per level (a RecursionError near 900 levels), keeping every level's
# objects alive meanwhile: counted first, from the lexer's tokens, which it yields one by one.
MAX_TEMPLATE_DEPTH = 64
_BLOCKS = frozenset({"if", "for", "macro", "call", "filter", "block", "with", "autoescape"})


def _template_depth_beyond(source: str, limit: int) -> bool:
    brackets = blocks = 0
    after_block_begin = False
    for _, kind, value in _jinja.lex(source):
        if kind == "operator":
            if value in "([{":
                brackets += 1
            elif value in ")]}":
                brackets = max(brackets - 1, 0)
        elif kind == "name" and after_block_begin:
            if value in _BLOCKS:
                blocks += 1
            elif value.startswith("end") and value[3:] in _BLOCKS:
                blocks = max(blocks - 1, 0)
        if brackets > limit or blocks > limit:
            return True
        if kind != "whitespace":
            after_block_begin = kind == "block_begin"
    return False


def check_template(source: str) -> None:
    """`source`, parsed as lm-eval's Jinja would, uses only the data-only subset."""
    if "{" not in source:
        return  # no Jinja syntax: plain text
    nodes = None
    try:
        if _template_depth_beyond(source, MAX_TEMPLATE_DEPTH):
            raise TaskRefused(
                f"the template nests brackets or blocks more than {MAX_TEMPLATE_DEPTH} levels deep"
            )
        tree = _jinja.parse(source)
        nodes = list(tree.find_all(jn.Node))
    except jinja2.TemplateSyntaxError as exc:
        raise TaskRefused(f"not a valid Jinja template ({exc.message})") from None
    except RecursionError:
        pass  # refused below, outside the handler: its traceback holds a thousand frames
    if nodes is None:
        # Jinja's parser and find_all recurse once per level: `{{ ((((...)))) }}` 3,000 deep.
        raise TaskRefused("the template nests too deeply to be read")
    for node in nodes:
        _check_node(node)
    _Flow(tree).check()


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
        # A computed key is _Flow's: it may be a key from the data naming an attribute.
        value = node.arg.value if isinstance(node.arg, jn.Const) else None
        if isinstance(value, str) and value.startswith("_"):
            raise _refuse(f"the item {value!r}")
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


# What a template value may be, for the rule on computed keys (_Flow). DATA: plain data (the
# document's fields are JSON values, literals). STEP: what a computed key made of data, which
# may be an attribute (a method, a type) and is taken no further. ITER_DATA/ITER_STEP: a Python
# generator (`|batch`, ...) over DATA/STEP items: iterating it is fine, touching it is not.
# OPAQUE: a Python object (loop, self, a global, Markup): never touched.
_BOTTOM, _DATA, _STEP, _ITER_DATA, _ITER_STEP, _OPAQUE = range(6)
_SPECIAL_NAMES = frozenset({"loop", "self", "caller", "varargs", "kwargs"})
LOOP_ATTRS = frozenset(
    {"index", "index0", "revindex", "revindex0", "first", "last", "length", "depth", "depth0"}
)
# Filters by what they return (all others in SAFE_FILTERS return a string or a number).
_ITER_FILTERS = frozenset({"batch", "slice", "unique", "items", "reverse"})
_MARKUP_FILTERS = frozenset({"escape", "e", "tojson"})
_ELEMENT_FILTERS = frozenset({"first", "last", "min", "max", "sort", "list", "sum"})
_PASS_FILTERS = frozenset({"default", "d"})
_NUMBER_FILTERS = frozenset({"abs", "float", "int", "length", "count", "wordcount", "round"})
# Expression visits one check may make (a 256 KB template has far fewer nodes).
MAX_FLOW_STEPS = 2_000_000


def _join(a: int, b: int) -> int:
    if a == b or b == _BOTTOM:
        return a
    if a == _BOTTOM:
        return b
    if {a, b} <= {_DATA, _STEP}:
        return _STEP
    return _OPAQUE


def _items(state: int) -> int:
    """The state of what iterating a value of `state` yields."""
    return {_ITER_DATA: _DATA, _ITER_STEP: _STEP}.get(state, state)


def _iter_of(state: int) -> int:
    return {_DATA: _ITER_DATA, _STEP: _ITER_STEP, _BOTTOM: _BOTTOM}.get(state, _OPAQUE)


class _Flow:
    """Follows what each expression of a template may hold (see the module doc, Templates).

    Names bound by `{% set %}` and `{% for %}` get the join of every value bound to them,
    iterated to a fixed point; then every item access, attribute access and method call is
    checked against the state of what it is applied to.
    """

    def __init__(self, tree: jn.Template) -> None:
        self.tree = tree
        self.names: dict[str, int] = {}
        self.problem: str | None = None
        self.strict = False
        self.steps_left = MAX_FLOW_STEPS
        self.bindings: list[tuple[jn.Node, jn.Node, bool]] = []  # target, value, iterated
        for node in tree.find_all((jn.Assign, jn.For)):
            if isinstance(node, jn.Assign):
                self.bindings.append((node.target, node.node, False))
            else:
                self.bindings.append((node.target, node.iter, True))
        for target, _, _ in self.bindings:
            for name in target.find_all(jn.Name) if not isinstance(target, jn.Name) else [target]:
                self.names[name.name] = _BOTTOM

    def check(self) -> None:
        try:
            self._settle()
            self.strict = True
            # Each expression once: from the statements (and the template) that hold it.
            for holder in [self.tree, *self.tree.find_all(jn.Stmt)]:
                for child in holder.iter_child_nodes():
                    if isinstance(child, jn.Expr):
                        self.state(child)
                        if self.problem is not None:
                            raise _refuse(self.problem)
        except RecursionError:
            raise TaskRefused("the template nests too deeply to be read") from None

    def _settle(self) -> None:
        """The names' states at a fixed point: a binding is evaluated again only when a name
        it reads changed (each name changes a few times at most)."""
        readers: dict[str, list[int]] = {}
        for index, (_, value, _) in enumerate(self.bindings):
            read = [value] if isinstance(value, jn.Name) else value.find_all(jn.Name)
            for name in {n.name for n in read}:
                readers.setdefault(name, []).append(index)
        pending = list(range(len(self.bindings)))
        queued = set(pending)
        while pending:
            index = pending.pop()
            queued.discard(index)
            target, value, iterated = self.bindings[index]
            before = dict(self.names)
            state = self.state(value)
            self.bind(target, _items(state) if iterated else state)
            for name, now in self.names.items():
                if before.get(name) != now:
                    for reader in readers.get(name, ()):
                        if reader not in queued:
                            queued.add(reader)
                            pending.append(reader)

    def bind(self, target: jn.Node, state: int) -> None:
        if isinstance(target, jn.Name):
            self.names[target.name] = _join(self.names.get(target.name, _BOTTOM), state)
        elif isinstance(target, jn.Tuple):
            for item in target.items:
                self.bind(item, _items(state))

    def touch(self, state: int, what: str) -> None:
        if self.strict and self.problem is None and state not in (_DATA, _STEP, _BOTTOM):
            self.problem = what

    def state(self, node: jn.Node) -> int:
        self.steps_left -= 1
        if self.steps_left < 0:
            raise TaskRefused("the template is too large to check (simplify it)")
        s = self.state
        if isinstance(node, jn.Const | jn.TemplateData):
            return _DATA
        if isinstance(node, jn.Name):
            if node.name in _SPECIAL_NAMES or node.name in jinja2.defaults.DEFAULT_NAMESPACE:
                return _OPAQUE
            return self.names.get(node.name, _DATA)
        if isinstance(node, jn.List | jn.Tuple):
            out = _DATA
            for item in node.items:
                out = _join(out, s(item))
            return out
        if isinstance(node, jn.Dict):
            out = _DATA
            for pair in node.items:
                out = _join(out, _join(s(pair.key), s(pair.value)))
            return out
        if isinstance(node, jn.Getattr):
            if isinstance(node.node, jn.Name) and node.node.name == "loop":
                if node.attr in LOOP_ATTRS:
                    return _DATA
                self.touch(_OPAQUE, f"loop.{node.attr} (only {', '.join(sorted(LOOP_ATTRS))})")
                return _OPAQUE
            inner = s(node.node)
            self.touch(inner, f"the attribute {node.attr!r} of a value that is not plain data")
            return inner
        if isinstance(node, jn.Getitem):
            inner = s(node.node)
            computed = not isinstance(node.arg, jn.Const | jn.Slice)
            if not isinstance(node.arg, jn.Const):
                s(node.arg)
            self.touch(inner, "item access on a value that is not plain data")
            if computed:
                if self.strict and self.problem is None and inner == _STEP:
                    self.problem = (
                        "item access with a computed key on what another computed key gave "
                        "(a key from the data may name an attribute)"
                    )
                return _STEP if inner in (_DATA, _BOTTOM) else _OPAQUE
            return inner
        if isinstance(node, jn.Slice):
            for part in (node.start, node.stop, node.step):
                if part is not None:
                    s(part)
            return _DATA
        if isinstance(node, jn.Call):
            args = [s(a) for a in node.args] + [s(k.value) for k in node.kwargs]
            target = node.node
            if isinstance(target, jn.Name) and target.name == "range":
                return _DATA
            inner = s(target.node) if isinstance(target, jn.Getattr) else _OPAQUE
            if isinstance(target, jn.Getattr):
                self.touch(inner, f"the method {target.attr!r} of a value that is not plain data")
            out = inner
            for arg in args:
                out = _join(out, _items(arg))
            return out
        if isinstance(node, jn.Filter):
            inner = s(node.node) if node.node is not None else _DATA
            args = [s(a) for a in node.args] + [s(k.value) for k in node.kwargs]
            if node.name in _ITER_FILTERS:
                out = _iter_of(inner)
                for arg in args:
                    out = _OPAQUE if arg not in (_DATA, _BOTTOM) else out
                return out
            if node.name in _MARKUP_FILTERS:
                return _OPAQUE
            if node.name in _NUMBER_FILTERS:
                return _DATA
            if node.name in _ELEMENT_FILTERS:
                out = _items(inner)
                for arg in args:
                    out = _join(out, _items(arg))
                return out
            if node.name in _PASS_FILTERS:
                out = inner
                for arg in args:
                    out = _join(out, arg)
                return out
            # A string: Markup stays Markup through string filters.
            if _OPAQUE in (_items(inner), *args):
                return _OPAQUE
            return _DATA
        if isinstance(node, jn.Test):
            s(node.node)
            for a in [*node.args, *(k.value for k in node.kwargs)]:
                s(a)
            return _DATA
        if isinstance(node, jn.CondExpr):
            s(node.test)
            out = s(node.expr1)
            return _join(out, s(node.expr2)) if node.expr2 is not None else out
        if isinstance(node, jn.Compare):
            s(node.expr)
            for op in node.ops:
                s(op.expr)
            return _DATA
        if isinstance(node, jn.Not):
            s(node.node)
            return _DATA
        if isinstance(node, jn.Neg | jn.Pos):
            return s(node.node)
        if isinstance(node, jn.Concat):
            out = _DATA
            for item in node.nodes:
                out = _OPAQUE if s(item) == _OPAQUE else out
            return out
        if isinstance(node, jn.BinExpr):  # And, Or, arithmetic
            return _join(s(node.left), s(node.right))
        return _OPAQUE  # any other node: _check_node has refused it already


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
