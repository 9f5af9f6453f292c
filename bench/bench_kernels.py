"""Kernel benchmark: the fused head + Otsu + pooling against the reference paths, side by side.

The UNI setting (C = 1024 tokens on a 14 x 14 grid, K = 1 and 3 classes, N = 1k / 8k / 32k tiles)
with four providers in one run, each timed for the head, for threshold + pooling, and for both:

- ``official_fp32``: the reference head in fp32, eager (what the official code runs), then Otsu on
  the host with scikit-image (a device-to-host copy of the heatmap), SmoothMax on the device;
- ``eager_bf16``: the reference head in bf16, eager, with the device Otsu and pooling references;
- ``compile_bf16``: the same reference functions under ``torch.compile``;
- ``kernels_bf16``: ``fastinsight.kernels`` (fused head, Otsu kernel, pooling kernel).

Reference heads run in chunks of 4096 tiles, as ``InsightModel.raw_heatmap`` does (the eager
activations of 32k tiles do not fit); the kernels take the whole batch. Times are medians of
``triton.testing.do_bench``. The same run measures the ceilings it compares against: a large
device copy (GB/s) and a large bf16 matmul (TFLOP/s); ``roofline_ms`` is the larger of
bytes / bandwidth and FLOPs / matmul rate, with the minimal bytes (tokens read once, heatmap
written once, heatmap read once by threshold + pooling). Results go to a CSV with the device,
versions, shapes and git revision. ``--layers`` also times each launch of the kernels' head on
its own, with its bandwidth, TFLOP/s and the L2 traffic its block structure implies
(``traffic_gb_per_s``, from ``fastinsight.kernels.head.traffic_bytes``): which layer holds the
time, and whether it moves as many bytes per second as the L2 can serve or is bound elsewhere.

    python bench/bench_kernels.py                 # GPU: the full UNI grid -> bench/results/
    python bench/bench_kernels.py --smoke         # CPU, seconds: references + interpreted kernels
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
CHUNK = 4096
FIELDS = [
    "timestamp",
    "git_rev",
    "device",
    "torch",
    "triton",
    "fastinsight",
    "mode",
    "provider",
    "stage",
    "dtype",
    "N",
    "C",
    "grid",
    "K",
    "norm",
    "layout",
    "median_ms",
    "gb_per_s",
    "tflop_per_s",
    "roofline_ms",
    "pct_of_roofline",
    "x_slower_than_kernels",
    "copy_gb_per_s",
    "matmul_tflop_per_s",
    "max_err_vs_fp32",
    "parity",
    "config",
    "note",
    "traffic_gb_per_s",
]
# Tiles of the fp32 reference that every provider's head is checked against before it is timed.
PARITY_TILES = 64
# A provider passes when its max error against the fp32 reference is at most this factor times
# the eager bf16 reference's own error, plus half an ulp of bf16 at 1.0 (tests/kernels/tolerances.py).
PARITY_FACTOR = 2.0
PARITY_FLOOR = 2.0**-8


# --------------------------------------------------------------------------------------------
# Environment
# --------------------------------------------------------------------------------------------
def git_rev() -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        return out + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def versions() -> dict[str, str]:
    from fastinsight import __version__

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    return {"torch": torch.__version__, "triton": triton_version, "fastinsight": __version__}


# --------------------------------------------------------------------------------------------
# Timing and ceilings
# --------------------------------------------------------------------------------------------
def median_ms(
    fn: Callable[[], object], device: torch.device, reps: int, warmup: bool = True
) -> float:
    """Median wall time of ``fn`` in ms: ``do_bench`` on CUDA, ``perf_counter`` on CPU.

    ``warmup=False`` on CPU when the caller already ran ``fn``'s work once (compiles are done).
    """
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=200, return_mode="median"))
    if warmup:
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def measure_ceilings(device: torch.device, smoke: bool) -> tuple[float, float]:
    """(copy GB/s, bf16 matmul TFLOP/s) measured on this device now."""
    nbytes = (64 << 20) if smoke else (4 << 30)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    copy_ms = median_ms(lambda: dst.copy_(src), device, reps=5)
    src = dst = torch.empty(0)
    n = 1024 if smoke else 8192
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    mm_ms = median_ms(lambda: a @ b, device, reps=3)
    return 2 * nbytes / copy_ms / 1e6, 2 * n**3 / mm_ms / 1e9


def head_flops(weights, n: int, cells: int) -> float:
    """Multiply-adds x 2 of the head's convolutions (elementwise work is negligible)."""
    macs = weights.reduce.weight[:, :, 0, 0].numel()
    macs += sum(layer.weight.numel() for layer in weights.detect)
    macs += sum(layer.weight.numel() for layer in weights.context)  # 3x3: 9 taps per weight
    return 2.0 * n * cells * macs


