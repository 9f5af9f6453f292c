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

Modules: config (TrainConfig, FolderOptions), data (Bag, split, model configuration), folder
(feature folder -> slides), loss (chunked slide forward, BCE), state (metrics, resume state),
loop (epochs), api (train_on_bags, train_from_folder).

May import: ``fastinsight.errors``, ``atomic``, ``inputs``, ``text``, ``ops``, ``models``,
``features``, ``predict`` (feature-file placement), ``evaluate`` (metrics), ``encoders`` (the
registry's token dimension, checked against the features); never the CLI.
"""

from __future__ import annotations

from fastinsight.train.api import TrainResult, train_from_folder, train_on_bags
from fastinsight.train.config import CACHE_LIMIT_BYTES, FolderOptions, TrainConfig
from fastinsight.train.data import Bag, build_model_config, stratified_split
from fastinsight.train.loop import seed_everything
from fastinsight.train.loss import bce_loss, slide_forward
from fastinsight.train.state import (
    RESUMABLE_CHANGES,
    STATE_FORMAT,
    EpochMetrics,
    metrics_paths_for,
    state_path_for,
    write_metrics,
)

__all__ = [
    "CACHE_LIMIT_BYTES",
    "RESUMABLE_CHANGES",
    "STATE_FORMAT",
    "Bag",
    "EpochMetrics",
    "FolderOptions",
    "TrainConfig",
    "TrainResult",
    "bce_loss",
    "build_model_config",
    "metrics_paths_for",
    "seed_everything",
    "slide_forward",
    "state_path_for",
    "stratified_split",
    "train_from_folder",
    "train_on_bags",
    "write_metrics",
]
