"""SIGTERM and SIGHUP handled like Ctrl-C: the run unwinds, temp files are removed, workers are
stopped.

Python's default SIGTERM (and SIGHUP) action kills the process at once: no ``finally`` runs, so
atomic temp files, ``.partial`` cohort folders and a local Ray instance are left behind.
``handle_sigterm`` turns SIGTERM into ``Terminated``, a ``KeyboardInterrupt``, so every cleanup
path written for Ctrl-C runs for it too; the CLI then exits with 143 (128 + 15, the shell's code
for SIGTERM) instead of 130 (128 + 2, SIGINT). SIGHUP (the terminal or SSH session was closed)
becomes ``HungUp``, a ``Terminated``, exit 129 (128 + 1); where SIGHUP is ignored (``nohup``) it
stays ignored, and where it does not exist (Windows) nothing is done.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

EXIT_SIGINT = 130
EXIT_SIGTERM = 143
EXIT_SIGHUP = 129

# None where the platform has no SIGHUP (Windows).
_SIGHUP: signal.Signals | None = getattr(signal, "SIGHUP", None)


class Terminated(KeyboardInterrupt):
    """The process received SIGTERM. A KeyboardInterrupt, so Ctrl-C cleanup code handles it."""

    exit_code = EXIT_SIGTERM


class HungUp(Terminated):
    """The process received SIGHUP (its terminal was closed). Unwinds like SIGTERM."""

    exit_code = EXIT_SIGHUP


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    # Ignore further SIGTERMs (and SIGHUPs) while unwinding (a supervisor often sends several).
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if _SIGHUP is not None and _hup_handled:
        signal.signal(_SIGHUP, signal.SIG_IGN)
    if _SIGHUP is not None and signum == _SIGHUP:
        raise HungUp(f"hung up (signal {signum})")
    raise Terminated(f"terminated by signal {signum}")


def _hup_ignored() -> bool:
    """True where SIGHUP is absent or ignored (``nohup``): then it is left alone."""
    if _SIGHUP is None:
        return True
    try:
        return signal.getsignal(_SIGHUP) is signal.SIG_IGN
    except (ValueError, OSError):  # pragma: no cover - not a signal on this platform
        return True


_hup_handled = False  # whether the outermost handle_sigterm block took over SIGHUP


@contextlib.contextmanager
def handle_sigterm() -> Iterator[None]:
    """Within the block, SIGTERM raises ``Terminated`` and SIGHUP ``HungUp`` in the main thread.

    SIGHUP is taken over only where it exists and is not ignored: under ``nohup`` (SIG_IGN) the
    run goes on after the terminal closes, as the user asked. Outside the main thread (signals
    cannot be set there) this does nothing.
    """
    global _hup_handled
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    hup = None if _hup_ignored() else _SIGHUP
    previous_hup = signal.signal(hup, _raise_terminated) if hup is not None else None
    outer_hup = _hup_handled
    _hup_handled = _hup_handled or hup is not None
    try:
        yield
    finally:
        _hup_handled = outer_hup
        signal.signal(signal.SIGTERM, previous)
        if hup is not None:
            signal.signal(hup, previous_hup)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP (unless ignored) wait until the block ends (main thread).

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

    signals = [signal.SIGINT, signal.SIGTERM]
    if _SIGHUP is not None and not _hup_ignored():
        signals.append(_SIGHUP)  # an ignored SIGHUP (nohup) stays ignored
    previous = {sig: signal.signal(sig, hold) for sig in signals}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for signum in dict.fromkeys(held):
            signal.raise_signal(signum)


def interrupt_exit_code(exc: BaseException) -> int:
    """129 for SIGHUP, 143 for SIGTERM, 130 for Ctrl-C."""
    if isinstance(exc, Terminated):
        return int(getattr(exc, "exit_code", EXIT_SIGTERM))
    return EXIT_SIGINT


__all__ = [
    "EXIT_SIGHUP",
    "EXIT_SIGINT",
    "EXIT_SIGTERM",
    "HungUp",
    "Terminated",
    "deferred",
    "handle_sigterm",
    "interrupt_exit_code",
]
