"""Parity of the fused INSIGHT head with the reference (interpreter on CPU, or the GPU)."""

from __future__ import annotations

import pytest
import torch

from fastinsight.errors import BackendError, InputError
from fastinsight.ops.reference import insight_head_reference, tokens_as_grid

from .helpers import DEVICE, INTERPRET, copy_as, make_model, max_err
from .tolerances import FP32_ATOL, TF32_ATOL, lowp_bound

# (N, C, grid, K, norm, token layout): N = 1 and ragged N (more tiles than interpreter
# programs, so the persistent loop wraps), C not a power of two, both norms, every layout.
CASES = [
    (3, 96, (4, 4), 3, "tile", "nchw"),
    (5, 96, (4, 4), 1, "channel", "nchw"),
    (3, 96, (4, 4), 3, "tile", "nhwc"),
    (1, 96, (4, 4), 1, "tile", "strided"),
    (3, 96, (4, 4), 3, "channel", "strided"),
    (1, 200, (14, 14), 1, "tile", "nchw"),
    (2, 200, (14, 14), 3, "channel", "nhwc"),
    # The other grids the models use: patch-14 encoders at 224 px, DINOv2 CT slices (tiny N, C).
    (2, 48, (16, 16), 3, "tile", "nchw"),
    (1, 32, (37, 37), 1, "tile", "nhwc"),
]
DTYPES = [torch.float32, torch.float16]


def case_id(case) -> str:
    n, c, (h, w), k, norm, layout = case
    return f"N={n}-C={c}-{h}x{w}-K={k}-{norm}-{layout}"


def make_tokens(n: int, c: int, grid: tuple[int, int], layout: str, dtype: torch.dtype):
    """Token grids ``[N, C, h, w]`` in the requested memory layout (same values every time)."""
    h, w = grid
    base = torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(n * c + h))
    if layout == "nchw":
        x = base.clone()
    elif layout == "nhwc":  # the encoder's [N, h*w, C], viewed as a grid without a copy
        x = tokens_as_grid(base.flatten(2).transpose(1, 2).contiguous(), grid)
    else:  # a slice of a larger buffer, rows not contiguous, every other tile
        big = torch.zeros(2 * n, c + 5, h, w + 3)
        big[::2, 2 : 2 + c, :, 1 : 1 + w] = base
        x = big[::2, 2 : 2 + c, :, 1 : 1 + w]
    return base, x.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_head_matches_reference(case, dtype) -> None:
    from fastinsight.kernels import head, insight_head

    n, c, grid, k, norm, layout = case
    model = make_model(c, k, grid, norm)
    base, x = make_tokens(n, c, grid, layout, torch.float32)
    expected_layout = {"nchw": head.LAYOUT_NCHW, "nhwc": head.LAYOUT_NHWC}.get(
        layout, head.LAYOUT_STRIDED
    )
    assert head.token_layout(x) == expected_layout
    with torch.no_grad():
        ref64 = insight_head_reference(
            base.double(), copy_as(model, torch.float64, "cpu").head_weights()
        )
        kernel_model = copy_as(model, dtype, DEVICE)
        out = insight_head(x.to(device=DEVICE, dtype=dtype), kernel_model.head_weights())
    assert out.shape == (n, k, *grid) and out.dtype == torch.float32 and out.is_contiguous()
    err = max_err(out, ref64)
    if dtype == torch.float32:
        assert err <= FP32_ATOL, f"fp32 error {err:.2e} > {FP32_ATOL:.0e}"
    else:
        with torch.no_grad():
            ref_lowp = insight_head_reference(
                base.to(dtype), copy_as(model, dtype, "cpu").head_weights()
            )
        bound = lowp_bound(dtype, max_err(ref_lowp, ref64))
        assert err <= bound, f"{dtype} error {err:.2e} > {bound:.2e} (2x PyTorch's + floor)"


def test_head_tf32_precision_option() -> None:
    """``precision="tf32"`` (tensor-core fp32 dots on a GPU) stays within the TF32 bound."""
    from fastinsight.kernels import insight_head

    model = make_model(96, 3, (4, 4), "tile")
    x = torch.randn(2, 96, 4, 4)
    with torch.no_grad():
        ref64 = insight_head_reference(
            x.double(), copy_as(model, torch.float64, "cpu").head_weights()
        )
        out = insight_head(
            x.to(DEVICE), copy_as(model, torch.float32, DEVICE).head_weights(), precision="tf32"
        )
    assert max_err(out, ref64) <= TF32_ATOL


