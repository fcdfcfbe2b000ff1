"""Admission: a request becomes a `ValidatedJob` (an argv, an environment, the paths it may
touch) or a 422. lm-eval's own parser (`lm_eval_cli`) and run-time checks (`lm_eval_checks`),
the path rule (`paths`), URL rules (`urls`), installed backends (`backends`), task and model
names (`catalog`), idempotency keys and the offload of slow checks to a thread.

Pure where it can be, no side effects. May import: runtime (the job environment's allowlist,
the task index), tasks (the bounded YAML reader, the owner's uploads), team (secrets,
principals), webhooks (the callback_url rule), jobs.gpus, config, errors. Never api or the job
state (jobs.manager, jobs.store, jobs.runner, jobs.launch).
"""
