"""``InsightModel``'s implementation is chosen once (construction, then every move), exposed as
``backend_in_use``, and a call it cannot run is one BackendError, never a silent switch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import fastinsight.kernels
from fastinsight import InsightConfig, InsightModel
from fastinsight.cli import main
from fastinsight.errors import BackendError
from fastinsight.ops.threshold_pool import IMPL_REFERENCE, IMPL_TRITON

CFG = InsightConfig(in_dim=8, num_classes=2, grid_size=(2, 2))
needs_triton = pytest.mark.skipif(
    not fastinsight.kernels.available(), reason="Triton is not installed"
)


def _tokens(requires_grad: bool = False) -> torch.Tensor:
    return torch.randn(3, 8, 2, 2, requires_grad=requires_grad)


def test_reference_and_auto_on_cpu_resolve_to_the_reference() -> None:
    for backend in ("reference", "auto"):
        model = InsightModel(CFG, backend=backend)
        assert model.backend == backend and model.backend_in_use == IMPL_REFERENCE
        model = model.to("cpu").eval()
        assert model.backend_in_use == IMPL_REFERENCE and not model.uses_kernels
        assert model._threshold_pool().impl == IMPL_REFERENCE
        with torch.no_grad():
            model.predict(_tokens())
        model(_tokens())  # autograd on: the reference has a backward
        assert model.backend_in_use == IMPL_REFERENCE  # no call changed it


def test_the_backend_is_fixed_once_built() -> None:
    model = InsightModel(CFG, backend="auto")
    with pytest.raises(BackendError, match=r"chosen when it is built.*load_state_dict"):
        model.backend = "reference"
    assert model.backend == "auto"
    with pytest.raises(BackendError, match="backend must be one of"):
        InsightModel(CFG, backend="cuda")


def test_triton_without_triton_is_refused_when_built(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fastinsight.kernels, "available", lambda: False)
    with pytest.raises(BackendError, match=r"backend='triton' needs Triton"):
        InsightModel(CFG, backend="triton")
    # "auto" simply resolves to the reference.
    assert InsightModel(CFG, backend="auto").backend_in_use == IMPL_REFERENCE


@needs_triton
def test_triton_on_cpu_tensors_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the interpreter the kernels need CUDA: the call raises BackendError (exit code 7)
    instead of quietly running the reference, and so do threshold and pooling."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model = InsightModel(CFG, backend="triton").eval()
    assert model.backend_in_use == IMPL_TRITON and model.uses_kernels
    with torch.no_grad():
        with pytest.raises(BackendError, match=r"run is on cpu.*--backend reference") as err:
            model(_tokens())
        assert err.value.exit_code == 7
        with pytest.raises(BackendError, match="CUDA"):
            model.threshold_and_pool(torch.rand(3, 2, 2, 2))
        with pytest.raises(BackendError, match="CUDA"):
            model.predict(_tokens())
    with pytest.raises(BackendError, match="CUDA"):
        model.check_device("cpu")
    assert model.backend_in_use == IMPL_TRITON


@needs_triton
def test_triton_while_autograd_records_is_one_clear_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The kernels are forward-only: a call that would need a backward pass says to use
    no_grad or backend='reference' (as training does) instead of switching to the reference."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the device is not what is wrong here
    model = InsightModel(CFG, backend="triton")
    with pytest.raises(BackendError, match=r"forward-only.*backend='reference' to train"):
        model(_tokens())
    with pytest.raises(BackendError, match="forward-only"):
        model.pool(torch.rand(2, 12, requires_grad=True), None)
    # Training builds the reference: the same weights train there.
    ref = InsightModel(CFG, backend="reference")
    ref.load_state_dict(model.state_dict())
    ref(_tokens(requires_grad=True)).sum().backward()
    assert ref.reduce_dimension_block[0].weight.grad is not None


@needs_triton
def test_predict_with_triton_on_cpu_fails_before_any_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``fastinsight predict --backend triton --device cpu``: exit code 7, one line, no output."""
    import h5py

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model_path = tmp_path / "m.safetensors"
    InsightModel(InsightConfig(in_dim=8, encoder="vit-tiny"), backend="reference").save(
        str(model_path)
    )
    h5 = tmp_path / "f.h5"
    with h5py.File(h5, "w") as f:
        f["features"] = np.random.rand(2, 8, 14, 14).astype(np.float32)
        f["coords"] = np.array([[0, 0], [448, 0]], dtype=np.int64)
    out = tmp_path / "h.npz"
    rc = main(["predict", "--features", str(h5), "--patch-size-l0", "448", "--model",
               str(model_path), "--scores", str(out), "--backend", "triton", "--device", "cpu",
               "--quiet"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 7 and "Triton kernels" in err and "--backend reference" in err
    assert len(err.strip().splitlines()) == 1, err
    assert not out.exists()


@pytest.mark.cuda
def test_auto_follows_the_device_between_calls() -> None:
    model = InsightModel(CFG, backend="auto")
    assert model.backend_in_use == IMPL_REFERENCE
    model = model.to("cuda").eval()
    assert model.backend_in_use == IMPL_TRITON
    with torch.no_grad():
        model.predict(_tokens().cuda())
    assert model.cpu().backend_in_use == IMPL_REFERENCE


@pytest.mark.cuda
def test_predict_features_on_cuda_runs_the_kernels_and_matches_the_reference(
    tmp_path: Path,
) -> None:
    """A slide-context model on two CLAM contours: on CUDA "auto" resolves to the kernels (the
    threshold and the pooling), and the result is the reference's on the CPU."""
    from fastinsight.predict.features import predict_features
    from fastinsight.predict.slide import PredictOptions
    from tests.support.h5_layouts import clam_contours, write_clam_features, write_clam_patches

    blocks = np.array([[r, c] for r in range(3) for c in range(3)])
    xy = clam_contours([((1000, 1000), blocks), ((2636, 1037), blocks[:6])], 512)
    feats = np.random.default_rng(0).standard_normal((len(xy), 16)).astype(np.float32)
    patches = write_clam_patches(tmp_path / "p" / "s.h5", xy, level_dim=(3000, 2000))
    h5 = write_clam_features(tmp_path / "f" / "s.h5", feats, xy)
    cfg = InsightConfig(in_dim=16, grid_size=(1, 1), norm="channel", context="slide",
                        encoder="uni_v1", tile_size_px=256, patch_size_px=256)  # fmt: skip
    ref = InsightModel(cfg, backend="reference").eval()
    auto = InsightModel(cfg, backend="auto")
    auto.load_state_dict(ref.state_dict())
    run = {"patches_h5": str(patches)}
    got = predict_features(h5, auto, PredictOptions(device="cuda", progress=False), **run)
    assert auto.backend_in_use == IMPL_TRITON and got.model_info["backend"] == IMPL_TRITON
    want = predict_features(h5, ref, PredictOptions(device="cpu", progress=False), **run)
    np.testing.assert_allclose(got.raw_cells, want.raw_cells, atol=1e-5, equal_nan=True)
    np.testing.assert_allclose(got.scores, want.scores, atol=1e-4)


def test_architectures_the_kernels_cannot_run_are_named() -> None:
    from fastinsight.kernels import head_support_problem

    assert head_support_problem(128, (128, 64, 64), 3) is None
    assert "multiples of 16" in head_support_problem(100, (128, 64, 64), 1)
    assert "multiples of 16" in head_support_problem(128, (128, 64, 512), 1)
    assert "classes" in head_support_problem(128, (128, 64, 64), 300)


@needs_triton
def test_triton_refuses_an_unsupported_architecture_at_construction() -> None:
    odd = InsightConfig(in_dim=8, num_classes=2, grid_size=(2, 2), widths=(100, 64, 64))
    with pytest.raises(BackendError, match="multiples of 16.*backend='reference'"):
        InsightModel(odd, backend="triton")
    # "auto" runs it with the reference, wherever the model lives.
    assert InsightModel(odd, backend="auto").backend_in_use == IMPL_REFERENCE
