"""CPU benchmarks: fastinsight's CPU head + threshold + pooling against the official code.

Not part of the test suite (``testpaths = tests``); run it explicitly:

    pytest bench/test_bench_cpu.py --benchmark-only [--benchmark-json bench/results/cpu.json]
    python bench/test_bench_cpu.py --csv bench/results/cpu_head.csv [--tiles 256 --repeats 11]

"official" is the official ``models/Insight.py`` (Zhangdylan83/Insight) re-expressed as a plain
``torch.nn`` module in fp32 eval mode with the official module indices (so it loads the same
``state_dict``), scikit-image's Otsu on the host and SmoothMax(8): ``OfficialInsight`` below.
"ours" is ``InsightModel.predict`` on the CPU (``fastinsight.ops.reference.insight_head_cpu``:
a channels-last oneDNN convolution chain in 64-tile chunks, NCHW tokens read by one batched
sgemm without a copy; the tensor Otsu and pooling). The script form times the two
interleaved (official, ours, official, ours, ...) so a machine shared with other work loads both
alike, checks that heatmaps and scores agree to 1e-5, and appends one CSV row with the median
tiles/s of each and the median of the per-pair ratios, with the CPU model and thread count.
GPU timings come from ``bench/bench_kernels.py`` (``do_bench``).
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import platform
import statistics
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from fastinsight.models.config import InsightConfig
from fastinsight.models.insight import InsightModel
from fastinsight.ops.otsu import otsu_threshold
from fastinsight.ops.pooling import lse_lba, smoothmax
from fastinsight.ops.reference import insight_head_reference

N_TILES = 16
CELLS = 196
REPO = Path(__file__).resolve().parents[1]


class OfficialInsight(nn.Module):
    """The official INSIGHT module as plain ``torch.nn`` (spec section 1), fp32, eval.

    Shapes: tokens ``[N, C, h, w]`` -> raw heatmap ``[N, K, h, w]``.
    """

    def __init__(self, c: int, k: int, h: int = 14, w: int = 14) -> None:
        super().__init__()

        def ln(ch: int) -> nn.LayerNorm:
            return nn.LayerNorm([ch, h, w])

        self.reduce_dimension_block = nn.Sequential(nn.Conv2d(c, 128, 1), nn.GELU(), ln(128))
        self.backbone_block = nn.Sequential(
            nn.Conv2d(128, 128, 1), nn.GELU(), ln(128),
            nn.Conv2d(128, 64, 1), nn.GELU(), ln(64),
            nn.Conv2d(64, 64, 1), nn.GELU(), ln(64),
            nn.Conv2d(64, k, 1),
        )  # fmt: skip
        pad = nn.ReplicationPad2d(1)
        self.context_block = nn.Sequential(
            pad, nn.Conv2d(128, 128, 3), nn.GELU(), ln(128),
            pad, nn.Conv2d(128, 64, 3), nn.GELU(), ln(64),
            pad, nn.Conv2d(64, 64, 3), nn.GELU(), ln(64),
            pad, nn.Conv2d(64, k, 3),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.reduce_dimension_block(x)
        d = torch.sigmoid(self.backbone_block(z))
        return torch.relu(d - d * torch.sigmoid(self.context_block(z)))


def official_predict(model: OfficialInsight, tokens: torch.Tensor, a: float = 8.0):
    """Official inference: head, Otsu (scikit-image, host) per class over the slide, SmoothMax.

    Shapes: tokens ``[N, C, h, w]`` -> (heatmap ``[N, K, h, w]``, scores ``[K]``).
    """
    from skimage.filters import threshold_otsu

    with torch.no_grad():
        raw = model(tokens)
        k = raw.shape[1]
        values = raw.transpose(0, 1).reshape(k, -1)
        t = torch.tensor([threshold_otsu(v.numpy()) for v in values], dtype=values.dtype)
        kept = values * (values > t[:, None])
        e = torch.exp(a * kept)
        scores = (kept * e).sum(1) / e.sum(1)
    return kept.reshape(k, raw.shape[0], *raw.shape[2:]).transpose(0, 1), scores


def compare(tiles: int, repeats: int, k: int = 1, c: int = 1024) -> dict[str, object]:
    """Interleaved timing of official vs ours at ``tiles`` tiles; outputs checked to 1e-5."""
    torch.manual_seed(0)
    ours = InsightModel(InsightConfig(in_dim=c, num_classes=k), backend="reference").eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(0.05 * torch.randn(p.shape))  # trained-looking, not the init
    official = OfficialInsight(c, k).eval()
    official.load_state_dict(ours.state_dict())
    tokens = torch.randn(tiles, c, 14, 14)
    heat_o, scores_o = official_predict(official, tokens)
    pred = ours.predict(tokens)
    err = max(
        (pred.heatmap - heat_o).abs().max().item(), (pred.scores - scores_o).abs().max().item()
    )
    if err > 1e-5:
        raise SystemExit(f"test_bench_cpu: ours differs from official by {err:.3g} (> 1e-5)")
    t_off, t_ours = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        official_predict(official, tokens)
        t_off.append(time.perf_counter() - start)
        start = time.perf_counter()
        ours.predict(tokens)
        t_ours.append(time.perf_counter() - start)
    ratios = [o / u for o, u in zip(t_off, t_ours, strict=True)]
    # The machine's ceiling, measured in the same run: the head's FLOPs at the faster of the
    # sgemm and the oneDNN 3x3-convolution rates bound the tiles/s of any fp32 implementation
    # with direct convolutions (official_tiles_per_s x max_ratio_at_ceiling).
    gflops = sgemm_gflops()
    conv_gflops = conv3x3_gflops()
    floor = max(gflops, conv_gflops) * 1e9 / head_flops_per_tile(ours, 14 * 14)
    return {
        "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "git_rev": _git_rev(),
        "device": f"{_cpu_model()} ({torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "N": tiles,
        "C": c,
        "K": k,
        "repeats": repeats,
        "official_tiles_per_s": round(tiles / statistics.median(t_off), 2),
        "ours_tiles_per_s": round(tiles / statistics.median(t_ours), 2),
        "median_ratio": round(statistics.median(ratios), 3),
        "min_ratio": round(min(ratios), 3),
        "max_abs_err": float(f"{err:.3g}"),
        "sgemm_gflop_per_s": round(gflops, 1),
        "conv3x3_gflop_per_s": round(conv_gflops, 1),
        "ceiling_tiles_per_s": round(floor, 1),
        "max_ratio_at_ceiling": round(floor * statistics.median(t_off) / tiles, 3),
    }


def sgemm_gflops(n: int = 2048, repeats: int = 5) -> float:
    """fp32 matmul rate of this machine now (median of ``repeats`` n^3 products, random data)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times) / 1e9


