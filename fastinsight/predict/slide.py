"""From a slide to a heatmap in one streaming pass.

Tiles are read and decoded in background threads, go through the patch encoder and straight
into the INSIGHT head batch by batch; only the raw heatmap cells ``[N, K, h, w]`` stay, on the
device. After the last batch the dynamic threshold and the pooling run over the slide's tissue
cells. The slide's token grid is never held whole, in memory or on disk: peak memory is bounded
by the batch size, not by the slide.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from fastinsight._version import __version__
from fastinsight.atomic import atomic_path
from fastinsight.context_bands import banded_raw_heatmap
from fastinsight.errors import ConfigError, InputError
from fastinsight.inputs import (
    check_dimensions,
    check_loaded_model,
    check_mpp,
    check_options,
    lent_to,
    option_bool,
    option_choice,
    option_device,
    option_fraction,
    option_int,
    option_path,
    resolve_device,
)
from fastinsight.models.insight import InsightModel, non_finite_scores_error
from fastinsight.ops.reference import tokens_as_grid
from fastinsight.slide import (
    Tile,
    TileGrid,
    Tiler,
    cell_scale_for,
    cell_tissue_mask,
    detect_tissue,
    open_slide,
    reading_provenance,
    tissue_tiles,
    write_geojson,
    write_heatmap_tiff,
    write_overlay,
    write_scores_sidecar,
)
from fastinsight.slide.placement import cut, grid_placement, paste, rc_placement
from fastinsight.text import dumps_json

STAGES = ("open", "tissue", "read", "transfer", "encoder", "head", "threshold_pool", "write")
# The overlay's slide picture: 16384 px on its longer side is ~800 MB of RGB at most.
MAX_THUMBNAIL_SIZE = 16384


@dataclass(frozen=True)
class PredictOptions:
    """Settings of one slide run; the CLI flags of ``fastinsight predict`` map onto these."""

    device: str | None = None
    batch_size: int = 64
    num_workers: int = 2
    tissue: str = "brightfield"
    min_tissue_fraction: float = 0.1
    min_cell_fraction: float = 0.5
    mpp: float | None = None
    reader_backend: Literal["auto", "direct", "openslide", "tifffile"] = "auto"
    # "cpu": tiles decoded by the tiler's threads; "device": the CPU only reads the JPEG bytes
    # and the batch is decoded on the run's device (nvJPEG on CUDA, torchvision's decoder on CPU).
    decode: Literal["cpu", "device"] = "cpu"
    encoder_weights: str | None = None
    progress: bool = True
    profile: bool = False
    thumbnail_size: int = 1024

    def __post_init__(self) -> None:
        """Every field checked here, as a ConfigError naming it (the CLI shows its flag): a bad
        value fails when the options are made, not hours into a run or as a TypeError."""
        from fastinsight.slide.readers import BACKENDS
        from fastinsight.slide.tissue import TISSUE_MODES

        option_device(self.device)
        ints = {
            "batch_size": option_int(self.batch_size, "batch_size", minimum=1),
            "num_workers": option_int(self.num_workers, "num_workers", minimum=0),
            "thumbnail_size": option_int(
                self.thumbnail_size, "thumbnail_size", minimum=1, maximum=MAX_THUMBNAIL_SIZE,
                what=" px (the longer side of the overlay's slide picture)",
            ),
        }  # fmt: skip
        fractions = {
            name: option_fraction(getattr(self, name), name)
            for name in ("min_tissue_fraction", "min_cell_fraction")
        }
        option_choice(self.tissue, "tissue", TISSUE_MODES)
        option_choice(self.reader_backend, "reader_backend", BACKENDS)
        option_choice(self.decode, "decode", ("cpu", "device"))
        option_path(self.encoder_weights, "encoder_weights")
        option_bool(self.progress, "progress")
        option_bool(self.profile, "profile")
        # numpy integers and floats become plain ones (frozen: set through object).
        for name, value in {**ints, **fractions}.items():
            object.__setattr__(self, name, value)
        if self.mpp is not None:
            object.__setattr__(self, "mpp", check_mpp(self.mpp, "mpp", "mpp", ConfigError))


class StageTimer:
    """Wall time per pipeline stage. With ``sync`` the device is synchronised at each boundary
    so GPU work is charged to the stage that launched it (costs a little throughput)."""

    def __init__(self, device: torch.device, sync: bool) -> None:
        self.seconds = dict.fromkeys(STAGES, 0.0)
        self._sync = sync and device.type == "cuda"

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        if self._sync:
            torch.cuda.synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            if self._sync:
                torch.cuda.synchronize()
            self.seconds[name] += time.perf_counter() - start


def class_heatmap_path(out: str | os.PathLike[str], class_name: str | None) -> Path:
    """``out`` itself, or ``<stem>.<class>.tif`` when every class gets its own file."""
    p = Path(out)
    return p if class_name is None else p.with_name(f"{p.stem}.{class_name}{p.suffix}")


def check_compatible(model: InsightModel, encoder: Any) -> None:
    """The encoder's tokens must be what the model was trained on; fail before any tile is read."""
    cfg = model.config
    if encoder.embed_dim != cfg.in_dim:
        raise InputError(
            f"encoder {encoder.name!r} gives {encoder.embed_dim} channels but the model expects "
            f"{cfg.in_dim}; use the encoder the model was trained with ({cfg.encoder!r})"
        )
    if cfg.norm == "tile" and tuple(encoder.grid_size) != tuple(cfg.grid_size):
        raise InputError(
            f"encoder {encoder.name!r} gives {encoder.grid_size} token grids but the model was "
            f"trained on {cfg.grid_size}; use tiles of {cfg.tile_size_px} px"
        )
    if encoder.grid_size[0] != encoder.grid_size[1]:
        raise InputError(f"the slide pipeline needs square token grids, got {encoder.grid_size}")


