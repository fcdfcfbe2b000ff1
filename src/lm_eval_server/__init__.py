"""lm-eval-server: a REST job server for lm-evaluation-harness."""
