"""What the two radiograph models (PYLON and the multi-resolution network) share.

Their configuration plumbing (class names, JSON with a ``family`` tag, checks of the class
names), the prediction type, the input check, the strict key-by-key state loader, and the
safetensors format (config JSON, format version and family in the metadata). The architectures
stay in ``pylon.py`` and ``multires.py``; nothing here names a layer, so no checkpoint key depends
on this module.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor, nn

from fastinsight.atomic import atomic_path
from fastinsight.errors import CheckpointError, InputError
from fastinsight.inputs import lent_to
from fastinsight.models.config import InvalidConfigError, class_name_problems
from fastinsight.models.insight import CONFIG_KEY, FORMAT_KEY, FORMAT_VERSION
from fastinsight.models.statefiles import check_state, read_safetensors
from fastinsight.ops.threshold_pool import tracing
from fastinsight.text import loads_json

FAMILY_KEY = "fastinsight.family"

# ChestX-ray14 (NIH) finding names in the data set's conventional order. The order of the
# released PYLON head is not stated in a file we could read [UNVERIFIED]; pass class names
# explicitly when it matters.
NIH14_CLASSES: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
)

C = TypeVar("C", bound="RadiographConfig")


class RadiographConfig:
    """Mixin of the radiograph configs (frozen dataclasses with ``num_classes`` and
    ``class_names``): class names, the checks on them, and JSON tagged with the family.

    Subclasses set ``FAMILY`` (the JSON tag and safetensors family), ``LABEL`` (the model's name
    in messages) and ``TUPLE_FIELDS`` (fields JSON turns into lists).
    """

    FAMILY: ClassVar[str]
    LABEL: ClassVar[str]
    TUPLE_FIELDS: ClassVar[tuple[str, ...]] = ("class_names",)
    num_classes: int
    class_names: tuple[str, ...]

    def class_problems(self) -> list[str]:
        """A name count that is not K, and names unsafe in file names (#16 class 1: --all-classes
        writes one file per class)."""
        problems = []
        if self.class_names and len(self.class_names) != self.num_classes:
            problems.append(f"{len(self.class_names)} class_names for {self.num_classes} classes")
        return problems + class_name_problems(tuple(self.class_names))

    @property
    def names(self) -> tuple[str, ...]:
        """Class names: the configured ones, NIH-14 for a 14-class model, else ``class_k``."""
        if self.class_names:
            return self.class_names
        if self.num_classes == len(NIH14_CLASSES):
            return NIH14_CLASSES
        return tuple(f"class_{k}" for k in range(self.num_classes))

    def to_json(self) -> str:
        fields = dataclasses.asdict(self)  # type: ignore[call-overload]
        return json.dumps({"family": self.FAMILY, **fields}, sort_keys=True)

    @classmethod
    def from_json(cls: type[C], text: str) -> C:
        """Parse ``to_json``'s text; a wrong family or an unknown field is a CheckpointError."""
        try:
            raw: Any = loads_json(text)
        except (ValueError, TypeError) as exc:
            raise CheckpointError(f"{cls.LABEL} config is not valid JSON: {exc}") from None
        if not isinstance(raw, dict) or raw.pop("family", None) != cls.FAMILY:
            raise CheckpointError(
                f"the embedded config is not a {cls.LABEL} config (family != {cls.FAMILY!r})"
            )
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(raw) - known)
        if unknown:
            raise CheckpointError(
                f"{cls.LABEL} config has unknown fields {unknown}; upgrade fastinsight"
            )
        try:
            for key in cls.TUPLE_FIELDS:
                if key in raw:
                    raw[key] = tuple(raw[key])
            return cls(**raw)
        except InvalidConfigError as exc:  # from a model file: a CheckpointError (exit 3)
            raise CheckpointError(str(exc)) from None
        except (TypeError, ValueError) as exc:  # a value of the wrong JSON type ("std": "x")
            raise CheckpointError(
                f"invalid {cls.LABEL} config: a field has a value of the wrong type ({exc})"
            ) from None

    def __post_init__(self) -> None:
        """InvalidConfigError (a ConfigError) naming every bad field (``_problems``); from a
        model file the loaders turn it into a CheckpointError."""
        try:
            problems = self._problems()
        except TypeError as exc:  # a field of the wrong type ("3" < 1)
            problems = [f"a field has a value of the wrong type ({exc})"]
        self.refuse(problems)

    def _problems(self) -> list[str]:
        """Every bad field, one line each (subclasses add theirs to ``class_problems``)."""
        return self.class_problems()

    def refuse(self, problems: list[str]) -> None:
        """Raise InvalidConfigError (a ConfigError) listing ``problems``, if any."""
        if problems:
            raise InvalidConfigError(f"invalid {self.LABEL} config: " + "; ".join(problems))


