"""Serving acb over HTTP: an OpenAI-compatible API (``pip install acb[server]``).

``create_app(engine)`` builds the ASGI app; ``serve(engine, host, port)`` runs it under uvicorn on the current loop.
"""

from __future__ import annotations

from .app import create_app, serve

__all__ = ["create_app", "serve"]
