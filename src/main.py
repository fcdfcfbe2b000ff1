"""The README's launch line, `uvicorn src.main:app`, serves this app."""

from lm_eval_server.app import create_app

app = create_app()
