"""The installed-backend table: which models this environment can run, and the install hint."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
from importlib.machinery import ModuleSpec
from pathlib import Path

import pytest

from lm_eval_server.admission import backends
from lm_eval_server.admission.backends import (
    REQUIREMENTS,
    BackendTable,
    model_modules,
    module_present,
)
from lm_eval_server.config import ExecutorKind, Settings


def finder(present: dict[str, list[str] | None]):
    """A find_spec that knows only `present`: name -> package directories (None: a module)."""

    def find_spec(name: str) -> ModuleSpec | None:
        if name not in present:
            return None
        spec = ModuleSpec(name, None, is_package=present[name] is not None)
        if present[name] is not None:
            spec.submodule_search_locations = present[name]
        return spec

    return find_spec


HF_MODULES = {"torch": [], "transformers": [], "accelerate": []}
MODELS = {
    "hf": "lm_eval.models.huggingface",
    "vllm": "lm_eval.models.vllm_causallms",
    "openvino": "lm_eval.models.optimum_lm",
    "dummy": "lm_eval.models.dummy",
    "local-completions": "lm_eval.models.openai_completions",
    "someones-plugin": "their_package.models",
}


def test_missing_torch_refuses_hf_with_the_project_extra() -> None:
    table = BackendTable.build(MODELS, finder({"transformers": []}), extras={"hf", "vllm"})
    message = table.missing_extra("hf")
    assert message is not None
    assert "`uv sync --extra hf`" in message and 'pip install "lm-eval[hf]"' in message
    assert "missing: torch, accelerate" in message and "'hf'" in message
    assert table.missing_extra("dummy") is None
    assert table.missing_extra("local-completions") is None
    # A model whose module we have not reviewed is left for the job to judge.
    assert table.missing_extra("someones-plugin") is None
    assert table.missing_extra(None) is None


def test_all_present_refuses_nothing_but_what_is_missing() -> None:
    table = BackendTable.build(MODELS, finder({**HF_MODULES, "vllm": []}), extras={"hf", "vllm"})
    assert table.missing_extra("hf") is None
    assert table.missing_extra("vllm") is None
    # openvino needs hf (present) and optimum.intel (absent): the second requirement speaks.
    message = table.missing_extra("openvino")
    assert message is not None and 'pip install "lm-eval[optimum]"' in message


def test_extra_the_project_does_not_define_points_to_lm_eval() -> None:
    table = BackendTable.build(MODELS, finder({}), extras=set())
    message = table.missing_extra("vllm")
    assert message is not None
    assert '`pip install "lm-eval[vllm]"`' in message and "uv sync" not in message


def test_dotted_module_is_found_without_importing_its_parent(tmp_path: Path) -> None:
    # find_spec("optimum.intel") would import optimum; the table looks in its directory.
    (tmp_path / "optimum").mkdir()
    find = finder({"optimum": [str(tmp_path / "optimum")]})
    assert module_present("optimum", find)
    assert not module_present("optimum.intel", find)
    (tmp_path / "optimum" / "intel").mkdir()
    (tmp_path / "optimum" / "intel" / "__init__.py").write_text("raise SystemExit('imported')")
    assert module_present("optimum.intel", find)
    table = BackendTable.build(
        MODELS, finder({**HF_MODULES, "optimum": [str(tmp_path / "optimum")]})
    )
    assert table.missing_extra("openvino") is None
    assert not module_present("torch.nn", finder({"torch": None}))  # a module, not a package


def test_registry_entries_give_the_defining_module() -> None:
    class Plugin:
        pass

    entry = importlib.metadata.EntryPoint("mine", "pkg.models:Mine", "lm_eval.models")
    modules = model_modules(
        [("hf", "lm_eval.models.huggingface:HFLM"), ("mine", entry), ("cls", Plugin)]
    )
    assert modules == {
        "hf": "lm_eval.models.huggingface",
        "mine": "pkg.models",
        "cls": __name__,
    }


def test_every_lm_eval_model_module_is_reviewed() -> None:
    # A backend added by a future lm-eval lands here, so its imports get a row in the table.
    from lm_eval.models import MODEL_MAPPING

    modules = {target.partition(":")[0] for target in MODEL_MAPPING.values()}
    assert modules - set(REQUIREMENTS) == set()


def test_only_jobs_in_this_interpreter_are_judged(tmp_path: Path) -> None:
    here = [sys.executable, "-m", "lm_eval"]
    local = Settings(data_dir=tmp_path)
    assert backends.runs_here(here, local)
    assert not backends.runs_here(["/opt/other/bin/python", "-m", "lm_eval"], local)
    ray = {"data_dir": tmp_path, "executor": ExecutorKind.ray, "ray_address": "http://h:8265"}
    assert backends.runs_here(here, Settings(**ray))
    assert backends.runs_here(here, Settings(**ray, ray_job_runtime_env={"env_vars": {"A": "1"}}))
    assert not backends.runs_here(here, Settings(**ray, ray_job_runtime_env={"pip": ["vllm"]}))
    assert not backends.runs_here(here, Settings(**ray, ray_job_python="python"))


@pytest.mark.parametrize("model", ["hf", "vllm", "openvino", "mamba_ssm", "sglang"])
def test_probing_imports_no_backend(tmp_path: Path, model: str) -> None:
    probe = f"""
import json, sys
from lm_eval_server.admission import backends
backends.installed().missing_extra({model!r})
heavy = ["torch", "transformers", "vllm", "optimum", "mamba_ssm", "sglang", "accelerate"]
print(json.dumps([m for m in heavy if m in sys.modules]))
"""
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120
    )
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
