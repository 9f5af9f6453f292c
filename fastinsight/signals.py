"""SIGTERM handled like Ctrl-C: the run unwinds, temp files are removed, workers are stopped.

Python's default SIGTERM action kills the process at once: no ``finally`` runs, so atomic temp
files, ``.partial`` cohort folders and a local Ray instance are left behind. ``handle_sigterm``
turns SIGTERM into ``Terminated``, a ``KeyboardInterrupt``, so every cleanup path written for
Ctrl-C runs for it too; the CLI then exits with 143 (128 + 15, the shell's code for SIGTERM)
instead of 130 (128 + 2, SIGINT).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

EXIT_SIGINT = 130
EXIT_SIGTERM = 143


class Terminated(KeyboardInterrupt):
    """The process received SIGTERM. A KeyboardInterrupt, so Ctrl-C cleanup code handles it."""

    exit_code = EXIT_SIGTERM


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    # Ignore further SIGTERMs while unwinding (a supervisor often sends several).
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated(f"terminated by signal {signum}")


_active = 0  # depth of handle_sigterm blocks in the main thread


@contextlib.contextmanager
def handle_sigterm() -> Iterator[None]:
    """Within the block, SIGTERM raises ``Terminated`` in the main thread.

    Outside the main thread (signals cannot be set there) this does nothing.
    """
    global _active
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    _active += 1
    try:
        yield
    finally:
        _active -= 1
        signal.signal(signal.SIGTERM, previous)


def rearm_sigterm() -> None:
    """Put fastinsight's SIGTERM handler back after a library replaced it.

    ``ray.init`` installs ``sys.exit(15)`` as the driver's SIGTERM handler: the process would
    exit with 15 and no message. Call this right after such a library call; it does nothing
    outside ``handle_sigterm`` or the main thread.
    """
    if _active and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_terminated)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """SIGINT and SIGTERM wait until the block ends (main thread).

    For the few statements between creating a file and the code that removes it on failure: a
    signal handled in between (Python runs handlers between any two bytecodes) would leave the
    file behind. Within the block both signals are only recorded; at its end the previous
    handlers are restored and each recorded signal is raised again, so it is delayed by
    microseconds, never lost. (Blocking the signal with ``pthread_sigmask`` would not do: the
    kernel hands a process-wide signal to any thread that does not block it, and Python then
    runs the handler in the main thread all the same.) Elsewhere a no-op: handlers are the main
    thread's.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []

    def hold(signum: int, frame: FrameType | None) -> None:
        held.append(signum)

    previous = {sig: signal.signal(sig, hold) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for signum in dict.fromkeys(held):
            signal.raise_signal(signum)


def interrupt_exit_code(exc: BaseException) -> int:
    """143 for SIGTERM, 130 for Ctrl-C."""
    return EXIT_SIGTERM if isinstance(exc, Terminated) else EXIT_SIGINT


__all__ = [
    "EXIT_SIGINT",
    "EXIT_SIGTERM",
    "Terminated",
    "deferred",
    "handle_sigterm",
    "interrupt_exit_code",
    "rearm_sigterm",
]
