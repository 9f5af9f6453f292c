"""Issue #16, class 3 for the training-resume state (``<out>.train.pt``).

A resume file with NaN/inf in the weights or the optimiser's moments, a truncated file, a plain
checkpoint, a foreign pickle, a FIFO, or a state written for another model gives one
``CheckpointError`` (exit 3 through the CLI, one line) before any epoch runs, and the file is
never modified. Loading never runs code from the file (``weights_only``).
"""

from __future__ import annotations

import csv
import hashlib
import os
import pickle
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fastinsight.errors import CheckpointError
from fastinsight.models.insight import InsightModel
from fastinsight.train import TrainConfig, state_path_for, train_on_bags
from tests.hardening.conftest import assert_one_error_line, run_main
from tests.support.h5_layouts import grid_coords, write_trident
from tests.support.synth_cohort import cohort, small_config

FIRST = TrainConfig(epochs=1, lr=1e-3, val_fraction=0.34, seed=0)
MORE = TrainConfig(epochs=2, lr=1e-3, val_fraction=0.34, seed=0)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Any], Path]:
    """A tiny cohort and one epoch of training: its model file and a genuine ``.train.pt``."""
    bags, _ = cohort(n=6, tiles=3, c=8, g=4, lesion=2, seed=1)
    out = tmp_path_factory.mktemp("resume") / "m.safetensors"
    torch.set_num_threads(1)
    train_on_bags(bags, FIRST, small_config(in_dim=8, grid=(4, 4)), out_path=out)
    assert state_path_for(out).is_file()
    return bags, out


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _copy_run(trained: tuple[list[Any], Path], tmp_path: Path) -> Path:
    """A private copy of the trained run (model + state) to damage."""
    _, out = trained
    mine = tmp_path / out.name
    mine.write_bytes(out.read_bytes())
    state_path_for(mine).write_bytes(state_path_for(out).read_bytes())
    return mine


def _edit_state(out: Path, edit: Callable[[dict[str, Any]], None]) -> Path:
    path = state_path_for(out)
    state = torch.load(path, weights_only=True)
    edit(state)
    torch.save(state, path)
    return path


def _resume_fails(bags: list[Any], out: Path, match: str) -> None:
    """Resuming raises CheckpointError(match) and leaves the state file byte-identical."""
    path = state_path_for(out)
    before = _digest(path) if path.is_file() else None
    with pytest.raises(CheckpointError, match=match) as info:
        train_on_bags(bags, MORE, small_config(in_dim=8, grid=(4, 4)), out_path=out, resume=True)
    assert "\n" not in str(info.value)
    if before is not None:
        assert _digest(path) == before


def _first_param(state: dict[str, Any]) -> str:
    return next(k for k, v in state["model_state"].items() if v.is_floating_point())


# -- the genuine file resumes (so every failure below is the damage, not the setup) --------------
def test_the_undamaged_state_resumes(trained, tmp_path: Path) -> None:
    bags, _ = trained
    out = _copy_run(trained, tmp_path)
    _, history = train_on_bags(
        bags, MORE, small_config(in_dim=8, grid=(4, 4)), out_path=out, resume=True
    )
    assert len(history) == 2


# -- non-finite numbers --------------------------------------------------------------------------
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_weights_are_refused(trained, tmp_path: Path, value: float) -> None:
    bags, _ = trained
    out = _copy_run(trained, tmp_path)
    name = ""

    def poison(state: dict[str, Any]) -> None:
        nonlocal name
        name = _first_param(state)
        state["model_state"][name].view(-1)[0] = value

    _edit_state(out, poison)
    kind = "NaN" if value != value else "inf"
    _resume_fails(bags, out, rf"model_state\['{name}'\] holds 1 non-finite values \({kind}\)")


def test_non_finite_best_weights_are_refused(trained, tmp_path: Path) -> None:
    bags, _ = trained
    out = _copy_run(trained, tmp_path)

    def poison(state: dict[str, Any]) -> None:
        t = state["best_state"][_first_param(state)]
        t.view(-1)[:3] = float("nan")

    _edit_state(out, poison)
    _resume_fails(bags, out, r"best_state\[.*3 non-finite values \(NaN\)")


