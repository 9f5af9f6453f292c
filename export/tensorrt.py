"""TensorRT engines from the exported ONNX graphs, with the ``tensorrt`` Python API (10.x / 11.x).

- The network is **strongly typed**: every tensor's precision comes from the ONNX model (an fp16
  export builds an fp16 engine). TensorRT 11 removes the FP16/BF16 builder flags and always
  builds strongly typed (spec section 5), so no FP16/BF16 flag is ever set here. TF32 for fp32
  convolutions stays TensorRT's default (``tf32=False`` / ``--no-tf32`` turns it off).
- One optimization profile over the tile count N (``min_tiles <= opt_tiles <= max_tiles``) for
  every input whose first dimension is dynamic; other dynamic dims (a channel-norm head's grid)
  take ``grid_range``.
- A timing cache is loaded before and saved after the build (both optional), so rebuilding on the
  same GPU and TensorRT version skips tactic timing.
- The plan, a ``<plan>.json`` sidecar (the TensorRT version, the device, the profile, the I/O
  tensors and the plan's sha256; read by the Triton repository writer) and the timing cache are
  written to temporary files, checked (``before_commit``: ``check_engine``) and renamed into
  place together: an engine that fails its check replaces nothing.
- What can be checked without TensorRT is checked first (``check_build_inputs``): option values,
  the ONNX file, the outputs (writable, none of them an input), NaN weights, float64.
- ``check_engine`` runs the engine on random inputs (torch CUDA tensors as I/O buffers,
  ``set_tensor_address`` + ``execute_async_v3``) and compares with onnxruntime on the same inputs.

Graphs carrying float64 tensors are refused: TensorRT has no float64 (its ONNX parser silently
narrows DOUBLE to FLOAT). Export the head with ``--accum-dtype float32`` for TensorRT.

Nothing here runs without a CUDA GPU and the ``tensorrt`` package: ``require_tensorrt`` raises a
``BackendError`` with one plain sentence saying what is missing.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fastinsight.atomic import atomic_outputs, atomic_path, prepare_outputs
from fastinsight.errors import BackendError, InputError, OutputError, ParityError
from fastinsight.text import loads_json

from ._guards import ExportOptionError
from ._onnx_io import check_onnx_initializers_finite

DEFAULT_WORKSPACE = 4 << 30


def tensorrt_status() -> str | None:
    """None when a TensorRT engine can be built and run here, else why not (one sentence)."""
    try:
        import tensorrt  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install failing to load its libraries
        reason = "is not installed" if isinstance(exc, ImportError) else f"cannot load ({exc})"
        return (
            f"TensorRT {reason}: `fastinsight export tensorrt` needs the tensorrt Python package "
            "and an NVIDIA GPU (pip install tensorrt on a CUDA machine)"
        )
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except Exception:
        has_gpu = False
    if not has_gpu:
        return (
            "no CUDA GPU is visible: TensorRT builds engines for the GPU it runs on; run "
            "`fastinsight export tensorrt` on the inference machine's GPU"
        )
    return None


def require_tensorrt() -> Any:
    """Import and return ``tensorrt``, or raise BackendError saying plainly what is missing."""
    reason = tensorrt_status()
    if reason is not None:
        raise BackendError(reason)
    import tensorrt as trt

    return trt


def _major(trt: Any) -> int:
    try:
        return int(str(trt.__version__).split(".")[0])
    except ValueError:
        return 10


@dataclass(frozen=True)
class ProfileShapes:
    """min/opt/max shapes of one input for the optimization profile."""

    name: str
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]


@dataclass
class EngineInfo:
    """What ``build_engine`` produced (also written as ``<plan>.json``)."""

    plan: str
    onnx: str
    tensorrt_version: str
    device: str
    profile: list[ProfileShapes]
    inputs: list[dict[str, Any]] = field(default_factory=list)
    outputs: list[dict[str, Any]] = field(default_factory=list)
    timing_cache: str | None = None
    tf32: bool = True
    # sha256 of the plan's bytes: ties the sidecar to its plan (None in sidecars of older builds)
    plan_sha256: str | None = None

    def to_json(self) -> str:
        data = dict(self.__dict__)
        data["profile"] = [p.__dict__ for p in self.profile]
        return json.dumps(data, indent=2, default=list)

    @classmethod
    def from_json(cls, text: str) -> EngineInfo:
        data = loads_json(text)
        data["profile"] = [
            ProfileShapes(p["name"], tuple(p["min"]), tuple(p["opt"]), tuple(p["max"]))
            for p in data["profile"]
        ]
        return cls(**data)


def sidecar_path(plan: str | os.PathLike[str]) -> Path:
    return Path(f"{plan}.json")


def read_engine_info(plan: str | os.PathLike[str]) -> EngineInfo | None:
    """The sidecar ``<plan>.json`` written by ``build_engine``, or None."""
    path = sidecar_path(plan)
    if not path.is_file():
        return None
    try:
        return EngineInfo.from_json(path.read_text())
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        raise InputError(
            f"{str(path)!r} is not the sidecar `fastinsight export tensorrt` writes "
            f"({type(exc).__name__}: {str(exc)[:120]}); rebuild the engine"
        ) from None


def check_tile_range(min_tiles: int, opt_tiles: int, max_tiles: int) -> None:
    """The optimization profile's tile counts; a bad range is a bad option (exit 2)."""
    if not 1 <= min_tiles <= opt_tiles <= max_tiles:
        raise ExportOptionError(
            f"tile counts must satisfy 1 <= min <= opt <= max, got min={min_tiles}, "
            f"opt={opt_tiles}, max={max_tiles}; pass --min-tiles/--opt-tiles/--max-tiles"
        )