def tile_cells(mask: np.ndarray, tiles: list[Tile], cells: int) -> np.ndarray:
    """Cut the slide-level cell mask into per-tile grids (``fastinsight.slide.placement.cut``).

    Shapes: ``[R*c, C*c]`` -> ``[N, c, c]``."""
    rc = [(t.tile_row, t.tile_col) for t in tiles]
    return cut(mask, rc_placement(np.array(rc, dtype=np.int64).reshape(-1, 2), cells))


@dataclass(frozen=True)
class Outputs:
    """Which outputs of a ``SlideResult`` to write, and where (None: not written).

    ``heatmap``: pyramidal TIFF (with ``all_classes`` one ``<stem>.<class>.tif`` per class),
    ``overlay``: PNG over the slide thumbnail, ``geojson``: QuPath tiles or cells (``geojson_per``),
    ``scores``: the npz sidecar (raw float cells, mask, geometry: the one prediction format that
    ``fastinsight evaluate`` reads), ``report``: JSON, written last. ``class_`` picks the class of
    the single-class outputs.
    """

    heatmap: str | os.PathLike[str] | None = None
    overlay: str | os.PathLike[str] | None = None
    geojson: str | os.PathLike[str] | None = None
    scores: str | os.PathLike[str] | None = None
    report: str | os.PathLike[str] | None = None
    class_: str | int | None = None
    encoding: str = "score"
    all_classes: bool = False
    geojson_per: str = "tile"

    @classmethod
    def folder(cls, out: str | os.PathLike[str], *, geojson: bool = False, **kw: Any) -> Outputs:
        """The per-slide folder layout of ``predict-cohort`` and ``demo``: ``heatmap.tif``,
        ``overlay.png``, ``scores.npz``, ``report.json`` (and ``tiles.geojson``)."""
        d = Path(out)
        return cls(
            heatmap=d / "heatmap.tif",
            overlay=d / "overlay.png",
            geojson=d / "tiles.geojson" if geojson else None,
            scores=d / "scores.npz",
            report=d / "report.json",
            **kw,
        )

    def any(self) -> bool:
        return any(
            p is not None
            for p in (self.heatmap, self.overlay, self.geojson, self.scores, self.report)
        )


def pick_class(names: tuple[str, ...] | list[str], name_or_index: str | int | None) -> int:
    """The index of a class given by name or index (``--class``); None is the first class."""
    if name_or_index is None:
        return 0
    text = str(name_or_index)
    if text in names:
        return list(names).index(text)
    try:
        k = int(text)
    except ValueError:
        k = -1
    if 0 <= k < len(names):
        return k
    raise ConfigError(
        f"class_ {text!r} is not a class of the model: it has {list(names)} (names, or an index "
        f"0..{len(names) - 1})",
        fields=("class_",),
    )


