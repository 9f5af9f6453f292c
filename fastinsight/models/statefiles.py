"""Reading model weight files: a plain PyTorch state_dict (``weights_only``) or safetensors.

The one reader every model family's loader uses (INSIGHT, PYLON, the multi-resolution network);
it knows nothing of architectures, so it sits below them and imports none of them.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from torch import Tensor

from fastinsight.errors import CheckpointError


def read_torch_state_dict(path: Path) -> dict[str, Tensor]:
    """``torch.load(weights_only=True)`` a state_dict of tensors (a ``{"state_dict": ...}`` or
    ``{"model": ...}`` wrapper and DataParallel's ``module.`` prefix are taken off), or raise
    CheckpointError."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises pickle/zip/runtime errors of many kinds
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(
            f"cannot load {str(path)!r} as a PyTorch state_dict ({msg}); only plain "
            "state_dicts of tensors are accepted (weights_only=True)"
        ) from exc
    state = _unwrap(state)
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(
            f"{str(path)!r} does not hold a state_dict of tensors (found {type(state).__name__})"
        )
    # Checkpoints saved from nn.DataParallel carry a "module." prefix.
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


# Keys under which training scripts nest the weights ({"state_dict": sd, "epoch": 3, ...}), in
# the order they are tried: Lightning and most scripts write "state_dict", timm-style and
# DeiT/MAE-style scripts "model", some DataParallel dumps "module". Encoder weight files are
# unwrapped by the same keys (fastinsight.encoders.weights imports this tuple).
WRAPPER_KEYS: tuple[str, ...] = ("state_dict", "model", "module")


def _unwrap(state: object) -> object:
    """The state_dict nested under a :data:`WRAPPER_KEYS` key, else ``state`` itself.

    Only a wrapper whose nested value is a dict is opened, and only when ``state`` is not itself
    a state_dict of tensors (a model with a parameter literally named ``model`` stays as is)."""
    if not isinstance(state, dict) or all(isinstance(v, Tensor) for v in state.values()):
        return state
    for key in WRAPPER_KEYS:
        if isinstance(state.get(key), dict):
            return state[key]
    return state


def non_finite(t: Tensor) -> tuple[int, str] | None:
    """``(count, "NaN" | "inf" | "NaN/inf")`` of a floating tensor's non-finite values, or None
    when it has none (or is not floating). The one description every weight check prints."""
    if not (t.is_floating_point() or t.is_complex()):
        return None
    finite = torch.isfinite(t)
    if bool(finite.all()):
        return None
    bad = t[~finite]
    kinds = "/".join(
        n for n, hit in (("NaN", bad.isnan().any()), ("inf", bad.isinf().any())) if hit
    )
    return int(bad.numel()), kinds


def bad_tensor(named: Iterable[tuple[str, object]]) -> str | None:
    """What is wrong with the first of ``(name, value)`` that is not a finite-valued tensor
    ("X is a T, not a tensor" / "X holds N non-finite values (NaN)"), or None: the check the
    training-state readers run on weights and optimizer moments."""
    for name, value in named:
        if not isinstance(value, Tensor):
            return f"{name} is a {type(value).__name__}, not a tensor"
        bad = non_finite(value)
        if bad is not None:
            return f"{name} holds {bad[0]} non-finite values ({bad[1]})"
    return None


def check_state(
    expected: dict[str, Tensor], state: dict[str, Tensor], source: str, unexpected_hint: str = ""
) -> None:
    """Refuse ``state`` unless it fits ``expected`` (a model's ``state_dict()``) key for key.

    In order, naming the first offence: a key the model lacks (``unexpected_hint`` appended, in
    the file's order), then per key of the file a non-tensor, another shape, a floating tensor
    where the model has an integer one (or the reverse), NaN/inf values, float64 values beyond
    float32's range (the loaders store float32), and last a key the file lacks. Nothing is loaded
    here: the caller loads after this returns, so a refused file changes no weight.
    """
    for key in state:
        if key not in expected:
            raise CheckpointError(f"{source}: unexpected key {key!r}{unexpected_hint}")
    for key, got in state.items():
        ref = expected[key]
        if not isinstance(got, Tensor):
            raise CheckpointError(f"{source}: {key!r} is a {type(got).__name__}, not a tensor")
        if tuple(got.shape) != tuple(ref.shape):
            raise CheckpointError(
                f"{source}: {key!r} has shape {list(got.shape)}, expected {list(ref.shape)}"
            )
        if ref.is_floating_point() != got.is_floating_point():
            raise CheckpointError(f"{source}: {key!r} has dtype {got.dtype}, expected {ref.dtype}")
        bad = non_finite(got)
        if bad is not None:
            raise CheckpointError(
                f"{source}: {key!r} holds {bad[0]} non-finite values ({bad[1]}); the file is "
                "damaged or the training diverged: use an earlier checkpoint"
            )
        if got.dtype == torch.float64 and bool((got.abs() > torch.finfo(torch.float32).max).any()):
            raise CheckpointError(
                f"{source}: {key!r} holds values beyond float32's range (overflow to inf); the "
                "file is damaged or the training diverged"
            )
    for key in expected:
        if key not in state:
            raise CheckpointError(f"{source}: missing key {key!r}")


def read_safetensors(path: Path) -> tuple[dict[str, str], dict[str, Tensor]]:
    """Metadata and tensors of a safetensors file, or raise CheckpointError."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            state = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
    except Exception as exc:
        raise CheckpointError(f"cannot read safetensors file {str(path)!r}: {exc}") from exc
    return dict(meta), state
