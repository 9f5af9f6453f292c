"""What a training run keeps between epochs: the per-epoch metrics and the resume state
(``<out>.train.pt``), written after every epoch and checked before a resume."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fastinsight.atomic import atomic_path
from fastinsight.errors import CheckpointError
from fastinsight.models.config import InsightConfig
from fastinsight.models.insight import InsightModel
from fastinsight.text import dumps_json
from fastinsight.train.config import TrainConfig

STATE_FORMAT = "fastinsight.train/1"
# Fields of TrainConfig a resumed run may change.
RESUMABLE_CHANGES = frozenset({"epochs", "patience", "device"})


@dataclass(frozen=True)
class EpochMetrics:
    """One epoch: mean training loss (BCE + SD), validation loss and AUC per class."""

    epoch: int
    train_loss: float
    train_bce: float
    train_sd: float
    val_loss: float | None
    val_auc: tuple[float, ...]
    lr: float
    seconds: float
    improved: bool
    lse_beta: tuple[float, ...] | None = None

    def as_row(self, class_names: Sequence[str]) -> dict[str, Any]:
        row: dict[str, Any] = {
            "epoch": self.epoch,
            "train_loss": self.train_loss,
            "train_bce": self.train_bce,
            "train_sd": self.train_sd,
            "val_loss": self.val_loss,
        }
        for name, auc in zip(class_names, self.val_auc, strict=False):
            row[f"val_auc_{name}"] = None if not math.isfinite(auc) else auc
        if self.lse_beta is not None:
            for name, b in zip(class_names, self.lse_beta, strict=False):
                row[f"lse_beta_{name}"] = b
        row.update(lr=self.lr, seconds=self.seconds, improved=self.improved)
        return row

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EpochMetrics:
        return cls(
            epoch=int(d["epoch"]),
            train_loss=float(d["train_loss"]),
            train_bce=float(d["train_bce"]),
            train_sd=float(d["train_sd"]),
            val_loss=None if d["val_loss"] is None else float(d["val_loss"]),
            val_auc=tuple(float(x) for x in d["val_auc"]),
            lr=float(d["lr"]),
            seconds=float(d["seconds"]),
            improved=bool(d["improved"]),
            lse_beta=None if d.get("lse_beta") is None else tuple(float(x) for x in d["lse_beta"]),
        )


def write_metrics(
    history: Sequence[EpochMetrics], class_names: Sequence[str], csv_path: Path, json_path: Path
) -> None:
    """Per-epoch metrics as CSV and JSON (atomically)."""
    rows = [h.as_row(class_names) for h in history]
    with atomic_path(json_path) as tmp:
        tmp.write_text(
            dumps_json(rows, "metrics", nan_as_null=True, indent=2) + "\n", encoding="utf-8"
        )
    header = list(rows[0]) if rows else ["epoch"]
    with atomic_path(csv_path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=header)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if v is None else v) for k, v in r.items()})


def state_path_for(out_path: str | os.PathLike[str]) -> Path:
    """The resume sidecar next to a model file: ``model.safetensors`` -> ``model.train.pt``."""
    return Path(out_path).with_suffix(".train.pt")


def metrics_paths_for(out_path: str | os.PathLike[str]) -> tuple[Path, Path]:
    p = Path(out_path)
    return p.with_suffix(".metrics.csv"), p.with_suffix(".metrics.json")


@dataclass
class _Progress:
    """Mutable loop state, saved to the sidecar after every epoch."""

    epoch: int = 0
    best_val_loss: float = math.inf
    best_epoch: int = 0
    bad_epochs: int = 0
    stopped_early: bool = False
    history: list[EpochMetrics] = field(default_factory=list)
    best_state: dict[str, Tensor] | None = None


def _cpu_state(model: InsightModel) -> dict[str, Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _save_state(
    path: Path,
    model: InsightModel,
    opt: torch.optim.Optimizer,
    prog: _Progress,
    cfg: TrainConfig,
    train_ids: Sequence[str],
    val_ids: Sequence[str],
) -> None:
    state = {
        "format": STATE_FORMAT,
        "epoch": prog.epoch,
        "model_state": _cpu_state(model),
        "best_state": prog.best_state,
        "optimizer_state": opt.state_dict(),
        "best_val_loss": prog.best_val_loss,
        "best_epoch": prog.best_epoch,
        "bad_epochs": prog.bad_epochs,
        "stopped_early": prog.stopped_early,
        "history": [dataclasses.asdict(h) for h in prog.history],
        "train_config": cfg.to_json(),
        "model_config": model.config.to_json(),
        "train_ids": list(train_ids),
        "val_ids": list(val_ids),
        "torch_rng": torch.get_rng_state(),
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _load_state(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise CheckpointError(
            f"cannot resume: no training state {str(path)!r} (written next to the model after "
            "each epoch); start without --resume"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"cannot read training state {str(path)!r} ({first}); start afresh without --resume"
        ) from exc
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise CheckpointError(
            f"{str(path)!r} is not a fastinsight training state ({STATE_FORMAT}); start afresh"
        )
    return state


def _check_resume(
    state: Mapping[str, Any], cfg: TrainConfig, mcfg: InsightConfig, path: Path
) -> None:
    old = json.loads(state["train_config"])
    new = json.loads(cfg.to_json())
    changed = sorted(k for k in new if k not in RESUMABLE_CHANGES and old.get(k) != new[k])
    if changed:
        diffs = ", ".join(f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in changed)
        raise CheckpointError(
            f"cannot resume from {str(path)!r}: training settings changed ({diffs}); only "
            f"{sorted(RESUMABLE_CHANGES)} may change, or start afresh without --resume"
        )
    if InsightConfig.from_json(state["model_config"]) != mcfg:
        raise CheckpointError(
            f"cannot resume from {str(path)!r}: the model configuration differs from this run's "
            "(features, classes or model options changed); start afresh without --resume"
        )


def resume_progress(
    path: Path,
    model: InsightModel,
    opt: torch.optim.Optimizer,
    cfg: TrainConfig,
    train_ids: Sequence[str],
    val_ids: Sequence[str],
) -> _Progress:
    """Load the state at ``path`` into ``model`` and ``opt`` (and torch's RNG) and return the
    loop's progress, after checking that this run's settings and slides match the saved run's."""
    state = _load_state(path)
    _check_resume(state, cfg, model.config, path)
    if list(state["train_ids"]) != list(train_ids) or list(state["val_ids"]) != list(val_ids):
        raise CheckpointError(
            f"cannot resume from {str(path)!r}: the training/validation slides differ "
            "from the saved run's; start afresh without --resume"
        )
    model.load_state_dict(state["model_state"])
    opt.load_state_dict(state["optimizer_state"])
    torch.set_rng_state(state["torch_rng"])
    return _Progress(
        epoch=int(state["epoch"]),
        best_val_loss=float(state["best_val_loss"]),
        best_epoch=int(state["best_epoch"]),
        bad_epochs=int(state["bad_epochs"]),
        stopped_early=bool(state["stopped_early"]),
        history=[EpochMetrics.from_dict(h) for h in state["history"]],
        best_state=state["best_state"],
    )