@dataclass
class SlideResult:
    """Everything one slide run produced, able to write every output.

    Shapes: scores, thresholds ``[K]``; cells and raw_cells ``[K, R*c, C*c]`` float32 with NaN
    for non-tissue (cells after the threshold, raw_cells before); cell_mask ``[R*c, C*c]``.
    """

    slide_id: str
    slide_path: str
    scores: np.ndarray
    thresholds: np.ndarray
    cells: np.ndarray
    raw_cells: np.ndarray
    cell_mask: np.ndarray
    grid: TileGrid
    n_tiles: int
    class_names: tuple[str, ...]
    model_info: dict[str, Any]
    encoder_info: dict[str, Any]
    slide_info: dict[str, Any]
    timings: dict[str, float]
    thumbnail: np.ndarray | None = None
    # Feature-file runs: each tile's level-0 box where the file put it ``[N, 4]`` and its own
    # thresholded cells ``[K, N, h*w]``, for per-tile outputs (a CLAM file's tiles are not the
    # grid's). None for slide runs, whose tiles are the grid's.
    tile_boxes: np.ndarray | None = None
    tile_cells: np.ndarray | None = None

    @property
    def tiles_per_second(self) -> float:
        wall = self.timings.get("total", 0.0)
        return self.n_tiles / wall if wall > 0 else float("nan")

    def class_index(self, name_or_index: str | int | None) -> int:
        return pick_class(self.class_names, name_or_index)

    def write_outputs(self, outputs: Outputs) -> list[Path]:
        """Write every output ``outputs`` names, the report last (it records the write time).

        The one place outputs are written (``fastinsight predict``, ``predict-cohort`` and
        ``demo`` all call it), all or nothing: inside ``atomic_outputs`` every file goes to a
        temporary name and all are renamed into place when the last one is complete; if a write
        fails, the temporary files are removed and previous outputs keep their old version.
        Returns the paths written.
        """
        from fastinsight.atomic import atomic_outputs

        start = time.perf_counter()
        written: list[Path] = []
        with atomic_outputs():
            if outputs.heatmap is not None:
                written += self.write_heatmap(
                    outputs.heatmap,
                    outputs.class_,
                    encoding=outputs.encoding,
                    all_classes=outputs.all_classes,
                )
            if outputs.overlay is not None:
                self.write_overlay(outputs.overlay, outputs.class_)
                written.append(Path(outputs.overlay))
            if outputs.geojson is not None:
                self.write_geojson(outputs.geojson, outputs.class_, per=outputs.geojson_per)
                written.append(Path(outputs.geojson))
            if outputs.scores is not None:
                self.write_sidecar(outputs.scores)
                written.append(Path(outputs.scores))
            self.timings["write"] = time.perf_counter() - start
            if outputs.report is not None:
                self.write_report(outputs.report)
                written.append(Path(outputs.report))
        return written

    def write_heatmap(
        self,
        out: str | os.PathLike[str],
        class_: str | int | None = None,
        encoding: str = "score",
        all_classes: bool = False,
    ) -> list[Path]:
        """Pyramidal heatmap TIFF(s); with ``all_classes`` one file per class."""
        classes = list(range(len(self.class_names))) if all_classes else [self.class_index(class_)]
        paths = [
            class_heatmap_path(out, self.class_names[k] if all_classes else None) for k in classes
        ]
        for k, path in zip(classes, paths, strict=True):
            write_heatmap_tiff(
                path,
                self.cells[k],
                self.grid,
                encoding=encoding,  # type: ignore[arg-type]
                model=str(self.model_info.get("name", "")),
                class_name=self.class_names[k],
                slide=self.slide_id,
                extra_description={
                    "slide score": f"{self.scores[k]:.6f}",
                    "otsu threshold": f"{self.thresholds[k]:.6f}",
                },
            )
        return paths

    def write_overlay(self, out: str | os.PathLike[str], class_: str | int | None = None) -> None:
        if self.thumbnail is None:
            raise InputError("this result has no slide thumbnail; run from a slide for an overlay")
        k = self.class_index(class_)
        write_overlay(
            out,
            self.thumbnail,
            self.cells[k],
            cell_scale=cell_scale_for(self.grid, self.thumbnail.shape),
            title=f"{self.slide_id}  {self.class_names[k]}  score {self.scores[k]:.3f}",
        )

    def write_geojson(
        self, out: str | os.PathLike[str], class_: str | int | None = None, per: str = "tile"
    ) -> int:
        k = self.class_index(class_)
        own = {}
        if per == "tile" and self.tile_boxes is not None and self.tile_cells is not None:
            own = {"tile_boxes": self.tile_boxes, "tile_values": self.tile_cells[k]}
        return write_geojson(
            out, self.cells[k], self.grid, per=per, class_name=self.class_names[k], **own
        )

    def write_sidecar(self, out: str | os.PathLike[str]) -> None:
        write_scores_sidecar(
            out,
            self.cells,
            self.grid,
            mask=self.cell_mask,
            class_names=self.class_names,
            metadata={
                "slide_id": self.slide_id,
                "scores": self.scores.tolist(),
                "thresholds": self.thresholds.tolist(),
            },
        )

    def report(self) -> dict[str, Any]:
        return {
            "fastinsight": __version__,
            "slide_id": self.slide_id,
            "slide": self.slide_info,
            "scores": dict(zip(self.class_names, map(float, self.scores), strict=True)),
            "thresholds": dict(zip(self.class_names, map(float, self.thresholds), strict=True)),
            "model": self.model_info,
            "encoder": self.encoder_info,
            "grid": self.grid.to_dict(),
            "tiles": {
                "grid": self.grid.n_tiles,
                "processed": self.n_tiles,
                "tissue_cells": int(self.cell_mask.sum()),
            },
            "timings_s": {k: round(v, 4) for k, v in self.timings.items()},
            "tiles_per_s": round(self.tiles_per_second, 2),
        }

    def write_report(self, out: str | os.PathLike[str]) -> None:
        """The report as strict JSON: valid Unicode, and never NaN (refused before writing)."""
        text = dumps_json(self.report(), where="report", indent=2) + "\n"
        with atomic_path(out) as tmp:
            tmp.write_text(text, encoding="utf-8")


