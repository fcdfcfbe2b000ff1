"""The response cache, job side (runtime.response_cache) with lm-eval's real DummyLM, Instance and
CachingLM; the fingerprint (admission.fingerprint); the files' bound (jobs.cache_policy)."""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path

import pytest
from lm_eval.api.instance import Instance
from lm_eval.api.model import CachingLM, hash_args
from lm_eval.models.dummy import DummyLM

from lm_eval_server.admission.fingerprint import INERT_MODEL_ARGS, model_fingerprint
from lm_eval_server.config import Settings
from lm_eval_server.jobs import cache_policy
from lm_eval_server.runtime import response_cache as rc


def ll(i: int) -> Instance:
    return Instance("loglikelihood", {}, (f"context {i}", " continuation"), i)


def gen(i: int, **kwargs: object) -> Instance:
    return Instance("generate_until", {}, (f"prompt {i}", {"until": ["\n"], **kwargs}), i)


class CountingDummy(DummyLM):
    """lm-eval's DummyLM, counting what it computes and calling the cache hook as backends do."""

    def __init__(self) -> None:
        super().__init__()
        self.computed = 0

    def loglikelihood(self, requests, disable_tqdm: bool = False):  # type: ignore[no-untyped-def]
        answers = super().loglikelihood(requests, disable_tqdm=True)
        self.computed += len(requests)
        for request, answer in zip(requests, answers, strict=True):
            self.cache_hook.add_partial("loglikelihood", request.args, answer)
        return answers

    def generate_until(self, requests, disable_tqdm: bool = False):  # type: ignore[no-untyped-def]
        self.computed += len(requests)
        return super().generate_until(requests, disable_tqdm=True)


def wrapped(path: Path, stats: Path | None = None) -> tuple[rc.ServerCachedLM, CountingDummy]:
    lm = CountingDummy()
    store = rc.open_store(path)
    assert store is not None
    return rc.ServerCachedLM(lm, store, rc.Stats(str(stats) if stats else None)), lm


def test_a_second_model_over_the_same_file_computes_nothing_and_answers_the_same(
    tmp_path: Path,
) -> None:
    path, stats = tmp_path / "fp.sqlite", tmp_path / "stats.json"
    first, lm1 = wrapped(path)
    requests = [ll(i) for i in range(5)]
    answers = first.loglikelihood(requests)
    assert lm1.computed == 5
    second, lm2 = wrapped(path, stats)
    assert second.loglikelihood(requests) == answers  # tuples of (float, bool), as computed
    assert all(type(a) is tuple and type(a[1]) is bool for a in second.loglikelihood(requests))
    assert lm2.computed == 0
    assert rc.read_stats(stats) == {"hits": 10, "misses": 0}
    part = second.loglikelihood([ll(1), ll(9)])
    assert part[0] == answers[1] and lm2.computed == 1


def test_sampled_generations_are_never_served_or_stored(tmp_path: Path) -> None:
    cached, lm = wrapped(tmp_path / "fp.sqlite")
    for kwargs in ({"do_sample": True}, {"temperature": 0.7}, {"temperature": "hot"}):
        cached.generate_until([gen(1, **kwargs)])
        cached.generate_until([gen(1, **kwargs)])
    assert lm.computed == 6
    greedy = [gen(1, temperature=0), gen(2), gen(3, do_sample=False, temperature=0.0)]
    cached.generate_until(greedy)
    cached.generate_until(greedy)
    assert lm.computed == 9
    assert rc.is_sampled("generate_until", ("p", {"temperature": float("nan")}))
    assert not rc.is_sampled("loglikelihood", ("c", "x"))


