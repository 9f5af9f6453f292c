"""End-to-end slide benchmark: tiles/s and where the wall time goes.

Runs ``fastinsight.predict.slide.predict_slide`` with per-stage synchronisation (``profile=True``) and
records read (time the GPU waited for tiles), transfer, encoder, head, threshold+pool and write,
the tiles/s, and the fraction of wall time spent outside the encoder. One CSV row per run, with
the device name, versions and git revision, appended to ``bench/results/slide.csv``.

    python bench/bench_slide.py --smoke                       # CPU: vit-tiny on the Aperio slide
    python bench/bench_slide.py --encoder uni --random-init --batch-size 256 --repeat 3   # GPU
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import (  # noqa: E402
    REPO,
    STAMP_FIELDS,
    append_rows,
    device_name,
    git_rev,
    run_stamp,
    versions,
)

__all__ = ["device_name", "git_rev", "main", "run_once"]  # device_name, git_rev: older imports
DEFAULT_SLIDE = REPO.parent / "shared" / "data" / "slides" / "CMU-1-Small-Region.svs"
FIELDS = [
    *STAMP_FIELDS,
    "torch",
    "fastinsight",
    "slide",
    "encoder",
    "dtype",
    "batch_size",
    "num_workers",
    "tiles",
    "wall_s",
    "tiles_per_s",
    "slides_per_hour",
    "open_s",
    "tissue_s",
    "read_wait_s",
    "transfer_s",
    "encoder_s",
    "head_s",
    "threshold_pool_s",
    "write_s",
    "outside_encoder_frac",
]


def run_once(args: argparse.Namespace, model, encoder, out_dir: Path) -> dict[str, object]:
    from fastinsight.predict.slide import PredictOptions, predict_slide

    opts = PredictOptions(
        device=args.device,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        progress=False,
        profile=True,
        mpp=args.mpp,
    )
    result = predict_slide(args.slide, model, encoder, opts)
    start = time.perf_counter()
    result.write_heatmap(out_dir / "heatmap.tif")
    result.write_sidecar(out_dir / "scores.npz")
    t = result.timings
    t["write"] = time.perf_counter() - start
    wall = t["total"] + t["write"]
    dev = torch.device(opts.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return {
        **run_stamp(dev),
        **versions("torch", "fastinsight"),
        "slide": Path(args.slide).name,
        "encoder": encoder.name,
        "dtype": "bf16-autocast" if dev.type == "cuda" else "fp32",
        "batch_size": args.batch_size,
        "num_workers": args.num_workers,
        "tiles": result.n_tiles,
        "wall_s": round(wall, 4),
        "tiles_per_s": round(result.n_tiles / wall, 2),
        "slides_per_hour": round(3600 / wall, 1),
        "open_s": round(t["open"], 4),
        "tissue_s": round(t["tissue"], 4),
        "read_wait_s": round(t["read"], 4),
        "transfer_s": round(t["transfer"], 4),
        "encoder_s": round(t["encoder"], 4),
        "head_s": round(t["head"], 4),
        "threshold_pool_s": round(t["threshold_pool"], 4),
        "write_s": round(t["write"], 4),
        "outside_encoder_frac": round(1 - t["encoder"] / wall, 4),
    }


def main(argv: list[str] | None = None) -> int:
    from fastinsight import InsightConfig, InsightModel
    from fastinsight.encoders import build_encoder

    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--slide", default=str(DEFAULT_SLIDE))
    p.add_argument("--encoder", default="vit-tiny")
    p.add_argument(
        "--random-init", action="store_true", help="pretrained encoders with random weights"
    )
    p.add_argument("--device", default=None)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--mpp", type=float, default=None)
    p.add_argument("--repeat", type=int, default=1, help="timed runs after one warm-up run")
    p.add_argument("--csv", default=str(REPO / "bench" / "results" / "slide.csv"))
    p.add_argument("--smoke", action="store_true", help="CPU-sized run: vit-tiny, one timed run")
    args = p.parse_args(argv)
    if args.smoke:
        args.encoder, args.repeat = "vit-tiny", 1
    if not Path(args.slide).is_file():
        print(f"bench_slide: slide {args.slide} not found; pass --slide", file=sys.stderr)
        return 2
    kw = {"random_init": True} if args.random_init else {}
    encoder = build_encoder(args.encoder, device=args.device, **kw)
    model = InsightModel(
        InsightConfig(
            in_dim=encoder.embed_dim,
            num_classes=1,
            grid_size=encoder.grid_size,
            encoder=args.encoder,
        )
    )
    rows = []
    out = Path(args.csv)
    with tempfile.TemporaryDirectory() as tmp:
        run_once(args, model, encoder, Path(tmp))  # warm-up: kernels, allocator, file cache
        for _ in range(args.repeat):
            rows.append(run_once(args, model, encoder, Path(tmp)))
            append_rows(out, FIELDS, rows[-1:])  # on disk as soon as the run ends
    for r in rows:
        print(
            f"{r['device']}: {r['tiles']} tiles, {r['tiles_per_s']} tiles/s, "
            f"encoder {r['encoder_s']} s of {r['wall_s']} s "
            f"({100 * float(r['outside_encoder_frac']):.1f}% outside the encoder) -> {out}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
