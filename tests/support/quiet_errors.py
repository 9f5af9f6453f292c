"""One assertion shared by the hostile-file tests: a reader refuses with one quiet line."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest

from fastinsight.errors import InputError


def refused_quietly(call: Callable[[], object], match: str, capfd: pytest.CaptureFixture) -> str:
    """``call`` raises one InputError line matching ``match``, with no warning raised and
    nothing written to stderr; returns the message."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(InputError, match=match) as info:
            call()
    message = str(info.value)
    assert "\n" not in message, message
    assert not caught, [str(w.message) for w in caught]
    assert capfd.readouterr().err == ""
    return message