def test_values_of_the_wrong_shape_are_misses_never_answers(tmp_path: Path) -> None:
    path = tmp_path / "fp.sqlite"
    rc.ResponseStore(path).close()
    request = ll(1)
    key = hash_args("loglikelihood", request.args)
    db = sqlite3.connect(path)
    # What another job of the fingerprint might plant: not (number, bool), or a pickle.
    for value in ('"text"', "[1.0]", '[1.0, "yes"]', "{}", "\x80\x04K\x01."):
        db.execute("INSERT OR REPLACE INTO responses VALUES (?, 'loglikelihood', ?)", (key, value))
        db.commit()
        cached, lm = wrapped(path)
        cached.loglikelihood([request])
        assert lm.computed == 1, value
        # The computed answer replaced it.
        db.execute("INSERT OR REPLACE INTO responses VALUES (?, 'generate_until', '1')", (key,))
        db.commit()
    db.close()
    assert rc.decode_answer("loglikelihood", [-1, True]) == (-1.0, True)
    assert rc.decode_answer("loglikelihood_rolling", True) is None
    assert rc.decode_answer("generate_until", 3) is None


def test_an_unreadable_file_is_set_aside_and_the_model_runs_without_the_cache(
    tmp_path: Path,
) -> None:
    path = tmp_path / "fp.sqlite"
    path.write_bytes(b"not sqlite at all " * 64)
    assert rc.open_store(path) is None
    assert not path.exists()
    assert len(list(tmp_path.glob("fp.sqlite.corrupt-*"))) == 1
    assert rc.open_store(path) is not None  # a fresh file next time


def test_a_callers_own_use_cache_still_works_around_the_servers(tmp_path: Path) -> None:
    cached, lm = wrapped(tmp_path / "server.sqlite")
    user = CachingLM(cached, str(tmp_path / "user.db"))
    requests = [ll(i) for i in range(3)]
    answers = user.loglikelihood(requests)
    assert lm.computed == 3
    # The caller's own cache received every answer (through the hook and after the call).
    other = CountingDummy()
    fresh = CachingLM(other, str(tmp_path / "user.db"))
    assert fresh.loglikelihood(requests) == answers
    assert other.computed == 0


def test_install_wraps_the_models_lm_eval_builds(tmp_path: Path) -> None:
    import lm_eval.api.registry as registry

    original = registry.get_model
    env = {rc.ENV_CACHE: str(tmp_path / "c.sqlite"), rc.ENV_STATS: str(tmp_path / "s.json")}
    try:
        assert rc.install(env) is not None
        lm = registry.get_model("dummy").create_from_arg_string("")
        assert isinstance(lm, rc.ServerCachedLM)
        lm.generate_until([gen(1)])
        assert rc.read_stats(tmp_path / "s.json") == {"hits": 0, "misses": 1}
    finally:
        registry.get_model = original
    assert rc.install({}) is None