def conv3x3_gflops(tiles: int = 64, repeats: int = 5) -> float:
    """fp32 rate of the head's largest layer now: oneDNN's 3x3 convolution, 128 -> 128 channels,
    on ``tiles`` replicate-padded 14 x 14 grids, channels-last (median of ``repeats``)."""
    cl = torch.channels_last
    x = torch.randn(tiles, 128, 16, 16).contiguous(memory_format=cl)
    w = torch.randn(128, 128, 3, 3).contiguous(memory_format=cl)
    with torch.no_grad():
        nn.functional.conv2d(x, w)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            nn.functional.conv2d(x, w)
            times.append(time.perf_counter() - start)
    return 2 * tiles * 196 * 128 * 128 * 9 / statistics.median(times) / 1e9


def head_flops_per_tile(model: InsightModel, cells: int) -> float:
    """2 x multiply-adds of the head's convolutions per tile (3x3 taps counted)."""
    w = model.head_weights()
    macs = w.reduce.weight.numel() + sum(x.weight.numel() for x in (*w.detect, *w.context))
    return 2.0 * cells * macs


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_rev() -> str:
    import subprocess

    try:
        return subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="official vs fastinsight on the CPU, interleaved")
    parser.add_argument("--tiles", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--classes", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="N = 8, C = 64, one repeat")
    parser.add_argument("--csv", type=Path, default=REPO / "bench" / "results" / "cpu_head.csv")
    parser.add_argument(
        "--malloc",
        choices=("system", "keep"),
        default="system",
        help="system: glibc's defaults, as a plain Python process runs the official code; keep: "
        "this process keeps freed memory (fastinsight.malloc, what the CLI does) for both sides",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.malloc == "keep":
        from fastinsight.malloc import keep_freed_memory

        if not keep_freed_memory():
            raise SystemExit("test_bench_cpu: --malloc keep needs glibc and no MALLOC_* tuning")
    if args.smoke:
        row = compare(8, 1, args.classes, c=64)
    else:
        row = compare(args.tiles, args.repeats, args.classes)
    row["malloc"] = args.malloc
    args.csv.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    if args.csv.exists():
        with args.csv.open(newline="") as f:
            rows = list(csv.DictReader(f))
    # Rows of an older version lack the newer columns: rewritten with them blank (malloc: those
    # ran with glibc's defaults).
    for old in rows:
        old["malloc"] = old.get("malloc") or "system"
    tmp = args.csv.with_name(args.csv.name + ".tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row), restval="")
        writer.writeheader()
        writer.writerows(rows + [row])
    tmp.replace(args.csv)
    print(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())


@pytest.fixture(scope="module")
def weights():
    pytest.importorskip("pytest_benchmark")
    torch.manual_seed(0)
    model = InsightModel(InsightConfig(in_dim=1024, num_classes=3), backend="reference").eval()
    return model.head_weights()


@pytest.fixture(scope="module")
def values() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    m = 4096 * CELLS  # a mid-size slide: 4096 tiles
    return torch.rand(3, m, generator=gen) ** 3, torch.rand(m, generator=gen) > 0.2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_bench_head_reference(benchmark, weights, dtype) -> None:
    x = torch.randn(N_TILES, 1024, 14, 14, dtype=dtype)
    w = weights if dtype == torch.float32 else _cast(weights, dtype)
    with torch.no_grad():
        out = benchmark(insight_head_reference, x, w)
    assert out.shape == (N_TILES, 3, 14, 14)


@pytest.mark.parametrize("impl", ["official", "ours"])
def test_bench_predict_vs_official(benchmark, impl) -> None:
    """Head + threshold + pooling at N = 64: the official module vs ``InsightModel.predict``."""
    torch.manual_seed(0)
    ours = InsightModel(InsightConfig(in_dim=1024, num_classes=1), backend="reference").eval()
    official = OfficialInsight(1024, 1).eval()
    official.load_state_dict(ours.state_dict())
    x = torch.randn(64, 1024, 14, 14)
    if impl == "official":
        heat, scores = benchmark(official_predict, official, x)
    else:
        pred = benchmark(ours.predict, x)
        heat, scores = pred.heatmap, pred.scores
    assert heat.shape == (64, 1, 14, 14) and bool(torch.isfinite(scores).all())


def test_bench_otsu_reference(benchmark, values) -> None:
    v, mask = values
    t = benchmark(otsu_threshold, v, mask)
    assert bool(torch.isfinite(t).all())


@pytest.mark.parametrize("method", ["smoothmax", "lse_lba"])
def test_bench_pooling_reference(benchmark, values, method) -> None:
    v, mask = values
    fn = smoothmax if method == "smoothmax" else lse_lba
    p = benchmark(fn, v, mask)
    assert bool(torch.isfinite(p).all())


def _cast(weights, dtype):
    from dataclasses import replace

    def conv(layer):
        return replace(
            layer,
            weight=layer.weight.detach().to(dtype),
            bias=layer.bias.detach().to(dtype),
            norm_weight=None if layer.norm_weight is None else layer.norm_weight.detach().to(dtype),
            norm_bias=None if layer.norm_bias is None else layer.norm_bias.detach().to(dtype),
        )

    return replace(
        weights,
        reduce=conv(weights.reduce),
        detect=tuple(conv(layer) for layer in weights.detect),
        context=tuple(conv(layer) for layer in weights.context),
    )
