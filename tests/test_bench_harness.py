"""bench/_harness.py: the stamp and the CSV append every benchmark script shares."""

from __future__ import annotations

import csv
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))
import _harness  # noqa: E402


def test_append_rows_writes_the_header_once(tmp_path: Path) -> None:
    out = tmp_path / "deep" / "r.csv"
    fields = ["a", "b"]
    _harness.append_rows(out, fields, [{"a": 1, "b": "x,y"}])
    _harness.append_rows(out, fields, [{"a": 2}, {"a": 3, "b": 'q"'}])
    rows = list(csv.DictReader(out.open(newline="")))
    assert rows == [{"a": "1", "b": "x,y"}, {"a": "2", "b": ""}, {"a": "3", "b": 'q"'}]
    assert out.read_text().count("a,b") == 1
    empty = tmp_path / "empty.csv"
    empty.touch()  # an empty file (e.g. made by a shell redirect) still gets its header
    _harness.append_rows(empty, fields, [{"a": 1}])
    assert empty.read_text().splitlines()[0] == "a,b"
    with pytest.raises(ValueError):
        _harness.append_rows(out, fields, [{"a": 1, "typo": 2}])


def test_stamp_and_versions() -> None:
    stamp = _harness.run_stamp("cpu")
    assert set(stamp) == {"timestamp", "git_rev", "device"}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", stamp["timestamp"])
    head = subprocess.run(
        ["git", "-C", str(BENCH), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    assert stamp["git_rev"] == (head or "unknown")
    assert re.fullmatch(r"cpu \(.+, \d+ cores(, \d+ threads)?\)", stamp["device"])
    got = _harness.versions("python", "numpy", "no_such_package_fastinsight")
    import numpy

    assert got["numpy"] == numpy.__version__ and got["no_such_package_fastinsight"] == "unknown"
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", got["python"])


@pytest.mark.parametrize(
    "script", ["bench_encoders", "bench_read", "bench_slide", "bench_volume", "bench_demo"]
)
def test_every_script_uses_the_harness(script: str) -> None:
    """One place for the stamp and the append: no script carries its own copy again."""
    text = (BENCH / f"{script}.py").read_text()
    assert "from _harness import" in text
    assert "def git_rev" not in text and "rev-parse" not in text and "DictWriter" not in text
