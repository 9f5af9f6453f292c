"""Slide-level training of INSIGHT: ``fastinsight train``.

As the paper and the official code train it (Zhang, Chen, Kanan, MLHC 2025; official
``train_pathology.py`` and ``losses/Insight_loss.py``), one slide at a time:

- the slide's tiles go through the head in chunks (``chunk_size`` tiles), each chunk under
  gradient checkpointing (``torch.utils.checkpoint``), so memory holds only the heatmap values;
- the dynamic threshold runs per chunk (``train_threshold="chunk"``, the official behaviour;
  ``"slide"`` thresholds the whole slide as evaluation does, ``"none"`` not at all). The threshold
  is computed on detached values and applied as ``H * (H > t)``, so gradients flow through the
  kept cells;
- the pooled slide probability ``p`` (any pooling of the family; LSE-LBA learns its ``beta``)
  enters a weighted BCE: ``p`` is clamped to ``[prob_floor, 0.999]``. The official code clamps to
  ``[0, 0.999]`` and lets PyTorch's BCE clamp ``log(0)`` to -100; the tiny floor here (1e-6) keeps
  ``log p`` finite by construction and changes nothing else. Labels may be smoothed
  (``y (1 - ls) + 0.5 ls``); per-sample weights follow the official loss
  (``pos_weight`` for positives, ``neg_weight`` for negatives), times optional ``class_weights``;
  the loss is the mean over classes;
- plus the spectral-decoupling penalty ``lambda / 2 * mean(D^2)`` over the detection logits of the
  slide's tissue cells (the official code sums per-chunk means, which depends on the chunking;
  the slide mean does not and equals it for one chunk).

Validation uses the evaluation path (``model.predict``: whole-slide threshold) and the official
validation loss (unweighted, unsmoothed BCE with the same clamp). Early stopping watches it; the
written model is the one with the lowest validation loss (without validation slides: the last).

Reproducibility: every random choice derives from ``seed`` (model init; the split; each epoch's
slide order comes from ``numpy.random.default_rng([seed, epoch])``), and the state written after
every epoch (``<out>.train.pt``: weights, best weights, optimizer, epoch, early-stopping counters,
history, split, RNG) lets ``resume=True`` continue to the same weights an uninterrupted run
reaches (bitwise on CPU; GPU convolutions may not be deterministic).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from fastinsight.atomic import atomic_path, check_writable
from fastinsight.errors import CheckpointError, InputError
from fastinsight.evaluate import Labels, read_labels, roc_auc
from fastinsight.features import (
    FeatureFileInfo,
    find_feature_files,
    inspect_features,
    read_features,
)
from fastinsight.models.config import InsightConfig
from fastinsight.models.insight import InsightModel
from fastinsight.ops.reference import gate
from fastinsight.text import dumps_json

STATE_FORMAT = "fastinsight.train/1"
# Fields of TrainConfig a resumed run may change.
RESUMABLE_CHANGES = frozenset({"epochs", "patience", "device"})
CACHE_LIMIT_BYTES = 4 << 30


# --------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainConfig:
    """How to train (the model's own settings live in ``InsightConfig``).

    ``pos_weight`` / ``neg_weight`` / ``class_weights``: one value per class, or one value for
    all. ``chunk_size``: tiles per checkpointed chunk (for the slide-context model: the band of
    grid rows holding about that many tiles' cells). ``grad_checkpoint``: ``"auto"`` checkpoints
    slides of more than one chunk, ``"always"``, or ``"never"``. ``accumulate``: slides per
    optimizer step.
    """

    epochs: int = 50
    lr: float = 2e-4
    weight_decay: float = 1e-4
    optimizer: str = "adamw"
    sd_lambda: float = 0.01
    label_smoothing: float = 0.0
    pos_weight: tuple[float, ...] = (1.0,)
    neg_weight: tuple[float, ...] = (1.0,)
    class_weights: tuple[float, ...] = (1.0,)
    prob_floor: float = 1e-6
    prob_ceiling: float = 0.999
    chunk_size: int = 512
    grad_checkpoint: str = "auto"
    train_threshold: str = "chunk"
    val_fraction: float = 0.2
    patience: int = 10
    min_delta: float = 0.0
    seed: int = 0
    accumulate: int = 1
    device: str = "auto"

    def __post_init__(self) -> None:
        for name in ("pos_weight", "neg_weight", "class_weights"):
            v = getattr(self, name)
            t = (float(v),) if isinstance(v, (int, float)) else tuple(float(x) for x in v)
            object.__setattr__(self, name, t)
        problems = []
        if self.epochs < 1:
            problems.append(f"epochs must be >= 1, got {self.epochs}")
        if not self.lr > 0:
            problems.append(f"lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            problems.append(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.optimizer not in ("adam", "adamw"):
            problems.append(f"optimizer must be 'adam' or 'adamw', got {self.optimizer!r}")
        if self.sd_lambda < 0:
            problems.append(f"sd_lambda must be >= 0, got {self.sd_lambda}")
        if not 0 <= self.label_smoothing < 1:
            problems.append(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        for name in ("pos_weight", "neg_weight", "class_weights"):
            v = getattr(self, name)
            if not v or any(not (x >= 0 and math.isfinite(x)) for x in v):
                problems.append(f"{name} must be finite values >= 0, got {v}")
        if not 0 < self.prob_floor < self.prob_ceiling <= 1:
            problems.append(
                f"need 0 < prob_floor < prob_ceiling <= 1, got {self.prob_floor}, {self.prob_ceiling}"
            )
        if self.chunk_size < 1:
            problems.append(f"chunk_size must be >= 1, got {self.chunk_size}")
        if self.grad_checkpoint not in ("auto", "always", "never"):
            problems.append(
                f"grad_checkpoint must be auto/always/never, got {self.grad_checkpoint!r}"
            )
        if self.train_threshold not in ("chunk", "slide", "none"):
            problems.append(
                f"train_threshold must be chunk/slide/none, got {self.train_threshold!r}"
            )
        if not 0 <= self.val_fraction < 1:
            problems.append(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.patience < 1:
            problems.append(f"patience must be >= 1, got {self.patience}")
        if self.accumulate < 1:
            problems.append(f"accumulate must be >= 1, got {self.accumulate}")
        if problems:
            raise InputError("invalid TrainConfig: " + "; ".join(problems))

    def per_class(self, name: str, k: int) -> tuple[float, ...]:
        v = getattr(self, name)
        if len(v) == 1:
            return v * k
        if len(v) != k:
            raise InputError(f"{name} has {len(v)} values for {k} classes; give 1 or {k}")
        return v

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


# --------------------------------------------------------------------------------------------
# bags
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Bag:
    """One training slide: its token grids, tissue mask and slide labels.

    Shapes: per-tile model: tokens ``[N, C, h, w]``, mask ``[N, h, w]`` bool or None (all
    tissue); slide-context model: tokens ``[1, C, H, W]`` (a stitched grid), mask ``[1, H, W]``.
    labels ``[K]`` float in {0, 1}.
    """

    tokens: Tensor
    mask: Tensor | None
    labels: Tensor
    slide_id: str = ""


@dataclass(frozen=True)
class _Item:
    """A training slide whose inputs load on demand (cached or read from disk each time)."""

    slide_id: str
    labels: Tensor
    load: Callable[[], tuple[Tensor, Tensor | None]]


def _constant(
    value: tuple[Tensor, Tensor | None],
) -> Callable[[], tuple[Tensor, Tensor | None]]:
    """A loader of inputs already in memory."""
    return lambda: value


def _as_labels(label: Any, k: int | None, where: str) -> Tensor:
    t = torch.as_tensor(label, dtype=torch.float32).reshape(-1)
    if k is not None and t.numel() != k:
        raise InputError(f"{where}: {t.numel()} labels, the model has {k} classes")
    if not bool(((t == 0) | (t == 1)).all()):
        raise InputError(f"{where}: labels must be 0 or 1, got {t.tolist()}")
    return t


# --------------------------------------------------------------------------------------------
# one slide through the model, in checkpointed chunks
# --------------------------------------------------------------------------------------------
def _context_halo(model: InsightModel) -> int:
    """Grid rows a band needs on each side so the 3x3 context chain is exact inside it."""
    return sum(
        1 for m in model.context_block if isinstance(m, torch.nn.Conv2d) and m.kernel_size[0] > 1
    )


def _chunks(
    model: InsightModel, tokens: Tensor, chunk_size: int
) -> list[tuple[int, int, int, int]]:
    """(input start, input stop, crop start, crop stop) along the chunked axis.

    Per-tile model: tiles, no halo. Slide-context model: row bands of about ``chunk_size`` tiles'
    cells with a halo as deep as the context chain, cropped back to the band: replication padding
    at a cut edge disturbs one more row per 3x3 layer, all inside the halo, so the band's values
    equal the unchunked ones.
    """
    if model.config.context == "tile":
        n = tokens.shape[0]
        return [
            (a, min(n, a + chunk_size), 0, min(n, a + chunk_size) - a)
            for a in range(0, n, chunk_size)
        ]
    h, w = model.config.grid_size
    rows, cols = tokens.shape[2], tokens.shape[3]
    band = max(1, (chunk_size * h * w) // max(1, cols))
    halo = _context_halo(model)
    out = []
    for r0 in range(0, rows, band):
        r1 = min(rows, r0 + band)
        a, b = max(0, r0 - halo), min(rows, r1 + halo)
        out.append((a, b, r0 - a, r1 - a))
    return out


def slide_forward(
    model: InsightModel,
    tokens: Tensor,
    mask: Tensor | None,
    *,
    chunk_size: int = 512,
    grad_checkpoint: str = "auto",
    train_threshold: str = "chunk",
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """Slide scores and mean squared detection logit, differentiably, in checkpointed chunks.

    Shapes: tokens ``[N, C, h, w]`` (per-tile model) or ``[1, C, H, W]`` (slide context), mask
    ``[N, h, w]`` / ``[1, H, W]`` bool or None -> (scores ``[K]``, mean(D^2) over tissue cells
    and classes, a scalar).
    """
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    slide_ctx = model.config.context == "slide"
    if tokens.ndim != 4:
        raise InputError(f"training tokens must be [N, C, h, w], got {tuple(tokens.shape)}")
    if slide_ctx and tokens.shape[0] != 1:
        raise InputError(
            f"the slide-context model trains on one stitched grid [1, C, H, W] per slide, got "
            f"{tuple(tokens.shape)}; stitch the tiles first (SlideFeatures.stitched())"
        )
    if tokens.shape[0] == 0:
        raise InputError("slide has no tiles: the bag of token grids is empty")
    if mask is None:
        mask = torch.ones(tokens.shape[0], *tokens.shape[2:], dtype=torch.bool)
    if tuple(mask.shape) != (tokens.shape[0], *tokens.shape[2:]):
        raise InputError(
            f"mask must be {(tokens.shape[0], *tokens.shape[2:])} for tokens "
            f"{tuple(tokens.shape)}, got {tuple(mask.shape)}"
        )
    chunks = _chunks(model, tokens, chunk_size)
    use_ckpt = torch.is_grad_enabled() and (
        grad_checkpoint == "always" or (grad_checkpoint == "auto" and len(chunks) > 1)
    )
    kept_parts: list[Tensor] = []
    raw_parts: list[Tensor] = []
    sq_total = torch.zeros((), device=dev)
    cells = 0
    for a, b, c0, c1 in chunks:
        if slide_ctx:
            x, m = tokens[:, :, a:b], mask[:, a:b]
        else:
            x, m = tokens[a:b], mask[a:b]
        if not bool(m.any()):
            continue
        x = x.to(dev, torch.float32, non_blocking=True)
        m = m.to(dev, non_blocking=True)

        def head(x: Tensor, m: Tensor, c0: int = c0, c1: int = c1) -> tuple[Tensor, Tensor]:
            d, cx = model.logits(x, m)
            if slide_ctx:
                d, cx, m = d[:, :, c0:c1], cx[:, :, c0:c1], m[:, c0:c1]
            sq = (d.float().square() * m[:, None]).sum()
            keep = m.reshape(-1)
            h = gate(d, cx).float().transpose(0, 1).reshape(d.shape[1], -1)[:, keep]
            return h, sq

        if use_ckpt:
            values, sq = checkpoint(head, x, m, use_reentrant=False)
        else:
            values, sq = head(x, m)
        if values.shape[1] == 0:
            continue
        sq_total = sq_total + sq
        cells += values.numel()
        if train_threshold == "chunk":
            t = model.threshold(values.detach(), None)
            values = values * (values > t[:, None])
            kept_parts.append(values)
        else:
            raw_parts.append(values)
    if cells == 0:
        raise InputError("the tissue mask is empty: no cell of the slide is tissue")
    if train_threshold == "chunk":
        kept = torch.cat(kept_parts, dim=1)
    else:
        kept = torch.cat(raw_parts, dim=1)
        if train_threshold == "slide":
            t = model.threshold(kept.detach(), None)
            kept = kept * (kept > t[:, None])
    scores = model.pool(kept, None)
    return scores, sq_total / cells


def bce_loss(
    scores: Tensor,
    labels: Tensor,
    *,
    floor: float = 1e-6,
    ceiling: float = 0.999,
    label_smoothing: float = 0.0,
    pos_weight: Sequence[float] | None = None,
    neg_weight: Sequence[float] | None = None,
    class_weights: Sequence[float] | None = None,
) -> Tensor:
    """The official INSIGHT BCE on pooled probabilities, mean over classes.

    ``p`` clamped to ``[floor, ceiling]`` (official: ``[0, 0.999]``; the floor keeps ``log p``
    finite), target ``y (1 - ls) + 0.5 ls``, weight ``pos_weight`` where y = 1 and ``neg_weight``
    where y = 0 (official ``InsightTrainLoss``), times ``class_weights``.
    Shapes: scores ``[K]``, labels ``[K]`` -> scalar.
    """
    p = scores.float().clamp(floor, ceiling)
    y = labels.to(p.device, torch.float32)
    target = y * (1.0 - label_smoothing) + 0.5 * label_smoothing
    k = p.shape[0]

    def vec(v: Sequence[float] | None) -> Tensor:
        return torch.ones(k, device=p.device) if v is None else torch.tensor(v, device=p.device)

    weight = y * vec(pos_weight) + (1 - y) * vec(neg_weight)
    weight = weight * vec(class_weights)
    bce = -(target * torch.log(p) + (1 - target) * torch.log1p(-p))
    return (weight * bce).mean()


# --------------------------------------------------------------------------------------------
# splits
# --------------------------------------------------------------------------------------------
def stratified_split(
    ids: Sequence[str], labels: Sequence[Sequence[int]], val_fraction: float, seed: int
) -> tuple[list[str], list[str]]:
    """Seeded split stratified by label pattern; each stratum keeps at least one train slide.

    Strata of one slide go to training. When rounding leaves validation empty although
    ``val_fraction > 0`` and there are >= 2 slides, the largest stratum gives one.
    """
    if val_fraction <= 0 or len(ids) < 2:
        return list(ids), []
    rng = np.random.default_rng(seed)
    strata: dict[tuple[int, ...], list[str]] = {}
    for sid, lab in zip(ids, labels, strict=True):
        strata.setdefault(tuple(int(v) for v in lab), []).append(sid)
    val: list[str] = []
    for key in sorted(strata):
        members = sorted(strata[key])
        rng.shuffle(members)
        n_val = min(len(members) - 1, int(math.floor(val_fraction * len(members) + 0.5)))
        val += members[: max(0, n_val)]
    if not val:
        biggest = max(sorted(strata), key=lambda k: len(strata[k]))
        members = sorted(strata[biggest])
        val = [members[int(rng.integers(len(members)))]]
    val_set = set(val)
    train = [s for s in ids if s not in val_set]
    return train, [s for s in ids if s in val_set]


# --------------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------
# the training loop
# --------------------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def _device(name: str) -> torch.device:
    from fastinsight.predict.slide import resolve_device

    return resolve_device(name)


def _optimizer(model: InsightModel, cfg: TrainConfig) -> torch.optim.Optimizer:
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return cls(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


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


@torch.no_grad()
def _validate(
    model: InsightModel, items: Sequence[_Item], cfg: TrainConfig, dev: torch.device
) -> tuple[float | None, tuple[float, ...]]:
    if not items:
        return None, tuple(math.nan for _ in range(model.config.num_classes))
    model.eval()
    losses, scores, labels = [], [], []
    for it in items:
        tokens, mask = it.load()
        tokens = tokens.to(dev, torch.float32)
        mask = None if mask is None else mask.to(dev)
        pred = model.predict(tokens, mask, chunk_size=max(cfg.chunk_size, 1))
        s = pred.scores.float()
        losses.append(float(bce_loss(s, it.labels, floor=cfg.prob_floor, ceiling=cfg.prob_ceiling)))
        scores.append(s.cpu().numpy())
        labels.append(it.labels.numpy())
    sc, lb = np.stack(scores), np.stack(labels).astype(int)
    aucs = tuple(roc_auc(sc[:, k], lb[:, k]) for k in range(sc.shape[1]))
    return float(np.mean(losses)), aucs


def _fit(
    train: Sequence[_Item],
    val: Sequence[_Item],
    mcfg: InsightConfig,
    cfg: TrainConfig,
    *,
    out_path: Path | None,
    resume: bool,
    progress: bool,
    log: Callable[[str], None] | None,
) -> tuple[InsightModel, _Progress]:
    if not train:
        raise InputError(
            "no training slides; give at least one labelled slide (and lower --val-fraction)"
        )
    dev = _device(cfg.device)
    k = mcfg.num_classes
    pos_w, neg_w, cls_w = (
        cfg.per_class(n, k) for n in ("pos_weight", "neg_weight", "class_weights")
    )
    train_ids = [it.slide_id for it in train]
    val_ids = [it.slide_id for it in val]
    state_path = state_path_for(out_path) if out_path is not None else None
    if out_path is not None:
        check_writable(out_path)
    seed_everything(cfg.seed)
    model = InsightModel(mcfg, backend="reference").to(dev)
    opt = _optimizer(model, cfg)
    prog = _Progress()
    if resume:
        if state_path is None:
            raise InputError("resume needs out_path: the training state lives next to the model")
        state = _load_state(state_path)
        _check_resume(state, cfg, mcfg, state_path)
        if list(state["train_ids"]) != train_ids or list(state["val_ids"]) != val_ids:
            raise CheckpointError(
                f"cannot resume from {str(state_path)!r}: the training/validation slides differ "
                "from the saved run's; start afresh without --resume"
            )
        model.load_state_dict(state["model_state"])
        opt.load_state_dict(state["optimizer_state"])
        prog = _Progress(
            epoch=int(state["epoch"]),
            best_val_loss=float(state["best_val_loss"]),
            best_epoch=int(state["best_epoch"]),
            bad_epochs=int(state["bad_epochs"]),
            stopped_early=bool(state["stopped_early"]),
            history=[EpochMetrics.from_dict(h) for h in state["history"]],
            best_state=state["best_state"],
        )
        torch.set_rng_state(state["torch_rng"])
        if log:
            log(f"resuming after epoch {prog.epoch} (best val loss {prog.best_val_loss:.4f})")
    csv_path, json_path = metrics_paths_for(out_path) if out_path is not None else (None, None)
    names = mcfg.names

    from tqdm.auto import tqdm

    while prog.epoch < cfg.epochs and not prog.stopped_early:
        epoch = prog.epoch
        t0 = time.perf_counter()
        model.train()
        order = np.random.default_rng([cfg.seed, epoch]).permutation(len(train))
        sums = np.zeros(3)
        opt.zero_grad(set_to_none=True)
        bar = tqdm(
            order.tolist(),
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            unit="slide",
            disable=None if progress else True,  # None: off when not a terminal
            leave=False,
        )
        for i, idx in enumerate(bar):
            it = train[idx]
            tokens, mask = it.load()
            scores, sd = slide_forward(
                model,
                tokens,
                mask,
                chunk_size=cfg.chunk_size,
                grad_checkpoint=cfg.grad_checkpoint,
                train_threshold=cfg.train_threshold,
                device=dev,
            )
            bce = bce_loss(
                scores,
                it.labels,
                floor=cfg.prob_floor,
                ceiling=cfg.prob_ceiling,
                label_smoothing=cfg.label_smoothing,
                pos_weight=pos_w,
                neg_weight=neg_w,
                class_weights=cls_w,
            )
            loss = bce + 0.5 * cfg.sd_lambda * sd
            group_start = (i // cfg.accumulate) * cfg.accumulate
            group = min(cfg.accumulate, len(order) - group_start)
            (loss / group).backward()
            if i - group_start == group - 1:
                opt.step()
                opt.zero_grad(set_to_none=True)
            sums += (float(loss.detach()), float(bce.detach()), float(sd.detach()))
            bar.set_postfix(loss=f"{sums[0] / (i + 1):.4f}")
        bar.close()
        val_loss, val_auc = _validate(model, val, cfg, dev)
        if val_loss is None:
            improved = True  # without validation slides the last epoch is kept
        else:
            improved = val_loss < prog.best_val_loss - cfg.min_delta
        if improved:
            prog.best_val_loss = val_loss if val_loss is not None else math.inf
            prog.best_epoch = epoch + 1
            prog.bad_epochs = 0
            prog.best_state = _cpu_state(model)
            if out_path is not None:
                model.save(str(out_path))
        else:
            prog.bad_epochs += 1
        beta = (
            tuple(float(b) for b in model.pooling.beta.detach().cpu())
            if mcfg.pooling == "lse_lba"
            else None
        )
        n = max(1, len(order))
        rec = EpochMetrics(
            epoch=epoch + 1,
            train_loss=float(sums[0] / n),
            train_bce=float(sums[1] / n),
            train_sd=float(sums[2] / n),
            val_loss=val_loss,
            val_auc=val_auc,
            lr=cfg.lr,
            seconds=time.perf_counter() - t0,
            improved=improved,
            lse_beta=beta,
        )
        prog.history.append(rec)
        prog.epoch = epoch + 1
        if val_loss is not None and prog.bad_epochs >= cfg.patience:
            prog.stopped_early = True
        if out_path is not None and state_path is not None and csv_path and json_path:
            _save_state(state_path, model, opt, prog, cfg, train_ids, val_ids)
            write_metrics(prog.history, names, csv_path, json_path)
        if log:
            aucs = " ".join(
                f"{nm}={a:.3f}" for nm, a in zip(names, val_auc, strict=False) if math.isfinite(a)
            )
            vl = "n/a" if val_loss is None else f"{val_loss:.4f}"
            log(
                f"epoch {epoch + 1}/{cfg.epochs}: train loss {rec.train_loss:.4f} "
                f"(bce {rec.train_bce:.4f}, sd {rec.train_sd:.3g}), val loss {vl}"
                + (f", val AUC {aucs}" if aucs else "")
                + (" *" if improved else "")
                + (f"; early stop (patience {cfg.patience})" if prog.stopped_early else "")
            )
    if prog.best_state is not None:
        model.load_state_dict(prog.best_state)
    model.eval()
    return model, prog


# --------------------------------------------------------------------------------------------
# in-memory training
# --------------------------------------------------------------------------------------------
def train_on_bags(
    bags: Sequence[Bag | tuple[Tensor, Tensor | None, Any]],
    config: TrainConfig,
    model_config: InsightConfig,
    *,
    val_bags: Sequence[Bag | tuple[Tensor, Tensor | None, Any]] | None = None,
    out_path: str | os.PathLike[str] | None = None,
    resume: bool = False,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> tuple[InsightModel, list[EpochMetrics]]:
    """Train on token grids already in memory (the demo's path).

    ``bags``: ``Bag`` or ``(tokens, mask, label)`` tuples (see ``Bag`` for shapes; a slide-context
    model takes one stitched grid per slide). Without ``val_bags`` a seeded stratified
    ``config.val_fraction`` of the bags validates. With ``out_path`` the best model, the metrics
    and the resume state are written as ``train_from_folder`` writes them.
    Returns the model with the best validation loss (eval mode) and the per-epoch history.
    """
    k = model_config.num_classes

    def items(seq: Sequence[Any], prefix: str) -> list[_Item]:
        out = []
        for i, b in enumerate(seq):
            bag = b if isinstance(b, Bag) else Bag(b[0], b[1], torch.as_tensor(b[2]))
            sid = bag.slide_id or f"{prefix}{i:05d}"
            labels = _as_labels(bag.labels, k, f"bag {sid}")
            out.append(_Item(sid, labels, _constant((bag.tokens, bag.mask))))
        return out

    all_items = items(bags, "bag")
    if len({it.slide_id for it in all_items}) != len(all_items):
        raise InputError("bags have duplicate slide ids; give each Bag a unique slide_id")
    if val_bags is not None:
        train, val = all_items, items(val_bags, "val")
    else:
        ids = [it.slide_id for it in all_items]
        labs = [tuple(int(v) for v in it.labels.tolist()) for it in all_items]
        tr_ids, va_ids = stratified_split(ids, labs, config.val_fraction, config.seed)
        by_id = {it.slide_id: it for it in all_items}
        train, val = [by_id[s] for s in tr_ids], [by_id[s] for s in va_ids]
    model, prog = _fit(
        train,
        val,
        model_config,
        config,
        out_path=Path(out_path) if out_path is not None else None,
        resume=resume,
        progress=progress,
        log=log,
    )
    return model, list(prog.history)


# --------------------------------------------------------------------------------------------
# training from a folder of feature files
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainResult:
    """What ``train_from_folder`` did and wrote."""

    model_path: Path
    state_path: Path
    metrics_csv: Path
    metrics_json: Path
    model_config: InsightConfig
    config: TrainConfig
    history: tuple[EpochMetrics, ...]
    best_epoch: int
    best_val_loss: float | None
    stopped_early: bool
    train_ids: tuple[str, ...]
    val_ids: tuple[str, ...]
    notes: tuple[str, ...] = ()
    model: InsightModel | None = field(default=None, repr=False, compare=False)


def _consistent(values: Mapping[str, Any], what: str, flag: str) -> Any:
    distinct = sorted({v for v in values.values() if v is not None}, key=str)
    if len(distinct) > 1:
        first = {v: next(s for s, x in values.items() if x == v) for v in distinct}
        shown = ", ".join(f"{v!r} ({s})" for v, s in list(first.items())[:3])
        raise InputError(
            f"feature files disagree on the {what}: {shown}; train on features of one "
            f"extraction, or pass {flag}"
        )
    return distinct[0] if distinct else None


def build_model_config(
    infos: Mapping[str, FeatureFileInfo],
    class_names: Sequence[str],
    *,
    encoder: str | None = None,
    tile_size_px: int | None = None,
    mpp: float | None = None,
    model_options: Mapping[str, Any] | None = None,
) -> InsightConfig:
    """The model's configuration from the features (C, grid, what the files record), the
    classes and the user's options.

    Token grids default to the official per-tile model (``norm="tile"``, ``context="tile"``);
    per-tile vectors to the grid-agnostic slide-context model (``norm="channel"``,
    ``context="slide"``: the context branch sees neighbouring tiles of the stitched grid).
    """
    in_dims = {s: i.in_dim for s, i in infos.items()}
    grids = {s: i.grid_size for s, i in infos.items()}
    in_dim = _consistent(in_dims, "feature dimension", "features of one encoder")
    grid = _consistent(grids, "token grid size", "features of one encoder")
    file_encoder = _consistent({s: i.encoder for s, i in infos.items()}, "encoder", "--encoder")
    file_tile = _consistent(
        {s: i.geometry.tile_size_px for s, i in infos.items()}, "tile size", "--tile-size"
    )
    file_mpp = _consistent({s: i.geometry.mpp for s, i in infos.items()}, "magnification", "--mpp")
    enc = encoder or file_encoder
    tile = tile_size_px or file_tile
    res = mpp or file_mpp
    missing = [
        flag for flag, v in (("--encoder", enc), ("--tile-size", tile), ("--mpp", res)) if v is None
    ]
    if missing:
        raise InputError(
            "the feature files do not record the "
            + ", ".join(m.lstrip("-") for m in missing)
            + " the model must carry (only TRIDENT records them); pass "
            + " ".join(missing)
        )
    vector = grid == (1, 1)
    base: dict[str, Any] = {
        "in_dim": int(in_dim),
        "num_classes": len(class_names),
        "grid_size": tuple(grid),
        "class_names": tuple(class_names),
        "norm": "channel" if vector else "tile",
        "context": "slide" if vector else "tile",
        "encoder": str(enc),
        "tile_size_px": int(tile),  # type: ignore[arg-type]
        "patch_size_px": max(1, int(tile) // int(grid[1])),  # type: ignore[arg-type]
        "target_mpp": float(res),  # type: ignore[arg-type]
    }
    opts = dict(model_options or {})
    fixed = sorted(set(opts) & {"in_dim", "num_classes", "grid_size", "class_names"})
    if fixed:
        raise InputError(f"model options {fixed} come from the data and the labels; drop them")
    unknown = sorted(set(opts) - {f.name for f in dataclasses.fields(InsightConfig)})
    if unknown:
        raise InputError(f"unknown model options {unknown}")
    base.update({k: v for k, v in opts.items() if v is not None})
    if base["context"] == "slide" and "norm" not in opts:
        base["norm"] = "channel"
    return InsightConfig(**base)


def train_from_folder(
    features_dir: str | os.PathLike[str],
    labels_csv: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    config: TrainConfig | None = None,
    *,
    model_options: Mapping[str, Any] | None = None,
    patches_dir: str | os.PathLike[str] | None = None,
    patch_size_l0: int | None = None,
    snap_to_grid: bool = False,
    encoder: str | None = None,
    tile_size_px: int | None = None,
    mpp: float | None = None,
    resume: bool = False,
    skip_missing: bool = False,
    cache: bool | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> TrainResult:
    """Train INSIGHT on a folder of feature files (any layout) and a labels CSV.

    Slides are matched by file stem. Labels CSV: ``slide_id,<class>,...`` with 0/1 values (the
    header's class names become the model's); an optional ``split`` column (train/val/test) fixes
    the split, else a seeded stratified ``config.val_fraction`` validates. ``model_options`` are
    ``InsightConfig`` fields (pooling, smoothmax_a, lse_r0, pool_input, norm, context, widths...).
    Writes ``out_path`` (safetensors with the config), ``<out>.train.pt`` (resume state),
    ``<out>.metrics.csv`` and ``<out>.metrics.json``.
    """
    cfg = config or TrainConfig()
    out = Path(out_path).expanduser()
    if out.suffix != ".safetensors":
        raise InputError(
            f"--out {str(out_path)!r} must end in .safetensors: training writes a fastinsight "
            "checkpoint (safetensors + config), with .train.pt and .metrics.* beside it"
        )
    check_writable(out)
    labels: Labels = read_labels(labels_csv)
    files = find_feature_files(features_dir)
    notes: list[str] = []
    wanted = [s for s in labels.slide_ids if labels.split.get(s) != "test"]
    missing = [s for s in wanted if s not in files]
    if missing and not skip_missing:
        raise InputError(
            f"{len(missing)} labelled slides have no feature file in {str(features_dir)!r} "
            f"(first: {missing[:3]}); add them, or pass --skip-missing to train without them"
        )
    if missing:
        notes.append(f"{len(missing)} labelled slides without features left out: {missing[:5]}")
    infos = {s: inspect_features(files[s]) for s in wanted if s in files}
    empty = sorted(s for s, i in infos.items() if i.num_tiles == 0)
    if empty:
        notes.append(f"{len(empty)} slides have no tiles and are left out: {empty[:5]}")
        infos = {s: i for s, i in infos.items() if i.num_tiles > 0}
    if not infos:
        raise InputError("no labelled slide with tiles to train on")
    unlabelled = sorted(set(files) - set(labels.slide_ids))
    if unlabelled:
        notes.append(
            f"{len(unlabelled)} feature files have no label and are left out: {unlabelled[:5]}"
        )
    for k, name in enumerate(labels.class_names):
        column = [labels.values[s][k] for s in infos]
        if len(infos) < 2 or min(column) == max(column):
            raise InputError(
                f"class {name!r}: the {len(infos)} training slides are all "
                f"{'positive' if column and column[0] else 'negative'}; slide-level training needs "
                "at least one positive and one negative slide per class"
            )
    mcfg = build_model_config(
        infos,
        labels.class_names,
        encoder=encoder,
        tile_size_px=tile_size_px,
        mpp=mpp,
        model_options=model_options,
    )
    patches = Path(patches_dir).expanduser() if patches_dir is not None else None
    if patches is not None and not patches.is_dir():
        raise InputError(f"patches folder {str(patches)!r} does not exist")

    def reader(sid: str) -> Callable[[], tuple[Tensor, Tensor | None]]:
        def load() -> tuple[Tensor, Tensor | None]:
            ph = None
            if patches is not None:
                ph = patches / f"{sid}.h5"
                if not ph.exists():
                    raise InputError(f"no CLAM patches file {str(ph)!r} for slide {sid!r}")
            sf = read_features(files[sid], patches_h5=ph, patch_size_l0=patch_size_l0)
            return sf.model_inputs(mcfg.context, snap=snap_to_grid)

        return load

    total = sum(i.nbytes_float32 for i in infos.values())
    use_cache = cache if cache is not None else total <= CACHE_LIMIT_BYTES
    item_of: dict[str, _Item] = {}
    for sid in infos:
        load = reader(sid)
        if use_cache:
            load = _constant(load())  # also checks every file (shapes, NaN, grid) up front
        lab = torch.tensor(labels.values[sid], dtype=torch.float32)
        item_of[sid] = _Item(sid, lab, load)
    ids = list(item_of)
    if labels.split and any(labels.split.get(s) in ("train", "val") for s in ids):
        tr_ids = [s for s in ids if labels.split.get(s, "train") == "train"]
        va_ids = [s for s in ids if labels.split.get(s) == "val"]
    else:
        tr_ids, va_ids = stratified_split(
            ids, [labels.values[s] for s in ids], cfg.val_fraction, cfg.seed
        )
    if log:
        log(
            f"{len(tr_ids)} training / {len(va_ids)} validation slides; model: {mcfg.in_dim} ch "
            f"{mcfg.grid_size[0]}x{mcfg.grid_size[1]} grid, norm={mcfg.norm}, "
            f"context={mcfg.context}, pooling={mcfg.pooling}, classes {list(mcfg.names)}"
        )
    model, prog = _fit(
        [item_of[s] for s in tr_ids],
        [item_of[s] for s in va_ids],
        mcfg,
        cfg,
        out_path=out,
        resume=resume,
        progress=progress,
        log=log,
    )
    if not out.exists():  # e.g. resumed a finished run whose model file was removed
        model.save(str(out))
    csv_path, json_path = metrics_paths_for(out)
    return TrainResult(
        model_path=out,
        state_path=state_path_for(out),
        metrics_csv=csv_path,
        metrics_json=json_path,
        model_config=mcfg,
        config=cfg,
        history=tuple(prog.history),
        best_epoch=prog.best_epoch,
        best_val_loss=None if not math.isfinite(prog.best_val_loss) else prog.best_val_loss,
        stopped_early=prog.stopped_early,
        train_ids=tuple(tr_ids),
        val_ids=tuple(va_ids),
        notes=tuple(notes),
        model=model,
    )


__all__ = [
    "Bag",
    "EpochMetrics",
    "TrainConfig",
    "TrainResult",
    "bce_loss",
    "build_model_config",
    "seed_everything",
    "slide_forward",
    "state_path_for",
    "stratified_split",
    "train_from_folder",
    "train_on_bags",
]
