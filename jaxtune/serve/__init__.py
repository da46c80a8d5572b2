"""``jaxtune serve``: OpenAI's fine-tuning API on your own machine.

Files, fine-tuning jobs (with events, checkpoints, cancel, pause and resume), models and chat
completions, over the same recipes, run directories and generation as the ``jaxtune`` command:
each job is a ``jaxtune train`` process (:mod:`~jaxtune.serve.runner`), its recipe an OpenAI
request mapped onto a config (:mod:`~jaxtune.serve.jobs`), its state a row in SQLite
(:mod:`~jaxtune.serve.store`), the HTTP layer a Starlette app (:mod:`~jaxtune.serve.app`)::

    jaxtune serve keys create alice --data-dir serve-data     # prints the key once
    jaxtune serve --data-dir serve-data --model tiny=path/to/hf-dir

    client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key=KEY)

Needs the ``serve`` extra (``pip install 'jaxtune[serve]'``): starlette, uvicorn, python-multipart.
"""

from __future__ import annotations

from typing import Any

KEEP_ALIVE_S = 75  # seconds an idle HTTP connection stays open (nginx's default)


def run(settings: Any, *, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve until interrupted (Ctrl-C stops running jobs with a checkpoint; the next start resumes them)."""
    import uvicorn

    from jaxtune.serve.app import create_app

    # An idle connection is kept longer than clients keep theirs (the openai SDKs' httpx pools: 5 s), so
    # a client never sends a request on a connection the server is closing at that moment. uvicorn's
    # default is 5 s as well: such a request fails with a connection error (the likely cause of one
    # failed request in 70 in the load test of tests/test_serve.py, once).
    uvicorn.run(create_app(settings), host=host, port=port, log_level="warning", timeout_graceful_shutdown=60,
                timeout_keep_alive=KEEP_ALIVE_S)
