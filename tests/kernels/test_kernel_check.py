"""``fastinsight kernels check`` compiles the kernels for sm_80 and sm_90 on a CPU-only machine."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")


def run_check(*args: str) -> subprocess.CompletedProcess:
    # The interpreter cannot compile: the check runs in a process without TRITON_INTERPRET.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "fastinsight.cli", "kernels", "check", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)


def table_rows(stdout: str) -> list[dict[str, str]]:
    """The check's table as dicts, columns cut where the header's dashes say."""
    lines = stdout.splitlines()
    rule = next(i for i, line in enumerate(lines) if line.startswith("---"))
    spans, start = [], 0
    for dashes in lines[rule].split("  "):
        spans.append((start, start + len(dashes)))
        start += len(dashes) + 2
    header = [lines[rule - 1][a:b].strip() for a, b in spans]
    body = [line for line in lines[rule + 1 :] if line.strip() and not line.startswith(" ")]
    return [
        dict(zip(header, (line[a:b].strip() for a, b in spans), strict=True))
        for line in body
        if line[:1] == "_"
    ]


def test_check_compiles_without_spills_quick() -> None:
    """The head's token reduce and largest 3x3 layer, and every threshold/pooling kernel, for
    both architectures."""
    proc = run_check(
        "--arch", "sm_80,sm_90",
        "--only", "bf16, tile norm, reduce, nhwc, vec 8",
        "--only", "bf16, tile norm, context0",
        "--only", "kernels.reduce:",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    for kernel in ("_reduce_kernel", "_conv_kernel"):
        rows = [line for line in lines if line.startswith(kernel + " ")]
        assert len(rows) == 2 and {" sm_80 " in r for r in rows} == {True, False}, rows
        # 16-bit dots on tensor cores, and the token / activation loads 16 bytes wide.
        assert all("mma" in r and "16B" in r for r in rows), rows
    assert any(line.startswith("_otsu_histogram_kernel") for line in lines)
    assert "all compile without spills" in proc.stdout
    # The columns: bf16 dots on tensor cores (mma.sync on sm_80, wgmma on sm_90) and the global
    # loads by width (the tokens and activations stream through 16-byte cp.async).
    conv = [line for line in lines if line.startswith("_conv_kernel ")]
    sm80 = next(h for h in conv if " sm_80 " in h)
    sm90 = next(h for h in conv if " sm_90 " in h)
    assert " mma m16n8k16" in sm80 and " wgmma m64n" in sm90
    assert "cp.async16B:" in sm90
    # "src ld": the widest load of the token stream itself (the reduce's first pointer): the
    # channels-last tokens load 16 bytes per thread.
    table = table_rows(proc.stdout)
    reduce_rows = [r for r in table if r["kernel"] == "_reduce_kernel"]
    assert len(reduce_rows) == 2 and all(r["src ld"] == "16B" for r in reduce_rows), reduce_rows


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("FASTINSIGHT_FULL_KERNEL_CHECK") != "1",
    reason="compiles all ~460 variants (minutes on 2 cores): set FASTINSIGHT_FULL_KERNEL_CHECK=1, "
    "or run `fastinsight kernels check --arch sm_80,sm_90` as its own CI step",
)
def test_check_every_variant() -> None:
    proc = run_check("--arch", "sm_80,sm_90")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_check_rejects_bad_arch_and_interpreter() -> None:
    from fastinsight.kernels.check import check_command

    assert check_command("volta") == 2
    env = dict(os.environ, TRITON_INTERPRET="1")
    code = "from fastinsight.kernels.check import check_command; raise SystemExit(check_command('sm_90'))"
    assert (
        subprocess.run([sys.executable, "-c", code], env=env, capture_output=True).returncode == 2
    )


def test_check_without_triton_is_one_line_exit_7() -> None:
    """macOS/Windows installs have no Triton (pyproject requires it on Linux only): one line
    naming it and exit 7, not an ImportError traceback from the kernel modules."""
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'triton' or name.startswith('triton.'):\n"
        "            raise ImportError('blocked')\n"
        "sys.meta_path.insert(0, Block())\n"
        "from fastinsight.cli import main\n"
        "raise SystemExit(main(['kernels', 'check', '--arch', 'sm_90']))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode == 7, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "fastinsight: error: kernels check needs Triton, which is not installed (Linux: pip "
        "install triton)"
    ]


def test_check_covers_every_grid_the_models_use() -> None:
    """The bf16 head also compiles for the patch-14 (16 x 16) and CT (37 x 37) grids."""
    # Listed in a process without TRITON_INTERPRET (the check needs compilable kernels).
    code = (
        "from fastinsight.kernels.check import all_specs\n"
        "for s in all_specs(): print(s.kernel, s.variant)"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    listed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert listed.returncode == 0, listed.stderr
    names = listed.stdout.splitlines()
    for grid in ("16x16", "37x37"):
        ours = [n for n in names if f"bf16 {grid}," in n or f"statistics {grid}," in n]
        assert any("_reduce_kernel" in n for n in ours) and any("context0" in n for n in ours)
        assert any("_tile_stats_kernel" in n for n in ours)
    proc = run_check("--arch", "sm_90", "--only", "bf16 37x37, tile norm, context0")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    row = next(line for line in proc.stdout.splitlines() if line.startswith("_conv_kernel "))
    assert "wgmma" in row and "37x37" in row


def test_check_compiles_other_block_configs() -> None:
    """``--config``: the 16-bit layer kernels in a sweep's block config, before a GPU runs it."""
    proc = run_check(
        "--arch", "sm_90", "--config", "M64-X128-R128-K64-w4-s3-W8",
        "--only", "bf16, tile norm, context0", "--only", "bf16, tile norm, context1",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith("_conv_kernel ")]
    assert len(rows) == 2 and all("M64-X128-R128-K64-w4-s3-W8" in r for r in rows), rows
    bad = run_check("--arch", "sm_90", "--config", "M64-Q3")
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.count("\n") == 1 and "'Q3'" in bad.stderr


