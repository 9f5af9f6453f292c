"""The INSIGHT aggregator as a PyTorch module, with the official checkpoint layout.

Submodule names and indices are those of the official code, so an official ``state_dict`` loads
unchanged (spec section 1)::

    reduce_dimension_block  0 conv1x1(C->128)  1 GELU  2 LN[128]
    backbone_block          0 conv 1 GELU 2 LN 3 conv 4 GELU 5 LN 6 conv 7 GELU 8 LN 9 conv(->K)
    context_block           0 pad 1 conv3x3 2 GELU 3 LN ... 12 pad 13 conv3x3(->K)
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from fastinsight.atomic import atomic_path
from fastinsight.errors import BackendError, ConfigError, InputError
from fastinsight.models.config import InsightConfig
from fastinsight.ops.pooling import Pooling, as_bool_mask
from fastinsight.ops.reference import (
    ConvLayer,
    HeadWeights,
    gate,
    insight_head_cpu,
    insight_head_reference,
    insight_logits_reference,
    tokens_as_grid,
)
from fastinsight.ops.threshold_pool import IMPL_REFERENCE, IMPL_TRITON, ThresholdAndPool, tracing

if TYPE_CHECKING:
    import numpy as np

BACKEND_AUTO = "auto"
BACKEND_TRITON = IMPL_TRITON
BACKEND_REFERENCE = IMPL_REFERENCE
BACKENDS = (BACKEND_AUTO, BACKEND_TRITON, BACKEND_REFERENCE)

# fastinsight's own checkpoint: safetensors with these header metadata keys (see save()).
CONFIG_KEY = "fastinsight.config"
FORMAT_KEY = "fastinsight.format"
FORMAT_VERSION = "1"


class UnknownBackendError(ConfigError, BackendError):
    """``backend`` is not one of ``BACKENDS``: a bad option value, so a ConfigError (exit 2).

    It also derives from BackendError, which earlier versions raised here, so code that caught
    that keeps working. A known backend that cannot run here stays a plain BackendError (exit 7).
    """

    exit_code = ConfigError.exit_code


class ChannelNorm(nn.Module):
    """LayerNorm over the channels of each cell: the grid-agnostic alternative to LN[c, h, w]."""

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        y = nn.functional.layer_norm(
            x.movedim(1, -1), (x.shape[1],), self.weight, self.bias, self.eps
        )
        return y.movedim(-1, 1)


def _norm(config: InsightConfig, channels: int) -> nn.Module:
    if config.norm == "tile":
        return nn.LayerNorm([channels, *config.grid_size], eps=config.norm_eps)
    return ChannelNorm(channels, eps=config.norm_eps)


def _conv_chain(config: InsightConfig, kernel: int) -> nn.Sequential:
    """Detection (kernel 1) or context (kernel 3) chain with the official module indices."""
    dims = (config.reduce_dim, *config.widths, config.num_classes)
    layers: list[nn.Module] = []
    for i, (c_in, c_out) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        if kernel > 1:
            layers.append(nn.ReplicationPad2d(kernel // 2))
        layers.append(nn.Conv2d(c_in, c_out, kernel))
        if i < len(dims) - 2:
            layers += [nn.GELU(), _norm(config, c_out)]
    return nn.Sequential(*layers)


@dataclass(frozen=True)
class SlidePrediction:
    """What INSIGHT says about one slide.

    Shapes: scores ``[K]`` (slide probabilities), heatmap and raw_heatmap ``[N, K, h, w]``
    (after / before the dynamic threshold), thresholds ``[K]``, mask ``[N, h, w]`` bool or None.
    """

    scores: Tensor
    heatmap: Tensor
    raw_heatmap: Tensor
    thresholds: Tensor
    mask: Tensor | None = None
    class_names: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, object]:
        names = self.class_names or tuple(f"class{k}" for k in range(self.scores.numel()))
        return {
            "scores": {n: float(s) for n, s in zip(names, self.scores.tolist(), strict=True)},
            "thresholds": {
                n: float(t) for n, t in zip(names, self.thresholds.tolist(), strict=True)
            },
        }


class InsightModel(nn.Module):
    """INSIGHT: detection x context heatmap, dynamic (Otsu) threshold, slide pooling.

    ``backend`` names the implementation of the head, the threshold and the pooling:

    - ``"reference"``: plain PyTorch on any device; the only one with a backward pass, so the one
      to train with (``fastinsight train`` builds its models so);
    - ``"triton"``: the fused kernels of ``fastinsight.kernels``, forward only, on CUDA tensors
      (or on CPU under ``TRITON_INTERPRET=1``). Without Triton the model is not built
      (BackendError);
    - ``"auto"``: the kernels when the model's parameters are on a CUDA device and Triton is
      installed, else the reference.

    The choice is resolved when the model is built and again whenever it moves
    (``.to(device)``, ``.cuda()``, ``.cpu()``: ``auto`` follows the device), never during a call;
    ``backend_in_use`` says what it resolved to. A call the resolved implementation cannot run
    (the kernels on CPU tensors, or while autograd records a backward pass) raises one
    BackendError saying what to do, instead of quietly running the other implementation.
    ``backend`` itself is fixed: build another model to change it
    (``InsightModel(model.config, backend=...)`` then ``load_state_dict``).
    """

    def __init__(self, config: InsightConfig | None = None, backend: str = "auto") -> None:
        super().__init__()
        # Checked before anything is built: a bad name is a bad option (ConfigError).
        if not isinstance(backend, str) or backend not in BACKENDS:
            raise UnknownBackendError(
                f"backend must be one of {BACKENDS}, got {backend!r}", fields=("backend",)
            )
        if config is not None and not isinstance(config, InsightConfig):
            raise ConfigError(
                f"config must be an InsightConfig, got {type(config).__name__}", fields=("config",)
            )
        self.config = config or InsightConfig()
        cfg = self.config
        self.reduce_dimension_block = nn.Sequential(
            nn.Conv2d(cfg.in_dim, cfg.reduce_dim, 1), nn.GELU(), _norm(cfg, cfg.reduce_dim)
        )
        self.backbone_block = _conv_chain(cfg, kernel=1)
        self.context_block = _conv_chain(cfg, kernel=3)
        self.pooling = Pooling(cfg.pooling, cfg.num_classes, cfg.smoothmax_a, cfg.lse_r0)
        self.__dict__["_backend"] = backend
        self.__dict__["_backend_in_use"] = self._resolve_backend()

    # -- the implementation, chosen once -------------------------------------------------------
    @property
    def backend(self) -> str:
        """The implementation asked for: ``"auto"``, ``"triton"`` or ``"reference"``."""
        return str(self.__dict__["_backend"])

    @backend.setter
    def backend(self, value: str) -> None:
        raise BackendError(
            f"a model's backend is chosen when it is built (this one: {self.backend!r}); to run "
            f"another implementation build InsightModel(model.config, backend={value!r}) and "
            "load_state_dict(model.state_dict()) into it"
        )

    @property
    def backend_in_use(self) -> str:
        """What ``backend`` resolved to for the model's current device: ``"triton"`` (the fused
        kernels) or ``"reference"`` (PyTorch). Set at construction and on every move."""
        return str(self.__dict__["_backend_in_use"])

    @property
    def uses_kernels(self) -> bool:
        """True when the model runs the fused Triton kernels (``backend_in_use == "triton"``)."""
        return self.backend_in_use == BACKEND_TRITON

    def _resolve_backend(self) -> str:
        requested = self.backend
        if requested == BACKEND_REFERENCE:
            return BACKEND_REFERENCE
        from fastinsight.kernels import available, head_support_problem

        cfg = self.config
        unsupported = head_support_problem(cfg.reduce_dim, cfg.widths, cfg.num_classes)
        if requested == BACKEND_TRITON:
            if not available():
                raise BackendError(
                    "backend='triton' needs Triton, which cannot be imported here; install it "
                    "(pip install triton, on a machine with a CUDA GPU) or use backend='auto' "
                    "or 'reference'"
                )
            if unsupported:
                raise BackendError(f"backend='triton': {unsupported}; use backend='reference'")
            return BACKEND_TRITON
        if unsupported:  # "auto": the reference runs every architecture
            return BACKEND_REFERENCE
        first = next(self.parameters(), None)
        on_cuda = first is not None and first.device.type == "cuda"
        # Under the interpreter the kernels run on CPU tensors only, and "auto" never picks the
        # (slow) interpreter: the reference then serves every device.
        if on_cuda and not _interpreting() and available():
            return BACKEND_TRITON
        return BACKEND_REFERENCE

    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> InsightModel:
        # Every move or cast (.to, .cuda, .cpu, .half) goes through here: resolve "auto" again
        # for the new device, between calls.
        out = super()._apply(fn, recurse)
        if "_backend" in self.__dict__:
            self.__dict__["_backend_in_use"] = self._resolve_backend()
        return out

    def check_device(self, device: torch.device | str) -> None:
        """Raise BackendError when the resolved implementation cannot run on ``device``: the
        kernels need CUDA (CPU only under ``TRITON_INTERPRET=1``). The pipelines call it before
        reading the first tile."""
        dev = torch.device(device)
        if self.uses_kernels and dev.type != "cuda" and not (dev.type == "cpu" and _interpreting()):
            raise BackendError(
                f"this model runs the Triton kernels (backend={self.backend!r}) but the run is "
                f"on {dev}; the kernels run on CUDA devices: use --device cuda, or "
                "--backend reference / auto (backend='reference' or 'auto') on this machine"
            )

    def _check_call(self, *tensors: Tensor | None) -> None:
        """One clear error where the kernels cannot run this call (never a silent switch)."""
        if not self.uses_kernels:
            return
        for t in tensors:
            if t is not None:
                self.check_device(t.device)
        if torch.is_grad_enabled() and (
            any(t is not None and t.requires_grad for t in tensors)
            or any(p.requires_grad for p in self.parameters())
        ):
            raise BackendError(
                f"this model runs the Triton kernels (backend={self.backend!r}), which are "
                "forward-only, but autograd is recording: call it under torch.no_grad() or "
                "torch.inference_mode() (predict() does), or build the model with "
                "backend='reference' to train it"
            )

    # -- parameters as the reference / kernels take them -------------------------------------
    def head_weights(self) -> HeadWeights:
        """The head's parameters as a ``HeadWeights`` (no copies)."""

        def layers(seq: nn.Sequential) -> tuple[ConvLayer, ...]:
            mods = [m for m in seq if isinstance(m, (nn.Conv2d, nn.LayerNorm, ChannelNorm))]
            out = []
            for i, m in enumerate(mods):
                if not isinstance(m, nn.Conv2d):
                    continue
                nxt = mods[i + 1] if i + 1 < len(mods) else None
                norm = nxt if isinstance(nxt, (nn.LayerNorm, ChannelNorm)) else None
                out.append(
                    ConvLayer(
                        m.weight,
                        m.bias if m.bias is not None else torch.zeros(m.out_channels),
                        norm.weight if norm is not None else None,
                        norm.bias if norm is not None else None,
                    )
                )
            return tuple(out)

        (reduce,) = layers(self.reduce_dimension_block)
        return HeadWeights(
            reduce=reduce,
            detect=layers(self.backbone_block),
            context=layers(self.context_block),
            norm=self.config.norm,
            eps=self.config.norm_eps,
        )

    # -- the head -------------------------------------------------------------------------------
    def _check_tokens(self, tokens: Tensor) -> Tensor:
        if not isinstance(tokens, Tensor):
            raise InputError(
                "token grids must be a torch.Tensor (predict() also takes a numpy array); got "
                f"{type(tokens).__name__}"
            )
        grid = tokens_as_grid(tokens, self.config.grid_size)
        c = self.config.in_dim
        if grid.shape[1] != c:
            raise InputError(
                f"token grids have {grid.shape[1]} channels but the model expects {c}; "
                "use the encoder the model was trained with"
            )
        if self.config.norm == "tile" and tuple(grid.shape[2:]) != tuple(self.config.grid_size):
            h, w = self.config.grid_size
            raise InputError(
                f"token grids are {tuple(grid.shape[2:])} but this model's per-tile LayerNorm "
                f"was trained on {h} x {w}; use tiles of the model's size"
            )
        if not grid.is_floating_point():
            raise InputError(f"token grids must be floating point, got {grid.dtype}")
        self._check_device(grid, "token grids")
        return grid

    def _check_device(self, t: Tensor, what: str) -> None:
        """InputError for tensors without data (``meta``) or on another device than the model's
        parameters (O(1): no pass over the data). The kernels' own device rule is
        ``_check_call``'s BackendError."""
        if t.device.type == "meta":
            raise InputError(
                f"{what} are on the 'meta' device (shapes without data); pass real tensors"
            )
        if tracing() or (self.uses_kernels and self.config.context == "tile"):
            return
        first = next(self.parameters(), None)
        if first is not None and first.device != t.device:
            raise InputError(
                f"{what} are on {t.device} but the model is on {first.device}; move one to "
                f"the other (tensor.to('{first.device}') or model.to('{t.device}'))"
            )

    def _as_tokens(self, tokens: Any) -> Tensor:
        """A numpy array (or other array-like) as a tensor on the model's device."""
        if isinstance(tokens, Tensor):
            return tokens
        first = next(self.parameters(), None)
        try:
            return torch.as_tensor(tokens, device=None if first is None else first.device)
        except (TypeError, ValueError, RuntimeError):
            raise InputError(
                "token grids must be a torch.Tensor or a numpy array of floats; got "
                f"{type(tokens).__name__}"
            ) from None

    def _cell_mask(self, mask: Any, grid: Tensor) -> Tensor | None:
        """``mask`` as bool ``[N, h, w]`` for the token grids ``[N, C, h, w]``, or None.

        An integer or float mask (0/1, 0/255, numpy too) counts as tissue where non-zero."""
        if mask is None:
            return None
        cells = as_bool_mask(mask, "the tissue mask")
        want = (grid.shape[0], *grid.shape[2:])
        if tuple(cells.shape) != want:
            raise InputError(
                f"mask must be [N, h, w] = {want} (one entry per cell of the token grids "
                f"{tuple(grid.shape)}), got {tuple(cells.shape)}"
            )
        return cells

    def logits(self, tokens: Tensor, cell_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Shapes: tokens ``[N, C, h, w]`` | ``[N, h*w, C]``, cell_mask ``[N, h, w]`` ->
        (D, Cx) each ``[N, K, h, w]``. ``cell_mask`` applies to ``context="slide"`` only."""
        grid = self._check_tokens(tokens)
        mask = cell_mask if self.config.context == "slide" else None
        if mask is not None and not tracing():
            checked = self._cell_mask(mask, grid)
            mask = None if checked is None else checked.to(grid.device)
        return insight_logits_reference(grid, self.head_weights(), mask)

    def forward(self, tokens: Tensor, cell_mask: Tensor | None = None) -> Tensor:
        """Raw heatmap. Shapes: tokens ``[N, C, h, w]`` | ``[N, h*w, C]`` -> ``[N, K, h, w]``.

        With ``context="slide"`` the input is one stitched slide grid ``[1, C, H, W]`` and
        ``cell_mask`` ``[1, H, W]`` marks its tissue cells.
        """
        grid = self._check_tokens(tokens)
        if self.config.context == "slide":
            # The context convolutions run across tiles: the reference's (the kernels are per tile).
            return gate(*self.logits(grid, cell_mask))
        self._check_call(grid)
        if self.uses_kernels:
            from fastinsight.kernels import insight_head

            return insight_head(grid, self.head_weights())
        # Tokens may come from a bf16-autocast encoder; the reference runs in the weights' dtype.
        weights = self.head_weights()
        weight_dtype = weights.reduce.weight.dtype
        if (
            grid.device.type == "cpu"
            and not torch.is_grad_enabled()
            # An ONNX / torch.export trace records the reference graph: the CPU head's chunk
            # loop over N would pin the traced tile count (issue #6's dynamic N).
            and not torch.compiler.is_compiling()
            and not torch.onnx.is_in_onnx_export()
            and not torch.jit.is_tracing()
            and weight_dtype in (torch.float32, torch.float64)
            and all(layer.kernel_size == 3 for layer in weights.context)
        ):
            # Inference on a CPU: the same function as a channels-last GEMM chain (NCHW tokens
            # read without a copy, replication pad as a gather; equal to the reference ~1e-6).
            return insight_head_cpu(grid, weights)
        return insight_head_reference(grid.to(weight_dtype), weights)

    def raw_heatmap(self, tokens: Tensor, chunk_size: int | None = 4096) -> Tensor:
        """The raw heatmap of a bag of tiles, ``chunk_size`` tiles at a time (bounded memory)."""
        check_chunk_size(chunk_size)
        n = tokens.shape[0]
        if n == 0:
            raise InputError("no tiles: the bag of token grids is empty")
        if chunk_size is None or n <= chunk_size:
            return self(tokens)
        step = int(chunk_size)
        return torch.cat([self(tokens[i : i + step]) for i in range(0, n, step)])

    # -- threshold and pooling ----------------------------------------------------------------
    def _threshold_pool(self, *tensors: Tensor | None) -> ThresholdAndPool:
        """The one threshold + pooling assembly (``fastinsight.ops.threshold_pool``) of the
        resolved implementation (``backend_in_use``), after checking it can run on ``tensors``;
        built from the model's current pooling module and config (loaders may replace either)."""
        self._check_call(*tensors)
        cfg = self.config
        return ThresholdAndPool(
            self.pooling,
            threshold=cfg.threshold,
            otsu_bins=cfg.otsu_bins,
            pool_input=cfg.pool_input,
            impl=self.backend_in_use,
        )

    def threshold(self, values: Tensor, mask: Tensor | None) -> Tensor:
        """Per-class threshold over masked-in cells. Shapes: ``[K, M]``, ``[M]`` -> ``[K]``."""
        return self._threshold_pool(values, mask).threshold(values, mask)

    def pool(self, values: Tensor, mask: Tensor | None) -> Tensor:
        """Slide score per class. Shapes: ``[K, M]``, ``[M]`` -> ``[K]``."""
        return self._threshold_pool(values, mask).pool(values, mask)

    def threshold_and_pool(
        self, raw: Tensor, mask: Tensor | np.ndarray | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Dynamic threshold and pooling over a whole slide.

        Shapes: raw ``[N, K, h, w]``, mask ``[N, h, w]`` bool or None ->
        (heatmap ``[N, K, h, w]``, thresholds ``[K]``, scores ``[K]``).
        Non-tissue cells (mask False) take no part in the threshold or the pooling and are zero
        in the returned heatmap. An integer or float mask (0/1, 0/255) counts as tissue where it
        is non-zero: it selects cells, it never scales the heatmap.
        """
        if not isinstance(raw, Tensor):
            raise InputError(f"the raw heatmap must be a torch.Tensor, got {type(raw).__name__}")
        k_model = self.config.num_classes
        if raw.ndim != 4 or raw.shape[1] != k_model:
            raise InputError(
                f"the raw heatmap must be [N, K, h, w] with K = {k_model}, got {tuple(raw.shape)}"
            )
        if raw.device.type == "meta":
            raise InputError("the raw heatmap is on the 'meta' device (a shape without data)")
        n, k = raw.shape[:2]
        if raw.numel() == 0:
            raise InputError(
                "no tiles: the batch is empty (N = 0)"
                if n == 0
                else f"no cells: the raw heatmap {tuple(raw.shape)} is empty"
            )
        values = raw.float().transpose(0, 1).reshape(k, -1)
        flat_mask = None
        cells = None
        if mask is not None:
            cells = as_bool_mask(mask, "the tissue mask")
            if tuple(cells.shape) != (n, *raw.shape[2:]):
                raise InputError(
                    f"mask must be [N, h, w] = {(n, *raw.shape[2:])}, got {tuple(cells.shape)}"
                )
            if cells.device.type == "cpu" and not bool(cells.any()):  # free on the host
                raise InputError("the tissue mask is empty: no cell of the slide is tissue")
            cells = cells.to(device=raw.device)
            flat_mask = cells.reshape(-1)
        kept, t, scores = self._threshold_pool(values, flat_mask)(values, flat_mask)
        heatmap = kept.reshape(k, n, *raw.shape[2:]).transpose(0, 1)
        if cells is not None:
            heatmap = heatmap * cells[:, None]
        return heatmap, t, scores

    @torch.no_grad()
    def predict(
        self,
        tokens: Tensor | np.ndarray,
        mask: Tensor | np.ndarray | None = None,
        chunk_size: int | None = 4096,
        check_finite: bool = True,
    ) -> SlidePrediction:
        """Heatmap, thresholds and slide scores for one slide's token grids.

        Shapes: tokens ``[N, C, h, w]`` | ``[N, h*w, C]``, mask ``[N, h, w]`` bool (None = all) ->
        ``SlidePrediction``.

        ``tokens`` may also be a numpy array (converted, on the model's device). ``mask`` is
        True on tissue cells; an integer or float mask (0/1, 0/255, numpy too) counts as tissue
        where it is non-zero, and ``SlidePrediction.mask`` is that bool mask. ``chunk_size``
        (tiles per head call, None = all at once) must be a positive integer. Bad input (wrong
        shape, dtype or device, an empty batch or mask, NaN/inf tokens, a head that overflows)
        is one InputError; a bad option value is a ConfigError.
        """
        check_chunk_size(chunk_size)
        grid = self._check_tokens(self._as_tokens(tokens))
        if grid.shape[0] == 0:
            raise InputError("no tiles: the batch of token grids is empty (N = 0)")
        if grid.shape[2] == 0 or grid.shape[3] == 0:
            raise InputError(f"token grids have no cells: shape {tuple(grid.shape)}")
        cells = self._cell_mask(mask, grid)  # before the head: a bad mask costs nothing
        if self.config.context == "slide":
            raw = self(grid, cells)
        else:
            raw = self.raw_heatmap(grid, chunk_size)
        # NaN or inf in the tokens propagates through the convolutions and the LayerNorm to the
        # heatmap, so checking the small heatmap replaces a second full pass over the tokens.
        # Only once it failed are the tokens looked at, to tell bad features from an overflow.
        if check_finite and not bool(torch.isfinite(raw).all()):
            raise non_finite_heatmap_error(grid)
        return self.prediction(raw, cells, grid)

    def prediction(
        self, raw: Tensor, mask: Tensor | np.ndarray | None = None, tokens: Tensor | None = None
    ) -> SlidePrediction:
        """Threshold and pool a slide's raw heatmap into its ``SlidePrediction``.

        Shapes: raw ``[N, K, h, w]``, mask ``[N, h, w]`` bool (None = all) -> ``SlidePrediction``.
        ``tokens`` (optional) only sharpens the error message when a score is not finite.
        """
        cells = None if mask is None else as_bool_mask(mask, "the tissue mask")
        heatmap, t, scores = self.threshold_and_pool(raw, cells)
        # The one host synchronisation, after the slide is done: an empty mask on the device or
        # an overflow in the head surfaces here as NaN scores.
        if not bool(torch.isfinite(scores).all()):
            raise non_finite_scores_error(raw, cells, tokens)
        return SlidePrediction(
            scores=scores,
            heatmap=heatmap,
            raw_heatmap=raw,
            thresholds=t,
            mask=cells,
            class_names=self.config.names,
        )

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def save(self, path: str) -> None:
        """Write fastinsight's own checkpoint: safetensors with the config embedded as JSON."""
        from safetensors.torch import save_file

        state = {
            k: v.detach().to("cpu", torch.float32).contiguous()
            for k, v in self.state_dict().items()
        }
        meta = {CONFIG_KEY: self.config.to_json(), FORMAT_KEY: FORMAT_VERSION}
        with atomic_path(path) as tmp:
            save_file(state, str(tmp), metadata=meta)


def _interpreting() -> bool:
    """True when Triton runs its kernels in the CPU interpreter (``TRITON_INTERPRET=1``, read as
    ``fastinsight.kernels`` reads it)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_chunk_size(chunk_size: object) -> None:
    """ConfigError unless ``chunk_size`` is None or a positive integer (tiles per head call)."""
    if chunk_size is None:
        return
    if (
        isinstance(chunk_size, bool)
        or not isinstance(chunk_size, numbers.Integral)
        or int(chunk_size) < 1
    ):
        raise ConfigError(
            "chunk_size must be a positive integer (tiles per head call) or None (all at "
            f"once), got {chunk_size!r}",
            fields=("chunk_size",),
        )


def non_finite_heatmap_error(tokens: Tensor | None) -> InputError:
    """Why the raw heatmap holds NaN or inf, as the error to raise (called only once it does).

    Shapes: tokens ``[N, C, h, w]`` | ``[N, h*w, C]`` or None. Non-finite tokens are bad
    features; finite tokens mean the head overflowed (values too large for the compute dtype:
    fp16 overflows above 65504, fp32 above 3.4e38). Looking at the tokens costs one pass over
    them, which the error path alone pays.
    """
    if tokens is not None and tokens.numel():
        finite = torch.isfinite(tokens.detach())
        if not bool(finite.all()):
            bad = int((~finite).sum())
            return InputError(
                f"token grids contain NaN or inf ({bad} of {tokens.numel()} values); check the "
                "feature extraction"
            )
        where = (
            f"the INSIGHT head overflowed: finite inputs (largest |token| "
            f"{float(tokens.detach().abs().max()):.3g}) gave NaN/inf in the heatmap"
        )
    else:
        where = (
            "the encoder or the INSIGHT head overflowed: the heatmap holds NaN/inf on tissue "
            "(float16 overflows above 65504)"
        )
    return InputError(
        f"{where}; the features or the model's weights are far out of range: check the "
        "feature extraction (normalisation, units) and the model"
    )


def non_finite_scores_error(
    raw: Tensor, mask: Tensor | None, tokens: Tensor | None = None
) -> InputError:
    """Why a slide's scores came out NaN or inf, as the error to raise.

    Shapes: raw ``[N, K, h, w]``, mask ``[N, h, w]`` or None, tokens ``[N, C, h, w]`` or None.
    A non-finite raw heatmap on tissue cells comes from NaN/inf tokens or an overflow (see
    ``non_finite_heatmap_error``); otherwise the tissue mask was empty.
    """
    on_tissue = raw if mask is None else raw.movedim(1, -1)[mask.to(raw.device, torch.bool)]
    if on_tissue.numel() and not bool(torch.isfinite(on_tissue).all()):
        return non_finite_heatmap_error(tokens)
    return InputError("the tissue mask is empty: no cell of the slide is tissue")