# --------------------------------------------------------------------------------------------
# Providers
# --------------------------------------------------------------------------------------------
def chunked(fn: Callable, tokens: torch.Tensor) -> torch.Tensor:
    if tokens.shape[0] <= CHUNK:
        return fn(tokens)
    return torch.cat([fn(tokens[i : i + CHUNK]) for i in range(0, tokens.shape[0], CHUNK)])


def host_otsu(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The official-style threshold: scikit-image on the host, per class."""
    from skimage.filters import threshold_otsu

    v = values.float().cpu().numpy()
    keep = mask.cpu().numpy()
    t = [threshold_otsu(v[k][keep]) for k in range(v.shape[0])]
    return torch.tensor(t, dtype=torch.float32, device=values.device)


def make_providers(
    model,
    smoke: bool,
    device: torch.device,
    names: list[str],
    kernel_configs: list[str] | None = None,
) -> dict[str, dict]:
    """Per provider: dtype, head(tokens) -> raw, post(raw, mask) -> (thresholds, scores)."""
    from fastinsight.ops.otsu import otsu_threshold
    from fastinsight.ops.pooling import smoothmax
    from fastinsight.ops.reference import insight_head_reference

    def flat(raw: torch.Tensor) -> torch.Tensor:
        return raw.float().transpose(0, 1).reshape(raw.shape[1], -1)

    def ref_post(raw, mask):
        values = flat(raw)
        t = otsu_threshold(values, mask)
        return t, smoothmax(values * (values > t[:, None]), mask, 8.0)

    def official_post(raw, mask):
        values = flat(raw)
        t = host_otsu(values, mask)
        return t, smoothmax(values * (values > t[:, None]), mask, 8.0)

    low = torch.bfloat16
    w32 = model.float().head_weights()
    providers: dict[str, dict] = {}
    if "official_fp32" in names:
        providers["official_fp32"] = {
            "dtype": torch.float32,
            "head": lambda x: chunked(lambda c: insight_head_reference(c, w32), x),
            "post": official_post,
        }
    wlow = _copy(model, low).head_weights()
    if "eager_bf16" in names:
        providers["eager_bf16"] = {
            "dtype": torch.bfloat16,
            "head": lambda x: chunked(lambda c: insight_head_reference(c, wlow), x),
            "post": ref_post,
        }
    if "compile_bf16" in names:
        # CPU smoke: aot_eager traces the same graphs without a C++ toolchain or minutes of Inductor.
        backend = "aot_eager" if device.type == "cpu" else "inductor"
        # Static shapes: one N per run, so Dynamo never falls back to a dynamic batch dimension
        # (which turns off Inductor's layout optimisation and specialisation). Default mode.
        head_c = torch.compile(
            lambda c: insight_head_reference(c, wlow), backend=backend, dynamic=False
        )
        post_c = torch.compile(ref_post, backend=backend, dynamic=False)
        providers["compile_bf16"] = {
            "dtype": torch.bfloat16,
            "head": lambda x: chunked(head_c, x),
            "post": post_c,
            "note": f"torch.compile backend={backend} dynamic=False mode=default",
        }
    if "kernels_bf16" in names:
        from fastinsight import kernels

        kdtype = torch.float32 if device.type == "cpu" else torch.bfloat16
        wk = _copy(model, kdtype).head_weights()

        def kernel_post(raw, mask):
            # The fused op: statistics, histogram, threshold + SmoothMax + finish (3 launches).
            _, t, scores = kernels.threshold_and_pool(flat(raw), mask, "smoothmax", 8.0)
            return t, scores

        def shipped(x):
            return kernels.insight_head(x, wk)

        heads = [(text, _configured_head(wk, text)) for text in kernel_configs or []]
        for i, (text, head_fn) in enumerate(heads or [("default", shipped)]):
            providers["kernels_bf16" if i == 0 else f"kernels_bf16@{text}"] = {
                "dtype": kdtype,
                "head": head_fn,
                "post": kernel_post,
                "config": text,
                "note": "Triton interpreter (fp32: no bf16 there)" if device.type == "cpu" else "",
            }
    for p in providers.values():
        p.setdefault("note", "")
    return providers


def parse_kernel_config(text: str):
    """``M128-X64-R128-K64-w8-s3`` -> a ``HeadLaunchConfig`` (``fastinsight.kernels.head
    .parse_config``: M, X, R, K, w, s, c, o, W, T); a bad text ends the run with its message."""
    from fastinsight.errors import InputError
    from fastinsight.kernels.head import parse_config

    try:
        return parse_config(text)
    except InputError as err:
        raise SystemExit(f"bench_kernels: --kernel-config: {err}") from None


def _configured_head(weights, text: str) -> Callable:
    from fastinsight.kernels import head as khead

    cfg = parse_kernel_config(text)
    params = [p.detach() for p in khead.flatten_weights(weights)]

    def run_head(x: torch.Tensor) -> torch.Tensor:
        return khead.insight_head_launch(x, params, weights.norm, weights.eps, "ieee", cfg)

    return run_head


def _copy(model, dtype: torch.dtype):
    from fastinsight.models.insight import InsightModel

    twin = InsightModel(model.config, backend="reference")
    twin.load_state_dict(model.state_dict())
    return twin.eval().to(device=next(model.parameters()).device, dtype=dtype)


# --------------------------------------------------------------------------------------------
# Run
# --------------------------------------------------------------------------------------------
def make_tokens(n: int, c: int, grid: tuple[int, int], layout: str, device) -> torch.Tensor:
    """bf16 token grids ``[N, C, h, w]``: NCHW contiguous (feature files), or ``nhwc`` the
    encoder's ``[N, h*w, C]`` seen through ``tokens_as_grid`` (what the slide pipeline passes)."""
    from fastinsight.ops.reference import tokens_as_grid

    h, w = grid
    if layout == "nhwc":
        flat = torch.randn(n, h * w, c, device=device, dtype=torch.bfloat16)
        return tokens_as_grid(flat, grid)
    return torch.randn(n, c, h, w, device=device, dtype=torch.bfloat16)


def head_error(prov: dict, tokens: torch.Tensor, ref: torch.Tensor) -> float:
    """Max abs error of the provider's head on the first tiles against the fp32 reference.

    The provider runs on the whole batch (the shape it is timed at: no extra compile), NaN when
    it runs out of memory.
    """
    try:
        with torch.no_grad():
            out = prov["head"](tokens.to(prov["dtype"]))[: ref.shape[0]]
        return float((out.float() - ref).abs().max())
    except torch.cuda.OutOfMemoryError:
        return float("nan")
    finally:
        if tokens.device.type == "cuda":
            torch.cuda.empty_cache()


def time_provider(prov: dict, tokens: torch.Tensor, mask: torch.Tensor, device, reps: int):
    """(head, threshold_pool, total) median ms of one provider, NaN on out-of-memory."""
    try:
        x = tokens.to(prov["dtype"])
        with torch.no_grad():
            raw = prov["head"](x)
            if device.type == "cuda":
                torch.cuda.synchronize()
            # The parity check and the call above warmed the head; one post call warms the post.
            prov["post"](raw, mask)
            t_head = median_ms(lambda: prov["head"](x), device, reps, warmup=False)
            t_post = median_ms(lambda: prov["post"](raw, mask), device, reps, warmup=False)
            t_all = median_ms(
                lambda: prov["post"](prov["head"](x), mask), device, reps, warmup=False
            )
        return (t_head, t_post, t_all), prov["note"]
    except torch.cuda.OutOfMemoryError:
        return (float("nan"),) * 3, "out of memory"
    finally:
        x = raw = None
        if device.type == "cuda":
            torch.cuda.empty_cache()


def run(args: argparse.Namespace) -> list[dict[str, object]]:
    from fastinsight.models.config import InsightConfig
    from fastinsight.models.insight import InsightModel

    device = torch.device(args.device)
    env = {
        "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "git_rev": git_rev(),
        "device": device_name(device),
        **versions(),
        "mode": "smoke" if args.smoke else "full",
    }
    copy_gbs, mm_tflops = measure_ceilings(device, args.smoke)
    args.ceilings = (copy_gbs, mm_tflops)
    print(f"# {env['device']}: copy {copy_gbs:.0f} GB/s, matmul {mm_tflops:.1f} TFLOP/s")
    rows: list[dict[str, object]] = []
    h, w = args.grid
    cells = h * w
    for k in args.classes:
        torch.manual_seed(0)
        config = InsightConfig(
            in_dim=args.channels, num_classes=k, grid_size=(h, w), norm=args.norm
        )
        model = InsightModel(config, backend="reference").eval().to(device)
        weights = model.head_weights()
        providers = make_providers(model, args.smoke, device, args.providers, args.kernel_config)
        profile = args.profile and device.type == "cuda" and "kernels_bf16" in providers
        from fastinsight.ops.reference import insight_head_reference

        for n in args.tiles:
            tokens = make_tokens(n, args.channels, (h, w), args.layout, device)
            mask = torch.rand(n * cells, device=device) > 0.2
            flops = head_flops(weights, n, cells)
            with torch.no_grad():
                ref = insight_head_reference(tokens[:PARITY_TILES].float(), weights).float()
            errors = {name: head_error(prov, tokens, ref) for name, prov in providers.items()}
            # The bf16 reference's own error sets the bar (fp32 providers: the floor alone).
            own = errors.get("eager_bf16", 0.0)
            bound = PARITY_FACTOR * own + PARITY_FLOOR
            block: list[dict[str, object]] = []
            for name, prov in providers.items():
                ok = errors[name] <= bound
                if ok or errors[name] != errors[name]:  # NaN: out of memory, reported by timing
                    times, note = time_provider(prov, tokens, mask, device, args.reps)
                else:
                    # A fast wrong kernel must not score: not timed, flagged in the CSV.
                    times, note = (float("nan"),) * 3, f"parity FAILED (bound {bound:.3g})"
                    print(f"# {name}: max error {errors[name]:.3g} > {bound:.3g}", file=sys.stderr)
                bits = torch.finfo(prov["dtype"]).bits
                in_bytes = n * args.channels * cells * bits // 8
                out_bytes = n * k * cells * bits // 8
                post_bytes = n * k * cells * 4 + n * cells  # fp32 values + bool mask, read once
                stage_io = {
                    "head": (in_bytes + out_bytes, flops),
                    "threshold_pool": (post_bytes, 0.0),
                    "total": (in_bytes + out_bytes + post_bytes, flops),
                }
                for stage, ms in zip(stage_io, times, strict=True):
                    nbytes, fl = stage_io[stage]
                    roof = max(nbytes / (copy_gbs * 1e6), fl / (mm_tflops * 1e9))
                    block.append(
                        {
                            **env,
                            "provider": name,
                            "stage": stage,
                            "dtype": str(prov["dtype"]).removeprefix("torch."),
                            "N": n,
                            "C": args.channels,
                            "grid": f"{h}x{w}",
                            "K": k,
                            "norm": args.norm,
                            "layout": args.layout,
                            "median_ms": _sig(ms),
                            "gb_per_s": _sig(nbytes / ms / 1e6),
                            "tflop_per_s": _sig(fl / ms / 1e9),
                            "roofline_ms": _sig(roof),
                            "pct_of_roofline": _sig(100 * roof / ms),
                            "x_slower_than_kernels": "",
                            "copy_gb_per_s": _sig(copy_gbs),
                            "matmul_tflop_per_s": _sig(mm_tflops),
                            "max_err_vs_fp32": _sig(errors[name]),
                            "parity": "ok"
                            if ok
                            else ("-" if errors[name] != errors[name] else "FAILED"),
                            "config": prov.get("config", ""),
                            "note": note,
                        }
                    )
            kernel_ms = {
                r["stage"]: float(r["median_ms"]) for r in block if r["provider"] == "kernels_bf16"
            }
            for r in block:
                if kernel_ms.get(r["stage"]):
                    r["x_slower_than_kernels"] = _sig(float(r["median_ms"]) / kernel_ms[r["stage"]])
            # Written as soon as the block ends: a run killed by a time limit keeps what it did.
            write_csv(block, args.csv)
            print_table(block)
            rows += block
            if profile and n == max(args.tiles):
                profile_kernels(providers["kernels_bf16"], tokens)
            if args.layers and n == max(args.tiles):
                # Every kernels provider (each block config of a sweep): which config suits
                # which layer.
                swept: list[dict[str, object]] = []
                for name in [p for p in providers if p.startswith("kernels_bf16")]:
                    layer_rows = time_layers(model, name, providers[name], tokens, device, args)
                    write_csv(
                        [{**block[0], **{k: v for k, v in r.items() if k != "cells"}}
                         for r in layer_rows],
                        args.csv,
                    )  # fmt: skip
                    swept += layer_rows
                if len({r["config"] for r in swept}) > 1:
                    print_fastest_per_layer(swept)
            tokens = mask = torch.empty(0)
    return rows


def print_fastest_per_layer(rows: list[dict[str, object]]) -> None:
    """For each launch of a sweep's per-launch rows: the fastest config and its time, beside the
    first config's (the default). Configs with other chunk sizes time other cell counts, so
    they are compared by time per cell."""
    by_stage: dict[str, list[dict[str, object]]] = {}
    for r in rows:
        by_stage.setdefault(str(r["stage"]), []).append(r)
    first = str(rows[0]["config"])
    print(f"# fastest config per launch (against {first}; time per million cells)")
    for stage, group in by_stage.items():

        def per_cell(r: dict[str, object]) -> float:
            return float(r["median_ms"]) / float(r["cells"]) * 1e6  # type: ignore[arg-type]

        best = min(group, key=per_cell)
        base = next((r for r in group if r["config"] == first), best)
        print(f"{stage.removeprefix('layer: '):36s} {per_cell(best):8.3f} ms  {best['config']}"
              f"  ({per_cell(base) / per_cell(best):.2f}x the first)")  # fmt: skip


def time_layers(
    model, name: str, prov: dict, tokens: torch.Tensor, device, args
) -> list[dict[str, object]]:
    """Each launch of the kernels' head (provider ``name``) timed on its own: where the head's
    time goes."""
    from fastinsight.kernels import head as khead

    x = tokens.to(prov["dtype"])
    w = _copy(model, prov["dtype"]).head_weights()
    params = [p.detach() for p in khead.flatten_weights(w)]
    cfg = parse_kernel_config(prov["config"]) if prov["config"] != "default" else None
    copy_gbs, mm_tflops = args.ceilings
    rows = []
    with torch.no_grad():
        _, steps = khead.head_plan(x, params, w.norm, w.eps, "ieee", cfg)
        for _, launch, _ in steps:  # compile every kernel, in order (each reads what came before)
            launch()
        # The first chunk's launches (the others repeat them on other tiles): a sweep of
        # small-chunk configs would otherwise time hundreds of launches.
        first = [step for step in steps if step[2].get("chunk", 0) == 0]
        chunks = 1 + max(step[2].get("chunk", 0) for step in steps)
        print(f"# per-launch time of the kernels' head ({name}, config {prov['config']}; "
              f"chunk 1 of {chunks})")  # fmt: skip
        for label, launch, work in first:
            ms = median_ms(launch, device, args.reps, warmup=False)
            roof = max(work["bytes"] / (copy_gbs * 1e6), work["flops"] / (mm_tflops * 1e9))
            traffic = work.get("traffic", 0.0) / ms / 1e6
            print(f"{label:36s} {ms:9.4f} ms  {work['bytes'] / ms / 1e6:8.1f} GB/s  "
                  f"{work['flops'] / ms / 1e9:7.1f} TFLOP/s  {100 * roof / ms:5.1f} % of roofline  "
                  f"{traffic:8.1f} GB/s modelled L2 traffic")  # fmt: skip
            rows.append({
                "provider": name, "config": prov["config"], "stage": f"layer: {label}",
                "median_ms": _sig(ms),
                "gb_per_s": _sig(work["bytes"] / ms / 1e6), "traffic_gb_per_s": _sig(traffic),
                "tflop_per_s": _sig(work["flops"] / ms / 1e9), "roofline_ms": _sig(roof),
                "pct_of_roofline": _sig(100 * roof / ms), "x_slower_than_kernels": "",
                "parity": "", "note": f"one launch timed alone (chunk 1 of {chunks})",
                "cells": work["cells"],
            })  # fmt: skip
    return rows


def profile_kernels(prov: dict, tokens: torch.Tensor) -> None:
    """Print each GPU kernel's time in one head call (torch.profiler; CUDA only)."""
    from torch.profiler import ProfilerActivity, profile

    x = tokens.to(prov["dtype"])
    with torch.no_grad():
        prov["head"](x)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                prov["head"](x)
            torch.cuda.synchronize()
    print("# per-kernel GPU time of 3 head calls (torch.profiler)")
    print(
        prof.key_averages().table(sort_by="cuda_time_total", row_limit=20, max_name_column_width=60)
    )


def _sig(x: float) -> float:
    """Four significant digits (times from microseconds to seconds in one column)."""
    return float(f"{x:.4g}")


def write_csv(rows: list[dict[str, object]], path: Path) -> None:
    """Append rows; a file written by an older version (a subset of the columns) is upgraded."""
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    if not new:
        with path.open(newline="") as f:
            old = list(csv.DictReader(f))
            header = list(old[0].keys()) if old else None
        if header is not None and header != FIELDS:
            if not set(header) <= set(FIELDS):
                raise SystemExit(
                    f"bench_kernels: {path} has other columns ({header}); "
                    "write to a new file with --csv PATH"
                )
            tmp = path.with_name(path.name + ".tmp")
            with tmp.open("w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=FIELDS, restval="")
                writer.writeheader()
                writer.writerows(old)
            tmp.replace(path)
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            writer.writeheader()
        writer.writerows(rows)
        f.flush()


def print_table(rows: list[dict[str, object]]) -> None:
    cols = ["provider", "stage", "N", "K", "median_ms", "gb_per_s", "tflop_per_s",
            "pct_of_roofline", "x_slower_than_kernels"]  # fmt: skip
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    print("  ".join(c.ljust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(str(r[c]).ljust(widths[c]) for c in cols))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on CPU, seconds")
    parser.add_argument("--tiles", type=int, nargs="+", default=None, help="N values")
    parser.add_argument("--classes", type=int, nargs="+", default=[1, 3], help="K values")
    parser.add_argument("--channels", type=int, default=None, help="C (default 1024, UNI)")
    parser.add_argument("--grid", type=int, nargs=2, default=[14, 14])
    parser.add_argument("--norm", choices=["tile", "channel"], default="tile")
    parser.add_argument(
        "--providers",
        nargs="+",
        default=["official_fp32", "eager_bf16", "compile_bf16", "kernels_bf16"],
    )
    parser.add_argument("--device", default=None)
    parser.add_argument("--reps", type=int, default=None, help="CPU repetitions (GPU: do_bench)")
    parser.add_argument("--csv", type=Path, default=None)
    parser.add_argument(
        "--kernel-config",
        default=None,
        nargs="+",
        help="time the kernels with these blocks, e.g. M128-X64-R128-K64-w8-s3 (default: the "
        "shipped one); several configs: one kernels_bf16 row set each",
    )
    parser.add_argument(
        "--layout",
        choices=["nchw", "nhwc"],
        default="nchw",
        help="token memory layout: nchw (feature files) or nhwc (the encoder's [N, h*w, C])",
    )
    parser.add_argument(
        "--layers",
        action="store_true",
        help="also time each launch of the kernels' head on its own (stage 'layer: ...' rows)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="CUDA: print the kernels' per-launch GPU times (torch.profiler) for the largest N",
    )
    args = parser.parse_args(argv)
    if args.device is None:
        args.device = "cpu" if args.smoke or not torch.cuda.is_available() else "cuda"
    args.reps = args.reps or (1 if args.smoke else 3)
    if args.smoke:
        args.tiles = args.tiles or [2]
        args.classes = args.classes if args.classes != [1, 3] else [1]
        args.channels = args.channels or 128
    else:
        args.tiles = args.tiles or [1024, 8192, 32768]
        args.channels = args.channels or 1024
    if args.csv is None:
        tag = "smoke" if args.smoke else device_name(torch.device(args.device)).split(" (")[0]
        args.csv = RESULTS / f"kernels_{tag.replace(' ', '_')}.csv"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cpu" and "kernels_bf16" in args.providers:
        # The kernels run on CPU only in Triton's interpreter, chosen before they are imported.
        # Never flip it inside a process that already imported them (a test run on a GPU).
        if "fastinsight.kernels.head" in sys.modules and not os.environ.get("TRITON_INTERPRET"):
            print("bench_kernels: the kernels were imported for the GPU in this process; run "
                  "the CPU smoke in its own process", file=sys.stderr)  # fmt: skip
            return 2
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if args.device != "cpu" and not torch.cuda.is_available():
        print("bench_kernels: no CUDA device; use --smoke on CPU", file=sys.stderr)
        return 2
    rows = run(args)
    print(f"# {len(rows)} rows appended to {args.csv}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
