"""``fastinsight kernels check``: the command line of ``fastinsight.kernels.check``.

Thin: the flags, then ``check_command`` (compiles every Triton kernel variant ahead of time for
the given architectures, prints registers, spills, shared memory, tensor-core instructions and
global-load widths, and returns the exit status).
"""

from __future__ import annotations

import argparse
import os


def add_check_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``fastinsight kernels check``."""
    parser.add_argument("--arch", default="sm_80,sm_90", help="comma-separated, e.g. sm_80,sm_90")
    parser.add_argument(
        "--only",
        action="append",
        help="only variants whose kernel/variant/config text contains this (repeatable)",
    )
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles")
    parser.add_argument(
        "--config",
        action="append",
        help="compile the bf16/fp16 head layer kernels in this block config instead of the "
        "defaults, e.g. M64-X128-R128-K64-w4-s3-W8 (repeatable)",
    )


def run_check(args: argparse.Namespace) -> int:
    """0 when every variant compiles without spills (and 16-bit heads use tensor cores), else 1;
    2 on a usage problem."""
    from fastinsight.kernels.check import check_command

    return check_command(args.arch, args.only, args.jobs, args.config)