def test_stats_files_of_the_wrong_shape_read_as_none(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    for text in ("[]", '{"hits": -1, "misses": 0}', '{"hits": true, "misses": 0}', "nope"):
        path.write_text(text)
        assert rc.read_stats(path) is None
    os.unlink(path)
    os.symlink(tmp_path / "elsewhere.json", path)
    (tmp_path / "elsewhere.json").write_text('{"hits": 1, "misses": 2}')
    assert rc.read_stats(path) is None  # a link planted by the job is not followed


# ---------------------------------------------------------------- the fingerprint


def test_the_fingerprint_changes_with_what_can_change_an_answer() -> None:
    args = "model=stub,base_url=http://127.0.0.1:1/v1/completions,num_concurrent=1"
    base = model_fingerprint("alice", "local-completions", args, "0.4.13")
    assert base == model_fingerprint("alice", "local-completions", args, "0.4.13")
    different = [
        model_fingerprint("bob", "local-completions", args, "0.4.13"),
        model_fingerprint(None, "local-completions", args, "0.4.13"),
        model_fingerprint("alice", "local-chat-completions", args, "0.4.13"),
        model_fingerprint("alice", "local-completions", args.replace("=stub", "=other"), "0.4.13"),
        model_fingerprint("alice", "local-completions", args.replace(":1/", ":2/"), "0.4.13"),
        model_fingerprint("alice", "local-completions", args, "0.4.14"),
    ]
    assert len({base, *different}) == 1 + len(different)
    # Inert keys do not; text and parsed forms agree (lm-eval's own parser).
    inert = args.replace("num_concurrent=1", "num_concurrent=8,max_retries=3,timeout=60")
    assert model_fingerprint("alice", "local-completions", inert, "0.4.13") == base
    parsed = {"model": "stub", "base_url": "http://127.0.0.1:1/v1/completions"}
    assert model_fingerprint("alice", "local-completions", parsed, "0.4.13") == base
    assert {"num_concurrent", "max_retries", "batch_size", "timeout"} <= INERT_MODEL_ARGS


# ---------------------------------------------------------------- the bound


def test_eviction_removes_least_recently_used_fingerprints_first(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", task_index=False, response_cache_max_bytes=2500)
    owner_dir = settings.owner_cache_dir("alice") / "responses"
    owner_dir.mkdir(parents=True)
    files = []
    for i, name in enumerate(("old", "mid", "new")):
        path = owner_dir / f"{name}.sqlite"
        path.write_bytes(b"x" * 1000)
        os.utime(path, (time.time() - 100 + i, time.time() - 100 + i))
        files.append(path)
    corrupt = owner_dir / "bad.sqlite.corrupt-1"
    corrupt.write_bytes(b"x" * 10)
    removed = cache_policy.evict(settings, files[0])  # "old" is being used now
    assert removed == [corrupt, files[1]]
    assert files[0].exists() and files[2].exists()


@pytest.mark.parametrize("shared", [False, True])
def test_where_a_jobs_file_lives(tmp_path: Path, shared: bool) -> None:
    settings = Settings(data_dir=tmp_path / "data", task_index=False, response_cache_shared=shared)
    unconfined = cache_policy.cache_file(settings, "alice", "f", sandboxed=False)
    assert unconfined.host == unconfined.job == settings.cache_dir / "responses" / "f.sqlite"
    confined = cache_policy.cache_file(settings, "alice", "f", sandboxed=True)
    assert confined.job == settings.cache_dir / "responses" / "f.sqlite"
    expected = (
        settings.shared_response_cache_dir
        if shared
        else settings.owner_cache_dir("alice") / "responses"
    )
    assert confined.host == expected / "f.sqlite"


class StoppedHalfway(CountingDummy):
    """A model interrupted mid-call (a stop, a kill): it computed and hooked 3 answers of 8."""

    def loglikelihood(self, requests, disable_tqdm: bool = False):  # type: ignore[no-untyped-def]
        answers = DummyLM.loglikelihood(self, requests[:3], disable_tqdm=True)
        for request, answer in zip(requests[:3], answers, strict=True):
            self.cache_hook.add_partial("loglikelihood", request.args, answer)
        raise KeyboardInterrupt


def test_misses_are_answers_computed_not_requests_asked_for(tmp_path: Path) -> None:
    path, stats = tmp_path / "fp.sqlite", tmp_path / "stats.json"
    lm = StoppedHalfway()
    store = rc.open_store(path)
    assert store is not None
    cached = rc.ServerCachedLM(lm, store, rc.Stats(str(stats)))
    with pytest.raises(KeyboardInterrupt):
        cached.loglikelihood([ll(i) for i in range(8)])
    # The stats file says what the model computed before it stopped: 3, not the 8 it was sent.
    assert rc.read_stats(stats) == {"hits": 0, "misses": 3}
    # The next attempt finds those 3 and computes the other 5.
    again, lm2 = wrapped(path, tmp_path / "stats2.json")
    again.loglikelihood([ll(i) for i in range(8)])
    assert lm2.computed == 5
    assert rc.read_stats(tmp_path / "stats2.json") == {"hits": 3, "misses": 5}
    # A backend that never calls the hook is counted when its call returns.
    quiet, lm3 = wrapped(tmp_path / "other.sqlite", tmp_path / "stats3.json")
    quiet.generate_until([gen(i) for i in range(4)])
    assert lm3.computed == 4 and rc.read_stats(tmp_path / "stats3.json")["misses"] == 4