def _images_to_tensor(images: Any, device: torch.device) -> Tensor:
    t = images if isinstance(images, Tensor) else torch.from_numpy(np.ascontiguousarray(images))
    return t.to(device, non_blocking=True)


@dataclass
class SlideTiling:
    """An open slide with its tissue, grid, tissue tiles and cell mask: what a pass iterates."""

    reader: Any
    grid: TileGrid
    tiles: list[Tile]
    cell_mask: np.ndarray
    thumbnail: np.ndarray
    info: dict[str, Any]

    def tile_mask(self) -> np.ndarray:
        """Per-tile cell mask. Shapes: -> bool ``[N, c, c]``."""
        return tile_cells(self.cell_mask, self.tiles, self.grid.cells_per_side)


def open_tiling(
    slide: str | os.PathLike[str],
    encoder: Any,
    target_mpp: float,
    opts: PredictOptions,
    timer: StageTimer,
) -> SlideTiling:
    """Open ``slide`` and lay the encoder's tile grid over its tissue (errors come here, early)."""
    from fastinsight.errors import SlideError

    with timer.stage("open"):
        reader = open_slide(slide, mpp=opts.mpp, backend=opts.reader_backend)
    try:
        # Before the grid and the tissue mask are allocated from them.
        check_dimensions(*reader.dimensions, what=str(slide))
        check_mpp(reader.mpp, f"the mpp of {str(slide)!r} (pass --mpp to override it)")
        with timer.stage("tissue"):
            grid = TileGrid.for_slide(
                reader,
                target_mpp=target_mpp,
                tile_px=encoder.tile_size_px,
                cells_per_side=encoder.grid_size[0],
            )
            thumbnail = reader.thumbnail(opts.thumbnail_size)
            tissue = detect_tissue(reader, opts.tissue)  # type: ignore[arg-type]
            tiles = tissue_tiles(grid, tissue, opts.min_tissue_fraction)
            mask = cell_tissue_mask(grid, tissue, opts.min_cell_fraction, tiles=tiles)
            if not mask.any():
                raise SlideError(
                    f"no heatmap cell is at least {opts.min_cell_fraction:.0%} tissue in "
                    f"{str(slide)!r}; use --tissue all or lower --min-cell-tissue"
                )
    except BaseException:
        reader.close()
        raise
    info = {
        "path": str(slide),
        "vendor": reader.vendor,
        "dimensions": list(reader.dimensions),
        "mpp": reader.mpp,
        "level_count": reader.level_count,
        "level_downsamples": list(reader.level_downsamples),
        "tissue_mode": tissue.mode,
        "tissue_fraction": round(float(tissue.tissue_fraction), 4),
        # which reader and which level served tissue detection and the tiles
        "reading": reading_provenance(reader, grid, tissue),
    }
    return SlideTiling(reader, grid, tiles, mask, thumbnail, info)


