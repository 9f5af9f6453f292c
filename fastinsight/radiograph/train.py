"""Training radiograph models on image labels only (multi-label BCE), seeded and resumable.

Losses, as each paper trains:

- **PYLON**: ``BCE-with-logits(max_{h,w} logits, y)`` (the official ``AdaptiveMaxPool2d`` on the
  logit map, then ``BCEWithLogitsLoss``).
- **Yao et al. (multires)**: with the map as probabilities (default),
  ``BCE(clamp(LSE-LBA(sigmoid(s)), eps, 1 - eps), y)``; with the logit map,
  ``BCE-with-logits(LSE-LBA(s), y)``. ``beta`` is learnt with the network.

Adam, a fixed seed (weights, batch order: the order of epoch ``e`` comes from ``seed + e``, so a
resumed run sees the same batches), early stopping on the validation loss with ``patience``, the
best weights restored at the end. With ``state_path`` the full state (weights, optimiser, epoch,
best weights, history) is written atomically after every epoch and a later call resumes from it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from fastinsight.atomic import atomic_path
from fastinsight.errors import CheckpointError, InputError
from fastinsight.ops.pooling import lse_lba


@dataclass(frozen=True)
class RadiographTrainConfig:
    epochs: int = 20
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.0
    patience: int = 5
    seed: int = 0
    device: str = "cpu"


@dataclass
class TrainResult:
    epochs_run: int
    best_epoch: int
    best_val_loss: float
    history: list[dict[str, float]] = field(default_factory=list)
    resumed_from: int = 0


def image_loss(model: Any, logits: Tensor, targets: Tensor) -> Tensor:
    """The paper's loss for ``model``'s family. Shapes: logits ``[B, K, h, w]``, targets ``[B, K]``."""
    y = targets.float()
    if model.family == "pylon":
        return F.binary_cross_entropy_with_logits(logits.amax(dim=(-2, -1)), y)
    if model.family == "multires":
        b, k = logits.shape[:2]
        r = model.sharpness.repeat(b)
        if model.config.map_is_prob:
            p = lse_lba(torch.sigmoid(logits).reshape(b * k, -1), None, r).reshape(b, k)
            eps = model.config.prob_eps
            return F.binary_cross_entropy(p.clamp(eps, 1.0 - eps), y)
        pooled = lse_lba(logits.reshape(b * k, -1), None, r).reshape(b, k)
        return F.binary_cross_entropy_with_logits(pooled, y)
    raise InputError(f"no training loss for model family {model.family!r}")


def _evaluate_loss(model: Any, x: Tensor, y: Tensor, batch: int, device: torch.device) -> float:
    model.eval()
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            xb, yb = x[i : i + batch].to(device), y[i : i + batch].to(device)
            total += float(image_loss(model, model(xb), yb)) * len(xb)
    return total / len(x)


def train_radiograph_model(
    model: Any,
    train: tuple[Tensor, Tensor],
    val: tuple[Tensor, Tensor],
    config: RadiographTrainConfig | None = None,
    *,
    state_path: str | os.PathLike[str] | None = None,
    log: Callable[[str], None] | None = None,
) -> TrainResult:
    """Train in place. ``train``/``val``: normalised images ``[N, 1, S, S]``, labels ``[N, K]``."""
    cfg = config or RadiographTrainConfig()
    x_tr, y_tr = train
    x_va, y_va = val
    if len(x_tr) == 0 or len(x_va) == 0:
        raise InputError("training needs at least one training and one validation image")
    if y_tr.shape[1] != model.config.num_classes:
        raise InputError(
            f"labels have {y_tr.shape[1]} classes; the model has {model.config.num_classes}"
        )
    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    model.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    result = TrainResult(epochs_run=0, best_epoch=-1, best_val_loss=float("inf"))
    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    start = 0
    if state_path is not None and Path(state_path).is_file():
        saved = torch.load(state_path, map_location=device, weights_only=True)
        if saved.get("config") != asdict(cfg):
            raise CheckpointError(
                f"{str(state_path)!r} was written with other training settings "
                f"{saved.get('config')}; delete it or use the same settings"
            )
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        best_state = saved["best_model"]
        start = int(saved["epoch"])
        result = TrainResult(
            epochs_run=start,
            best_epoch=int(saved["best_epoch"]),
            best_val_loss=float(saved["best_val_loss"]),
            history=list(saved["history"]),
            resumed_from=start,
        )
    for epoch in range(start, cfg.epochs):
        if epoch - result.best_epoch > cfg.patience and result.best_epoch >= 0:
            break
        model.train()
        order = torch.randperm(len(x_tr), generator=torch.Generator().manual_seed(cfg.seed + epoch))
        total = 0.0
        for i in range(0, len(order), cfg.batch_size):
            idx = order[i : i + cfg.batch_size]
            if len(idx) < 2:  # BatchNorm needs more than one sample per batch
                continue
            xb, yb = x_tr[idx].to(device), y_tr[idx].to(device)
            loss = image_loss(model, model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        val_loss = _evaluate_loss(model, x_va, y_va, cfg.batch_size, device)
        result.history.append(
            {"epoch": epoch, "train_loss": total / len(x_tr), "val_loss": val_loss}
        )
        result.epochs_run = epoch + 1
        if val_loss < result.best_val_loss:
            result.best_val_loss, result.best_epoch = val_loss, epoch
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if log is not None:
            log(f"epoch {epoch}: train loss {total / len(x_tr):.4f}, val loss {val_loss:.4f}")
        if state_path is not None:
            state = {
                "config": asdict(cfg),
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "best_model": best_state,
                "epoch": epoch + 1,
                "best_epoch": result.best_epoch,
                "best_val_loss": result.best_val_loss,
                "history": result.history,
            }
            with atomic_path(state_path) as tmp:
                torch.save(state, tmp)
    model.load_state_dict(best_state)
    model.eval()
    return result


__all__ = ["RadiographTrainConfig", "TrainResult", "image_loss", "train_radiograph_model"]
