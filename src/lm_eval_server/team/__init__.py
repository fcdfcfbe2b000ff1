"""Who is who: named keys (`principals`), the audit trail (`audit`), secrets by reference
(`job_secrets`) and the redaction of injected values in everything served (`redact`).

May import: the standard library, itself, and runtime's stdlib leaves (`job_env`'s credential
names, `jobdir`); `audit` uses SQLite. Never jobs, api, admission, tasks, outputs or webhooks.
"""
