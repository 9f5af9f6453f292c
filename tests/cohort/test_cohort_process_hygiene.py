"""``predict_cohort`` gives the process back as it found it (hygiene audit, finding 3).

``ray.init`` replaces the caller's SIGTERM handler, points ``PYTHONBREAKPOINT`` at Ray's
debugger, sets ``RAY_AUTH_MODE``, enables faulthandler and sets the ``ray`` logger's level; a
local instance started by ``predict_cohort`` must leave none of that behind. One test runs a real
one-slide cohort in a fresh interpreter (one Ray start; a fresh process so that faulthandler
starts disabled, as pytest enables it); the others drive the Ray session with a stand-in for
Ray that makes the same changes, to cover failures, interruptions, the CLI's handler and a
session the caller opened.
"""

from __future__ import annotations

import contextlib
import faulthandler
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import pytest
import torch

pytest.importorskip("ray", reason="predict-cohort needs Ray: pip install 'fastinsight[cohort]'")

from fastinsight.cohort import ray_backend  # noqa: E402
from fastinsight.cohort.options import CohortOptions  # noqa: E402
from fastinsight.errors import BackendError  # noqa: E402
from fastinsight.models.config import InsightConfig  # noqa: E402
from fastinsight.models.insight import InsightModel  # noqa: E402
from fastinsight.signals import Terminated, _raise_terminated, handle_sigterm  # noqa: E402
from fastinsight.synthetic import make_cohort  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SIGNALS = [getattr(signal, n) for n in ("SIGTERM", "SIGINT", "SIGHUP") if hasattr(signal, n)]
RAY_ENV = ("PYTHONBREAKPOINT", "RAY_AUTH_MODE", "RAY_USAGE_STATS_ENABLED")

# ---------------------------------------------------------------------------------------------
# A real cohort on a real local Ray, in a fresh interpreter
# ---------------------------------------------------------------------------------------------

SCRIPT = textwrap.dedent(
    """
    import faulthandler, json, logging, os, signal, sys
    import ray  # its import sets RAY_CLIENT_MODE and the ray logger, once: not the session
    from fastinsight.cohort import predict_cohort, ray_backend
    from fastinsight.cohort.options import CohortOptions

    def mine(signum, frame):
        pass

    SIGNALS = [getattr(signal, n) for n in ("SIGTERM", "SIGINT", "SIGHUP") if hasattr(signal, n)]
    for sig in SIGNALS:
        signal.signal(sig, mine)
    os.environ["PYTHONBREAKPOINT"] = "pdb.set_trace"
    faulthandler.disable()

    def state():
        return {
            "handlers": {int(s): signal.getsignal(s) is mine for s in SIGNALS},
            "env": {k: os.environ.get(k) for k in os.environ if k.startswith(("RAY_", "PYTHONB"))},
            "faulthandler": faulthandler.is_enabled(),
            "ray_logger_level": logging.getLogger("ray").level,
        }

    during = {}
    submit = ray_backend._submit

    def spy(*args, **kwargs):  # runs between ray.init and ray.shutdown
        during.update(state())
        return submit(*args, **kwargs)

    ray_backend._submit = spy
    before = state()
    slide, model, out = sys.argv[1:4]
    report = predict_cohort(
        slide, model, out, CohortOptions(num_cpus=1, progress=False, max_retries=0)
    )
    print(json.dumps({
        "before": before,
        "during": during,
        "after": state(),
        "statuses": [o.status for o in report.outcomes],
    }))
    """
)


