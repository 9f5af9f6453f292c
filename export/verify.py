"""Parity of exported ONNX graphs with the PyTorch reference, run with onnxruntime on CPU.

Tolerances (the suite's rule, see CONTRIBUTING conventions): fp32 is compared with a float64 run
of the reference at 1e-4; fp16 may be off the float64 reference by at most twice PyTorch's own
fp16 error on the same inputs plus a small floor. The Otsu threshold is checked two ways in fp32
(in fp16, the first way only, see ``verify_head_onnx``):

- exactness of the in-graph threshold: fed the graph's own ``raw_heatmap``, the PyTorch
  ``threshold_and_pool`` gives the graph's thresholds bit for bit (``accum_dtype="float64"``) and
  the same thresholded heatmap;
- end to end: the thresholds agree with the reference run on the same tokens within the fp32
  tolerance (the raw heatmaps differ in the last bits, so a threshold can differ by as much).
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fastinsight.errors import BackendError, OutputError, ParityError
from fastinsight.models.insight import InsightModel

from .head import HeadExportOptions, export_head_onnx

FP32_TOL = 1e-4
FP16_FLOOR = 5e-4


def _disagree(shown: object, what: str, detail: str, precision: str) -> ParityError:
    """The one-line ``ParityError`` of a graph whose outputs are off the reference.

    Exit 7 (``BackendError``): the graph is a back-end that disagrees with the reference, not an
    output path that cannot be written. The tolerances already allow for the export precision
    (twice PyTorch's own error at that precision), so what is left is a real disagreement; an
    fp16 user can still fall back to fp32.
    """
    fallback = "; export with --precision fp32" if precision != "fp32" else ""
    return ParityError(
        f"{shown}: onnxruntime and PyTorch disagree on {what}: {detail}; nothing was "
        f"written{fallback}, and please report it (with the model) if it persists"
    )


def ort_session(path: str | os.PathLike[str]) -> Any:
    """An onnxruntime CPU session on ``path`` (BackendError if onnxruntime is missing)."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise BackendError(
            "checking an export needs onnxruntime; pip install 'fastinsight[export]' or pass "
            "--no-verify"
        ) from exc
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def onnx_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in model.metadata_props}


def head_options_from_onnx(path: str | os.PathLike[str]) -> HeadExportOptions:
    """The export options recorded in a head's ONNX metadata."""
    meta = onnx_metadata(path)
    kinds = ("insight_head", "insight_head_raw", "insight_postprocess")
    if meta.get("fastinsight.kind") not in kinds:
        raise OutputError(
            f"{str(path)!r} is not an INSIGHT head exported by fastinsight (metadata "
            f"fastinsight.kind = {meta.get('fastinsight.kind')!r}); export it with "
            "`fastinsight export onnx`"
        )
    return HeadExportOptions(
        precision=meta["fastinsight.precision"],
        head_only=meta["fastinsight.head_only"] == "true",
        postprocess_only=meta.get("fastinsight.postprocess_only") == "true",
        with_mask=meta["fastinsight.with_mask"] == "true",
        accum_dtype=meta["fastinsight.accum_dtype"],
        histogram=meta["fastinsight.histogram"],
    )


@dataclass
class ParityReport:
    """What a parity check measured (max absolute differences over all sizes tried)."""

    what: str
    sizes: tuple[int, ...]
    precision: str
    errors: dict[str, float] = field(default_factory=dict)
    tolerances: dict[str, float] = field(default_factory=dict)
    thresholds_exact: bool | None = None

    def summary(self) -> str:
        parts = [
            f"{k} {v:.1e} (tol {self.tolerances.get(k, float('nan')):.0e})"
            for k, v in self.errors.items()
        ]
        if self.thresholds_exact is not None:
            parts.append(f"Otsu exact: {'yes' if self.thresholds_exact else 'no'}")
        sizes = ",".join(str(s) for s in self.sizes)
        return f"{self.what} {self.precision} vs PyTorch (N={sizes}): " + "; ".join(parts)

    def as_json(self) -> str:
        return json.dumps(self.__dict__, default=list)


