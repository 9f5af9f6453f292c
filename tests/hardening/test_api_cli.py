"""The Python API and CLI defects of the API audit: each test fails without its fix.

- outputs through /dev, /proc or a standard stream are refused (the atomic rename would replace
  the file behind ``/proc/self/fd/1``, e.g. the shell's ``> log.txt``);
- ``demo --modality ct|radiograph`` takes explicit counts as given, and refuses ``--size``;
- ``train-volume``'s defaults fit together, and a tile/patch mismatch is a ConfigError before work;
- ``predict_slide`` / ``encode_slide`` / ``predict_volume`` / ``predict_radiographs`` give the
  caller's model and encoder back as they came (training mode, device), also on an error;
- devices are checked (ConfigError / BackendError) in the loaders, never a raw torch error;
- options objects check every field when made, as ConfigError naming it;
- ``predict_volume`` refuses NaN/inf voxels of a Volume built in Python;
- ``fastinsight ... | head -1`` stops quietly;
- the README's feature-file commands work as written on official INSIGHT h5 files.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fastinsight.atomic import atomic_path, check_writable
from fastinsight.errors import BackendError, ConfigError, InputError, OutputError
from fastinsight.inputs import resolve_device
from fastinsight.models.config import InsightConfig
from fastinsight.models.insight import InsightModel
from tests.hardening.conftest import assert_one_error_line, run_cli, run_main

REPO = Path(__file__).resolve().parents[2]
_ENTRY = "import sys; from fastinsight.cli import main; sys.exit(main())"


# -- 2. no output through /dev, /proc or a standard stream --------------------------------------
def test_report_to_dev_stdout_redirected_to_a_file_is_refused(
    tmp_path: Path, tiny_model: Path, tiny_features: Path
) -> None:
    """``fastinsight predict ... --report /dev/stdout > log.txt`` replaced log.txt (exit 0)."""
    log = tmp_path / "log.txt"
    log.write_text("earlier lines of the log\n")
    inode = log.stat().st_ino
    with open(log, "a") as fh:  # the shell's `>>`: fd 1 is this regular file
        proc = subprocess.run(
            [sys.executable, "-c", _ENTRY, "predict", "--features", str(tiny_features),
             "-m", str(tiny_model), "--report", "/dev/stdout", "-q"],
            stdout=fh, stderr=subprocess.PIPE, text=True, timeout=300,
        )  # fmt: skip
    line = assert_one_error_line(proc, OutputError.exit_code)
    assert "/dev/stdout" in line and "standard stream" in line
    assert log.stat().st_ino == inode  # not renamed over
    assert log.read_text() == "earlier lines of the log\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.txt"]


def test_paths_through_proc_and_dev_are_refused_and_nothing_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "redirect.txt"
    target.write_text("keep\n")
    link = tmp_path / "out.json"
    with open(target, "a") as fh:
        fd = fh.fileno()
        link.symlink_to(f"/proc/self/fd/{fd}")
        for path in (f"/proc/self/fd/{fd}", f"/dev/fd/{fd}", link):
            with pytest.raises(OutputError, match="standard stream or open file descriptor"):
                check_writable(path)
            with pytest.raises(OutputError):
                with atomic_path(path) as tmp:
                    tmp.write_text("new")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(OutputError, match="under /proc"):
        check_writable("/proc/self/cwd/heatmap.tif")  # the cwd's file, but named through /proc
    assert target.read_text() == "keep\n" and link.is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json", "redirect.txt"]
    # The existing messages for what is not even a file stay as they were.
    with pytest.raises(OutputError, match="character device, not a regular file"):
        check_writable("/dev/null")
    with pytest.raises(OutputError, match="cannot create files"):
        check_writable("/proc/fastinsight-x.tif")


def test_special_location_names() -> None:
    from fastinsight.atomic import special_location

    assert special_location("/dev/stdout") == "a standard stream or open file descriptor"
    assert special_location("/proc/123/fd/4") == "a standard stream or open file descriptor"
    assert "under /dev" in str(special_location("/dev/sda1"))
    assert "under /sys" in str(special_location("/sys/kernel/x"))
    assert special_location("/dev/shm/heatmap.tif") is None  # an ordinary memory file system
    assert special_location("/devices/heatmap.tif") is None
    assert special_location("/tmp/x.tif") is None


@pytest.mark.skipif(not os.access("/dev/shm", os.W_OK), reason="no writable /dev/shm")
def test_dev_shm_stays_writable() -> None:
    path = Path("/dev/shm") / f"fastinsight-test-{os.getpid()}.json"
    try:
        with atomic_path(path) as tmp:
            tmp.write_text("{}")
        assert path.read_text() == "{}"
    finally:
        path.unlink(missing_ok=True)


# -- 3. demo: explicit counts as given, --size refused where it does not apply ------------------
def _demo_calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, dict]:
    calls: dict[str, dict] = {}

    def fake(name: str):
        def run(out_dir, **kwargs):
            calls[name] = kwargs
            return {}

        return run

    import fastinsight.demo
    import fastinsight.radiograph.demo
    import fastinsight.volume.demo

    monkeypatch.setattr(fastinsight.volume.demo, "run_ct_demo", fake("ct"))
    monkeypatch.setattr(fastinsight.radiograph.demo, "run_radiograph_demo", fake("radiograph"))
    monkeypatch.setattr(fastinsight.demo, "run_demo", fake("wsi"))
    return calls


@pytest.mark.parametrize(
    ("modality", "expected"),
    [
        ("ct", {"volumes": 32, "held_out": 8, "epochs": 12}),
        ("radiograph", {"n_train": 32, "n_test": 8, "epochs": 12}),
        ("wsi", {"slides": 32, "held_out": 8, "epochs": 12}),
    ],
)
def test_demo_passes_explicit_counts_equal_to_the_wsi_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys, modality: str, expected: dict
) -> None:
    calls = _demo_calls(monkeypatch)
    proc = run_main(
        capsys, "demo", "--modality", modality, tmp_path / "d",
        "--slides", "32", "--held-out", "8", "--epochs", "12",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    got = {k: v for k, v in calls[modality].items() if k in expected}
    assert got == expected


@pytest.mark.parametrize("modality", ["ct", "radiograph", "wsi"])
def test_demo_leaves_unset_counts_to_the_modality(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys, modality: str
) -> None:
    calls = _demo_calls(monkeypatch)
    assert run_main(capsys, "demo", "--modality", modality, tmp_path / "d").returncode == 0
    counts = {"volumes", "held_out", "epochs", "n_train", "n_test", "slides", "size"}
    assert not counts & set(calls[modality])  # each demo function's own defaults


@pytest.mark.parametrize("modality", ["ct", "radiograph"])
def test_demo_size_for_ct_or_radiograph_is_a_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys, modality: str
) -> None:
    calls = _demo_calls(monkeypatch)
    proc = run_main(capsys, "demo", "--modality", modality, tmp_path / "d", "--size", "1120")
    line = assert_one_error_line(proc, ConfigError.exit_code)
    assert "--size" in line and modality in line
    assert not calls and not (tmp_path / "d").exists()


# -- 4. train-volume: defaults that fit, the combination checked before any work ----------------
def test_slice_tile_size_follows_the_encoder() -> None:
    from fastinsight.volume.train import slice_tile_size

    assert slice_tile_size("vit-tiny", None) == 224
    assert slice_tile_size("dinov2-tiny", None) == 518
    assert slice_tile_size("vit-tiny", 96, {"patch_size_px": 8}) == 96
    with pytest.raises(
        ConfigError, match="tile_size 518 px is not a multiple of the patch size 16"
    ):
        slice_tile_size("vit-tiny", 518)
    with pytest.raises(ConfigError, match="tile_size"):
        slice_tile_size("vit-tiny", 0)


def test_train_volume_mismatch_is_refused_before_reading_anything(tmp_path: Path, capsys) -> None:
    # The labels file does not exist: the flags are refused before it is read.
    proc = run_main(
        capsys, "train-volume", tmp_path / "volumes", "--labels", tmp_path / "labels.csv",
        "--out", tmp_path / "ct.safetensors", "--tile-size", "518",
    )  # fmt: skip
    line = assert_one_error_line(proc, ConfigError.exit_code)
    assert "--tile-size 518" in line and "--patch-size" in line and "16" in line
    assert list(tmp_path.iterdir()) == []


def test_train_volume_documented_command_works_with_its_defaults(tmp_path: Path, capsys) -> None:
    """docs/ct.md: ``fastinsight train-volume volumes/ --labels labels.csv --out ct.safetensors``
    (exit 4 before: vit-tiny's patch 16 against the default 518 px slices)."""
    from fastinsight.volume.checkpoint import load_volume_model
    from fastinsight.volume.synthetic import write_cohort

    write_cohort(tmp_path / "cohort", 8, shape=(24, 24, 3))
    out = tmp_path / "ct.safetensors"
    proc = run_main(
        capsys, "train-volume", tmp_path / "cohort" / "volumes",
        "--labels", tmp_path / "cohort" / "labels.csv", "--out", out,
        "--epochs", "1", "--device", "cpu",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    _, info = load_volume_model(out, device="cpu")
    assert info.encoder == "vit-tiny" and info.tile_size == 224


# -- 6. the caller's model and encoder come back as they were ----------------------------------
def _modes(module: torch.nn.Module) -> list[bool]:
    return [m.training for m in module.modules()]


def _train_with_one_eval_child(module: torch.nn.Module) -> list[bool]:
    module.train()
    next(iter(module.children())).eval()  # a frozen block inside a training model
    return _modes(module)


def test_predict_slide_gives_model_and_encoder_back_as_they_were(slides_dir) -> None:
    from fastinsight.encoders import build_encoder
    from fastinsight.predict.slide import PredictOptions, encode_slide, predict_slide

    slide = slides_dir / "CMU-1-Small-Region.svs"
    encoder = build_encoder("vit-tiny")
    model = InsightModel(InsightConfig(in_dim=64, encoder="vit-tiny"), backend="reference")
    model_modes, encoder_modes = (
        _train_with_one_eval_child(model),
        _train_with_one_eval_child(encoder),
    )
    params = [id(p) for p in model.parameters()]
    opts = PredictOptions(progress=False, num_workers=0, batch_size=32, device="cpu")
    result = predict_slide(slide, model, encoder, opts)
    assert np.isfinite(result.scores).all()
    assert _modes(model) == model_modes and _modes(encoder) == encoder_modes
    assert [id(p) for p in model.parameters()] == params

    encode_slide(slide, encoder, options=opts)
    assert _modes(encoder) == encoder_modes

    # On an error too: an encoder whose tokens the model cannot take.
    wrong = InsightModel(InsightConfig(in_dim=32, encoder="vit-tiny"), backend="reference")
    wrong_modes = _train_with_one_eval_child(wrong)
    with pytest.raises(InputError, match="channels"):
        predict_slide(slide, wrong, encoder, opts)
    assert _modes(wrong) == wrong_modes and _modes(encoder) == encoder_modes


@pytest.mark.cuda
def test_predict_slide_leaves_a_cpu_model_on_the_cpu(slides_dir) -> None:
    from fastinsight.encoders import build_encoder
    from fastinsight.predict.slide import PredictOptions, predict_slide

    encoder = build_encoder("vit-tiny")
    model = InsightModel(InsightConfig(in_dim=64, encoder="vit-tiny"))
    opts = PredictOptions(progress=False, device="cuda")
    predict_slide(slides_dir / "CMU-1-Small-Region.svs", model, encoder, opts)
    assert {p.device.type for p in [*model.parameters(), *encoder.parameters()]} == {"cpu"}
    assert model.backend_in_use == "reference"  # "auto" resolved again for the CPU


def test_lent_to_restores_on_an_error() -> None:
    from fastinsight.inputs import lent_to

    module = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5))
    modes = _train_with_one_eval_child(module)
    with pytest.raises(RuntimeError, match="boom"):
        with lent_to("cpu", module, None):
            assert not any(_modes(module))
            raise RuntimeError("boom")
    assert _modes(module) == modes


