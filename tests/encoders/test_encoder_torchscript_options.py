"""What a TorchScript module cannot say about itself: ``--patch-size``, ``--mean``, ``--std``.

``TorchScriptOptions`` checks the values (exit 2 before the module is loaded); the flags exist
on every command that takes an encoder (``encoders check``, ``export onnx``, ``export
triton-repo``), are refused with any other encoder, and what was used is in ``identity()``.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fastinsight.cli import main
from fastinsight.encoders import build_encoder
from fastinsight.encoders.base import IMAGENET_MEAN, IMAGENET_STD
from fastinsight.encoders.torchscript import TorchScriptOptions, is_torchscript_name
from fastinsight.errors import ConfigError

# torch.jit is deprecated in torch >= 2.9 (and says so on every load).
pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

MEAN = ("0.5", "0.4", "0.3")
STD = ("0.2", "0.25", "0.3")


@pytest.fixture
def module_file(tmp_path: Path) -> Path:
    """A patchify convolution: [B, 3, 32, 32] -> [B, 12, 4, 4] (patch 8)."""
    path = tmp_path / "enc.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(nn.Conv2d(3, 12, 8, stride=8).eval()), str(path))
    return path


def _run(argv: list[object], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, list[str]]:
    rc = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err.strip().splitlines()


# -- the values -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"std": (0.2, 0.0, 0.3)}, "std (--std) must be > 0"),
        ({"std": (0.2, -1.0, 0.3)}, "std (--std) must be > 0"),
        ({"mean": (0.5, math.nan, 0.5)}, "mean (--mean) must be 3 finite numbers"),
        ({"std": (0.5, math.inf, 0.5)}, "std (--std) must be 3 finite numbers"),
        ({"mean": (0.5, 0.5)}, "mean (--mean) must be 3 numbers"),
        ({"mean": (0.5, 0.5, 0.5, 0.5)}, "mean (--mean) must be 3 numbers"),
        ({"std": (True, 1, 1)}, "std (--std) must be 3 finite numbers"),
        ({"patch_size_px": 0}, "patch_size_px must be a whole number"),
        ({"patch_size_px": 8.0}, "patch_size_px must be a whole number"),
    ],
    ids=[
        "std-0",
        "std-negative",
        "mean-nan",
        "std-inf",
        "2-values",
        "4-values",
        "bool",
        "p-0",
        "p-float",
    ],
)
def test_bad_values_are_config_errors(kwargs: dict[str, object], words: str) -> None:
    with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(")", r"\)")):
        TorchScriptOptions(**kwargs)  # type: ignore[arg-type]


def test_the_patch_size_must_divide_the_tile() -> None:
    options = TorchScriptOptions(patch_size_px=7, mean=(0, 0, 0), std=(1, 1, 1))
    assert options.build_options() == {
        "patch_size_px": 7,
        "mean": (0.0, 0.0, 0.0),
        "std": (1.0, 1.0, 1.0),
    }
    options.check_tile(28)
    with pytest.raises(
        ConfigError, match=r"7 px does not divide the 32 px tile.* such as 8"
    ) as err:
        options.check_tile(32)
    assert err.value.fields == ("patch_size_px",)
    with pytest.raises(ConfigError, match="does not divide the 4 px tile"):
        options.check_tile(4)  # larger than the tile
    assert TorchScriptOptions().build_options() == {}
    # numpy values from Python code are numbers too
    options = TorchScriptOptions(patch_size_px=np.int64(8), std=np.array([0.5, 0.5, 0.5]))
    assert options.build_options() == {"patch_size_px": 8, "std": (0.5, 0.5, 0.5)}


def test_names() -> None:
    assert is_torchscript_name("torchscript:a.pt") and is_torchscript_name(" TorchScript ")
    assert not is_torchscript_name("vit-tiny") and not is_torchscript_name(None)


# -- the encoder ----------------------------------------------------------------------------------
def test_identity_records_what_was_given(module_file: Path) -> None:
    default = build_encoder(f"torchscript:{module_file}", tile_size_px=32)
    ident = default.identity()
    assert ident["given_options"] == []
    assert (tuple(ident["mean"]), tuple(ident["std"])) == (IMAGENET_MEAN, IMAGENET_STD)
    assert ident["patch_size_px"] == 8  # read off the 4 x 4 output
    stated = build_encoder(
        f"torchscript:{module_file}", tile_size_px=32, patch_size_px=8, mean=(0.5, 0.4, 0.3)
    )
    ident = stated.identity()
    assert ident["given_options"] == ["patch_size_px", "mean"]
    assert ident["mean"] == [0.5, 0.4, 0.3] and tuple(ident["std"]) == IMAGENET_STD


def test_bad_values_fail_before_the_module_is_loaded(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pt"  # would be a CheckpointError if it were opened
    with pytest.raises(ConfigError, match="std"):
        build_encoder(f"torchscript:{missing}", tile_size_px=32, std=(1.0, 0.0, 1.0))
    with pytest.raises(ConfigError, match="does not divide the 32 px tile"):
        build_encoder(f"torchscript:{missing}", tile_size_px=32, patch_size_px=5)


# -- the commands ---------------------------------------------------------------------------------
def test_encoders_check_takes_the_flags(
    module_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["encoders", "check", f"torchscript:{module_file}", "--tile-size", "32", "--json"]
    rc, out, err = _run([*argv, "--patch-size", "8", "--mean", *MEAN, "--std", *STD], capsys)
    assert rc == 0, err
    report = json.loads(out)
    assert (report["patch_size_px"], report["grid"]) == (8, [4, 4])
    assert report["mean"] == [0.5, 0.4, 0.3] and report["std"] == [0.2, 0.25, 0.3]


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (["--std", "0.2", "0", "0.3"], "std (--std) must be > 0"),
        (["--mean", "nan", "0", "0"], "mean (--mean) must be 3 finite"),
        (["--patch-size", "7"], "--patch-size 7 px does not divide the 32 px tile"),
        (["--patch-size", "0"], "--patch-size must be a whole number"),
    ],
    ids=["std-0", "mean-nan", "patch-7", "patch-0"],
)
def test_bad_flag_values_are_one_line(
    module_file: Path, capsys: pytest.CaptureFixture[str], extra: list[str], words: str
) -> None:
    argv = ["encoders", "check", f"torchscript:{module_file}", "--tile-size", "32", *extra]
    rc, out, err = _run(argv, capsys)
    assert rc == ConfigError.exit_code and out == ""
    assert len(err) == 1 and err[0].startswith("fastinsight: error: ") and words in err[0], err


def test_the_flags_are_refused_with_another_encoder(capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = _run(["encoders", "check", "vit-tiny", "--mean", *MEAN, "--std", *STD], capsys)
    assert rc == ConfigError.exit_code and len(err) == 1
    assert "--mean, --std apply to torchscript:PATH encoders only" in err[0]
    assert "'vit-tiny'" in err[0]
    rc, _, err = _run(
        ["encoders", "check", "timm:vit_small_patch16_224", "--patch-size", "16"], capsys
    )
    assert rc == ConfigError.exit_code and len(err) == 1
    assert "--patch-size applies to torchscript:PATH encoders only" in err[0]


def test_loading_a_module_says_nothing_of_torch_deprecations(module_file: Path) -> None:
    """torch.jit.load's DeprecationWarning/FutureWarning is torch's business, not a line on the
    user's stderr."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        build_encoder(f"torchscript:{module_file}", tile_size_px=32)
    assert not [w for w in seen if "deprecated" in str(w.message)], [str(w.message) for w in seen]
