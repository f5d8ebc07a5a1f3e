"""Running on uvloop without touching the global event-loop policy.

    import acb
    acb.run(main())                 # uvloop when installed, plain asyncio otherwise
    acb.run(main(), uvloop=False)   # force plain asyncio

or pass ``acb.loop_factory()`` to ``asyncio.Runner(loop_factory=...)`` yourself.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

__all__ = ["loop_factory", "run", "uvloop_available"]

T = TypeVar("T")


def uvloop_available() -> bool:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


def loop_factory(uvloop: bool | None = None) -> Callable[[], asyncio.AbstractEventLoop]:
    """A new-loop factory: uvloop's when ``uvloop`` is True, or None and uvloop is installed."""
    if uvloop is None:
        uvloop = uvloop_available()
    if uvloop:
        import uvloop as _uvloop

        return _uvloop.new_event_loop
    return asyncio.new_event_loop


def run(main: Coroutine[Any, Any, T], *, uvloop: bool | None = None, debug: bool | None = None) -> T:
    """``asyncio.run`` on uvloop when available (or as asked), leaving the global policy alone."""
    with asyncio.Runner(loop_factory=loop_factory(uvloop), debug=debug) as runner:
        return runner.run(main)
