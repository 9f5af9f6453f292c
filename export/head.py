"""ONNX export of the INSIGHT head: token grids in; raw heatmap, heatmap, thresholds, scores out.

The graph (``InsightOnnxHead``) is the model's own forward (the reference head) followed by the
dynamic threshold and the pooling of ``fastinsight.ops.threshold_pool`` with its export
implementation (``fastinsight.ops.graph_ops``: same results as the reference; see that module for the operator choices made for
TensorRT). It is exported with ``torch.onnx.export(..., dynamo=True)`` (torch.export + onnxscript),
which keeps the tile count N symbolic; the TorchScript exporter (``dynamo=False``) cannot, because
the per-tile ``LayerNorm([c, h, w])`` takes its normalised shape from the input.

Inputs and outputs (names are part of the deployment contract, see docs/deployment.md):

==================  ===========================  ==============================================
``tokens``          ``[N, C, h, w]`` io dtype    token grids of one slide (N = tiles, dynamic)
``mask``            ``[N, h, w]`` bool           optional (``with_mask``): tissue cells
``raw_heatmap``     ``[N, K, h, w]`` io dtype    ``sigmoid(D) * (1 - sigmoid(Cx))``
``heatmap``         ``[N, K, h, w]`` io dtype    raw heatmap kept above the Otsu threshold
``thresholds``      ``[K]`` float32              Otsu threshold per class, over the whole slide
``scores``          ``[K]`` float32              slide score per class (the model's pooling)
==================  ===========================  ==============================================

With ``head_only`` the graph stops at ``raw_heatmap`` (per tile, so it can be batched); with
``postprocess_only`` it starts there (input ``raw_heatmap``, outputs ``heatmap``, ``thresholds``,
``scores``), for slides sent through the head in chunks.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from fastinsight.errors import BackendError, FastInsightError
from fastinsight.models.insight import InsightModel
from fastinsight.ops import graph_ops
from fastinsight.ops.threshold_pool import IMPL_EXPORT, ThresholdAndPool

from ._guards import ExportOptionError, check_opset

PRECISIONS: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16}
DEFAULT_OPSET = 20
HEAD_OUTPUTS = ("raw_heatmap", "heatmap", "thresholds", "scores")
FORBIDDEN_OPS = frozenset({"ReduceLogSumExp"})


@dataclass(frozen=True)
class HeadExportOptions:
    """How the head is exported.

    - ``precision``: ``"fp32"`` or ``"fp16"``: weights, ``tokens`` and the heatmaps in that dtype
      (TensorRT 11 takes precision from the ONNX model, not from builder flags). Threshold and
      pooling always run in float32, as in the PyTorch model; ``thresholds`` and ``scores`` are
      float32.
    - ``head_only``: output ``raw_heatmap`` only (per tile: a Triton server can batch it).
    - ``postprocess_only``: the threshold and pooling alone: input ``raw_heatmap``
      ``[N, K, h, w]`` (a whole slide's, stitched from head-only chunks), outputs ``heatmap``,
      ``thresholds``, ``scores``.
    - ``with_mask``: add a ``mask`` input ``[N, h, w]`` (bool, True = tissue). Cells outside take
      no part in the threshold or the pooling and are zero in ``heatmap``. An all-False mask gives
      NaN thresholds and scores (the PyTorch API raises instead).
    - ``accum_dtype``: ``"float64"`` (Otsu statistics and pooling sums exactly as the reference;
      onnxruntime) or ``"float32"`` (TensorRT, which has no float64).
    - ``histogram``: ``"matmul"`` (factorised one-hot, TensorRT-native) or ``"scatter"``
      (``ScatterElements`` add; onnxruntime).
    - ``opset``: ONNX opset of the default domain.
    """

    precision: str = "fp32"
    head_only: bool = False
    postprocess_only: bool = False
    with_mask: bool = False
    accum_dtype: str = "float64"
    histogram: str = "matmul"
    opset: int = DEFAULT_OPSET

    def __post_init__(self) -> None:
        # Bad values are bad options: ExportOptionError, a ConfigError (exit 2).
        if self.precision not in PRECISIONS:
            raise ExportOptionError(
                f"precision must be one of {sorted(PRECISIONS)}, got {self.precision!r}"
            )
        if self.accum_dtype not in graph_ops.ACCUM_DTYPES:
            raise ExportOptionError(
                f"accum_dtype must be one of {sorted(graph_ops.ACCUM_DTYPES)}, "
                f"got {self.accum_dtype!r}"
            )
        if self.histogram not in graph_ops.HISTOGRAMS:
            raise ExportOptionError(
                f"histogram must be one of {graph_ops.HISTOGRAMS}, got {self.histogram!r}"
            )
        if self.head_only and self.postprocess_only:
            raise ExportOptionError("head_only and postprocess_only exclude each other; pick one")
        check_opset(self.opset, "opset (--opset)")

    @property
    def dtype(self) -> torch.dtype:
        return PRECISIONS[self.precision]

    @property
    def input_names(self) -> list[str]:
        first = "raw_heatmap" if self.postprocess_only else "tokens"
        return [first, "mask"] if self.with_mask else [first]

    @property
    def output_names(self) -> list[str]:
        if self.head_only:
            return ["raw_heatmap"]
        if self.postprocess_only:
            return list(HEAD_OUTPUTS[1:])
        return list(HEAD_OUTPUTS)

    @property
    def kind(self) -> str:
        """What the graph computes: ``insight_head``, ``insight_head_raw`` or ``insight_postprocess``."""
        if self.head_only:
            return "insight_head_raw"
        if self.postprocess_only:
            return "insight_postprocess"
        return "insight_head"


class InsightOnnxHead(nn.Module):
    """The exported graph: ``InsightModel`` forward, then threshold and pooling.

    Shapes: tokens ``[N, C, h, w]``, mask ``[N, h, w]`` bool (with_mask) ->
    raw_heatmap, heatmap ``[N, K, h, w]``; thresholds, scores ``[K]`` float32.
    """

    def __init__(self, model: InsightModel, options: HeadExportOptions) -> None:
        super().__init__()
        # A private reference copy: the export casts it to the io precision, and the fused
        # kernels are not exportable (the reference is the same function). Built anew, not
        # switched: a model's backend is fixed at construction.
        ref = InsightModel(model.config, backend="reference")
        ref.load_state_dict(model.state_dict())
        self.model = ref.cpu().eval()
        self.options = options
        cfg = ref.config
        self.threshold_pool = ThresholdAndPool(
            ref.pooling,
            threshold=cfg.threshold,
            otsu_bins=cfg.otsu_bins,
            pool_input=cfg.pool_input,
            impl=IMPL_EXPORT,
            accum_dtype=graph_ops.ACCUM_DTYPES[options.accum_dtype],
            histogram=options.histogram,
        )

    def forward(self, tokens: Tensor, mask: Tensor | None = None) -> tuple[Tensor, ...]:
        cfg = self.model.config
        if self.options.postprocess_only:
            raw = tokens  # the input is the raw heatmap
        elif cfg.context == "slide":
            raw = self.model(tokens, mask)
        else:
            raw = self.model(tokens)
        if self.options.head_only:
            return (raw,)
        k = raw.shape[1]
        raw32 = raw.float()
        values = raw32.transpose(0, 1).reshape(k, -1)
        flat_mask = None if mask is None else mask.reshape(-1)
        _, t, scores = self.threshold_pool(values, flat_mask)
        heatmap = raw32 * (raw32 > t[None, :, None, None]).to(raw32.dtype)
        if mask is not None:
            heatmap = heatmap * mask[:, None].to(heatmap.dtype)
        if self.options.postprocess_only:
            return heatmap.to(raw.dtype), t, scores
        return raw, heatmap.to(raw.dtype), t, scores


def free_grid(model: InsightModel) -> bool:
    """Whether the graph's grid axes (h, w) are dynamic.

    A channel norm has no fixed grid, and a ``context="slide"`` model takes one stitched slide
    grid whose size is the slide's, so h and w are free; a per-tile LayerNorm fixes them.
    """
    cfg = model.config
    return cfg.context == "slide" or cfg.norm == "channel"


def _dims(model: InsightModel) -> tuple[int, int, int]:
    """(C, h, w) of the example the graph is traced with.

    Where the grid axes are dynamic the example must not pin them: torch.export specialises a
    dimension whose example size is 0 or 1 (so a 1 x 1 grid, the CLAM/TRIDENT per-tile vectors of
    a ``context="slide"`` model, fails with "H = Dim('H', max=1)"), and duck-sizes two dims of
    equal example size into one symbol (which would force H == W). The example grid is therefore
    at least 2 x 3 and never square; a fixed grid keeps the model's own size.
    """
    cfg = model.config
    h, w = cfg.grid_size
    if free_grid(model):
        h = max(h, 2)
        w = max(w, 2)
        if w == h:
            w += 1
    return cfg.in_dim, h, w


def example_inputs(
    model: InsightModel, n: int, options: HeadExportOptions, seed: int = 0
) -> tuple[Tensor, ...]:
    """Random inputs for the exported graph.

    Shapes: tokens ``[n, C, h, w]`` (raw heatmap ``[n, K, h, w]`` in [0, 1] for a postprocess
    graph), mask ``[n, h, w]``.
    """
    c, h, w = _dims(model)
    gen = torch.Generator().manual_seed(seed)
    if options.postprocess_only:
        k = model.config.num_classes
        tokens = torch.rand(n, k, h, w, generator=gen).to(options.dtype)
    else:
        tokens = torch.randn(n, c, h, w, generator=gen).to(options.dtype)
    if not options.with_mask:
        return (tokens,)
    mask = torch.rand(n, h, w, generator=gen) > 0.25
    mask[0, 0, 0] = True
    return tokens, mask


@contextlib.contextmanager
def quiet_exporter() -> Iterator[None]:
    """Silence the exporter's progress prints and known-harmless warnings."""
    # torch._guards and the symbolic-shapes / dynamo loggers print whole tracebacks at ERROR
    # level before the exception they describe is raised; the exception is reported instead.
    names = (
        "torch.onnx",
        "torch.export",
        "onnxscript",
        "torch._guards",
        "torch._dynamo",
        "torch.fx.experimental.symbolic_shapes",
    )
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.CRITICAL)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with contextlib.redirect_stdout(io.StringIO()):
                yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


