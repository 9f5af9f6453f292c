"""CT volume throughput: slices/s through the encoder and seconds per volume, end to end.

    python bench/bench_volume.py --smoke --csv /tmp/volume.csv     # CPU, seconds
    python bench/bench_volume.py --device cuda                      # DINOv2 ViT-L/14 at 518 px

Full mode: a synthetic chest CT (default 512 x 512 x 64) through ``predict_volume`` with the
official recipe (518 px slices, 37 x 37 grid; random-init weights: timing only), the per-slice
(2d) and the cross-slice (3d) head. One CSV row per configuration, appended as soon as it ends,
with device, versions and git revision.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import REPO, STAMP_FIELDS, append_rows, run_stamp, versions  # noqa: E402

FIELDS = [
    *STAMP_FIELDS,
    "torch",
    "fastinsight",
    "encoder",
    "tile_px",
    "grid",
    "volume_shape",
    "slices",
    "slice_context",
    "batch_size",
    "repeats",
    "encode_s",
    "insight_s",
    "total_s",
    "slices_per_s",
    "s_per_volume",
]


def main(argv: list[str] | None = None) -> int:
    from fastinsight.models.config import InsightConfig
    from fastinsight.volume.io import Volume
    from fastinsight.volume.model import build_volume_model
    from fastinsight.volume.predict import VolumeOptions, build_volume_encoder, predict_volume
    from fastinsight.volume.preprocess import PreprocessOptions
    from fastinsight.volume.synthetic import make_chest_ct

    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--smoke", action="store_true", help="tiny CPU sizes (vit-tiny, 56 px, 64x64x8)")
    p.add_argument("--csv", default=str(REPO / "bench" / "results" / "volume.csv"))
    p.add_argument("--device", default=None)
    p.add_argument("--encoder", default="dinov2-vitl14-reg4")
    p.add_argument("--shape", default="512,512,64", help="synthetic volume X,Y,Z")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.smoke:
        enc_name, tile, opts = "vit-tiny", 56, {"patch_size_px": 14}
        shape, repeats, batch = (64, 64, 8), 1, 8
    else:
        enc_name, tile, opts = args.encoder, 518, {"random_init": True}
        shape = tuple(int(v) for v in args.shape.split(","))
        repeats, batch = args.repeats, args.batch_size
    encoder = build_volume_encoder(enc_name, tile, device=dev, options=opts)
    ct = make_chest_ct(shape, lesions=2, seed=0)  # type: ignore[arg-type]
    volume = Volume(ct.hu.astype(np.float32), ct.affine, {"format": "synthetic"})
    grid = encoder.grid_size
    cfg = InsightConfig(in_dim=encoder.embed_dim, grid_size=grid, norm="channel")
    options = VolumeOptions(PreprocessOptions(tile_size=tile), batch_size=batch)
    for ctx in ("2d", "3d"):
        torch.manual_seed(0)
        model = build_volume_model(cfg, ctx).to(dev).eval()
        predict_volume(volume, model, encoder, options)  # warm-up (compilation, allocator)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            res = predict_volume(volume, model, encoder, options)
            times.append((time.perf_counter() - t0, res.timings))
        total = float(np.median([t for t, _ in times]))
        enc = float(np.median([tm["encode"] for _, tm in times]))
        ins = float(np.median([tm["insight"] for _, tm in times]))
        row = {
            **run_stamp(dev),
            **versions("torch", "fastinsight"),
            "encoder": enc_name,
            "tile_px": tile,
            "grid": f"{grid[0]}x{grid[1]}",
            "volume_shape": "x".join(map(str, shape)),
            "slices": shape[2],
            "slice_context": ctx,
            "batch_size": batch,
            "repeats": repeats,
            "encode_s": round(enc, 4),
            "insight_s": round(ins, 4),
            "total_s": round(total, 4),
            "slices_per_s": round(shape[2] / max(enc, 1e-9), 2),
            "s_per_volume": round(total, 4),
        }
        append_rows(args.csv, FIELDS, [row])
        print(f"{ctx}: {row['slices_per_s']} slices/s, {row['s_per_volume']} s per volume")
    return 0


if __name__ == "__main__":
    sys.exit(main())
