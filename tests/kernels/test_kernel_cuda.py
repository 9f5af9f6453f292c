"""The kernels on a GPU: every dtype at the UNI shape, TF32, and no host synchronisation.

Marked ``cuda``: skipped (with the reason) on machines without one, like the CI CPU runners.
"""

from __future__ import annotations

import pytest
import torch

from fastinsight.ops.otsu import otsu_threshold as otsu_reference
from fastinsight.ops.reference import insight_head_reference, tokens_as_grid

from .helpers import INTERPRET, copy_as, make_model, max_err
from .tolerances import FP32_ATOL, TF32_ATOL, lowp_bound

pytestmark = [
    pytest.mark.cuda,  # the root conftest skips these without a GPU
    pytest.mark.skipif(
        INTERPRET and torch.cuda.is_available(),
        reason="TRITON_INTERPRET is set: the kernels run on CPU, not on the GPU",
    ),
]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("norm", ["tile", "channel"])
@pytest.mark.parametrize("k", [1, 3], ids=lambda k: f"K={k}")
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_head_uni_shape(dtype, norm, k, layout) -> None:
    from fastinsight.kernels import insight_head

    n, c, grid = 37, 1024, (14, 14)
    model = make_model(c, k, grid, norm)
    base = torch.randn(n, c, *grid)
    with torch.no_grad():
        ref64 = insight_head_reference(
            base.double(), copy_as(model, torch.float64, "cpu").head_weights()
        )
        gpu = copy_as(model, dtype, "cuda")
        x = base.to(device="cuda", dtype=dtype)
        if layout == "nhwc":
            x = tokens_as_grid(x.flatten(2).transpose(1, 2).contiguous(), grid)
        out = insight_head(x, gpu.head_weights())
        torch.cuda.synchronize()
        err = max_err(out, ref64)
        if dtype == torch.float32:
            assert err <= FP32_ATOL
            tf32 = insight_head(x, gpu.head_weights(), precision="tf32")
            assert max_err(tf32, ref64) <= TF32_ATOL
        else:
            ref_lowp = insight_head_reference(x, gpu.head_weights())
            assert err <= lowp_bound(dtype, max_err(ref_lowp, ref64))


def test_threshold_and_pool_on_gpu_without_host_sync() -> None:
    """Head, Otsu and pooling back to back with CUDA's sync debug mode set to raise."""
    from fastinsight import kernels

    model = copy_as(make_model(1024, 3, (14, 14), "tile"), torch.bfloat16, "cuda")
    x = torch.randn(512, 1024, 14, 14, device="cuda", dtype=torch.bfloat16)
    mask = torch.rand(512 * 196, device="cuda") > 0.2
    with torch.no_grad():
        kernels.insight_head(x, model.head_weights())  # warm-up (compiles)
        values = (
            kernels.insight_head(x, model.head_weights()).float().transpose(0, 1).reshape(3, -1)
        )
        kernels.otsu_threshold(values, mask)
        kernels.smoothmax(values, mask, 8.0)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            raw = kernels.insight_head(x, model.head_weights())
            values = raw.float().transpose(0, 1).reshape(3, -1)
            t = kernels.otsu_threshold(values, mask)
            kept = values * (values > t[:, None])
            scores = kernels.smoothmax(kept, mask, 8.0)
            lse = kernels.lse_lba(kept, mask, torch.full((3,), 6.0, device="cuda"))
        finally:
            torch.cuda.set_sync_debug_mode(0)
    want_t = otsu_reference(values, mask)
    width = (values.amax(1) - values.amin(1)) / 256
    assert bool(((t - want_t).abs() <= width).all())
    assert bool(torch.isfinite(scores).all() and torch.isfinite(lse).all())


