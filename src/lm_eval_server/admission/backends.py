"""Which lm-eval model backends this server's environment can run, judged before a job queues.

A model whose packages are missing (`hf` without torch, `vllm`, ...) would fail minutes later
with a traceback; instead the request gets a 422 naming the install command. The table below
was built by reading what each lm-eval 0.4.13 model module imports unconditionally, at import
or in its constructor (`lm_eval/models/*.py`); imports that depend on a model_arg (peft,
auto_gptq, tiktoken, ...) are left to the job. Presence is checked with `find_spec` (no import,
no torch) once per process: installing a backend needs a server restart, as the message says.

Only jobs that run in this server's own interpreter are judged: a job sent to another Python
(`LM_EVAL_PATHS`) or to Ray nodes with their own packages may well have what we lack.
"""

from __future__ import annotations

import functools
import importlib.machinery
import importlib.metadata
import importlib.util
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from importlib.machinery import ModuleSpec
from typing import Any

from lm_eval_server.config import ExecutorKind, Settings

FindSpec = Callable[[str], ModuleSpec | None]


@dataclass(frozen=True)
class Requirement:
    """Modules a backend imports, and how a person gets them: an extra of this project (when
    it defines one), else lm-eval's extra, else the pip package."""

    modules: tuple[str, ...]
    extra: str | None = None
    pip: str | None = None


HF = Requirement(("torch", "transformers", "accelerate"), extra="hf")


def _pip(package: str, *modules: str) -> Requirement:
    return Requirement(modules, pip=package)


# lm-eval model module -> what it needs, in the order a person should install it.
REQUIREMENTS: dict[str, tuple[Requirement, ...]] = {
    # Inference in this process: torch and friends.
    "lm_eval.models.huggingface": (HF,),
    "lm_eval.models.hf_vlms": (HF,),
    "lm_eval.models.hf_audiolm": (HF,),
    "lm_eval.models.hf_steered": (HF,),
    "lm_eval.models.mistral3": (HF,),
    "lm_eval.models.mamba_lm": (HF, _pip("mamba-ssm", "mamba_ssm")),
    "lm_eval.models.optimum_lm": (HF, Requirement(("optimum.intel",), extra="optimum")),
    "lm_eval.models.optimum_ipex": (HF, Requirement(("optimum.intel",), extra="ipex")),
    "lm_eval.models.optimum_habana": (HF, Requirement(("optimum.habana",), extra="habana")),
    "lm_eval.models.neuron_optimum": (HF, _pip("optimum-neuron", "optimum.neuron")),
    "lm_eval.models.vllm_causallms": (Requirement(("vllm",), extra="vllm"),),
    "lm_eval.models.vllm_vlms": (Requirement(("vllm", "ray", "transformers"), extra="vllm"),),
    "lm_eval.models.sglang_causallms": (_pip("sglang", "sglang"),),
    "lm_eval.models.trtllm_causallms": (_pip("tensorrt-llm", "tensorrt_llm", "transformers"),),
    "lm_eval.models.megatron_lm": (_pip("torch megatron-core", "torch", "megatron"),),
    "lm_eval.models.nemo_lm": (_pip("torch nemo_toolkit", "torch", "nemo"),),
    "lm_eval.models.onnxruntime_ort": (
        Requirement(("onnxruntime", "transformers"), extra="onnxruntime"),
    ),
    "lm_eval.models.onnxruntime_genai": (
        Requirement(("onnxruntime_genai", "transformers"), extra="onnxruntime-genai"),
    ),
    "lm_eval.models.winml": (
        Requirement(("onnxruntime_genai", "transformers"), extra="onnxruntime-genai"),
        _pip("winui3", "winui3"),
    ),
    # Clients of a remote service: only their SDK, if any.
    "lm_eval.models.anthropic_llms": (_pip("anthropic", "anthropic"),),
    "lm_eval.models.litellm_llms": (Requirement(("litellm",), extra="litellm"),),
    "lm_eval.models.ibm_watsonx_ai": (
        Requirement(("ibm_watsonx_ai", "dotenv"), extra="ibm-watsonx-ai"),
    ),
    "lm_eval.models.openai_completions": (),
    "lm_eval.models.sglang_generate_API": (),
    "lm_eval.models.textsynth": (),
    "lm_eval.models.gguf": (),
    "lm_eval.models.dummy": (),
}


def module_present(name: str, find_spec: FindSpec = importlib.util.find_spec) -> bool:
    """Whether `name` could be imported. A dotted name is looked up inside its parent's
    directories, because `find_spec("a.b")` imports `a` (optimum, say) to find `b`."""
    head, _, rest = name.partition(".")
    spec = find_spec(head)
    for part in rest.split(".") if rest else ():
        if spec is None or spec.submodule_search_locations is None:
            return False
        spec = importlib.machinery.PathFinder.find_spec(part, spec.submodule_search_locations)
    return spec is not None


