"""The dashboard server's log: a browser closing mid-update is one line, real errors keep their traceback."""

import asyncio
import gc
import logging

import pytest
from tornado.iostream import StreamClosedError
from tornado.websocket import WebSocketClosedError

from keras_ham.server_log import is_client_disconnect, quiet_client_disconnects


def leave_unretrieved(exception: BaseException, *, filtered: bool = True) -> None:
    """Run a task that raises `exception` and is never awaited, then let it be collected (which is
    when asyncio reports it), on a loop with or without the filter."""
    loop = asyncio.new_event_loop()
    try:
        if filtered:
            quiet_client_disconnects(loop)

        async def write():
            raise exception

        async def main():
            task = asyncio.ensure_future(write())
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            assert task.done()
            del task

        loop.run_until_complete(main())
        gc.collect()
    finally:
        loop.close()


@pytest.mark.parametrize("exception", [WebSocketClosedError(), StreamClosedError()])
def test_a_closed_browser_is_one_info_line_not_a_traceback(exception, caplog):
    caplog.set_level(logging.INFO)
    leave_unretrieved(exception)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    assert not any(r.exc_info for r in caplog.records)
    assert "closed while the server was sending it an update" in caplog.text


def test_without_the_filter_the_same_disconnect_prints_a_traceback(caplog):
    """The control: what the server log showed before (asyncio's default handler)."""
    leave_unretrieved(WebSocketClosedError(), filtered=False)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors and "Task exception was never retrieved" in errors[0].getMessage() and errors[0].exc_info


def test_any_other_unretrieved_error_still_prints_its_traceback(caplog):
    leave_unretrieved(ValueError("a real bug"))
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors and errors[0].exc_info and isinstance(errors[0].exc_info[1], ValueError)
    assert "closed while the server" not in caplog.text


def test_the_filter_chains_to_a_previous_handler_and_installs_once():
    loop = asyncio.new_event_loop()
    seen = []
    loop.set_exception_handler(lambda _loop, context: seen.append(context["message"]))
    quiet_client_disconnects(loop)
    handler = loop.get_exception_handler()
    quiet_client_disconnects(loop)
    assert loop.get_exception_handler() is handler
    handler(loop, {"message": "Task exception was never retrieved", "exception": WebSocketClosedError()})
    handler(loop, {"message": "Task exception was never retrieved", "exception": RuntimeError("x")})
    handler(loop, {"message": "something else", "exception": WebSocketClosedError()})
    assert seen == ["Task exception was never retrieved", "something else"]
    loop.close()


def test_only_unretrieved_closed_socket_errors_count_as_disconnects():
    assert is_client_disconnect({"message": "Future exception was never retrieved", "exception": StreamClosedError()})
    assert not is_client_disconnect({"message": "Exception in callback", "exception": WebSocketClosedError()})
    assert not is_client_disconnect({"message": "Task exception was never retrieved", "exception": OSError()})
    assert not is_client_disconnect({"message": "Task exception was never retrieved"})