def test_check_table_flags_spills() -> None:
    from fastinsight.kernels.check import CheckResult, format_table

    clean = CheckResult("k", "v", "c", 90, registers=128, spill_bytes=0, shared_bytes=1024)
    spilled = CheckResult("k", "v", "c", 80, registers=255, spill_bytes=8, shared_bytes=1024)
    in_loop = CheckResult("k", "v", "c", 80, registers=255, spill_bytes=8, shared_bytes=1024,
                          loop_spills=2)  # fmt: skip
    outside = CheckResult("k", "v", "c", 80, registers=96, spill_bytes=8, shared_bytes=1024,
                          loop_spills=0)  # fmt: skip
    broken = CheckResult("k", "v", "c", 80, error="CompilationError: boom")
    # Unknown placement (no SASS) and spills inside a loop fail; a spill outside every loop is
    # reported but passes.
    assert clean.ok and not spilled.ok and not in_loop.ok and not broken.ok
    assert outside.ok and outside.verdict == "ok (8 B spilled outside loops)"
    table = format_table([clean, spilled, in_loop, outside, broken])
    assert "FAIL (spill)" in table and "FAIL (compile)" in table


def test_loop_local_accesses_finds_spills_inside_loops_only() -> None:
    from fastinsight.kernels.check import loop_local_accesses

    sass = "\n".join([
        "        /*0010*/ STL [R1], R6 ;",  # prologue: once per program
        ".L_x_3:",
        "        /*0020*/ LDG.E R2, desc[UR4][R4.64] ;",
        "        /*0030*/ STL.64 [R1+0x8], R2 ;",  # inside the loop
        "        /*0040*/ @P0 BRA `(.L_x_3) ;",
        "LBB7:",
        "        /*0050*/ LDL.LU R0, [R1] ;",  # after the loop (a forward target)
        "        /*0060*/ @P1 BRA LBB9 ;",
        "LBB9:",
        "        /*0070*/ EXIT ;",
    ])  # fmt: skip
    assert loop_local_accesses(sass) == 1
    assert loop_local_accesses(sass.replace("`(.L_x_3)", "LBB7")) == 0  # no backward branch


PTX = """
// a comment: ld.global.v4.b32 must not count
    ld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];
    @%p1 ld.global.nc.b16 { %rs1 }, [ %rd2 + 0 ];
    ld.global.L1::evict_last.v2.b32 { %r5, %r6 }, [ %rd3 + 0 ];
    cp.async.cg.shared.global [ %r7 + 0 ], [ %rd4 + 0 ], 0x10, %r8;
    cp.async.ca.shared.global [ %r9 + 0 ], [ %rd5 + 0 ], 0x8, %r10;
    wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%f1}, %rd6, %rd7, %p2, 1, 1, 0, 1;
    wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%f1}, %rd6, %rd7, %p2, 1, 1, 0, 1;
    mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%f1}, {%r1}, {%r2}, {%f2};
    st.global.v4.b32 [ %rd8 + 0 ], { %r1, %r2, %r3, %r4 };
"""