def profile_shapes(
    onnx_path: str | os.PathLike[str],
    min_tiles: int,
    opt_tiles: int,
    max_tiles: int,
    grid_range: tuple[int, int, int] = (1, 14, 64),
) -> list[ProfileShapes]:
    """The optimization profile for every input of the ONNX graph with a dynamic dim.

    The first dim is the tile count (or the encoder's batch); any other dynamic dim (the grid of
    a channel-norm head) takes ``grid_range`` (min, opt, max).
    """
    from ._onnx_io import graph_io

    check_tile_range(min_tiles, opt_tiles, max_tiles)
    inputs, _ = graph_io(onnx_path)
    shapes = []
    for spec in inputs:
        lo, mid, hi = [], [], []
        for axis, d in enumerate(spec.dims):
            if isinstance(d, int) and d > 0:
                lo.append(d)
                mid.append(d)
                hi.append(d)
            elif axis == 0:
                lo.append(min_tiles)
                mid.append(opt_tiles)
                hi.append(max_tiles)
            else:
                lo.append(grid_range[0])
                mid.append(grid_range[1])
                hi.append(grid_range[2])
        if any(not (isinstance(d, int) and d > 0) for d in spec.dims):
            shapes.append(ProfileShapes(spec.name, tuple(lo), tuple(mid), tuple(hi)))
    return shapes


def check_workspace(workspace: float, flag: str = "--workspace") -> None:
    """The builder's workspace (bytes from the API, GiB from the CLI): finite and > 0."""
    if isinstance(workspace, bool) or not (math.isfinite(workspace) and workspace > 0):
        raise ExportOptionError(
            f"{flag} must be a size > 0, got {workspace!r}; the builder needs scratch memory "
            "(default 4 GiB)"
        )


def engine_outputs(
    out_path: str | os.PathLike[str], timing_cache: str | os.PathLike[str] | None = None
) -> dict[str, str | os.PathLike[str] | None]:
    """Every file ``build_engine`` writes, keyed the way ``prepare_outputs`` names them."""
    return {
        "--out": out_path,
        "--out's sidecar": sidecar_path(Path(out_path).expanduser()),
        "--timing-cache": timing_cache,
    }


def engine_inputs(onnx_path: str | os.PathLike[str]) -> dict[str, str | os.PathLike[str] | None]:
    """The files ``build_engine`` reads: the graph and its external weights, when it has them."""
    onnx_file = Path(onnx_path).expanduser()
    data = Path(f"{onnx_file}.data")
    return {"--onnx": onnx_file, "--onnx's weights": data if data.exists() else None}


def check_build_inputs(
    onnx_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    min_tiles: int = 1,
    opt_tiles: int = 1024,
    max_tiles: int = 16384,
    timing_cache: str | os.PathLike[str] | None = None,
    workspace: float = DEFAULT_WORKSPACE,
) -> Path:
    """Everything ``build_engine`` can check without TensorRT, cheapest first; returns the ONNX
    path. Option values (exit 2), the ONNX file (exit 4), the outputs: the plan, its sidecar and
    the timing cache writable, none of them the ONNX or each other (exit 6); then the graph's
    weights finite (exit 3) and no float64 in it (exit 4). So a user on a machine without
    TensorRT, or before minutes of engine build, hears of what they can fix first."""
    check_tile_range(min_tiles, opt_tiles, max_tiles)
    check_workspace(workspace, "workspace")
    onnx_file = Path(onnx_path).expanduser()
    if not onnx_file.is_file():
        raise InputError(f"ONNX file {str(onnx_file)!r} does not exist; export it first")
    prepare_outputs(engine_outputs(out_path, timing_cache), engine_inputs(onnx_file))
    check_onnx_initializers_finite(onnx_file)  # a NaN weight builds fine and serves NaN
    _refuse_float64(onnx_file)
    return onnx_file


