"""Helpers of the export tests: seeded models, official-layout checkpoints, graph checks."""

from __future__ import annotations

from pathlib import Path

import torch

from fastinsight import InsightConfig, InsightModel

SMALL_C = 32


def make_model(**overrides: object) -> InsightModel:
    """A seeded random INSIGHT model (reference backend) with a small input width by default."""
    cfg = InsightConfig(**{"in_dim": SMALL_C, "num_classes": 3, **overrides})  # type: ignore[arg-type]
    torch.manual_seed(1234)
    model = InsightModel(cfg, backend="reference").eval()
    # Spread the heads' outputs: random LayerNorm affines make the heatmap less flat.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("weight") and p.ndim == 3:
                p.normal_(1.0, 0.3)
    return model


def save_official(path: Path, num_classes: int, **overrides: object) -> Path:
    """An official-layout checkpoint: the plain state_dict, saved with torch.save."""
    torch.save(make_model(num_classes=num_classes, **overrides).state_dict(), path)
    return path


def assert_clean_graph(path: Path, *, allow_double: bool = True) -> set[str]:
    """onnx.checker passes, no ReduceLogSumExp anywhere, standard domain only. Returns op types."""
    import onnx

    from fastinsight.export._onnx_io import op_types, tensor_types

    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path))
    ops = op_types(model)
    assert "ReduceLogSumExp" not in ops, sorted(ops)
    assert not any("::" in op for op in ops), f"non-standard domain ops: {sorted(ops)}"
    if not allow_double:
        assert onnx.TensorProto.DOUBLE not in tensor_types(model)
    return ops


def tiny_graph(path: Path, cast_to: int | None = None, width: int | str = "W") -> Path:
    """A hand-built ONNX graph ``tokens [N, 4, 14, width] -> out`` (Relu, then Identity or a
    round trip through ``cast_to``, e.g. float64) with a dynamic first dimension."""
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("tokens", TensorProto.FLOAT, ["N", 4, 14, width])
    y = helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 4, 14, width])
    nodes = [helper.make_node("Relu", ["tokens"], ["r"])]
    if cast_to is not None:
        nodes += [
            helper.make_node("Cast", ["r"], ["c"], to=cast_to),
            helper.make_node("Cast", ["c"], ["out"], to=TensorProto.FLOAT),
        ]
    else:
        nodes.append(helper.make_node("Identity", ["r"], ["out"]))
    onnx.save(helper.make_model(helper.make_graph(nodes, "g", [x], [y])), str(path))
    return path
