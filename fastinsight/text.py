"""Text that reaches a file format or a terminal, encoded for it.

File names on Linux are bytes. Python shows the bytes that are not UTF-8 (a Latin-1 name such as
``Pr\\xe4parat.svs`` copied from an old scanner share) as lone surrogates (PEP 383,
``surrogateescape``). Those strings cannot be written to a UTF-8 file, printed to a UTF-8
terminal, or stored as valid JSON: ``json.dumps`` escapes them as ``\\udce4``, which strict JSON
parsers reject. ``clean_text`` turns each such byte into the visible text ``\\xe4``, so every text
fastinsight writes is valid Unicode; names in any script (``Präparat_µ``, ``腫瘍``) are kept as
they are. ``ascii_text`` is for 7-bit formats (TIFF ASCII tags).
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Any

from fastinsight.errors import InputError


def clean_text(text: str) -> str:
    """``text`` as valid Unicode: surrogate-escaped bytes become ``\\xNN``; the rest is kept."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        raw = text.encode("utf-8", "surrogateescape" if _only_escapes(text) else "surrogatepass")
        return raw.decode("utf-8", "backslashreplace")


def _only_escapes(text: str) -> bool:
    # surrogateescape can encode U+DC80..U+DCFF only; other lone surrogates need surrogatepass.
    return all(not 0xD800 <= ord(c) <= 0xDFFF or 0xDC80 <= ord(c) <= 0xDCFF for c in text)


# C0 controls, DEL, C1 controls and the Unicode line/paragraph separators: characters that move
# the cursor, end a line or start a terminal escape sequence.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def terminal_text(text: str) -> str:
    """``text`` for one line of terminal output: ``clean_text``, and control characters written
    as Python escapes (``\\n``, ``\\r``, ``\\t``, ``\\x1b``), the way error messages show
    them (``repr``). A slide named ``"a\\nb.tif"`` then keeps its summary on one line, and an
    ESC in a name cannot drive the terminal.

    For what a person reads only: ids, CSV cells and JSON keep the name as it is
    (``clean_text``), so they match the file and read back unchanged.
    """
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], clean_text(text))


def ascii_text(text: str) -> str:
    """``text`` in 7-bit ASCII: non-ASCII characters as ``\\xNN`` / ``\\uNNNN`` escapes."""
    return clean_text(text).encode("ascii", "backslashreplace").decode("ascii")


def display_path(path: str | os.PathLike[str] | None) -> str | None:
    """A path as text for reports and messages (valid Unicode), None stays None."""
    return None if path is None else clean_text(os.fspath(path))


def clean_json(value: Any, where: str = "report", nan_as_null: bool = False) -> Any:
    """A JSON-ready copy of ``value``: strings cleaned, NaN/inf refused with the key named.

    Paths become text; tuples become lists; numpy scalars and arrays become Python values.
    Raises ``InputError`` naming the first non-finite number (a NaN must never reach a report
    as the invalid JSON token ``NaN``). With ``nan_as_null`` (metrics, where NaN means
    "undefined", e.g. an AUC over one class) a non-finite number is written as ``null``.
    """
    if isinstance(value, str):
        return clean_text(value)
    if isinstance(value, os.PathLike):
        return clean_text(os.fspath(value))
    if isinstance(value, bool) or value is None or isinstance(value, int):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            if nan_as_null:
                return None
            raise InputError(
                f"{where} holds {value!r}: the run produced a non-finite number; nothing was "
                "written (check the model's weights and the input features)"
            )
        return value
    if isinstance(value, dict):
        return {
            clean_text(str(k)): clean_json(v, f"{where}.{k}", nan_as_null) for k, v in value.items()
        }
    if isinstance(value, (list, tuple)):
        return [clean_json(v, f"{where}[{i}]", nan_as_null) for i, v in enumerate(value)]
    tolist = getattr(value, "tolist", None)
    if callable(tolist):  # numpy scalars / arrays, torch tensors
        return clean_json(tolist(), where, nan_as_null)
    return clean_text(str(value))


def loads_json(text: str | bytes) -> Any:
    """``json.loads`` that fails only with ValueError: bad JSON, bad UTF-8, or nesting deeper
    than Python's parser recurses (``[[[[...`` of a hostile file raises RecursionError there)."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("JSON nested too deeply to parse") from None


def dumps_json(value: Any, where: str = "report", nan_as_null: bool = False, **kw: Any) -> str:
    """``json.dumps`` of ``clean_json(value)``: always valid, strict JSON (``allow_nan=False``)."""
    return json.dumps(clean_json(value, where, nan_as_null), allow_nan=False, **kw)


__all__ = [
    "ascii_text",
    "clean_json",
    "clean_text",
    "display_path",
    "dumps_json",
    "loads_json",
    "terminal_text",
]
