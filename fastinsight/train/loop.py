"""The training loop: epochs of slide-at-a-time steps, validation, early stopping, checkpoints.

Each epoch visits the training slides in the order ``numpy.random.default_rng([seed, epoch])``
gives, accumulates ``accumulate`` slides per optimizer step, validates on the evaluation path
(``model.predict``: whole-slide threshold) with the official validation loss, keeps the weights of
the lowest validation loss, and writes the resume state and the metrics after the epoch.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastinsight.atomic import atomic_outputs, check_writable
from fastinsight.errors import InputError
from fastinsight.evaluate.metrics import roc_auc
from fastinsight.models.config import InsightConfig
from fastinsight.models.insight import InsightModel
from fastinsight.train.config import TrainConfig
from fastinsight.train.data import _Item
from fastinsight.train.loss import bce_loss, slide_forward
from fastinsight.train.state import (
    EpochMetrics,
    _cpu_state,
    _Progress,
    _save_state,
    metrics_paths_for,
    resume_progress,
    state_path_for,
    write_metrics,
)


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (CPU and CUDA). Process-wide: the training entry points
    call it inside :func:`kept_global_rng`, which gives the caller's generators back."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def _pending_cuda_seeds() -> tuple[Any, Any, list[Any]] | None:
    """The seeds torch queued for CUDA's first use (``torch.manual_seed`` before CUDA is
    initialised seeds it lazily), or None when torch keeps no such queue."""
    tracker = getattr(torch.cuda, "_lazy_seed_tracker", None)
    if tracker is None or not hasattr(tracker, "call_order"):
        return None
    return tracker.manual_seed_all_cb, tracker.manual_seed_cb, list(tracker.call_order)


def _give_back_cuda_seeds(pending: tuple[Any, Any, list[Any]] | None) -> None:
    """CUDA was not initialised on entry: put back the caller's queued seeds (ours replaced
    them). If the run initialised CUDA, its generators started from our seed: reset them to
    what the caller's first use would have given (torch's default seed, then the caller's
    queued seeds)."""
    if pending is None:
        return
    if not torch.cuda.is_initialized():
        tracker = torch.cuda._lazy_seed_tracker  # type: ignore[attr-defined]
        tracker.manual_seed_all_cb, tracker.manual_seed_cb, tracker.call_order = pending
        return
    default_seed = torch.Generator().initial_seed()  # a fresh generator's seed, CUDA's too
    for i in range(torch.cuda.device_count()):
        torch.cuda.default_generators[i].manual_seed(default_seed)
    for queued in pending[2]:
        if queued:
            queued[0]()


@contextmanager
def kept_global_rng() -> Iterator[None]:
    """Give the caller's global random generators back on exit (normal or by an exception):
    Python's ``random``, numpy's global ``np.random`` and torch's CPU and CUDA generators.

    Training seeds them all (:func:`seed_everything`), which is what makes a run reproducible;
    a library call must not leave them reseeded (a caller's random hyper-parameter search would
    draw the same values after every run). Inside, nothing changes: the run is exactly as
    seeded as without it.
    """
    py_state = random.getstate()
    np_state = np.random.get_state()
    cpu_state = torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    pending = None if cuda_states is not None else _pending_cuda_seeds()
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_rng_state(cpu_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
        else:
            _give_back_cuda_seeds(pending)


def _device(name: str) -> torch.device:
    from fastinsight.inputs import resolve_device

    return resolve_device(name)


def _optimizer(model: InsightModel, cfg: TrainConfig) -> torch.optim.Optimizer:
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return cls(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


@torch.no_grad()
def _validate(
    model: InsightModel, items: Sequence[_Item], cfg: TrainConfig, dev: torch.device
) -> tuple[float | None, tuple[float, ...]]:
    """Mean official validation loss (unweighted, unsmoothed BCE) and AUC per class."""
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


@dataclass(frozen=True)
class _Run:
    """What every epoch of one run shares. ``save_model`` writes the model when an epoch improved
    (None: the run writes no model)."""

    model: InsightModel
    opt: torch.optim.Optimizer
    cfg: TrainConfig
    dev: torch.device
    weights: tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]  # pos, neg, class
    save_model: Callable[[InsightModel], None] | None
    progress: bool


def _train_epoch(run: _Run, train: Sequence[_Item], epoch: int) -> np.ndarray:
    """One pass over the training slides; returns the mean (loss, BCE, SD penalty).

    Loss per slide: ``BCE + sd_lambda / 2 * mean(D^2)``; the gradients of ``accumulate``
    consecutive slides are averaged into one optimizer step (a short last group averages fewer).
    """
    from tqdm.auto import tqdm

    cfg, model, opt = run.cfg, run.model, run.opt
    pos_w, neg_w, cls_w = run.weights
    model.train()
    order = np.random.default_rng([cfg.seed, epoch]).permutation(len(train))
    sums = np.zeros(3)
    opt.zero_grad(set_to_none=True)
    bar = tqdm(
        order.tolist(),
        desc=f"epoch {epoch + 1}/{cfg.epochs}",
        unit="slide",
        disable=None if run.progress else True,  # None: off when not a terminal
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
            device=run.dev,
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
    return sums / max(1, len(order))


def _end_epoch(
    run: _Run,
    prog: _Progress,
    means: np.ndarray,
    val: tuple[float | None, tuple[float, ...]],
    seconds: float,
) -> EpochMetrics:
    """Early-stopping bookkeeping after an epoch: keep (and write) the weights when the
    validation loss improved by more than ``min_delta`` (every epoch without validation slides),
    count the epochs without improvement, stop after ``patience`` of them."""
    cfg, model = run.cfg, run.model
    val_loss, val_auc = val
    if val_loss is None:
        improved = True  # without validation slides the last epoch is kept
    else:
        improved = val_loss < prog.best_val_loss - cfg.min_delta
    if improved:
        prog.best_val_loss = val_loss if val_loss is not None else math.inf
        prog.best_epoch = prog.epoch + 1
        prog.bad_epochs = 0
        prog.best_state = _cpu_state(model)
        if run.save_model is not None:
            run.save_model(model)
    else:
        prog.bad_epochs += 1
    beta = (
        tuple(float(b) for b in model.pooling.beta.detach().cpu())
        if model.config.pooling == "lse_lba"
        else None
    )
    rec = EpochMetrics(
        epoch=prog.epoch + 1,
        train_loss=float(means[0]),
        train_bce=float(means[1]),
        train_sd=float(means[2]),
        val_loss=val_loss,
        val_auc=val_auc,
        lr=cfg.lr,
        seconds=seconds,
        improved=improved,
        lse_beta=beta,
    )
    prog.history.append(rec)
    prog.epoch += 1
    if val_loss is not None and prog.bad_epochs >= cfg.patience:
        prog.stopped_early = True
    return rec


def _epoch_line(rec: EpochMetrics, names: Sequence[str], cfg: TrainConfig, stopped: bool) -> str:
    aucs = " ".join(
        f"{nm}={a:.3f}" for nm, a in zip(names, rec.val_auc, strict=False) if math.isfinite(a)
    )
    vl = "n/a" if rec.val_loss is None else f"{rec.val_loss:.4f}"
    return (
        f"epoch {rec.epoch}/{cfg.epochs}: train loss {rec.train_loss:.4f} "
        f"(bce {rec.train_bce:.4f}, sd {rec.train_sd:.3g}), val loss {vl}"
        + (f", val AUC {aucs}" if aucs else "")
        + (" *" if rec.improved else "")
        + (f"; early stop (patience {cfg.patience})" if stopped else "")
    )


def _save_checkpoint(model: InsightModel, path: Path) -> None:
    """The slide trainer's model file: fastinsight's own checkpoint (``InsightModel.save``)."""
    model.save(str(path))


@kept_global_rng()
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
    build_model: Callable[[], InsightModel] | None = None,
    run_config: TrainConfig | None = None,
    save_model: Callable[[InsightModel], None] | None = None,
) -> tuple[InsightModel, _Progress]:
    """Train a fresh (or resumed) model; returns it with the best weights, in eval mode.

    With ``out_path`` each epoch's model (when it improved), resume state
    ``state_path_for(out_path)`` and metrics ``metrics_paths_for(out_path)`` are renamed into
    place together, and ``resume`` continues from that state after ``resume_progress`` checked
    it. ``cfg`` is the run's settings as the state records them and the epoch lines report them.

    The hooks let the volume trainer (``fastinsight.volume.train``) run these epochs on its own
    models: ``build_model`` makes the untrained model (default ``InsightModel(mcfg)`` on the
    reference backend), seeded by ``cfg.seed``; ``run_config`` is what the epochs train and
    validate with (default ``cfg``; it may differ only in how they run, e.g. a larger
    ``chunk_size``); ``save_model`` writes the improved model, only with an ``out_path``
    (default: the slide checkpoint at ``out_path``).

    Seeds the global generators for the run (:func:`seed_everything`) and gives the caller's
    back when it returns or fails (:func:`kept_global_rng`; the public entry points hold them
    too, so nothing they do before the epochs reseeds them either).
    """
    if not train:
        raise InputError(
            "no training slides; give at least one labelled slide (and lower --val-fraction)"
        )
    dev = _device(cfg.device)
    k = mcfg.num_classes
    weights = tuple(cfg.per_class(n, k) for n in ("pos_weight", "neg_weight", "class_weights"))
    train_ids = [it.slide_id for it in train]
    val_ids = [it.slide_id for it in val]
    if out_path is not None:
        check_writable(out_path)
    seed_everything(cfg.seed)
    if build_model is None:
        build_model = partial(InsightModel, mcfg, backend="reference")
    model = build_model().to(dev)
    opt = _optimizer(model, cfg)
    run_cfg = cfg if run_config is None else run_config
    if out_path is None:
        save_model = None
    elif save_model is None:
        save_model = partial(_save_checkpoint, path=out_path)
    run = _Run(model, opt, run_cfg, dev, weights, save_model, progress)  # type: ignore[arg-type]
    prog = _Progress()
    if resume:
        if out_path is None:
            raise InputError("resume needs out_path: the training state lives next to the model")
        prog = resume_progress(state_path_for(out_path), model, opt, cfg, train_ids, val_ids)
        if log:
            log(f"resuming after epoch {prog.epoch} (best val loss {prog.best_val_loss:.4f})")
    while prog.epoch < cfg.epochs and not prog.stopped_early:
        t0 = time.perf_counter()
        means = _train_epoch(run, train, prog.epoch)
        val_result = _validate(model, val, run_cfg, dev)
        # The epoch's model (when improved), resume state and metrics are renamed into place
        # together: an interrupt or a full disk leaves the previous epoch's set, never a model
        # of one epoch beside the state of another.
        with atomic_outputs():
            rec = _end_epoch(run, prog, means, val_result, time.perf_counter() - t0)
            if out_path is not None:
                _save_state(state_path_for(out_path), model, opt, prog, cfg, train_ids, val_ids)
                write_metrics(prog.history, mcfg.names, *metrics_paths_for(out_path))
        if log:
            log(_epoch_line(rec, mcfg.names, cfg, prog.stopped_early))
    if prog.best_state is not None:
        model.load_state_dict(prog.best_state)
    model.eval()
    return model, prog


__all__ = ["kept_global_rng", "seed_everything"]
