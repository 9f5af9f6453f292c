"""A required package that is missing (``pip install --no-deps``, a broken environment): every
command says so in one line naming the pip distribution and exits 7, with no traceback and no
output; an import error inside fastinsight itself still shows its traceback (docs/exit-codes.md).

The subprocess tests make a module unimportable the way a missing package is
(``sys.modules[name] = None``: ``import name`` raises ModuleNotFoundError) and then run the real
command line on real inputs, so the error comes from wherever the command first needs it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fastinsight.cli.main import EXIT_MISSING_DEPENDENCY, missing_dependency_message
from fastinsight.errors import BackendError

# argv[1]: the modules to hide, comma-separated; the rest is the command line.
_BLOCKED_ENTRY = (
    "import sys\n"
    "for name in sys.argv[1].split(','):\n"
    "    sys.modules[name] = None\n"
    "from fastinsight.cli import main\n"
    "sys.exit(main(sys.argv[2:]))\n"
)


def run_without(modules: str, *args: str | os.PathLike[str]) -> subprocess.CompletedProcess:
    """``fastinsight ARGS`` in a fresh interpreter where ``modules`` cannot be imported."""
    return subprocess.run(
        [sys.executable, "-c", _BLOCKED_ENTRY, modules, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
    )


def assert_missing(proc: subprocess.CompletedProcess, *expected: str) -> str:
    """Exit 7, exactly one stderr line ``fastinsight: error: ...`` holding ``expected``."""
    assert proc.returncode == EXIT_MISSING_DEPENDENCY == 7, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("fastinsight: error: "), lines[0]
    for text in expected:
        assert text in lines[0], (text, lines[0])
    return lines[0]


def test_exit_code_is_the_documented_backend_code() -> None:
    assert EXIT_MISSING_DEPENDENCY == BackendError.exit_code
    table = (Path(__file__).resolve().parents[2] / "docs" / "exit-codes.md").read_text()
    row = next(line for line in table.splitlines() if line.startswith("| 7 |"))
    assert "required Python package" in row


# -- the real commands, a module hidden ---------------------------------------------------------


def test_predict_volume_without_nibabel(tmp_path: Path) -> None:
    import nibabel as nib

    from tests.volume.ct_testutil import small_model_file

    scan = tmp_path / "scan.nii.gz"
    hu = np.full((24, 24, 3), -1000, dtype=np.int16)
    hu[6:18, 6:18, :] = 40
    nib.save(nib.Nifti1Image(hu, np.diag([1.0, 1.0, 2.0, 1.0])), str(scan))
    model = small_model_file(tmp_path)
    out = tmp_path / "heatmap.nii.gz"
    proc = run_without(
        "nibabel", "predict-volume", scan, "--model", model, "--out", out, "--device", "cpu"
    )
    assert_missing(proc, "predict-volume", "'nibabel'", "not installed", "; pip install nibabel")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([scan.name, model.name])


def test_predict_slide_without_openslide(tmp_path: Path, slides_dir: Path) -> None:
    from fastinsight.models.config import InsightConfig
    from fastinsight.models.insight import InsightModel

    slide = slides_dir / "CMU-1-Small-Region.svs"
    if not slide.is_file():
        pytest.skip(f"{slide} not found")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = InsightModel(
            InsightConfig(in_dim=64, num_classes=1, encoder="vit-tiny"), backend="reference"
        )
    model_path = tmp_path / "tiny.safetensors"
    model.save(str(model_path))
    out = tmp_path / "heatmap.tif"
    proc = run_without(
        "openslide",
        "predict", slide, "--model", model_path, "--out", out, "--report", tmp_path / "r.json",
        "--device", "cpu", "--num-workers", "1",
    )  # fmt: skip
    line = assert_missing(proc, "predict needs", "'openslide-python'", "not installed")
    assert line.endswith("; pip install openslide-python openslide-bin"), line
    assert sorted(p.name for p in tmp_path.iterdir()) == [model_path.name]


def test_predict_radiograph_without_pydicom(tmp_path: Path) -> None:
    from fastinsight.models.pylon import PylonConfig, PylonModel, save_pylon
    from tests.radiograph.images import picture, write_dicom

    torch.manual_seed(0)
    cfg = PylonConfig(num_classes=2, stem_width=8, layers=(1, 1, 1, 1), dec_channels=8)
    model = tmp_path / "pylon.safetensors"
    save_pylon(PylonModel(cfg), model)
    image = write_dicom(tmp_path / "cxr.dcm", picture(64, 60).astype(np.uint16) * 257)
    proc = run_without(
        "pydicom",
        "predict-radiograph", image, "--model", model, "--out", tmp_path / "hm.tif",
        "--device", "cpu",
    )  # fmt: skip
    assert_missing(proc, "predict-radiograph", "'pydicom'", "; pip install pydicom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cxr.dcm", "pylon.safetensors"]


def test_a_missing_fastinsight_module_is_a_bug_with_its_traceback(tmp_path: Path) -> None:
    """A packaging bug (one of fastinsight's own modules absent) is not "pip install ...": exit 1
    and the traceback, as any internal error."""
    proc = run_without(
        "fastinsight.volume.io",
        "predict-volume", tmp_path / "scan.nii.gz", "--model", tmp_path / "m.safetensors",
        "--out", tmp_path / "hm.nii.gz",
    )  # fmt: skip
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" in proc.stderr
    assert "fastinsight.volume.io" in proc.stderr
    assert "pip install" not in proc.stderr
    assert list(tmp_path.iterdir()) == []


# -- the message, for each kind of import error -------------------------------------------------


def _not_found(name: str) -> ModuleNotFoundError:
    return ModuleNotFoundError(f"No module named {name!r}", name=name)


# module -> the package the message names and the command that installs it
PIP_NAMES = [
    ("nibabel", "'nibabel'", "pip install nibabel"),
    ("PIL", "'pillow'", "pip install pillow"),
    ("PIL.Image", "'pillow'", "pip install pillow"),
    ("openslide", "'openslide-python'", "pip install openslide-python openslide-bin"),
    ("skimage", "'scikit-image'", "pip install scikit-image"),
    ("huggingface_hub", "'huggingface-hub'", "pip install huggingface-hub"),
    ("onnxruntime", "'onnxruntime'", "pip install 'fastinsight[export]'"),
    ("ray", "'ray'", "pip install 'fastinsight[cohort]'"),
]


@pytest.mark.parametrize(
    ("module", "package", "install"), PIP_NAMES, ids=[m for m, *_ in PIP_NAMES]
)
def test_module_names_become_pip_names(module: str, package: str, install: str) -> None:
    hidden = module.partition(".")[0]
    saved = sys.modules.get(hidden, ...)
    sys.modules[hidden] = None  # type: ignore[assignment]  # "not installed", whatever is here
    try:
        message = missing_dependency_message(_not_found(module), "predict")
    finally:
        if saved is ...:
            del sys.modules[hidden]
        else:
            sys.modules[hidden] = saved  # type: ignore[assignment]
    assert message == (
        f"predict needs the Python package {package}, which is not installed; {install}"
    )


def test_an_installed_package_without_a_name_asks_for_a_newer_one() -> None:
    exc = ImportError("cannot import name 'frobnicate' from 'numpy'", name="numpy")
    message = missing_dependency_message(exc, "train")
    assert message is not None
    assert message.startswith("train needs a newer or intact 'numpy'"), message
    assert "frobnicate" in message and message.endswith("; pip install -U numpy")


def test_openslide_without_its_library_asks_for_openslide_bin() -> None:
    """openslide-python raises a nameless ModuleNotFoundError when libopenslide is missing."""
    source = (
        "def load():\n"
        "    raise ModuleNotFoundError(\"Couldn't locate OpenSlide shared library. Try `pip "
        'install openslide-bin`. https://openslide.org/api/python/#installing")\n'
    )
    namespace: dict[str, object] = {"__name__": "openslide.lowlevel"}
    exec(compile(source, "openslide/lowlevel.py", "exec"), namespace)
    with pytest.raises(ModuleNotFoundError) as info:
        namespace["load"]()  # type: ignore[operator]
    message = missing_dependency_message(info.value, "predict")
    assert message == (
        "predict needs the OpenSlide C library ('openslide-bin'), which was not found (Couldn't "
        "locate OpenSlide shared library); pip install openslide-bin"
    )


@pytest.mark.parametrize(
    "name", ["fastinsight.volume.io", "kernels.head", "export.onnx_head", "_lzma", "importlib.x"]
)
def test_own_and_standard_library_modules_are_not_pip_packages(name: str) -> None:
    assert missing_dependency_message(_not_found(name)) is None


def test_a_nameless_import_error_from_fastinsight_is_not_blamed_on_a_package() -> None:
    with pytest.raises(ImportError) as info:
        raise ImportError("something fastinsight itself got wrong")
    assert missing_dependency_message(info.value) is None