def _tiny_volume_setup(shape=(24, 24, 3)):
    from fastinsight.volume.io import Volume
    from fastinsight.volume.predict import VolumeOptions, build_volume_encoder
    from fastinsight.volume.preprocess import PreprocessOptions
    from fastinsight.volume.synthetic import make_chest_ct

    ct = make_chest_ct(shape, seed=0)
    volume = Volume(ct.hu.astype(np.float32), ct.affine, {"path": "ct.nii.gz"})
    encoder = build_volume_encoder("vit-tiny", 32, options={"patch_size_px": 8})
    model = InsightModel(
        InsightConfig(
            in_dim=64, reduce_dim=16, widths=(16, 8, 8), grid_size=(4, 4), norm="channel",
            encoder="vit-tiny", tile_size_px=32, patch_size_px=8,
        ),
        backend="reference",
    )  # fmt: skip
    options = VolumeOptions(PreprocessOptions(tile_size=32, lung_mask="none"), batch_size=2)
    return volume, model, encoder, options


def test_predict_volume_gives_model_and_encoder_back_as_they_were() -> None:
    from fastinsight.volume.predict import predict_volume

    volume, model, encoder, options = _tiny_volume_setup()
    model_modes, encoder_modes = (
        _train_with_one_eval_child(model),
        _train_with_one_eval_child(encoder),
    )
    result = predict_volume(volume, model, encoder, options)
    assert np.isfinite(result.scores).all()
    assert _modes(model) == model_modes and _modes(encoder) == encoder_modes


