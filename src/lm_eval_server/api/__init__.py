"""HTTP: the routes (one router per resource) and the helpers only HTTP needs: the API-key,
body-limit and Host/cross-site middleware (`security`, `hosts`), Accept negotiation (`accept`),
the raw-body screen of `POST /job` (`request_body`), Prometheus metrics (`metrics`) and the
mapping from internal records to API schemas (`views`).

May import: admission, jobs (never `jobs.store`: records are the manager's), outputs, team,
tasks, webhooks, config, errors. Never `runtime`: how a job runs is the executors' business.
"""
