"""Export failures leave nothing behind and say one line (audit defects 1-2): a slide-context
model of 1 x 1 tiles (CLAM/TRIDENT vectors) exports with its mask, a graph that fails parity
never replaces the previous file, and an exporter crash is one ``BackendError`` line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import fastinsight.errors  # noqa: E402
from fastinsight.cli import main  # noqa: E402
from fastinsight.export import verify  # noqa: E402
from fastinsight.export.head import HeadExportOptions  # noqa: E402
from fastinsight.export.verify import export_verified_head, ort_session  # noqa: E402
from tests.support.export_helpers import make_model  # noqa: E402


def test_parity_error_is_the_back_end_error_of_exit_7() -> None:
    assert verify.ParityError is fastinsight.errors.ParityError
    assert verify.ParityError.exit_code == 7


def test_slide_context_vectors_export_with_the_mask(tmp_path: Path) -> None:
    model = make_model(num_classes=1, grid_size=(1, 1), norm="channel", context="slide")
    out, report = export_verified_head(
        model, tmp_path / "vec.onnx", HeadExportOptions(with_mask=True), sizes=(1, 5)
    )
    assert report is not None and report.errors["raw_heatmap"] <= 1e-4
    # One stitched slide grid of any size, the tissue mask beside it.
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randn(1, model.config.in_dim, 3, 5, generator=gen)
    mask = torch.rand(1, 3, 5, generator=gen) > 0.3
    mask[0, 0, 0] = True
    raw, *_ = ort_session(out).run(None, {"tokens": tokens.numpy(), "mask": mask.numpy()})
    with torch.no_grad():
        want = model(tokens, mask)
    np.testing.assert_allclose(raw, want.numpy(), rtol=0, atol=1e-4)


def test_failed_parity_keeps_the_previous_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = tmp_path / "m.safetensors"
    make_model(num_classes=1).save(str(ckpt))
    out = tmp_path / "head.onnx"
    out.write_bytes(b"the previous, good export")
    monkeypatch.setattr(verify, "FP32_TOL", -1.0)  # every comparison fails
    assert main(["export", "onnx", "--model", str(ckpt), "--out", str(out)]) == 7
    captured = capsys.readouterr()
    assert "wrote" not in captured.out
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and "disagree" in err and "bug" not in err
    assert str(out) in err and ".part" not in err
    assert out.read_bytes() == b"the previous, good export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["head.onnx", "m.safetensors"]


def test_exporter_crash_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = tmp_path / "m.safetensors"
    make_model(num_classes=1).save(str(ckpt))

    def crash(*args: object, **kwargs: object) -> None:
        raise RuntimeError("Constraints violated (H, W)!\n  - Not all values of H ...")

    monkeypatch.setattr(torch.onnx, "export", crash)
    rc = main(["export", "onnx", "--model", str(ckpt), "--out", str(tmp_path / "h.onnx")])
    err = capsys.readouterr().err.strip()
    assert rc == 7 and len(err.splitlines()) == 1
    assert "RuntimeError: Constraints violated (H, W)!" in err and "nothing was written" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]
