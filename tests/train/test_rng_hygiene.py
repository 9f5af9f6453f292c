"""Training and loading leave the caller's global random generators as they were.

Training seeds Python's ``random``, numpy's global generator and torch's (``seed_everything``),
which makes a run reproducible; an embedder's own draws after the call (a random
hyper-parameter search, augmentation) must not become the stream of ``config.seed``. The
entry points give the generators back (``kept_global_rng``), when they return and when they
fail, and the run itself is exactly as seeded as before. Loading a model builds its modules
with random init before the weights are overwritten; that init must not advance the caller's
torch generator either.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import fastinsight
import fastinsight.train.api as train_api
from fastinsight.models.config import InsightConfig
from fastinsight.train import Bag, TrainConfig, train_from_folder, train_on_bags
from fastinsight.train.loop import _fit, kept_global_rng
from fastinsight.volume.train import train_volume_model
from tests.support.h5_layouts import grid_coords, write_insight
from tests.support.synth_cohort import cohort, small_config


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _pending_cuda() -> list[Any]:
    """The CUDA seeds torch queued for CUDA's first use (``torch.manual_seed`` before CUDA is
    initialised), by identity; the device states once CUDA is initialised."""
    if torch.cuda.is_initialized():
        return [s.tolist() for s in torch.cuda.get_rng_state_all()]
    tracker = getattr(torch.cuda, "_lazy_seed_tracker", None)
    order = getattr(tracker, "call_order", [])
    return [None if c is None else id(c[0]) for c in order]


def _snapshot() -> dict[str, Any]:
    py = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "random": py,
        "numpy": (kind, keys.tolist(), pos, has_gauss, cached),
        "torch": torch.get_rng_state().tolist(),
        "cuda": _pending_cuda(),
    }


def _caller_seeds(salt: int = 0) -> dict[str, Any]:
    """Seed the globals as a caller would (not with any training seed), advance them a little,
    and return their snapshot."""
    random.seed(1234 + salt)
    np.random.seed(5678 + salt)
    torch.manual_seed(91011 + salt)
    random.random(), np.random.rand(3), torch.rand(5)
    return _snapshot()


def _bags() -> list[Bag]:
    return cohort(n=6, tiles=4, c=16, g=4, lesion=2, lesion_tiles=1)[0]


def _config(**kw: Any) -> TrainConfig:
    return TrainConfig(**{"epochs": 2, "lr": 3e-3, "device": "cpu", "val_fraction": 0.34, **kw})


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------------------------
# slides
# --------------------------------------------------------------------------------------------
def test_train_on_bags_gives_the_callers_generators_back() -> None:
    before = _caller_seeds()
    train_on_bags(_bags(), _config(), small_config(in_dim=16, grid=(4, 4)))
    assert _snapshot() == before
    # and the caller's next draws are its own stream, not the stream of config.seed
    draws = (random.random(), float(np.random.rand()), float(torch.rand(())))
    _caller_seeds()
    assert draws == (random.random(), float(np.random.rand()), float(torch.rand(())))


def test_the_generators_come_back_when_the_run_fails() -> None:
    before = _caller_seeds(1)

    def fail(_line: str) -> None:  # called after the first epoch: the run is mid-way
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        train_on_bags(_bags(), _config(), small_config(in_dim=16, grid=(4, 4)), log=fail)
    assert _snapshot() == before


def test_weights_depend_on_the_seed_only() -> None:
    """The same seed gives bit-identical weights whatever the caller's generators hold, and the
    weights of a run without the wrapper (the old behaviour)."""
    mcfg = small_config(in_dim=16, grid=(4, 4))
    _caller_seeds(2)
    a, hist_a = train_on_bags(_bags(), _config(seed=7), mcfg)
    _caller_seeds(3)
    b, hist_b = train_on_bags(_bags(), _config(seed=7), mcfg)
    assert _same(_weights(a), _weights(b))
    assert [h.train_loss for h in hist_a] == [h.train_loss for h in hist_b]
    c, _ = train_on_bags(_bags(), _config(seed=8), mcfg)
    assert not _same(_weights(a), _weights(c))


def test_weights_are_those_of_the_unwrapped_run(monkeypatch: pytest.MonkeyPatch) -> None:
    mcfg = small_config(in_dim=16, grid=(4, 4))
    wrapped, _ = train_on_bags(_bags(), _config(seed=3), mcfg)
    # The entry point and the loop without kept_global_rng: what training did before.
    bare_fit, bare_train = _fit.__wrapped__, train_on_bags.__wrapped__  # type: ignore[attr-defined]
    monkeypatch.setattr(train_api, "_fit", bare_fit)
    bare, _ = bare_train(_bags(), _config(seed=3), mcfg)
    _caller_seeds(11)  # the bare run left the globals reseeded: not for the next test
    assert _same(_weights(wrapped), _weights(bare))


def test_resume_still_reaches_the_straight_run(tmp_path: Path) -> None:
    mcfg = small_config(in_dim=16, grid=(4, 4))
    straight, _ = train_on_bags(
        _bags(), _config(epochs=2), mcfg, out_path=tmp_path / "a.safetensors"
    )
    train_on_bags(_bags(), _config(epochs=1), mcfg, out_path=tmp_path / "b.safetensors")
    _caller_seeds(4)  # the caller draws between the runs: the resume does not care
    resumed, _ = train_on_bags(
        _bags(), _config(epochs=2), mcfg, out_path=tmp_path / "b.safetensors", resume=True
    )
    assert _same(_weights(straight), _weights(resumed))


def test_train_from_folder_gives_the_callers_generators_back(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for i in range(4):
        feats = rng.standard_normal((3, 8, 4, 4)).astype(np.float32)
        write_insight(
            tmp_path / "f" / f"s{i}.h5", feats, grid_coords(np.c_[[0, 0, 1], [0, 1, 0]], 64)
        )
    (tmp_path / "l.csv").write_text("slide_id,tumor\ns0,0\ns1,1\ns2,0\ns3,1\n")
    before = _caller_seeds(5)
    result = train_from_folder(
        tmp_path / "f",
        tmp_path / "l.csv",
        tmp_path / "m.safetensors",
        TrainConfig(epochs=1, val_fraction=0.0, device="cpu"),
        encoder="toy",
        tile_size_px=64,
        mpp=0.5,
        model_options={"reduce_dim": 8, "widths": (8, 8, 8)},
        progress=False,
    )
    assert result.model_path.exists()
    assert _snapshot() == before


# --------------------------------------------------------------------------------------------
# volumes
# --------------------------------------------------------------------------------------------
def _volume_bags(n: int = 6) -> list[Bag]:
    g = torch.Generator().manual_seed(0)
    bags = []
    for i in range(n):
        x = torch.randn(3, 8, 4, 4, generator=g)
        if i % 2:
            x[1, 0, 1:3, 1:3] += 4.0
        bags.append(Bag(x, None, torch.tensor([float(i % 2)]), f"v{i}"))
    return bags


@pytest.mark.parametrize("ctx", ["2d", "3d"])
def test_train_volume_model_gives_the_callers_generators_back(ctx: str) -> None:
    cfg = InsightConfig(in_dim=8, reduce_dim=8, widths=(8, 8, 8), grid_size=(4, 4), norm="channel")
    tcfg = TrainConfig(epochs=2, lr=3e-3, val_fraction=0.34, device="cpu")
    _caller_seeds(6)
    first, _ = train_volume_model(_volume_bags(), cfg, tcfg, slice_context=ctx)
    before = _caller_seeds(7)
    second, _ = train_volume_model(_volume_bags(), cfg, tcfg, slice_context=ctx)
    assert _snapshot() == before
    assert _same(_weights(first), _weights(second))


def test_volume_train_from_folder_gives_the_callers_generators_back(tmp_path: Path) -> None:
    from fastinsight.volume.synthetic import write_cohort
    from fastinsight.volume.train import train_from_folder as train_volumes

    write_cohort(tmp_path, 4, shape=(24, 24, 4))
    before = _caller_seeds(8)
    train_volumes(
        tmp_path / "volumes",
        tmp_path / "labels.csv",
        tmp_path / "m.safetensors",
        encoder_options={"patch_size_px": 14},
        tile_size=56,
        train_config=TrainConfig(epochs=1, device="cpu"),
        device="cpu",
    )
    assert (tmp_path / "m.safetensors").exists()
    assert _snapshot() == before


# --------------------------------------------------------------------------------------------
# the context manager itself, and loading
# --------------------------------------------------------------------------------------------
def test_kept_global_rng_restores_after_reseeding() -> None:
    before = _caller_seeds(9)
    with kept_global_rng():
        random.seed(0), np.random.seed(0), torch.manual_seed(0)
        torch.rand(10)
    assert _snapshot() == before


def test_loading_a_model_leaves_the_torch_generator_alone(tmp_path: Path) -> None:
    from fastinsight.models.pylon import PylonConfig, PylonModel, save_pylon
    from fastinsight.radiograph.predict import load_radiograph_model

    path = tmp_path / "m.safetensors"
    fastinsight.InsightModel(small_config(in_dim=16, grid=(4, 4))).save(str(path))
    pylon_path = tmp_path / "pylon.safetensors"
    pylon = PylonConfig(num_classes=1, stem_width=4, layers=(1, 1, 1, 1), dec_channels=4)
    save_pylon(PylonModel(pylon), pylon_path)
    for load in (
        lambda: fastinsight.load_model(path, device="cpu"),
        lambda: fastinsight.load_model(pylon_path, device="cpu"),
        lambda: load_radiograph_model(pylon_path, device="cpu"),
    ):
        before = _caller_seeds(10)
        load()
        assert _snapshot() == before
    # Building a model to train still draws its init from the generator, as torch modules do.
    torch.manual_seed(0)
    fastinsight.InsightModel(small_config(in_dim=16, grid=(4, 4)))
    after_build = torch.rand(())
    torch.manual_seed(0)
    assert not torch.equal(after_build, torch.rand(()))