@pytest.mark.slow
def test_predict_cohort_leaves_no_ray_state_behind(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = tmp_path / "model.safetensors"
    InsightModel(InsightConfig(in_dim=64, encoder="vit-tiny"), backend="reference").save(str(model))
    (slide,) = make_cohort(tmp_path / "syn", 1, size_px=(448, 448))
    base = Path(tempfile.mkdtemp(prefix="fi-t-"))  # short: Ray's socket paths live under it
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.pop("PYTHONFAULTHANDLER", None)
        env.pop("PYTHONBREAKPOINT", None)
        env["TMPDIR"] = str(base)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        res = subprocess.run(
            [sys.executable, "-c", SCRIPT, str(slide.path), str(model), str(tmp_path / "out")],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert res.returncode == 0, res.stderr[-3000:]
        got = json.loads(res.stdout.strip().splitlines()[-1])
        assert got["statuses"] == ["ok"]
        before, during, after = got["before"], got["during"], got["after"]
        # The state before is what the script set up, and Ray did change it during the run ...
        assert all(before["handlers"].values()) and not before["faulthandler"]
        assert before["env"]["PYTHONBREAKPOINT"] == "pdb.set_trace"
        assert (
            "RAY_AUTH_MODE" not in before["env"] and "RAY_USAGE_STATS_ENABLED" not in before["env"]
        )
        assert during["env"]["PYTHONBREAKPOINT"] != "pdb.set_trace"
        assert "RAY_AUTH_MODE" in during["env"] and during["faulthandler"]
        # ... but the caller's handlers were put back as soon as ray.init returned ...
        assert all(during["handlers"].values()), during["handlers"]
        # ... and everything is as it was once predict_cohort has returned.
        assert after == before
        assert not list(base.glob("fi-ray-*")), "the local Ray temp dir should be removed"
    finally:
        shutil.rmtree(base, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# The Ray session with a stand-in for Ray (no Ray start)
# ---------------------------------------------------------------------------------------------


def _rays_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(signum)  # ray.init's handler: sys.exit(signum)


_rays_sigterm.__module__ = "ray._private.worker"


class FakeRay:
    """Makes the process changes ``ray.init`` makes (measured with Ray 2.60), runs nothing."""

    def __init__(self, fail_init: bool = False, initialized: bool = False) -> None:
        self.fail_init = fail_init
        self.initialized = initialized
        self.inits = self.shutdowns = 0

    def is_initialized(self) -> bool:
        return self.initialized

    def init(self, **kwargs: Any) -> None:
        self.inits += 1
        signal.signal(signal.SIGTERM, _rays_sigterm)
        os.environ["PYTHONBREAKPOINT"] = "ray.util.rpdb._driver_set_trace"
        os.environ.setdefault("RAY_AUTH_MODE", "token")
        if not faulthandler.is_enabled():
            faulthandler.enable()
        logging.getLogger("ray").setLevel(kwargs["logging_level"])
        if self.fail_init:
            raise RuntimeError("object store: not enough memory")
        self.initialized = True

    def shutdown(self) -> None:
        self.shutdowns += 1
        self.initialized = False


def _mine(signum: int, frame: FrameType | None) -> None:
    pass


@pytest.fixture
def fake_ray(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeRay]:
    """The stand-in as the cohort's Ray; faulthandler a flag (pytest keeps the real one on);
    signal handlers and the variables Ray sets put back after the test."""
    fake = FakeRay()
    monkeypatch.setattr(ray_backend, "_import_ray", lambda: fake)
    flag = {"on": False}
    monkeypatch.setattr(faulthandler, "is_enabled", lambda: flag["on"])
    monkeypatch.setattr(faulthandler, "enable", lambda *a, **k: flag.update(on=True))
    monkeypatch.setattr(faulthandler, "disable", lambda: flag.update(on=False))
    for key in RAY_ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("PYTHONBREAKPOINT", "pdb.set_trace")
    ray_logger = logging.getLogger("ray")
    level = ray_logger.level
    handlers = {sig: signal.getsignal(sig) for sig in SIGNALS}
    try:
        yield fake
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        ray_logger.setLevel(level)


def _state() -> dict[str, Any]:
    return {
        "handlers": {sig: signal.getsignal(sig) for sig in SIGNALS},
        "env": {k: os.environ.get(k) for k in RAY_ENV},
        "faulthandler": faulthandler.is_enabled(),
        "ray_logger_level": logging.getLogger("ray").level,
    }


OPTIONS = CohortOptions(num_cpus=1, progress=False)


@pytest.mark.parametrize("ending", ["returns", "raises", "interrupted", "init fails"])
def test_library_caller_gets_its_handlers_and_environment_back(
    fake_ray: FakeRay, ending: str, tmp_path: Path
) -> None:
    for sig in SIGNALS:
        signal.signal(sig, _mine)
    fake_ray.fail_init = ending == "init fails"
    before = _state()
    expected = {
        "returns": None,
        "raises": RuntimeError,
        "interrupted": KeyboardInterrupt,
        "init fails": BackendError,
    }[ending]
    opts = CohortOptions(num_cpus=1, progress=False, ray_temp_dir=str(tmp_path / "ray"))
    with pytest.raises(expected) if expected else contextlib.nullcontext():
        with ray_backend._ray_session(opts, quiet=True):
            during = _state()
            assert during["handlers"][signal.SIGTERM] is _mine  # back at once, for the run
            assert during["env"]["PYTHONBREAKPOINT"] != "pdb.set_trace"  # Ray's, for the run
            assert during["env"]["RAY_USAGE_STATS_ENABLED"] == "0"
            assert during["faulthandler"]
            if ending == "raises":
                raise RuntimeError("a bug in the run")
            if ending == "interrupted":
                raise KeyboardInterrupt
    assert _state() == before
    assert fake_ray.shutdowns == (0 if ending == "init fails" else 1)


def test_default_sigterm_keeps_rays_exit_handler_for_the_run_only(fake_ray: FakeRay) -> None:
    """With no handler of the caller's, Ray's ``sys.exit`` handler stays during the run (SIGTERM
    unwinds through the shutdown), and SIG_DFL is back afterwards."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    with pytest.raises(SystemExit) as info:
        with ray_backend._ray_session(OPTIONS, quiet=True):
            assert signal.getsignal(signal.SIGTERM) is _rays_sigterm
            signal.raise_signal(signal.SIGTERM)
    assert info.value.code == signal.SIGTERM
    assert fake_ray.shutdowns == 1
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    assert os.environ["PYTHONBREAKPOINT"] == "pdb.set_trace"


def test_cli_handler_is_back_for_the_run_and_not_rearmed_while_unwinding(
    fake_ray: FakeRay,
) -> None:
    """Under the CLI's ``handle_sigterm`` the run gets fastinsight's handler back (SIGTERM
    unwinds into exit 143); the SIG_IGN it sets while unwinding is not replaced by the
    restore, and the handler before the CLI block is back at its end."""
    signal.signal(signal.SIGTERM, _mine)
    with pytest.raises(Terminated):
        with handle_sigterm():
            try:
                with ray_backend._ray_session(OPTIONS, quiet=True):
                    assert signal.getsignal(signal.SIGTERM) is _raise_terminated
                    signal.raise_signal(signal.SIGTERM)
            finally:
                assert fake_ray.shutdowns == 1
                assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN  # still unwinding
                assert os.environ["PYTHONBREAKPOINT"] == "pdb.set_trace"
    assert signal.getsignal(signal.SIGTERM) is _mine


def test_a_session_opened_by_the_caller_is_left_alone(fake_ray: FakeRay) -> None:
    fake_ray.initialized = True
    signal.signal(signal.SIGTERM, _rays_sigterm)  # the caller's own ray.init set it
    os.environ["PYTHONBREAKPOINT"] = "ray.util.rpdb._driver_set_trace"
    with ray_backend._ray_session(OPTIONS, quiet=True) as session:
        assert not session.owned
    assert (fake_ray.inits, fake_ray.shutdowns) == (0, 0)
    assert signal.getsignal(signal.SIGTERM) is _rays_sigterm
    assert os.environ["PYTHONBREAKPOINT"] == "ray.util.rpdb._driver_set_trace"
