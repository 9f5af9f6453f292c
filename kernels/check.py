"""``fastinsight kernels check``: compile every kernel variant ahead of time, no GPU needed.

For each variant the package can launch (``head.compile_specs`` and ``reduce.compile_specs``) and
each requested architecture this runs ``triton.compile(ASTSource(...), target=GPUTarget("cuda",
arch, 32))``, then the ``cuobjdump --dump-resource-usage`` shipped in the Triton wheel on the
cubin, reads the PTX and the SASS, and prints one row per variant: registers, spill bytes (stack +
local: a kernel here makes no calls, so any stack is spilled registers), the local-memory
instructions inside loops (``STL``/``LDL`` between a label and a backward branch to it in the
SASS from the bundled ``nvdisasm``), shared memory, the tensor-core
instructions (``wgmma.mma_async`` on sm_90, ``mma.sync`` on sm_80, counted in the PTX) and the
global loads by width (``ld.global`` vectors, ``cp.async`` and TMA bulk copies, in bytes per
thread: 16 B is a fully vectorised load), with ``src ld`` the widest of the loads whose address
derives from the kernel's first pointer: the token stream of the reduce, the activations of a
chain layer (``source_load_widths``, a taint walk over the PTX). The exit status is non-zero if
a variant fails to compile, spills inside a loop (or spills at all when the SASS cannot be
read), needs more shared memory than the architecture has, or is a 16-bit (or TF32) head config
whose dots compiled to no tensor-core instruction (spec section 6). Spills are a defect to fix in the kernel or its
config, not to hide: the one exception, shown as ``ok (N B spilled outside loops)``, is a
value ptxas parks in local memory once per program outside every loop (the fused threshold +
pooling kernel keeps a lane predicate from its prologue reductions to its finish reductions:
one 4-byte store and load per program, nothing per cell).

The logic is argparse-free: ``run_check`` returns ``CheckResult`` rows (``as_row`` gives a dict
per row); ``check_command`` prints the table and returns the exit status, and
``fastinsight.cli.kernels`` is the thin command line around it.

Usage: ``fastinsight kernels check --arch sm_80,sm_90 [--jobs N] [--only TEXT ...] [--config
M64-X128-R128-K64-w4-s3-W8 ...]`` (the flags live in ``fastinsight.cli.kernels``; ``--config``
compiles the 16-bit head's layer kernels in other block configs, e.g. before a GPU sweep runs
them), or ``check_command(arch, only, jobs, configs)`` from Python.
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

from fastinsight.errors import InputError

# Shared memory one block may use (bytes): sm_80 (A100) 163 KB, sm_90 (H100) 227 KB.
MAX_SHARED = {80: 166912, 86: 101376, 89: 101376, 90: 232448}


@dataclass(frozen=True)
class CheckResult:
    kernel: str
    variant: str
    config: str
    arch: int
    registers: int = -1
    spill_bytes: int = -1
    shared_bytes: int = -1
    seconds: float = 0.0
    error: str = ""
    tensor_core_ops: int = -1  # wgmma + mma instructions in the PTX
    tensor_core_kind: str = ""  # e.g. "wgmma m64n64k16" (the most frequent shape)
    widest_load_bytes: int = -1  # per thread, over ld.global / cp.async / bulk copies
    source_load_bytes: int = -1  # the same over the loads from the first pointer (the tokens)
    loads_by_width: str = ""  # e.g. "16B:12 2B:8 cp.async16B:4"
    needs_tensor_cores: bool = False
    loop_spills: int = -1  # STL/LDL inside loops in the SASS; -1 = SASS not available

    @property
    def ok(self) -> bool:
        return self.verdict.startswith("ok")

    @property
    def verdict(self) -> str:
        if self.error:
            return "FAIL (compile)"
        if self.spill_bytes and self.loop_spills != 0:
            return "FAIL (spill)"
        if self.shared_bytes > MAX_SHARED.get(self.arch, 101376):
            return "FAIL (shared)"
        if self.needs_tensor_cores and self.tensor_core_ops == 0:
            return "FAIL (no tensor cores)"
        if self.spill_bytes:
            return f"ok ({self.spill_bytes} B spilled outside loops)"
        return "ok"

    def as_row(self) -> dict[str, object]:
        """One flat row (a CSV/JSON record) with the verdict."""
        return {**self.__dict__, "arch": f"sm_{self.arch}", "status": self.verdict}


# Element sizes of PTX types, bytes.
_PTX_BYTES = {"8": 1, "16": 2, "32": 4, "64": 8, "128": 16}
_LD_GLOBAL = re.compile(r"\bld\.global(?:\.[A-Za-z0-9_:]+)*?(?:\.v(\d))?\.[busf](\d+)\b")
_CP_ASYNC = re.compile(r"\bcp\.async\.(?:ca|cg)\.shared(?:::cta)?\.global(?:\.[a-z0-9_:]+)*\s+"
                       r"\[[^\]]*\],\s*\[[^\]]*\],\s*(0x[0-9a-fA-F]+|\d+)")  # fmt: skip
_BULK = re.compile(r"\bcp\.async\.bulk(?:\.tensor)?\.[^\s;]*global")
_WGMMA = re.compile(r"\bwgmma\.mma_async(?:\.sp)?\.sync\.aligned\.(m\d+n\d+k\d+)")
_MMA = re.compile(r"\bmma\.sync\.aligned\.(m\d+n\d+k\d+)")


_PTX_INSTR = re.compile(r"^(?:@!?%\w+\s+)?([a-z][\w.:]*)\s+(.*?);?$")
_PTX_REG = re.compile(r"%\w+")
_PTX_ADDRESS = re.compile(r"\[\s*(%\w+)")
_PARAM0 = re.compile(r"\bld\.param\.[busf]64\s+(%\w+),\s*\[\w+_param_0\]")


def _global_load(line: str) -> tuple[int, str] | None:
    """The global load in a PTX line: (bytes per thread, kind) with kind ``16B`` (``ld.global``),
    ``cp.async8B`` or ``bulk`` (a TMA / bulk copy, counted as 16: its width is a whole box);
    None for any other line."""
    m = _LD_GLOBAL.search(line)
    if m:
        nbytes = int(m.group(1) or 1) * _PTX_BYTES.get(m.group(2), int(m.group(2)) // 8)
        return nbytes, f"{nbytes}B"
    m = _CP_ASYNC.search(line)
    if m:
        nbytes = int(m.group(1), 0)
        return nbytes, f"cp.async{nbytes}B"
    return (16, "bulk") if _BULK.search(line) else None


def source_load_widths(ptx: str) -> dict[int, int]:
    """Global loads whose address derives from the kernel's first pointer parameter (the token
    grid of the reduce, the activations of a chain layer, the values of a pooling kernel):
    ``{bytes per thread: count}``.

    The register the first parameter is loaded into taints every register computed from it
    (to a fixed point, so loop-carried pointers count); a load's address register decides. Data
    read from memory is not an address derived from the pointer, so loads do not propagate.
    """
    lines = [line.strip() for line in ptx.splitlines()]
    tainted = {m.group(1) for line in lines if (m := _PARAM0.search(line))}
    if not tainted:
        return {}
    flows = []  # (destination, sources) of every non-memory instruction
    for line in lines:
        m = _PTX_INSTR.match(line)
        if not m or m.group(1).split(".")[0] in ("ld", "st", "cp", "wgmma", "mma", "bar", "bra"):
            continue
        regs = _PTX_REG.findall(m.group(2))
        if len(regs) >= 2:
            flows.append((regs[0], set(regs[1:])))
    changed = True
    while changed:
        changed = False
        for dst, srcs in flows:
            if dst not in tainted and srcs & tainted:
                tainted.add(dst)
                changed = True
    widths: dict[int, int] = {}
    for line in lines:
        load = _global_load(line)
        if load is None:
            continue
        nbytes = load[0]
        # cp.async names its shared destination first: the source is the second address.
        address = _PTX_ADDRESS.search(line.split(",", 1)[1] if "cp.async" in line else line)
        if address and address.group(1) in tainted:
            widths[nbytes] = widths.get(nbytes, 0) + 1
    return widths


def ptx_stats(ptx: str) -> dict[str, object]:
    """Tensor-core instructions and global loads by width, counted in PTX text.

    ``ld.global[.nc][.v2|.v4].<type><bits>`` is ``v * bits / 8`` bytes per thread;
    ``cp.async.{ca,cg}.shared.global [dst], [src], N`` copies N bytes; a TMA / bulk copy
    (``cp.async.bulk[.tensor]``) is counted as such (its width is a whole box, not per thread).
    Each instruction is counted once where it appears in the text (loops are not unrolled here).
    """
    widths: dict[str, int] = {}
    widest = 0
    for line in ptx.splitlines():
        line = line.strip()
        load = None if line.startswith("//") else _global_load(line)
        if load is None:
            continue
        nbytes, key = load
        widths[key] = widths.get(key, 0) + 1
        widest = max(widest, nbytes)
    shapes: dict[str, int] = {}
    for kind, pattern in (("wgmma", _WGMMA), ("mma", _MMA)):
        for m in pattern.finditer(ptx):
            name = f"{kind} {m.group(1)}"
            shapes[name] = shapes.get(name, 0) + 1

    def order(item: tuple[str, int]) -> tuple[int, int]:
        return (-int(re.sub(r"\D", "", item[0]) or 0), -item[1])

    source = source_load_widths(ptx)
    return {
        "tensor_core_ops": sum(shapes.values()),
        "tensor_core_kind": max(shapes, key=lambda k: shapes[k]) if shapes else "",
        "widest_load_bytes": widest,
        "source_load_bytes": max(source, default=0),
        "loads_by_width": " ".join(f"{k}:{v}" for k, v in sorted(widths.items(), key=order)),
    }


def _parse_arch(text: str) -> list[int] | None:
    archs = []
    for part in text.split(","):
        match = re.fullmatch(r"(?:sm_?)?(\d+)a?", part.strip().lower())
        if not match:
            return None
        archs.append(int(match.group(1)))
    return archs


def _cuobjdump() -> str:
    import triton

    try:
        path = triton.knobs.nvidia.cuobjdump.path
    except Exception:  # older Triton
        path = os.path.join(
            os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"
        )
    return path


_SASS_LABEL = re.compile(r"^\s*\.?([A-Za-z_$][\w$.]*):\s*$")
_SASS_BRANCH = re.compile(r"\bBRA(?:\.[A-Z]+)*\s+`?\(?\.?([A-Za-z_$][\w$.]*)")
_SASS_LOCAL = re.compile(r"\b(?:STL|LDL)(?:\.[A-Z0-9]+)*\b")


def loop_local_accesses(sass: str) -> int:
    """Local-memory instructions (``STL``/``LDL``) inside loops of a disassembled kernel.

    A loop is the span from a label to a later branch back to it; an access inside any span runs
    once per iteration, one outside all of them once per program.
    """
    lines = sass.splitlines()
    labels: dict[str, int] = {}
    for i, line in enumerate(lines):
        m = _SASS_LABEL.match(line)
        if m:
            labels[m.group(1).lstrip(".")] = i
    spans = []
    for i, line in enumerate(lines):
        m = _SASS_BRANCH.search(line)
        if m and m.group(1).lstrip(".") in labels and labels[m.group(1).lstrip(".")] <= i:
            spans.append((labels[m.group(1).lstrip(".")], i))
    return sum(
        1
        for i, line in enumerate(lines)
        if _SASS_LOCAL.search(line) and any(a <= i <= b for a, b in spans)
    )


def _sass(compiled) -> str | None:
    """The kernel's SASS from the bundled nvdisasm (its format warning on stderr silenced)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            try:
                return compiled.asm["sass"]
            except Exception:  # nvdisasm missing or failing: spills then count wherever they are
                return None
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def resource_usage(cubin: bytes, function: str) -> dict[str, int]:
    """REG / STACK / SHARED / LOCAL of ``function`` in ``cubin``, from ``cuobjdump``."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        out = subprocess.run(
            [_cuobjdump(), "--dump-resource-usage", path],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    finally:
        os.unlink(path)
    usage: dict[str, int] = {}
    current = None
    for line in out.splitlines():
        if line.strip().startswith("Function "):
            current = line.strip()[len("Function ") :].rstrip(":")
        elif current == function and "REG:" in line:
            for key, value in re.findall(r"([A-Z]+):(\d+)", line):
                usage[key] = int(value)
    if not usage:
        raise RuntimeError(f"cuobjdump reported nothing for {function}:\n{out}")
    return usage


def compile_one(spec, arch: int) -> CheckResult:
    """Compile one ``KernelSpec`` for ``sm_<arch>`` and read its resource usage."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    start = time.perf_counter()
    module_name, fn_name = spec.kernel.split(":")
    fn = getattr(importlib.import_module(module_name), fn_name)
    needs_tc = bool(getattr(spec, "needs_tensor_cores", False))
    base = CheckResult(fn_name, spec.variant, spec.config, arch, needs_tensor_cores=needs_tc)
    try:
        signature = dict(spec.signature)
        signature.update({name: "constexpr" for name in spec.constexprs})
        # The launchers hand over 16-byte aligned pointers only (Triton's "D" specialisation).
        attrs = {
            (i,): [["tt.divisibility", 16]]
            for i, name in enumerate(fn.arg_names)
            if spec.signature.get(name, "").startswith("*")
        }
        src = ASTSource(fn, signature, dict(spec.constexprs), attrs)
        compiled = triton.compile(
            src, target=GPUTarget("cuda", arch, 32), options=dict(spec.options)
        )
        usage = resource_usage(compiled.asm["cubin"], compiled.metadata.name)
        stats = ptx_stats(compiled.asm["ptx"])
        sass = _sass(compiled) if usage.get("STACK", 0) + usage.get("LOCAL", 0) else ""
        stats["loop_spills"] = -1 if sass is None else loop_local_accesses(sass)
    except Exception as exc:  # reported in the table, exit status non-zero
        message = f"{type(exc).__name__}: {exc}".strip().splitlines()
        return CheckResult(**{**base.__dict__, "error": message[0][:200] if message else "error",
                              "seconds": time.perf_counter() - start})  # fmt: skip
    return CheckResult(
        kernel=fn_name,
        variant=spec.variant,
        config=spec.config,
        arch=arch,
        registers=usage.get("REG", -1),
        spill_bytes=usage.get("STACK", 0) + usage.get("LOCAL", 0),
        shared_bytes=int(compiled.metadata.shared) + usage.get("SHARED", 0),
        seconds=time.perf_counter() - start,
        needs_tensor_cores=needs_tc,
        **stats,
    )


