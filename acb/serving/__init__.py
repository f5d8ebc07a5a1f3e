"""Serving acb over HTTP: an OpenAI-compatible API (``pip install acb[server]``).

``create_app(engine)`` builds the ASGI app; ``serve(engine, host, port)`` runs it under uvicorn on the current loop;
``serve_processes(engine, n, host, port)`` runs it in ``n`` processes of its own, off the engine's loop
(:mod:`acb.serving.processes`).
"""

from __future__ import annotations

from .app import create_app, serve
from .processes import serve_processes

__all__ = ["create_app", "serve", "serve_processes"]
