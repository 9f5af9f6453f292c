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
from fastinsight.errors import CheckpointError, FastInsightError, OutputError
from fastinsight.inputs import check_input_path
from fastinsight.models.config import InsightConfig
from fastinsight.models.insight import InsightModel
from fastinsight.models.statefiles import bad_tensor
from fastinsight.text import dumps_json, loads_json
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


def refuse_previous_run(out_path: Path, *, resume: bool, overwrite: bool) -> None:
    """A fresh run (no ``resume``) must not replace a previous run's outputs unasked.

    The model, its resume state and metrics are rewritten after the first epoch, so a fresh run
    into an existing ``--out`` that is interrupted (or just worse) would leave a half-trained
    model where the previous one was, and its resume state gone. Raises ``OutputError`` naming
    what exists, before any feature is read; ``overwrite`` (``--overwrite``) allows it.
    """
    if resume or overwrite:
        return
    paths = [out_path, state_path_for(out_path), *metrics_paths_for(out_path)]
    found = [p.name for p in paths if os.path.lexists(p)]
    if found:
        raise OutputError(
            f"{str(out_path)!r}: a previous training run's outputs exist ({', '.join(found)}); a "
            "fresh run would replace them after its first epoch: pass --resume to continue "
            "that run, --overwrite to replace it, or choose another --out"
        )


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
    """Read a ``.train.pt`` safely (``weights_only``: tensors and plain containers, never code)
    and check its layout and that every stored number is finite; the file is only read."""
    if not path.exists() and not path.is_symlink():
        raise CheckpointError(
            f"cannot resume: no training state {str(path)!r} (written next to the model after "
            "each epoch); start without --resume"
        )
    # A FIFO or a device at the path would block torch.load or read garbage: refuse it unopened.
    check_input_path(path, "training state", CheckpointError)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, a random pickle, a safetensors file, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"cannot read training state {str(path)!r} ({first[:200]}); the file is damaged or "
            "not a .train.pt: start afresh without --resume"
        ) from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        found = (
            f"a dict without format {STATE_FORMAT!r} (a plain checkpoint?)"
            if isinstance(state, dict)
            else type(state).__name__
        )
        raise CheckpointError(
            f"{str(path)!r} is not a fastinsight training state ({STATE_FORMAT}); found {found}; "
            "start afresh without --resume"
        )
    _check_state_layout(state, path)
    return state


# The keys of a training state and the type each holds (``_save_state`` writes them).
_STATE_TYPES: dict[str, tuple[type, ...]] = {
    "epoch": (int,),
    "model_state": (dict,),
    "best_state": (dict, type(None)),
    "optimizer_state": (dict,),
    "best_val_loss": (float, int),
    "best_epoch": (int,),
    "bad_epochs": (int,),
    "stopped_early": (bool,),
    "history": (list,),
    "train_config": (str,),
    "model_config": (str,),
    "train_ids": (list,),
    "val_ids": (list,),
    "torch_rng": (Tensor,),
}


def _damaged(path: Path, what: str) -> CheckpointError:
    return CheckpointError(
        f"training state {str(path)!r} is damaged: {what}; the original file was left as it is: "
        "start afresh without --resume (or resume from a copy saved before)"
    )


def _check_finite_tensors(tensors: Mapping[Any, Any], where: str, path: Path) -> None:
    """Every floating tensor in ``tensors`` finite, else a CheckpointError naming the first bad one.

    A NaN in the weights or in Adam's moments survives every later step (NaN + x = NaN), so a
    resumed run would train to NaN and only fail epochs later, at the first score written.
    """
    problem = bad_tensor((f"{where}[{key!r}]", value) for key, value in tensors.items())
    if problem is not None:
        raise _damaged(path, problem)


def _check_state_layout(state: Mapping[str, Any], path: Path) -> None:
    """The keys and types ``_save_state`` writes, and finite weights, moments and settings."""
    missing = sorted(k for k in _STATE_TYPES if k not in state)
    if missing:
        raise _damaged(path, f"it lacks {missing}")
    for key, types in _STATE_TYPES.items():
        value = state[key]
        # bool is an int in Python: only "stopped_early" may be one.
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise _damaged(path, f"{key!r} is a {type(value).__name__}")
    for key in ("epoch", "best_epoch", "bad_epochs"):
        if state[key] < 0:
            raise _damaged(path, f"{key!r} is {state[key]}, expected >= 0")
    if math.isnan(state["best_val_loss"]):  # +inf is legal: no validation loss yet
        raise _damaged(path, "'best_val_loss' is NaN")
    for key in ("train_ids", "val_ids"):
        if not all(isinstance(s, str) for s in state[key]):
            raise _damaged(path, f"{key!r} holds values that are not slide ids (strings)")
    _check_finite_tensors(state["model_state"], "model_state", path)
    if state["best_state"] is not None:
        _check_finite_tensors(state["best_state"], "best_state", path)
    opt = state["optimizer_state"]
    if not isinstance(opt.get("state"), dict) or not isinstance(opt.get("param_groups"), list):
        raise _damaged(path, "'optimizer_state' is not an optimizer state_dict")
    for pid, per_param in opt["state"].items():
        if not isinstance(per_param, dict):
            raise _damaged(path, f"optimizer_state['state'][{pid!r}] is not a dict")
        _check_finite_tensors(per_param, f"optimizer_state['state'][{pid!r}]", path)
    for i, group in enumerate(opt["param_groups"]):
        if not isinstance(group, dict) or not isinstance(group.get("params"), list):
            raise _damaged(path, f"optimizer_state['param_groups'][{i}] is not a parameter group")
        for name in ("lr", "eps", "weight_decay"):
            v = group.get(name)
            if isinstance(v, float) and not math.isfinite(v):
                raise _damaged(path, f"optimizer_state['param_groups'][{i}][{name!r}] is {v}")
    rng = state["torch_rng"]
    if rng.dtype != torch.uint8 or rng.shape != torch.get_rng_state().shape:
        raise _damaged(path, f"'torch_rng' is a {rng.dtype} tensor of shape {list(rng.shape)}")


