"""Precomputed features in: the official INSIGHT, CLAM and TRIDENT h5 layouts, read as they are.

The three layouts (spec section 4):

- **insight** (official INSIGHT code): ``features`` ``[N, C, h, w]`` token grids (UNI: 1024 x 14 x
  14) and ``coords`` ``[N, 2]`` top-left (x, y) in level-0 px. No geometry attributes are
  documented; the level-0 tile size comes from attributes when present, a CLAM patches file, or the
  user.
- **clam**: ``h5_files/<slide>.h5`` holds ``features`` ``(N, D)`` float32 and ``coords`` ``(N, 2)``
  int32 with no attributes; the geometry is in ``patches/<slide>.h5`` (``coords`` attrs
  ``patch_size`` at ``patch_level`` and ``downsample``: level-0 tile = ``patch_size * downsample``)
  or given by the user.
- **trident**: ``features`` ``(N, D)`` (attrs ``encoder``, ``name``) and ``coords`` ``(N, 2)``
  int64 carrying ``patch_size`` (at the target magnification), ``patch_size_level0``,
  ``level0_magnification``, ``target_magnification``, ``overlap``, ``level0_width``,
  ``level0_height``; dict attributes are JSON strings and None is the string ``'None'``.

Per-tile vectors become ``[N, D, 1, 1]`` grids of one cell. ``SlideFeatures.stitched()`` places
every tile on one slide grid by its coordinates, for the slide-context model
(``InsightConfig.context="slide"``); a CLAM file whose tissue contours start their grids off each
other's lattice has one exact grid per lattice (``lattices()``, ``stitched_lattices()``), all
positions from ``fastinsight.slide.placement``; ``tile_mask()`` is the per-tile model's mask.

This module has no model code in it (house rule: the slide side knows nothing of the model).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fastinsight.errors import InputError
from fastinsight.inputs import check_coordinates
from fastinsight.slide.placement import lattice_rc, one_grid_rc, place_tiles
from fastinsight.text import loads_json

LAYOUTS: tuple[str, ...] = ("insight", "clam", "trident")
H5_SUFFIXES: tuple[str, ...] = (".h5", ".hdf5", ".he5")
# A stitched grid larger than this many tiles means the coordinates and the tile size disagree
# (e.g. level-0 coordinates read with a level-1 tile size); refuse rather than allocate.
MAX_GRID_TILES = 20_000_000


# --------------------------------------------------------------------------------------------
# attributes
# --------------------------------------------------------------------------------------------
def decode_attr(value: Any) -> Any:
    """An h5 attribute as a plain Python value.

    bytes -> str; the string ``'None'`` -> None (TRIDENT); JSON dict/list strings -> dict/list
    (TRIDENT); numpy scalars -> int/float/bool; numpy arrays -> lists.
    """
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, np.ndarray):
        return [decode_attr(v) for v in value.tolist()]
    if isinstance(value, str):
        text = value.strip()
        if text == "None":
            return None
        if text[:1] in "{[":
            try:
                return loads_json(text)
            except ValueError:
                return value
    return value


def _attrs(obj: Any) -> dict[str, Any]:
    return {str(k): decode_attr(v) for k, v in obj.attrs.items()}


def _as_number(value: Any) -> float | None:
    """A scalar attribute as a float (None, 'None', '', lists of one or unequal values -> None)."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        if not value:
            return None
        first = _as_number(value[0])
        if first is None or any(_as_number(v) != first for v in value[1:]):
            return None
        return first
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _as_int(value: Any) -> int | None:
    x = _as_number(value)
    if x is None or not math.isfinite(x) or x <= 0:
        return None
    return int(round(x))


# --------------------------------------------------------------------------------------------
# the geometry recorded in a file
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FileGeometry:
    """What a coords dataset's attributes say about the tiles (None where nothing is recorded).

    ``patch_size_l0``: tile side in level-0 px. ``step_l0``: grid pitch in level-0 px (smaller than
    the tile when tiles overlap). ``tile_size_px``: tile side at the encoder's resolution.
    ``mpp``: um/px at the encoder's resolution (TRIDENT: ``10 / target_magnification``, the usual
    20x = 0.5 um/px convention).
    """

    patch_size_l0: int | None = None
    step_l0: int | None = None
    tile_size_px: int | None = None
    mpp: float | None = None
    level0_size: tuple[int, int] | None = None
    source: str = ""


def _clam_level0_size(level_dim: Any, ds_x: float, ds_y: float) -> tuple[int, int] | None:
    """The slide's level-0 (width, height) from CLAM's ``level_dim``: the size of the patching
    level (``level_dim[patch_level]``), times that level's downsample."""
    dims = level_dim if isinstance(level_dim, (list, tuple, np.ndarray)) else None
    if dims is None or len(dims) != 2:
        return None
    w, h = _as_number(dims[0]), _as_number(dims[1])
    if not (w and h and w > 0 and h > 0 and math.isfinite(w) and math.isfinite(h)):
        return None
    return int(round(w * ds_x)), int(round(h * ds_y))


