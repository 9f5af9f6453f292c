"""What glibc's malloc settings cost on the CPU: the same work in processes that keep freed memory
(``fastinsight.malloc.keep_freed_memory``, what the CLI does) and in processes with glibc's
defaults (``FASTINSIGHT_MALLOC=system``), interleaved.

Workloads (CPU, fp32, the machine's torch threads):

- ``encoder``: ``encode_tokens`` of the UNI ViT-L/16 (random weights) on a batch of 224 px tiles;
- ``head``: ``InsightModel.predict`` (head, Otsu, SmoothMax) on N UNI token grids;
- ``official``: the official ``models/Insight.py`` head with scikit-image's Otsu and SmoothMax
  (``bench/test_bench_cpu.py``) on the same tokens.

Each round starts one child process per mode (system, then keep; the order alternates by
round), which builds the workload, runs it once to warm up, then times ``--calls`` calls and
counts their minor page faults and system time. One CSV row per workload and mode: the median
over rounds of each child's median call, faults and system seconds per call, the largest peak
RSS, and for ``keep`` the speed-up over ``system`` (the median of the rounds' ratios).

    python bench/bench_malloc.py --csv bench/results/malloc.csv
    python bench/bench_malloc.py --smoke --csv /tmp/malloc.csv      # tiny sizes, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import REPO, STAMP_FIELDS, append_rows, run_stamp, versions  # noqa: E402

FIELDS = [
    *STAMP_FIELDS,
    "torch",
    "fastinsight",
    "workload",
    "malloc",
    "size",
    "rounds",
    "calls",
    "median_ms",
    "faults_per_call",
    "sys_s_per_call",
    "max_rss_mb",
    "speedup_vs_system",
]
WORKLOADS = ("encoder", "head", "official")
MODES = ("system", "keep")


def _workload(name: str, size: int, smoke: bool) -> Any:
    """A zero-argument callable doing one call of the workload (built here, in the child)."""
    import torch

    torch.manual_seed(0)
    if name == "encoder":
        from fastinsight.encoders import build_encoder

        enc = build_encoder("vit-tiny", tile_size_px=64) if smoke else None
        enc = enc or build_encoder("uni", random_init=True, device="cpu")
        t = enc.tile_size_px
        tiles = torch.randint(0, 256, (size, t, t, 3), dtype=torch.uint8)
        return lambda: enc.encode_tokens(tiles)
    from fastinsight.models.config import InsightConfig
    from fastinsight.models.insight import InsightModel

    c = 64 if smoke else 1024
    model = InsightModel(InsightConfig(in_dim=c, num_classes=1), backend="reference").eval()
    tokens = torch.randn(size, c, 14, 14)
    if name == "head":
        return lambda: model.predict(tokens)
    sys.path.insert(0, str(REPO / "bench"))
    from test_bench_cpu import OfficialInsight, official_predict

    official = OfficialInsight(c, 1).eval()
    official.load_state_dict(model.state_dict())
    return lambda: official_predict(official, tokens)


def child(name: str, size: int, calls: int, smoke: bool) -> dict[str, float]:
    """Run in a fresh process: the timings of ``calls`` calls after one warm-up."""
    import torch

    from fastinsight.malloc import keep_freed_memory

    applied = keep_freed_memory()
    fn = _workload(name, size, smoke)
    with torch.inference_mode():
        fn()
        times, faults, sys_s = [], [], []
        for _ in range(calls):
            before = resource.getrusage(resource.RUSAGE_SELF)
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
            after = resource.getrusage(resource.RUSAGE_SELF)
            faults.append(after.ru_minflt - before.ru_minflt)
            sys_s.append(after.ru_stime - before.ru_stime)
    return {
        "applied": float(applied),
        "ms": statistics.median(times) * 1e3,
        "faults": statistics.median(faults),
        "sys_s": statistics.median(sys_s),
        "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def _spawn(name: str, mode: str, size: int, calls: int, smoke: bool) -> dict[str, float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env["FASTINSIGHT_MALLOC"] = mode
    cmd = [sys.executable, __file__, "--child", name, "--size", str(size), "--calls", str(calls)]
    out = subprocess.run(
        [*cmd, *(["--smoke"] if smoke else [])],
        env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    if out.returncode != 0:
        raise SystemExit(f"bench_malloc: the {mode} child of {name} failed:\n{out.stderr}")
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    if bool(result["applied"]) != (mode == "keep"):
        raise SystemExit(
            f"bench_malloc: the {mode} child of {name} did not run as asked "
            "(a MALLOC_* or GLIBC_TUNABLES setting in the environment, or not glibc)"
        )
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one round, seconds")
    parser.add_argument("--csv", type=Path, default=REPO / "bench" / "results" / "malloc.csv")
    parser.add_argument("--workloads", nargs="*", choices=WORKLOADS, default=list(WORKLOADS))
    parser.add_argument("--rounds", type=int, default=None, help="children per mode")
    parser.add_argument("--calls", type=int, default=None, help="timed calls per child")
    parser.add_argument("--encoder-batch", type=int, default=None)
    parser.add_argument("--tiles", type=int, default=None, help="token grids for the heads")
    parser.add_argument("--child", choices=WORKLOADS, help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.size, args.calls, args.smoke)))
        return 0
    rounds = args.rounds or (1 if args.smoke else 3)
    calls = args.calls or (1 if args.smoke else 3)
    sizes = {
        "encoder": args.encoder_batch or (2 if args.smoke else 16),
        "head": args.tiles or (8 if args.smoke else 256),
    }
    sizes["official"] = sizes["head"]
    import torch  # noqa: F401  (run_stamp records torch's thread count)

    base = {**run_stamp("cpu"), **versions("torch", "fastinsight")}
    for name in args.workloads:
        runs: dict[str, list[dict[str, float]]] = {m: [] for m in MODES}
        for r in range(rounds):
            for mode in MODES if r % 2 == 0 else MODES[::-1]:
                runs[mode].append(_spawn(name, mode, sizes[name], calls, args.smoke))
        ratios = [s["ms"] / k["ms"] for s, k in zip(runs["system"], runs["keep"], strict=True)]
        rows = []
        for mode in MODES:
            res = runs[mode]
            rows.append(
                {
                    **base,
                    "workload": name,
                    "malloc": mode,
                    "size": sizes[name],
                    "rounds": rounds,
                    "calls": calls,
                    "median_ms": f"{statistics.median(x['ms'] for x in res):.4g}",
                    "faults_per_call": int(statistics.median(x["faults"] for x in res)),
                    "sys_s_per_call": f"{statistics.median(x['sys_s'] for x in res):.3g}",
                    "max_rss_mb": round(max(x["rss_mb"] for x in res)),
                    "speedup_vs_system": f"{statistics.median(ratios):.3f}"
                    if mode == "keep"
                    else "",
                }
            )
        append_rows(args.csv, FIELDS, rows)
        for row in rows:
            print(
                f"{name:<9} {row['malloc']:<7} {row['median_ms']:>9} ms  "
                f"{row['faults_per_call']:>8} faults  {row['sys_s_per_call']:>6} s sys  "
                f"{row['max_rss_mb']:>6} MB  {row['speedup_vs_system']}",
                flush=True,
            )
    print(f"wrote {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
