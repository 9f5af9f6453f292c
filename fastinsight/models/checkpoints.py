"""Loading and saving INSIGHT models.

Two formats, told apart by their bytes, not their names:

- **official**: the plain ``state_dict`` the official INSIGHT code saves with ``torch.save``
  (a zip or legacy pickle; 32 tensors). Loaded with ``torch.load(weights_only=True)``; the
  architecture (C, K, grid) is read off the tensor shapes and the official inference settings
  (Otsu, SmoothMax a = 8) apply.
- **fastinsight**: safetensors with the ``InsightConfig`` embedded as JSON in the header metadata
  (key ``fastinsight.config``), written by ``model.save(path)``.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fastinsight.errors import CheckpointError, ConfigError
from fastinsight.fileformat import file_sha256, weights_format
from fastinsight.models import multires, pylon
from fastinsight.models.config import InsightConfig, InvalidConfigError
from fastinsight.models.insight import (  # noqa: F401 (the format keys are re-exported)
    CONFIG_KEY,
    FORMAT_KEY,
    FORMAT_VERSION,
    InsightModel,
)
from fastinsight.models.statefiles import check_state, read_safetensors, read_torch_state_dict


def sniff_format(path: Path) -> str:
    """``"safetensors"``, ``"torch"`` (zip or legacy pickle) or raise CheckpointError."""
    from fastinsight.inputs import check_input_path

    # stat first: a FIFO would block open() forever, a loop or a folder deserves its own words.
    check_input_path(path, "model file", CheckpointError)
    try:
        with open(path, "rb") as fh:
            head = fh.read(16)
    except FileNotFoundError:
        raise CheckpointError(f"model file {str(path)!r} does not exist") from None
    except IsADirectoryError:
        raise CheckpointError(f"model path {str(path)!r} is a directory, not a file") from None
    except OSError as exc:
        raise CheckpointError(f"cannot read model file {str(path)!r}: {exc}") from exc
    fmt = weights_format(head)
    if fmt is not None:
        return fmt
    raise CheckpointError(
        f"{str(path)!r} is neither a PyTorch state_dict (.pth) nor a safetensors file; "
        "pass an official INSIGHT .pth or a fastinsight .safetensors checkpoint"
    )


def config_from_official_state_dict(state: dict[str, Tensor]) -> InsightConfig:
    """Read C, K, the widths and the grid size off an official state_dict's shapes."""
    try:
        w_reduce = state["reduce_dimension_block.0.weight"]
        ln_reduce = state["reduce_dimension_block.2.weight"]
        w_widths = [state[f"backbone_block.{i}.weight"] for i in (0, 3, 6)]
        w_last = state["backbone_block.9.weight"]
    except KeyError as exc:
        other = next(iter(state), "<empty>")
        raise CheckpointError(
            f"not an INSIGHT checkpoint: missing key {exc.args[0]!r} (first key in the file: "
            f"{other!r}); pass a state_dict saved by the official INSIGHT code"
        ) from None
    if w_reduce.ndim != 4 or ln_reduce.ndim not in (1, 3):
        raise CheckpointError(
            "not an INSIGHT checkpoint: 'reduce_dimension_block.0.weight' has shape "
            f"{tuple(w_reduce.shape)}, expected [128, C, 1, 1]"
        )
    norm = "tile" if ln_reduce.ndim == 3 else "channel"
    grid = tuple(int(s) for s in ln_reduce.shape[1:]) if norm == "tile" else (14, 14)
    return InsightConfig(
        in_dim=int(w_reduce.shape[1]),
        num_classes=int(w_last.shape[0]),
        grid_size=grid,  # type: ignore[arg-type]
        reduce_dim=int(w_reduce.shape[0]),
        widths=tuple(int(w.shape[0]) for w in w_widths),  # type: ignore[arg-type]
        norm=norm,  # type: ignore[arg-type]
    )


def load_state_strict(model: InsightModel, state: dict[str, Tensor], source: str) -> None:
    """Load ``state`` into ``model`` after ``check_state`` (first missing, extra, mis-shaped or
    non-finite key named); weights are stored in float32."""
    check_state(model.state_dict(), state, source, "; not an INSIGHT checkpoint")
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)


