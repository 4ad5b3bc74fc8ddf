"""The OpenAI Chat Completions server behind ``code/serve.py`` (``protocol``: requests and errors;
``batcher``: shared generate calls; ``app``: the FastAPI endpoints)."""
