"""Threads sharing one model: the model is lent once and given back when the last call leaves.

Each call used to save and restore its own snapshot: the first to leave put a training model
back in train mode while another call was still running it, so that call's BatchNorm updated
the caller's running statistics and the model ended in whatever mode the last exit saw.
"""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from fastinsight.errors import InputError
from fastinsight.inputs import lent_to
from fastinsight.models.radiograph_common import eval_mode


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())


@pytest.mark.parametrize("ctx", [lent_to, None], ids=["lent_to", "eval_mode"])
def test_a_training_model_stays_in_eval_until_the_last_call_leaves(ctx) -> None:  # type: ignore[no-untyped-def]
    model = _model().train()
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def call():  # type: ignore[no-untyped-def]
        return eval_mode(model) if ctx is None else lent_to(None, model)

    inside, first_left, second_in = threading.Event(), threading.Event(), threading.Event()
    record: dict[str, object] = {}

    def first() -> None:
        with call():
            inside.set()
            second_in.wait(10)
        first_left.set()

    def second() -> None:
        inside.wait(10)
        with call():
            second_in.set()
            first_left.wait(10)
            record["training"] = model.training
            model(torch.randn(2, 3, 8, 8))  # BatchNorm in train mode would update its stats

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert record["training"] is False
    assert model.training and all(m.training for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), f"{k} changed: the caller's model was trained"


def test_nested_loans_give_back_once() -> None:
    model = _model().train()
    with lent_to("cpu", model):
        with lent_to(None, model), eval_mode(model):
            assert not model.training
        assert not model.training  # the inner calls left; the outer still runs it
    assert model.training


def test_another_device_during_a_loan_is_one_clear_error() -> None:
    model = _model()
    with lent_to("cpu", model):
        with pytest.raises(InputError, match="in use on cpu by another call"):
            with lent_to("meta", model):
                pass
        assert next(model.parameters()).device.type == "cpu"
    assert model.training


def test_a_failed_call_still_gives_the_model_back() -> None:
    model = _model().train()
    with pytest.raises(RuntimeError, match="boom"):
        with lent_to("cpu", model):
            raise RuntimeError("boom")
    assert model.training
    with lent_to("cpu", model):  # no loan was left behind
        assert not model.training
