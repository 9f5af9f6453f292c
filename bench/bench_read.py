"""Slide reading benchmark: tiles/s of the direct TIFF reader vs OpenSlide, side by side.

For every slide (the shared test slides, plus a generated 60k x 40k JPEG pyramid in /tmp made of
real Aperio tile bytes) and every reader that opens it (``openslide``, ``direct``), at 1 and 2
threads, it reads the same tiles two ways:

- ``region``: ``read_region`` of 256 x 256 level-0 pixels at fixed positions (what OpenSlide's
  ``read_region`` costs against ``pread`` + imagecodecs), through the tiler's threads;
- ``tile``: the full tiler path -- 224 px tiles at 0.5 um/px, window read + Lanczos resample.

Each run opens a fresh reader (cold decoded-tile cache; the OS page cache is warm after the
first run, so this measures decoding, not the disk). Rows report tiles/s, tiles/s per thread,
CPU ms per tile (process CPU time, all threads), and the largest pixel difference from
OpenSlide on the same tiles (0 when both use the same libjpeg-turbo / OpenJPEG; a different
JPEG decoder may differ by 1 level).

    python bench/bench_read.py --smoke --csv /tmp/read.csv     # seconds, CPU
    python bench/bench_read.py --csv bench/results/read.csv    # the recorded CPU run
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import REPO, STAMP_FIELDS, append_rows, run_stamp, versions  # noqa: E402

SLIDES = REPO.parent / "shared" / "data" / "slides"
SHARED = [
    "CMU-1-Small-Region.svs",
    "tcga-cr-7395-01a-01-ts1.svs",
    "OS-1-detail.ome.tif",
    "test3-DAPI-2-387.ndpi",
]
LARGE = "60000x40000"
FIELDS = [
    *STAMP_FIELDS,
    "python",
    "openslide",
    "tifffile",
    "imagecodecs",
    "slide",
    "reader",
    "mode",
    "threads",
    "tiles",
    "wall_s",
    "tiles_per_s",
    "tiles_per_s_per_thread",
    "cpu_ms_per_tile",
    "speedup_vs_openslide",
    "max_abs_diff_vs_openslide",
]


READER_VERSIONS = ("python", "openslide", "tifffile", "imagecodecs")


def make_large_pyramid(path: Path, width: int, height: int) -> Path:
    """A JPEG pyramid of ``width x height`` made of real H&E tile bytes (CMU-1-Small-Region's
    256 px crops, JPEG-encoded by tifffile) laid out pseudo-randomly inside an ellipse of
    'tissue', white glass outside; /2 levels down to ~2k px. Writes in seconds."""
    sys.path.insert(0, str(REPO / "tests" / "slide"))
    from slide_containers import sample_tile_payloads, write_tiled_tiff_from_payloads

    from fastinsight.slide import open_slide

    with open_slide(SLIDES / "CMU-1-Small-Region.svs", backend="direct") as src:
        w, h = src.dimensions
        crops = [
            src.read_region(x, y, 0, 256, 256)
            for y in range(0, h - 256, 256)
            for x in range(0, w - 256, 256)
        ]
    crops = crops[:63] + [np.full((256, 256, 3), 242, dtype=np.uint8)]
    payloads, tags = sample_tile_payloads(crops, "jpeg")
    white = len(payloads) - 1
    rng = np.random.default_rng(0)
    levels = []
    lw, lh = width, height
    while True:
        rows, cols = -(-lh // 256), -(-lw // 256)
        yy, xx = np.mgrid[0:rows, 0:cols]
        inside = ((yy - rows / 2) / (rows * 0.42)) ** 2 + ((xx - cols / 2) / (cols * 0.42)) ** 2 < 1
        choice = np.where(inside, rng.integers(0, white, size=(rows, cols)), white)
        levels.append((lw, lh, choice))
        if max(lw, lh) <= 2048:
            break
        lw, lh = -(-lw // 2), -(-lh // 2)
    return write_tiled_tiff_from_payloads(path, levels, payloads, tags, mpp=0.25, tile=256)


def positions(reader: Any, n: int) -> list[tuple[int, int]]:
    """``n`` level-0 positions on a jittered grid over the middle of the slide (tissue)."""
    w, h = reader.dimensions
    side = max(1, int(np.ceil(np.sqrt(n))))
    rng = np.random.default_rng(1)
    xs = np.linspace(w * 0.2, max(w * 0.2, w * 0.8 - 256), side)
    ys = np.linspace(h * 0.2, max(h * 0.2, h * 0.8 - 256), side)
    pts = [(int(x + rng.integers(0, 97)), int(y + rng.integers(0, 97))) for y in ys for x in xs]
    return pts[:n]


def run(slide: Path, backend: str, mode: str, threads: int, n: int) -> tuple[dict, list]:
    from concurrent.futures import ThreadPoolExecutor

    from fastinsight.slide import TileGrid, Tiler, open_slide

    reader = open_slide(slide, backend=backend)
    try:
        if mode == "region":
            pts = positions(reader, n)
            local: dict[int, Any] = {}
            handles = []

            def read(p: tuple[int, int]) -> np.ndarray:
                import threading

                key = threading.get_ident()
                if key not in local:
                    local[key] = reader.clone()
                    handles.append(local[key])
                return local[key].read_region(p[0], p[1], 0, 256, 256)

            c0, t0 = time.process_time(), time.perf_counter()
            with ThreadPoolExecutor(threads) as pool:
                out = list(pool.map(read, pts))
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            for hnd in handles:
                hnd.close()
        else:
            if not reader.has_mpp:  # no physical tile size (the TCGA slide): region mode only
                return {}, []
            grid = TileGrid.for_slide(reader, target_mpp=max(0.5, reader.mpp), tile_px=224)
            all_tiles = list(grid.tiles())
            mid = len(all_tiles) // 2 - n // 2
            tiles = all_tiles[max(0, mid) : max(0, mid) + n]
            tiler = Tiler(reader, grid, tiles, num_workers=threads, resample="lanczos")
            out = []
            c0, t0 = time.process_time(), time.perf_counter()
            for batch in tiler.batches(32, pin_memory=False):
                out.extend(np.asarray(batch.images))
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    finally:
        reader.close()
    count = len(out)
    row = {
        "slide": slide.name,
        "reader": backend,
        "mode": mode,
        "threads": threads,
        "tiles": count,
        "wall_s": round(wall, 4),
        "tiles_per_s": round(count / wall, 1),
        "tiles_per_s_per_thread": round(count / wall / threads, 1),
        "cpu_ms_per_tile": round(1000 * cpu / max(count, 1), 3),
    }
    return row, out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, seconds (CI)")
    ap.add_argument("--csv", type=Path, help="append rows to this CSV")
    ap.add_argument("--tiles", type=int, default=400, help="tiles per run")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--large", default=LARGE, help="generated pyramid size, WxH")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp"), help="where it is written")
    ap.add_argument("--slides", nargs="*", default=None, help="slide files (default: shared)")
    args = ap.parse_args(argv)

    n = 24 if args.smoke else args.tiles
    slides = [Path(s) for s in args.slides] if args.slides else [SLIDES / s for s in SHARED]
    slides = [s for s in slides if s.is_file()]
    if args.smoke:
        slides = slides[:1]
    if (SLIDES / SHARED[0]).is_file():
        size = "4096x3072" if args.smoke and args.large == LARGE else args.large
        w, h = (int(v) for v in size.split("x"))
        large = args.workdir / f"fastinsight-bench-{w}x{h}.tif"
        if not large.exists():
            t0 = time.perf_counter()
            make_large_pyramid(large, w, h)
            print(
                f"wrote {large} ({large.stat().st_size / 2**20:.0f} MiB) in "
                f"{time.perf_counter() - t0:.1f} s"
            )
        slides.append(large)
    common = {**run_stamp("cpu"), **versions(*READER_VERSIONS)}
    print(f"{'slide':32s} {'reader':9s} {'mode':6s} thr  tiles/s  /thread  cpu ms/tile  x os  diff")
    for slide in slides:
        for mode in ("region", "tile"):
            for threads in args.threads:
                ref: tuple[dict, list] | None = None
                for backend in ("openslide", "direct"):
                    try:
                        row, tiles = run(slide, backend, mode, threads, n)
                    except Exception as exc:  # a reader that cannot open this slide
                        print(f"{slide.name:32s} {backend:9s} {mode:6s} skipped: {exc}")
                        continue
                    if not row:
                        continue
                    if backend == "openslide":
                        ref = (row, tiles)
                        row["speedup_vs_openslide"] = 1.0
                        row["max_abs_diff_vs_openslide"] = 0
                    elif ref is not None and len(ref[1]) == len(tiles):
                        row["speedup_vs_openslide"] = round(
                            row["tiles_per_s"] / ref[0]["tiles_per_s"], 2
                        )
                        row["max_abs_diff_vs_openslide"] = int(
                            max(
                                int(np.abs(a.astype(np.int16) - b).max())
                                for a, b in zip(tiles, ref[1], strict=True)
                            )
                        )
                    else:
                        row["speedup_vs_openslide"] = ""
                        row["max_abs_diff_vs_openslide"] = ""
                    print(
                        f"{slide.name:32s} {backend:9s} {mode:6s} {threads:3d} "
                        f"{row['tiles_per_s']:8.1f} {row['tiles_per_s_per_thread']:8.1f} "
                        f"{row['cpu_ms_per_tile']:12.3f} {row['speedup_vs_openslide']!s:>5} "
                        f"{row['max_abs_diff_vs_openslide']!s:>4}",
                        flush=True,
                    )
                    if args.csv:  # each step is on disk as soon as it ends
                        append_rows(args.csv, FIELDS, [{**common, **row}])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
