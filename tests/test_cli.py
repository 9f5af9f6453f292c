"""The command line's own behaviour: help, version, info, and errors without tracebacks."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from fastinsight import __version__
from fastinsight.cli import main
from tests.support.official import random_official_state_dict


def test_version_and_help(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and __version__ in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main([])
    out = capsys.readouterr().out
    for command in ("predict", "train", "evaluate", "demo", "export", "kernels", "predict-cohort"):
        assert command in out


def test_info_reads_an_official_checkpoint(tmp_path, capsys) -> None:
    path = tmp_path / "insight.pth"
    torch.save(random_official_state_dict(64, 3), path)
    assert main(["info", str(path)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "torch"
    assert info["config"]["in_dim"] == 64 and info["config"]["num_classes"] == 3
    assert info["config"]["pooling"] == "smoothmax"


def test_errors_are_one_line_without_traceback(tmp_path) -> None:
    bad = tmp_path / "model.safetensors"
    bad.write_text("not a model")
    proc = subprocess.run(
        [sys.executable, "-m", "fastinsight.cli", "info", str(bad)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 3
    assert proc.stderr.strip().startswith("fastinsight: error:") and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_options_speak_fields_and_the_cli_speaks_flags() -> None:
    from fastinsight.cli.main import error_message
    from fastinsight.errors import ConfigError, InputError
    from fastinsight.predict.slide import PredictOptions

    with pytest.raises(ConfigError, match=r"^batch_size must be >= 1") as err:
        PredictOptions(batch_size=0)
    assert error_message(err.value) == "--batch-size must be >= 1, got 0"
    assert err.value.exit_code == 2  # a flag's value (docs/exit-codes.md), not the input's fault
    with pytest.raises(ConfigError, match="min_cell_fraction") as err:
        PredictOptions(min_cell_fraction=2.0)
    assert error_message(err.value).startswith("--min-cell-tissue is a fraction")
    # only the fields an error names are rewritten, never other words of the message
    plain = InputError("mpp and batch_size are words here")
    assert error_message(plain) == str(plain)