@pytest.fixture
def pylon_path(tmp_path: Path) -> Path:
    from fastinsight.models.pylon import PylonConfig, PylonModel, save_pylon

    model = PylonModel(
        PylonConfig(num_classes=1, stem_width=4, layers=(1, 1, 1, 1), dec_channels=4)
    )
    path = tmp_path / "pylon.safetensors"
    save_pylon(model, path)
    return path


def test_predict_radiographs_gives_the_model_back_as_it_was(tmp_path: Path, pylon_path) -> None:
    from fastinsight.radiograph.predict import load_radiograph_model, predict_radiographs
    from tests.radiograph.images import picture, write_png

    image = write_png(tmp_path / "a.png", picture(64, 64))
    model = load_radiograph_model(pylon_path, device="cpu")
    modes = _train_with_one_eval_child(model)
    results = list(predict_radiographs([image, image], model))
    assert len(results) == 2 and _modes(model) == modes
    # Stopped after the first image: closed, the model is back as well.
    it = predict_radiographs([image, image], model)
    next(it)
    it.close()
    assert _modes(model) == modes


# -- 10. devices: one clear error in every loader ----------------------------------------------
def test_load_radiograph_model_checks_the_device(pylon_path: Path) -> None:
    from fastinsight.radiograph.predict import load_radiograph_model

    with pytest.raises(ConfigError, match="'gpu' is not a device"):
        load_radiograph_model(pylon_path, device="gpu")
    with pytest.raises(ConfigError, match="meta device"):
        load_radiograph_model(pylon_path, device="meta")
    if not torch.cuda.is_available():
        with pytest.raises(BackendError, match="no CUDA GPU"):
            load_radiograph_model(pylon_path, device="cuda")


