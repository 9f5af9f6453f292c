"""``train-volume --resume`` / ``--overwrite``: the slide trainer's contract on CT volumes.

An interrupted run continues to the model an uninterrupted one reaches; a resume from a state of
other settings, another recipe or other data, or with no state, is one error line that changes
nothing; a fresh run refuses a previous run's outputs unless ``--overwrite``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import fastinsight.train.loop as train_loop
from fastinsight.cli import main
from fastinsight.train import state_path_for
from fastinsight.volume.checkpoint import load_volume_model
from fastinsight.volume.model import CrossSliceInsight
from fastinsight.volume.synthetic import write_cohort

OUTPUTS = ("m.safetensors", "m.train.pt", "m.metrics.csv", "m.metrics.json")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cohort")
    write_cohort(root, 4, shape=(24, 24, 4))
    return root


def _train(cohort: Path, out: Path, *extra: object, labels: Path | None = None) -> list[str]:
    """A tiny train-volume run: vit-tiny at 56 px with 14 px patches (4 x 4 grids), CPU."""
    return [
        "train-volume", str(cohort / "volumes"), "--labels", str(labels or cohort / "labels.csv"),
        "--out", str(out), "--tile-size", "56", "--patch-size", "14", "--lr", "3e-3",
        "--device", "cpu", *map(str, extra),
    ]  # fmt: skip


def _run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    rc = main(args)
    return rc, capsys.readouterr().err.strip()


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _history(folder: Path) -> list[tuple[object, ...]]:
    rows = json.loads((folder / "m.metrics.json").read_text())
    return [(r["epoch"], r["train_loss"], r["val_loss"], r["improved"]) for r in rows]


@pytest.mark.parametrize("ctx", ["2d", "3d"])
def test_interrupted_run_resumes_to_the_uninterrupted_model(
    cohort: Path, tmp_path: Path, ctx: str, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    straight, broken = tmp_path / "a", tmp_path / "b"
    straight.mkdir()
    broken.mkdir()
    args = ("--epochs", 4, "--slice-context", ctx)
    assert _run(_train(cohort, straight / "m.safetensors", *args), capsys)[0] == 0

    # Killed during epoch 3 of the same 4-epoch run: epoch 2's model, state and metrics stay.
    train_epoch = train_loop._train_epoch

    def killed_in_epoch_3(run, items, epoch):  # type: ignore[no-untyped-def]
        if epoch == 2:
            raise KeyboardInterrupt
        return train_epoch(run, items, epoch)

    monkeypatch.setattr(train_loop, "_train_epoch", killed_in_epoch_3)
    rc, err = _run(_train(cohort, broken / "m.safetensors", *args), capsys)
    assert rc != 0 and "interrupted" in err
    assert sorted(p.name for p in broken.iterdir()) == sorted(OUTPUTS)  # no temporary file
    assert torch.load(state_path_for(broken / "m.safetensors"), weights_only=True)["epoch"] == 2
    monkeypatch.undo()

    rc, err = _run(_train(cohort, broken / "m.safetensors", *args, "--resume"), capsys)
    assert rc == 0, err
    assert "resuming after epoch 2" in err
    wa, wb = load_file(str(straight / "m.safetensors")), load_file(str(broken / "m.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    sa = torch.load(state_path_for(straight / "m.safetensors"), weights_only=True)
    sb = torch.load(state_path_for(broken / "m.safetensors"), weights_only=True)
    assert sa["epoch"] == sb["epoch"] == 4
    for k in sa["model_state"]:
        assert torch.equal(sa["model_state"][k], sb["model_state"][k]), k
    assert _history(straight) == _history(broken)
    model, info = load_volume_model(broken / "m.safetensors", device="cpu")
    assert isinstance(model, CrossSliceInsight) == (ctx == "3d") and info.slice_context == ctx


def test_resume_to_more_epochs_continues(cohort: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "m.safetensors"
    assert _run(_train(cohort, out, "--epochs", 1), capsys)[0] == 0
    rc, err = _run(_train(cohort, out, "--epochs", 2, "--resume"), capsys)
    assert rc == 0, err
    assert [row[0] for row in _history(tmp_path)] == [1, 2]


def test_refusals_change_nothing(cohort: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    run.mkdir()
    out = run / "m.safetensors"
    assert _run(_train(cohort, out, "--epochs", 1), capsys)[0] == 0
    before = _snapshot(run)

    def refused(args: list[str], code: int, *words: str, encoded: bool = False) -> None:
        rc, err = _run(args, capsys)
        assert rc == code, err
        # Flags and labels are checked before any volume is encoded, the voxels after.
        assert ("encoded ct000" in err) == encoded, err
        line = err.splitlines()[-1]
        assert line.startswith("fastinsight: error:") and err.count("error:") == 1, err
        for word in words:
            assert word in line, err
        assert _snapshot(run) == before

    # A fresh run over a previous run's outputs.
    refused(_train(cohort, out, "--epochs", 1), 6, "--resume", "--overwrite", "m.train.pt")
    # Other training settings; another slice recipe or encoder geometry.
    refused(_train(cohort, out, "--epochs", 2, "--lr", "1e-2", "--resume"), 3, "lr")
    refused(_train(cohort, out, "--epochs", 2, "--seed", "1", "--resume"), 3, "seed")
    refused(_train(cohort, out, "--slices", "middle32", "--resume"), 3, "slices")
    refused(_train(cohort, out, "--slice-context", "3d", "--resume"), 3, "slice_context")
    refused(_train(cohort, out, "--tile-size", "112", "--resume"), 3, "tile_size")
    # Other data: a label changed; a volume replaced by another scan of the same name.
    labels = tmp_path / "labels.csv"
    labels.write_text((cohort / "labels.csv").read_text().replace("ct002,0", "ct002,1"))
    refused(_train(cohort, out, "--resume", labels=labels), 3, "labels_sha256")
    other, copy = tmp_path / "other", tmp_path / "copy"
    write_cohort(other, 1, shape=(24, 24, 4), seed=5)
    shutil.copytree(cohort, copy)
    shutil.copy(other / "volumes" / "ct000.nii.gz", copy / "volumes" / "ct000.nii.gz")
    refused(_train(copy, out, "--resume"), 3, "volumes_sha256", encoded=True)
    # A state that is not there: nothing is created either.
    rc, err = _run(_train(cohort, tmp_path / "none.safetensors", "--resume"), capsys)
    assert rc == 3 and "no training state" in err and "\n" not in err
    assert not list(tmp_path.glob("none*"))
    # --overwrite starts afresh.
    rc, err = _run(_train(cohort, out, "--epochs", 2, "--overwrite"), capsys)
    assert rc == 0, err
    assert [row[0] for row in _history(run)] == [1, 2]