def test_non_finite_adam_moments_are_refused(trained, tmp_path: Path) -> None:
    bags, _ = trained
    out = _copy_run(trained, tmp_path)

    def poison(state: dict[str, Any]) -> None:
        moments = state["optimizer_state"]["state"][0]
        moments["exp_avg_sq"].view(-1)[0] = float("inf")

    _edit_state(out, poison)
    _resume_fails(bags, out, r"optimizer_state\['state'\]\[0\]\['exp_avg_sq'\].*inf")


def test_a_nan_learning_rate_or_best_loss_is_refused(trained, tmp_path: Path) -> None:
    bags, _ = trained
    out = _copy_run(trained, tmp_path)
    _edit_state(out, lambda s: s["optimizer_state"]["param_groups"][0].update(lr=float("nan")))
    _resume_fails(bags, out, r"\['lr'\] is nan")
    out = _copy_run(trained, tmp_path)
    _edit_state(out, lambda s: s.update(best_val_loss=float("nan")))
    _resume_fails(bags, out, "'best_val_loss' is NaN")


# -- files that are not a training state ---------------------------------------------------------
def test_a_truncated_state_is_refused(trained, tmp_path: Path) -> None:
    bags, _ = trained
    out = _copy_run(trained, tmp_path)
    path = state_path_for(out)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _resume_fails(bags, out, "cannot read training state .*damaged or not a .train.pt")
    path.write_bytes(b"")
    _resume_fails(bags, out, "cannot read training state")


def test_a_plain_checkpoint_is_not_a_training_state(trained, tmp_path: Path) -> None:
    bags, _ = trained
    out = _copy_run(trained, tmp_path)
    path = state_path_for(out)
    model = InsightModel(small_config(in_dim=8, grid=(4, 4)), backend="reference")
    torch.save(model.state_dict(), path)  # an official-style .pth state_dict
    _resume_fails(bags, out, "not a fastinsight training state .*plain checkpoint")
    path.write_bytes(out.read_bytes())  # the safetensors model file renamed
    _resume_fails(bags, out, "cannot read training state")
    torch.save([1, 2, 3], path)
    _resume_fails(bags, out, "not a fastinsight training state .*found list")