def test_resolve_device_refuses_absent_gpus_and_other_device_types() -> None:
    with pytest.raises(ConfigError, match="meta device"):
        resolve_device("meta")
    with pytest.raises(ConfigError, match="not a device"):
        resolve_device(3.5)  # type: ignore[arg-type]
    with pytest.raises(BackendError):
        resolve_device("cuda:99")
    assert resolve_device("cpu") == torch.device("cpu")


# -- 12. options objects check every field when made -------------------------------------------
@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("batch_size", 1.5),
        ("batch_size", "8"),
        ("batch_size", True),
        ("batch_size", 0),
        ("num_workers", 2.0),
        ("tissue", "he"),
        ("reader_backend", "foo"),
        ("decode", "gpu"),
        ("thumbnail_size", 0),
        ("thumbnail_size", 10**6),
        ("min_tissue_fraction", "0.1"),
        ("min_cell_fraction", float("nan")),
        ("mpp", 0),
        ("mpp", "abc"),
        ("mpp", float("inf")),
        ("progress", "yes"),
        ("profile", 1),
        ("encoder_weights", 3),
        ("device", "gpu"),
    ],
)
def test_slide_predict_options_refuse_bad_fields(field: str, value: object) -> None:
    from fastinsight.predict.slide import PredictOptions

    with pytest.raises(ConfigError) as info:
        PredictOptions(**{field: value})
    assert type(info.value) is ConfigError
    if field != "device":
        assert info.value.fields == (field,), info.value