def stream_tokens(
    tiling: SlideTiling,
    encoder: Any,
    device: torch.device,
    opts: PredictOptions,
    timer: StageTimer,
    desc: str,
) -> Iterator[tuple[int, Tensor]]:
    """Yield ``(first tile index, tokens [B, h*w, C])`` batch by batch, reading ahead in threads.

    The tokens are the encoder's own (bf16 on CUDA, channels last): the INSIGHT head takes
    ``[N, h*w, C]`` as it is, so no fp32 NCHW copy of the token grid is ever made (issue #11).
    On CUDA the host-to-device copies run on a side stream, ``depth`` batches ahead of the
    encoder (:class:`~fastinsight.slide.prefetch.DevicePrefetcher`), so the encoder does not
    wait for the copy; ``read`` is then the time the consumer waited for tiles and
    ``transfer`` the time spent staging them into pinned memory.
    """
    bar = _progress(len(tiling.tiles), opts.progress, desc)
    done = 0
    try:
        for images, n_tiles in _device_batches(tiling, device, opts, timer):
            with timer.stage("encoder"):
                tokens = encoder.encode_tokens(images)
            yield done, tokens
            done += n_tiles
            bar.update(n_tiles)
    finally:
        bar.close()


def _device_batches(
    tiling: SlideTiling, device: torch.device, opts: PredictOptions, timer: StageTimer
) -> Iterator[tuple[Tensor, int]]:
    """Tile batches as uint8 ``[B, H, W, 3]`` tensors on ``device``, timing read and transfer."""
    if opts.decode == "device":
        # The CPU reads compressed bytes only; decode, assembly and resampling run on the device.
        from fastinsight.slide.gpu_tiler import DeviceJpegTiler

        jpeg = DeviceJpegTiler(
            tiling.reader, tiling.grid, tiling.tiles, device=device, io_threads=opts.num_workers
        )
        for batch in jpeg.batches(opts.batch_size):
            timer.seconds["read"] += batch.read_wait_s
            timer.seconds["transfer"] += batch.stage_s
            yield batch.images, int(batch.images.shape[0])
        return
    tiler = Tiler(tiling.reader, tiling.grid, tiling.tiles, num_workers=opts.num_workers)
    if device.type == "cuda":
        from fastinsight.slide.prefetch import DevicePrefetcher

        source = tiler.batches(opts.batch_size, pin_memory=False)
        for batch in DevicePrefetcher(source, device, depth=2):
            timer.seconds["read"] += batch.read_wait_s
            timer.seconds["transfer"] += batch.stage_s
            yield batch.images, int(batch.images.shape[0])
        return
    for host in tiler.batches(opts.batch_size, pin_memory=False):
        timer.seconds["read"] += host.wait_seconds
        with timer.stage("transfer"):
            images = _images_to_tensor(host.images, device)
        yield images, len(host)


def _setup(
    model: InsightModel,
    encoder: Any,
    opts: PredictOptions,
    device: torch.device,
    allow_encoder_mismatch: bool,
    model_name: str,
) -> Any:
    """The encoder of the run (the model's own when None), both checked against the model and
    the device. The caller's model and encoder are already lent to ``device`` (``lent_to``)."""
    from fastinsight.encoders import build_encoder
    from fastinsight.encoders.identity import check_encoder_identity

    model.check_device(device)  # before any tile is read, not at the first batch
    cfg = model.config
    if encoder is None:
        encoder = build_encoder(
            cfg.encoder, opts.encoder_weights, tile_size_px=cfg.tile_size_px, device=device
        ).eval()
    else:
        # By name first: another encoder with the same token geometry passes check_compatible.
        check_encoder_identity(
            cfg.encoder,
            getattr(encoder, "name", type(encoder).__name__),
            model=model_name,
            allow_mismatch=allow_encoder_mismatch,
        )
    check_compatible(model, encoder)
    return encoder


