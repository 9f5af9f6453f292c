"""Slide-level training: loss, chunked/checkpointed forward, learning, resume, LSE-LBA, folders."""

from __future__ import annotations

import argparse
import csv
import json
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from fastinsight.cli.train import add_arguments, run
from fastinsight.errors import CheckpointError, InputError
from fastinsight.evaluate import roc_auc
from fastinsight.models.checkpoints import load_model
from fastinsight.models.insight import InsightModel
from fastinsight.train import (
    Bag,
    TrainConfig,
    bce_loss,
    slide_forward,
    state_path_for,
    stratified_split,
    train_from_folder,
    train_on_bags,
)
from tests.support.h5_layouts import grid_coords, write_insight, write_trident  # noqa: E402
from tests.support.synth_cohort import cohort, small_config


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Small ops on a shared 2-core machine: one thread avoids OpenMP barrier stalls."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------------------------
# the loss
# --------------------------------------------------------------------------------------------
def test_bce_matches_the_official_loss() -> None:
    p = torch.tensor([0.02, 0.3, 0.7, 0.98])
    y = torch.tensor([0.0, 1.0, 0.0, 1.0])
    ls, pw, nw = 0.1, 3.0, 0.5
    ours = bce_loss(p, y, label_smoothing=ls, pos_weight=[pw] * 4, neg_weight=[nw] * 4)
    # official InsightTrainLoss: clamp [0, 0.999], smoothed target, weight by target
    target = y * (1 - ls) + 0.5 * ls
    weight = y * (pw - 1) + (1 - y) * (nw - 1) + 1
    official = F.binary_cross_entropy(p.clamp(0, 0.999), target, weight=weight)
    assert float(ours) == pytest.approx(float(official), rel=1e-6)
    cw = bce_loss(p, y, class_weights=[1.0, 2.0, 0.0, 1.0])
    manual = -(y * p.log() + (1 - y) * (1 - p).log()) * torch.tensor([1.0, 2.0, 0.0, 1.0])
    assert float(cw) == pytest.approx(float(manual.mean()), rel=1e-6)


def test_bce_clamp_keeps_the_loss_finite() -> None:
    p = torch.tensor([0.0, 1.0], requires_grad=True)
    loss = bce_loss(p, torch.tensor([1.0, 1.0]))
    loss.backward()
    assert math.isfinite(float(loss.detach())) and torch.isfinite(p.grad).all()
    # p = 1 is clamped at 0.999 as the official code does
    top = bce_loss(torch.tensor([1.0]), torch.tensor([1.0]))
    assert float(top) == pytest.approx(-math.log(0.999), rel=1e-4)


# --------------------------------------------------------------------------------------------
# the chunked, checkpointed forward
# --------------------------------------------------------------------------------------------
def _grads(model: InsightModel) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