def test_slide_predict_options_take_numpy_numbers() -> None:
    from fastinsight.predict.slide import PredictOptions

    opts = PredictOptions(batch_size=np.int64(8), min_cell_fraction=np.float32(0.25), mpp=0.25)
    assert type(opts.batch_size) is int and opts.batch_size == 8
    assert type(opts.min_cell_fraction) is float and opts.min_cell_fraction == 0.25


def test_cli_names_the_flag_of_a_bad_option() -> None:
    from fastinsight.cli.main import error_message
    from fastinsight.predict.slide import PredictOptions

    with pytest.raises(ConfigError) as info:
        PredictOptions(mpp=5000)
    assert error_message(info.value).startswith("--mpp must be")


def test_volume_and_radiograph_options_refuse_bad_fields() -> None:
    from fastinsight.radiograph.predict import PredictOptions as RadiographOptions
    from fastinsight.volume.predict import VolumeOptions

    for bad in (0, 1.5, "16"):
        with pytest.raises(ConfigError, match="batch_size"):
            VolumeOptions(batch_size=bad)  # type: ignore[arg-type]
        with pytest.raises(ConfigError, match="batch_size"):
            RadiographOptions(batch_size=bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="preprocess"):
        VolumeOptions(preprocess="official")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="'gpu' is not a device"):
        RadiographOptions(device="gpu")


def test_predict_radiographs_checks_its_arguments_when_called(tmp_path: Path, pylon_path) -> None:
    from fastinsight.radiograph.predict import load_radiograph_model, predict_radiographs

    model = load_radiograph_model(pylon_path, device="cpu")
    with pytest.raises(ConfigError, match="on_error"):
        predict_radiographs([tmp_path / "a.png"], model, on_error="bogus")  # no next() needed
    with pytest.raises(ConfigError, match="list of image paths"):
        predict_radiographs(str(tmp_path / "a.png"), model)  # type: ignore[arg-type]


# -- 13. predict_volume checks the voxels of a Volume built in Python --------------------------
@pytest.mark.parametrize("bad", [np.inf, np.nan])
def test_predict_volume_refuses_non_finite_voxels(bad: float) -> None:
    from fastinsight.volume.io import Volume
    from fastinsight.volume.predict import predict_volume

    volume, model, encoder, options = _tiny_volume_setup()
    data = volume.data.copy()
    data[:, :, 1] = bad
    hostile = Volume(data, volume.affine, volume.facts)
    with pytest.raises(InputError, match=r"ct\.nii\.gz: 576 voxel\(s\) are NaN or infinite"):
        predict_volume(hostile, model, encoder, options)


