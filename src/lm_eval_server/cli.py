"""`lm-eval-server`: run the server, or drive a running one from a shell or a CI job.

    lm-eval-server serve --host 0.0.0.0 --port 8080
    lm-eval-server submit --model hf --tasks arc_easy --model_args pretrained=gpt2 --wait
    lm-eval-server jobs | status ID | logs ID -f | results ID | stop ID | delete ID | wait ID
    lm-eval-server compare ID ID [ID ...] [--format table|csv|markdown|json]
    lm-eval-server whoami

Client commands talk HTTP only (httpx): they import nothing from lm-eval, so they start fast and
work against a server on another machine.
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

DEFAULT_URL = "http://localhost:8080"
TERMINAL = ("Completed", "Failed", "Stopped")

# `wait` exit codes: CI scripts branch on them, so they are part of the interface.
EXIT_OK = 0
EXIT_ERROR = 1  # Failed job, HTTP error, unreachable server
EXIT_USAGE = 2  # argparse's own code for bad command lines
EXIT_STOPPED = 3
EXIT_TIMEOUT = 4

# Options of `submit` that belong to this client, not to the job request.
SUBMIT_CLIENT_FLAGS = {"wait": "after queuing, wait like `wait ID` and exit with its code"}
SUBMIT_CLIENT_VALUES = {
    "url": "server URL (as the global --url)",
    "token": "API key (as the global --token)",
    "env": "KEY=VALUE added to env_vars; repeatable",
    "secret": "KEY=SECRET: env_vars KEY set from the server's secret SECRET; repeatable",
    "wait_timeout": "with --wait: give up after this many seconds (exit 4)",
    "gate_file": "a JSON gate {baseline, rules} for the job; with --wait, exit 0 when it "
    "passes, 1 when it fails, 2 on error",
}


class CliError(Exception):
    """A failure to report as `error: <message>` with exit code 1."""


# ------------------------------------------------------------------ HTTP


class Client:
    def __init__(self, url: str, token: str | None) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.url = url.rstrip("/")
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=30.0)

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise CliError(f"cannot reach the server at {self.url}: {exc}") from exc
        check(response)
        return response.json()

    def get(self, path: str, **kwargs: Any) -> Any:
        return self.request("GET", path, **kwargs)

    def get_text(self, path: str, **kwargs: Any) -> str:
        try:
            response = self.http.request("GET", path, **kwargs)
        except httpx.HTTPError as exc:
            raise CliError(f"cannot reach the server at {self.url}: {exc}") from exc
        check(response)
        return response.text

    def stream_text(self, path: str, params: dict[str, Any], out: Any) -> None:
        try:
            # No read timeout: a followed log may stay quiet for minutes while a model loads.
            timeout = httpx.Timeout(30.0, read=None)
            with self.http.stream("GET", path, params=params, timeout=timeout) as response:
                if response.is_error:
                    response.read()
                    check(response)
                for chunk in response.iter_bytes():
                    out.write(chunk)
                    out.flush()
        except httpx.HTTPError as exc:
            raise CliError(f"lost the connection to {self.url}: {exc}") from exc


def check(response: httpx.Response) -> None:
    if not response.is_error:
        return
    try:
        detail: Any = response.json().get("detail", response.text)
    except (ValueError, AttributeError):
        detail = response.text or response.reason_phrase
    raise CliError(f"HTTP {response.status_code}: {format_detail(detail)}")


def format_detail(detail: Any) -> str:
    if isinstance(detail, list):
        # FastAPI's validation errors: [{"loc": ["body", "limit"], "msg": "..."}, ...]
        lines = []
        for item in detail:
            if isinstance(item, dict):
                loc = ".".join(str(p) for p in item.get("loc", []) if p != "body")
                lines.append(f"{loc}: {item.get('msg')}" if loc else str(item.get("msg")))
            else:
                lines.append(str(item))
        return "\n  ".join(["request rejected:", *lines])
    return str(detail)


# ------------------------------------------------------------------ formatting


def table(
    headers: Sequence[str], rows: Iterable[Sequence[Any]], right: Collection[int] = ()
) -> str:
    text_rows = [[str(cell) for cell in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in text_rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]

    def line(cells: Sequence[str]) -> str:
        parts = [
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(parts).rstrip()

    return "\n".join([line(headers), *(line(r) for r in text_rows)])


def fmt_time(value: str | None) -> str:
    if not value:
        return "-"
    return datetime.fromisoformat(value).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    s = round(seconds)
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def fmt_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "" if value is None else str(value)


def fmt_progress(job: dict[str, Any]) -> str:
    if job["status"] == "Queued":
        return "-"
    text = f"{job.get('inference_progress_pct') or 0}%"
    progress = job.get("progress")
    if job["status"] == "Running" and progress:
        if not progress.get("total"):
            # Before the first request (starting, loading model): the phase says more.
            return f"{text} {progress.get('phase') or ''}".rstrip()
        text += f" {progress['done']}/{progress['total']}"
        if progress.get("eta_s") is not None:
            text += f" eta {fmt_duration(progress['eta_s'])}"
    return text


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=2))


# ------------------------------------------------------------------ submit options


def option_kind(prop: dict[str, Any]) -> str:
    """How a JobRequest property is given on the command line (mirrors the dashboard's form)."""
    types: set[str] = set()
    for schema in prop.get("anyOf", [prop]):
        if "$ref" in schema or schema.get("type") == "object":
            types.add("object")
        elif schema.get("type") not in (None, "null"):
            types.add(schema["type"])
    if types == {"boolean"}:
        return "flag"
    if "boolean" in types:
        return "flag_or_value"  # bare `--apply_chat_template`, or `--apply_chat_template NAME`
    if types == {"integer"}:
        return "integer"
    if types == {"number"}:
        return "number"
    if types == {"object"}:
        return "json"
    if "object" in types:
        return "key_value"
    return "text"


def convert(name: str, kind: str, text: str) -> Any:
    try:
        if kind == "integer":
            return int(text)
        if kind == "number":
            # An integer stays an integer: lm-eval reads `--limit 8` as a count, 0.5 as a fraction.
            number = int(text) if text.lstrip("-").isdigit() else float(text)
            if not math.isfinite(number):
                raise ValueError("not a finite number (JSON has no NaN or Infinity)")
            return number
        if kind == "json" or (kind == "key_value" and text.lstrip().startswith("{")):
            return strict_json(text)
    except ValueError as exc:
        raise CliError(f"--{name}: cannot read {text!r}: {exc}") from exc
    # An option that takes a value keeps the text typed, as lm-eval's parser gets it:
    # `--cache_requests false` is lm-eval's error, `--apply_chat_template false` a template's name.
    if kind == "flag" and text.lower() in ("true", "false"):
        return text.lower() == "true"
    if kind == "flag":
        raise CliError(f"--{name} is a flag: give it bare, or as --{name}=true/false")
    return text


def parse_submit(
    tokens: list[str], properties: dict[str, dict[str, Any]]
) -> tuple[str | None, dict[str, Any], dict[str, Any]]:
    """`[FILE] --name value ... --flag` -> (file, request fields, client options).

    Parsed here rather than by argparse: the option set is the server's, read from its schema,
    and argparse would take a value like `dummy` in `--model dummy` for the FILE positional.
    """
    kinds = {name: option_kind(prop) for name, prop in properties.items()}
    file: str | None = None
    body: dict[str, Any] = {}
    client: dict[str, Any] = {}
    env: dict[str, Any] = {}
    i = 0
    if tokens and (not tokens[0].startswith("-") or tokens[0] == "-"):
        file, i = tokens[0], 1
    while i < len(tokens):
        token = tokens[i]
        i += 1
        if not token.startswith("--") or token == "--":
            raise CliError(f"unexpected argument {token!r}: options look like --name value")
        raw, has_value, value = token[2:].partition("=")
        name = raw.replace("-", "_")

        def take_value(name: str = name, has_value: bool = has_value, value: str = value) -> str:
            nonlocal i
            if has_value:
                return value
            if i >= len(tokens):
                raise CliError(f"--{name} needs a value")
            i += 1
            return tokens[i - 1]

        if name in SUBMIT_CLIENT_FLAGS:
            client[name] = True
        elif name in SUBMIT_CLIENT_VALUES:
            text = take_value()
            if name == "env":
                key, eq, val = text.partition("=")
                if not eq or not key:
                    raise CliError(f"--env wants KEY=VALUE, got {text!r}")
                env[key] = val
            elif name == "secret":
                key, eq, val = text.partition("=")
                if not eq or not key or not val:
                    raise CliError(f"--secret wants KEY=SECRET, got {text!r}")
                env[key] = {"secret": val}
            else:
                client[name] = text
        elif name in kinds:
            kind = kinds[name]
            next_is_value = i < len(tokens) and not tokens[i].startswith("--")
            optional = kind == "flag_or_value" and not next_is_value
            if not has_value and (kind == "flag" or optional):
                body[name] = True
            else:
                body[name] = convert(name, kind, take_value())
        else:
            hint = difflib.get_close_matches(name, list(kinds) + list(SUBMIT_CLIENT_VALUES), n=3)
            suggestion = f" (did you mean {', '.join('--' + h for h in hint)}?)" if hint else ""
            raise CliError(f"unknown option --{raw}{suggestion}")
    if env:
        body["env_vars"] = {**body.get("env_vars", {}), **env}
    return file, body, client


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def strict_json(text: str) -> Any:
    """JSON as the server reads it: NaN and Infinity, which Python's json accepts, are not
    numbers there (and could not even be sent)."""
    return json.loads(text, parse_constant=_no_constant)


def read_request_file(file: str) -> dict[str, Any]:
    try:
        text = sys.stdin.read() if file == "-" else Path(file).read_text()
    except OSError as exc:
        raise CliError(f"cannot read {file}: {exc.strerror}") from exc
    try:
        data = strict_json(text)
    except ValueError as exc:
        raise CliError(f"{file} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise CliError(f"{file} must hold a JSON object of lm-eval options")
    return data


def submit_help(client: Client | None) -> str:
    lines = [
        "usage: lm-eval-server submit [FILE.json | -] [--OPTION VALUE | --FLAG] ...",
        "",
        "Queue a job. FILE.json holds the request body (as for POST /job); options given",
        "after it override its fields. Any lm-eval option is accepted by its name",
        "(--num_fewshot 5, --model_args pretrained=gpt2,dtype=float32); flags are bare",
        "(--log_samples). Prints the job id on stdout.",
        "",
        "client options:",
        *(f"  --{n:<18} {h}" for n, h in SUBMIT_CLIENT_FLAGS.items()),
        *(f"  --{n + ' V':<18} {h}" for n, h in SUBMIT_CLIENT_VALUES.items()),
    ]
    if client is not None:
        try:
            properties = request_properties(client)
        except CliError:
            pass
        else:
            lines += ["", f"options accepted by {client.url}:"]
            for name, prop in properties.items():
                kind = option_kind(prop)
                shown = f"--{name}" if kind == "flag" else f"--{name} V"
                help_text = str(prop.get("description", "")).split(": ", 1)[-1]
                lines.append(f"  {shown:<30} {help_text[:90]}")
    return "\n".join(lines)


def request_properties(client: Client) -> dict[str, dict[str, Any]]:
    spec = client.get("/openapi.json")
    try:
        return spec["components"]["schemas"]["JobRequest"]["properties"]  # type: ignore[no-any-return]
    except (KeyError, TypeError) as exc:
        raise CliError(f"{client.url}/openapi.json has no JobRequest schema") from exc


# ------------------------------------------------------------------ commands


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from lm_eval_server.app import create_app
    from lm_eval_server.config import load_settings

    # The app warns when it listens beyond loopback without API_KEYS, and allows this host.
    app = create_app(load_settings(host_hint=args.host))
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
    )
    return EXIT_OK


def cmd_submit(client: Client, tokens: list[str]) -> int:
    if any(t in ("-h", "--help") for t in tokens):
        print(submit_help(client))
        return EXIT_OK
    file, options, extra = parse_submit(tokens, request_properties(client))
    body = read_request_file(file) if file else {}
    if "env_vars" in options and isinstance(body.get("env_vars"), dict):
        options["env_vars"] = {**body["env_vars"], **options["env_vars"]}
    body.update(options)
    if not body:
        raise CliError("nothing to submit: give FILE.json or options such as --model and --tasks")
    if "gate_file" not in extra:
        return _submit(client, body, extra)
    try:
        body["gate"] = read_gate_file(extra["gate_file"])
        return _submit(client, body, extra, gated=True)
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return GATE_ERROR


def _submit(
    client: Client, body: dict[str, Any], extra: dict[str, Any], gated: bool = False
) -> int:
    data = client.request("POST", "/job", json=body)
    print(data["message"], file=sys.stderr)
    print(data["job_id"])
    if not extra.get("wait"):
        return EXIT_OK
    timeout = extra.get("wait_timeout")
    job_id = int(data["job_id"])
    code = wait_for(client, job_id, float(timeout) if timeout else None, 2.0, False)
    if not gated:
        return code
    if code != EXIT_OK:
        return GATE_ERROR  # no verdict: the job did not complete
    return verdict_exit(client.get(f"/job/{job_id}").get("verdict"))


def cmd_jobs(client: Client, args: argparse.Namespace) -> int:
    params: dict[str, Any] = {"offset": args.offset}
    if args.status:
        params["status"] = args.status
    if args.limit is not None:
        params["limit"] = args.limit
    if args.owner:
        params["owner"] = args.owner
    data = client.get("/jobs", params=params)
    if args.json:
        print_json(data)
        return EXIT_OK
    rows = [
        [
            job["job_id"],
            job["status"],
            fmt_progress(job),
            job.get("model") or "-",
            ",".join(job.get("tasks") or []) or "-",
            fmt_time(job.get("started_at")),
            fmt_duration(job.get("duration_s")),
            job.get("owner") or "-",
        ]
        for job in data["jobs"]
    ]
    headers = ["ID", "STATUS", "PROGRESS", "MODEL", "TASKS", "STARTED", "DURATION", "OWNER"]
    print(table(headers, rows, right={0, 6}))
    shown = len(data["jobs"])
    if data["total"] != shown:
        print(f"({shown} of {data['total']} jobs shown)", file=sys.stderr)
    return EXIT_OK


def cmd_status(client: Client, args: argparse.Namespace) -> int:
    job = client.get(f"/job/{args.job_id}")
    if args.json:
        print_json(job)
        return EXIT_OK
    exit_code = f" (exit code {job['exit_code']})" if job.get("exit_code") is not None else ""
    facts = [
        ("status", f"{job['status']}{exit_code}"),
        ("owner", job.get("owner") or "-"),
        ("progress", fmt_progress(job)),
        ("model", job.get("model") or "-"),
        ("tasks", ",".join(job.get("tasks") or []) or "-"),
        ("created", fmt_time(job.get("created_at"))),
        ("started", fmt_time(job.get("started_at"))),
        ("finished", fmt_time(job.get("finished_at"))),
        ("duration", fmt_duration(job.get("duration_s"))),
        ("attempt", fmt_attempt(job)),
        ("cache", fmt_cache(job.get("cache"))),
        ("command", job["argument"]),
    ]
    print(f"Job {job['job_id']}")
    for key, value in facts:
        print(f"  {key + ':':<10} {value}")
    if job.get("error"):
        print("  error:")
        for line in str(job["error"]).splitlines():
            print(f"    {line}")
    return EXIT_OK


def fmt_attempt(job: dict[str, Any]) -> str:
    # "of N" only where the job retries by itself (a resume may go past max_attempts).
    attempt, most = job.get("attempt", 1), job.get("max_attempts", 1)
    return f"{attempt} of {most}" if most > 1 else str(attempt)


def fmt_cache(cache: dict[str, Any] | None) -> str:
    if not cache:
        return "-"
    return f"{cache['hits']} hits, {cache['misses']} misses"


def cmd_logs(client: Client, args: argparse.Namespace) -> int:
    params: dict[str, Any] = {"stream": args.stream, "follow": str(args.follow).lower()}
    if args.tail is not None:
        params["tail"] = args.tail
    if getattr(args, "attempt", None) is not None:
        params["attempt"] = args.attempt
    client.stream_text(f"/job/{args.job_id}/logs", params, sys.stdout.buffer)
    return EXIT_OK


def cmd_results(client: Client, args: argparse.Namespace) -> int:
    data = client.get(f"/job/{args.job_id}/results")
    if args.json:
        print_json(data)
        return EXIT_OK
    metrics = data["metrics"]
    if not metrics:
        print(f"Job {args.job_id} recorded no metrics ({data.get('results_file')})")
        return EXIT_OK
    rows = [
        [
            m["task"],
            m["filter"],
            m["metric"],
            fmt_value(m["value"]),
            f"± {fmt_value(m['stderr'])}" if m.get("stderr") not in (None, "N/A") else "",
        ]
        for m in metrics
    ]
    print(table(["TASK", "FILTER", "METRIC", "VALUE", "STDERR"], rows, right={3, 4}))
    return EXIT_OK


COMPARE_MEDIA = {"csv": "text/csv", "markdown": "text/markdown"}


def cmd_compare(client: Client, args: argparse.Namespace) -> int:
    params: dict[str, Any] = {"jobs": ",".join(str(i) for i in args.job_ids)}
    if args.alpha is not None:
        params["alpha"] = args.alpha
    if args.format in COMPARE_MEDIA:
        headers = {"Accept": COMPARE_MEDIA[args.format]}
        sys.stdout.write(client.get_text("/compare", params=params, headers=headers))
        return EXIT_OK
    data = client.get("/compare", params=params)
    if args.format == "json":
        print_json(data)
        return EXIT_OK
    print(compare_table(data))
    return EXIT_OK


def compare_table(data: dict[str, Any]) -> str:
    """TASK FILTER METRIC, each job's value ± stderr, and each later job's delta (* when
    significant, by the server's rule)."""
    jobs = data["jobs"]
    headers = ["TASK", "FILTER", "METRIC"]
    for i, job in enumerate(jobs):
        headers.append(f"#{job}")
        if i:
            headers += [f"Δ#{job}", f"p#{job}"]
    rows = []
    for row in data["rows"]:
        cells = [row["task"], row["filter"], row["metric"]]
        for i in range(len(jobs)):
            value, stderr = row["values"][i], row["stderrs"][i]
            text = fmt_value(value) if value is not None else "-"
            if isinstance(stderr, int | float) and value is not None:
                text += f" ± {fmt_value(float(stderr))}"
            cells.append(text)
            if i:
                delta = row["deltas"][i]
                mark = " *" if row["significant"][i] else ""
                cells.append(f"{delta:+.4f}{mark}" if delta is not None else "-")
                cells.append(fmt_test(row, i))
        rows.append(cells)
    right = set(range(3, len(headers)))
    note = (
        f"Δ: difference from job {jobs[0]}; * where p < {data.get('alpha', 0.05):g} by the "
        "row's test (McNemar/paired t on paired documents, else unpaired z)"
    )
    warnings = [f"warning: {w['message']}" for w in data.get("warnings", [])]
    return "\n".join([table(headers, rows, right=right), *warnings, note])


def fmt_test(row: dict[str, Any], i: int) -> str:
    """`6.1e-05 mcnemar 15/0` (regressed/improved), `0.031 paired_t`, `-` when untold."""
    test, p = row.get("tests", [None] * (i + 1))[i], row.get("p_values", [None] * (i + 1))[i]
    if test is None or p is None:
        return "-"
    counts = row["discordant"][i]
    extra = f" {counts['regressed']}/{counts['improved']}" if counts else ""
    return f"{p:.2g} {test}{extra}"


# `gate` and `submit --wait --gate-file` exit codes, for CI scripts.
GATE_PASSED, GATE_FAILED, GATE_ERROR = 0, 1, 2
_RULE_KINDS = ("min", "max", "max_drop", "no_significant_drop")


def parse_rule(text: str) -> dict[str, Any]:
    """`[TASK/]METRIC[,FILTER]:KIND[=VALUE]` or a JSON object -> a gate rule, e.g.
    `arc_easy/acc:min=0.6`, `acc:max_drop=0.02`, `exact_match,strict-match:no_significant_drop`
    (`no_significant_drop=0.01` sets its alpha)."""
    if text.lstrip().startswith("{"):
        try:
            rule = strict_json(text)
        except ValueError as exc:
            raise CliError(f"--rule {text!r} is not valid JSON: {exc}") from exc
        if not isinstance(rule, dict):
            raise CliError(f"--rule {text!r}: a JSON rule is an object")
        return rule
    target, colon, condition = text.rpartition(":")
    kind, eq, value = condition.partition("=")
    if not colon or not target or kind not in _RULE_KINDS:
        raise CliError(
            f"--rule {text!r}: write [TASK/]METRIC[,FILTER]:KIND[=VALUE] with KIND one of "
            f"{', '.join(_RULE_KINDS)}, e.g. arc_easy/acc:min=0.6 or acc:no_significant_drop"
        )
    task, slash, metric = target.rpartition("/")
    metric, comma, filter_name = metric.partition(",")
    rule: dict[str, Any] = {"metric": metric}
    if slash:
        rule["task"] = task
    if comma:
        rule["filter"] = filter_name
    if kind == "no_significant_drop":
        rule[kind] = True
        if eq:
            rule["alpha"] = _rule_number(text, value)
    elif not eq:
        raise CliError(f"--rule {text!r}: {kind} needs a value, e.g. {metric}:{kind}=0.5")
    else:
        rule[kind] = _rule_number(text, value)
    return rule


def _rule_number(text: str, value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise CliError(f"--rule {text!r}: {value!r} is not a number") from None
    if not math.isfinite(number):
        raise CliError(f"--rule {text!r}: {value!r} is not a finite number")
    return number


def read_gate_file(file: str) -> dict[str, Any]:
    gate = read_request_file(file)
    if not isinstance(gate.get("rules"), list):
        raise CliError(f'{file} must hold a gate: {{"baseline": ID, "rules": [...]}}')
    return gate


def verdict_exit(verdict: dict[str, Any] | None, as_json: bool = False) -> int:
    if verdict is None:
        print(
            "error: the job has no verdict (it did not complete, or has no gate)", file=sys.stderr
        )
        return GATE_ERROR
    if as_json:
        print_json(verdict)
    else:
        print(verdict_text(verdict))
    if verdict.get("error"):
        return GATE_ERROR
    return GATE_PASSED if verdict["passed"] else GATE_FAILED


def verdict_text(verdict: dict[str, Any]) -> str:
    against = f" against job {verdict['baseline']}" if verdict.get("baseline") else ""
    head = f"Gate {'PASSED' if verdict['passed'] else 'FAILED'} for job {verdict['candidate']}"
    lines = [head + against]
    if verdict.get("error"):
        lines.append(f"  error: {verdict['error']}")
    for check in verdict["rules"]:
        lines.append(f"  {'pass' if check['passed'] else 'FAIL'}  {check['reason']}")
    lines += [f"  warning: {w['message']}" for w in verdict.get("warnings", [])]
    return "\n".join(lines)


def cmd_gate(client: Client, args: argparse.Namespace) -> int:
    try:
        gate = read_gate_file(args.gate_file) if args.gate_file else {"rules": []}
        gate["rules"] = list(gate["rules"]) + [parse_rule(r) for r in args.rule or []]
        if args.baseline is not None:
            gate["baseline"] = args.baseline
        if not gate["rules"]:
            raise CliError("no rules: give --rule (repeatable) or --gate-file")
        verdict = client.request("POST", "/gate", json={**gate, "candidate": args.candidate})
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return GATE_ERROR
    return verdict_exit(verdict, args.json)


def cmd_stop(client: Client, args: argparse.Namespace) -> int:
    print(client.request("POST", f"/job/{args.job_id}/stop")["message"])
    return EXIT_OK


def cmd_resume(client: Client, args: argparse.Namespace) -> int:
    print(client.request("POST", f"/job/{args.job_id}/resume")["message"])
    return EXIT_OK


def cmd_delete(client: Client, args: argparse.Namespace) -> int:
    print(client.request("DELETE", f"/job/{args.job_id}")["message"])
    return EXIT_OK


def cmd_whoami(client: Client, args: argparse.Namespace) -> int:
    me = client.get("/me")
    if args.json:
        print_json(me)
    else:
        print(f"{me['name']}{' (admin)' if me['admin'] else ''}")
    return EXIT_OK


def cmd_wait(client: Client, args: argparse.Namespace) -> int:
    return wait_for(client, args.job_id, args.timeout, args.interval, args.quiet)


def wait_for(
    client: Client,
    job_id: int,
    timeout_s: float | None,
    interval_s: float,
    quiet: bool,
    clock: Callable[[], float] = time.monotonic,
) -> int:
    deadline = clock() + timeout_s if timeout_s is not None else None
    last = ""
    while True:
        # /jobs would need a scan; /job/{id} also carries the log tails, which is fine at ~1/s.
        job = client.get(f"/job/{job_id}")
        status = job["status"]
        line = f"Job {job_id}: {status} {fmt_progress(job)}".rstrip()
        if not quiet and line != last and status not in TERMINAL:
            print(line, file=sys.stderr)
            last = line
        if status in TERMINAL:
            code = job.get("exit_code")
            exit_code = f", exit code {code}" if code is not None else ""
            duration = fmt_duration(job.get("duration_s"))
            print(f"Job {job_id} {status}{exit_code}, after {duration}")
            if status == "Failed" and job.get("error") and not quiet:
                print(job["error"], file=sys.stderr)
            return {"Completed": EXIT_OK, "Stopped": EXIT_STOPPED}.get(status, EXIT_ERROR)
        if deadline is not None and clock() >= deadline:
            print(f"Job {job_id} still {status} after {timeout_s:g}s", file=sys.stderr)
            return EXIT_TIMEOUT
        pause = interval_s if deadline is None else min(interval_s, deadline - clock())
        time.sleep(max(0.0, pause))


# ------------------------------------------------------------------ argument parsing


def build_parser() -> argparse.ArgumentParser:
    # Connection options are accepted before or after the command; SUPPRESS keeps a value given
    # before the command from being reset by the subcommand's default.
    connection = argparse.ArgumentParser(add_help=False)
    connection.add_argument("--url", default=argparse.SUPPRESS, help="server URL")
    connection.add_argument("--token", default=argparse.SUPPRESS, help="API key")

    parser = argparse.ArgumentParser(
        prog="lm-eval-server",
        description="Run the lm-eval job server, or submit and follow jobs on one.",
        epilog="Client commands use --url (env LM_EVAL_SERVER_URL, default "
        f"{DEFAULT_URL}) and --token (env LM_EVAL_SERVER_TOKEN).",
    )
    parser.add_argument(
        "--url", default=os.environ.get("LM_EVAL_SERVER_URL", DEFAULT_URL), help="server URL"
    )
    parser.add_argument(
        "--token", default=os.environ.get("LM_EVAL_SERVER_TOKEN"), help="API key (Bearer)"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the server (uvicorn)")
    serve.add_argument("--host", default="127.0.0.1", help="default: loopback only")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"]
    )

    sub.add_parser(
        "submit",
        parents=[connection],
        add_help=False,
        help="queue a job: FILE.json and/or --model M --tasks T ... (see submit --help)",
    )

    jobs = sub.add_parser("jobs", parents=[connection], help="list jobs")
    jobs.add_argument("--status", help="comma-separated, e.g. Running,Queued")
    jobs.add_argument("--limit", type=int)
    jobs.add_argument("--offset", type=int, default=0)
    jobs.add_argument("--owner", help="only this principal's jobs (admins see every owner)")
    jobs.add_argument("--json", action="store_true", help="print the API's JSON")
    whoami = sub.add_parser("whoami", parents=[connection], help="the principal of the API key")
    whoami.add_argument("--json", action="store_true", help="print the API's JSON")

    def with_id(name: str, help_text: str) -> argparse.ArgumentParser:
        command = sub.add_parser(name, parents=[connection], help=help_text)
        command.add_argument("job_id", type=int, metavar="ID")
        return command

    with_id("status", "show one job").add_argument("--json", action="store_true")
    logs = with_id("logs", "print a job's log")
    logs.add_argument("-f", "--follow", action="store_true", help="stream until the job ends")
    logs.add_argument("--stream", choices=["stderr", "stdout"], default="stderr")
    logs.add_argument("--tail", type=int, metavar="N", help="only the last N lines")
    logs.add_argument("--attempt", type=int, metavar="N", help="an earlier attempt's log")
    with_id("results", "print a Completed job's metrics").add_argument(
        "--json", action="store_true", help="the full results JSON"
    )
    compare = sub.add_parser(
        "compare", parents=[connection], help="compare Completed jobs' metrics (first = base)"
    )
    compare.add_argument("job_ids", type=int, nargs="+", metavar="ID")
    compare.add_argument(
        "--format",
        choices=["table", "csv", "markdown", "json"],
        default="table",
        help="table (default), or the server's CSV, Markdown or JSON",
    )
    compare.add_argument("--alpha", type=float, help="significance level (default 0.05)")
    gate = sub.add_parser(
        "gate",
        parents=[connection],
        help="evaluate a regression gate for two finished jobs; exit 0 pass, 1 fail, 2 error",
    )
    gate.add_argument("--baseline", type=int, metavar="ID", help="the job to compare with")
    gate.add_argument("--candidate", type=int, metavar="ID", required=True, help="the job judged")
    gate.add_argument(
        "--rule",
        action="append",
        metavar="RULE",
        help="[TASK/]METRIC[,FILTER]:KIND[=VALUE], KIND min, max, max_drop or "
        "no_significant_drop (e.g. arc_easy/acc:min=0.6, acc:no_significant_drop), or a JSON "
        "rule; repeatable",
    )
    gate.add_argument("--gate-file", metavar="F", help="a JSON gate {baseline, rules}")
    gate.add_argument("--json", action="store_true", help="print the verdict's JSON")
    with_id("stop", "stop a job (dequeue it if queued)")
    with_id("delete", "delete a job and its files")
    with_id("resume", "run a Failed or Stopped job again (cached answers are not recomputed)")
    wait = with_id(
        "wait",
        "wait for a job to end; exit 0 Completed, 1 Failed, 3 Stopped, 4 timeout",
    )
    wait.add_argument("--timeout", type=float, metavar="S", help="give up after S seconds")
    wait.add_argument("--interval", type=float, default=2.0, metavar="S", help="poll period")
    wait.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    return parser


GLOBAL_VALUE_OPTIONS = ("--url", "--token")


def split_submit(argv: list[str]) -> tuple[list[str], list[str] | None]:
    """Cut argv after `submit`: what follows is parsed by parse_submit, not argparse."""
    i = 0
    while i < len(argv):
        token = argv[i]
        if token in GLOBAL_VALUE_OPTIONS:
            i += 2
            continue
        if token.startswith("-"):
            i += 1
            continue
        if token == "submit":
            return argv[: i + 1], argv[i + 1 :]
        return argv, None
    return argv, None


def pop_connection_options(tokens: list[str]) -> tuple[dict[str, str], list[str]]:
    """--url/--token given after `submit` (as other commands allow), and the other tokens."""
    found: dict[str, str] = {}
    rest: list[str] = []
    i = 0
    while i < len(tokens):
        name, eq, value = tokens[i].partition("=")
        i += 1
        if name not in GLOBAL_VALUE_OPTIONS:
            rest.append(tokens[i - 1])
            continue
        if not eq:
            if i >= len(tokens):
                raise CliError(f"{name} needs a value")
            value = tokens[i]
            i += 1
        found[name[2:]] = value
    return found, rest


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    head, submit_tokens = split_submit(argv)
    parser = build_parser()
    args = parser.parse_args(head)
    if args.command == "serve":
        return cmd_serve(args)
    client: Client | None = None
    try:
        if submit_tokens is not None:
            connection, rest = pop_connection_options(submit_tokens)
            client = Client(connection.get("url", args.url), connection.get("token", args.token))
            return cmd_submit(client, rest)
        client = Client(args.url, args.token)
        handler = {
            "jobs": cmd_jobs,
            "status": cmd_status,
            "logs": cmd_logs,
            "results": cmd_results,
            "compare": cmd_compare,
            "stop": cmd_stop,
            "delete": cmd_delete,
            "resume": cmd_resume,
            "wait": cmd_wait,
            "whoami": cmd_whoami,
            "gate": cmd_gate,
        }[args.command]
        return handler(client, args)
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
    finally:
        if client is not None:
            client.http.close()


if __name__ == "__main__":
    sys.exit(main())
