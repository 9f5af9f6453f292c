"""What ``ray.init`` changes in the calling process, recorded before and put back after.

``ray.init`` (measured with Ray 2.60 in a driver) changes process-wide state that
``ray.shutdown`` leaves as it is:

- SIGTERM (SIGBREAK on Windows): the caller's handler is replaced by one that calls
  ``sys.exit(15)``; SIGINT and SIGHUP are left alone;
- ``os.environ``: ``PYTHONBREAKPOINT=ray.util.rpdb._driver_set_trace`` (``breakpoint()`` no
  longer opens pdb) and, for a new local instance, ``RAY_AUTH_MODE=token``; fastinsight itself
  sets ``RAY_USAGE_STATS_ENABLED=0`` for the session;
- :mod:`faulthandler` is enabled when it was not;
- the ``ray`` logger gets the level and format asked for (``configure_logging``).

:class:`RayProcessState` records all of these before ``ray.init``. ``reclaim_signals`` puts
the caller's signal handlers back as soon as ``ray.init`` returns (the CLI's ``handle_sigterm``
handler, so SIGTERM unwinds into exit 143; a library caller's own handler, or SIG_IGN), except
where the caller had none (SIG_DFL): there Ray's exit handler stays for the session, so a SIGTERM
still unwinds through the ``finally`` that shuts Ray down and removes its temp folder.
``restore`` puts everything back after ``ray.shutdown``. It undoes Ray's changes only: a handler
that is no longer Ray's (set while unwinding, e.g. SIG_IGN against a second SIGTERM) is left for
its owner to restore.

What this does not undo (Ray's own, not state that can be put back): the native threads and file
descriptors of Ray's core worker and gRPC that outlive ``ray.shutdown`` (about ten of each after
the first session, one more thread and one more socket per session after that); what importing
Ray does once (``RAY_CLIENT_MODE=0``, the ``ray`` logger's handler, an ``aiohttp`` warnings
filter); the draws Ray takes from the global :mod:`random` stream; and the token file
``~/.ray/auth_token`` that a new local instance creates when there is none.
"""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

# The variables ray.init is known to set, besides any RAY_* (a newer Ray may set more).
_ENV_KEYS = frozenset({"PYTHONBREAKPOINT", "RAY_AUTH_MODE", "RAY_USAGE_STATS_ENABLED"})
_SIGNAL_NAMES = ("SIGTERM", "SIGINT", "SIGHUP", "SIGBREAK")  # those the platform has


def _watched_signals() -> list[signal.Signals]:
    return [getattr(signal, n) for n in _SIGNAL_NAMES if hasattr(signal, n)]


def _watched_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k in _ENV_KEYS or k.startswith("RAY_")}


def _is_rays(handler: Any) -> bool:
    """A handler Ray installed (``ray._private.worker``'s ``sigterm_handler``)."""
    module = getattr(handler, "__module__", None) or ""
    return callable(handler) and module.split(".")[0] == "ray"


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@dataclass
class RayProcessState:
    """The process state ``ray.init`` changes, as it was before (see the module docstring)."""

    handlers: dict[signal.Signals, Any] = field(default_factory=dict)
    environ: dict[str, str] = field(default_factory=dict)
    faulthandler_enabled: bool = False
    ray_logger_level: int = logging.NOTSET
    ray_formatters: list[tuple[logging.Handler, logging.Formatter | None]] = field(
        default_factory=list
    )

    @classmethod
    def capture(cls) -> RayProcessState:
        ray_logger = logging.getLogger("ray")
        return cls(
            handlers={sig: signal.getsignal(sig) for sig in _watched_signals()},
            environ=_watched_env(),
            faulthandler_enabled=faulthandler.is_enabled(),
            ray_logger_level=ray_logger.level,
            ray_formatters=[(h, h.formatter) for h in ray_logger.handlers],
        )

    def _put_back(self, keep: Callable[[Any], bool]) -> None:
        """Each signal whose handler is now Ray's gets the caller's back, unless ``keep``."""
        if not _in_main_thread():  # Ray sets no handler there, and none can be set
            return
        for sig, before in self.handlers.items():
            now = signal.getsignal(sig)
            if now is before or before is None or not _is_rays(now) or keep(before):
                continue
            signal.signal(sig, before)

    def reclaim_signals(self) -> None:
        """Right after ``ray.init``: the caller's handlers back, except a default one (SIG_DFL),
        for which Ray's ``sys.exit`` handler stays so that SIGTERM still unwinds the run."""
        self._put_back(keep=lambda before: before is signal.SIG_DFL)

    def restore(self) -> None:
        """After ``ray.shutdown``: everything recorded, as it was."""
        self._put_back(keep=lambda before: False)
        now = _watched_env()
        for key in now.keys() | self.environ.keys():
            if key not in self.environ:
                os.environ.pop(key, None)
            elif now.get(key) != self.environ[key]:
                os.environ[key] = self.environ[key]
        if not self.faulthandler_enabled and faulthandler.is_enabled():
            faulthandler.disable()
        ray_logger = logging.getLogger("ray")
        ray_logger.setLevel(self.ray_logger_level)
        for handler, formatter in self.ray_formatters:
            if handler in ray_logger.handlers:
                handler.setFormatter(formatter)


@contextlib.contextmanager
def ray_process_state_kept() -> Iterator[RayProcessState]:
    """Records the state before the block and restores it at its end, however it ends."""
    state = RayProcessState.capture()
    try:
        yield state
    finally:
        state.restore()


__all__ = ["RayProcessState", "ray_process_state_kept"]