def _check_fits(
    state: Mapping[str, Any], model: InsightModel, opt: torch.optim.Optimizer, path: Path
) -> None:
    """The saved weights and optimizer moments have this model's names and shapes.

    A state written for another architecture (same config text edited, or another fastinsight)
    would otherwise fail inside ``load_state_dict`` with a traceback, or, for Adam's moments, at
    the first step after the resume.
    """
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for where in ("model_state", "best_state"):
        saved = state[where]
        if saved is None:
            continue
        got = {k: tuple(v.shape) for k, v in saved.items()}
        if got != shapes:
            extra = sorted(set(got) - set(shapes))[:3]
            lacking = sorted(set(shapes) - set(got))[:3]
            other = sorted(k for k in set(got) & set(shapes) if got[k] != shapes[k])[:3]
            raise CheckpointError(
                f"cannot resume from {str(path)!r}: its {where} is for another model (unexpected "
                f"{extra}, missing {lacking}, other shapes {other}); start afresh without --resume"
            )
    params = [p for g in opt.param_groups for p in g["params"]]
    groups = state["optimizer_state"]["param_groups"]
    saved_ids = [i for g in groups for i in g["params"]]
    if len(groups) != len(opt.param_groups) or len(saved_ids) != len(params):
        raise CheckpointError(
            f"cannot resume from {str(path)!r}: its optimizer state holds {len(saved_ids)} "
            f"parameters in {len(groups)} groups, this model has {len(params)} in "
            f"{len(opt.param_groups)}; start afresh without --resume"
        )
    for pid, p in zip(saved_ids, params, strict=True):
        for name, t in state["optimizer_state"]["state"].get(pid, {}).items():
            if t.dim() > 0 and tuple(t.shape) != tuple(p.shape):
                raise CheckpointError(
                    f"cannot resume from {str(path)!r}: optimizer moment {name!r} of parameter "
                    f"{pid} has shape {list(t.shape)}, the parameter {list(p.shape)}; start "
                    "afresh without --resume"
                )


def _check_resume(
    state: Mapping[str, Any], cfg: TrainConfig, mcfg: InsightConfig, path: Path
) -> None:
    try:
        old = loads_json(state["train_config"])
        saved_mcfg = InsightConfig.from_json(state["model_config"])
    except (ValueError, FastInsightError) as exc:
        raise _damaged(path, f"its settings do not parse ({str(exc)[:200]})") from None
    if not isinstance(old, dict):
        raise _damaged(path, "'train_config' is not a JSON object")
    new = json.loads(cfg.to_json())
    changed = sorted(k for k in new if k not in RESUMABLE_CHANGES and old.get(k) != new[k])
    if changed:
        diffs = ", ".join(f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in changed)
        raise CheckpointError(
            f"cannot resume from {str(path)!r}: training settings changed ({diffs}); only "
            f"{sorted(RESUMABLE_CHANGES)} may change, or start afresh without --resume"
        )
    if saved_mcfg != mcfg:
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
    _check_fits(state, model, opt, path)
    try:
        history = [EpochMetrics.from_dict(h) for h in state["history"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise _damaged(path, f"its epoch history does not parse ({exc!r})") from None
    try:
        model.load_state_dict(state["model_state"])
        opt.load_state_dict(state["optimizer_state"])
        torch.set_rng_state(state["torch_rng"])
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"cannot resume from {str(path)!r}: {first[:200]}; start afresh without --resume"
        ) from None
    return _Progress(
        epoch=int(state["epoch"]),
        best_val_loss=float(state["best_val_loss"]),
        best_epoch=int(state["best_epoch"]),
        bad_epochs=int(state["bad_epochs"]),
        stopped_early=bool(state["stopped_early"]),
        history=history,
        best_state=state["best_state"],
    )