def geometry_from_attrs(attrs: Mapping[str, Any], source: str) -> FileGeometry:
    """Read TRIDENT-style or CLAM-style tile geometry off a ``coords`` dataset's attributes."""
    ps_l0 = _as_int(attrs.get("patch_size_level0"))
    patch_size = _as_int(attrs.get("patch_size"))
    if ps_l0 is not None:  # TRIDENT
        overlap = _as_number(attrs.get("overlap")) or 0.0
        scale = ps_l0 / patch_size if patch_size else 1.0
        # In floats first: a NaN or inf overlap (or one so large the product overflows) must
        # reach the check below, not crash ``int()`` (audit D7).
        pitch = ps_l0 - overlap * scale
        step = int(round(pitch)) if math.isfinite(pitch) else 0
        # TRIDENT's overlap is in px at the target magnification, 0 <= overlap < patch_size.
        # One that leaves no pitch (or a negative one) is a damaged record, not "no overlap":
        # falling back to the tile size would stitch the tiles at a pitch the file contradicts.
        if not math.isfinite(overlap) or overlap < 0 or step <= 0:
            shown = f"{pitch:g}" if math.isfinite(pitch) else "no finite"
            raise InputError(
                f"{source}: TRIDENT 'coords' attrs give overlap={overlap:g} for "
                f"patch_size={patch_size} (patch_size_level0={ps_l0}): a grid pitch of "
                f"{shown} level-0 px; overlap must be >= 0 and below the patch size (a finite "
                "number): the attributes are damaged, re-run the extraction"
            )
        target_mag = _as_number(attrs.get("target_magnification"))
        mpp = 10.0 / target_mag if target_mag and target_mag > 0 else None
        w0, h0 = _as_int(attrs.get("level0_width")), _as_int(attrs.get("level0_height"))
        return FileGeometry(
            patch_size_l0=ps_l0,
            step_l0=step if step > 0 else None,
            tile_size_px=patch_size,
            mpp=mpp,
            level0_size=(w0, h0) if w0 and h0 else None,
            source=source,
        )
    if patch_size is not None and "downsample" in attrs:  # CLAM
        ds = attrs.get("downsample")
        ds_list = ds if isinstance(ds, (list, tuple)) else [ds]
        ds_x = _as_number(ds_list[0]) if ds_list else None
        ds_y = _as_number(ds_list[-1]) if ds_list else None
        if ds_x is None or ds_y is None or ds_x <= 0:
            return FileGeometry(tile_size_px=patch_size, source=source)
        if int(ds_x) != int(ds_y):
            raise InputError(
                f"{source}: CLAM downsample {ds!r} differs in x and y; non-square level-0 tiles "
                "are not supported; pass --patch-size-l0"
            )
        # CLAM itself truncates the downsample to an int (WholeSlideImage.process_contour).
        ps = patch_size * max(1, int(ds_x))
        return FileGeometry(
            patch_size_l0=ps,
            step_l0=ps,
            tile_size_px=patch_size,
            level0_size=_clam_level0_size(attrs.get("level_dim"), ds_x, ds_y),
            source=source,
        )
    return FileGeometry(tile_size_px=patch_size, source=source)


# --------------------------------------------------------------------------------------------
# the features of one slide
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StitchedGrid:
    """Tiles placed on the slide grid (unpacks as ``grid, cell_mask, tile_rc``).

    Shapes: grid ``[1, C, R*h, Cols*w]`` (zeros off tissue), cell_mask ``[1, R*h, Cols*w]`` bool,
    tile_rc ``[N, 2]`` int64 (tile_row, tile_col) of every tile, in file order.
    ``origin_l0`` is the level-0 (x, y) of grid cell (0, 0)'s top-left corner and
    ``cell_size_l0`` the level-0 px one grid cell spans.
    """

    grid: Tensor
    cell_mask: Tensor
    tile_rc: Tensor
    origin_l0: tuple[int, int]
    cell_size_l0: float

    def __iter__(self) -> Iterator[Tensor]:
        return iter((self.grid, self.cell_mask, self.tile_rc))