def stats_problems(mean: float, std: float) -> list[str]:
    """The input normalisation ``(u8 / 255 - mean) / std`` must be finite: a NaN mean, or a std
    that is zero, negative, NaN or infinite, gives NaN or constant inputs and NaN scores with
    exit 0 (a tampered or hand-edited config is refused at load instead)."""
    problems = []
    if not math.isfinite(mean):
        problems.append(f"mean must be a finite number, got {mean}")
    if not (math.isfinite(std) and std > 0):
        problems.append(f"std must be finite and > 0, got {std}")
    return problems


@dataclass(frozen=True)
class RadiographPrediction:
    """``logits``: the CAM ``[B, K, h, w]``; ``scores``: image probabilities ``[B, K]``."""

    logits: Tensor
    scores: Tensor

    @property
    def probabilities(self) -> Tensor:
        """``sigmoid(logits)``: the map the official point-localisation metric upsamples."""
        return torch.sigmoid(self.logits)


def check_input_side(x: Tensor, multiple: int, model: str) -> None:
    """Raise InputError unless ``x`` is float ``[B, C, H, W]`` with H, W multiples of ``multiple``."""
    if x.ndim != 4:
        raise InputError(f"{model} expects a tensor [B, C, H, W]; got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise InputError(f"{model} expects a normalised float tensor; got {x.dtype}")
    if x.shape[0] == 0:
        raise InputError(f"{model}: no images, the batch is empty (B = 0)")
    h, w = int(x.shape[-2]), int(x.shape[-1])
    if h < multiple or w < multiple or h % multiple or w % multiple:
        raise InputError(
            f"{model} needs image sides that are multiples of {multiple} px; got {h} x {w}; "
            f"resize to {max(multiple, round(h / multiple) * multiple)} px (the model's "
            "image_size) first"
        )


def model_input(x: Any, model: nn.Module, multiple: int, name: str, channels: int) -> Tensor:
    """``x`` checked and made ready for ``model``: InputError unless it is a float
    ``[B, channels, H, W]`` batch (B >= 1, H and W multiples of ``multiple``) with data on the
    model's device; any float dtype is cast to the model's (float64, half, bfloat16 in, the
    weights' dtype out), as InsightModel does. A numpy array is converted (to the model's
    device). O(1) checks: no pass over the pixels.

    Shapes: ``[B, C, H, W]`` -> ``[B, C, H, W]``.
    """
    first = next(model.parameters(), None)
    if not isinstance(x, Tensor):
        try:
            x = torch.as_tensor(x, device=None if first is None else first.device)
        except (TypeError, ValueError, RuntimeError):
            raise InputError(
                f"{name} expects a float tensor [B, C, H, W] (or a numpy array); got "
                f"{type(x).__name__}"
            ) from None
    check_input_side(x, multiple, name)
    if x.shape[1] != channels:
        raise InputError(f"{name} expects {channels} input channel(s); got {x.shape[1]}")
    if x.device.type == "meta":
        raise InputError(f"{name}: the images are on the 'meta' device (shapes without data)")
    if first is None or tracing():
        return x
    if x.device != first.device:
        raise InputError(
            f"{name}: the images are on {x.device} but the model is on {first.device}; move "
            f"one to the other (x.to('{first.device}') or model.to('{x.device}'))"
        )
    return x if x.dtype == first.dtype else x.to(first.dtype)


def check_finite_prediction(x: Tensor, logits: Tensor, scores: Tensor, name: str) -> None:
    """InputError when the input, the CAM or the scores hold NaN or inf, saying which.

    Shapes: x ``[B, C, H, W]``, logits ``[B, K, h, w]``, scores ``[B, K]``. One host sync, after
    the model ran; one elementwise pass over the input, nothing next to the network's cost.
    """
    finite_in = torch.isfinite(x).all()
    if bool(finite_in & torch.isfinite(logits).all() & torch.isfinite(scores).all()):
        return
    if not bool(finite_in):
        bad = int((~torch.isfinite(x)).sum())
        raise InputError(
            f"{name}: the input images hold NaN or inf ({bad} of {x.numel()} values); check "
            "the image and its normalisation (radiograph.model_inputs)"
        )
    raise InputError(
        f"{name} overflowed: finite input (largest |x| {float(x.abs().max()):.3g}) gave NaN/inf "
        "logits; the input is far out of range: normalise it as the model expects "
        "((u8 / 255 - mean) / std, radiograph.model_inputs)"
    )


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Run the body with ``model`` in eval mode and give each module its own mode back after.

    ``predict`` uses it: BatchNorm then uses its running statistics (a batch of one works, the
    scores do not depend on the batch) and no buffer changes, whatever mode the caller left the
    model in (a model being trained keeps training afterwards). Nested and concurrent predicts
    of one model share one loan (``fastinsight.inputs.lent_to``): the modes come back when the
    last one leaves.
    """
    with lent_to(None, model):
        yield


def load_state_checked(model: nn.Module, state: dict[str, Tensor], source: str) -> None:
    """Load ``state`` only if ``check_state`` accepts it against ``model`` (every key by name,
    shape and kind of dtype, finite); nothing is loaded before all keys have been checked."""
    check_state(model.state_dict(), state, source)
    model.load_state_dict(
        {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}, strict=True
    )


M = TypeVar("M", bound=nn.Module)


def model_from_metadata(
    build: Callable[[Any], M], config_cls: type[RadiographConfig], meta: dict[str, str],
    state: dict[str, Tensor], source: str,
) -> M:  # fmt: skip
    """Build a model from the config JSON in safetensors metadata and load ``state`` strictly."""
    model = build(config_cls.from_json(meta.get(CONFIG_KEY, "")))
    load_state_checked(model, state, source)
    return model


def read_family_safetensors(path: Path, config_cls: type[RadiographConfig]) -> tuple[
    dict[str, str], dict[str, Tensor]
]:  # fmt: skip
    """Metadata and tensors of a fastinsight safetensors file of ``config_cls``'s family."""
    meta, state = read_safetensors(path)
    if CONFIG_KEY not in meta or meta.get(FAMILY_KEY) != config_cls.FAMILY:
        raise CheckpointError(
            f"{str(path)!r} is not a fastinsight {config_cls.LABEL} safetensors file (metadata "
            f"{FAMILY_KEY!r} = {meta.get(FAMILY_KEY)!r}, expected {config_cls.FAMILY!r})"
        )
    return meta, state


def sniff_weights_file(p: Path) -> str:
    """``"torch"`` or ``"safetensors"`` by the first bytes, or CheckpointError in radiograph words
    (the package-wide sniffer's advice names INSIGHT's checkpoints)."""
    from fastinsight.fileformat import weights_format

    try:
        with open(p, "rb") as fh:
            head = fh.read(16)
    except OSError as exc:
        raise CheckpointError(f"cannot read model file {str(p)!r}: {exc.strerror or exc}") from None
    fmt = weights_format(head)
    if fmt is None:
        what = (
            "is empty"
            if not head
            else "is neither a PyTorch state_dict (.pth/.pkl) nor a safetensors file"
        )
        raise CheckpointError(
            f"model file {str(p)!r} {what}; pass the official PYLON state_dict (.pth/.pkl) or a "
            "fastinsight radiograph .safetensors"
        )
    return fmt


def ready(model: M, device: str | torch.device | None) -> M:
    """``model`` in eval mode on ``device`` (default: CUDA when available, else CPU; a bad name
    is a ConfigError, an absent GPU a BackendError)."""
    from fastinsight.inputs import resolve_device

    return model.to(resolve_device(device)).eval()


def save_radiograph_model(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Write ``model`` as safetensors with its config, format version and family (atomically).

    Floating tensors as float32; BatchNorm's ``num_batches_tracked`` stays int64, so the file
    reloads key for key.
    """
    from safetensors.torch import save_file

    state = {
        k: (
            v.detach().to("cpu", torch.float32) if v.is_floating_point() else v.detach().cpu()
        ).contiguous()
        for k, v in model.state_dict().items()
    }
    config: Any = model.config
    meta = {CONFIG_KEY: config.to_json(), FORMAT_KEY: FORMAT_VERSION, FAMILY_KEY: config.FAMILY}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=meta)


__all__ = [
    "FAMILY_KEY",
    "NIH14_CLASSES",
    "RadiographConfig",
    "RadiographPrediction",
    "check_finite_prediction",
    "check_input_side",
    "eval_mode",
    "load_state_checked",
    "model_from_metadata",
    "model_input",
    "read_family_safetensors",
    "ready",
    "save_radiograph_model",
    "sniff_weights_file",
    "stats_problems",
]