@contextlib.contextmanager
def exporter_failure(what: str) -> Iterator[None]:
    """Turn a failure inside ``torch.onnx.export`` into one ``BackendError`` line.

    The exporter raises its own exception types (``TorchExportError``, ``UserError``, ...) with
    messages of hundreds of lines; the CLI would show them as an internal error with a traceback.
    Nothing has been written when they occur (the file is saved afterwards), so the line says so
    and keeps the first line of the exporter's reason. ``FastInsightError`` (a bad input seen
    during the trace) passes through unchanged.
    """
    try:
        yield
    except FastInsightError:
        raise
    except Exception as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        reason = lines[0] if lines else "no reason given"
        raise BackendError(
            f"torch.onnx.export could not export {what} ({type(exc).__name__}: {reason[:300]}); "
            "nothing was written: try another --opset or torch/onnxscript version, and report "
            "it to fastinsight if it persists"
        ) from exc


def _check_exportable(model: InsightModel, options: HeadExportOptions) -> None:
    cfg = model.config
    if options.postprocess_only:
        return
    if cfg.context == "slide" and not options.with_mask:
        raise ExportOptionError(
            "this model uses context='slide' (one stitched slide grid and its tissue mask); "
            "export it with --with-mask"
        )


def build_head_program(model: InsightModel, options: HeadExportOptions) -> object:
    """Trace the head with ``torch.onnx.export(dynamo=True)``; returns the ``ONNXProgram``.

    Refuses (``CheckpointError``, naming the tensor) weights that are NaN/inf, or that overflow
    float16 in an fp16 export, before tracing.
    """
    from ._onnx_io import check_finite_weights

    _check_exportable(model, options)
    try:
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise BackendError(
            "ONNX export needs onnx and onnxscript; pip install 'fastinsight[export]'"
        ) from exc
    cfg = model.config
    check_finite_weights(model, "INSIGHT model")
    wrapper = InsightOnnxHead(model, options).eval().to("cpu", options.dtype)
    # Parameters used by threshold/pooling stay float32 whatever the io precision.
    if cfg.pooling == "lse_lba":
        wrapper.model.pooling.float()
    check_finite_weights(wrapper.model, "INSIGHT model", precision=options.precision)
    n_dim = torch.export.Dim("N", min=1, max=1 << 24)
    dyn_tokens: dict[int, object] = {0: n_dim}
    if free_grid(model):
        dyn_tokens.update({2: torch.export.Dim("H", min=1), 3: torch.export.Dim("W", min=1)})
    # Keyed by the wrapper's argument names (the ONNX names come from input_names).
    dynamic_shapes: dict[str, object] = {"tokens": dyn_tokens}
    if options.with_mask:
        dynamic_shapes["mask"] = {i: d for i, d in dyn_tokens.items() if i == 0} | {
            i - 1: d for i, d in dyn_tokens.items() if i >= 2
        }
    # N = 2 in the example: torch.export specialises sizes 0 and 1 (see ``_dims`` for h, w).
    example = example_inputs(model, 2, options)
    with torch.no_grad(), quiet_exporter(), exporter_failure("the INSIGHT head"):
        program = torch.onnx.export(
            wrapper,
            example,
            dynamo=True,
            input_names=options.input_names,
            output_names=options.output_names,
            dynamic_shapes=dynamic_shapes,
            opset_version=options.opset,
            optimize=True,
            verbose=False,
        )
    if program is None:
        raise BackendError("torch.onnx.export returned no program; upgrade torch and onnxscript")
    return program