def test_head_tiles_are_independent() -> None:
    """A tile's heatmap does not depend on its batch: blocks of cells span tiles, the tile
    statistics must not. (Within rounding: the interpreter's matmuls round by block shape.)"""
    from fastinsight.kernels import insight_head

    model = make_model(96, 3, (4, 4), "tile").to(DEVICE)
    x = torch.randn(6, 96, 4, 4, device=DEVICE)
    with torch.no_grad():
        full = insight_head(x, model.head_weights())
        for i in (0, 4, 5):
            alone = insight_head(x[i : i + 1], model.head_weights())
            torch.testing.assert_close(alone, full[i : i + 1], rtol=0, atol=1e-6)


def test_head_in_ragged_chunks_matches_one_chunk() -> None:
    """Tiles are processed in chunks (bounded activation memory): 5 tiles in chunks of 2 (the
    last one short) give the reference's heatmap, with the chunk's buffers reused."""
    import dataclasses

    from fastinsight.kernels.head import flatten_weights, insight_head_launch, launch_config

    model = make_model(48, 2, (4, 4), "tile").to(DEVICE)
    x = torch.randn(5, 48, 4, 4, device=DEVICE)
    w = model.head_weights()
    cfg = dataclasses.replace(launch_config(16, x.dtype, "ieee"), chunk_tiles=2)
    with torch.no_grad():
        out = insight_head_launch(x, flatten_weights(w), "tile", w.eps, "ieee", cfg)
        ref = insight_head_reference(
            x.double(), copy_as(model, torch.float64, DEVICE).head_weights()
        )
    assert max_err(out, ref) <= FP32_ATOL


@pytest.mark.parametrize("norm", ["tile", "channel"])
def test_head_overlapped_chunks_match_sequential(norm) -> None:
    """``overlap``: chunk i + 1's reduce is issued before chunk i's chains (the order the side
    stream allows), into the other of two buffer sets. Run in that order, 7 tiles in chunks of
    2 give bit for bit the sequential heatmap: no reduce overwrote what a chain still read."""
    import dataclasses

    from fastinsight.kernels.head import (
        flatten_weights,
        head_plan,
        insight_head_launch,
        launch_config,
        overlapped_order,
    )

    model = make_model(48, 2, (4, 4), norm).to(DEVICE)
    x = torch.randn(7, 48, 4, 4, device=DEVICE)
    w = model.head_weights()
    params = flatten_weights(w)
    base = dataclasses.replace(launch_config(16, x.dtype, "ieee"), chunk_tiles=2)
    overlap = dataclasses.replace(base, overlap=True)
    with torch.no_grad():
        want = insight_head_launch(x, params, norm, w.eps, "ieee", base)
        got = insight_head_launch(x, params, norm, w.eps, "ieee", overlap)
        _, steps = head_plan(x, params, norm, w.eps, "ieee", overlap)
    assert torch.equal(got, want)
    # The order interleaves: reduce 0, reduce 1, chains 0, reduce 2, chains 1, ...
    order = [(chunk, step[2]["role"]) for chunk, step in overlapped_order(steps)]
    firsts = [key for i, key in enumerate(order) if i == 0 or order[i - 1] != key]
    assert firsts == [(0, "reduce"), (1, "reduce"), (0, "chain"), (2, "reduce"), (1, "chain"),
                      (3, "reduce"), (2, "chain"), (3, "chain")]  # fmt: skip
    assert len(order) == len(steps) and all(step[2]["overlap"] for step in steps)


def test_head_sees_weight_updates() -> None:
    """The prepared-weights cache follows in-place updates (tensor versions)."""
    from fastinsight.kernels import insight_head

    model = make_model(96, 1, (4, 4), "channel").to(DEVICE)
    x = torch.randn(2, 96, 4, 4, device=DEVICE)
    with torch.no_grad():
        before = insight_head(x, model.head_weights())
        model.context_block[-1].bias.add_(1.0)
        after = insight_head(x, model.head_weights())
        ref = insight_head_reference(x, model.head_weights())
    assert not torch.equal(before, after)
    assert max_err(after, ref) <= 1e-5


