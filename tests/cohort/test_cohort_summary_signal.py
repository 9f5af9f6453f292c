"""summary.csv after an interruption (deployment audit D9): a slide whose task finished while the
driver was stopping (outputs and complete.json in place, never collected) is ``ok`` in the
summary, not ``pending``. Ray itself is not started: the run is stood in for by a function that
finishes one slide as a worker would, then is terminated."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("ray", reason="predict-cohort needs Ray: pip install 'fastinsight[cohort]'")

from fastinsight.cohort import api, predict_cohort, read_summary  # noqa: E402
from fastinsight.cohort.layout import SUMMARY_NAME, partial_dir, slide_dir  # noqa: E402
from fastinsight.cohort.options import CohortOptions  # noqa: E402
from fastinsight.cohort.slides import CohortSlide  # noqa: E402
from fastinsight.cohort.state import (  # noqa: E402
    SlideJob,
    _install,
    slide_fingerprint,
    write_marker,
)
from fastinsight.cohort.summary import SlideOutcome  # noqa: E402
from fastinsight.models.config import InsightConfig  # noqa: E402
from fastinsight.models.insight import InsightModel  # noqa: E402
from fastinsight.signals import Terminated  # noqa: E402


def _finish_like_a_worker(job: SlideJob, model_sha256: str) -> None:
    """What ``run_slide`` leaves when it completes: outputs, complete.json, the folder renamed."""
    sid = job.slide.slide_id
    out_dir = job.out_dir
    partial = partial_dir(out_dir, sid)
    partial.mkdir()
    scores = partial / "scores.npz"
    scores.write_bytes(b"finished outputs")
    outcome = SlideOutcome(
        sid,
        "ok",
        str(job.slide.path),
        scores=(0.25,),
        n_tiles=3,
        tiles_per_s=30.0,
    )
    write_marker(
        partial,
        job,
        model_sha256,
        slide_fingerprint(job.slide.path),
        [scores],
        outcome.as_json(),
    )
    _install(partial, slide_dir(out_dir, sid))


def test_a_slide_finished_during_sigterm_is_not_pending(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    model_path = tmp_path / "model.safetensors"
    InsightModel(InsightConfig(in_dim=64, encoder="vit-tiny"), backend="reference").save(
        str(model_path)
    )
    slides = []
    for name in ("a", "b", "c"):
        path = tmp_path / f"{name}.tif"
        path.write_bytes(name.encode() * 100)  # the fingerprint reads the bytes only
        slides.append(CohortSlide(name, path))

    def terminated_run(todo, model, info, opts, outcomes, flush):  # noqa: ANN001, ANN202
        # Slide "b" completes in its worker; the driver is terminated before it collects it
        # (as _run_jobs does, the summary is flushed on the way out).
        job = next(j for j in todo if j.slide.slide_id == "b")
        _finish_like_a_worker(job, str(info["sha256"]))
        try:
            raise Terminated("terminated by signal 15")
        finally:
            flush()

    monkeypatch.setattr(api, "_run_jobs", terminated_run)
    out = tmp_path / "out"
    with pytest.raises(Terminated):
        predict_cohort(slides, model_path, out, CohortOptions(progress=False))
    rows = {r["slide_id"]: r for r in read_summary(out / SUMMARY_NAME)}
    assert rows["b"]["status"] == "ok", rows["b"]
    (score,) = [v for k, v in rows["b"].items() if k.startswith("score_")]
    assert float(score) == 0.25
    assert rows["b"]["n_tiles"] == "3"
    assert rows["a"]["status"] == rows["c"]["status"] == "pending"
