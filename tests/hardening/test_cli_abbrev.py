"""Flags are taken only as spelt in full: a prefix is an error, never another flag."""

from __future__ import annotations

import pytest

from fastinsight.cli.main import build_parser


@pytest.mark.parametrize(
    "argv",
    [
        ["predict", "s.svs", "--out", "h.tif", "--qui"],
        ["predict", "--features", "f.h5", "--out", "h.tif", "--patch-size-l", "448"],
        ["predict-volume", "scan.nii.gz", "--model", "m.safetensors", "--out", "h.nii.gz",
         "--lung", "auto"],
        ["encoders", "list", "--js"],
    ],
    ids=["predict-quiet", "predict-patch-size-l0", "volume-lung-mask", "encoders-json"],
)  # fmt: skip
def test_a_prefix_of_a_flag_is_refused(argv: list[str], capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser(argv).parse_args(argv)
    assert exc.value.code == 2
    assert "unrecognized arguments" in capsys.readouterr().err


def test_flags_spelt_in_full_still_parse() -> None:
    argv = ["predict", "s.svs", "--out", "h.tif", "--quiet"]
    assert build_parser(argv).parse_args(argv).quiet is True
