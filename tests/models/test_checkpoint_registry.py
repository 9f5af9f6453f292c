"""The checkpoint sniffer's registration hook: another model family claims its own files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fastinsight.errors import CheckpointError
from fastinsight.models import checkpoints
from fastinsight.models.checkpoints import CheckpointFile, ModelLoader, load_model, register_loader
from fastinsight.models.config import InsightConfig
from fastinsight.models.insight import InsightModel


class _Linear(torch.nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(n, 1)


def _load_linear(ckpt: CheckpointFile, backend: str) -> torch.nn.Module:
    model = _Linear(int(ckpt.metadata["toy.in"]))
    model.load_state_dict(ckpt.state)
    return model


@pytest.fixture
def toy_family(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(checkpoints, "LOADERS", list(checkpoints.LOADERS))
    register_loader(ModelLoader("toy", lambda f: "toy.in" in f.metadata, _load_linear))


def test_a_registered_family_gets_its_files(tmp_path: Path, toy_family: None) -> None:
    src = _Linear(5)
    path = tmp_path / "toy.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, path, {"toy.in": "5"})
    got = load_model(path, device="cpu")
    assert isinstance(got, _Linear) and not got.training
    torch.testing.assert_close(got.fc.weight, src.fc.weight)
    # INSIGHT's own files still load as INSIGHT
    ins = tmp_path / "insight.safetensors"
    InsightModel(InsightConfig(in_dim=8), backend="reference").save(str(ins))
    assert isinstance(load_model(ins, backend="reference", device="cpu"), InsightModel)


def test_unclaimed_file_gets_insight_error(tmp_path: Path, toy_family: None) -> None:
    path = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, path, {"other": "1"})
    with pytest.raises(CheckpointError, match="without a fastinsight config"):
        load_model(path, device="cpu")


def test_register_twice_replaces(toy_family: None) -> None:
    register_loader(ModelLoader("toy", lambda f: False, _load_linear))
    assert [e.name for e in checkpoints.LOADERS].count("toy") == 1