def test_model_dispatches_to_kernels() -> None:
    """``backend="triton"``: head, Otsu and pooling kernels from the encoder's [N, h*w, C] layout.

    Masks: a fully masked tile among others, then a slide with a single tissue cell.
    """
    ref_model = make_model(96, 3, (4, 4), "tile").to(DEVICE)
    kernel_model = copy_as(ref_model, torch.float32, DEVICE, backend="triton")
    tokens = torch.randn(3, 16, 96, device=DEVICE)
    mask = torch.rand(3, 4, 4, device=DEVICE) > 0.3
    mask[1] = False  # a tile without tissue
    single = torch.zeros_like(mask)
    single[2, 1, 3] = True  # one tissue cell in the whole slide
    with torch.no_grad():
        assert kernel_model.uses_kernels and not ref_model.uses_kernels
        for m in (mask, single):
            got = kernel_model.predict(tokens, m)
            want = ref_model.predict(tokens, m)
            assert max_err(got.raw_heatmap, want.raw_heatmap) <= FP32_ATOL
            # The heatmaps differ in the last bits, so the histogram range may too: one bin.
            assert max_err(got.thresholds, want.thresholds) <= 1 / 256
            assert max_err(got.scores, want.scores) <= 1e-4
        # One cell: Otsu returns its value, the threshold zeroes it, every score is 0.
        assert torch.equal(got.thresholds.cpu(), got.raw_heatmap[2, :, 1, 3].cpu())
        assert float(got.scores.abs().max()) == 0.0


def test_head_rejects_bad_inputs() -> None:
    from fastinsight.kernels import insight_head

    model = make_model(96, 1, (4, 4), "tile").to(DEVICE)
    weights = model.head_weights()
    with torch.no_grad():
        with pytest.raises(InputError, match="channels"):
            insight_head(torch.randn(1, 95, 4, 4, device=DEVICE), weights)
        with pytest.raises(InputError, match=r"\[N, C, h, w\]"):
            insight_head(torch.randn(1, 16, 96, device=DEVICE), weights)
        with pytest.raises(InputError, match="grid size"):
            insight_head(torch.randn(1, 96, 5, 5, device=DEVICE), weights)
        with pytest.raises(InputError, match="float"):
            insight_head(torch.ones(1, 96, 4, 4, device=DEVICE, dtype=torch.int32), weights)
        with pytest.raises(InputError, match="precision"):
            insight_head(torch.randn(1, 96, 4, 4, device=DEVICE), weights, precision="fp8")
    with pytest.raises(BackendError, match="forward-only"):
        insight_head(torch.randn(1, 96, 4, 4, device=DEVICE), weights)


@pytest.mark.skipif(not INTERPRET, reason="the interpreter's limits only")
def test_interpreter_refuses_bf16() -> None:
    from fastinsight.kernels import insight_head

    model = make_model(96, 1, (4, 4), "tile").to(torch.bfloat16)
    with torch.no_grad(), pytest.raises(InputError, match="bfloat16"):
        insight_head(torch.randn(1, 96, 4, 4, dtype=torch.bfloat16), model.head_weights())


@pytest.mark.skipif(not INTERPRET, reason="runs the GPU block configs through the interpreter")
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize(
    "config",
    [
        "default",
        "M64-X128-R128-K64-w4-s3-W8",
        "M64-X64-R64-K64-w4-s3-T1",
        "M64-X256-R256-K64-w4-s3-W16-T1",
    ],
)
def test_gpu_block_configs_in_interpreter(dtype, config) -> None:
    """The blocks the GPU launches (several cell blocks and output blocks per layer, blocks that
    span two tiles, the Chan merge across blocks, rows past the batch wrapped and not stored)
    give the same heatmap as the reference."""
    from fastinsight.kernels.head import (
        GPU_CONFIGS,
        compute_key,
        flatten_weights,
        insight_head_launch,
        parse_config,
    )

    n, c, grid, k = 2, 64, (14, 14), 3
    model = make_model(c, k, grid, "tile")
    x = torch.randn(n, c, *grid)
    cfg = GPU_CONFIGS[compute_key(dtype, "ieee")]
    if config != "default":
        cfg = parse_config(config, cfg)
    with torch.no_grad():
        ref64 = insight_head_reference(
            x.double(), copy_as(model, torch.float64, "cpu").head_weights()
        )
        w = copy_as(model, dtype, "cpu").head_weights()
        out = insight_head_launch(x.to(dtype), flatten_weights(w), "tile", 1e-5, "ieee", cfg)
        if dtype == torch.float32:
            bound = FP32_ATOL
        else:
            bound = lowp_bound(dtype, max_err(insight_head_reference(x.to(dtype), w), ref64))
    assert out.dtype == torch.float32
    assert max_err(out, ref64) <= bound