def _refuse_float64(onnx_path: str | os.PathLike[str]) -> None:
    import onnx

    from ._onnx_io import tensor_types

    model = onnx.load(str(onnx_path), load_external_data=False)
    if onnx.TensorProto.DOUBLE in tensor_types(model):
        raise InputError(
            f"{str(onnx_path)!r} computes in float64, which TensorRT does not have (its parser "
            "would narrow it silently); re-export the head for TensorRT with "
            "`fastinsight export onnx ... --accum-dtype float32`"
        )


def _init_plugins(trt: Any, logger: Any) -> None:
    # Plugins (ScatterElements with a reduction, for --histogram scatter) live in the default
    # registry; the matmul histogram needs none.
    init = getattr(trt, "init_libnvinfer_plugins", None)
    if init is not None:
        init(logger, "")


def _parse(trt: Any, network: Any, logger: Any, onnx_path: Path) -> Any:
    parser = trt.OnnxParser(network, logger)
    # parse_from_file resolves external weight files relative to the model's folder.
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise OutputError(
            f"TensorRT's ONNX parser rejected {str(onnx_path)!r}: " + " | ".join(errors[:5])
        )
    return parser


def _dtype_name(dtype: Any) -> str:
    """``trt.DataType.HALF`` -> ``"HALF"`` (pybind11 enums have ``.name``)."""
    return str(getattr(dtype, "name", str(dtype).split(".")[-1]))


