"""Requests and the argv a person would type for them, judged by lm-eval itself.

Each case: a JSON request body (server fields included), `argv` as a person would type the same
evaluation at a shell (after the shell's own splitting; None when no argv says what the request
says), and what must happen:

- accept: the server queues it; lm-eval's parser gives the same namespace for the server's argv
  and the person's; EvaluatorConfig.from_cli accepts both, and lm_eval_checks agrees value for
  value.
- lm_eval_refuses: lm-eval's parser takes the person's argv but EvaluatorConfig.from_cli refuses
  it; the server answers 422 with lm-eval's message.
- parser_refuses: lm-eval's parser refuses the person's argv; the server answers 422.
- refused_later: lm-eval accepts the options but the run fails once the model loads (or a task
  is looked up); the server answers 422 up front (`match` is in the detail).
- policy: lm-eval would run it; the server's security rules refuse it (`match` in the detail).
- unexpressible: no argv means what the request means; the server answers 422 (`match`).

Placeholders: {EX} examples/tasks, {TD} tests/data/tasks, {TMP} an allowed scratch dir,
{OUT} a dir outside ALLOWED_PATHS, {DATA} the server's DATA_DIR. `files` are written first.
"""

from __future__ import annotations

from typing import Any

BASE: dict[str, Any] = {"model": "dummy", "tasks": "demo_mc", "include_path": "{EX}"}
BASE_ARGV = ["--model", "dummy", "--tasks", "demo_mc", "--include_path", "{EX}"]

OK_CONFIG = "model: dummy\ntasks: demo_mc\ninclude_path: {EX}\nlimit: 4\n"


def case(
    name: str,
    request: dict[str, Any],
    argv: list[str] | None,
    expect: str = "accept",
    match: str | None = None,
    files: dict[str, str] | None = None,
    base: bool = True,
) -> dict[str, Any]:
    body = {**BASE, **request} if base else request
    full_argv = None if argv is None else ([*BASE_ARGV, *argv] if base else argv)
    return {
        "name": name,
        "request": body,
        "argv": full_argv,
        "expect": expect,
        "match": match,
        "files": files or {},
    }


def _tasks(name: str, tasks: Any, argv: list[str], **kw: Any) -> dict[str, Any]:
    return case(
        name,
        {"model": "dummy", "tasks": tasks, "include_path": "{EX}"},
        ["--model", "dummy", "--tasks", *argv, "--include_path", "{EX}"],
        base=False,
        **kw,
    )


