"""Packaging and tracing: lazy Triton import, torch.library ops, torch.compile through a model."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from .helpers import DEVICE, copy_as, make_model, max_err


def test_import_does_not_import_triton() -> None:
    code = (
        "import sys, fastinsight, fastinsight.kernels as k\n"
        "assert 'triton' not in sys.modules, 'triton imported eagerly'\n"
        "assert callable(k.available)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=dict(os.environ))


def test_launchers_are_torch_library_ops() -> None:
    import fastinsight.kernels as k

    assert k.insight_head.__module__ == "fastinsight.kernels.ops"
    for name in ("insight_head", "otsu_threshold", "pool"):
        assert hasattr(torch.ops.fastinsight, name)


def test_fake_implementations_match() -> None:
    """``torch.library.opcheck``: schema and fake (meta) kernels agree with the real ones."""
    import fastinsight.kernels  # noqa: F401  (registers the ops)
    from fastinsight.kernels import head

    model = make_model(96, 3, (4, 4), "channel").to(DEVICE)
    x = torch.randn(2, 96, 4, 4, device=DEVICE)
    params = [p.detach() for p in head.flatten_weights(model.head_weights())]
    tests = ("test_schema", "test_faketensor")
    torch.library.opcheck(
        torch.ops.fastinsight.insight_head.default,
        (x, params, "channel", 1e-5, "ieee"),
        test_utils=tests,
    )
    values = torch.rand(2, 300, device=DEVICE)
    mask = torch.rand(300, device=DEVICE) > 0.5
    torch.library.opcheck(
        torch.ops.fastinsight.otsu_threshold.default, (values, mask, 256), test_utils=tests
    )
    torch.library.opcheck(
        torch.ops.fastinsight.pool.default, (values, mask, "smoothmax", None, 8.0), test_utils=tests
    )


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_torch_compile_traces_model_with_kernels(backend: str) -> None:
    """A model using the kernels compiles (one opaque node per op) and gives the eager result."""
    import torch._dynamo

    model = make_model(96, 1, (4, 4), "tile").to(DEVICE)
    kernel_model = copy_as(model, torch.float32, DEVICE, backend="triton")
    tokens = torch.randn(2, 96, 4, 4, device=DEVICE)
    mask = torch.rand(2, 4, 4, device=DEVICE) > 0.2

    def run(m, t, msk):
        raw = m(t)
        heat, thresholds, scores = m.threshold_and_pool(raw, msk)
        return raw, thresholds, scores

    torch._dynamo.reset()
    compiled = torch.compile(run, backend=backend, fullgraph=False)
    with torch.no_grad():
        got = compiled(kernel_model, tokens, mask)
        want = run(kernel_model, tokens, mask)
        ref = run(model, tokens, mask)
    for g, w, r in zip(got, want, ref, strict=True):
        assert max_err(g, w) == 0.0
        assert max_err(g, r) <= 1e-5


def test_launchers_make_the_tensors_device_current() -> None:
    """Triton launches on the current CUDA device: every launcher enters the tensors' device
    first (a model on cuda:1 must not launch on cuda:0); CPU tensors need no guard."""
    import contextlib

    from fastinsight.kernels.ops import device_guard

    guard = device_guard(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert isinstance(device_guard(torch.device("cpu")), contextlib.nullcontext)


def test_every_launcher_enters_the_device_guard(monkeypatch) -> None:
    from fastinsight import kernels
    from fastinsight.kernels import ops

    from .helpers import DEVICE, make_model

    seen = []
    real = ops.device_guard

    def spy(device):
        seen.append(device)
        return real(device)

    monkeypatch.setattr(ops, "device_guard", spy)
    values = torch.rand(2, 500, device=DEVICE)
    model = make_model(16, 1, (4, 4), "tile").to(DEVICE)
    with torch.no_grad():
        kernels.insight_head(torch.randn(2, 16, 4, 4, device=DEVICE), model.head_weights())
        kernels.otsu_threshold(values)
        kernels.smoothmax(values, None, 8.0)
        kernels.threshold_and_pool(values, None, "mean")
    assert seen == [values.device] * 4
