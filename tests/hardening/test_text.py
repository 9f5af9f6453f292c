"""Class 1 of issue #16 (non-TIFF part): every text written is valid for its format."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

from fastinsight.errors import InputError
from fastinsight.text import ascii_text, clean_json, clean_text, display_path, dumps_json

LATIN1_NAME = os.fsdecode(b"Pr\xe4parat.svs")  # a non-UTF-8 file name as Python sees it


def test_names_in_any_script_are_kept() -> None:
    for name in ("Präparat_µ.svs", "腫瘍.ndpi", "plain.tif"):
        assert clean_text(name) == name


def test_undecodable_bytes_become_visible_escapes() -> None:
    assert LATIN1_NAME != "Pr\\xe4parat.svs"  # Python holds a lone surrogate here
    assert clean_text(LATIN1_NAME) == "Pr\\xe4parat.svs"
    clean_text(LATIN1_NAME).encode("utf-8")  # valid Unicode now
    assert clean_text("a\ud800b").encode("utf-8")  # any lone surrogate


def test_ascii_text_for_7bit_formats() -> None:
    assert ascii_text("Präparat_µ 腫瘍") == "Pr\\xe4parat_\\xb5 \\u816b\\u760d"
    assert ascii_text(LATIN1_NAME) == "Pr\\xe4parat.svs"
    ascii_text(LATIN1_NAME).encode("ascii")


def test_json_is_strict_and_valid_unicode() -> None:
    report = {
        "slide": display_path(os.fsdecode(b"/data/Pr\xe4parat.svs")),
        "scores": {"腫瘍": np.float32(0.25)},
        "dims": (3, 4),
        "arr": np.arange(3),
    }
    text = dumps_json(report, ensure_ascii=False)
    text.encode("utf-8")  # no lone surrogates
    back = json.loads(text)
    assert back["slide"] == "/data/Pr\\xe4parat.svs" and back["scores"]["腫瘍"] == 0.25
    assert back["dims"] == [3, 4] and back["arr"] == [0, 1, 2]


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, np.float32("nan")])
def test_nan_never_reaches_json(bad) -> None:
    with pytest.raises(InputError, match=r"report\.scores\.tumour holds"):
        clean_json({"scores": {"tumour": bad}})
