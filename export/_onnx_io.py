"""Saving, checking and describing ONNX files (shared by the head, encoder and Triton export)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastinsight.atomic import check_writable
from fastinsight.errors import BackendError, CheckpointError, OutputError

# ONNX TensorProto element types by name (the subset a model of fastinsight can carry).
ONNX_TYPE_NAMES = {
    1: "FLOAT",
    2: "UINT8",
    3: "INT8",
    6: "INT32",
    7: "INT64",
    9: "BOOL",
    10: "FLOAT16",
    11: "DOUBLE",
    16: "BFLOAT16",
}
# Protobufs above this size must keep their weights in an external data file.
_MAX_INLINE_BYTES = 1_800_000_000


def require_onnx() -> None:
    try:
        import onnx  # noqa: F401
    except ImportError as exc:
        raise BackendError("ONNX export needs onnx; pip install 'fastinsight[export]'") from exc


def check_finite_weights(module: Any, what: str, *, precision: str = "") -> None:
    """Refuse to export ``module`` if a floating parameter or buffer holds NaN or inf.

    A NaN weight turns every score the served graph returns into NaN (an inf weight does after
    one multiplication by zero), and onnxruntime and TensorRT run it without complaint, so the
    file would look fine until a server answers NaN. ``precision`` ("fp16") says the module was
    cast for export: a finite float32 weight beyond float16's range (65504) became inf there.
    Raises ``CheckpointError`` naming the first bad tensor, before any file is written.
    """
    import torch

    from fastinsight.models.statefiles import non_finite

    if not isinstance(module, torch.nn.Module):
        return  # not a model: the export's own contract check names what is missing
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        bad = non_finite(t)
        if bad is None:
            continue
        count, kinds = bad
        if precision == "fp16":
            raise CheckpointError(
                f"{what}: weight {name!r} holds {count} values beyond float16's range "
                f"(|x| > 65504, {kinds} in fp16); nothing was exported: export with "
                "--precision fp32"
            )
        raise CheckpointError(
            f"{what}: weight {name!r} holds {count} non-finite values ({kinds}); "
            "nothing was exported: the weights are damaged or the training diverged, export "
            "an earlier checkpoint"
        )


def check_onnx_initializers_finite(onnx_path: str | os.PathLike[str]) -> None:
    """Refuse an ONNX file whose floating initializers (its weights) hold NaN or inf.

    Only initializers are weights: ``Constant`` nodes may legitimately be +-inf (the masked
    minimum and maximum of the Otsu threshold start from them). Raises ``CheckpointError``
    naming the first bad initializer (``InputError`` is not used: the graph is a model file).
    """
    import numpy as np
    import onnx
    from onnx import numpy_helper

    try:
        model = onnx.load(str(onnx_path))
    except Exception as exc:
        raise CheckpointError(f"cannot read ONNX file {str(onnx_path)!r}: {exc}") from None
    for init in model.graph.initializer:
        arr = numpy_helper.to_array(init)
        if arr.dtype.kind not in "fc":
            continue
        finite = np.isfinite(arr)
        if not bool(finite.all()):
            raise CheckpointError(
                f"ONNX file {str(onnx_path)!r}: weight {init.name!r} holds "
                f"{int((~finite).sum())} non-finite values (NaN/inf); nothing was built: "
                "export the graph again from a checkpoint with finite weights"
            )


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: its name, ONNX element type and dims (str = symbolic)."""

    name: str
    elem_type: int
    dims: tuple[int | str, ...]

    @property
    def type_name(self) -> str:
        return ONNX_TYPE_NAMES.get(self.elem_type, str(self.elem_type))

    @property
    def triton_dims(self) -> tuple[int, ...]:
        """Dims as a Triton config writes them: symbolic or unknown dims are -1."""
        return tuple(d if isinstance(d, int) and d > 0 else -1 for d in self.dims)


def _spec(value_info: object) -> TensorSpec:
    tt = value_info.type.tensor_type  # type: ignore[attr-defined]
    dims: list[int | str] = []
    for d in tt.shape.dim:
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        else:
            dims.append(d.dim_param or "?")
    return TensorSpec(value_info.name, int(tt.elem_type), tuple(dims))  # type: ignore[attr-defined]