@pytest.mark.parametrize("method", ["smoothmax", "lse_lba", "max", "mean"])
def test_fused_threshold_and_pool_in_a_cuda_graph(method) -> None:
    """The fused threshold + pooling (3 launches) is captured in a CUDA graph and replayed on new
    values: same results as eager and as the reference (no host sync, no data-dependent
    allocation, the last-block counters cleared inside the graph on every replay)."""
    from fastinsight import kernels
    from fastinsight.ops.pooling import Pooling
    from fastinsight.ops.threshold_pool import ThresholdAndPool

    k, m = 3, 512 * 196
    gen = torch.Generator(device="cuda").manual_seed(0)
    values = torch.rand(k, m, device="cuda", generator=gen) ** 3
    mask = torch.rand(m, device="cuda", generator=gen) > 0.2
    param = {"smoothmax": 8.0, "lse_lba": torch.full((k,), 6.0, device="cuda")}.get(method, 0.0)
    with torch.no_grad():
        kernels.threshold_and_pool(values, mask, method, param)  # compile outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            kept, t, scores = kernels.threshold_and_pool(values, mask, method, param)
        for seed in (1, 2):
            fresh = torch.rand(k, m, device="cuda", generator=gen.manual_seed(seed)) ** 3
            values.copy_(fresh)
            graph.replay()
            torch.cuda.synchronize()
            eager = kernels.threshold_and_pool(fresh, mask, method, param)
            assert torch.equal(t, eager[1]) and torch.equal(kept, eager[0])
            torch.testing.assert_close(scores, eager[2], rtol=0, atol=0)
            pooling = Pooling(method, k, smoothmax_a=8.0, lse_r0=5.0)
            if method == "lse_lba":
                pooling.beta.fill_(0.0)  # r = 5 + 1 = 6
            want = ThresholdAndPool(pooling)(fresh.cpu(), mask.cpu())
            torch.testing.assert_close(scores.cpu(), want[2], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("norm", ["tile", "channel"])
def test_head_overlapped_streams_match_sequential(norm) -> None:
    """``overlap``: each chunk's reduce on a side stream beside the previous chunk's chains gives
    the sequential heatmap bit for bit, eagerly and captured in a CUDA graph (replayed on new
    tokens), and leaves no work behind on the side stream."""
    import dataclasses

    from fastinsight.kernels.head import flatten_weights, insight_head_launch, launch_config

    model = copy_as(make_model(1024, 3, (14, 14), norm), torch.bfloat16, "cuda")
    w = model.head_weights()
    params = [p.detach() for p in flatten_weights(w)]
    x = torch.randn(1000, 1024, 14, 14, device="cuda", dtype=torch.bfloat16)
    base = dataclasses.replace(launch_config(196, x.dtype, "ieee", 90), chunk_tiles=128)
    overlap = dataclasses.replace(base, overlap=True)
    with torch.no_grad():
        want = insight_head_launch(x, params, norm, w.eps, "ieee", base)
        got = insight_head_launch(x, params, norm, w.eps, "ieee", overlap)
        torch.cuda.synchronize()
        assert torch.equal(got, want)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = insight_head_launch(x, params, norm, w.eps, "ieee", overlap)
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(captured, insight_head_launch(x, params, norm, w.eps, "ieee", base))


@pytest.mark.parametrize(
    "config",
    [
        "M64-X128-R128-K64-w4-s3-W8",
        "M128-X128-R128-K64-w4-s3-W8",
        "M64-X64-R64-K128-w4-s3",
        "M64-X64-R64-K64-w4-s3-T1",
        "M64-X128-R128-K64-w4-s3-W8-T1",
        "M64-X256-R256-K64-w4-s3-W16-T1",
    ],
)
def test_head_sweep_configs_match_reference(config) -> None:
    """The block configs ``device_check.sh`` sweeps (taller blocks of more warps for the reduce
    and the wide layers, 128-channel K steps, fp16 tables) give the reference's heatmap in
    bf16."""
    from fastinsight.kernels.head import flatten_weights, insight_head_launch, parse_config

    n, c, grid = 37, 1024, (14, 14)
    model = make_model(c, 3, grid, "tile")
    base = torch.randn(n, c, *grid)
    with torch.no_grad():
        ref64 = insight_head_reference(
            base.double(), copy_as(model, torch.float64, "cpu").head_weights()
        )
        w = copy_as(model, torch.bfloat16, "cuda").head_weights()
        x = base.to(device="cuda", dtype=torch.bfloat16)
        params = [p.detach() for p in flatten_weights(w)]
        out = insight_head_launch(x, params, "tile", w.eps, "ieee", parse_config(config))
        torch.cuda.synchronize()
        bound = lowp_bound(torch.bfloat16, max_err(insight_head_reference(x, w), ref64))
        assert max_err(out, ref64) <= bound