def _io_specs(engine: Any, trt: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    inputs, outputs = [], []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        entry = {
            "name": name,
            "dtype": _dtype_name(engine.get_tensor_dtype(name)),
            "shape": [int(d) for d in engine.get_tensor_shape(name)],
        }
        if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
            inputs.append(entry)
        else:
            outputs.append(entry)
    return inputs, outputs


def build_engine(
    onnx_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    min_tiles: int = 1,
    opt_tiles: int = 1024,
    max_tiles: int = 16384,
    timing_cache: str | os.PathLike[str] | None = None,
    workspace: int = DEFAULT_WORKSPACE,
    grid_range: tuple[int, int, int] = (1, 14, 64),
    verbose: bool = False,
    tf32: bool = True,
    before_commit: Callable[[Path, EngineInfo], object] | None = None,
) -> EngineInfo:
    """Build a TensorRT engine from ``onnx_path`` and write it to ``out_path`` atomically.

    ``tf32``: let fp32 convolutions and matmuls use TF32 (TensorRT's default; ~1e-3 relative).
    The histogram MatMul stays exact either way (its operands are 0 and 1).

    Everything that can be checked without TensorRT is checked first (``check_build_inputs``:
    options, the ONNX file, the outputs, the graph's weights and dtypes). The plan, its
    ``<plan>.json`` sidecar and the timing cache are written to temporary files and renamed into
    place together; ``before_commit(tmp_plan, info)`` (``check_engine``: the CLI runs it unless
    ``--no-check``) runs on the temporary plan first, so an engine that fails it replaces
    nothing: an existing plan, sidecar and cache keep their contents.

    Raises ExportOptionError (a ConfigError) for a bad tile range or workspace, OutputError for
    outputs that cannot be written or would overwrite the ONNX, BackendError without TensorRT or
    a GPU, InputError for a float64 graph, OutputError when TensorRT cannot parse or build the
    network, ParityError from ``before_commit``.
    """
    onnx_file = check_build_inputs(
        onnx_path, out_path, min_tiles, opt_tiles, max_tiles, timing_cache, workspace
    )
    trt = require_tensorrt()
    import torch

    logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
    _init_plugins(trt, logger)
    builder = trt.Builder(logger)
    flags = 0
    strongly = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if strongly is not None and _major(trt) < 11:
        # TensorRT 11 is always strongly typed (the flag is deprecated and ignored there).
        flags |= 1 << int(strongly)
    network = builder.create_network(flags)
    _parser = _parse(trt, network, logger, onnx_file)  # keep the parser alive while building

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace))
    tf32_flag = getattr(trt.BuilderFlag, "TF32", None)
    if tf32_flag is not None and not tf32:
        config.clear_flag(tf32_flag)
    profile = builder.create_optimization_profile()
    shapes = profile_shapes(onnx_file, min_tiles, opt_tiles, max_tiles, grid_range)
    for s in shapes:
        profile.set_shape(s.name, s.min, s.opt, s.max)
    if shapes:
        config.add_optimization_profile(profile)

    cache_file = Path(timing_cache).expanduser() if timing_cache else None
    cache_bytes = cache_file.read_bytes() if cache_file and cache_file.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    if not config.set_timing_cache(cache, False):
        # A cache from another TensorRT version or GPU: start from an empty one.
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, False)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise OutputError(
            f"TensorRT could not build an engine from {str(onnx_file)!r} (see the messages "
            "above); try a larger --workspace or a smaller --max-tiles"
        )
    plan_bytes = bytes(memoryview(serialized))
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(plan_bytes)
    if engine is None:
        raise OutputError(
            f"TensorRT could not load the engine it just built from {str(onnx_file)!r}; "
            "nothing was written"
        )
    inputs, outputs = _io_specs(engine, trt)
    info = EngineInfo(
        plan=str(Path(out_path).expanduser()),
        onnx=str(onnx_file),
        tensorrt_version=str(trt.__version__),
        device=torch.cuda.get_device_name(),
        profile=shapes,
        inputs=inputs,
        outputs=outputs,
        timing_cache=str(cache_file) if cache_file else None,
        tf32=tf32,
        plan_sha256=hashlib.sha256(plan_bytes).hexdigest(),
    )
    # All three or none, and only after the engine passed its check (atomic_outputs renames
    # them together when the block ends without an exception).
    with atomic_outputs():
        with atomic_path(out_path) as tmp_plan:
            tmp_plan.write_bytes(plan_bytes)
        with atomic_path(sidecar_path(Path(out_path).expanduser())) as tmp:
            tmp.write_text(info.to_json())
        if cache_file is not None:
            with atomic_path(cache_file) as tmp:
                tmp.write_bytes(bytes(memoryview(config.get_timing_cache().serialize())))
        if before_commit is not None:
            try:
                before_commit(tmp_plan, info)
            except ParityError as exc:
                raise ParityError(
                    f"{exc}; nothing was written ({str(out_path)!r} and its sidecar keep their "
                    "previous contents)"
                ) from None
    return info


_TORCH_DTYPES = {
    "FLOAT": "float32",
    "HALF": "float16",
    "BF16": "bfloat16",
    "INT32": "int32",
    "INT64": "int64",
    "INT8": "int8",
    "UINT8": "uint8",
    "BOOL": "bool",
}


def _torch_dtype(trt_dtype: Any) -> Any:
    import torch

    name = _dtype_name(trt_dtype)
    try:
        return getattr(torch, _TORCH_DTYPES[name])
    except KeyError:
        raise OutputError(f"engine tensor of TensorRT type {name} is not supported here") from None


@dataclass
class EngineCheck:
    """Largest differences between the engine and onnxruntime, per output, over all sizes."""

    sizes: tuple[int, ...]
    errors: dict[str, float]
    tolerances: dict[str, float]

    def summary(self) -> str:
        parts = [f"{k} {v:.1e} (tol {self.tolerances[k]:.0e})" for k, v in self.errors.items()]
        return f"TensorRT vs onnxruntime (N={','.join(map(str, self.sizes))}): " + "; ".join(parts)


