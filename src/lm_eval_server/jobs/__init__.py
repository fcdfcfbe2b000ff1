"""The job state machine and what drives it: `manager` (the one owner of every state change),
the queue and its fair share (`scheduler`), one job's run (`runner`), the launch policy
(`launch`: command, environment, sandbox view), progress watching (`watch`), retention, GPU
slots (`gpus`), the records (`models`) and their store (`store`), reproduction receipts and
reproductions (`receipts`, `receipt_models`), and what a job left on disk as the routes read it
(`jobfiles`).

May import: admission, runtime, outputs, team, config, errors. Never api.
"""
