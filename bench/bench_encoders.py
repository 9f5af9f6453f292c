"""Encoder benchmark: tiles/s of each patch encoder per batch size, eager against compiled.

For every model and batch size, times ``encoder.encode_tokens(tiles)`` on uint8 tiles already on
the device (normalisation, the network and the channels-last ``[B, h*w, C]`` tokens included;
host-to-device transfer excluded, the slide benchmark has it), in two modes:

- ``eager``: the timm network with bf16 weights and a bf16 residual stream (CUDA; fp32 on CPU),
  attention through ``scaled_dot_product_attention``;
- ``compiled``: the same encoder under ``torch.compile(dynamic=False)`` (one static batch).

Reported per row: median ms per batch, tiles/s, the input rate in GB/s (uint8 tile bytes per
second: what the reader and decoder must sustain), TFLOP/s from the ViT's matmul FLOPs
(2 * MACs of the linear layers and attention), and the device, versions and git revision.
Pretrained models run with random weights (``random_init``): the speed does not depend on them.
The CSV is written after every row.

    python bench/bench_encoders.py --csv bench/results/encoders.csv        # GPU: real models
    python bench/bench_encoders.py --smoke --csv /tmp/encoders.csv         # CPU, seconds
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import REPO, STAMP_FIELDS, append_rows, run_stamp, versions  # noqa: E402

FIELDS = [
    *STAMP_FIELDS,
    "torch",
    "timm",
    "fastinsight",
    "model",
    "mode",
    "dtype",
    "batch",
    "tile_px",
    "grid",
    "embed_dim",
    "median_ms",
    "tiles_per_s",
    "input_gb_per_s",
    "tflop_per_s",
    "note",
]
FULL_MODELS = ("uni", "uni2-h", "virchow2", "h-optimus-0", "prov-gigapath", "dinov2-vitl14-reg4")
FULL_BATCHES = (64, 256)
SMOKE_MODELS = ("vit-tiny", "dinov2-tiny", "resnet-tiny")
SMOKE_BATCHES = (2,)


def vit_flops(enc: Any, batch: int) -> float:
    """Matmul FLOPs of one batch through a timm ViT (0 for other encoders).

    Per block with N tokens and width D: qkv 3ND^2, proj ND^2, attention 2N^2D, MLP N*D*(fc1 out +
    fc2 in); times 2 FLOPs per MAC, plus the patch projection.
    """
    trunk = getattr(enc, "trunk", None)
    if trunk is None or not getattr(enc, "is_vit", False):
        return 0.0
    h, w = enc.grid_size
    n = h * w + enc.num_prefix
    d = enc.embed_dim
    macs = 0
    for blk in trunk.blocks:
        mlp = blk.mlp
        macs += 4 * n * d * d + 2 * n * n * d
        macs += n * d * mlp.fc1.out_features + n * mlp.fc2.in_features * d
    p = enc.patch_size_px
    macs += h * w * 3 * p * p * d
    return 2.0 * macs * batch


def time_ms(fn: Any, device: torch.device, warmup: int, reps: int) -> float:
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def write_row(path: Path, row: dict[str, Any]) -> None:
    append_rows(path, FIELDS, [row])


def build(name: str, device: torch.device, smoke: bool) -> Any:
    from fastinsight.encoders import build_encoder

    kw: dict[str, Any] = {"device": device}
    if name in ("dinov2-tiny",) and smoke:
        kw["tile_size_px"] = 70
    elif name in ("vit-tiny", "resnet-tiny") and smoke:
        kw["tile_size_px"] = 64
    if name not in SMOKE_MODELS:
        kw["random_init"] = True
    return build_encoder(name, **kw)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny models on CPU, seconds")
    parser.add_argument("--csv", type=Path, default=None, help="append rows to this CSV")
    parser.add_argument("--models", nargs="*", default=None, help="registry names")
    parser.add_argument("--batches", nargs="*", type=int, default=None, help="batch sizes")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--no-compile", action="store_true", help="eager only")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions")
    args = parser.parse_args(argv)

    from fastinsight.encoders import compile_encoder

    device = torch.device(
        args.device or ("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    )
    models = args.models or (SMOKE_MODELS if args.smoke else FULL_MODELS)
    batches = args.batches or (SMOKE_BATCHES if args.smoke else FULL_BATCHES)
    reps = args.reps or (2 if args.smoke else 10)
    warmup = 1 if args.smoke else 3
    out = args.csv or (REPO / "bench" / "results" / "encoders.csv")
    base = {**run_stamp(device), **versions("torch", "timm", "fastinsight")}
    modes = ["eager"] if args.no_compile or device.type != "cuda" else ["eager", "compiled"]
    if args.smoke and not args.no_compile:
        modes = ["eager", "compiled"]  # compiled with the eager backend: the wiring, in seconds
    for name in models:
        for mode in modes:
            enc = build(name, device, args.smoke)
            note = ""
            if mode == "compiled":
                backend = "eager" if device.type != "cuda" else "inductor"
                compile_encoder(enc, backend=backend)
                note = f"torch.compile backend={backend}, dynamic=False"
            t = enc.tile_size_px
            for batch in batches:
                gen = torch.Generator().manual_seed(0)
                tiles = torch.randint(0, 256, (batch, t, t, 3), dtype=torch.uint8, generator=gen)
                tiles = tiles.to(device)
                try:
                    ms = time_ms(lambda e=enc, x=tiles: e.encode_tokens(x), device, warmup, reps)
                except torch.OutOfMemoryError:
                    write_row(
                        out,
                        {
                            **base,
                            "model": name,
                            "mode": mode,
                            "batch": batch,
                            "note": "out of memory",
                        },
                    )
                    torch.cuda.empty_cache()
                    continue
                flops = vit_flops(enc, batch)
                h, w = enc.grid_size
                row = {
                    **base,
                    "model": name,
                    "mode": mode,
                    "dtype": str(enc.dtype).removeprefix("torch."),
                    "batch": batch,
                    "tile_px": t,
                    "grid": f"{h}x{w}",
                    "embed_dim": enc.embed_dim,
                    "median_ms": f"{ms:.4g}",
                    "tiles_per_s": f"{batch / (ms / 1e3):.4g}",
                    "input_gb_per_s": f"{batch * t * t * 3 / (ms / 1e3) / 1e9:.4g}",
                    "tflop_per_s": f"{flops / (ms / 1e3) / 1e12:.4g}" if flops else "",
                    "note": note,
                }
                write_row(out, row)
                print(
                    f"{name:<20} {mode:<8} b={batch:<4} {ms:9.2f} ms  "
                    f"{row['tiles_per_s']:>10} tiles/s  {row['tflop_per_s']} TFLOP/s",
                    flush=True,
                )
            del enc
            if device.type == "cuda":
                torch.cuda.empty_cache()
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
