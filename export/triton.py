"""A model repository for NVIDIA Triton Inference Server: head, encoder, and ensembles.

Layout (``write_triton_repo``)::

    repo/
      insight_head/1/model.onnx          onnxruntime  tokens [N,C,h,w] -> raw_heatmap, heatmap,
      insight_head/config.pbtxt                       thresholds [K], scores [K]
      insight_head_trt/1/model.plan      tensorrt     the same graph as a TensorRT engine (--plan)
      insight_head_trt/config.pbtxt
      encoder/1/model.onnx               onnxruntime  tiles uint8 [B,H,W,3] -> tokens [B,C,h,w]
      encoder/config.pbtxt                            (batching model, dynamic batching)
      insight_pipeline/1/                ensemble     tiles -> encoder -> insight_head
      insight_pipeline/config.pbtxt
      -- for slides larger than one request (``chunked``, the default with an encoder) --
      insight_head_raw/1/model.onnx      onnxruntime  tokens -> raw_heatmap, per tile (batching)
      insight_postprocess/1/model.onnx   onnxruntime  raw_heatmap [N,K,h,w] -> heatmap,
                                                      thresholds, scores (whole slide)
      insight_tiles/1/                   ensemble     tiles -> encoder -> insight_head_raw

How the batch dimensions line up. The tile count N of a slide is the head's *bag* dimension: the
Otsu threshold and the pooling run over all N tiles at once, so ``insight_head`` is a
non-batching model (``max_batch_size: 0``) with an explicit dynamic first dim (``dims: [-1, C,
h, w]``); Triton must never split or merge slides along it. The encoder is an ordinary batching
model (``max_batch_size: B > 0``, dims without the batch). In ``insight_pipeline``
(``max_batch_size: 0``) the client's ``tiles`` ``[N, H, W, 3]`` reach the encoder as a request of
batch N, whose ``tokens`` ``[N, C, h, w]`` become the head's bag of N tiles; Triton accepts the
pairing because a non-batching ``[-1, d...]`` matches a batching ``[d...]`` (its ensemble
validator compares the full shapes). So one ``insight_pipeline`` request carries at most the
encoder's ``max_batch_size`` tiles. Larger slides go through ``insight_tiles`` in chunks (a
batching ensemble: raw heatmaps per tile are independent), and the client sends the stitched
``raw_heatmap`` of the whole slide to ``insight_postprocess`` once (a few MB: the heatmap, not
the token grids). See docs/deployment.md for a client.

Configs are built as ``model_config_pb2.ModelConfig`` protobufs (the official schema shipped in
``tritonclient``) and written with ``text_format``, so they are valid by construction;
``check_repo`` parses them back and checks them against the graphs and Triton's ensemble rules.
The repository is written into a temporary folder and renamed into place: a failed export leaves
no half repository.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from fastinsight.atomic import resolve_output, special_location

# The encoder-identity check lives with the encoders and the model files; re-exported here, where
# `export triton-repo` / `export onnx` and their tests have always found it.
from fastinsight.encoders.identity import check_encoder_identity, encoder_key  # noqa: F401
from fastinsight.errors import BackendError, CheckpointError, ConfigError, InputError, OutputError
from fastinsight.models.checkpoints import recorded_encoder  # noqa: F401
from fastinsight.models.insight import InsightModel

from ._guards import ExportOptionError, check_positive_int, refuse_inputs_inside
from ._onnx_io import TensorSpec, check_finite_weights, graph_io
from .head import HeadExportOptions, free_grid

HEAD = "insight_head"
HEAD_TRT = "insight_head_trt"
ENCODER = "encoder"
PIPELINE = "insight_pipeline"
HEAD_RAW = "insight_head_raw"
POSTPROCESS = "insight_postprocess"
TILES = "insight_tiles"

# ONNX element type -> Triton DataType name.
_ONNX_TO_TRITON = {
    1: "TYPE_FP32",
    2: "TYPE_UINT8",
    3: "TYPE_INT8",
    6: "TYPE_INT32",
    7: "TYPE_INT64",
    9: "TYPE_BOOL",
    10: "TYPE_FP16",
    11: "TYPE_FP64",
    16: "TYPE_BF16",
}
# TensorRT DataType name (as build_engine records it) -> Triton DataType name.
_TRT_TO_TRITON = {
    "FLOAT": "TYPE_FP32",
    "HALF": "TYPE_FP16",
    "BF16": "TYPE_BF16",
    "INT32": "TYPE_INT32",
    "INT64": "TYPE_INT64",
    "UINT8": "TYPE_UINT8",
    "BOOL": "TYPE_BOOL",
}
INSTANCE_KINDS = {"gpu": "KIND_GPU", "cpu": "KIND_CPU", "auto": "KIND_AUTO"}


def _check_serving(max_batch_size: int, instances: int, instance_kind: str) -> None:
    """The serving settings every model repository shares, checked before anything is written.
    Bad values are bad options: ``ExportOptionError``, a ``ConfigError`` (exit 2)."""
    check_positive_int(max_batch_size, "max_batch_size (--max-batch-size)")
    check_positive_int(instances, "instances (--instances)")
    if instance_kind not in INSTANCE_KINDS:
        raise ExportOptionError(
            f"instance_kind (--instance-kind) must be one of {sorted(INSTANCE_KINDS)}, got "
            f"{instance_kind!r}"
        )


def check_triton_options(
    max_batch_size: int = 64,
    instances: int = 1,
    instance_kind: str = "gpu",
    ensemble_head: str = "auto",
    plan: str | os.PathLike[str] | None = None,
) -> None:
    """Every option value of ``write_triton_repo``, before a model is loaded (exit 2).

    A TensorRT plan runs only on an NVIDIA GPU (Triton's TensorRT backend has no CPU instances),
    so a repository for a CPU-only server (``instance_kind="cpu"``) cannot hold one: its
    ``insight_head_trt``, and an ``insight_pipeline`` routed to it, would not load there.
    """
    _check_serving(max_batch_size, instances, instance_kind)
    if ensemble_head not in ("auto", "onnx", "trt"):
        raise ExportOptionError(
            f"ensemble_head (--ensemble-head) must be auto, onnx or trt, got {ensemble_head!r}"
        )
    if ensemble_head == "trt" and plan is None:
        raise ExportOptionError(
            "ensemble_head 'trt' (--ensemble-head trt) routes insight_pipeline to the TensorRT "
            "head, which needs its plan: pass --plan head.plan (from `fastinsight export "
            "tensorrt`), or --ensemble-head onnx"
        )
    if instance_kind == "cpu" and (plan is not None or ensemble_head == "trt"):
        raise ExportOptionError(
            "a TensorRT plan runs only on an NVIDIA GPU, and instance_kind 'cpu' "
            "(--instance-kind cpu) is for a CPU-only server, where insight_head_trt and a "
            "pipeline routed to it cannot load: leave out --plan (and --ensemble-head trt), or "
            "use --instance-kind gpu or auto"
        )


def _pb() -> Any:
    try:
        from tritonclient.grpc import model_config_pb2
    except ImportError as exc:
        raise BackendError(
            "writing a Triton repository needs the official model-config schema from "
            "tritonclient; pip install 'tritonclient[grpc]' (or 'fastinsight[export]')"
        ) from exc
    return model_config_pb2


def triton_dtype(elem_type: int) -> str:
    try:
        return _ONNX_TO_TRITON[elem_type]
    except KeyError:
        raise OutputError(f"ONNX element type {elem_type} has no Triton data type") from None


@dataclass(frozen=True)
class IOSpec:
    """A model input/output as Triton sees it: name, Triton data type, full dims (-1 dynamic)."""

    name: str
    data_type: str
    dims: tuple[int, ...]

    @classmethod
    def from_onnx(cls, spec: TensorSpec) -> IOSpec:
        return cls(spec.name, triton_dtype(spec.elem_type), spec.triton_dims)


def _onnx_io(path: Path) -> tuple[list[IOSpec], list[IOSpec]]:
    inputs, outputs = graph_io(path)
    return [IOSpec.from_onnx(s) for s in inputs], [IOSpec.from_onnx(s) for s in outputs]


def _fill_io(cfg: Any, inputs: list[IOSpec], outputs: list[IOSpec], batching: bool) -> None:
    pb = _pb()
    for field, specs in (("input", inputs), ("output", outputs)):
        for spec in specs:
            entry = getattr(cfg, field).add()
            entry.name = spec.name
            entry.data_type = pb.DataType.Value(spec.data_type)
            dims = spec.dims[1:] if batching else spec.dims
            if batching and spec.dims[0] != -1:
                raise OutputError(
                    f"{cfg.name}: {spec.name} has a fixed first dim {spec.dims[0]}; a batching "
                    "model needs a dynamic batch dim"
                )
            entry.dims.extend(dims)


def _instance_group(cfg: Any, kind: str, count: int, profile: str | None = None) -> None:
    pb = _pb()
    group = cfg.instance_group.add()
    group.kind = pb.ModelInstanceGroup.Kind.Value(kind)
    group.count = count
    if profile is not None:
        group.profile.append(profile)


def onnx_model_config(
    name: str,
    onnx_path: Path,
    *,
    max_batch_size: int = 0,
    instances: int = 1,
    instance_kind: str = "KIND_GPU",
    max_queue_delay_us: int = 2000,
) -> Any:
    """``ModelConfig`` for an ONNX graph on the onnxruntime backend.

    ``max_batch_size > 0`` makes it a batching model (dims drop the dynamic first dim) with
    dynamic batching; ``0`` keeps the first dim explicit (the head's bag of tiles).
    """
    pb = _pb()
    cfg = pb.ModelConfig()
    cfg.name = name
    cfg.backend = "onnxruntime"
    cfg.platform = "onnxruntime_onnx"
    cfg.max_batch_size = int(max_batch_size)
    inputs, outputs = _onnx_io(onnx_path)
    _fill_io(cfg, inputs, outputs, batching=max_batch_size > 0)
    if max_batch_size > 0:
        cfg.dynamic_batching.max_queue_delay_microseconds = int(max_queue_delay_us)
    _instance_group(cfg, instance_kind, instances)
    return cfg


def _plan_specs(plan: Path, info: Any) -> tuple[list[IOSpec], list[IOSpec]]:
    def conv(entries: list[dict[str, Any]]) -> list[IOSpec]:
        out = []
        for e in entries:
            dtype = _TRT_TO_TRITON.get(str(e["dtype"]).upper())
            if dtype is None:
                raise CheckpointError(
                    f"{str(plan)!r}: tensor {e['name']} has TensorRT type {e['dtype']}, which "
                    "Triton cannot serve; rebuild the plan with `fastinsight export tensorrt`"
                )
            out.append(IOSpec(e["name"], dtype, tuple(int(d) for d in e["shape"])))
        return out

    try:
        return conv(info.inputs), conv(info.outputs)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(
            f"{str(plan)!r}: its sidecar's tensors are not what `fastinsight export tensorrt` "
            f"writes ({type(exc).__name__}: {exc}); rebuild the plan"
        ) from None


def read_plan(plan: str | os.PathLike[str]) -> tuple[list[IOSpec], list[IOSpec]]:
    """The I/O of a TensorRT plan, from the ``<plan>.json`` sidecar ``build_engine`` writes.

    A plan carries no documented header to recognise it by (only TensorRT can read it, on a GPU),
    so a plan is accepted only with its sidecar: a plan built elsewhere, or any other file, is
    refused (``CheckpointError``) rather than wired into a repository that will not load. The
    plan must be a non-empty regular file and, when the sidecar records one (builds since it
    does), match the sidecar's sha256.
    """
    from fastinsight.fileformat import file_sha256

    from .tensorrt import read_engine_info, sidecar_path

    path = Path(plan).expanduser()
    if not path.is_file():
        raise CheckpointError(
            f"TensorRT plan {str(path)!r} does not exist or is not a file; build it with "
            "`fastinsight export tensorrt`"
        )
    if path.stat().st_size == 0:
        raise CheckpointError(f"TensorRT plan {str(path)!r} is empty; rebuild it")
    try:
        info = read_engine_info(path)
    except InputError as exc:
        raise CheckpointError(str(exc)) from None
    if info is None:
        raise CheckpointError(
            f"{str(path)!r} has no sidecar {sidecar_path(path).name!r}: fastinsight accepts only "
            "plans built by `fastinsight export tensorrt`, which writes it (a plan has no "
            "header fastinsight can check without TensorRT); build the plan with that command, "
            "or leave out --plan"
        )
    if info.plan_sha256 is not None and file_sha256(path) != info.plan_sha256:
        raise CheckpointError(
            f"{str(path)!r} is not the plan its sidecar {sidecar_path(path).name!r} describes "
            "(another sha256): the plan was replaced or damaged; rebuild it"
        )
    return _plan_specs(path, info)


def plan_io(plan: Path, fallback_onnx: Path | None = None) -> tuple[list[IOSpec], list[IOSpec]]:
    """I/O of a TensorRT plan from its ``build_engine`` sidecar (:func:`read_plan`; a plan
    without one is refused: ``fallback_onnx`` is no longer used)."""
    return read_plan(plan)


def _expected_head_io(
    model: InsightModel, opts: HeadExportOptions
) -> tuple[list[IOSpec], list[IOSpec]]:
    """The head graph's I/O as Triton sees it, from the model's config (-1: dynamic)."""
    cfg = model.config
    io_type = "TYPE_FP16" if opts.precision == "fp16" else "TYPE_FP32"
    h, w = (-1, -1) if free_grid(model) else tuple(cfg.grid_size)
    k = cfg.num_classes
    inputs = [IOSpec("tokens", io_type, (-1, cfg.in_dim, h, w))]
    if opts.with_mask:
        inputs.append(IOSpec("mask", "TYPE_BOOL", (-1, h, w)))
    outputs = [
        IOSpec("raw_heatmap", io_type, (-1, k, h, w)),
        IOSpec("heatmap", io_type, (-1, k, h, w)),
        IOSpec("thresholds", "TYPE_FP32", (k,)),
        IOSpec("scores", "TYPE_FP32", (k,)),
    ]
    return inputs, outputs


def check_plan_fits(
    plan: str | os.PathLike[str],
    want_in: list[IOSpec],
    want_out: list[IOSpec],
    what: str = "the head",
) -> tuple[list[IOSpec], list[IOSpec]]:
    """The plan's tensors (names, Triton data types, dims with -1 as wildcard) must be the
    head's; returns the plan's I/O. ``CheckpointError`` naming the first difference."""
    p_in, p_out = read_plan(plan)

    def names(specs: list[IOSpec]) -> list[str]:
        return [s.name for s in specs]

    if names(p_in) != names(want_in) or sorted(names(p_out)) != sorted(names(want_out)):
        raise CheckpointError(
            f"the plan's tensors {names(p_in)} -> {names(p_out)} do not match {what}'s "
            f"{names(want_in)} -> {names(want_out)}; build the plan from this model's head "
            "export with the same --with-mask"
        )
    by_name = {s.name: s for s in [*p_in, *p_out]}
    for want in [*want_in, *want_out]:
        got = by_name[want.name]
        if got.data_type != want.data_type or not _dims_match(got.dims, want.dims):
            raise CheckpointError(
                f"the plan's {want.name!r} is {got.data_type} {list(got.dims)} but {what} "
                f"takes {want.data_type} {list(want.dims)}: the plan was built from another "
                "model or precision; rebuild it from this model's head export"
            )
    return p_in, p_out


def plan_model_config(
    name: str,
    inputs: list[IOSpec],
    outputs: list[IOSpec],
    *,
    instances: int = 1,
) -> Any:
    """``ModelConfig`` for a TensorRT plan: non-batching (the bag dim is explicit), one GPU
    instance group bound to the engine's optimization profile 0."""
    pb = _pb()
    cfg = pb.ModelConfig()
    cfg.name = name
    cfg.backend = "tensorrt"
    cfg.platform = "tensorrt_plan"
    cfg.max_batch_size = 0
    _fill_io(cfg, inputs, outputs, batching=False)
    _instance_group(cfg, "KIND_GPU", instances, profile="0")
    return cfg


def ensemble_config(
    name: str,
    steps: list[tuple[Any, dict[str, str], dict[str, str]]],
    inputs: list[IOSpec],
    outputs: list[IOSpec],
    max_batch_size: int = 0,
) -> Any:
    """``ModelConfig`` of an ensemble. ``steps``: (model config, input_map model->ensemble
    tensor, output_map model->ensemble tensor); inputs/outputs with full dims."""
    pb = _pb()
    cfg = pb.ModelConfig()
    cfg.name = name
    cfg.platform = "ensemble"
    cfg.max_batch_size = int(max_batch_size)
    _fill_io(cfg, inputs, outputs, batching=max_batch_size > 0)
    for model_cfg, input_map, output_map in steps:
        step = cfg.ensemble_scheduling.step.add()
        step.model_name = model_cfg.name
        step.model_version = -1
        step.input_map.update(input_map)
        step.output_map.update(output_map)
    return cfg


def config_text(cfg: Any) -> str:
    from google.protobuf import text_format

    return text_format.MessageToString(cfg)


def parse_config(path: str | os.PathLike[str]) -> Any:
    """Parse a ``config.pbtxt`` with the official schema (raises on any unknown field)."""
    from google.protobuf import text_format

    return text_format.Parse(Path(path).read_text(), _pb().ModelConfig())


def check_repo_output(
    out_dir: str | os.PathLike[str],
    overwrite: bool,
    inputs: Mapping[str, str | os.PathLike[str] | None] | None = None,
) -> Path:
    """Before any work: the folder a repository will be written to (symlinks followed: an
    ``--out`` that is a link is written through), its parent existing, not a file, empty
    unless ``overwrite``, not under /dev, /proc or /sys, and no input (the model, a plan,
    encoder weights) inside it, since the folder is replaced as a whole. Returns the resolved
    folder; ``OutputError`` (exit 6) otherwise."""
    shown = str(out_dir)
    real = resolve_output(out_dir)
    where = special_location(real)
    if where is not None:
        raise OutputError(
            f"--out {shown!r} leads to {str(real)!r}, {where}; choose a folder on a file system"
        )
    refuse_inputs_inside(out_dir, inputs or {})
    parent = real.parent
    if not parent.is_dir():
        raise OutputError(
            f"the folder {str(parent)!r} of --out {shown!r} does not exist; create it first"
        )
    if real.exists() and not real.is_dir():
        raise OutputError(f"--out {shown!r} exists and is not a folder; choose another --out")
    if real.is_dir() and any(real.iterdir()) and not overwrite:
        raise OutputError(
            f"--out {shown!r} already exists and is not empty; pass --overwrite to replace it"
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(
            f"cannot create folders in {str(parent)!r} for --out {shown!r}; choose another --out"
        )
    return real


@contextlib.contextmanager
def _atomic_dir(
    out_dir: Path,
    overwrite: bool,
    inputs: Mapping[str, str | os.PathLike[str] | None] | None = None,
) -> Iterator[Path]:
    """Yield an empty temp folder; on success it replaces ``out_dir`` (renames, no copying).

    ``out_dir`` is resolved first (:func:`check_repo_output`): a symlink stays a symlink and its
    target gets the new repository.
    """
    real = check_repo_output(out_dir, overwrite, inputs)
    parent = real.parent
    tmp = Path(tempfile.mkdtemp(prefix=f".{real.name}.", suffix=".part", dir=parent))
    # mkdtemp makes a 0700 folder; the repository gets a plain mkdir's mode (0777 minus the
    # umask) so that a server running as another user can read it.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    old: Path | None = None
    try:
        yield tmp
        if real.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{real.name}.", suffix=".old", dir=parent))
            os.replace(real, old / "repo")
        try:
            os.replace(tmp, real)
        except BaseException:
            if old is not None and (old / "repo").exists():  # put the previous one back
                os.replace(old / "repo", real)
            raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _slot(work: Path, name: str) -> Path:
    """``work/<name>/model.onnx``: exported under its final file name, so that the external
    weights of a >2 GB graph (``model.onnx.data``, referenced by name) stay valid when copied."""
    (work / name).mkdir()
    return work / name / "model.onnx"


def _write_model(root: Path, cfg: Any, files: dict[str, Path | None]) -> None:
    """``root/<name>/config.pbtxt`` and ``root/<name>/1/<file>`` for each file (None = none)."""
    model_dir = root / cfg.name
    version = model_dir / "1"
    version.mkdir(parents=True)
    for filename, src in files.items():
        if src is not None:
            shutil.copyfile(src, version / filename)
            data = Path(f"{src}.data")
            if data.is_file():  # external weights of a >2 GB graph travel with it
                shutil.copyfile(data, version / f"{filename}.data")
    (model_dir / "config.pbtxt").write_text(config_text(cfg))


@dataclass(frozen=True)
class TritonRepoResult:
    """What was written: the repository folder and the models in it."""

    path: Path
    models: tuple[str, ...]


def write_triton_repo(
    out_dir: str | os.PathLike[str],
    model: InsightModel,
    encoder: Any = None,
    plan: str | os.PathLike[str] | None = None,
    max_batch_size: int = 64,
    instances: int = 1,
    *,
    instance_kind: str = "gpu",
    head_options: HeadExportOptions | None = None,
    encoder_precision: str = "fp32",
    chunked: bool = True,
    ensemble_head: str = "auto",
    verify: bool = True,
    overwrite: bool = False,
    max_queue_delay_us: int = 2000,
    inputs: Mapping[str, str | os.PathLike[str] | None] | None = None,
    encoder_normalisation: tuple[Sequence[float], Sequence[float]] | None = None,
    model_encoder: str | None = None,
    allow_encoder_mismatch: bool = False,
) -> TritonRepoResult:
    """Export the head (and the encoder) and write a Triton model repository to ``out_dir``.

    - ``plan``: a TensorRT engine of the head built by ``build_engine``, copied in as
      ``insight_head_trt``; its I/O come from the ``<plan>.json`` sidecar, which must be there
      and agree with the head (:func:`read_plan`, :func:`check_plan_fits`). GPU only: refused
      with ``instance_kind="cpu"``.
    - ``max_batch_size``: the encoder's (and chunked models') maximum batch, i.e. the most tiles
      one ``insight_pipeline`` request may carry.
    - ``instances``/``instance_kind``: instance group of every model (``gpu``, ``cpu``, ``auto``;
      the TensorRT model is always on GPU).
    - ``ensemble_head``: which head ``insight_pipeline`` calls: ``onnx``, ``trt`` or ``auto``
      (the plan when given).
    - ``verify``: check every exported graph against PyTorch with onnxruntime first.
    - ``inputs``: the files the caller read (flag -> path: the model, encoder weights); like the
      plan, none may lie inside ``out_dir``, which is replaced as a whole.
    - ``encoder_normalisation``: the (mean, std) the model's encoder was trained with, where the
      model file records it (a CT recipe); the encoder must use the same (:func:`check_encoder_fits`).
    - ``model_encoder``: the encoder the model file records (:func:`recorded_encoder`); the
      encoder must be that one, by name (:func:`check_encoder_identity`), unless
      ``allow_encoder_mismatch``. None: not compared (an official ``.pth`` records none), the
      token geometry alone is checked.

    Everything is checked before any graph is exported: option values (``ExportOptionError``, a
    ConfigError), the output folder (``OutputError``), the plan (``CheckpointError``), the
    encoder against the model (``ConfigError``: its name, then its tokens). A graph that
    disagrees with PyTorch is a ``ParityError``; nothing is left behind on any failure, and an
    existing repository is kept.
    """
    from .encoder import ENCODER_INPUT, ENCODER_OUTPUT, export_encoder_onnx
    from .head import export_head_onnx
    from .verify import verify_encoder_onnx, verify_head_onnx

    _pb()
    check_triton_options(max_batch_size, instances, instance_kind, ensemble_head, plan)
    plan_path = Path(plan).expanduser() if plan is not None else None
    opts = head_options or HeadExportOptions()
    if opts.head_only or opts.postprocess_only:
        raise ExportOptionError(
            "the repository's head is the full graph; pass default head options"
        )
    read = dict(inputs or {})
    if plan_path is not None:
        from .tensorrt import sidecar_path

        read |= {"--plan": plan_path, "--plan's sidecar": sidecar_path(plan_path)}
    check_repo_output(out_dir, overwrite, read)
    if plan_path is not None:
        check_plan_fits(plan_path, *_expected_head_io(model, opts), what="this model's head")
    if encoder is not None:
        if model_encoder is not None:
            check_encoder_identity(
                model_encoder,
                getattr(encoder, "name", type(encoder).__name__),
                allow_mismatch=allow_encoder_mismatch,
            )
        check_encoder_fits(model, encoder, encoder_normalisation)
    kind = INSTANCE_KINDS[instance_kind]
    target = Path(out_dir).expanduser().absolute()
    tile_context = model.config.context == "tile"
    # Before any folder exists: a NaN weight would be caught inside the export too, but only
    # after the temporary repository was made (and removed).
    check_finite_weights(model, "INSIGHT model")
    if encoder is not None:
        check_finite_weights(encoder, f"encoder {getattr(encoder, 'name', '?')!r}")

    with (
        tempfile.TemporaryDirectory(prefix="fastinsight-triton-") as work_name,
        _atomic_dir(target, overwrite, read) as root,
    ):
        work = Path(work_name)
        written: list[Any] = []
        head_onnx = export_head_onnx(model, _slot(work, HEAD), opts)
        if verify:
            verify_head_onnx(head_onnx, model, options=opts, shown=f"{target}/{HEAD}")
        head_cfg = onnx_model_config(HEAD, head_onnx, instances=instances, instance_kind=kind)
        _write_model(root, head_cfg, {"model.onnx": head_onnx})
        written.append(head_cfg)

        trt_cfg = None
        if plan_path is not None:
            h_in, h_out = _onnx_io(head_onnx)
            p_in, p_out = check_plan_fits(plan_path, h_in, h_out, what=f"{HEAD}'s graph")
            trt_cfg = plan_model_config(HEAD_TRT, p_in, p_out, instances=instances)
            _write_model(root, trt_cfg, {"model.plan": plan_path})
            written.append(trt_cfg)

        if encoder is not None:
            enc_onnx = export_encoder_onnx(encoder, _slot(work, ENCODER), encoder_precision)
            if verify:
                verify_encoder_onnx(enc_onnx, encoder, shown=f"{target}/{ENCODER}")
            enc_cfg = onnx_model_config(
                ENCODER,
                enc_onnx,
                max_batch_size=max_batch_size,
                instances=instances,
                instance_kind=kind,
                max_queue_delay_us=max_queue_delay_us,
            )
            _write_model(root, enc_cfg, {"model.onnx": enc_onnx})
            written.append(enc_cfg)
            enc_in, enc_out = _onnx_io(enc_onnx)

            # A slide-context head takes one stitched slide grid, which the client builds from
            # the encoder's per-tile grids: there is no tiles -> head ensemble for it.
            if tile_context:
                use_trt = trt_cfg is not None and ensemble_head in ("auto", "trt")
                step_head = trt_cfg if use_trt else head_cfg
                h_in, h_out = read_plan(plan_path) if use_trt and plan_path else _onnx_io(head_onnx)
                written.append(
                    _write_pipeline(root, enc_cfg, enc_in, enc_out, step_head, h_in, h_out)
                )
            if chunked and tile_context:
                raw_opts = replace(opts, head_only=True, with_mask=False)
                raw_onnx = export_head_onnx(model, _slot(work, HEAD_RAW), raw_opts)
                post_opts = replace(opts, postprocess_only=True)
                post_onnx = export_head_onnx(model, _slot(work, POSTPROCESS), post_opts)
                if verify:
                    for graph, graph_opts, name in (
                        (raw_onnx, raw_opts, HEAD_RAW),
                        (post_onnx, post_opts, POSTPROCESS),
                    ):
                        verify_head_onnx(
                            graph, model, (1, 7), options=graph_opts, shown=f"{target}/{name}"
                        )
                raw_cfg = onnx_model_config(
                    HEAD_RAW,
                    raw_onnx,
                    max_batch_size=max_batch_size,
                    instances=instances,
                    instance_kind=kind,
                    max_queue_delay_us=max_queue_delay_us,
                )
                post_cfg = onnx_model_config(
                    POSTPROCESS, post_onnx, instances=instances, instance_kind=kind
                )
                _write_model(root, raw_cfg, {"model.onnx": raw_onnx})
                _write_model(root, post_cfg, {"model.onnx": post_onnx})
                r_in, r_out = _onnx_io(raw_onnx)
                _check_pairing(enc_out[0], r_in[0])
                tiles_cfg = ensemble_config(
                    TILES,
                    [
                        (enc_cfg, {ENCODER_INPUT: ENCODER_INPUT}, {ENCODER_OUTPUT: ENCODER_OUTPUT}),
                        (raw_cfg, {"tokens": ENCODER_OUTPUT}, {"raw_heatmap": "raw_heatmap"}),
                    ],
                    [enc_in[0]],
                    r_out,
                    max_batch_size=max_batch_size,
                )
                _write_ensemble(root, tiles_cfg)
                written += [raw_cfg, post_cfg, tiles_cfg]
        problems = check_repo(root)
        if problems:
            raise OutputError("the Triton repository failed its own checks: " + "; ".join(problems))
    return TritonRepoResult(target, tuple(c.name for c in written))


def radiograph_model_name(model: Any) -> str:
    """Repository name of a radiograph model: ``radiograph_pylon`` / ``radiograph_multires``."""
    return f"radiograph_{model.family}"


def write_radiograph_triton_repo(
    out_dir: str | os.PathLike[str],
    model: Any,
    max_batch_size: int = 64,
    instances: int = 1,
    *,
    instance_kind: str = "gpu",
    verify: bool = True,
    overwrite: bool = False,
    max_queue_delay_us: int = 2000,
    inputs: Mapping[str, str | os.PathLike[str] | None] | None = None,
) -> TritonRepoResult:
    """A repository with one radiograph model (PYLON or the multi-resolution network)::

        repo/radiograph_<family>/1/model.onnx     onnxruntime  image [B, 1, S, S] FP32 ->
        repo/radiograph_<family>/config.pbtxt                  logits [B, K, S/s, S/s], scores [B, K]

    The graph is :func:`fastinsight.export.radiograph.export_radiograph_onnx` (the client applies
    the eval transform: cubic resize to S, ``(u8 / 255 - mean) / std``, values in the ONNX
    metadata). Images are independent, so unlike the INSIGHT head (whose first dim is a bag of
    tiles) this is a batching model: ``max_batch_size`` images per request, dynamic batching, dims
    without the batch (Triton's full shape of ``image`` is ``[-1, 1, S, S]``).
    ``verify`` runs the graph in onnxruntime against PyTorch first (within the tolerance of
    :func:`fastinsight.export.radiograph.check_radiograph_onnx`; ``ParityError`` otherwise).
    Atomic like :func:`write_triton_repo`; ``inputs`` (flag -> path, the model file) may not lie
    inside ``out_dir``.
    """
    from .radiograph import check_radiograph_onnx, export_radiograph_onnx

    _pb()
    if getattr(model, "modality", None) != "radiograph":
        raise InputError(f"{type(model).__name__} is not a radiograph model (PYLON or multires)")
    _check_serving(max_batch_size, instances, instance_kind)
    read = dict(inputs or {})
    check_repo_output(out_dir, overwrite, read)
    name = radiograph_model_name(model)
    target = Path(out_dir).expanduser().absolute()
    check_finite_weights(model, f"{model.family} model")
    with (
        tempfile.TemporaryDirectory(prefix="fastinsight-triton-") as work_name,
        _atomic_dir(target, overwrite, read) as root,
    ):
        graph = export_radiograph_onnx(model, _slot(Path(work_name), name))
        if verify:
            check_radiograph_onnx(model, graph, shown=f"{target}/{name}")
        cfg = onnx_model_config(
            name,
            graph,
            max_batch_size=max_batch_size,
            instances=instances,
            instance_kind=INSTANCE_KINDS[instance_kind],
            max_queue_delay_us=max_queue_delay_us,
        )
        _write_model(root, cfg, {"model.onnx": graph})
        problems = check_repo(root)
        if problems:
            raise OutputError("the Triton repository failed its own checks: " + "; ".join(problems))
    return TritonRepoResult(target, (name,))


def _write_ensemble(root: Path, cfg: Any) -> None:
    # An ensemble has no model file, but Triton wants its version folder.
    (root / cfg.name / "1").mkdir(parents=True)
    (root / cfg.name / "config.pbtxt").write_text(config_text(cfg))


def _write_pipeline(
    root: Path,
    enc_cfg: Any,
    enc_in: list[IOSpec],
    enc_out: list[IOSpec],
    head_cfg: Any,
    h_in: list[IOSpec],
    h_out: list[IOSpec],
) -> Any:
    """``insight_pipeline``: tiles -> encoder -> head (the encoder's batch becomes the bag)."""
    from .encoder import ENCODER_INPUT, ENCODER_OUTPUT

    _check_pairing(enc_out[0], h_in[0])
    masks = [s for s in h_in if s.name == "mask"]
    head_map = {"tokens": ENCODER_OUTPUT} | ({"mask": "mask"} if masks else {})
    cfg = ensemble_config(
        PIPELINE,
        [
            (enc_cfg, {ENCODER_INPUT: ENCODER_INPUT}, {ENCODER_OUTPUT: ENCODER_OUTPUT}),
            (head_cfg, head_map, {s.name: s.name for s in h_out}),
        ],
        [enc_in[0], *masks],
        h_out,
    )
    _write_ensemble(root, cfg)
    return cfg


def _check_pairing(producer: IOSpec, consumer: IOSpec) -> None:
    """The encoder's batched output must feed the head's bag input (dtype and C, h, w)."""
    if producer.data_type != consumer.data_type:
        raise InputError(
            f"the encoder outputs {producer.data_type} tokens but the head takes "
            f"{consumer.data_type}; export both with the same precision (--precision)"
        )
    if not _dims_match(producer.dims[1:], consumer.dims[1:]):
        raise InputError(
            f"the encoder's token grid {list(producer.dims[1:])} does not fit the head's input "
            f"{list(consumer.dims[1:])}; use the encoder the model was trained with"
        )


def check_encoder_fits(
    model: InsightModel,
    encoder: Any,
    normalisation: tuple[Sequence[float], Sequence[float]] | None = None,
) -> None:
    """The encoder must make the tokens the model was trained on: ``ConfigError`` (one line
    naming both values) otherwise, before anything is exported.

    Compared with the model's config: the token channels (``in_dim``), the tile size and, for
    token grids (not the 1 x 1 vectors of a CLAM/TRIDENT model), the patch size and the grid;
    and the normalisation (mean, std) where the model file records it (``normalisation``: a CT
    recipe). The graphs alone cannot tell: a channel-norm head takes any grid, so a 224 px
    encoder would feed a model trained on 96 px tiles without an error, and serve nonsense.
    """
    cfg = model.config
    name = getattr(encoder, "name", type(encoder).__name__)

    def refuse(what: str, got: object, want: object, fix: str) -> None:
        raise ConfigError(
            f"encoder {name!r} {what} {got} but the model ({cfg.encoder!r}) was trained on "
            f"{want}; {fix}"
        )

    fix_tile = (
        f"export the encoder the model was trained with, at its tile size (--tile-size "
        f"{cfg.tile_size_px})"
    )
    dim = getattr(encoder, "embed_dim", None)
    if dim is not None and int(dim) != cfg.in_dim:
        refuse("gives", f"{dim} channels", f"{cfg.in_dim}", fix_tile)
    tile = getattr(encoder, "tile_size_px", None)
    if tile is not None and int(tile) != cfg.tile_size_px:
        refuse("takes tiles of", f"{tile} px", f"{cfg.tile_size_px} px tiles", fix_tile)
    if tuple(cfg.grid_size) != (1, 1):
        patch = getattr(encoder, "patch_size_px", None)
        if patch is not None and int(patch) != cfg.patch_size_px:
            refuse("has patches of", f"{patch} px", f"{cfg.patch_size_px} px patches", fix_tile)
        grid = getattr(encoder, "grid_size", None)
        if grid is not None and tuple(grid) != tuple(cfg.grid_size):
            refuse("gives token grids of", f"{tuple(grid)}", f"{tuple(cfg.grid_size)}", fix_tile)
    if normalisation is not None:
        for what, recorded in zip(("mean", "std"), normalisation, strict=True):
            got = getattr(encoder, what, None)
            if got is None:
                continue
            same = len(tuple(got)) == len(tuple(recorded)) and all(
                abs(float(a) - float(b)) <= 1e-6 for a, b in zip(got, recorded, strict=True)
            )
            if not same:
                refuse(
                    f"normalises with {what}",
                    list(got),
                    f"{what} {list(recorded)} (recorded in the model file)",
                    "export the encoder the model file names, with its recorded options",
                )


def _dims_match(a: tuple[int, ...] | list[int], b: tuple[int, ...] | list[int]) -> bool:
    """Triton's CompareDimsWithWildcard: same rank, and equal wherever neither is -1."""
    return len(a) == len(b) and all(x == y or x == -1 or y == -1 for x, y in zip(a, b, strict=True))


# -- checking a repository ------------------------------------------------------------------------
def _full(dims: Any, batching: bool) -> list[int]:
    return ([-1] if batching else []) + [int(d) for d in dims]


def check_repo(repo: str | os.PathLike[str]) -> list[str]:
    """Parse every ``config.pbtxt`` and check it; returns the problems found (empty = fine).

    For ONNX models: names, Triton data types and dims against the graph (the batch dim dropped
    for batching models). For plans: against the ``<plan>.json`` sidecar when there is one. For
    ensembles: every step maps existing inputs/outputs, and every ensemble tensor has one data
    type and consistent shapes, by the rule Triton's ensemble validator applies (dims equal with
    -1 as wildcard, directly or after prefixing the batch dim of batching models).
    """
    root = Path(repo)
    problems: list[str] = []
    configs: dict[str, Any] = {}
    for cfg_path in sorted(root.glob("*/config.pbtxt")):
        try:
            cfg = parse_config(cfg_path)
        except Exception as exc:
            problems.append(f"{cfg_path}: does not parse as ModelConfig ({exc})")
            continue
        if cfg.name != cfg_path.parent.name:
            problems.append(f"{cfg_path}: name {cfg.name!r} differs from its folder")
        configs[cfg.name] = cfg
    pb = _pb()
    for name, cfg in configs.items():
        if cfg.platform == "ensemble":
            continue
        version = root / name / "1"
        batching = cfg.max_batch_size > 0
        if cfg.platform == "onnxruntime_onnx":
            graph = version / "model.onnx"
            if not graph.is_file():
                problems.append(f"{name}: missing {graph}")
                continue
            want_in, want_out = _onnx_io(graph)
        elif cfg.platform == "tensorrt_plan":
            plan = version / "model.plan"
            if not plan.is_file():
                problems.append(f"{name}: missing {plan}")
                continue
            want_in = [
                IOSpec(i.name, pb.DataType.Name(i.data_type), tuple(_full(i.dims, False)))
                for i in cfg.input
            ]
            want_out = [
                IOSpec(o.name, pb.DataType.Name(o.data_type), tuple(_full(o.dims, False)))
                for o in cfg.output
            ]
        else:
            problems.append(f"{name}: unexpected platform {cfg.platform!r}")
            continue
        for field, wants in (("input", want_in), ("output", want_out)):
            got = {t.name: t for t in getattr(cfg, field)}
            if sorted(got) != sorted(w.name for w in wants):
                problems.append(
                    f"{name}: {field}s {sorted(got)} != graph {[w.name for w in wants]}"
                )
                continue
            for w in wants:
                t = got[w.name]
                if pb.DataType.Name(t.data_type) != w.data_type:
                    problems.append(
                        f"{name}.{w.name}: {pb.DataType.Name(t.data_type)} != graph {w.data_type}"
                    )
                if _full(t.dims, batching) != list(w.dims):
                    problems.append(
                        f"{name}.{w.name}: dims {_full(t.dims, batching)} != graph {list(w.dims)}"
                    )
    for cfg in configs.values():
        if cfg.platform == "ensemble":
            problems += _check_ensemble(cfg, configs)
    return problems


def _check_ensemble(ens: Any, configs: dict[str, Any]) -> list[str]:
    pb = _pb()
    problems: list[str] = []
    ens_batching = ens.max_batch_size > 0
    tensors: dict[str, tuple[str, list[int], list[int], str]] = {}

    def add(key: str, dtype: str, dims: list[int], batching: bool, origin: str) -> None:
        full = _full(dims, batching)
        if key not in tensors:
            tensors[key] = (dtype, dims, full, origin)
            return
        dtype0, dims0, full0, origin0 = tensors[key]
        if dtype0 != dtype:
            problems.append(
                f"{ens.name}: tensor {key} is {dtype0} from {origin0} but {dtype} from {origin}"
            )
        if not (_dims_match(dims0, dims) or _dims_match(full0, full)):
            problems.append(
                f"{ens.name}: tensor {key} has shape {full0} from {origin0} but {full} from {origin}"
            )

    for t in ens.input:
        add(t.name, pb.DataType.Name(t.data_type), list(t.dims), ens_batching, ens.name)
    for t in ens.output:
        add(t.name, pb.DataType.Name(t.data_type), list(t.dims), ens_batching, ens.name)
    produced = {t.name for t in ens.input}
    for step in ens.ensemble_scheduling.step:
        model = configs.get(step.model_name)
        if model is None:
            problems.append(f"{ens.name}: step model {step.model_name!r} is not in the repository")
            continue
        batching = model.max_batch_size > 0
        if batching and model.max_batch_size < ens.max_batch_size:
            problems.append(
                f"{ens.name}: max_batch_size {ens.max_batch_size} > {model.name}'s {model.max_batch_size}"
            )
        if ens_batching and not batching:
            problems.append(f"{ens.name}: batching ensemble calls non-batching {model.name}")
        inputs = {t.name: t for t in model.input}
        outputs = {t.name: t for t in model.output}
        for model_in, ens_tensor in step.input_map.items():
            if model_in not in inputs:
                problems.append(f"{ens.name}: {model.name} has no input {model_in!r}")
                continue
            if ens_tensor not in produced:
                problems.append(f"{ens.name}: {ens_tensor!r} is used before it is produced")
            t = inputs[model_in]
            add(ens_tensor, pb.DataType.Name(t.data_type), list(t.dims), batching, model.name)
        for t in model.input:
            if t.name not in step.input_map and not t.optional:
                problems.append(f"{ens.name}: input {t.name} of {model.name} is not mapped")
        for model_out, ens_tensor in step.output_map.items():
            if model_out not in outputs:
                problems.append(f"{ens.name}: {model.name} has no output {model_out!r}")
                continue
            t = outputs[model_out]
            add(ens_tensor, pb.DataType.Name(t.data_type), list(t.dims), batching, model.name)
            produced.add(ens_tensor)
    for t in ens.output:
        if t.name not in produced:
            problems.append(f"{ens.name}: output {t.name} is never produced")
    return problems
