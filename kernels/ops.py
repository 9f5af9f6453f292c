"""The public kernel launchers, registered as ``torch.library`` custom ops.

Each launcher has the signature of its reference (``fastinsight.reference`` / ``otsu`` /
``pooling``) and calls one custom op (``torch.ops.fastinsight.*``) with a fake (meta)
implementation, so ``torch.compile`` and ``torch.export`` trace through a model that uses them
and see one opaque node per op. The ops are forward-only: the kernels have no backward, so a
call that would need one is refused (train with the reference).

Importing this module imports Triton (and registers the ops); ``fastinsight.kernels`` imports it
lazily, on first use of a launcher.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from fastinsight.errors import BackendError, InputError
from fastinsight.ops.reference import HeadWeights

from . import head as _head
from . import reduce as _reduce

__all__ = [
    "insight_head",
    "lse_lba",
    "masked_max",
    "masked_mean",
    "otsu_threshold",
    "smoothmax",
    "threshold_and_pool",
]


# --------------------------------------------------------------------------------------------
# Custom ops
# --------------------------------------------------------------------------------------------
def device_guard(device: torch.device) -> contextlib.AbstractContextManager:
    """Make ``device`` current while its kernels launch: Triton launches on the current CUDA
    device and its current stream, so a model on ``cuda:1`` in a process whose current device
    is ``cuda:0`` would otherwise launch on the wrong GPU. A no-op for CPU tensors."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


@torch.library.custom_op("fastinsight::insight_head", mutates_args=())
def _insight_head_op(
    tokens: Tensor, params: list[Tensor], norm: str, eps: float, precision: str
) -> Tensor:
    with device_guard(tokens.device):
        return _head.insight_head_launch(tokens, list(params), norm, eps, precision)


@_insight_head_op.register_fake
def _insight_head_fake(
    tokens: Tensor, params: list[Tensor], norm: str, eps: float, precision: str
) -> Tensor:
    n, _, h, w = tokens.shape
    k = params[16].shape[0]  # the last detection conv's weight [K, W3, 1, 1]
    return tokens.new_empty((n, k, h, w), dtype=torch.float32)


@torch.library.custom_op("fastinsight::otsu_threshold", mutates_args=())
def _otsu_op(values: Tensor, mask: Tensor | None, nbins: int) -> Tensor:
    with device_guard(values.device):
        return _reduce.otsu_threshold_launch(values, mask, nbins)


@_otsu_op.register_fake
def _otsu_fake(values: Tensor, mask: Tensor | None, nbins: int) -> Tensor:
    return values.new_empty((values.shape[0],), dtype=torch.float32)


@torch.library.custom_op("fastinsight::pool", mutates_args=())
def _pool_op(
    values: Tensor, mask: Tensor | None, method: str, param_tensor: Tensor | None, param: float
) -> Tensor:
    with device_guard(values.device):
        return _reduce.pool_launch(values, mask, method, param_tensor, param)


@_pool_op.register_fake
def _pool_fake(
    values: Tensor, mask: Tensor | None, method: str, param_tensor: Tensor | None, param: float
) -> Tensor:
    return values.new_empty((values.shape[0],), dtype=torch.float32)


