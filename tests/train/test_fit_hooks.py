"""The hooks of the one epoch loop (``fastinsight.train.loop._fit``) that the volume trainer runs
through: its own model, a run config that differs in how the epochs run, its own model file."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from fastinsight.models.insight import InsightModel
from fastinsight.train import TrainConfig, loop, state_path_for
from fastinsight.train.data import _Item, items_from_bags
from fastinsight.train.loop import _fit, _Run, _train_epoch
from tests.support.synth_cohort import cohort, small_config


def test_hooks_build_run_and_save_the_callers_model(tmp_path: Path, monkeypatch) -> None:
    mcfg = small_config(in_dim=8, grid=(4, 4))
    bags, _ = cohort(n=6, tiles=2, c=8, g=4, lesion=2)
    train, val = items_from_bags(bags[:4], 1, "t"), items_from_bags(bags[4:], 1, "v")
    cfg = TrainConfig(epochs=3, lr=3e-3, patience=3, device="cpu", chunk_size=1)
    run_cfg = dataclasses.replace(cfg, chunk_size=64)
    built: list[InsightModel] = []
    saved: list[int] = []
    seen: list[int] = []

    def build() -> InsightModel:
        built.append(InsightModel(mcfg, backend="reference"))
        return built[-1]

    def save(model: InsightModel) -> None:
        assert model is built[0]
        saved.append(len(saved))

    def epoch(run: _Run, items: Sequence[_Item], n: int) -> np.ndarray:
        seen.append(run.cfg.chunk_size)
        return _train_epoch(run, items, n)

    monkeypatch.setattr(loop, "_train_epoch", epoch)
    out = tmp_path / "m.safetensors"
    model, prog = _fit(
        train,
        val,
        mcfg,
        cfg,
        out_path=out,
        resume=False,
        progress=False,
        log=None,
        build_model=build,
        run_config=run_cfg,
        save_model=save,
    )
    assert model is built[0] and len(built) == 1 and not model.training
    assert seen == [64, 64, 64]  # the epochs run with run_config...
    state = torch.load(state_path_for(out), weights_only=True)
    assert state["train_config"] == cfg.to_json()  # ...the state records the caller's config
    # The caller's save replaces the slide checkpoint, once per improved epoch.
    assert len(saved) == sum(r.improved for r in prog.history) >= 1
    assert not out.exists()
    assert {p.name for p in tmp_path.iterdir()} == {"m.train.pt", "m.metrics.csv", "m.metrics.json"}

    # Without an out_path nothing is saved, the caller's save neither.
    saved.clear()
    built.clear()
    _fit(
        train,
        val,
        mcfg,
        cfg,
        out_path=None,
        resume=False,
        progress=False,
        log=None,
        build_model=build,
        save_model=save,
    )
    assert saved == []
