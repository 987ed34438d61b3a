"""A clean dashboard server log: a browser tab that closes mid-update is not an error.

When a tab closes while the server is still sending it a page update (a card finishing after
its user left, say), Tornado fails the pending websocket write with `WebSocketClosedError`
(or `StreamClosedError`). Panel writes page updates in tasks it does not always await: when
the session is torn down it cancels what is pending, but a write that has already failed
is never awaited, and asyncio prints "Task exception was never retrieved" with a traceback
once the task is collected. With several users that buries real failures in the log.

`quiet_client_disconnects(loop)` installs an asyncio exception handler that turns exactly
that case (an unretrieved task or future whose exception is a closed websocket or stream)
into one INFO line, and hands every other exception to the handler that was there before
(asyncio's default: the traceback stays). The dashboard also stops updating a session's
page once it is closed (dashboard/app.py), so the case is rare; this catches the writes
already on their way.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Mapping

LOG = logging.getLogger("keras_ham.dashboard")

#: asyncio's messages for an exception nobody awaited (Task and bare Future).
UNRETRIEVED = ("Task exception was never retrieved", "Future exception was never retrieved")


def is_client_disconnect(context: Mapping[str, Any]) -> bool:
    """True for an asyncio error context that only says a browser went away mid-write."""
    from tornado.iostream import StreamClosedError
    from tornado.websocket import WebSocketClosedError

    return (context.get("message") in UNRETRIEVED
            and isinstance(context.get("exception"), (WebSocketClosedError, StreamClosedError)))


def quiet_client_disconnects(loop: asyncio.AbstractEventLoop, logger: logging.Logger = LOG) -> None:
    """Log client disconnects during a write as one line on `loop`; everything else as before.

    Idempotent: installing it twice on a loop keeps one filter.
    """
    previous = loop.get_exception_handler()
    if getattr(previous, "quiets_client_disconnects", False):
        return

    def handler(event_loop: asyncio.AbstractEventLoop, context: dict) -> None:
        if is_client_disconnect(context):
            logger.info("a browser session closed while the server was sending it an update (%s)",
                        type(context["exception"]).__name__)
            return
        if previous is not None:
            previous(event_loop, context)
        else:
            event_loop.default_exception_handler(context)

    handler.quiets_client_disconnects = True  # type: ignore[attr-defined]
    loop.set_exception_handler(handler)
