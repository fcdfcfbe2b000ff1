"""API schemas of reproduction receipts and reproductions (GET /job/{id}/receipt, the
`reproduction` of GET /job/{id}); the objects are built by outputs.receipts and
outputs.reproduction."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field


class ReceiptTask(BaseModel):
    version: int | float | str | None = Field(description="The task's version (lm-eval).")
    task_hash: str | None = Field(
        description="lm-eval's task hash (over every sample's doc, prompt and target hash); "
        "written only when the job logged samples."
    )
    n_shot: int | None = None
    doc_hash_digest: str | None = Field(
        description="SHA-256 over the sorted distinct doc_hash values of the task's samples "
        "file, one per line; null without log_samples."
    )
    documents: int | None = Field(description="Distinct doc_ids in the samples file.")


class ReceiptModel(BaseModel):
    name: str | None = Field(description="The request's model (backend).")
    model_args: Any = Field(None, description="The request's model_args, credentials masked.")
    fingerprint: str | None = Field(
        description="The model fingerprint (admission.fingerprint); null where unknown."
    )


class Receipt(BaseModel):
    job_id: int
    status: str
    server_version: str
    recorded_at: str
    argv: list[str] = Field(description="The exact argv the job ran, credentials masked.")
    command: str = Field(description="The lm_eval command line, shell-quoted.")
    env_names: list[str] = Field(
        description="The names of the job's environment variables (never their values)."
    )
    env_names_source: Literal["job", "request"] = Field(
        description="job: as the job's process saw them; request: only the request's "
        "env_vars (the job wrote no facts file: it never ran, or ran another program)."
    )
    versions: dict[str, str | None] = Field(
        description="lm_eval, torch, transformers, datasets (and python) as the job's own "
        "interpreter has them; null: not installed or unknown."
    )
    versions_source: Literal["job", "results"] | None = Field(
        description="job: the job's launcher read them; results: lm-eval's results file "
        "(lm_eval and transformers only); null: unknown."
    )
    tasks: dict[str, ReceiptTask]
    seeds: dict[str, int | None] = Field(
        description="random_seed, numpy_seed, torch_seed, fewshot_seed as lm-eval used them."
    )
    model: ReceiptModel
    lm_eval_model_args: Any = Field(None, description="model_args as lm-eval recorded them.")
    results_file: str | None = None
    reproduction_of: int | None = Field(None, description="The job this one reproduces.")


class ReproductionExample(BaseModel):
    task: str
    doc_id: int | str
    doc_hash: str | None = None
    filter: str | None = None
    original: dict[str, Any] = Field(description="responses and metrics of the original.")
    reproduction: dict[str, Any] = Field(description="responses and metrics of this job.")


class MetricDelta(BaseModel):
    task: str
    metric: str
    filter: str
    original: float | str | None
    reproduction: float | str | None
    delta: float | None = Field(description="reproduction minus original.")
    samples_differing: int | None = Field(
        description="Paired samples whose value of this metric differs; null when the task "
        "had no samples to pair."
    )


class ReproductionTask(BaseModel):
    task: str
    identical: int
    differing: int
    only_original: int
    only_reproduction: int
    truncated: bool


class Reproduction(BaseModel):
    of: int = Field(description="The job this one reproduces.")
    state: Literal["pending", "done", "unavailable"] = Field(
        description="pending: this job has not ended; done: compared; unavailable: nothing "
        "to compare (see note)."
    )
    identical: int | None = Field(
        None,
        description="Paired samples (doc_id, doc_hash, filter) with equal responses and metrics.",
    )
    differing: int | None = Field(None, description="Paired samples that differ.")
    only_original: int | None = Field(None, description="Samples in the original only.")
    only_reproduction: int | None = Field(None, description="Samples in this job only.")
    tasks: list[ReproductionTask] = []
    examples: list[ReproductionExample] = Field([], description="The first differing samples.")
    metric_deltas: list[MetricDelta] = []
    note: str | None = None