def _head_inputs(
    model: InsightModel, n: int, options: HeadExportOptions, seed: int
) -> tuple[Tensor, Tensor | None]:
    cfg = model.config
    c = cfg.in_dim
    h, w = cfg.grid_size
    gen = torch.Generator().manual_seed(seed)
    if cfg.context == "slide":
        # One stitched slide grid: N tiles side by side.
        shape = (1, c, h, w * n)
    else:
        shape = (n, c, h, w)
    if options.postprocess_only:
        shape = (shape[0], cfg.num_classes, *shape[2:])
        tokens = torch.rand(*shape, generator=gen)
    else:
        tokens = torch.randn(*shape, generator=gen)
    mask = None
    if options.with_mask:
        mask = torch.rand(shape[0], *shape[2:], generator=gen) > 0.25
        mask.view(-1)[0] = True
    return tokens, mask


def _raw(model: InsightModel, tokens: Tensor, mask: Tensor | None) -> Tensor:
    with torch.no_grad():
        if model.config.context == "slide":
            return model(tokens, mask)
        return model(tokens)


def _max_abs(a: np.ndarray | Tensor, b: np.ndarray | Tensor) -> float:
    x = torch.as_tensor(np.asarray(a), dtype=torch.float64)
    y = torch.as_tensor(np.asarray(b), dtype=torch.float64)
    if x.shape != y.shape:
        raise ParityError(f"shape mismatch: {tuple(x.shape)} vs {tuple(y.shape)}")
    if not bool(torch.isfinite(x).all()):
        return float("inf")
    return float((x - y).abs().max()) if x.numel() else 0.0


def _bin_width(raw: Tensor, mask: Tensor | None) -> Tensor:
    k = raw.shape[1]
    v = raw.float().transpose(0, 1).reshape(k, -1)
    if mask is not None:
        keep = mask.reshape(1, -1).expand(k, -1)
        lo = torch.where(keep, v, torch.inf).amin(1)
        hi = torch.where(keep, v, -torch.inf).amax(1)
    else:
        lo, hi = v.amin(1), v.amax(1)
    return (hi - lo) / 256