def all_specs(configs: tuple[str, ...] = ()):
    """Every kernel variant the package can launch (official head architecture); with
    ``configs`` (``HeadLaunchConfig.describe`` texts), the 16-bit head's layer kernels in those
    block configs instead."""
    from . import head, reduce

    if configs:
        return head.compile_specs(configs=tuple(head.parse_config(c) for c in configs))
    # Every compute type on UNI's 14 x 14 grid; the bf16 heads (the fast path) on the other grids
    # the models use.
    other_grids = [
        spec for grid in head.GRIDS[1:] for spec in head.compile_specs(grid=grid, keys=("bf16",))
    ]
    return head.compile_specs() + other_grids + reduce.compile_specs()


def _job(args):
    index, arch, configs = args
    return compile_one(all_specs(configs)[index], arch)


def format_table(results: list[CheckResult]) -> str:
    header = ("kernel", "variant", "config", "arch", "regs", "spill B", "smem B", "tensor cores",
              "widest ld", "src ld", "global loads", "s", "status")  # fmt: skip
    rows = [
        (
            r.kernel,
            r.variant,
            r.config,
            f"sm_{r.arch}",
            str(r.registers) if r.registers >= 0 else "-",
            str(r.spill_bytes) if r.spill_bytes >= 0 else "-",
            str(r.shared_bytes) if r.shared_bytes >= 0 else "-",
            f"{r.tensor_core_ops} {r.tensor_core_kind}".strip() if r.tensor_core_ops >= 0 else "-",
            f"{r.widest_load_bytes}B" if r.widest_load_bytes >= 0 else "-",
            f"{r.source_load_bytes}B" if r.source_load_bytes > 0 else "-",
            r.loads_by_width or "-",
            f"{r.seconds:.1f}",
            r.verdict + (f": {r.error}" if r.error else ""),
        )
        for r in results
    ]
    widths = [
        max(len(h), *(len(row[i]) for row in rows)) if rows else len(h)
        for i, h in enumerate(header)
    ]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(lines)


