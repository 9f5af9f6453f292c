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
from fastinsight.inputs import check_input_path
from fastinsight.models.statefiles import bad_tensor
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


# What ``train_radiograph_model`` writes after every epoch, and the type of each entry.
_STATE_TYPES: dict[str, tuple[type, ...]] = {
    "config": (dict,),
    "model": (dict,),
    "optimizer": (dict,),
    "best_model": (dict,),
    "epoch": (int,),
    "best_epoch": (int,),
    "best_val_loss": (float, int),
    "history": (list,),
}


def _damaged(path: Path, what: str) -> CheckpointError:
    return CheckpointError(
        f"training state {str(path)!r} is damaged: {what}; it was left as it is: delete it (or "
        "pass another state_path) to start afresh"
    )


def _read_state(path: Path, cfg: RadiographTrainConfig, device: torch.device) -> dict[str, Any]:
    """Read a resume state safely (``weights_only``: tensors and plain containers, never code)
    and check its layout, its settings and that every weight and Adam moment is finite.

    A NaN there survives every later step, so a resumed run would only fail at its first score.
    """
    check_input_path(path, "training state", CheckpointError)  # a FIFO would block torch.load
    try:
        saved = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # truncated zip, foreign pickle, another file format
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"cannot read training state {str(path)!r} ({first[:200]}); the file is damaged or "
            "not a radiograph training state: delete it (or pass another state_path)"
        ) from None
    if not isinstance(saved, dict) or not set(_STATE_TYPES) <= set(saved):
        found = sorted(map(str, saved)) if isinstance(saved, dict) else type(saved).__name__
        raise CheckpointError(
            f"{str(path)!r} is not a radiograph training state (expected the keys "
            f"{sorted(_STATE_TYPES)}, found {found}); pass another state_path"
        )
    for key, types in _STATE_TYPES.items():
        if not isinstance(saved[key], types) or isinstance(saved[key], bool):
            raise _damaged(path, f"{key!r} is a {type(saved[key]).__name__}")
    if saved["config"] != asdict(cfg):
        raise CheckpointError(
            f"{str(path)!r} was written with other training settings "
            f"{saved.get('config')}; delete it or use the same settings"
        )
    if saved["epoch"] < 0 or saved["best_val_loss"] != saved["best_val_loss"]:
        raise _damaged(path, f"epoch {saved['epoch']}, best_val_loss {saved['best_val_loss']}")
    opt_state = saved["optimizer"].get("state")
    if not isinstance(opt_state, dict):
        raise _damaged(path, "'optimizer' is not an optimizer state_dict")
    named = [(f"{w}[{k!r}]", v) for w in ("model", "best_model") for k, v in saved[w].items()]
    for pid, moments in opt_state.items():
        if not isinstance(moments, dict):
            raise _damaged(path, f"optimizer state {pid!r} is not a dict")
        named += [(f"optimizer['state'][{pid!r}][{k!r}]", v) for k, v in moments.items()]
    problem = bad_tensor(named)
    if problem is not None:
        raise _damaged(path, problem)
    return saved


def _load_into(saved: dict[str, Any], model: Any, opt: torch.optim.Optimizer, path: Path) -> None:
    """Load the checked state into ``model`` and ``opt``; a state of another architecture (names,
    shapes, parameter count) is a CheckpointError, not a traceback."""
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for where in ("model", "best_model"):
        got = {k: tuple(v.shape) for k, v in saved[where].items()}
        if got != shapes:
            other = sorted(set(got) ^ set(shapes)) or sorted(k for k in got if got[k] != shapes[k])
            raise CheckpointError(
                f"cannot resume from {str(path)!r}: its {where} is for another model (first "
                f"differing keys {other[:3]}); delete it (or pass another state_path)"
            )
    try:
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"cannot resume from {str(path)!r}: {first[:200]}; delete it (or pass another "
            "state_path)"
        ) from None
    params = [p for g in opt.param_groups for p in g["params"]]
    for p in params:  # Adam's moments must have their parameter's shape, or step() fails later
        for name, t in opt.state.get(p, {}).items():
            if isinstance(t, Tensor) and t.dim() > 0 and t.shape != p.shape:
                raise CheckpointError(
                    f"cannot resume from {str(path)!r}: optimizer moment {name!r} has shape "
                    f"{list(t.shape)}, its parameter {list(p.shape)}; delete it (or pass "
                    "another state_path)"
                )


def train_radiograph_model(
    model: Any,
    train: tuple[Tensor, Tensor],
    val: tuple[Tensor, Tensor],
    config: RadiographTrainConfig | None = None,
    *,
    state_path: str | os.PathLike[str] | None = None,
    log: Callable[[str], None] | None = None,
) -> TrainResult:
    """Train in place. ``train``/``val``: normalised images ``[N, 1, S, S]``, labels ``[N, K]``.

    The run seeds torch's global generator from ``config.seed`` and gives the caller's global
    random generators back when it returns or fails
    (:func:`~fastinsight.train.loop.kept_global_rng`)."""
    # Imported here: the slide trainer's modules are not loaded for radiograph work otherwise.
    from fastinsight.train.loop import kept_global_rng

    with kept_global_rng():
        return _train(model, train, val, config, state_path=state_path, log=log)


def _train(
    model: Any,
    train: tuple[Tensor, Tensor],
    val: tuple[Tensor, Tensor],
    config: RadiographTrainConfig | None,
    *,
    state_path: str | os.PathLike[str] | None,
    log: Callable[[str], None] | None,
) -> TrainResult:
    """:func:`train_radiograph_model` without giving the generators back."""
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
    if state_path is not None and Path(state_path).exists():
        saved = _read_state(Path(state_path), cfg, device)
        _load_into(saved, model, opt, Path(state_path))
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