def _check_options(options: object) -> PredictOptions:
    """``options`` (None: the defaults) as ``PredictOptions``; anything else is a ConfigError."""
    return check_options(options, PredictOptions, "fastinsight.predict.slide.PredictOptions")


def _check_slide_path(slide: object) -> None:
    """``slide`` is a path (str or ``os.PathLike``); else an InputError naming what it is."""
    if not isinstance(slide, (str, os.PathLike)):
        raise InputError(
            f"slide must be the path of a slide file (str or pathlib.Path), got "
            f"{type(slide).__name__}"
        )


def _check_encoder_arg(encoder: object, *, optional: bool) -> None:
    """``encoder`` is an encoder object (``fastinsight.encoders.build_encoder``), or None when
    ``optional`` (the model's own); a name or another object is a ConfigError."""
    if encoder is None and optional:
        return
    made = "fastinsight.encoders.build_encoder(name, weights, ...)"
    if isinstance(encoder, (str, os.PathLike)):
        raise ConfigError(
            f"encoder must be an encoder object, got the {type(encoder).__name__} "
            f"{os.fspath(encoder)!r}; build it with {made}"
            + (" or pass None for the model's own" if optional else "")
        )
    if not (hasattr(encoder, "encode_tokens") and hasattr(encoder, "grid_size")):
        raise ConfigError(
            f"encoder must be an encoder object ({made})"
            + (" or None for the model's own" if optional else "")
            + f", got {type(encoder).__name__}"
        )


def check_slide_model(model: object) -> None:
    """``model`` is a slide (INSIGHT) model; a radiograph or cross-slice CT model, a path or
    anything else is an InputError that names it and the function to use instead."""
    check_loaded_model(model, InsightModel, "slide", "fastinsight.load_model")
    if getattr(model, "slice_context", None) == "3d":
        raise InputError(
            "model is a cross-slice (3-D) CT volume model, whose context spans "
            "neighbouring slices, not tiles; predict CT volumes with "
            "fastinsight.volume.predict.predict_volume"
        )


@torch.no_grad()
def predict_slide(
    slide: str | os.PathLike[str],
    model: InsightModel,
    encoder: Any = None,
    options: PredictOptions | None = None,
    model_info: dict[str, Any] | None = None,
    *,
    allow_encoder_mismatch: bool = False,
) -> SlideResult:
    """Run one slide through tiler, encoder and INSIGHT head in a single streaming pass.

    ``encoder`` defaults to the one the model's config names (``options.encoder_weights`` for
    pretrained weights). Another encoder must be that one by name (``model.config.encoder``,
    compared by :func:`fastinsight.encoders.identity.encoder_key`): a head gives wrong outputs
    on another encoder's tokens even when their geometry fits, so a different name is a
    ConfigError unless ``allow_encoder_mismatch`` (the same network under another name; an
    official ``.pth`` records no encoder, and its config's ``"uni"`` is only assumed: pass it
    for another encoder whose tokens fit). Errors (unreadable slide, no mpp, no tissue, an
    encoder that is not the model's or does not fit it) come before any tile is encoded. The
    run uses ``model`` and ``encoder`` in eval mode on the run's device and gives them back as
    they came (training mode, device), also when it fails. Arguments of the wrong kind (a
    radiograph model, options that are not ``PredictOptions``, a slide that is not a path) are
    refused first, each with its own error.
    """
    opts = _check_options(options)
    _check_slide_path(slide)
    check_slide_model(model)
    _check_encoder_arg(encoder, optional=True)
    if model_info is not None and not isinstance(model_info, Mapping):
        raise ConfigError(
            f"model_info must be a dict (e.g. {{'name': ...}}) or None, got "
            f"{type(model_info).__name__}"
        )
    start = time.perf_counter()
    device = resolve_device(opts.device)
    # "auto" resolves the model's implementation for this device when it moves here.
    with lent_to(device, model, encoder):
        name = (model_info or {}).get("name")
        model_name = f"model {str(name)!r}" if name else "the model"
        encoder = _setup(model, encoder, opts, device, allow_encoder_mismatch, model_name)
        return _predict_slide(slide, model, encoder, opts, model_info, device, start)