def run_check(
    archs: list[int], only: list[str] | None = None, jobs: int = 1, configs: tuple[str, ...] = ()
) -> list[CheckResult]:
    """Compile the variants (those matching any ``only`` text, or all) for every arch."""
    specs = all_specs(configs)
    wanted = [o.lower() for o in only or []]

    def selected(spec) -> bool:
        name = f"{spec.kernel} {spec.variant} {spec.config}".lower()
        return not wanted or any(w in name for w in wanted)

    work = [
        (i, arch, configs)
        for arch in archs
        for i, spec in enumerate(specs)
        if selected(spec) and (spec.archs is None or arch in spec.archs)
    ]
    if jobs > 1 and len(work) > 1:
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            return list(pool.map(_job, work))
    return [_job(w) for w in work]


def check_command(
    arch: str = "sm_80,sm_90",
    only: list[str] | None = None,
    jobs: int = 1,
    configs: list[str] | None = None,
) -> int:
    """``fastinsight kernels check`` without argparse: compile, print the table, return the exit
    status (0 when every variant passes, 1 when one fails, 2 on a usage problem)."""
    archs = _parse_arch(arch)
    try:  # first: everything below imports Triton
        import triton  # noqa: F401
    except ImportError:
        print("fastinsight: error: kernels check needs Triton, which is not installed (Linux: "
              "pip install triton)", file=sys.stderr)  # fmt: skip
        return 7
    try:
        from .head import parse_config

        for text in configs or []:
            parse_config(text)
    except InputError as err:
        print(f"fastinsight kernels check: --config: {err}", file=sys.stderr)
        return 2
    if not archs:
        print(f"fastinsight kernels check: --arch expects e.g. sm_80,sm_90; got {arch!r}",
              file=sys.stderr)  # fmt: skip
        return 2
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("fastinsight kernels check: unset TRITON_INTERPRET (the interpreter cannot compile)",
              file=sys.stderr)  # fmt: skip
        return 2
    start = time.perf_counter()
    results = run_check(archs, only, max(1, jobs), tuple(configs or ()))
    if not results:
        print(f"fastinsight kernels check: no variant matches --only {only}", file=sys.stderr)
        return 2
    print(format_table(results))
    bad = [r for r in results if not r.ok]
    print(
        f"\n{len(results)} variants, {len(archs)} arch(s), {time.perf_counter() - start:.0f} s: "
        + (
            "all compile without spills in loops, 16-bit head dots on tensor cores"
            if not bad
            else f"{len(bad)} FAILED"
        )  # fmt: skip
    )
    return 1 if bad else 0