def test_chunks_and_checkpointing_do_not_change_scores_or_gradients() -> None:
    torch.manual_seed(0)
    model = InsightModel(small_config(), backend="reference")
    tokens = torch.randn(30, 32, 8, 8)
    results = []
    for chunk, ckpt in ((1000, "never"), (7, "always"), (4, "auto")):
        model.zero_grad()
        scores, sd = slide_forward(
            model, tokens, None, chunk_size=chunk, grad_checkpoint=ckpt, train_threshold="slide"
        )
        (scores.sum() + sd).backward()
        results.append((scores.detach(), sd.detach(), _grads(model)))
    ref = results[0]
    for scores, sd, grads in results[1:]:
        torch.testing.assert_close(scores, ref[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(sd, ref[1], rtol=1e-5, atol=1e-6)
        for g, r in zip(grads, ref[2], strict=True):
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


def test_training_forward_equals_prediction_with_a_slide_threshold() -> None:
    torch.manual_seed(1)
    model = InsightModel(small_config(pooling="lse_lba"), backend="reference").eval()
    tokens = torch.randn(9, 32, 8, 8)
    mask = torch.rand(9, 8, 8) > 0.3
    with torch.no_grad():
        scores, _ = slide_forward(model, tokens, mask, chunk_size=2, train_threshold="slide")
    pred = model.predict(tokens, mask)
    torch.testing.assert_close(scores, pred.scores, rtol=1e-5, atol=1e-6)


def test_slide_context_bands_are_exact() -> None:
    """Row bands with a halo as deep as the context chain give the unchunked values."""
    torch.manual_seed(2)
    cfg = small_config(in_dim=12, grid=(1, 1), norm="channel", context="slide")
    model = InsightModel(cfg, backend="reference")
    grid = torch.randn(1, 12, 23, 9)
    mask = torch.rand(1, 23, 9) > 0.25
    outs = []
    for chunk, ckpt in ((10_000, "never"), (9, "always"), (20, "always")):
        model.zero_grad()
        s, sd = slide_forward(
            model, grid, mask, chunk_size=chunk, grad_checkpoint=ckpt, train_threshold="slide"
        )
        (s.sum() + sd).backward()
        outs.append((s.detach(), sd.detach(), _grads(model)))
    for s, sd, g in outs[1:]:
        torch.testing.assert_close(s, outs[0][0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(sd, outs[0][1], rtol=1e-5, atol=1e-6)
        for a, b in zip(g, outs[0][2], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        s, _ = slide_forward(model.eval(), grid, mask, chunk_size=9, train_threshold="slide")
    torch.testing.assert_close(s, model.predict(grid, mask).scores, rtol=1e-5, atol=1e-6)


def test_slide_forward_refuses_bad_inputs() -> None:
    model = InsightModel(small_config(), backend="reference")
    with pytest.raises(InputError, match="no tiles"):
        slide_forward(model, torch.zeros(0, 32, 8, 8), None)
    with pytest.raises(InputError, match="mask must be"):
        slide_forward(model, torch.zeros(2, 32, 8, 8), torch.ones(3, 8, 8, dtype=torch.bool))
    with pytest.raises(InputError, match="tissue mask is empty"):
        slide_forward(model, torch.zeros(2, 32, 8, 8), torch.zeros(2, 8, 8, dtype=torch.bool))
    slide_model = InsightModel(
        small_config(grid=(1, 1), norm="channel", context="slide"), backend="reference"
    )
    with pytest.raises(InputError, match="stitched grid"):
        slide_forward(slide_model, torch.zeros(3, 32, 1, 1), None)


# --------------------------------------------------------------------------------------------
# learning
# --------------------------------------------------------------------------------------------
def test_training_learns_the_planted_signal() -> None:
    bags, _ = cohort(n=36, tiles=12, seed=0)
    cfg = TrainConfig(epochs=6, lr=2e-3, val_fraction=0.25, patience=10, seed=0)
    model, history = train_on_bags(bags[:24], cfg, small_config())
    assert len(history) == 6
    val = [h.val_loss for h in history]
    assert val[-1] < 0.5 * val[0]
    # held-out slides with the same planted signal
    test_bags = bags[24:]
    scores = [float(model.predict(b.tokens).scores[0]) for b in test_bags]
    labels = [int(b.labels[0]) for b in test_bags]
    assert roc_auc(scores, labels) >= 0.9
    assert history[-1].val_auc[0] >= 0.9


def test_lse_lba_learns_beta() -> None:
    bags, _ = cohort(n=12, tiles=6, seed=2)
    cfg = TrainConfig(epochs=2, lr=5e-3, val_fraction=0.25, seed=0)
    model, history = train_on_bags(bags, cfg, small_config(pooling="lse_lba", lse_r0=2.0))
    beta = model.pooling.beta.detach()
    assert float(beta.abs().max()) > 1e-4
    assert history[-1].lse_beta is not None and history[-1].lse_beta[0] != 0.0


def test_early_stopping_keeps_the_best_epoch() -> None:
    bags, _ = cohort(n=8, tiles=4, seed=3)
    cfg = TrainConfig(epochs=6, lr=1e-3, val_fraction=0.25, patience=2, min_delta=100.0, seed=0)
    _, history = train_on_bags(bags, cfg, small_config())
    # nothing beats epoch 1 by 100: stop after `patience` epochs without improvement
    assert len(history) == 3
    assert [h.improved for h in history] == [True, False, False]


def test_resume_reaches_the_same_weights(tmp_path: Path) -> None:
    bags, _ = cohort(n=10, tiles=5, seed=4)
    mcfg = small_config(pooling="lse_lba")
    full = TrainConfig(epochs=4, lr=2e-3, val_fraction=0.3, patience=10, seed=7)
    half = TrainConfig(epochs=2, lr=2e-3, val_fraction=0.3, patience=10, seed=7)
    a, b = tmp_path / "a" / "m.safetensors", tmp_path / "b" / "m.safetensors"
    a.parent.mkdir()
    b.parent.mkdir()
    _, hist_a = train_on_bags(bags, full, mcfg, out_path=a)
    _, hist_half = train_on_bags(bags, half, mcfg, out_path=b)
    assert len(hist_half) == 2 and state_path_for(b).exists()
    model_b, hist_b = train_on_bags(bags, full, mcfg, out_path=b, resume=True)
    assert len(hist_b) == 4
    wa, wb = load_file(str(a)), load_file(str(b))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    sa = torch.load(state_path_for(a), weights_only=True)
    sb = torch.load(state_path_for(b), weights_only=True)
    for k in sa["model_state"]:
        assert torch.equal(sa["model_state"][k], sb["model_state"][k]), k
    for ha, hb in zip(hist_a, hist_b, strict=True):
        assert (ha.train_loss, ha.val_loss, ha.val_auc, ha.lse_beta) == (
            hb.train_loss,
            hb.val_loss,
            hb.val_auc,
            hb.lse_beta,
        )
    # a changed setting cannot resume
    with pytest.raises(CheckpointError, match="lr"):
        train_on_bags(
            bags,
            TrainConfig(epochs=5, lr=1e-2, val_fraction=0.3, seed=7),
            mcfg,
            out_path=b,
            resume=True,
        )
    with pytest.raises(CheckpointError, match="no training state"):
        train_on_bags(bags, full, mcfg, out_path=tmp_path / "none.safetensors", resume=True)


# --------------------------------------------------------------------------------------------
# splits and configuration
# --------------------------------------------------------------------------------------------
def test_stratified_split_is_seeded_and_stratified() -> None:
    ids = [f"s{i}" for i in range(20)]
    labels = [(1,) if i < 5 else (0,) for i in range(20)]
    tr, va = stratified_split(ids, labels, 0.2, seed=3)
    assert (tr, va) == stratified_split(ids, labels, 0.2, seed=3)
    assert len(va) == 4 and sum(1 for s in va if int(s[1:]) < 5) == 1
    assert set(tr) | set(va) == set(ids) and not set(tr) & set(va)
    assert stratified_split(ids, labels, 0.2, seed=4) != (tr, va)
    # a singleton stratum stays in training; tiny cohorts still get one validation slide
    tr, va = stratified_split(["a", "b", "c"], [(1,), (0,), (0,)], 0.1, seed=0)
    assert len(va) == 1 and "a" in tr
    assert stratified_split(["a"], [(1,)], 0.5, seed=0) == (["a"], [])


def test_train_config_validation() -> None:
    with pytest.raises(InputError, match="epochs"):
        TrainConfig(epochs=0)
    with pytest.raises(InputError, match="label_smoothing"):
        TrainConfig(label_smoothing=1.0)
    with pytest.raises(InputError, match="train_threshold"):
        TrainConfig(train_threshold="tile")
    assert TrainConfig(pos_weight=2.0).pos_weight == (2.0,)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="pos_weight has 2 values for 3 classes"):
        TrainConfig(pos_weight=(1.0, 2.0)).per_class("pos_weight", 3)


def test_bags_must_match_the_model() -> None:
    bags = [Bag(torch.randn(2, 32, 8, 8), None, torch.tensor([1.0, 0.0]), "x")]
    with pytest.raises(InputError, match="2 labels, the model has 1 classes"):
        train_on_bags(bags, TrainConfig(epochs=1), small_config())
    with pytest.raises(InputError, match="0 or 1"):
        train_on_bags(
            [(torch.randn(2, 32, 8, 8), None, 0.5)], TrainConfig(epochs=1), small_config()
        )


# --------------------------------------------------------------------------------------------
# training from a folder of feature files, through the CLI functions
# --------------------------------------------------------------------------------------------
def _trident_cohort(root: Path, n: int = 12, seed: int = 0) -> Path:
    """TRIDENT vector files: 5 x 4 tiles on a grid; positives carry a planted vector in 2 tiles."""
    rng = np.random.default_rng(seed)
    direction = rng.standard_normal(16)
    direction *= 4.0 / np.linalg.norm(direction)
    rc = np.array([(r, c) for r in range(5) for c in range(4)])
    lines = ["slide_id,tumor"]
    for i in range(n):
        pos = i % 2
        feats = rng.standard_normal((len(rc), 16)).astype(np.float32)
        if pos:
            feats[rng.choice(len(rc), 2, replace=False)] += direction
        write_trident(root / "feats" / f"slide{i:02d}.h5", feats, grid_coords(rc, 512, (512, 0)))
        lines.append(f"slide{i:02d},{pos}")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return root


def test_train_from_folder_via_the_cli(tmp_path: Path) -> None:
    root = _trident_cohort(tmp_path)
    out = tmp_path / "model.safetensors"
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(
        [
            str(root / "feats"),
            str(root / "labels.csv"),
            "--out",
            str(out),
            "--epochs",
            "3",
            "--lr",
            "3e-3",
            "--val-fraction",
            "0.34",
            "--pooling",
            "lse_lba",
            "--no-progress",
        ]
    )
    assert run(args) == 0
    model = load_model(out, device="cpu")
    cfg = model.config
    # geometry and encoder from the TRIDENT attributes, classes from the CSV header
    assert cfg.encoder == "uni_v1" and cfg.tile_size_px == 256 and cfg.target_mpp == 0.5
    assert cfg.class_names == ("tumor",) and cfg.pooling == "lse_lba"
    assert cfg.context == "slide" and cfg.norm == "channel" and cfg.grid_size == (1, 1)
    rows = list(csv.DictReader(open(out.with_suffix(".metrics.csv"))))
    assert len(rows) == 3 and "val_auc_tumor" in rows[0] and "lse_beta_tumor" in rows[0]
    assert len(json.loads(out.with_suffix(".metrics.json").read_text())) == 3
    assert state_path_for(out).exists()


def test_train_from_folder_needs_what_the_files_do_not_record(tmp_path: Path) -> None:
    feats = np.random.default_rng(0).standard_normal((3, 8, 4, 4)).astype(np.float32)
    for i in range(4):
        write_insight(
            tmp_path / "f" / f"s{i}.h5", feats, grid_coords(np.c_[[0, 0, 1], [0, 1, 0]], 64)
        )
    (tmp_path / "l.csv").write_text("slide_id,tumor\ns0,0\ns1,1\ns2,0\ns3,1\ns4,1\n")
    out = tmp_path / "m.safetensors"
    with pytest.raises(InputError, match="1 labelled slides have no feature file.*--skip-missing"):
        train_from_folder(tmp_path / "f", tmp_path / "l.csv", out, TrainConfig(epochs=1))
    with pytest.raises(InputError, match="--encoder --tile-size --mpp"):
        train_from_folder(
            tmp_path / "f", tmp_path / "l.csv", out, TrainConfig(epochs=1), skip_missing=True
        )
    result = train_from_folder(
        tmp_path / "f",
        tmp_path / "l.csv",
        out,
        TrainConfig(epochs=1, val_fraction=0.0),
        skip_missing=True,
        encoder="toy",
        tile_size_px=64,
        mpp=0.5,
        model_options={"reduce_dim": 8, "widths": (8, 8, 8)},
        progress=False,
    )
    assert result.model_config.grid_size == (4, 4) and result.model_config.norm == "tile"
    assert result.model_config.patch_size_px == 16 and result.val_ids == ()
    assert result.notes and "without features" in result.notes[0]
    assert load_model(out, device="cpu").config == result.model_config


def test_train_from_folder_uses_a_split_column(tmp_path: Path) -> None:
    root = _trident_cohort(tmp_path, n=6)
    lines = (root / "labels.csv").read_text().splitlines()
    split = ["train", "val", "train", "train", "val", "test"]
    text = "slide_id,tumor,split\n" + "\n".join(
        f"{ln},{s}" for ln, s in zip(lines[1:], split, strict=True)
    )
    (root / "labels.csv").write_text(text + "\n")
    result = train_from_folder(
        root / "feats",
        root / "labels.csv",
        tmp_path / "m.safetensors",
        TrainConfig(epochs=1),
        progress=False,
    )
    assert result.val_ids == ("slide01", "slide04")
    assert result.train_ids == ("slide00", "slide02", "slide03")


def test_train_cli_notes_go_to_stderr_not_stdout(tmp_path: Path, capsys) -> None:
    """A script reads ``train``'s stdout (the "wrote ..." line); notes are beside the errors."""
    from fastinsight.cli import main

    feats = np.random.default_rng(0).standard_normal((3, 8, 4, 4)).astype(np.float32)
    for i in range(4):
        write_insight(
            tmp_path / "f" / f"s{i}.h5", feats, grid_coords(np.c_[[0, 0, 1], [0, 1, 0]], 64)
        )
    (tmp_path / "l.csv").write_text("slide_id,tumor\ns0,0\ns1,1\ns2,0\ns3,1\ns4,1\n")
    argv = [
        "train", tmp_path / "f", tmp_path / "l.csv", "--out", tmp_path / "m.safetensors",
        "--skip-missing", "--encoder", "toy", "--tile-size", "64", "--mpp", "0.5",
        "--epochs", "1", "--val-fraction", "0", "--no-progress", "--device", "cpu",
    ]  # fmt: skip
    assert main([str(a) for a in argv]) == 0
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    assert not [line for line in lines if "note:" in line] and lines[-1].startswith("wrote "), out
    assert any(
        line.startswith("fastinsight: note: ") and "without features" in line
        for line in err.splitlines()
    ), err