# -- 14. a closed pipe: quiet, no traceback --------------------------------------------------------
def test_closed_stdout_stops_quietly() -> None:
    """``fastinsight encoders list | head -1``: the reader is gone before the first write."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _ENTRY, "encoders", "list"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # nobody reads: every write meets EPIPE
    err = proc.stderr.read()
    code = proc.wait(timeout=300)
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
    assert err.strip() == "" and code == 141


# -- 17. the README's feature-file commands, as written, on official INSIGHT h5 files -----------
def _readme_commands() -> list[str]:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    start = readme.index("Only TRIDENT files record")
    block = readme[
        readme.index("```bash", start) + 7 : readme.index("```", readme.index("```bash", start) + 7)
    ]
    joined = block.replace("\\\n", " ")
    return [line.strip() for line in joined.splitlines() if line.strip().startswith("fastinsight")]


@pytest.mark.slow
def test_readme_feature_commands_work_on_official_h5(tmp_path: Path) -> None:
    from tests.support.h5_layouts import grid_coords, write_insight

    rng = np.random.default_rng(0)
    folder = tmp_path / "features"
    rows = ["slide_id,label"]
    for i in range(6):
        tokens = rng.normal(size=(2, 1024, 14, 14)).astype(np.float32) + 0.5 * (i % 2)
        write_insight(folder / f"s{i}.h5", tokens, grid_coords(np.array([[0, 0], [0, 1]]), 448))
        rows.append(f"s{i},{i % 2}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    commands = _readme_commands()
    train = next(c for c in commands if c.startswith("fastinsight train "))
    predict = next(c for c in commands if c.startswith("fastinsight predict "))
    # The files hold no geometry: the README's commands name what they need.
    for flag in ("--encoder", "--tile-size", "--mpp"):
        assert flag in train
    assert "--patch-size-l0" in predict

    subs = {
        "FEATURES_DIR": str(folder),
        "labels.csv": str(tmp_path / "labels.csv"),
        "model.safetensors": str(tmp_path / "model.safetensors"),
    }
    args = [subs.get(a, a) for a in shlex.split(train)[1:]]
    proc = run_cli(*args, "--epochs", "1", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    # The slide of these files does not exist: its role (the level-0 mpp) is played by --mpp.
    words = shlex.split(predict)[1:]
    i = words.index("--slide")
    words[i : i + 2] = ["--mpp", "0.25"]
    subs = {"F.h5": str(folder / "s1.h5"), "heatmap.tif": str(tmp_path / "h.tif")}
    proc = run_cli(*[subs.get(a, a) for a in words], "-m", tmp_path / "model.safetensors", "-q")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "h.tif").is_file()
    assert re.search(r"s1: label=\d", proc.stdout)


def test_demo_folder_under_proc_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fastinsight.atomic import claim_demo_folder

    monkeypatch.chdir(tmp_path)
    with pytest.raises(OutputError, match="under /proc"):
        claim_demo_folder("/proc/self/cwd/demo")
    assert list(tmp_path.iterdir()) == []


def test_predict_features_gives_the_model_back_as_it_was(tiny_model, tiny_features) -> None:
    from fastinsight.models.checkpoints import load_model
    from fastinsight.predict.features import predict_features
    from fastinsight.predict.slide import PredictOptions

    model = load_model(tiny_model, backend="reference", device="cpu")
    modes = _train_with_one_eval_child(model)
    predict_features(
        tiny_features, model, PredictOptions(progress=False, num_workers=0, device="cpu")
    )
    assert _modes(model) == modes


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "meta"])
def test_model_loaders_refuse_a_bad_device_name_before_reading(
    tmp_path: Path, tiny_model, device: str
) -> None:
    """``load_model`` / ``load_volume_model`` / the radiograph loader name the device problem
    (ConfigError) instead of torch's RuntimeError, before the file is even read."""
    from fastinsight.models.checkpoints import load_model
    from fastinsight.volume.checkpoint import load_volume_model

    with pytest.raises(ConfigError):
        load_model(tiny_model, device=device)
    with pytest.raises(ConfigError):
        load_model(tmp_path / "missing.safetensors", device=device)
    with pytest.raises(ConfigError):
        load_volume_model(tiny_model, device=device)


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="checks the message on a machine without CUDA"
)
def test_model_loaders_say_cuda_is_absent(tiny_model) -> None:
    from fastinsight.errors import BackendError
    from fastinsight.models.checkpoints import load_model

    with pytest.raises(BackendError, match="no CUDA GPU is visible"):
        load_model(tiny_model, device="cuda")