class _Planted:
    """Unpickling this would create a file: weights_only loading must never do it."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (Path(self.marker),))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_a_foreign_pickle_is_never_run(trained, tmp_path: Path) -> None:
    bags, _ = trained
    out = _copy_run(trained, tmp_path)
    marker = tmp_path / "code-ran"
    state_path_for(out).write_bytes(pickle.dumps({"format": "x", "obj": _Planted(str(marker))}))
    _resume_fails(bags, out, "cannot read training state")
    assert not marker.exists()
    # the same object inside torch.save's zip container
    torch.save({"format": "fastinsight.train/1", "obj": _Planted(str(marker))}, state_path_for(out))
    _resume_fails(bags, out, "cannot read training state")
    assert not marker.exists()


def test_a_fifo_is_refused_without_blocking(trained, tmp_path: Path) -> None:
    bags, _ = trained
    out = _copy_run(trained, tmp_path)
    path = state_path_for(out)
    path.unlink()
    os.mkfifo(path)
    _resume_fails(bags, out, "training state .* named pipe")


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda s: s.pop("optimizer_state"), r"lacks \['optimizer_state'\]"),
        (lambda s: s.update(epoch="3"), "'epoch' is a str"),
        (lambda s: s.update(epoch=-1), "'epoch' is -1"),
        (lambda s: s.update(train_ids=[1, 2]), "'train_ids' holds values"),
        (lambda s: s.update(torch_rng=torch.zeros(3)), "'torch_rng' is a torch.float32"),
        (lambda s: s.update(model_config="{not json"), "settings do not parse"),
        (lambda s: s.update(history=[{"epoch": 1}]), "epoch history does not parse"),
        (lambda s: s["model_state"].update(x=[1.0]), r"model_state\['x'\] is a list"),
    ],
    ids=["missing-key", "str-epoch", "negative-epoch", "ids", "rng", "config", "history", "list"],
)
def test_a_damaged_layout_is_refused(trained, tmp_path: Path, edit, match: str) -> None:
    bags, _ = trained
    out = _copy_run(trained, tmp_path)
    _edit_state(out, edit)
    _resume_fails(bags, out, match)


# -- a state from another model ------------------------------------------------------------------
def test_a_state_of_another_model_is_refused(trained, tmp_path: Path) -> None:
    bags, _ = trained
    other = tmp_path / "other" / "m.safetensors"
    other.parent.mkdir()
    # another configuration: the saved config says so
    train_on_bags(bags, FIRST, small_config(in_dim=8, grid=(4, 4), reduce_dim=8), out_path=other)
    out = _copy_run(trained, tmp_path)
    state_path_for(out).write_bytes(state_path_for(other).read_bytes())
    _resume_fails(bags, out, "model configuration differs")

    # the same config text over weights of other shapes (a hand-edited or foreign file)
    def reshape(state: dict[str, Any]) -> None:
        name = _first_param(state)
        state["model_state"][name] = torch.zeros(3, 3)

    out = _copy_run(trained, tmp_path)
    _edit_state(out, reshape)
    _resume_fails(bags, out, "model_state is for another model .*other shapes")

    def moments(state: dict[str, Any]) -> None:
        state["optimizer_state"]["state"][0]["exp_avg"] = torch.zeros(2, 2)

    out = _copy_run(trained, tmp_path)
    _edit_state(out, moments)
    _resume_fails(bags, out, "optimizer moment 'exp_avg' of parameter 0 has shape")

    def fewer(state: dict[str, Any]) -> None:
        state["optimizer_state"]["param_groups"][0]["params"].pop()

    out = _copy_run(trained, tmp_path)
    _edit_state(out, fewer)
    _resume_fails(bags, out, "optimizer state holds .* parameters")


# -- through the command line --------------------------------------------------------------------
def _trident_folder(root: Path) -> None:
    rng = np.random.default_rng(0)
    rc = np.array([(r, c) for r in range(3) for c in range(3)])
    lines = ["slide_id,tumor"]
    for i in range(6):
        feats = rng.standard_normal((len(rc), 8)).astype(np.float32) + (i % 2)
        write_trident(root / "feats" / f"s{i}.h5", feats, grid_coords(rc, 512))
        lines.append(f"s{i},{i % 2}")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")


def test_cli_resume_from_a_poisoned_state_is_one_line_exit_3(tmp_path: Path, capsys) -> None:
    _trident_folder(tmp_path)
    out = tmp_path / "model.safetensors"
    common = [tmp_path / "feats", tmp_path / "labels.csv", "--out", out, "--no-progress"]
    proc = run_main(capsys, "train", *common, "--epochs", "1", "--val-fraction", "0.34")
    assert proc.returncode == 0, proc.stderr
    metrics = out.with_suffix(".metrics.csv")
    before_metrics = metrics.read_bytes()
    path = _edit_state(
        out, lambda s: s["model_state"][_first_param(s)].view(-1).__setitem__(0, float("nan"))
    )
    before = _digest(path)
    proc = run_main(capsys, "train", *common, "--epochs", "2", "--val-fraction", "0.34", "--resume")
    line = assert_one_error_line(proc, CheckpointError.exit_code)
    assert "non-finite" in line and "start afresh" in line
    assert _digest(path) == before and metrics.read_bytes() == before_metrics
    assert len(list(csv.DictReader(metrics.open(encoding="utf-8")))) == 1
    path.write_bytes(path.read_bytes()[:100])
    proc = run_main(capsys, "train", *common, "--epochs", "2", "--val-fraction", "0.34", "--resume")
    assert "cannot read training state" in assert_one_error_line(proc, 3)


# -- the radiograph trainer's resume state (``train_radiograph_model(state_path=...)``) ----------
def _tiny_pylon():
    from fastinsight.models.pylon import PylonConfig, PylonModel

    torch.manual_seed(0)
    return PylonModel(PylonConfig(num_classes=2, stem_width=4, layers=(1, 1, 1, 1), dec_channels=4))


@pytest.fixture(scope="module")
def radiograph_run(tmp_path_factory: pytest.TempPathFactory):
    """Two images of 256 px, one epoch: a genuine radiograph training state."""
    from fastinsight.radiograph.train import RadiographTrainConfig, train_radiograph_model

    g = torch.Generator().manual_seed(0)
    data = (torch.randn(4, 1, 256, 256, generator=g), (torch.rand(4, 2, generator=g) > 0.5).float())
    train, val = (data[0][:3], data[1][:3]), (data[0][3:], data[1][3:])
    cfg = RadiographTrainConfig(epochs=1, batch_size=3, lr=1e-2, seed=5)
    state = tmp_path_factory.mktemp("radiograph") / "train.state"
    torch.set_num_threads(1)
    train_radiograph_model(_tiny_pylon(), train, val, cfg, state_path=state)
    return train, val, cfg, state


def _radiograph_resume_fails(run, tmp_path: Path, edit, match: str) -> None:
    from fastinsight.radiograph.train import train_radiograph_model

    train, val, cfg, genuine = run
    state = tmp_path / "train.state"
    state.write_bytes(genuine.read_bytes())
    edit(state)
    before = _digest(state)
    with pytest.raises(CheckpointError, match=match) as info:
        train_radiograph_model(_tiny_pylon(), train, val, cfg, state_path=state)
    assert "\n" not in str(info.value) and _digest(state) == before


def _rewrite(change: Callable[[dict[str, Any]], None]) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        saved = torch.load(path, weights_only=True)
        change(saved)
        torch.save(saved, path)

    return edit


def _poison_first(where: str, value: float) -> Callable[[dict[str, Any]], None]:
    def change(saved: dict[str, Any]) -> None:
        t = next(v for v in saved[where].values() if v.is_floating_point())
        t.view(-1)[0] = value

    return change


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (_rewrite(_poison_first("model", float("nan"))), r"model\[.*1 non-finite values \(NaN\)"),
        (_rewrite(_poison_first("best_model", float("inf"))), r"best_model\[.*\(inf\)"),
        (
            _rewrite(
                lambda s: (
                    s["optimizer"]["state"][0]["exp_avg"].view(-1).__setitem__(0, float("nan"))
                )
            ),
            r"optimizer\['state'\]\[0\]\['exp_avg'\] holds 1 non-finite",
        ),
        (lambda p: p.write_bytes(p.read_bytes()[:300]), "cannot read training state"),
        (lambda p: torch.save(_tiny_pylon().state_dict(), p), "not a radiograph training state"),
        (_rewrite(lambda s: s.update(epoch="2")), "'epoch' is a str"),
        (
            _rewrite(lambda s: s["model"].update({"net.extra": torch.zeros(1)})),
            "model is for another model",
        ),
    ],
    ids=["nan-weights", "inf-best", "nan-moment", "truncated", "plain-state-dict", "type", "keys"],
)
def test_radiograph_resume_state_is_checked(radiograph_run, tmp_path: Path, edit, match) -> None:
    _radiograph_resume_fails(radiograph_run, tmp_path, edit, match)


def test_radiograph_resume_from_a_fifo_does_not_block(radiograph_run, tmp_path: Path) -> None:
    from fastinsight.radiograph.train import train_radiograph_model

    train, val, cfg, _ = radiograph_run
    state = tmp_path / "fifo.state"
    os.mkfifo(state)
    with pytest.raises(CheckpointError, match="named pipe"):
        train_radiograph_model(_tiny_pylon(), train, val, cfg, state_path=state)