@dataclass
class CheckpointFile:
    """A model file read once, handed to every registered loader's predicate.

    ``format`` is ``"torch"`` (a plain state_dict loaded with ``weights_only=True``) or
    ``"safetensors"``; ``metadata`` is the safetensors header metadata (empty for torch files).
    """

    path: Path
    format: str
    state: dict[str, Tensor]
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelLoader:
    """One entry of the sniffer: ``accepts(file)`` says whether ``load(file, backend)`` applies."""

    name: str
    accepts: Callable[[CheckpointFile], bool]
    load: Callable[[CheckpointFile, str], torch.nn.Module]


def read_checkpoint(path: Path) -> CheckpointFile:
    """Sniff ``path`` by its bytes and read its tensors (and metadata) once."""
    fmt = sniff_format(path)
    if fmt == "torch":
        return CheckpointFile(path, fmt, read_torch_state_dict(path))
    meta, state = read_safetensors(path)
    return CheckpointFile(path, fmt, state, meta)


def _load_official(ckpt: CheckpointFile, backend: str) -> InsightModel:
    try:
        config = config_from_official_state_dict(ckpt.state)
    except InvalidConfigError as exc:  # shapes from a file: the file's problem (exit 3)
        raise CheckpointError(f"{str(ckpt.path)!r}: {exc}") from None
    model = InsightModel(config, backend=backend)
    load_state_strict(model, ckpt.state, str(ckpt.path))
    return model


def _load_safetensors(ckpt: CheckpointFile, backend: str) -> InsightModel:
    if CONFIG_KEY not in ckpt.metadata:
        raise CheckpointError(
            f"{str(ckpt.path)!r} is a safetensors file without a fastinsight config (metadata key "
            f"{CONFIG_KEY!r}); it was not written by fastinsight's model.save()"
        )
    model = InsightModel(
        InsightConfig.from_json(ckpt.metadata[CONFIG_KEY], source=str(ckpt.path)), backend=backend
    )
    load_state_strict(model, ckpt.state, str(ckpt.path))
    return model


def _rng_kept(
    load: Callable[[CheckpointFile, str], torch.nn.Module],
) -> Callable[[CheckpointFile, str], torch.nn.Module]:
    """``load`` with torch's CPU generator given back after (``torch.random.fork_rng``): a loader
    builds its module with the usual random init, then overwrites every weight, and that init
    must not advance the caller's generator. For the table's built-in entries, which
    ``load_radiograph_model`` calls directly too."""

    @functools.wraps(load)
    def kept(ckpt: CheckpointFile, backend: str) -> torch.nn.Module:
        with torch.random.fork_rng(devices=[]):  # modules are built on the CPU
            return load(ckpt, backend)

    return kept


# The sniffer's table, tried in order; the INSIGHT entries come last and accept every file of
# their format, so a file nobody else claims gets INSIGHT's precise error ("missing key ...").
LOADERS: list[ModelLoader] = [
    # Radiograph families (PYLON, Yao et al. 2018) claim their own files first.
    ModelLoader("pylon", pylon.accepts_pylon_file, _rng_kept(pylon.load_pylon_file)),
    ModelLoader("multires", multires.accepts_multires_file, _rng_kept(multires.load_multires_file)),
    ModelLoader(
        "insight-fastinsight", lambda f: f.format == "safetensors", _rng_kept(_load_safetensors)
    ),
    ModelLoader("insight-official", lambda f: f.format == "torch", _rng_kept(_load_official)),
]


def register_loader(loader: ModelLoader) -> None:
    """Let another model family claim its files: ``loader`` is tried before INSIGHT's entries.

    E.g. ``register_loader(ModelLoader("pylon", lambda f: "pylon" in f.metadata.get(...), load))``.
    Registering a name twice replaces the earlier entry.
    """
    LOADERS[:] = [entry for entry in LOADERS if entry.name != loader.name]
    LOADERS.insert(0, loader)