def _random_feeds(session: Any, n: int, grid: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for inp in session.get_inputs():
        shape = []
        for axis, d in enumerate(inp.shape):
            if isinstance(d, int) and d > 0:
                shape.append(d)
            else:
                shape.append(n if axis == 0 else grid)
        kind = inp.type
        if kind == "tensor(uint8)":
            feeds[inp.name] = rng.integers(0, 256, size=shape, dtype=np.uint8)
        elif kind == "tensor(bool)":
            mask = rng.random(shape) > 0.25
            mask.reshape(-1)[0] = True
            feeds[inp.name] = mask
        else:
            dtype = np.float16 if kind == "tensor(float16)" else np.float32
            feeds[inp.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


def check_engine(
    plan: str | os.PathLike[str],
    onnx_path: str | os.PathLike[str],
    sizes: tuple[int, ...] = (1, 7, 64),
    seed: int = 0,
    atol: float | None = None,
    *,
    tf32: bool | None = None,
) -> EngineCheck:
    """Run the engine and onnxruntime on the same random inputs; raise ParityError on mismatch.

    Tolerances (absolute, on heatmaps in [0, 1] and scores): fp32 graphs 5e-3 when the engine
    may use TF32 (the default; 1e-3 without), fp16 graphs 2e-2; thresholds may differ by one
    histogram bin (float32 Otsu statistics summed in another order, edges rounded by fused
    kernels) and are compared against the bin width; heatmap cells kept by one side and zeroed by
    the other (values at the threshold) are left out of the heatmap comparison. ``tf32``: whether
    the engine was built with TF32 (None: read from the plan's sidecar).
    """
    trt = require_tensorrt()
    import torch

    from .verify import ort_session

    session = ort_session(onnx_path)
    logger = trt.Logger(trt.Logger.WARNING)
    _init_plugins(trt, logger)
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(Path(plan).expanduser().read_bytes())
    if engine is None:
        raise OutputError(
            f"TensorRT could not load {str(plan)!r}: it was built by another TensorRT version or "
            "for another GPU; rebuild it here with `fastinsight export tensorrt`"
        )
    context = engine.create_execution_context()
    device = torch.device("cuda")
    stream = torch.cuda.Stream(device)
    is_fp16 = any(i.type == "tensor(float16)" for i in session.get_inputs())
    if tf32 is None:  # the engine's setting, from its sidecar (a plan being checked has none)
        info = read_engine_info(plan)
        tf32 = info.tf32 if info is not None else True
    base_tol = atol if atol is not None else (2e-2 if is_fp16 else 5e-3 if tf32 else 1e-3)
    errors: dict[str, float] = {}
    tols: dict[str, float] = {}
    for i, n in enumerate(sizes):
        feeds = _random_feeds(session, n, 14, seed + i)
        want = dict(
            zip([o.name for o in session.get_outputs()], session.run(None, feeds), strict=True)
        )
        buffers: dict[str, torch.Tensor] = {}
        for name, array in feeds.items():
            t = torch.from_numpy(np.ascontiguousarray(array)).to(device)
            buffers[name] = t
            if not context.set_input_shape(name, tuple(t.shape)):
                raise OutputError(
                    f"input {name!r} of shape {tuple(t.shape)} is outside the engine's "
                    "optimization profile; rebuild with a wider --min-tiles/--max-tiles"
                )
        for idx in range(engine.num_io_tensors):
            name = engine.get_tensor_name(idx)
            if engine.get_tensor_mode(name) == trt.TensorIOMode.OUTPUT:
                shape = tuple(int(d) for d in context.get_tensor_shape(name))
                buffers[name] = torch.empty(
                    shape, dtype=_torch_dtype(engine.get_tensor_dtype(name)), device=device
                )
            context.set_tensor_address(name, buffers[name].data_ptr())
        # The inputs were copied on the current stream: order the engine after them.
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            if not context.execute_async_v3(stream.cuda_stream):
                raise OutputError("TensorRT failed to run the engine (execute_async_v3)")
        stream.synchronize()
        for name, ref in want.items():
            got = buffers[name].float().cpu().numpy()
            err = float(np.max(np.abs(got - ref.astype(np.float32)))) if ref.size else 0.0
            tol = base_tol
            if name == "thresholds":
                raw = want.get("raw_heatmap")
                if raw is not None:
                    k = raw.shape[1]
                    v = raw.astype(np.float32).transpose(1, 0, 2, 3).reshape(k, -1)
                    tol = max(tol, float(np.max(v.max(1) - v.min(1))) / 256 + base_tol)
            elif name == "heatmap":
                # A cell within rounding of the threshold may be kept by one and zeroed by the
                # other: compare only the cells both keep or both zero.
                keep_ref, keep_got = ref != 0, got != 0
                agree = keep_ref == keep_got
                err = float(np.max(np.abs(got - ref)[agree])) if agree.any() else 0.0
            errors[name] = max(errors.get(name, 0.0), err)
            tols[name] = max(tols.get(name, 0.0), tol)
            if not err <= tol:
                raise ParityError(
                    f"the TensorRT engine disagrees with onnxruntime on {name!r}: max |diff| "
                    f"{err:.3g} > {tol:.3g} (N={n})"
                )
    return EngineCheck(tuple(sizes), errors, tols)
