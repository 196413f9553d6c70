"""``jpeft serve``: an OpenAI-compatible HTTP server for one frozen base and many LoRA adapters.

:mod:`jpeft.serve.engine` is the continuous-batching engine (JAX only); :mod:`jpeft.serve.app`
is the HTTP layer (Starlette + uvicorn), imported only when a server is built, so ``import jpeft`` does not need it.
"""

from jpeft.serve.engine import Engine, Event, Request

__all__ = ["Engine", "Event", "Request"]