def _predict_slide(
    slide: str | os.PathLike[str],
    model: InsightModel,
    encoder: Any,
    opts: PredictOptions,
    model_info: dict[str, Any] | None,
    device: torch.device,
    start: float,
) -> SlideResult:
    timer = StageTimer(device, sync=opts.profile)
    cfg = model.config
    tiling = open_tiling(slide, encoder, cfg.target_mpp, opts, timer)
    c = encoder.grid_size[0]
    n = len(tiling.tiles)
    slide_context = cfg.context == "slide"
    try:
        if slide_context:
            # The context convolutions run across tiles: keep the (small) token grids, stitch.
            buf = torch.empty((n, cfg.in_dim, c, c), dtype=torch.float32, device=device)
        else:
            buf = torch.empty((n, cfg.num_classes, c, c), dtype=torch.float32, device=device)
        for first, tokens in stream_tokens(tiling, encoder, device, opts, timer, Path(slide).name):
            if slide_context:
                grid = tokens_as_grid(tokens, (c, c))
                buf[first : first + tokens.shape[0]] = grid.float()
                continue
            with timer.stage("head"):
                buf[first : first + tokens.shape[0]] = model(tokens).float()
    finally:
        tiling.reader.close()
    mask_t = torch.from_numpy(tiling.tile_mask()).to(device)
    # One lattice from the slide's corner (fastinsight.slide.placement): the context grid and
    # the heatmap raster both put every tile at its own (tile_row, tile_col), exactly.
    placement = grid_placement(tiling.tiles, tiling.grid)
    if slide_context:
        with timer.stage("head"):
            # The context runs across tiles in bands of tile rows (exact; memory bounded by the
            # band, not the slide): the stitched grid of a whole slide would not fit.
            rc = torch.from_numpy(placement.cell_rc // c)
            raw = banded_raw_heatmap(
                buf, rc, model.head_weights(), mask_t, grid_tiles=tiling.grid.shape
            )
    else:
        raw = buf
    with timer.stage("threshold_pool"):
        heat, thresholds, scores = model.threshold_and_pool(raw, mask_t)
        if not bool(torch.isfinite(scores).all()):
            raise non_finite_scores_error(raw, mask_t)
        outside = ~mask_t[:, None]
        heat, raw = heat.masked_fill(outside, float("nan")), raw.masked_fill(outside, float("nan"))
        cells = paste(heat, placement, tiling.grid.cell_shape)
        raw_cells = paste(raw, placement, tiling.grid.cell_shape)
    timer.seconds["total"] = time.perf_counter() - start
    return SlideResult(
        slide_id=Path(slide).stem,
        slide_path=str(slide),
        scores=scores.cpu().numpy(),
        thresholds=thresholds.cpu().numpy(),
        cells=cells,
        raw_cells=raw_cells,
        cell_mask=tiling.cell_mask,
        grid=tiling.grid,
        n_tiles=n,
        class_names=cfg.names,
        # What "auto" resolved to on this run's device: the report says which maths ran.
        model_info={**(model_info or {"name": "in-memory model"}), "backend": model.backend_in_use},
        encoder_info=encoder.identity(),
        slide_info=tiling.info,
        timings=dict(timer.seconds),
        thumbnail=tiling.thumbnail,
    )


@torch.no_grad()
def encode_slide(
    slide: str | os.PathLike[str],
    encoder: Any,
    target_mpp: float = 0.5,
    options: PredictOptions | None = None,
) -> tuple[Tensor, Tensor, SlideTiling]:
    """Token grids of a slide's tissue tiles, kept in memory (for training on small cohorts).

    Shapes: -> tokens ``[N, C, h, w]`` float32 (on CPU), cell mask ``[N, h, w]`` bool.
    """
    opts = _check_options(options)
    _check_slide_path(slide)
    _check_encoder_arg(encoder, optional=False)
    device = resolve_device(opts.device)
    with lent_to(device, encoder):  # the caller's encoder comes back as it was
        timer = StageTimer(device, sync=False)
        tiling = open_tiling(slide, encoder, target_mpp, opts, timer)
        try:
            grid_size = tuple(encoder.grid_size)
            parts = [
                tokens_as_grid(t, grid_size).float().cpu()
                for _, t in stream_tokens(tiling, encoder, device, opts, timer, Path(slide).name)
            ]
        finally:
            tiling.reader.close()
    return torch.cat(parts), torch.from_numpy(tiling.tile_mask()), tiling


def _progress(total: int, enabled: bool, desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        unit="tile",
        desc=desc,
        disable=None if enabled else True,
        leave=False,
        dynamic_ncols=True,
    )