@torch.library.custom_op("fastinsight::threshold_pool", mutates_args=())
def _threshold_pool_op(
    values: Tensor,
    mask: Tensor | None,
    method: str,
    param_tensor: Tensor | None,
    param: float,
    otsu: bool,
    nbins: int,
    logit: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    with device_guard(values.device):
        return _reduce.threshold_pool_launch(
            values, mask, method, param_tensor, param, otsu, nbins, logit
        )


@_threshold_pool_op.register_fake
def _threshold_pool_fake(
    values: Tensor,
    mask: Tensor | None,
    method: str,
    param_tensor: Tensor | None,
    param: float,
    otsu: bool,
    nbins: int,
    logit: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    k = values.shape[0]
    kept = values.new_empty(values.shape, dtype=torch.float32)
    return (
        kept,
        values.new_empty((k,), dtype=torch.float32),
        values.new_empty((k,), dtype=torch.float32),
    )


# --------------------------------------------------------------------------------------------
# Launchers (the reference signatures)
# --------------------------------------------------------------------------------------------
def _forward_only(what: str, *tensors: Tensor | None) -> None:
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        raise BackendError(
            f"{what}: the Triton kernels are forward-only; run under torch.no_grad() / "
            "torch.inference_mode(), or use backend='reference' for training"
        )


def insight_head(tokens: Tensor, weights: HeadWeights, *, precision: str = "ieee") -> Tensor:
    """Fused INSIGHT head: raw heatmap of a batch of token grids, as ``insight_head_reference``.

    Shapes: tokens ``[N, C, h, w]`` (any strides: a channels-last view of the encoder's
    ``[N, h*w, C]`` from ``tokens_as_grid`` is read in place) -> ``[N, K, h, w]`` float32 for
    fp32, fp16 or bf16 tokens (fp32 accumulation; the heatmap stays fp32 for Otsu). ``precision`` applies to fp32 tokens:
    ``"ieee"`` (exact fp32 dots, the parity setting) or ``"tf32"`` (tensor cores).
    """
    params = _head.flatten_weights(weights)
    _forward_only("insight_head", tokens, *params)
    _head.check_head_inputs(tokens, params, weights.norm)
    if precision not in _head.PRECISIONS:
        raise InputError(f"precision must be one of {_head.PRECISIONS}, got {precision!r}")
    params = [p.detach() for p in params]
    return _insight_head_op(tokens, params, weights.norm, float(weights.eps), precision)


def otsu_threshold(values: Tensor, mask: Tensor | None = None, nbins: int = 256) -> Tensor:
    """Per-class Otsu threshold as ``fastinsight.ops.otsu.otsu_threshold`` (scikit-image's).

    Shapes: values ``[K, M]``, mask ``[M]`` / ``[K, M]`` bool or None -> ``[K]`` float32.
    """
    return _otsu_op(values.detach(), None if mask is None else mask.detach(), int(nbins))


def _pool(values: Tensor, mask: Tensor | None, method: str, param: float | Tensor) -> Tensor:
    _forward_only(method, values, param if isinstance(param, Tensor) else None)
    mask = None if mask is None else mask.detach()
    if isinstance(param, Tensor):
        return _pool_op(values.detach(), mask, method, param.detach(), 0.0)
    return _pool_op(values.detach(), mask, method, None, float(param))


def smoothmax(values: Tensor, mask: Tensor | None = None, a: float | Tensor = 8.0) -> Tensor:
    """SmoothMax pooling ``sum(softmax(a x) x)``. Shapes: ``[K, M]``, ``[M]``/``[K, M]`` -> ``[K]``."""
    return _pool(values, mask, "smoothmax", a)


def lse_lba(values: Tensor, mask: Tensor | None = None, r: float | Tensor = 6.0) -> Tensor:
    """LSE-LBA pooling ``(1/r) log(mean(exp(r x)))``. Shapes as ``smoothmax``; r scalar or ``[K]``."""
    return _pool(values, mask, "lse_lba", r)


def masked_max(values: Tensor, mask: Tensor | None = None) -> Tensor:
    """Shapes: values ``[K, M]``, mask ``[M]``/``[K, M]`` -> ``[K]``."""
    return _pool(values, mask, "max", 0.0)


def masked_mean(values: Tensor, mask: Tensor | None = None) -> Tensor:
    """Shapes: values ``[K, M]``, mask ``[M]``/``[K, M]`` -> ``[K]``."""
    return _pool(values, mask, "mean", 0.0)


def threshold_and_pool(
    values: Tensor,
    mask: Tensor | None,
    method: str,
    param: float | Tensor = 8.0,
    *,
    threshold: str = "otsu",
    nbins: int = 256,
    pool_input: str = "heatmap",
) -> tuple[Tensor, Tensor, Tensor]:
    """Threshold + pooling as ``fastinsight.ops.threshold_pool.ThresholdAndPool``, in 3 launches
    (2 with ``threshold="none"``), no host sync.

    ``param`` is SmoothMax's ``a`` or LSE-LBA's ``r`` (float or ``[K]`` tensor; ignored by max
    and mean). Shapes: values ``[K, M]``, mask ``[M]`` / ``[K, M]`` bool or None ->
    (kept ``[K, M]`` float32, thresholds ``[K]``, scores ``[K]``).
    """
    if threshold not in ("otsu", "none"):
        raise InputError(f"threshold must be 'otsu' or 'none', got {threshold!r}")
    if pool_input not in ("heatmap", "logit"):
        raise InputError(f"pool_input must be 'heatmap' or 'logit', got {pool_input!r}")
    _forward_only(method, values, param if isinstance(param, Tensor) else None)
    mask = None if mask is None else mask.detach()
    tensor = param.detach() if isinstance(param, Tensor) else None
    scalar = 0.0 if isinstance(param, Tensor) else float(param)
    return _threshold_pool_op(
        values.detach(), mask, method, tensor, scalar, threshold == "otsu", int(nbins),
        pool_input == "logit",
    )  # fmt: skip