def verify_head_onnx(
    onnx_path: str | os.PathLike[str],
    model: InsightModel,
    sizes: tuple[int, ...] = (1, 7, 64),
    seed: int = 0,
    options: HeadExportOptions | None = None,
    *,
    shown: str | os.PathLike[str] | None = None,
) -> ParityReport:
    """Run the exported head with onnxruntime against the PyTorch reference; raise ParityError.

    ``options`` default to those recorded in the file's metadata; ``shown`` is the name errors
    give the graph (the final output path while a temporary file is checked).

    fp16: the raw heatmap is compared end to end with the float64 reference (twice PyTorch's own
    fp16 error plus a floor), and the thresholds and scores with the reference's threshold and
    pooling run on the graph's own raw heatmap. Not with the reference's thresholds: Otsu's
    threshold is the argmax of a between-class variance that is often nearly flat, so a raw
    heatmap moved by 2e-4 (less than PyTorch's own fp16 error) can move it by many histogram bins
    (0.142 -> 0.163 on a trained tile-norm model, 8 bins), while the graph's threshold equals the
    reference's on the graph's raw heatmap to 2e-5. The end-to-end comparison measured that
    sensitivity of Otsu, not the export.
    """
    shown = onnx_path if shown is None else shown
    options = options or head_options_from_onnx(onnx_path)
    session = ort_session(onnx_path)
    # A reference copy built as one (a model's backend is fixed at construction).
    ref32 = InsightModel(model.config, backend="reference")
    ref32.load_state_dict(model.state_dict())
    ref32 = ref32.cpu().float().eval()
    ref64 = copy.deepcopy(ref32).double()
    low = copy.deepcopy(ref32).to(options.dtype) if options.precision != "fp32" else None
    report = ParityReport("INSIGHT head", tuple(sizes), options.precision)
    errs: dict[str, float] = {}
    tols: dict[str, float] = {}
    exact = True

    def note(name: str, err: float, tol: float) -> None:
        errs[name] = max(errs.get(name, 0.0), err)
        tols[name] = max(tols.get(name, 0.0), tol)
        if not err <= tol:
            raise _disagree(
                shown,
                name,
                f"max |diff| {err:.3g} > {tol:.3g} (N={n}, precision {options.precision})",
                options.precision,
            )

    for i, n in enumerate(sizes):
        tokens, mask = _head_inputs(ref32, n, options, seed + i)
        feeds = {options.input_names[0]: tokens.to(options.dtype).numpy()}
        if options.with_mask:
            feeds["mask"] = mask.numpy()  # type: ignore[union-attr]
        outs = dict(
            zip([o.name for o in session.get_outputs()], session.run(None, feeds), strict=True)
        )
        if options.postprocess_only:
            # The threshold and pooling alone, on the same raw heatmap as the reference.
            raw_in = tokens.to(options.dtype).float()
            with torch.no_grad():
                hm_same, t_same, s_same = ref32.threshold_and_pool(raw_in, mask)
            t_ort = torch.from_numpy(outs["thresholds"])
            same_tol = (
                0.0 if options.accum_dtype == "float64" else float(_bin_width(raw_in, mask).max())
            )
            note("thresholds", _max_abs(t_ort, t_same), same_tol)
            exact = exact and bool(torch.equal(t_ort, t_same))
            if bool(torch.equal(t_ort, t_same)):
                note("heatmap", _max_abs(outs["heatmap"], hm_same), 1e-6)
            note("scores", _max_abs(outs["scores"], s_same), FP32_TOL)
            continue
        raw64 = _raw(ref64, tokens.double(), mask)
        raw_ort = torch.from_numpy(outs["raw_heatmap"]).float()
        tol = FP32_TOL
        if low is not None:
            raw_low = _raw(low, tokens.to(options.dtype), mask)
            tol = 2 * _max_abs(raw_low, raw64) + FP16_FLOOR
        note("raw_heatmap", _max_abs(raw_ort, raw64), tol)
        if options.head_only:
            continue
        with torch.no_grad():
            hm_ref, t_ref, s_ref = ref32.threshold_and_pool(raw64.float(), mask)
            hm_same, t_same, s_same = ref32.threshold_and_pool(raw_ort, mask)
        t_ort = torch.from_numpy(outs["thresholds"])
        width = _bin_width(raw64, mask)
        if options.precision == "fp32":
            # The graph's threshold on its own raw heatmap: bit for bit with float64 statistics,
            # within one bin with float32 statistics.
            same_tol = 0.0 if options.accum_dtype == "float64" else float(width.max())
            note("thresholds (on the graph's raw heatmap)", _max_abs(t_ort, t_same), same_tol)
            exact = exact and bool(torch.equal(t_ort, t_same))
            if bool(torch.equal(t_ort, t_same)):
                note("heatmap", _max_abs(outs["heatmap"], hm_same), 1e-6)
            note("thresholds", _max_abs(t_ort, t_ref), tol if exact else float(width.max()))
            note("scores", _max_abs(outs["scores"], s_ref), tol)
        else:
            # Against the reference's threshold and pooling on the graph's own raw heatmap (see
            # the docstring). onnxruntime's CPU provider computes fp16 nodes in fp32 and may drop
            # the fp16 rounding between the head and the threshold, so the graph's threshold
            # sees values up to the raw heatmap's rounding away from ``raw_ort``: one histogram
            # bin plus that, and the scores twice PyTorch's own fp16 error plus that.
            exact = False
            with torch.no_grad():
                _, _, s_low = ref32.threshold_and_pool(raw_low.float(), mask)
            same_width = float(_bin_width(raw_ort, mask).max())
            note(
                "thresholds (on the graph's raw heatmap)", _max_abs(t_ort, t_same), same_width + tol
            )
            s_tol = 2 * _max_abs(s_low, s_ref) + 2 * tol
            note("scores (on the graph's raw heatmap)", _max_abs(outs["scores"], s_same), s_tol)
    report.errors, report.tolerances = errs, tols
    report.thresholds_exact = None if options.head_only else exact
    return report


