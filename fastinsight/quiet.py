"""Foreign warnings and log lines off while fastinsight reads, in the reading thread only.

pydicom warns on each lenient fix, nibabel logs its header fixes straight to stderr, Pillow and
torch warn about deprecations: none of that is a message for the user (what matters is checked
and refused with one line), so fastinsight's readers run under :func:`quiet`.

``warnings.catch_warnings()`` cannot do this in a program with threads: it swaps the
process-wide filter list in and out, so two threads reading at once can leave an "ignore
everything" filter behind for good, undo a filter the user added meanwhile, and drop the
warnings of every other thread while a read runs. :func:`quiet` instead:

* puts ONE entry, ``("ignore", gate, category, None, 0)``, at the front of ``warnings.filters``
  while any thread is inside a quiet block, shared and reference-counted under a lock: the
  first thread in inserts it, the last one out removes it (that entry object only, wherever it
  is, in the filter list it went into and in the current one), so the user's filters, and any
  change the user made to them during a read, are left exactly as they are;
* makes that entry match only in threads that are inside a quiet block: ``gate`` stands where a
  filter has its message regex, and the warnings machinery calls ``gate.match(text)``. ``gate``
  is a :class:`threading.local` whose ``match`` is, in a quiet thread, the compiled message
  pattern's ``match`` and everywhere else the builtin :func:`callable` (``callable(text)`` is
  False for any text). Both are C functions, so no Python code runs inside the warnings
  machinery and another thread's warnings go through the user's filters as if the entry were
  not there;
* silences a logger (``loggers=``, e.g. nibabel's ``nibabel.global``) the same way: a
  :class:`logging.Filter`, added to it while any thread needs it, that drops only records
  logged from a thread inside a quiet block. The logger's ``disabled`` flag is never touched.

Nested blocks (a quiet reader calling another) count per thread. Under ``-W error`` (or any
``"error"`` filter the user had when the block was entered) a foreign warning inside a read is
still ignored, not raised: the entry goes in front of the user's filters, and is moved back to
the front when a thread enters while the user has put another filter before it.

The simpler designs fall short: a lock around whole reads serialises every read and still drops
other threads' warnings; a reference count that snapshots ``warnings.filters`` on the first
entry and puts the snapshot back on the last exit undoes the user's changes made meanwhile and
drops other threads' warnings too. The entry's insert and removal do not bump the warnings
module's registry version (a private hook): an ignored warning is never recorded in a
``__warningregistry__``, so no cached decision goes stale. Trade-offs left:

* while a read runs, ``warnings.filters`` shows the entry (and the logger its filter); they go
  when the last read ends;
* a warning issued by a thread that a reader itself starts is not silenced (none of the
  readers' libraries warn from their own threads);
* a filter the user puts in front of the entry DURING a read applies to that read's foreign
  warnings too (``warnings.simplefilter("error")`` then, mid-read, may fail it), until the
  next entry moves it back; ``warnings.resetwarnings()`` mid-read removes the entry, which comes
  back with the next read;
* Python 3.14's context-aware warnings (free-threaded builds): the entry goes into the global
  list, which a ``catch_warnings`` context opened before the read does not see.

numpy's floating-point warnings are thread-local already: use ``np.errstate`` beside this.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import Any, cast

__all__ = ["quiet"]

_LOCK = threading.RLock()  # the counts, and the install/remove of the shared entries (an RLock:
# a signal handler that reads while this thread holds it must not deadlock)


class _Gate(threading.local):
    """Per thread: ``match`` is what the ignore entry's message "regex" answers."""

    match: Callable[[str], object] = callable  # outside a quiet block: never a match
    depth = 0

    def __repr__(self) -> str:
        return "<fastinsight.quiet: ignore in threads inside a fastinsight read>"


class _WarningRule:
    """One ``(category, message)`` to ignore in quiet threads, and its shared filter entry."""

    def __init__(self, category: type[Warning], message: str) -> None:
        self.gate = _Gate()
        # compiled as warnings.filterwarnings compiles a message (matched at the start, any case)
        self.pattern = re.compile(message, re.I)
        self.entry = ("ignore", self.gate, category, None, 0)
        self.users = 0
        self.lists: list[list[Any]] = []  # every filter list the entry was put into

    def enter(self) -> None:
        gate = self.gate
        if gate.depth == 0:
            gate.match = self.pattern.match
        gate.depth += 1
        with _LOCK:
            self.users += 1
            filters = _filters()
            if not (filters and filters[0] is self.entry):
                _drop(filters, self.entry)
                filters.insert(0, self.entry)
                if all(seen is not filters for seen in self.lists):
                    self.lists.append(filters)

    def exit(self) -> None:
        gate = self.gate
        with _LOCK:
            self.users -= 1
            if self.users == 0:
                for filters in (*self.lists, _filters()):
                    _drop(filters, self.entry)
                self.lists.clear()
        gate.depth -= 1
        if gate.depth == 0:
            del gate.match  # the class's ``callable`` again


def _filters() -> list[Any]:
    """The process's filter list now (``catch_warnings`` swaps in a copy while it runs)."""
    return cast("list[Any]", warnings.filters)  # a list; typeshed says Sequence


def _drop(filters: list[Any], entry: tuple[Any, ...]) -> None:
    """Every occurrence of ``entry`` out of ``filters`` (``list.remove``: one atomic step each;
    only a tuple holding our gate compares equal to it)."""
    with contextlib.suppress(ValueError):
        while True:
            filters.remove(entry)


class _Depth(threading.local):
    depth = 0


class _LogRule(logging.Filter):
    """A logger's records dropped when logged from a quiet thread; on the logger while needed."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.logger = logging.getLogger(name)
        self.local = _Depth()
        self.users = 0

    def filter(self, record: logging.LogRecord) -> bool:
        return self.local.depth == 0

    def enter(self) -> None:
        self.local.depth += 1
        with _LOCK:
            self.users += 1
            if self.users == 1:
                self.logger.addFilter(self)

    def exit(self) -> None:
        with _LOCK:
            self.users -= 1
            if self.users == 0:
                self.logger.removeFilter(self)
        self.local.depth -= 1


_RULES: dict[tuple[type[Warning], str], _WarningRule] = {}
_LOG_RULES: dict[str, _LogRule] = {}


@contextlib.contextmanager
def quiet(
    category: type[Warning] = Warning, message: str = "", *, loggers: tuple[str, ...] = ()
) -> Iterator[None]:
    """Within the block, in this thread only: warnings of ``category`` whose text matches
    ``message`` (a regex matched at the start, as in :func:`warnings.filterwarnings`) are
    ignored, even under ``-W error``, and records of the named loggers are dropped. Other
    threads' warnings and log records are untouched, and the process's filters and loggers are
    left as they were (see the module docstring)."""
    with _LOCK:
        if (category, message) not in _RULES:
            _RULES[(category, message)] = _WarningRule(category, message)
        rules: list[_WarningRule | _LogRule] = [_RULES[(category, message)]]
        for name in loggers:
            if name not in _LOG_RULES:
                _LOG_RULES[name] = _LogRule(name)
            rules.append(_LOG_RULES[name])
    entered: list[_WarningRule | _LogRule] = []
    try:
        for rule in rules:
            rule.enter()
            entered.append(rule)
        yield
    finally:
        for rule in reversed(entered):
            rule.exit()