def project_extras() -> frozenset[str]:
    """The extras this project defines (`uv sync --extra NAME`), from its installed metadata."""
    try:
        meta = importlib.metadata.metadata("lm-eval-server")
    except importlib.metadata.PackageNotFoundError:
        return frozenset()
    return frozenset(meta.get_all("Provides-Extra") or ())


def install_command(req: Requirement, extras: Iterable[str]) -> str:
    if req.extra is not None and req.extra in extras:
        return f'`uv sync --extra {req.extra}` (with pip: `pip install "lm-eval[{req.extra}]"`)'
    if req.extra is not None:
        return f'`pip install "lm-eval[{req.extra}]"`'
    return f"`pip install {req.pip}`"


def model_modules(entries: Iterable[tuple[str, Any]]) -> dict[str, str]:
    """Model name -> the module that defines it, from lm-eval's registry items. Lazy entries are
    "module:Class" strings or entry points; an already imported class carries its module."""
    modules: dict[str, str] = {}
    for name, target in entries:
        if isinstance(target, str):
            modules[name] = target.partition(":")[0]
        elif isinstance(target, importlib.metadata.EntryPoint):
            modules[name] = target.value.partition(":")[0]
        elif isinstance(getattr(target, "__module__", None), str):
            modules[name] = target.__module__
    return modules


@dataclass(frozen=True)
class BackendTable:
    """Model name -> why it cannot run here (None: it can, or we do not know it)."""

    refusals: Mapping[str, str]

    @classmethod
    def build(
        cls,
        modules: Mapping[str, str],
        find_spec: FindSpec = importlib.util.find_spec,
        extras: Iterable[str] = (),
    ) -> BackendTable:
        extras = frozenset(extras)
        present: dict[str, bool] = {}
        refusals: dict[str, str] = {}
        for model, module in modules.items():
            for req in REQUIREMENTS.get(module, ()):
                missing = [
                    m
                    for m in req.modules
                    if not present.setdefault(m, module_present(m, find_spec))
                ]
                if missing:
                    refusals[model] = (
                        f"model {model!r} needs {', '.join(req.modules)}, which this server's "
                        f"environment lacks (missing: {', '.join(missing)}). Install it with "
                        f"{install_command(req, extras)} and restart the server, or choose "
                        "another model."
                    )
                    break
        return cls(refusals)

    def missing_extra(self, model: str | None) -> str | None:
        return None if model is None else self.refusals.get(model)


def registry_entries() -> list[tuple[str, Any]]:
    try:
        import lm_eval.models  # noqa: F401 - registers the lazy placeholders
        from lm_eval.api.registry import model_registry  # type: ignore[attr-defined]
    except ImportError:
        return []
    return list(model_registry.items())


@functools.cache
def installed() -> BackendTable:
    """The table for this interpreter: what is installed does not change while we run."""
    return BackendTable.build(model_modules(registry_entries()), extras=project_extras())


def runs_here(program: list[str], settings: Settings) -> bool:
    """Whether the job's lm-eval imports from this interpreter's packages: the default program
    (this Python), locally or on Ray nodes told to use the same interpreter and no extra
    packages (a runtime_env with pip, uv, conda or a container brings its own)."""
    if program[:3] != [sys.executable, "-m", "lm_eval"]:
        return False
    if settings.executor is ExecutorKind.local:
        return True
    runtime_env = settings.ray_job_runtime_env or {}
    return settings.ray_job_python is None and set(runtime_env) <= {"env_vars", "config"}


def missing_extra(model: str | None, program: list[str], settings: Settings) -> str | None:
    """Why `model` cannot run in the job `program` starts, or None."""
    if model is None or not runs_here(program, settings):
        return None
    return installed().missing_extra(model)


@functools.cache
def describe_models() -> list[dict[str, Any]]:
    """GET /models: every name lm-eval's registry accepts, the module that implements it, what
    it needs and whether this server's environment has it. Computed once, like `installed`."""
    modules = model_modules(registry_entries())
    refusals = installed().refusals
    extras = project_extras()
    models = []
    for name in sorted(modules):
        module = modules[name]
        reqs = REQUIREMENTS.get(module)
        missing = refusals.get(name)
        needs = [m for req in reqs or () for m in req.modules]
        extra = next((r.extra for r in reqs or () if r.extra), None)
        models.append(
            {
                "name": name,
                "backend": module.removeprefix("lm_eval.models."),
                "requires": needs,
                "extra": extra,
                # None: a module this table does not know (an lm-eval newer than the table).
                "installed": None if reqs is None else missing is None,
                "install": (
                    next(
                        (
                            install_command(r, extras)
                            for r in reqs or ()
                            if not all(module_present(m) for m in r.modules)
                        ),
                        None,
                    )
                    if missing is not None
                    else None
                ),
            }
        )
    return models