def test_ptx_stats_counts_tensor_cores_and_load_widths() -> None:
    from fastinsight.kernels.check import ptx_stats

    stats = ptx_stats(PTX)
    assert stats["tensor_core_ops"] == 3
    assert stats["tensor_core_kind"] == "wgmma m64n64k16"
    assert stats["widest_load_bytes"] == 16
    widths = dict(item.split(":") for item in stats["loads_by_width"].split())
    assert widths == {"16B": "1", "8B": "1", "2B": "1", "cp.async16B": "1", "cp.async8B": "1"}
    scalar = ptx_stats("ld.global.b16 { %rs1 }, [ %rd2 + 0 ];\nfma.rn.f32 %f1, %f2, %f3, %f4;")
    assert scalar["tensor_core_ops"] == 0 and scalar["widest_load_bytes"] == 2


def test_source_load_widths_follow_the_first_pointer() -> None:
    """Only loads whose address derives from parameter 0 count, through arithmetic and a
    loop-carried register; a load's data does not propagate the taint."""
    from fastinsight.kernels.check import ptx_stats, source_load_widths

    ptx = """
    ld.param.b64 %rd1, [_k_param_0];
    ld.param.b64 %rd2, [_k_param_1];
    add.s64 %rd3, %rd1, %rd9;
    cp.async.ca.shared.global [ %r1 + 0 ], [ %rd3 + 0 ], 0x8, %r2;
    cp.async.cg.shared.global [ %r3 + 0 ], [ %rd2 + 0 ], 0x10, %r2;
    mov.b64 %rd5, %rd4;
    ld.global.b16 { %rs1 }, [ %rd5 + 0 ];
    ld.global.b64 %rd7, [ %rd3 + 0 ];
    ld.global.v4.b32 { %r4, %r5, %r6, %r7 }, [ %rd7 + 0 ];
    @%p1 add.s64 %rd4, %rd3, 64;
    cp.async.commit_group;
    """
    # The 8-byte cp.async and the 8-byte ld from %rd3, and the 2-byte load through %rd4 (set
    # from %rd3 later in the text: a loop-carried pointer); not the 16-byte copy from param 1,
    # nor the vector load whose address was read from memory.
    assert source_load_widths(ptx) == {8: 2, 2: 1}
    assert ptx_stats(ptx)["source_load_bytes"] == 8
    assert source_load_widths("ld.global.b32 %r1, [ %rd1 + 0 ];") == {}


def test_check_fails_a_16_bit_head_without_tensor_cores() -> None:
    from fastinsight.kernels.check import CheckResult

    simt = CheckResult("k", "bf16", "c", 90, registers=128, spill_bytes=0, shared_bytes=1024,
                       tensor_core_ops=0, needs_tensor_cores=True)  # fmt: skip
    mma = CheckResult("k", "bf16", "c", 90, registers=128, spill_bytes=0, shared_bytes=1024,
                      tensor_core_ops=12, needs_tensor_cores=True)  # fmt: skip
    fp32 = CheckResult("k", "fp32-ieee", "c", 90, registers=128, spill_bytes=0, shared_bytes=1024,
                       tensor_core_ops=0)  # fmt: skip
    assert simt.verdict == "FAIL (no tensor cores)" and not simt.ok
    assert mma.ok and fp32.ok
    assert mma.as_row()["status"] == "ok" and mma.as_row()["arch"] == "sm_90"


def test_head_specs_demand_tensor_cores_for_16_bit() -> None:
    # compile_specs reads the compiled (not interpreted) kernel's signature: its own process.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = (
        "from fastinsight.kernels.head import compile_specs\n"
        "for s in compile_specs():\n"
        "    dots = not s.variant.startswith(('fp32-ieee', 'tile statistics'))\n"
        "    assert s.needs_tensor_cores == dots, s.variant\n"
        "print(len(compile_specs()))"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert proc.returncode == 0 and int(proc.stdout) > 0, proc.stderr