def graph_io(model_or_path: object) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The inputs (initializers excluded) and outputs of an ONNX model or file."""
    import onnx

    model = (
        onnx.load(str(model_or_path), load_external_data=False)
        if isinstance(model_or_path, (str, os.PathLike))
        else model_or_path
    )
    graph = model.graph  # type: ignore[attr-defined]
    inits = {i.name for i in graph.initializer}
    inputs = [_spec(v) for v in graph.input if v.name not in inits]
    return inputs, [_spec(v) for v in graph.output]


def op_types(model: object) -> set[str]:
    """Every operator type in the model: main graph, subgraphs and model-local functions."""
    import onnx

    found: set[str] = set()

    def walk(nodes: Iterable[onnx.NodeProto]) -> None:
        for node in nodes:
            found.add(node.op_type if not node.domain else f"{node.domain}::{node.op_type}")
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    walk(attr.g.node)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    for g in attr.graphs:
                        walk(g.node)

    walk(model.graph.node)  # type: ignore[attr-defined]
    for fn in model.functions:  # type: ignore[attr-defined]
        walk(fn.node)
    return found


def tensor_types(model: object) -> set[int]:
    """Element types of every typed value, initializer and Cast target in the graph."""
    import onnx

    graph = model.graph  # type: ignore[attr-defined]
    types = {int(i.data_type) for i in graph.initializer}
    for v in [*graph.input, *graph.output, *graph.value_info]:
        if v.type.HasField("tensor_type"):
            types.add(int(v.type.tensor_type.elem_type))
    for node in graph.node:
        if node.op_type == "Cast":
            for a in node.attribute:
                if a.name == "to":
                    types.add(int(a.i))
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.type == onnx.AttributeProto.TENSOR:
                    types.add(int(a.t.data_type))
    return types


@contextlib.contextmanager
def atomic_dir_target(out_path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temp folder beside ``out_path``; files written there named like ``out_path`` (and
    its external-data sidecar) are moved into place on success; the folder is always removed."""
    target = check_writable(out_path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent))
    try:
        yield tmp
        for f in sorted(tmp.iterdir()):
            os.replace(f, target.parent / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def finalize_and_save(
    proto: Any,
    out_path: str | os.PathLike[str],
    *,
    metadata: dict[str, str],
    doc: str,
    forbidden_ops: Iterable[str] = (),
    check: bool = True,
    before_commit: Callable[[Path], object] | None = None,
) -> Path:
    """Stamp metadata, refuse forbidden operators, check and save ``proto`` atomically.

    Models over ~1.8 GB keep their weights in ``<name>.data`` beside the graph (ONNX's protobuf
    limit is 2 GB); onnxruntime and TensorRT's parser read it from the same folder.

    ``before_commit(tmp_path)`` runs on the finished file in its temporary folder, before it is
    renamed into place: a parity check that raises there leaves no file behind and the previous
    ``out_path`` untouched (a file that fails its check is no output: "nothing destroyed").
    """
    import onnx

    model = proto
    bad = sorted(op_types(model) & set(forbidden_ops))
    if bad:
        raise OutputError(
            f"the exported graph contains {bad}, which TensorRT computes unsafely; this is a bug "
            "in fastinsight's export, please report it"
        )
    del model.metadata_props[:]  # type: ignore[attr-defined]
    for key, value in sorted(metadata.items()):
        entry = model.metadata_props.add()  # type: ignore[attr-defined]
        entry.key, entry.value = key, value
    model.doc_string = doc  # type: ignore[attr-defined]
    model.producer_name = "fastinsight"  # type: ignore[attr-defined]
    target = Path(out_path).expanduser()
    size = model.ByteSize()  # type: ignore[attr-defined]
    external = size > _MAX_INLINE_BYTES
    with atomic_dir_target(target) as tmp:
        path = tmp / target.name
        if external:
            onnx.save_model(
                model,
                str(path),
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location=f"{target.name}.data",
                size_threshold=1024,
            )
        else:
            onnx.save_model(model, str(path))
        if check:
            try:
                onnx.checker.check_model(str(path), full_check=True)
            except Exception as exc:
                raise OutputError(
                    f"the exported ONNX graph fails onnx.checker ({exc}); nothing was written"
                ) from exc
        if before_commit is not None:
            before_commit(path)
    return target
