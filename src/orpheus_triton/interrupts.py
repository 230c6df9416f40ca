"""SIGTERM and SIGHUP as Ctrl-C: what a process does to end cleanly on Ctrl-C runs for them too."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM and SIGHUP (kill, `timeout`, a closed terminal) act as Ctrl-C does, so that what ends a
    stream or stops a server on Ctrl-C runs for them too (by default they end Python at once: a stream
    left running and counted in flight on the server). Under asyncio.run that is its own Ctrl-C
    handling (the main task cancelled), elsewhere KeyboardInterrupt."""
    def interrupt(signum, frame):
        on_ctrl_c = signal.getsignal(signal.SIGINT)
        if callable(on_ctrl_c) and on_ctrl_c is not signal.default_int_handler:
            on_ctrl_c(signal.SIGINT, frame)
            return
        raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = {signum: signal.signal(signum, interrupt) for signum in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
