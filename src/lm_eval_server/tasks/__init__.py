"""Uploaded tasks: storage per owner (`uploads`), the rule over an uploaded YAML (`task_rules`,
with the bounded YAML reader `yaml_bounds`), and the check that lm-eval can load it
(`task_check`, which runs in the owner's sandbox under CPU, memory and file-size limits).

May import: runtime (job environment, sandbox), team, config, errors. Never api or jobs.
"""