@dataclass(frozen=True)
class SlideFeatures:
    """One slide's precomputed features with their tile coordinates.

    Shapes: tokens ``[N, C, h, w]`` float32 (per-tile vectors are ``[N, D, 1, 1]``),
    l0_xy ``[N, 2]`` int64 top-left (l0_x, l0_y) of each tile in level-0 px.

    ``patch_size_l0`` (level-0 px one tile covers) and ``step_l0`` (the pitch of the tile grid;
    equal to the tile size unless tiles overlap) are None when nothing recorded them; stitching
    then needs them from the user. ``encoder``, ``tile_size_px`` and ``mpp`` are what the file
    records about the extraction (TRIDENT), else None.
    """

    slide_id: str
    layout: str
    tokens: Tensor
    l0_xy: Tensor
    patch_size_l0: int | None = None
    step_l0: int | None = None
    encoder: str | None = None
    tile_size_px: int | None = None
    mpp: float | None = None
    level0_size: tuple[int, int] | None = None
    source: str = ""
    attrs: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    # -- shape ----------------------------------------------------------------------------------
    @property
    def num_tiles(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def in_dim(self) -> int:
        return int(self.tokens.shape[1])

    @property
    def grid_size(self) -> tuple[int, int]:
        """Cells per tile ``(h, w)``; ``(1, 1)`` for per-tile vectors."""
        return int(self.tokens.shape[2]), int(self.tokens.shape[3])

    @property
    def is_vector(self) -> bool:
        """True for one feature vector per tile (CLAM, TRIDENT)."""
        return self.grid_size == (1, 1)

    @property
    def l0_x(self) -> Tensor:
        return self.l0_xy[:, 0]

    @property
    def l0_y(self) -> Tensor:
        return self.l0_xy[:, 1]

    def require_tiles(self) -> SlideFeatures:
        """Return self, or raise InputError when the slide has no tiles."""
        if self.num_tiles == 0:
            raise InputError(
                f"slide {self.slide_id!r} has no tiles ({self.source or 'features'} holds "
                f"features of shape {tuple(self.tokens.shape)}); a prediction needs at least one "
                "tissue tile: re-run the patching or leave this slide out"
            )
        return self

    # -- the per-tile model -----------------------------------------------------------------------
    def tile_mask(self) -> Tensor:
        """Every cell of every tile is tissue. Shapes: ``[N, h, w]`` bool."""
        self.require_tiles()
        return torch.ones(self.num_tiles, *self.grid_size, dtype=torch.bool)

    # -- the slide grid -------------------------------------------------------------------------
    def _pitch(self) -> int:
        step = self.step_l0 or self.patch_size_l0
        if step is None:
            raise InputError(
                f"{self.source or self.slide_id}: the level-0 tile size is unknown ({self.layout} "
                "layout without geometry attributes); pass patch_size_l0 (--patch-size-l0) or "
                "the CLAM patches file (--patches-h5 / --patches-dir)"
            )
        if not self.is_vector and self.step_l0 not in (None, self.patch_size_l0):
            raise InputError(
                f"{self.source or self.slide_id}: tiles overlap (pitch {self.step_l0} px < tile "
                f"{self.patch_size_l0} px); token grids of overlapping tiles cannot be stitched; "
                "use the per-tile model (context='tile')"
            )
        return int(step)

    def tile_rc(self, snap: bool = False) -> Tensor:
        """Grid position of each tile. Shapes: ``[N, 2]`` int64 (tile_row, tile_col).

        The grid's origin is the smallest l0_x and l0_y of the slide, its pitch ``step_l0``
        (``fastinsight.slide.placement.one_grid_rc``). Coordinates must lie on that grid: an
        off-grid tile is an error naming the first one, unless ``snap`` rounds every tile to the
        nearest cell (moving it by up to half a tile). CLAM starts every tissue contour's grid at
        its own bounding-box corner: :meth:`lattices` places such files exactly, one grid per
        lattice. Two tiles on one cell are an error either way.
        """
        self.require_tiles()
        step = self._pitch()
        rc_np, off_grid = one_grid_rc(self.l0_xy.numpy(), step, snap=snap)
        if bool(off_grid.any()):
            i = int(np.argmax(off_grid))
            x, y = (int(v) for v in self.l0_xy[i])
            x0, y0 = (int(v) for v in self.l0_xy.amin(dim=0))
            raise InputError(
                f"{self.source or self.slide_id}: tile {i} at l0 (x={x}, y={y}) is off the "
                f"tile grid (origin ({x0}, {y0}), pitch {step} px); check the tile size "
                "(--patch-size-l0), or pass snap=True (--snap-to-grid) to round tiles to the "
                "nearest cell (CLAM grids differ per tissue contour: lattices() keeps each "
                "contour's grid exact)"
            )
        return self._checked_rc(torch.from_numpy(rc_np), step)

    def _checked_rc(self, rc: Tensor, step: int, index: Tensor | None = None) -> Tensor:
        """``rc`` after refusing a grid too large for the coordinates and two tiles on one cell
        (``index``: the file's indices of the tiles of ``rc``, for the message)."""
        rows, cols = int(rc[:, 0].max()) + 1, int(rc[:, 1].max()) + 1
        if rows * cols > MAX_GRID_TILES:
            raise InputError(
                f"{self.source or self.slide_id}: the tiles span a {rows} x {cols} grid at pitch "
                f"{step} px, more than {MAX_GRID_TILES} tiles; the tile size does not match the "
                "coordinates' units (pass the level-0 tile size with --patch-size-l0)"
            )
        flat = rc[:, 0] * cols + rc[:, 1]
        order = torch.argsort(flat, stable=True)
        dup = flat[order][1:] == flat[order][:-1]
        if bool(dup.any()):
            j = int(dup.nonzero()[0])
            a, b = sorted((int(order[j]), int(order[j + 1])))
            r, c = (int(v) for v in rc[b])
            first, second = (a, b) if index is None else (int(index[a]), int(index[b]))
            raise InputError(
                f"{self.source or self.slide_id}: tiles {first} and {second} fall on the same "
                f"grid cell (tile_row={r}, tile_col={c}) at pitch {step} px; duplicate or "
                "overlapping coordinates cannot be stitched; check --patch-size-l0"
            )
        return rc

    def stitched(self, snap: bool = False) -> StitchedGrid:
        """All tiles on one slide grid, for the slide-context model.

        Shapes: grid ``[1, C, R*h, Cols*w]``, cell_mask ``[1, R*h, Cols*w]`` bool, tile_rc
        ``[N, 2]``. Cells without a tile are zero and masked out.
        """
        rc = self.tile_rc(snap=snap)
        h, w = self.grid_size
        rows, cols = int(rc[:, 0].max()) + 1, int(rc[:, 1].max()) + 1
        c = self.in_dim
        cells = self.tokens.new_zeros(rows, cols, c, h, w)
        cells[rc[:, 0], rc[:, 1]] = self.tokens
        grid = cells.permute(2, 0, 3, 1, 4).reshape(1, c, rows * h, cols * w)
        occupied = torch.zeros(rows, cols, dtype=torch.bool)
        occupied[rc[:, 0], rc[:, 1]] = True
        cell_mask = occupied.repeat_interleave(h, 0).repeat_interleave(w, 1)[None]
        origin = self.l0_xy.amin(dim=0)
        return StitchedGrid(
            grid=grid,
            cell_mask=cell_mask,
            tile_rc=rc,
            origin_l0=(int(origin[0]), int(origin[1])),
            cell_size_l0=self.cell_size_l0(),
        )

    def lattices(self) -> list[tuple[Tensor, Tensor]]:
        """The tiles grouped by lattice, each group on its own exact grid.

        A lattice is a set of tiles whose coordinates differ by whole pitches: the one grid of
        an INSIGHT or TRIDENT file, one per phase of CLAM's per-contour grids (each contour's
        grid starts at its bounding-box corner). Returns ``(index, tile_rc)`` per lattice: the
        tiles' indices into this file (``[n]`` int64) and their ``(tile_row, tile_col)`` on the
        lattice's grid counted from its smallest l0_x and l0_y
        (``fastinsight.slide.placement.lattice_rc``). No tile moves; with one lattice this is
        ``(arange(N), tile_rc())``. Lattices come in the order of their first tile in the file.
        Shapes: -> list of (``[n]``, ``[n, 2]``) int64.
        """
        self.require_tiles()
        step = self._pitch()
        placement = place_tiles(self.l0_xy.numpy(), float(step), self.grid_size[1])
        rc = torch.from_numpy(lattice_rc(placement))
        groups = []
        for j in range(placement.num_lattices):
            index = torch.from_numpy(np.flatnonzero(placement.lattice == j))
            groups.append((index, self._checked_rc(rc[index], step, index)))
        return sorted(groups, key=lambda g: int(g[0][0]))  # in the file's order

    def stitched_lattices(self) -> list[tuple[Tensor, StitchedGrid]]:
        """:meth:`stitched` of every lattice on its own grid: ``(index, StitchedGrid)`` each,
        ``index`` the file's tiles in that grid (``StitchedGrid.tile_rc`` is in that order)."""
        out = []
        for index, _ in self.lattices():
            sub = self.subset(index)
            out.append((index, sub.stitched()))
        return out

    def subset(self, index: Tensor) -> SlideFeatures:
        """The same slide with only the tiles ``index`` (file order kept as given)."""
        return replace(self, tokens=self.tokens[index], l0_xy=self.l0_xy[index])

    def cell_size_l0(self) -> float:
        """Level-0 px one heatmap cell spans: the grid pitch over the cells per tile."""
        return self._pitch() / self.grid_size[1]

    def model_inputs(self, context: str, snap: bool = False) -> tuple[Tensor, Tensor]:
        """What ``InsightModel.predict`` takes for a model of the given ``context``.

        Shapes: ``"tile"`` -> (tokens ``[N, C, h, w]``, mask ``[N, h, w]``);
        ``"slide"`` -> (grid ``[1, C, H, W]``, cell_mask ``[1, H, W]``).
        """
        if context == "slide":
            st = self.stitched(snap=snap)
            return st.grid, st.cell_mask
        if context != "tile":
            raise InputError(f"context must be 'tile' or 'slide', got {context!r}")
        return self.tokens, self.tile_mask()


def unstitch(values: Tensor, tile_rc: Tensor, grid_size: tuple[int, int]) -> Tensor:
    """Cut a stitched slide map back into per-tile maps (the inverse of ``stitched``).

    Shapes: values ``[1, K, R*h, Cols*w]``, tile_rc ``[N, 2]`` -> ``[N, K, h, w]``.
    """
    h, w = grid_size
    _, k, hh, ww = values.shape
    cells = values[0].reshape(k, hh // h, h, ww // w, w).permute(1, 3, 0, 2, 4)
    return cells[tile_rc[:, 0], tile_rc[:, 1]]


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FeatureFileInfo:
    """What a feature file holds, read from its header only (no feature data is loaded).

    Shapes: ``features_shape`` is ``(N, C, h, w)`` or ``(N, D)``.
    """

    path: str
    layout: str
    features_shape: tuple[int, ...]
    features_dtype: str
    encoder: str | None
    geometry: FileGeometry

    @property
    def num_tiles(self) -> int:
        return int(self.features_shape[0])

    @property
    def in_dim(self) -> int:
        return int(self.features_shape[1])

    @property
    def grid_size(self) -> tuple[int, int]:
        if len(self.features_shape) == 4:
            return int(self.features_shape[2]), int(self.features_shape[3])
        return 1, 1

    @property
    def nbytes_float32(self) -> int:
        return int(np.prod(self.features_shape)) * 4


def _open_h5(path: Path) -> Any:
    import h5py

    from fastinsight.inputs import check_input_path

    # stat before opening: a FIFO would block, a loop or a folder gets its own clear words.
    check_input_path(path, "feature file", InputError)
    try:
        is_h5 = h5py.is_hdf5(str(path))
    except OSError:
        is_h5 = False
    if not is_h5:
        raise InputError(
            f"{str(path)!r} is not an HDF5 file; pass features saved as .h5 by the official "
            "INSIGHT code, CLAM (h5_files/) or TRIDENT (features_<encoder>/)"
        )
    try:
        return h5py.File(str(path), "r")
    except OSError as exc:
        raise InputError(f"cannot open HDF5 file {str(path)!r}: {exc}") from exc


# Soft links followed by hand before giving up: HDF5's own limit is 16 too.
_MAX_LINK_HOPS = 16


def _follow_links(fh: Any, name: str, path: Path) -> Any:
    """The object ``name`` names, reached one path component at a time without letting HDF5
    follow a link it would open blindly: soft links are followed here (at most
    :data:`_MAX_LINK_HOPS`, so a loop is an error, not HDF5's ``RuntimeError``), and an external
    link is refused before its file is opened (it may name any file: a FIFO blocks, /dev/zero
    never ends). Returns None when a component does not exist.
    """
    import h5py

    layout = "expected the official INSIGHT, CLAM or TRIDENT layout with 'features' and 'coords'"
    target = "/" + name.lstrip("/")
    for _ in range(_MAX_LINK_HOPS + 1):
        group = fh["/"]
        parts = [c for c in target.split("/") if c not in ("", ".")]
        for k, part in enumerate(parts):
            try:
                link = group.get(part, getlink=True)
            except (OSError, KeyError, ValueError, RuntimeError):
                return None
            if link is None:
                return None
            if isinstance(link, h5py.ExternalLink):
                raise InputError(
                    f"{str(path)!r}: {name!r} is an external link to {link.path!r} in file "
                    f"{link.filename!r}, which cannot be opened: fastinsight reads only data "
                    f"stored in the file itself (a link may name any file); {layout}"
                )
            if isinstance(link, h5py.SoftLink):
                base = group.name.rstrip("/")
                dest = link.path if link.path.startswith("/") else f"{base}/{link.path}"
                target = "/".join([dest.rstrip("/"), *parts[k + 1 :]])
                break
            try:
                obj = group.get(part)  # a hard link: no other file is opened
            except (OSError, KeyError, ValueError, RuntimeError):
                return None
            if k == len(parts) - 1:
                return obj
            if not isinstance(obj, h5py.Group):
                return None
            group = obj
        else:
            return group  # the root itself
    raise InputError(
        f"{str(path)!r}: {name!r} is a chain of more than {_MAX_LINK_HOPS} soft links (a loop); "
        f"the file is damaged; {layout}"
    )


def _dataset(fh: Any, name: str, path: Path) -> Any:
    """``fh[name]`` as an h5py Dataset, else one ``InputError`` saying what ``name`` is.

    A name can be listed by ``keys()`` and still not be a dataset: a group, a soft link to
    nothing, or an external link; "no dataset 'features' (found ['coords', 'features'])"
    would contradict itself, so each case is named. A dataset whose data lies outside the file
    (HDF5 external storage, a virtual dataset) is refused before a byte is read: its "data" can
    be a FIFO that blocks forever, a missing file, a short file HDF5 silently pads with zeros,
    or any file on the machine (audit D1).
    """
    import h5py

    layout = "expected the official INSIGHT, CLAM or TRIDENT layout with 'features' and 'coords'"
    try:
        link = fh.get(name, getlink=True)
    except (OSError, KeyError, ValueError, RuntimeError):
        link = None
    if link is None:
        found = sorted(fh.keys())
        raise InputError(f"{str(path)!r} has no dataset {name!r} (found {found}); {layout}")
    obj = _follow_links(fh, name, path)
    if obj is None:
        if isinstance(link, h5py.SoftLink):
            what = f"a link to {link.path!r}, which does not exist"
        else:
            what = "an object that cannot be opened"
        raise InputError(
            f"{str(path)!r}: {name!r} is {what}; store the {name} in the file itself ({layout})"
        )
    if not isinstance(obj, h5py.Dataset):
        kind = "a group" if isinstance(obj, h5py.Group) else f"a {type(obj).__name__}"
        inside = f" (holding {sorted(obj.keys())[:5]})" if isinstance(obj, h5py.Group) else ""
        raise InputError(f"{str(path)!r}: {name!r} is {kind}{inside}, not a dataset; {layout}")
    _check_storage(obj, name, path)
    return obj


def _check_storage(ds: Any, name: str, path: Path) -> None:
    """Refuse a dataset whose data is not stored in ``path`` itself (external raw files or a
    virtual layout), reading only its creation properties."""
    import h5py

    try:
        plist = ds.id.get_create_plist()
        layout = plist.get_layout()
        n_external = plist.get_external_count()
    except (OSError, RuntimeError, ValueError) as exc:
        raise InputError(
            f"{str(path)!r}: the storage of {name!r} cannot be read ({_one_line(exc)}); the "
            "file is damaged: re-run the feature extraction"
        ) from None
    fix = (
        "fastinsight reads only data stored in the feature file itself; rewrite it as a plain "
        "dataset (h5repack, or h5py: f2[name] = f1[name][()])"
    )
    if layout == h5py.h5d.VIRTUAL:
        raise InputError(
            f"{str(path)!r}: {name!r} is a virtual dataset (its data lies in other files); {fix}"
        )
    if n_external:
        files = []
        for i in range(min(n_external, 3)):
            try:
                raw = plist.get_external(i)[0]
                files.append(raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw)
            except (OSError, RuntimeError, ValueError):
                break
        shown = ", ".join(repr(f) for f in files) + (", ..." if n_external > len(files) else "")
        raise InputError(
            f"{str(path)!r}: {name!r} keeps its data in {n_external} external raw file(s) "
            f"({shown}), not in the file; {fix}"
        )


def _read_all(ds: Any, name: str, path: Path, dtype: Any = None) -> np.ndarray:
    """``ds[()]`` as an array; an HDF5 read error (a damaged chunk, a filter that is not
    available, a truncated file) is one ``InputError`` line."""
    try:
        return np.asarray(ds[()], dtype=dtype)
    except (OSError, RuntimeError, ValueError, TypeError) as exc:
        raise InputError(
            f"cannot read {name!r} of {str(path)!r}: {_one_line(exc)}; the file is damaged or "
            "was written with an HDF5 filter that is not installed: re-run the feature "
            "extraction"
        ) from None


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:300] or type(exc).__name__


def _detect_layout(feats: Any, coords: Any, path: Path) -> str:
    if feats.ndim == 4:
        return "insight"
    if feats.ndim == 2:
        if "encoder" in feats.attrs or "patch_size_level0" in coords.attrs:
            return "trident"
        return "clam"
    raise InputError(
        f"{str(path)!r}: 'features' has shape {tuple(feats.shape)}; expected token grids "
        "[N, C, h, w] (official INSIGHT) or per-tile vectors (N, D) (CLAM, TRIDENT)"
    )


def inspect_features(path: str | os.PathLike[str]) -> FeatureFileInfo:
    """Layout, shapes and recorded geometry of a feature file, without loading the features."""
    p = Path(path).expanduser()
    with _open_h5(p) as fh:
        feats = _dataset(fh, "features", p)
        coords = _dataset(fh, "coords", p)
        layout = _detect_layout(feats, coords, p)
        feat_attrs = _attrs(feats)
        geometry = geometry_from_attrs(_attrs(coords), str(p))
        encoder = feat_attrs.get("encoder")
        return FeatureFileInfo(
            path=str(p),
            layout=layout,
            features_shape=tuple(int(s) for s in feats.shape),
            features_dtype=str(feats.dtype),
            encoder=str(encoder) if encoder else None,
            geometry=geometry,
        )


def _read_patches_geometry(patches_h5: Path) -> tuple[FileGeometry, np.ndarray]:
    with _open_h5(patches_h5) as fh:
        coords = _dataset(fh, "coords", patches_h5)
        geometry = geometry_from_attrs(_attrs(coords), str(patches_h5))
        xy = _read_all(coords, "coords", patches_h5)
    if geometry.patch_size_l0 is None:
        raise InputError(
            f"{str(patches_h5)!r}: 'coords' has no tile geometry (expected CLAM attrs "
            "'patch_size' and 'downsample', or TRIDENT 'patch_size_level0'); pass "
            "--patch-size-l0 instead"
        )
    return geometry, xy


def _check_declared_sizes(feats_ds: Any, coords_ds: Any, path: Path) -> None:
    """Shapes from the header, checked before a byte is read: a few KB of h5 can declare TBs."""
    from fastinsight.inputs import check_allocation

    n = int(feats_ds.shape[0]) if feats_ds.ndim else 0
    if coords_ds.ndim >= 1 and int(coords_ds.shape[0]) != n:
        raise InputError(
            f"{str(path)!r}: 'features' has {n} tiles but 'coords' has {int(coords_ds.shape[0])}; "
            "the file is truncated or mixed up: re-run the feature extraction"
        )
    nbytes = int(np.prod(feats_ds.shape, dtype=object)) * 4  # read as float32
    nbytes += int(np.prod(coords_ds.shape, dtype=object)) * 8
    check_allocation(nbytes, f"{str(path)!r} (features {tuple(feats_ds.shape)})")


def _coords_array(raw: np.ndarray, n: int, path: Path) -> np.ndarray:
    if raw.size == 0 and n == 0:
        return np.zeros((0, 2), dtype=np.int64)
    if raw.ndim != 2 or raw.shape[1] != 2:
        raise InputError(
            f"{str(path)!r}: 'coords' has shape {tuple(raw.shape)}; expected (N, 2) top-left "
            "(x, y) in level-0 px"
        )
    if raw.shape[0] != n:
        raise InputError(
            f"{str(path)!r}: 'features' has {n} tiles but 'coords' has {raw.shape[0]}; the file "
            "is truncated or mixed up: re-run the feature extraction"
        )
    if np.issubdtype(raw.dtype, np.integer):
        if raw.size and raw.dtype == np.uint64 and int(raw.max()) > np.iinfo(np.int64).max:
            raise InputError(f"{str(path)!r}: 'coords' hold values beyond 2^63; damaged file")
        xy = raw.astype(np.int64)
        if xy.size:
            check_coordinates(int(xy.min()), int(xy.max()), str(path))
        return xy
    if np.issubdtype(raw.dtype, np.floating):
        finite = np.isfinite(raw).all(axis=1)
        integral = finite & (np.round(raw) == raw).all(axis=1)
        if not integral.all():
            i = int(np.flatnonzero(~integral)[0])
            raise InputError(
                f"{str(path)!r}: coords of tile {i} are {raw[i].tolist()}; expected integer "
                "level-0 px (slideflow stores centres and MONAI (y, x): convert them first)"
            )
        if raw.size:
            check_coordinates(int(raw.min()), int(raw.max()), str(path))
        return raw.astype(np.int64)
    raise InputError(f"{str(path)!r}: 'coords' has dtype {raw.dtype}; expected integers")


def read_features(
    path: str | os.PathLike[str],
    *,
    patches_h5: str | os.PathLike[str] | None = None,
    patch_size_l0: int | None = None,
    step_l0: int | None = None,
    slide_id: str | None = None,
    check_finite: bool = True,
) -> SlideFeatures:
    """Read one slide's features in the official INSIGHT, CLAM or TRIDENT layout.

    The layout is detected from the file (4-D ``features`` -> insight; TRIDENT's ``encoder`` /
    ``patch_size_level0`` attributes -> trident; 2-D without them -> clam). The level-0 tile size
    comes from ``patch_size_l0``, else the CLAM ``patches_h5`` file, else the file's own
    attributes; a value given here that contradicts the file is an error. ``step_l0`` overrides
    the grid pitch (default: the tile size, less TRIDENT's recorded overlap).

    Shapes: returns tokens ``[N, C, h, w]`` float32 (``[N, D, 1, 1]`` for vectors), l0_xy
    ``[N, 2]`` int64. An empty slide (``features`` ``(0, D)``) reads fine; ``require_tiles``,
    ``stitched`` and ``tile_mask`` raise on it.
    """
    p = Path(path).expanduser()
    sid = slide_id or p.stem
    with _open_h5(p) as fh:
        feats_ds = _dataset(fh, "features", p)
        coords_ds = _dataset(fh, "coords", p)
        layout = _detect_layout(feats_ds, coords_ds, p)
        if not np.issubdtype(feats_ds.dtype, np.floating):
            raise InputError(
                f"{str(p)!r}: 'features' has dtype {feats_ds.dtype}; expected floating point "
                "features (float16/32/64)"
            )
        feat_attrs = _attrs(feats_ds)
        coord_attrs = _attrs(coords_ds)
        _check_declared_sizes(feats_ds, coords_ds, p)
        feats = _read_all(feats_ds, "features", p, np.float32)
        raw_coords = _read_all(coords_ds, "coords", p)
    n = int(feats.shape[0])
    l0_xy = _coords_array(raw_coords, n, p)
    tokens = torch.from_numpy(feats)
    if tokens.ndim == 2:
        tokens = tokens[:, :, None, None]
    if check_finite and n:
        bad = ~torch.isfinite(tokens.reshape(n, -1)).all(dim=1)
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            x, y = (int(v) for v in l0_xy[i])
            raise InputError(
                f"{str(p)!r}: tile {i} at l0 (x={x}, y={y}) has NaN or inf features "
                f"({int(bad.sum())} bad tiles in all); re-extract the features of this slide"
            )

    geometry = geometry_from_attrs(coord_attrs, str(p))
    if patches_h5 is not None:
        patch_geom, patch_xy = _read_patches_geometry(Path(patches_h5).expanduser())
        _check_patches_match(patch_xy, l0_xy, Path(patches_h5), p)
        if geometry.patch_size_l0 not in (None, patch_geom.patch_size_l0):
            raise InputError(
                f"{str(p)!r} records a level-0 tile of {geometry.patch_size_l0} px but the "
                f"patches file says {patch_geom.patch_size_l0} px; pass the matching patches file"
            )
        geometry = patch_geom
    if patch_size_l0 is not None:
        if patch_size_l0 <= 0:
            raise InputError(f"patch_size_l0 must be a positive number of px, got {patch_size_l0}")
        if geometry.patch_size_l0 not in (None, patch_size_l0):
            raise InputError(
                f"{geometry.source!r} records a level-0 tile of {geometry.patch_size_l0} px but "
                f"--patch-size-l0 {patch_size_l0} was given; drop the flag or fix the value"
            )
        geometry = FileGeometry(
            patch_size_l0=int(patch_size_l0),
            step_l0=geometry.step_l0 if geometry.patch_size_l0 else int(patch_size_l0),
            tile_size_px=geometry.tile_size_px,
            mpp=geometry.mpp,
            level0_size=geometry.level0_size,
            source=geometry.source or "user",
        )
    step = step_l0 if step_l0 is not None else geometry.step_l0
    if step is not None and step <= 0:
        raise InputError(f"step_l0 must be a positive number of px, got {step}")
    encoder = feat_attrs.get("encoder")
    merged = {f"coords.{k}": v for k, v in coord_attrs.items()}
    merged.update({f"features.{k}": v for k, v in feat_attrs.items()})
    return SlideFeatures(
        slide_id=sid,
        layout=layout,
        tokens=tokens,
        l0_xy=torch.from_numpy(l0_xy),
        patch_size_l0=geometry.patch_size_l0,
        step_l0=step,
        encoder=str(encoder) if encoder else None,
        tile_size_px=geometry.tile_size_px,
        mpp=geometry.mpp,
        level0_size=geometry.level0_size,
        source=str(p),
        attrs=MappingProxyType(merged),
    )


def _check_patches_match(
    patch_xy: np.ndarray, l0_xy: np.ndarray, patches: Path, feats: Path
) -> None:
    """CLAM extracts features of exactly the tiles of its patches file: the sets must agree."""
    if patch_xy.size == 0 and l0_xy.size == 0:
        return
    a = np.asarray(patch_xy, dtype=np.int64).reshape(-1, 2)
    b = l0_xy
    same = a.shape == b.shape and np.array_equal(
        a[np.lexsort((a[:, 1], a[:, 0]))], b[np.lexsort((b[:, 1], b[:, 0]))]
    )
    if not same:
        raise InputError(
            f"patches file {str(patches)!r} lists {a.shape[0]} tiles that do not match the "
            f"{b.shape[0]} tiles of {str(feats)!r}; pass the patches file of the same CLAM run"
        )


def find_feature_files(folder: str | os.PathLike[str]) -> dict[str, Path]:
    """Feature files of a folder by slide id (the file stem). Shapes: n/a.

    A CLAM features folder may be given as its root (``h5_files/`` is used). A stem whose bytes
    are not UTF-8 (``b"slide\\xff.h5"`` on Linux) gets the id ``fastinsight.text.clean_text``
    makes of it, the byte written as the four characters ``\\xff``: that is how the id appears
    in every CSV and JSON fastinsight writes, and how a labels CSV names that slide.
    """
    from fastinsight.text import clean_text

    root = Path(folder).expanduser()
    if not root.is_dir():
        raise InputError(f"features folder {str(root)!r} does not exist or is not a folder")
    if (
        not any(f.suffix.lower() in H5_SUFFIXES for f in root.iterdir())
        and (root / "h5_files").is_dir()
    ):
        root = root / "h5_files"
    found: dict[str, Path] = {}
    for f in sorted(root.iterdir()):
        if f.is_file() and f.suffix.lower() in H5_SUFFIXES and not f.name.startswith("."):
            sid = clean_text(f.stem)
            if sid in found:
                raise InputError(
                    f"two feature files for slide {sid!r} in {str(root)!r} "
                    f"({clean_text(found[sid].name)}, {clean_text(f.name)}); keep one"
                )
            found[sid] = f
    if not found:
        raise InputError(
            f"no .h5 feature files in {str(root)!r}; pass the folder holding <slide_id>.h5 files"
        )
    return found


__all__ = [
    "LAYOUTS",
    "FeatureFileInfo",
    "FileGeometry",
    "SlideFeatures",
    "StitchedGrid",
    "decode_attr",
    "find_feature_files",
    "geometry_from_attrs",
    "inspect_features",
    "read_features",
    "unstitch",
]
