"""Webhooks when a job ends: the pure rules (`rules`: the callback_url rule, the payload, the
signature, the retry schedule) and the sender (`sender`: persisted deliveries and their
retries, fed by the manager's on_finish).

May import: outputs (metrics for the payload), admission (URL rules), jobs.store (deliveries
live beside the jobs), runtime, team, config. Never api.
"""
