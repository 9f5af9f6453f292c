"""The Triton Inference Server repository: every config parses with the official schema and agrees
with the exported graphs; ensembles line up; a failed write leaves nothing behind."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
mc = pytest.importorskip("tritonclient.grpc.model_config_pb2")
encoders = pytest.importorskip("fastinsight.encoders")
if not hasattr(encoders, "build_encoder"):
    pytest.skip("fastinsight.encoders.build_encoder is not available", allow_module_level=True)

from google.protobuf import text_format  # noqa: E402

from fastinsight.errors import InputError, OutputError  # noqa: E402
from fastinsight.export import triton as triton_repo  # noqa: E402
from fastinsight.export._onnx_io import graph_io  # noqa: E402
from fastinsight.export.encoder import load_encoder  # noqa: E402
from fastinsight.export.tensorrt import EngineInfo, ProfileShapes, sidecar_path  # noqa: E402
from tests.support.export_helpers import make_model  # noqa: E402

ONNX_TO_TRITON = {
    "FLOAT": "TYPE_FP32",
    "FLOAT16": "TYPE_FP16",
    "UINT8": "TYPE_UINT8",
    "BOOL": "TYPE_BOOL",
}
K = 2
MAX_BATCH = 16


def _fake_plan(folder: Path) -> Path:
    """A stand-in plan with the sidecar build_engine writes (no TensorRT here)."""
    plan = folder / "head.plan"
    plan.write_bytes(b"\0fake TensorRT plan")
    info = EngineInfo(
        plan=str(plan),
        onnx="head_trt.onnx",
        tensorrt_version="10.x",
        device="test",
        profile=[ProfileShapes("tokens", (1, 64, 14, 14), (512, 64, 14, 14), (8192, 64, 14, 14))],
        inputs=[{"name": "tokens", "dtype": "FLOAT", "shape": [-1, 64, 14, 14]}],
        outputs=[
            {"name": "raw_heatmap", "dtype": "FLOAT", "shape": [-1, K, 14, 14]},
            {"name": "heatmap", "dtype": "FLOAT", "shape": [-1, K, 14, 14]},
            {"name": "thresholds", "dtype": "FLOAT", "shape": [K]},
            {"name": "scores", "dtype": "FLOAT", "shape": [K]},
        ],
    )
    sidecar_path(plan).write_text(info.to_json())
    return plan


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("triton")
    model = make_model(in_dim=64, num_classes=K)  # vit-tiny's tokens are 64 x 14 x 14
    result = triton_repo.write_triton_repo(
        work / "repo",
        model,
        load_encoder("vit-tiny"),
        plan=_fake_plan(work),
        max_batch_size=MAX_BATCH,
        instances=2,
    )
    assert result.models == (
        "insight_head",
        "insight_head_trt",
        "encoder",
        "insight_pipeline",
        "insight_head_raw",
        "insight_postprocess",
        "insight_tiles",
    )
    return result.path


def _parse(path: Path) -> mc.ModelConfig:
    return text_format.Parse(path.read_text(), mc.ModelConfig())


def _io(cfg: mc.ModelConfig, field: str) -> list[tuple[str, str, list[int]]]:
    return [(t.name, mc.DataType.Name(t.data_type), list(t.dims)) for t in getattr(cfg, field)]


def _graph(path: Path, batching: bool) -> tuple[list[tuple[str, str, list[int]]], ...]:
    def conv(specs: list) -> list[tuple[str, str, list[int]]]:
        out = []
        for s in specs:
            dims = list(s.triton_dims)
            out.append((s.name, ONNX_TO_TRITON[s.type_name], dims[1:] if batching else dims))
        return out

    inputs, outputs = graph_io(path)
    return conv(inputs), conv(outputs)


def test_every_config_parses_and_matches_its_graph(repo: Path) -> None:
    configs = sorted(repo.glob("*/config.pbtxt"))
    assert len(configs) == 7
    for path in configs:
        cfg = _parse(path)
        assert cfg.name == path.parent.name
        assert (path.parent / "1").is_dir()
        graph = path.parent / "1" / "model.onnx"
        if cfg.platform == "onnxruntime_onnx":
            assert cfg.backend == "onnxruntime"
            want_in, want_out = _graph(graph, batching=cfg.max_batch_size > 0)
            assert _io(cfg, "input") == want_in, cfg.name
            assert _io(cfg, "output") == want_out, cfg.name
            assert [g.count for g in cfg.instance_group] == [2]


def test_the_head_keeps_its_bag_dimension(repo: Path) -> None:
    head = _parse(repo / "insight_head" / "config.pbtxt")
    assert head.max_batch_size == 0
    assert _io(head, "input") == [("tokens", "TYPE_FP32", [-1, 64, 14, 14])]
    assert _io(head, "output") == [
        ("raw_heatmap", "TYPE_FP32", [-1, K, 14, 14]),
        ("heatmap", "TYPE_FP32", [-1, K, 14, 14]),
        ("thresholds", "TYPE_FP32", [K]),
        ("scores", "TYPE_FP32", [K]),
    ]
    assert not head.HasField("dynamic_batching")


def test_encoder_batches_dynamically(repo: Path) -> None:
    enc = _parse(repo / "encoder" / "config.pbtxt")
    assert enc.max_batch_size == MAX_BATCH
    assert enc.HasField("dynamic_batching")
    assert _io(enc, "input") == [("tiles", "TYPE_UINT8", [224, 224, 3])]
    assert _io(enc, "output") == [("tokens", "TYPE_FP32", [64, 14, 14])]


def test_plan_config_binds_the_optimization_profile(repo: Path) -> None:
    trt = _parse(repo / "insight_head_trt" / "config.pbtxt")
    assert trt.platform == "tensorrt_plan" and trt.backend == "tensorrt"
    assert (repo / "insight_head_trt" / "1" / "model.plan").read_bytes().startswith(b"\0fake")
    assert trt.max_batch_size == 0
    assert [(g.kind, list(g.profile)) for g in trt.instance_group] == [
        (mc.ModelInstanceGroup.KIND_GPU, ["0"])
    ]
    head = _parse(repo / "insight_head" / "config.pbtxt")
    assert _io(trt, "input") == _io(head, "input")
    assert sorted(_io(trt, "output")) == sorted(_io(head, "output"))


def test_pipeline_ensemble_maps_the_encoder_batch_onto_the_bag(repo: Path) -> None:
    ens = _parse(repo / "insight_pipeline" / "config.pbtxt")
    assert ens.platform == "ensemble" and ens.max_batch_size == 0
    assert _io(ens, "input") == [("tiles", "TYPE_UINT8", [-1, 224, 224, 3])]
    steps = ens.ensemble_scheduling.step
    assert [s.model_name for s in steps] == ["encoder", "insight_head_trt"]
    assert dict(steps[0].input_map) == {"tiles": "tiles"}
    assert dict(steps[0].output_map) == {"tokens": "tokens"}
    assert dict(steps[1].input_map) == {"tokens": "tokens"}
    assert set(steps[1].output_map.values()) == {t.name for t in ens.output}
    # Triton accepts the batching encoder's [C, h, w] for the non-batching head's [-1, C, h, w]
    # because the full shapes agree.
    enc = _parse(repo / "encoder" / "config.pbtxt")
    head = _parse(repo / "insight_head_trt" / "config.pbtxt")
    assert [-1, *enc.output[0].dims] == list(head.input[0].dims)


def test_chunked_path_for_large_slides(repo: Path) -> None:
    tiles = _parse(repo / "insight_tiles" / "config.pbtxt")
    raw = _parse(repo / "insight_head_raw" / "config.pbtxt")
    post = _parse(repo / "insight_postprocess" / "config.pbtxt")
    assert tiles.max_batch_size == raw.max_batch_size == MAX_BATCH
    assert _io(tiles, "output") == [("raw_heatmap", "TYPE_FP32", [K, 14, 14])]
    assert _io(post, "input") == [("raw_heatmap", "TYPE_FP32", [-1, K, 14, 14])]
    assert post.max_batch_size == 0


def test_check_repo_finds_nothing_and_catches_a_broken_mapping(repo: Path, tmp_path: Path) -> None:
    assert triton_repo.check_repo(repo) == []
    broken = tmp_path / "broken"
    shutil.copytree(repo, broken)
    cfg_path = broken / "insight_pipeline" / "config.pbtxt"
    cfg = _parse(cfg_path)
    cfg.ensemble_scheduling.step[1].input_map["tokens"] = "tiles"
    cfg.output[0].data_type = mc.TYPE_FP16
    cfg_path.write_text(text_format.MessageToString(cfg))
    problems = triton_repo.check_repo(broken)
    assert any("tensor tiles" in p for p in problems), problems
    assert any("TYPE_FP16" in p for p in problems), problems


def test_existing_output_needs_overwrite(repo: Path, tmp_path: Path) -> None:
    target = tmp_path / "taken"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(OutputError, match="--overwrite"):
        triton_repo.write_triton_repo(target, make_model(in_dim=64, num_classes=K))
    assert (target / "keep.txt").read_text() == "mine"


def test_a_failed_write_leaves_no_half_repository(
    repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fastinsight.export.encoder as enc_mod
    import fastinsight.export.head as head_mod

    def fake_head(model: object, out: Path, options: object = None) -> Path:
        shutil.copyfile(repo / "insight_head" / "1" / "model.onnx", out)
        return Path(out)

    def broken_encoder(*args: object, **kwargs: object) -> Path:
        raise OutputError("encoder export failed (simulated)")

    monkeypatch.setattr(head_mod, "export_head_onnx", fake_head)
    monkeypatch.setattr(enc_mod, "export_encoder_onnx", broken_encoder)
    target = tmp_path / "repo"
    with pytest.raises(OutputError, match="simulated"):
        triton_repo.write_triton_repo(
            target, make_model(in_dim=64, num_classes=K), object(), verify=False
        )
    assert list(tmp_path.iterdir()) == [], "a failed export left files behind"


def test_mismatched_encoder_and_head_are_refused() -> None:
    tokens = triton_repo.IOSpec("tokens", "TYPE_FP32", (-1, 128, 14, 14))
    head_in = triton_repo.IOSpec("tokens", "TYPE_FP32", (-1, 64, 14, 14))
    with pytest.raises(InputError, match="token grid"):
        triton_repo._check_pairing(tokens, head_in)
    with pytest.raises(InputError, match="precision"):
        triton_repo._check_pairing(
            triton_repo.IOSpec("tokens", "TYPE_FP16", (-1, 64, 14, 14)), head_in
        )


def test_overwrite_replaces_the_old_repository(
    repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fastinsight.export.head as head_mod

    def fake_head(model: object, out: Path, options: object = None) -> Path:
        shutil.copyfile(repo / "insight_head" / "1" / "model.onnx", out)
        return Path(out)

    monkeypatch.setattr(head_mod, "export_head_onnx", fake_head)
    target = tmp_path / "repo"
    target.mkdir()
    (target / "stale.txt").write_text("old")
    result = triton_repo.write_triton_repo(
        target, make_model(in_dim=64, num_classes=K), verify=False, overwrite=True
    )
    assert result.models == ("insight_head",)
    assert sorted(p.name for p in target.iterdir()) == ["insight_head"]
    assert [p.name for p in tmp_path.iterdir()] == ["repo"]
