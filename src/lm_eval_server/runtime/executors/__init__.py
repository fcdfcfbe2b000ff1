"""Executors: what starts, waits for, stops and re-adopts a job's process. `base` is the protocol
the job state uses (`Executor`, `JobHandle`, `LaunchSpec`); `local` runs detached processes
under the supervisor, `ray` submits Ray Jobs, `warm_pool`/`warm_worker`/`warm_protocol` fork
jobs from pre-started interpreters. Part of `runtime`: the standard library, Ray, and runtime
only.
"""
