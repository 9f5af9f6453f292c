"""The CLI's process keeps freed memory (glibc): a batch reuses the pages the last one freed."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap

import pytest

from fastinsight.errors import ConfigError
from fastinsight.malloc import ENV, malloc_choice, user_tuned

glibc_only = pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
    reason="glibc's malloc only",
)

# Allocate, touch and free 64 MiB ten times (as a batch's activations are); print whether the
# tuning was applied and the minor page faults of the last nine rounds.
PROBE = textwrap.dedent(
    """
    import ctypes, resource, sys
    from fastinsight.malloc import keep_freed_memory
    applied = keep_freed_memory() if sys.argv[1] == "tune" else False
    if sys.argv[1] == "cli":
        from fastinsight.cli.main import main
        main(["info", sys.argv[2]])
        import fastinsight.malloc as m
        applied = m._applied
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = (ctypes.c_size_t,)
    libc.free.argtypes = (ctypes.c_void_p,)
    n = 64 << 20
    faults = 0
    for i in range(10):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        p = libc.malloc(n)
        ctypes.memset(p, 1, n)
        libc.free(p)
        if i:
            faults += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    print(applied, faults)
    """
)


def _probe(mode: str, *extra: str, **env: str) -> tuple[bool, int]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    environ.pop(ENV, None)
    environ.pop("GLIBC_TUNABLES", None)
    environ.update(env)
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode, *extra],
        env=environ, capture_output=True, text=True, check=True, timeout=120,
    )  # fmt: skip
    applied, faults = out.stdout.split()[-2:]
    return applied == "True", int(faults)


# 64 MiB is 16,384 pages of 4 KiB: untuned, every round faults them all in again.
PAGES = (64 << 20) // 4096


@glibc_only
def test_kept_memory_is_reused_without_page_faults() -> None:
    applied, faults = _probe("tune")
    assert applied
    assert faults < PAGES // 10  # nine rounds, no page faulted in again
    untuned_applied, untuned = _probe("none")
    assert not untuned_applied
    assert untuned >= 8 * PAGES  # what the tuning removes: glibc maps and unmaps every round


@glibc_only
def test_system_choice_and_user_tuning_are_respected() -> None:
    applied, faults = _probe("tune", **{ENV: "system"})
    assert not applied and faults >= 8 * PAGES
    # The user's own glibc tuning is left as given (here: glibc maps every block >= 1 MiB).
    applied, faults = _probe("tune", MALLOC_MMAP_THRESHOLD_="1048576")
    assert not applied and faults >= 8 * PAGES


@glibc_only
def test_cli_process_keeps_freed_memory(tmp_path) -> None:
    applied, faults = _probe("cli", str(tmp_path / "missing.pth"))
    assert applied
    assert faults < PAGES // 10


def test_choice_is_validated() -> None:
    assert malloc_choice({}) == "keep"
    assert malloc_choice({ENV: " System "}) == "system"
    with pytest.raises(ConfigError, match="FASTINSIGHT_MALLOC must be 'keep'"):
        malloc_choice({ENV: "jemalloc"})
    assert user_tuned({"MALLOC_TRIM_THRESHOLD_": "0"})
    assert user_tuned({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"})
    assert not user_tuned({"GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX2"})


def test_cli_bad_choice_is_one_line(tmp_path) -> None:
    env = {**os.environ, ENV: "jemalloc"}
    out = subprocess.run(
        [sys.executable, "-m", "fastinsight", "info", str(tmp_path / "missing.pth")],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "FASTINSIGHT_MALLOC must be 'keep'" in lines[0]