def model_family(path: str | os.PathLike[str]) -> str | None:
    """The registered loader that claims ``path`` (``"pylon"``, ``"multires"``,
    ``"insight-fastinsight"``, ...), without building the model; None when the file cannot be
    read (the loader then gives the clear error)."""
    from fastinsight.errors import FastInsightError

    try:
        ckpt = read_checkpoint(Path(path).expanduser())
    except (FastInsightError, OSError):
        return None
    return next((entry.name for entry in LOADERS if entry.accepts(ckpt)), None)


def load_model(
    path: str | os.PathLike[str],
    backend: str = "auto",
    device: str | torch.device | None = None,
) -> Any:
    """Load a model file with the first registered loader that accepts it.

    Built in: an official INSIGHT ``.pth`` or a fastinsight ``.safetensors`` checkpoint. The
    model comes back in eval mode on ``device`` (default: CUDA when available, else CPU; a bad
    name is a ConfigError, an absent GPU a BackendError, both before the file is read). A
    ``path`` that is not a path (None, a number, a loaded model) is a ConfigError. Loading
    leaves the caller's torch random generator as it was (``torch.random.fork_rng``).
    """
    from fastinsight.inputs import resolve_device

    check_model_path(path, "load_model")
    dev = resolve_device(device)
    ckpt = read_checkpoint(Path(path).expanduser())
    loader = next(entry for entry in LOADERS if entry.accepts(ckpt))
    with torch.random.fork_rng(devices=[]):  # a registered loader of another family too
        model = loader.load(ckpt, backend)
    return model.to(dev).eval()


def check_model_path(path: object, caller: str, *, loaded: str = "use the model as it is") -> None:
    """``path`` is a str or ``os.PathLike`` naming a model file; else a ConfigError that says
    what was given. ``loaded``: what to do with a loaded model instead (by default it needs no
    loading; a caller that reads the file itself says how to write one)."""
    if isinstance(path, (str, os.PathLike)):
        return
    if isinstance(path, torch.nn.Module):
        raise ConfigError(
            f"{caller} takes the path of a model file, got a loaded {type(path).__name__}; {loaded}"
        )
    raise ConfigError(
        f"{caller} takes the path of a model file (str or pathlib.Path), got {type(path).__name__}"
    )


def save_model(model: InsightModel, path: str | os.PathLike[str]) -> None:
    """Write ``model`` as safetensors with its config embedded (atomically)."""
    model.save(str(path))


def recorded_encoder(path: str | os.PathLike[str]) -> str | None:
    """The encoder a model file records as the maker of its training features, or None.

    A fastinsight ``.safetensors`` model records it in its config (``train`` takes it from the
    feature files or ``--encoder``); an official INSIGHT ``.pth`` is a bare state_dict and
    records none (nor does a config written without the field: the loaded model's
    ``config.encoder`` is then the default, not a record). Reads the header only, so a run can
    compare encoders (:func:`fastinsight.encoders.identity.check_encoder_identity`) before
    loading any weights.
    """
    from safetensors import safe_open

    from fastinsight.text import loads_json

    p = Path(path).expanduser()
    if sniff_format(p) != "safetensors":
        return None
    try:
        with safe_open(str(p), framework="pt") as fh:
            raw = loads_json((fh.metadata() or {}).get(CONFIG_KEY, "{}"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read the config of model file {str(p)!r}: {exc}") from None
    name = raw.get("encoder") if isinstance(raw, dict) else None
    return name if isinstance(name, str) and name.strip() else None


def model_identity(path: str | os.PathLike[str]) -> dict[str, str]:
    """A short identity of a checkpoint for reports: its file name, format and sha256."""
    p = Path(path)
    return {"path": str(p), "format": sniff_format(p), "sha256": file_sha256(p)}


__all__ = [
    "CheckpointFile",
    "ModelLoader",
    "check_model_path",
    "load_model",
    "model_family",
    "model_identity",
    "read_checkpoint",
    "recorded_encoder",
    "register_loader",
    "save_model",
    "sniff_format",
]