def head_metadata(model: InsightModel, options: HeadExportOptions) -> dict[str, str]:
    """Metadata stored in the ONNX file, so a server knows what it runs."""
    import fastinsight

    cfg = model.config
    return {
        "fastinsight.version": fastinsight.__version__,
        "fastinsight.kind": options.kind,
        "fastinsight.config": cfg.to_json(),
        "fastinsight.precision": options.precision,
        "fastinsight.head_only": str(options.head_only).lower(),
        "fastinsight.postprocess_only": str(options.postprocess_only).lower(),
        "fastinsight.with_mask": str(options.with_mask).lower(),
        "fastinsight.accum_dtype": options.accum_dtype,
        "fastinsight.histogram": options.histogram,
        "fastinsight.class_names": ",".join(cfg.names),
    }


def export_head_onnx(
    model: InsightModel,
    out_path: str | os.PathLike[str],
    options: HeadExportOptions | None = None,
    *,
    check: bool = True,
    before_commit: Callable[[Path], object] | None = None,
) -> Path:
    """Export ``model`` to ``out_path`` (atomically) and check the graph.

    Returns the path written. Raises ExportOptionError (a ConfigError) for an unsupported
    model/option combination, BackendError when the export toolchain is missing or fails.
    ``before_commit(tmp_path)`` (a parity check: ``fastinsight.export.verify.export_verified_head``)
    runs on the finished graph before it replaces ``out_path``; if it raises, nothing is written.
    """
    from fastinsight.atomic import check_writable

    from ._onnx_io import finalize_and_save

    check_writable(out_path)  # fail before the export's seconds of work
    options = options or HeadExportOptions()
    program = build_head_program(model, options)
    proto = program.model_proto  # type: ignore[attr-defined]
    return finalize_and_save(
        proto,
        out_path,
        metadata=head_metadata(model, options),
        doc=f"INSIGHT head ({model.config.num_classes} classes), exported by fastinsight",
        forbidden_ops=FORBIDDEN_OPS,
        check=check,
        before_commit=before_commit,
    )