def verify_encoder_onnx(
    onnx_path: str | os.PathLike[str],
    encoder: torch.nn.Module,
    sizes: tuple[int, ...] = (1, 3),
    seed: int = 0,
    *,
    shown: str | os.PathLike[str] | None = None,
) -> ParityReport:
    """Run an exported encoder (uint8 tiles in) against ``encoder.encode`` on the same tiles.

    ``shown`` is the name errors give the graph (the final path while a temp file is checked).
    """
    shown = onnx_path if shown is None else shown
    meta = onnx_metadata(onnx_path)
    precision = meta.get("fastinsight.precision", "fp32")
    session = ort_session(onnx_path)
    ref: Any = copy.deepcopy(encoder).cpu().float().eval()
    ref64: Any = copy.deepcopy(ref).double()
    low: Any = copy.deepcopy(ref).half() if precision == "fp16" else None
    t = int(encoder.tile_size_px)  # type: ignore[arg-type]
    report = ParityReport(f"encoder {getattr(encoder, 'name', '?')}", tuple(sizes), precision)
    for i, b in enumerate(sizes):
        gen = torch.Generator().manual_seed(seed + i)
        tiles = torch.randint(0, 256, (b, t, t, 3), dtype=torch.uint8, generator=gen)
        (tokens,) = session.run(None, {"tiles": tiles.numpy()})
        with torch.no_grad():
            x = ref.normalize(tiles)
            want = ref64(x.double())
            tol = FP32_TOL
            if low is not None:
                tol = 2 * _max_abs(low(x.half()), want) + FP16_FLOOR
        err = _max_abs(tokens, want)
        report.errors["tokens"] = max(report.errors.get("tokens", 0.0), err)
        report.tolerances["tokens"] = max(report.tolerances.get("tokens", 0.0), tol)
        if not err <= tol:
            raise _disagree(
                shown, "the token grid", f"max |diff| {err:.3g} > {tol:.3g} (B={b})", precision
            )
    return report


def export_verified_head(
    model: InsightModel,
    out_path: str | os.PathLike[str],
    options: HeadExportOptions | None = None,
    *,
    verify: bool = True,
    sizes: tuple[int, ...] = (1, 7, 64),
) -> tuple[Path, ParityReport | None]:
    """Export the head and check its parity *before* it replaces ``out_path``.

    Returns (path, report; None without ``verify``). A graph that fails the check raises
    ``ParityError`` and is never renamed into place: no failed file is left, an existing
    ``out_path`` keeps its previous contents.
    """
    opts = options or HeadExportOptions()
    reports: list[ParityReport] = []

    def check(tmp: Path) -> None:
        reports.append(verify_head_onnx(tmp, model, sizes, options=opts, shown=out_path))

    path = export_head_onnx(model, out_path, opts, before_commit=check if verify else None)
    return path, (reports[0] if reports else None)


def export_verified_encoder(
    encoder: torch.nn.Module,
    out_path: str | os.PathLike[str],
    precision: str = "fp32",
    opset: int | None = None,
    *,
    verify: bool = True,
) -> tuple[Path, ParityReport | None]:
    """``export_verified_head`` for a patch encoder (``export.encoder.export_encoder_onnx``)."""
    from .encoder import export_encoder_onnx
    from .head import DEFAULT_OPSET

    reports: list[ParityReport] = []

    def check(tmp: Path) -> None:
        reports.append(verify_encoder_onnx(tmp, encoder, shown=out_path))

    path = export_encoder_onnx(
        encoder,
        out_path,
        precision,
        DEFAULT_OPSET if opset is None else opset,
        before_commit=check if verify else None,
    )
    return path, (reports[0] if reports else None)


def describe(path: str | os.PathLike[str]) -> str:
    """One line naming an ONNX file's inputs and outputs (for CLI output)."""
    from ._onnx_io import graph_io

    inputs, outputs = graph_io(Path(path))

    def fmt(specs: list[Any]) -> str:
        return ", ".join(
            f"{s.name}[{','.join(str(d) for d in s.dims)}] {s.type_name}" for s in specs
        )

    return f"in: {fmt(inputs)}; out: {fmt(outputs)}"
