"""What runs in a job's process tree, or starts it: the per-job supervisor (`supervise`), the
job directory's names and records (`jobdir`), the job's environment (`job_env`), the job
sandbox (`sandbox`: bubblewrap), the launcher that runs lm-eval's CLI with the cached task
index (`launcher`, `task_index`), and the executors (`executors/`: local, Ray, warm workers).

Imports only the standard library, the programs it runs (lm-eval, Ray), and itself: nothing
else of lm_eval_server. `supervise` and `jobdir` start with `python -I -S`, where every import
delays a job, so they import built-in modules only.
"""