def test_layer_warps_and_traffic_model() -> None:
    """``num_warps_wide`` applies to the reduce and the layers wider than 64 channels, never to
    the K-class layers; the traffic model charges each program the whole weight matrix."""
    from fastinsight.kernels.head import FAST_16BIT, parse_config, traffic_bytes

    cfg = parse_config("M64-X128-R128-K64-w4-s3-W8")
    assert cfg.warps(128, True) == 8 and cfg.warps(64, False) == 4 and cfg.warps(3, False) == 4
    assert FAST_16BIT.warps(128, True) == FAST_16BIT.num_warps == 4
    # 3x3 128 -> 128 in bf16 over 1000 cells in 64-cell blocks: 16 programs, each 64 * 9 * 128
    # input values, the 1152 x 128 weights, 3 fp32 tables and the bf16 output of 64 x 128.
    per_program = 64 * (9 * 128 * 2 + 128 * (3 * 4 + 2)) + 9 * 128 * 128 * 2
    assert traffic_bytes(1000, 64, 9, 128, 128, 2, 3, 2) == 16 * per_program
    # Taller blocks: fewer copies of the weights, the same per-cell bytes.
    weights = 9 * 128 * 128 * 2
    saved = traffic_bytes(1024, 64, 9, 128, 128, 2, 3, 2) - traffic_bytes(
        1024, 128, 9, 128, 128, 2, 3, 2
    )
    assert saved == (16 - 8) * weights
    # fp16 tables (half_tables): the table bytes halve, nothing else moves.
    full = traffic_bytes(1000, 64, 9, 128, 128, 2, 3, 2)
    assert full - traffic_bytes(1000, 64, 9, 128, 128, 2, 3, 2, table_size=2) == 16 * 64 * 128 * 6


@pytest.mark.parametrize("norm", ["tile", "channel"])
def test_half_tables_pack_fp16_tables_for_16bit_heads(norm) -> None:
    """``half_tables`` (``-T1``): the [P, cout] tables in fp16 for 16-bit heads, the same values
    to fp16 rounding; fp32 heads keep fp32 tables; the channel norm's affine stays fp32."""
    from fastinsight.kernels.head import flatten_weights, pack_head, parse_config

    cfg = parse_config("M64-X64-R64-K64-w4-s3-T1")
    assert cfg.half_tables and cfg.describe().endswith("-T1")
    assert cfg.table_dtype(torch.float16) == cfg.table_dtype(torch.bfloat16) == torch.float16
    assert cfg.table_dtype(torch.float32) == torch.float32
    model = make_model(64, 3, (4, 4), norm)
    params = [p.detach() for p in flatten_weights(model.head_weights())]
    full = pack_head(params, norm, (4, 4), torch.float16)
    half = pack_head(params, norm, (4, 4), torch.float16, torch.float16)
    for a, b in zip((full.reduce, *full.detect, *full.context),
                    (half.reduce, *half.detect, *half.context), strict=True):  # fmt: skip
        assert b.bias.dtype == torch.float16 and b.bias.shape == a.bias.shape == (16, a.cout)
        torch.testing.assert_close(b.bias.float(), a.bias, rtol=2**-10, atol=0)
        if a.bnw is not None:
            assert b.bnw.dtype == torch.float16
            torch.testing.assert_close(b.bnw.float(), a.bnw, rtol=2**-10, atol=0)
        if a.nw is not None:
            assert b.nw.dtype == (torch.float16 if norm == "tile" else torch.float32)
        assert b.weight.dtype == a.weight.dtype == torch.float16


@pytest.mark.skipif(not INTERPRET, reason="runs the fp16-table option through the interpreter")
@pytest.mark.parametrize("norm", ["tile", "channel"])
def test_half_tables_head_matches_reference(norm) -> None:
    """``-T1`` end to end in fp16: both norms (the channel norm keeps its affine in fp32), within
    the fp16 parity bound."""
    from fastinsight.kernels.head import (
        INTERPRETER_CONFIG,
        flatten_weights,
        insight_head_launch,
        parse_config,
    )

    n, c, grid, k = 3, 64, (4, 4), 3
    model = make_model(c, k, grid, norm)
    x = torch.randn(n, c, *grid)
    cfg = parse_config("T1", INTERPRETER_CONFIG)
    with torch.no_grad():
        ref64 = insight_head_reference(
            x.double(), copy_as(model, torch.float64, "cpu").head_weights()
        )
        w = copy_as(model, torch.float16, "cpu").head_weights()
        out = insight_head_launch(x.half(), flatten_weights(w), norm, 1e-5, "ieee", cfg)
        bound = lowp_bound(torch.float16, max_err(insight_head_reference(x.half(), w), ref64))
    assert max_err(out, ref64) <= bound