CORPUS: list[dict[str, Any]] = [
    case("minimal", {}, []),
    # tasks: a string splits as a shell would, then on commas (lm-eval's SplitArgs)
    _tasks("tasks space separated", "arc_easy hellaswag", ["arc_easy", "hellaswag"]),
    _tasks("tasks comma separated", "arc_easy,hellaswag", ["arc_easy,hellaswag"]),
    _tasks("tasks list", ["arc_easy", "hellaswag"], ["arc_easy", "hellaswag"]),
    _tasks("tasks quoted words", "'arc_easy' \"hellaswag\"", ["arc_easy", "hellaswag"]),
    _tasks("tasks comma and space", "arc_easy,hellaswag mmlu", ["arc_easy,hellaswag", "mmlu"]),
    _tasks("tasks list item with comma", ["arc_easy,hellaswag"], ["arc_easy,hellaswag"]),
    _tasks("tasks yaml file", "{EX}/demo_mc.yaml", ["{EX}/demo_mc.yaml"]),
    _tasks("tasks directory", "{EX}", ["{EX}"]),
    _tasks("tasks glob", "{EX}/*.yaml", ["{EX}/*.yaml"]),
    _tasks("tasks glob of test tasks", "{TD}/arith_*.yaml", ["{TD}/arith_*.yaml"]),
    _tasks("tasks double-star glob", "{TD}/**.yaml", ["{TD}/**.yaml"]),
    _tasks(
        "tasks .yml is a name to lm-eval",
        "{TMP}/task.yml",
        ["{TMP}/task.yml"],
        expect="refused_later",
        match=".yaml suffix",
        files={"{TMP}/task.yml": "task: x\n"},
    ),
    _tasks(
        "tasks yaml outside",
        "{OUT}/t.yaml",
        ["{OUT}/t.yaml"],
        expect="policy",
        match="ALLOWED_PATHS",
        files={"{OUT}/t.yaml": "task: t\n"},
    ),
    _tasks("tasks dir outside", "{OUT}", ["{OUT}"], expect="policy", match="ALLOWED_PATHS"),
    _tasks(
        "tasks glob outside",
        "{OUT}/*.yaml",
        ["{OUT}/*.yaml"],
        expect="policy",
        match="ALLOWED_PATHS",
        files={"{OUT}/g.yaml": "task: g\n"},
    ),
    _tasks(
        "tasks glob reaching out by ..",
        "{TMP}/../*/g.yaml",
        ["{TMP}/../*/g.yaml"],
        expect="policy",
        match="ALLOWED_PATHS",
        files={"{OUT}/g.yaml": "task: g\n"},
    ),
    case("tasks unbalanced quote", {"tasks": "arc_easy 'x"}, None, "unexpressible", "tasks"),
    # model_args: a string is words (key=value items), a JSON object, or a list of items
    case("model_args commas", {"model_args": "a=1,b=x"}, ["--model_args", "a=1,b=x"]),
    case("model_args words", {"model_args": "a=1 b=x"}, ["--model_args", "a=1", "b=x"]),
    case(
        "model_args object",
        {"model_args": {"pretrained": "gpt2", "max_length": 128}},
        ["--model_args", '{"pretrained": "gpt2", "max_length": 128}'],
    ),
    case("model_args list", {"model_args": ["a=1", "b=x"]}, ["--model_args", "a=1", "b=x"]),
    case(
        "model_args quoted value with spaces",
        {"model_args": "a=1 note='a b c'"},
        ["--model_args", "a=1", "note='a b c'"],
    ),
    case(
        "model_args JSON text",
        {"model_args": '{"pretrained": "a b"}'},
        ["--model_args", '{"pretrained": "a b"}'],
    ),
    case(
        "model_args unquoted space",
        {"model_args": "pretrained=my model"},
        ["--model_args", "pretrained=my", "model"],
        "parser_refuses",
        "quote a value",
    ),
    case(
        "model_args smuggling an option",
        {"model_args": "a=1 -b 8"},
        None,
        "unexpressible",
        "starts with '-'",
    ),
    case("model_args bools and numbers", {"model_args": "x=true,y=3,z=0.5,w=None"}, None)
    | {"argv": [*BASE_ARGV, "--model_args", "x=true,y=3,z=0.5,w=None"]},
    # gen_kwargs / metadata / loggers
    case(
        "gen_kwargs with a list",
        {"gen_kwargs": 'temperature=0,until=["\\n\\n"]'},
        ["--gen_kwargs", 'temperature=0,until=["\\n\\n"]'],
    ),
    case(
        "gen_kwargs object",
        {"gen_kwargs": {"temperature": 0, "until": ["a b"]}},
        ["--gen_kwargs", '{"temperature": 0, "until": ["a b"]}'],
    ),
    case(
        "gen_kwargs words",
        {"gen_kwargs": "temperature=0 top_p=0.9"},
        ["--gen_kwargs", "temperature=0", "top_p=0.9"],
    ),
    case(
        "metadata object",
        {"metadata": {"max_seq_lengths": [4096]}},
        ["--metadata", '{"max_seq_lengths": [4096]}'],
    ),
    case("metadata string", {"metadata": "tokenizer=gpt2"}, ["--metadata", "tokenizer=gpt2"]),
    # lm-eval's loggers import their package when the job starts (admission/run_checks.py);
    # neither wandb nor trackio is in this project's environment.
    case(
        "wandb_args without wandb",
        {"wandb_args": "project=x"},
        ["--wandb_args", "project=x"],
        "refused_later",
        'lm-eval[wandb]"',
    ),
    case(
        "trackio_args without trackio",
        {"trackio_args": {"project": "x"}},
        ["--trackio_args", '{"project": "x"}'],
        "refused_later",
        'lm-eval[trackio]"',
    ),
    case(
        "hf_hub_log_args",
        {"hf_hub_log_args": {"push_results_to_hub": False}},
        ["--hf_hub_log_args", '{"push_results_to_hub": false}'],
    ),
    case(
        "hf_hub_log_args unknown key",
        {"hf_hub_log_args": "push_results=True"},
        ["--hf_hub_log_args", "push_results=True"],
        "refused_later",
        "unexpected keyword argument 'push_results'",
    ),
    case(
        "hf_hub_log_args unknown key in a config file",
        {"config": "{TMP}/hub.yaml"},
        ["--config", "{TMP}/hub.yaml"],
        "refused_later",
        "unexpected keyword argument 'repo'",
        files={"{TMP}/hub.yaml": OK_CONFIG + "hf_hub_log_args:\n  repo: x\n"},
        base=False,
    ),
    # optional-value options: true, false, a value
    case(
        "chat template with multiturn false",
        {"apply_chat_template": True, "fewshot_as_multiturn": False},
        ["--apply_chat_template", "--fewshot_as_multiturn", "false"],
    ),
    case("chat template", {"apply_chat_template": True}, ["--apply_chat_template"]),
    case(
        "chat template name", {"apply_chat_template": "chatml"}, ["--apply_chat_template", "chatml"]
    ),
    case("chat template false", {"apply_chat_template": False}, []),
    case(
        "chat template and multiturn",
        {"apply_chat_template": True, "fewshot_as_multiturn": True},
        ["--apply_chat_template", "--fewshot_as_multiturn"],
    ),
    case(
        "multiturn without template",
        {"fewshot_as_multiturn": True},
        ["--fewshot_as_multiturn"],
        "lm_eval_refuses",
    ),
    case(
        "multiturn 'true' without template",
        {"fewshot_as_multiturn": "true"},
        ["--fewshot_as_multiturn", "true"],
        "lm_eval_refuses",
    ),
    case(
        "multiturn false alone",
        {"fewshot_as_multiturn": False},
        ["--fewshot_as_multiturn", "false"],
    ),
    case("cache_requests true", {"cache_requests": True}, ["--cache_requests"]),
    case("cache_requests refresh", {"cache_requests": "refresh"}, ["--cache_requests", "refresh"]),
    case("cache_requests false", {"cache_requests": False}, []),
    case(
        "cache_requests bad",
        {"cache_requests": "sometimes"},
        ["--cache_requests", "sometimes"],
        "parser_refuses",
    ),
    # batch_size: type=str takes JSON numbers too
    case("batch_size int", {"batch_size": 8}, ["--batch_size", "8"]),
    case("batch_size 8.0", {"batch_size": 8.0}, ["--batch_size", "8"]),
    case("batch_size auto", {"batch_size": "auto"}, ["--batch_size", "auto"]),
    case("batch_size auto:4", {"batch_size": "auto:4"}, ["--batch_size", "auto:4"]),
    case(
        "batch_size banana",
        {"batch_size": "banana"},
        ["--batch_size", "banana"],
        "refused_later",
        "batch_size",
    ),
    # seed: a custom type function
    case("seed int", {"seed": 42}, ["--seed", "42"]),
    case("seed list", {"seed": [0, 1, 2, 3]}, ["--seed", "0,1,2,3"]),
    case("seed string with None", {"seed": "0,None,8,52"}, ["--seed", "0,None,8,52"]),
    case("seed list with null", {"seed": [0, None, 8, 52]}, ["--seed", "0,None,8,52"]),
    case("seed three values", {"seed": [1, 2, 3]}, ["--seed", "1,2,3"]),
    case("seed two values", {"seed": [1, 2]}, ["--seed", "1,2"], "parser_refuses"),
    case("seed words", {"seed": "a,b"}, ["--seed", "a,b"], "parser_refuses"),
    # samples: JSON object, JSON text, or a JSON file
    case(
        "samples object",
        {"samples": {"demo_mc": [0, 1]}},
        ["--samples", '{"demo_mc": [0, 1]}'],
    ),
    case(
        "samples JSON text",
        {"samples": '{"demo_mc": [2]}'},
        ["--samples", '{"demo_mc": [2]}'],
    ),
    case(
        "samples with limit",
        {"samples": {"demo_mc": [0]}, "limit": 2},
        ["--limit", "2", "--samples", '{"demo_mc": [0]}'],
        "lm_eval_refuses",
    ),
    case(
        "samples file",
        {"samples": "{TMP}/samples.json"},
        ["--samples", "{TMP}/samples.json"],
        files={"{TMP}/samples.json": '{"demo_mc": [1]}'},
    ),
    case(
        "samples file outside",
        {"samples": "{OUT}/samples.json"},
        ["--samples", "{OUT}/samples.json"],
        "policy",
        "ALLOWED_PATHS",
        files={"{OUT}/samples.json": '{"demo_mc": [1]}'},
    ),
    case(
        "samples broken JSON",
        {"samples": '{"demo_mc": [0'},
        ["--samples", '{"demo_mc": [0'],
        "parser_refuses",
    ),
    # numbers
    case("limit int", {"limit": 8}, ["--limit", "8"]),
    case("limit fraction", {"limit": 0.5}, ["--limit", "0.5"]),
    case("limit zero", {"limit": 0}, ["--limit", "0"], "refused_later", "did not find any docs"),
    case("limit zero fraction", {"limit": 0.0}, ["--limit", "0.0"], "refused_later", "no doc"),
    case("limit negative", {"limit": -2}, ["--limit=-2"], "refused_later", "islice"),
    case("limit tiny fraction", {"limit": 0.01}, ["--limit", "0.01"]),
    case("num_fewshot zero", {"num_fewshot": 0}, ["--num_fewshot", "0"]),
    case("num_fewshot string", {"num_fewshot": "3"}, ["--num_fewshot", "3"]),
    case("num_fewshot fraction", {"num_fewshot": 1.5}, ["--num_fewshot", "1.5"], "parser_refuses"),
    case("max_batch_size", {"max_batch_size": 16}, ["--max_batch_size", "16"]),
    # verbosity (deprecated, str.upper)
    case("verbosity DEBUG", {"verbosity": "DEBUG"}, ["--verbosity", "DEBUG"]),
    case("verbosity lower case", {"verbosity": "debug"}, ["--verbosity", "debug"]),
    case("verbosity LOUD", {"verbosity": "LOUD"}, ["--verbosity", "LOUD"], "refused_later", "LOUD"),
    # flags
    case(
        "log_samples with output_path",
        {"log_samples": True, "output_path": "{TMP}/out"},
        ["--output_path", "{TMP}/out", "--log_samples"],
    ),
    case("log_samples alone", {"log_samples": True}, ["--log_samples"]),
    case("predict_only", {"predict_only": True}, ["--predict_only"]),
    case(
        "write_out show_config",
        {"write_out": True, "show_config": True},
        ["--write_out", "--show_config"],
    ),
    # lm-eval's check_integrity looks for its tests/ beside an lm-eval source checkout.
    case(
        "check_integrity in an installed lm-eval",
        {"check_integrity": True},
        ["--check_integrity"],
        "refused_later",
        "Unable to find package root",
    ),
    # JSON booleans where an option takes text: rendered as a person types them (true,
    # false) and judged by lm-eval's parser, never turned into 1 and 0 first.
    case("num_fewshot true", {"num_fewshot": True}, ["--num_fewshot", "true"], "parser_refuses"),
    case("num_fewshot false", {"num_fewshot": False}, ["--num_fewshot", "false"], "parser_refuses"),
    case("limit true", {"limit": True}, ["--limit", "true"], "parser_refuses", "invalid float"),
    case("seed true", {"seed": True}, ["--seed", "true"], "parser_refuses"),
    case("seed list with false", {"seed": [1, False]}, ["--seed", "1,false"], "parser_refuses"),
    case(
        "max_batch_size true",
        {"max_batch_size": True},
        ["--max_batch_size", "true"],
        "parser_refuses",
    ),
    case(
        "batch_size true",
        {"batch_size": True},
        ["--batch_size", "true"],
        "refused_later",
        "'true' is not a batch size",
    ),
    case("device true", {"device": True}, ["--device", "true"]),
    case(
        "system_instruction false", {"system_instruction": False}, ["--system_instruction", "false"]
    ),
    case(
        "model_args true",
        {"model_args": True},
        ["--model_args", "true"],
        "parser_refuses",
        "expected `key=value`",
    ),
    _tasks("tasks true", True, ["true"]),
    case(
        "verbosity false",
        {"verbosity": False},
        ["--verbosity", "false"],
        "refused_later",
        "Unknown level",
    ),
    case("chat template as a number", {"apply_chat_template": 1}, ["--apply_chat_template", "1"]),
    case("cache_requests 1", {"cache_requests": 1}, ["--cache_requests", "1"], "parser_refuses"),
    case("timeout_s true", {"timeout_s": True}, None, "unexpressible", "valid number"),
    case("log_samples false", {"log_samples": False}, []),
    case("device", {"device": "cpu"}, ["--device", "cpu"]),
    case(
        "system_instruction starting with a dash",
        {"system_instruction": "-be brief"},
        ["--system_instruction=-be brief"],
    ),
    case("use_cache inside", {"use_cache": "{TMP}/cache/x"}, ["--use_cache", "{TMP}/cache/x"]),
    case(
        "use_cache prefix at an allowed root",
        {"use_cache": "{TMP}"},
        ["--use_cache", "{TMP}"],
        "policy",
        "ALLOWED_PATHS",  # lm-eval writes {TMP}_rank0.db, beside the root
    ),
    case("model_args false remote code", {"model_args": "trust_remote_code=False"}, None)
    | {"argv": [*BASE_ARGV, "--model_args", "trust_remote_code=False"]},
    case("model_args zero remote code", {"model_args": {"trust_remote_code": 0}}, None)
    | {"argv": [*BASE_ARGV, "--model_args", '{"trust_remote_code": 0}']},
    # remote and unsafe code, judged as lm-eval parses the value
    case(
        "trust_remote_code flag",
        {"trust_remote_code": True},
        ["--trust_remote_code"],
        "policy",
        "ALLOW_REMOTE_CODE",
    ),
    case(
        "confirm_run_unsafe_code",
        {"confirm_run_unsafe_code": True},
        ["--confirm_run_unsafe_code"],
        "policy",
        "ALLOW_UNSAFE_CODE",
    ),
    *[
        case(
            f"model_args trust_remote_code {label}",
            {"model_args": value},
            ["--model_args", text],
            "policy",
            "ALLOW_REMOTE_CODE",
        )
        for label, value, text in (
            ("1 (JSON)", {"trust_remote_code": 1}, '{"trust_remote_code": 1}'),
            ("=1", "trust_remote_code=1", "trust_remote_code=1"),
            ("=yes", "trust_remote_code=yes", "trust_remote_code=yes"),
            ("=1.0", "trust_remote_code=1.0", "trust_remote_code=1.0"),
            ("'False' string", {"trust_remote_code": "False"}, '{"trust_remote_code": "False"}'),
            (
                "nested",
                {"kw": {"trust_remote_code": True}},
                '{"kw": {"trust_remote_code": true}}',
            ),
        )
    ],
    case(
        "metadata trust_remote_code",
        {"metadata": {"trust_remote_code": True}},
        ["--metadata", '{"trust_remote_code": true}'],
        "policy",
        "ALLOW_REMOTE_CODE",
    ),
    # config files: loaded as lm-eval loads them, merged CLI > YAML > defaults, then judged
    case(
        "config file",
        {"config": "{TMP}/ok.yaml"},
        ["--config", "{TMP}/ok.yaml"],
        files={"{TMP}/ok.yaml": OK_CONFIG},
        base=False,
    ),
    case(
        "config file with CLI override",
        {"config": "{TMP}/ok.yaml", "limit": 2, "apply_chat_template": True},
        ["--config", "{TMP}/ok.yaml", "--apply_chat_template", "--limit", "2"],
        files={"{TMP}/ok.yaml": OK_CONFIG},
        base=False,
    ),
    case(
        "config multiturn overridden by false",
        {"config": "{TMP}/mt.yaml", "apply_chat_template": True, "fewshot_as_multiturn": False},
        ["--config", "{TMP}/mt.yaml", "--apply_chat_template", "--fewshot_as_multiturn", "false"],
        files={"{TMP}/mt.yaml": OK_CONFIG + "fewshot_as_multiturn: true\n"},
        base=False,
    ),
    case(
        "config missing",
        {"config": "{TMP}/missing.yaml"},
        ["--config", "{TMP}/missing.yaml"],
        "lm_eval_refuses",
    ),
    case(
        "config unknown key",
        {"config": "{TMP}/unknown.yaml"},
        ["--config", "{TMP}/unknown.yaml"],
        "lm_eval_refuses",
        files={"{TMP}/unknown.yaml": OK_CONFIG + "no_such_option: 1\n"},
    ),
    case(
        "config not a mapping",
        {"config": "{TMP}/list.yaml"},
        ["--config", "{TMP}/list.yaml"],
        "lm_eval_refuses",
        files={"{TMP}/list.yaml": "- a\n- b\n"},
    ),
    case(
        "config cache_requests as text",
        {"config": "{TMP}/cr.yaml"},
        ["--config", "{TMP}/cr.yaml"],
        "refused_later",
        "cache_requests must be a mapping",
        files={"{TMP}/cr.yaml": OK_CONFIG + "cache_requests: refresh\n"},
        base=False,
    ),
    case(
        "config trust_remote_code",
        {"config": "{TMP}/trc.yaml"},
        ["--config", "{TMP}/trc.yaml"],
        "policy",
        "ALLOW_REMOTE_CODE",
        files={"{TMP}/trc.yaml": OK_CONFIG + "trust_remote_code: true\n"},
        base=False,
    ),
    case(
        "config model_args string with remote code",
        {"config": "{TMP}/trc2.yaml"},
        ["--config", "{TMP}/trc2.yaml"],
        "policy",
        "ALLOW_REMOTE_CODE",
        files={"{TMP}/trc2.yaml": OK_CONFIG + "model_args: pretrained=x,trust_remote_code=1\n"},
        base=False,
    ),
    case(
        "config include_path outside",
        {"config": "{TMP}/inc.yaml"},
        ["--config", "{TMP}/inc.yaml"],
        "policy",
        "ALLOWED_PATHS",
        files={"{TMP}/inc.yaml": "model: dummy\ntasks: demo_mc\ninclude_path: {OUT}\n"},
        base=False,
    ),
    case(
        "config use_cache outside",
        {"config": "{TMP}/uc.yaml"},
        ["--config", "{TMP}/uc.yaml"],
        "policy",
        "ALLOWED_PATHS",
        files={"{TMP}/uc.yaml": OK_CONFIG + "use_cache: {OUT}/cache\n"},
        base=False,
    ),
    case(
        "config tasks file outside",
        {"config": "{TMP}/tf.yaml"},
        ["--config", "{TMP}/tf.yaml"],
        "policy",
        "ALLOWED_PATHS",
        files={
            "{TMP}/tf.yaml": "model: dummy\ntasks: {OUT}/t.yaml\n",
            "{OUT}/t.yaml": "task: t\n",
        },
        base=False,
    ),
    case(
        "config log_samples true, request false",
        {"config": "{TMP}/ls.yaml", "log_samples": False},
        None,
        "unexpressible",
        "remove log_samples from the config file",
        files={"{TMP}/ls.yaml": OK_CONFIG + "log_samples: true\n"},
        base=False,
    ),
    # paths
    case("output_path outside", {"output_path": "{OUT}/r"}, ["--output_path", "{OUT}/r"], "policy")
    | {"match": "ALLOWED_PATHS"},
    case(
        "output_path into another job",
        {"output_path": "{DATA}/jobs/1"},
        ["--output_path", "{DATA}/jobs/1"],
        "policy",
        "another job",
    ),
    case(
        "output_path onto the job database",
        {"output_path": "{DATA}/jobs.db/x"},
        ["--output_path", "{DATA}/jobs.db/x"],
        "policy",
        "server's own files",
    ),
    case(
        "include_path outside",
        {"include_path": "{OUT}"},
        ["--include_path", "{OUT}"],
        "policy",
        "ALLOWED_PATHS",
    ),
    case(
        "model name escaping output_path",
        {"model_args": "pretrained=..", "output_path": "{TMP}/o"},
        ["--model_args", "pretrained=..", "--output_path", "{TMP}/o"],
        "policy",
        "outside output_path",
    ),
    case(
        "model name with slashes stays inside",
        {"model_args": "pretrained=../../x", "output_path": "{TMP}/o"},
        ["--model_args", "pretrained=../../x", "--output_path", "{TMP}/o"],
    ),
    case(
        "unknown model",
        {"model": "no_such_model"},
        ["--model", "no_such_model"],
        "refused_later",
        "Unknown model",
    ),
    case("lone surrogate", {"system_instruction": "\ud800"}, None, "unexpressible", "surrogate"),
    case("NaN limit", {"limit": float("nan")}, None, "unexpressible", "finite"),
    case("infinite timeout", {"timeout_s": float("inf")}, None, "unexpressible", "timeout_s"),
    case("huge timeout", {"timeout_s": 1e300}, None, "unexpressible", "timeout_s"),
]
