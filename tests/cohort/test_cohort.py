"""``fastinsight predict-cohort`` on a local Ray instance, on CPU (issue 7).

One Ray session is shared by the whole module (starting Ray takes ~15 s on 2 cores). The cohort:
two synthetic slides, a copy of one under another name whose first attempt kills its worker
(injected from the outside by a Ray worker setup hook, ``tests/support/cohort_faults.py``), a
text file named ``.svs``, a truncated TIFF and, when ``../shared/data/slides`` is present, the
OME-TIFF slide and a copy of it, the TCGA slide with its mpp from the manifest and again without
one, and the fluorescence NDPI.
"""

from __future__ import annotations

import csv
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

ray = pytest.importorskip(
    "ray", reason="predict-cohort needs Ray: pip install 'fastinsight[cohort]'"
)

from fastinsight import cohort  # noqa: E402
from fastinsight.cli.cohort import options_from_args  # noqa: E402
from fastinsight.cli.main import build_parser, error_message  # noqa: E402
from fastinsight.cohort import (  # noqa: E402
    EXIT_SLIDES_FAILED,
    CohortOptions,
    CohortReport,
    CohortSlide,
    SlideJob,
    check_complete,
    discover_slides,
    options_hash,
    predict_cohort,
    read_summary,
)
from fastinsight.errors import ConfigError, InputError  # noqa: E402
from fastinsight.models.checkpoints import load_model, model_identity  # noqa: E402
from fastinsight.models.config import InsightConfig  # noqa: E402
from fastinsight.models.insight import InsightModel  # noqa: E402
from fastinsight.predict.slide import PredictOptions, predict_slide  # noqa: E402
from fastinsight.synthetic import make_cohort  # noqa: E402
from tests.support import cohort_faults  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("FASTINSIGHT_TEST_SLIDES", REPO.parent / "shared" / "data" / "slides"))
OME, TCGA, NDPI = "OS-1-detail.ome.tif", "tcga-cr-7395-01a-01-ts1.svs", "test3-DAPI-2-387.ndpi"
HAVE_SHARED = all((SHARED / n).is_file() for n in (OME, TCGA, NDPI))
needs_shared = pytest.mark.skipif(
    not HAVE_SHARED, reason=f"shared test slides not found at {SHARED}"
)

GOOD = ["synthetic-000", "synthetic-001", "crashme"] + (
    ["OS-1-detail", "os1-copy", "tcga-mpp"] if HAVE_SHARED else []
)
FAILED = {"notaslide": "cannot read slide", "truncated": "truncated"}
if HAVE_SHARED:
    FAILED |= {"tcga-nompp": "no mpp", "DAPI": "no tissue found"}
OUTPUTS = {"heatmap.tif", "overlay.png", "scores.npz", "report.json", "complete.json"}
OPTIONS = CohortOptions(progress=False, max_retries=2)


@dataclass(frozen=True)
class Env:
    root: Path
    model_a: Path
    model_b: Path
    manifest: Path
    crash_dir: Path
    paths: dict[str, Path]


def _write_manifest(path: Path, rows: list[tuple[str, str, str]]) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "slide_id", "mpp", "label"])
        w.writerows([p, sid, mpp, "0"] for p, sid, mpp in rows)
    return path


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Env:
    root = tmp_path_factory.mktemp("cohort")
    torch.manual_seed(0)
    model_a = root / "model-a.safetensors"
    InsightModel(InsightConfig(in_dim=64, encoder="vit-tiny"), backend="reference").save(
        str(model_a)
    )
    torch.manual_seed(1)
    model_b = root / "model-b.safetensors"
    InsightModel(InsightConfig(in_dim=64, encoder="vit-tiny"), backend="reference").save(
        str(model_b)
    )

    syn = make_cohort(root / "syn", 2, size_px=(448, 448))
    inputs = root / "inputs"
    inputs.mkdir()
    paths = {s.slide_id: s.path for s in syn}
    paths["crashme"] = Path(shutil.copy(syn[0].path, inputs / "crashme.tif"))
    paths["crashfatal"] = Path(shutil.copy(syn[1].path, inputs / "crashfatal.tif"))
    paths["notaslide"] = inputs / "notaslide.svs"
    paths["notaslide"].write_text("this is a text file, not a slide\n")
    paths["truncated"] = inputs / "truncated.tif"
    data = syn[0].path.read_bytes()
    paths["truncated"].write_bytes(data[: len(data) // 3])
    rows = [
        (str(paths["synthetic-000"]), "", ""),
        ("syn/slides/synthetic-001.tif", "", ""),  # relative to the manifest's folder
        (str(paths["crashme"]), "", ""),
        ("inputs/notaslide.svs", "", ""),
        (str(paths["truncated"]), "", ""),
    ]
    if HAVE_SHARED:
        paths["OS-1-detail"] = SHARED / OME
        paths["os1-copy"] = Path(shutil.copy(SHARED / OME, inputs / "os1-copy.ome.tif"))
        paths["tcga-mpp"] = paths["tcga-nompp"] = SHARED / TCGA
        paths["DAPI"] = SHARED / NDPI
        rows += [
            (str(SHARED / OME), "", ""),
            (str(paths["os1-copy"]), "", ""),
            (str(SHARED / TCGA), "tcga-mpp", "0.1"),  # the file has no mpp; the manifest gives one
            (str(SHARED / TCGA), "tcga-nompp", ""),
            (str(SHARED / NDPI), "DAPI", ""),
        ]
    crash_dir = root / "crash"
    crash_dir.mkdir()
    manifest = _write_manifest(root / "manifest.csv", rows)
    return Env(root, model_a, model_b, manifest, crash_dir, paths)


def _ray_pids(marker: str) -> set[int]:
    """Processes whose command line mentions ``marker`` (a Ray temp dir)."""
    pids = set()
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if marker in (proc / "cmdline").read_bytes().decode(errors="replace"):
                    pids.add(int(proc.name))
            except OSError:
                continue
    return pids


def _wait_gone(marker: str, timeout: float = 20.0) -> set[int]:
    deadline = time.monotonic() + timeout
    while (left := _ray_pids(marker)) and time.monotonic() < deadline:
        time.sleep(0.25)
    return left


@pytest.fixture(scope="module")
def ray_session(env: Env) -> Iterator[None]:
    """One local Ray for the module; its workers run a setup hook that makes the first attempt
    at 'crashme' (and every attempt at 'crashfatal', which runs with no retries) die."""
    saved = {k: os.environ.get(k) for k in ("RAY_USAGE_STATS_ENABLED",)}
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    temp_dir = tempfile.mkdtemp(prefix="fi-ray-t-")  # short: Ray's socket paths live under it
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=256 << 20,
        log_to_driver=False,
        _temp_dir=temp_dir,
        runtime_env=cohort_faults.runtime_env(["crashme", "crashfatal"], env.crash_dir),
    )
    try:
        assert _ray_pids(temp_dir), "the Ray processes should name their temp dir"
        yield
    finally:
        ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        left = _wait_gone(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not left, f"Ray processes left after shutdown: {sorted(left)}"


@pytest.fixture(scope="module")
def first_run(env: Env, ray_session: None) -> CohortReport:
    return predict_cohort(env.manifest, env.model_a, env.root / "out", OPTIONS)


def _copy_out(first_run: CohortReport, dest: Path) -> Path:
    shutil.copytree(first_run.out_dir, dest, copy_function=shutil.copy2)
    return dest


def _good_manifest(env: Env, name: str, ids: list[str]) -> Path:
    rows = [(str(env.paths[i]), i, "0.1" if i == "tcga-mpp" else "") for i in ids]
    return _write_manifest(env.root / name, rows)


# ---------------------------------------------------------------------------------------------
# Slide lists (no Ray)
# ---------------------------------------------------------------------------------------------


def test_discover_folder_glob_file_and_manifest(tmp_path: Path) -> None:
    for name in ("a.svs", "b.ome.tif", "c.NDPI", "notes.txt", ".hidden.svs", "labels.csv"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "d.svs").write_bytes(b"x")
    folder = discover_slides(tmp_path)
    assert [s.slide_id for s in folder] == ["a", "b", "c"]  # by ending, not hidden, not recursive
    assert all(s.path.is_absolute() and s.mpp is None for s in folder)
    assert [s.slide_id for s in discover_slides(str(tmp_path / "**" / "*.svs"))] == ["a", "d"]
    assert [s.slide_id for s in discover_slides(tmp_path / "a.svs")] == ["a"]

    manifest = tmp_path / "m.csv"
    manifest.write_text(
        "\ufeffPath,Slide_ID,mpp,label\na.svs,case-1,0.25,1\n\nsub/d.svs,,,0\n/abs/e.tif,,0.5,0\n"
    )
    got = discover_slides(manifest)
    assert [(s.slide_id, s.mpp) for s in got] == [("case-1", 0.25), ("d", None), ("e", 0.5)]
    assert got[0].path == tmp_path / "a.svs" and got[2].path == Path("/abs/e.tif")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("slide_id\nx\n", "no path column"),
        ("path,mpp\na.svs,fast\n", "not a number"),
        ("path,mpp\na.svs,-1\n", "positive"),
        ("path,slide_id\na.svs,x\nb.svs,X\n", "two slides get the id"),
        ("path,slide_id\na.svs,../up\n", "cannot name an output folder"),
        ("path,slide_id\na.svs,.hidden\n", "cannot name an output folder"),
        ("path\n", "lists no slides"),
    ],
    ids=[
        "no-path-column",
        "mpp-not-number",
        "mpp-negative",
        "duplicate-id",
        "id-with-slash",
        "id-hidden",
        "empty",
    ],
)
def test_bad_manifests_are_input_errors(tmp_path: Path, text: str, message: str) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text(text)
    with pytest.raises(InputError, match=message) as info:
        discover_slides(manifest)
    assert "\n" not in str(info.value)


def test_missing_slides_are_input_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="matches no file"):
        discover_slides(str(tmp_path / "*.svs"))
    with pytest.raises(InputError, match="no slide files"):
        discover_slides(tmp_path)
    with pytest.raises(InputError, match="neither a folder"):
        discover_slides(tmp_path / "nothing-here")


# ---------------------------------------------------------------------------------------------
# The cohort
# ---------------------------------------------------------------------------------------------


def test_good_slides_succeed_and_bad_ones_are_recorded(env: Env, first_run: CohortReport) -> None:
    status = {o.slide_id: o.status for o in first_run.outcomes}
    assert status == {**dict.fromkeys(GOOD, "ok"), **dict.fromkeys(FAILED, "failed")}
    assert first_run.exit_code == EXIT_SLIDES_FAILED
    out = first_run.out_dir
    for sid in GOOD:
        assert {p.name for p in (out / sid).iterdir()} == OUTPUTS
        report = json.loads((out / sid / "report.json").read_text())
        assert report["slide_id"] == sid
        assert report["model"]["sha256"] == model_identity(env.model_a)["sha256"]
    rows = {r["slide_id"]: r for r in read_summary(out / "summary.csv")}
    assert list(rows) == [o.slide_id for o in first_run.outcomes]  # manifest order
    for sid, fragment in FAILED.items():
        assert not (out / sid).exists()
        assert rows[sid]["status"] == "failed"
        assert fragment in rows[sid]["error"], rows[sid]["error"]
        assert rows[sid]["score_class0"] == ""
    for sid in GOOD:
        assert rows[sid]["error"] == "" and int(rows[sid]["n_tiles"]) > 0
        assert float(rows[sid]["tiles_per_s"]) > 0 and float(rows[sid]["seconds"]) > 0
    # nothing half-written: no .partial / .old folders, no temp files
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == [
        ".predict-cohort.lock"
    ]


def test_killed_worker_is_retried_and_completes(env: Env, first_run: CohortReport) -> None:
    assert (env.crash_dir / "crashme.crashed").is_file(), "the first attempt should have died"
    # ... after its outputs were written, before the completion marker
    left = set((env.crash_dir / "crashme.crashed").read_text().split())
    assert left == OUTPUTS - {"complete.json"}, left
    byid = first_run.by_id()
    assert byid["crashme"].status == "ok"
    # crashme is a byte copy of synthetic-000: the retried slide gives the very same result
    assert byid["crashme"].scores == byid["synthetic-000"].scores
    a = np.load(first_run.out_dir / "crashme" / "scores.npz")["scores"]
    b = np.load(first_run.out_dir / "synthetic-000" / "scores.npz")["scores"]
    np.testing.assert_array_equal(a, b)


def test_worker_dying_every_time_fails_cleanly(env: Env, ray_session: None, tmp_path: Path) -> None:
    slides = [CohortSlide("crashfatal", env.paths["crashfatal"])]
    opts = CohortOptions(progress=False, max_retries=0)
    report = predict_cohort(slides, env.model_a, tmp_path / "out", opts)
    (outcome,) = report.outcomes
    assert outcome.status == "failed" and "worker died" in outcome.error, outcome.error
    assert report.exit_code == EXIT_SLIDES_FAILED
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        ".predict-cohort.lock",
        "summary.csv",
    ]


def test_results_equal_single_slide_predict(env: Env, first_run: CohortReport) -> None:
    model = load_model(env.model_a, backend="reference", device="cpu")
    byid = first_run.by_id()
    rows = {r["slide_id"]: r for r in read_summary(first_run.summary_path)}
    ids = ["synthetic-000", "synthetic-001"] + (["OS-1-detail"] if HAVE_SHARED else [])
    for sid in ids:
        ref = predict_slide(env.paths[sid], model, options=PredictOptions(progress=False))
        np.testing.assert_allclose(byid[sid].scores, ref.scores, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(float(rows[sid]["score_class0"]), ref.scores[0], rtol=1e-6)
        report = json.loads((first_run.out_dir / sid / "report.json").read_text())
        np.testing.assert_allclose(report["scores"]["class0"], ref.scores[0], rtol=1e-6)
        cells = np.load(first_run.out_dir / sid / "scores.npz")["scores"]
        np.testing.assert_allclose(cells, ref.cells, rtol=1e-5, atol=1e-6, equal_nan=True)
        assert byid[sid].n_tiles == ref.n_tiles


def test_task_rebuilds_the_model_from_the_object_store_only(
    env: Env, first_run: CohortReport, tmp_path: Path
) -> None:
    """The task gets the weights through ray.put, never a checkpoint path (the plan has none)."""
    model = load_model(env.model_a, backend="reference", device="cpu")
    ref = ray.put(cohort._model_payload(model, {"sha256": "in-memory"}, "reference"))
    slide = CohortSlide("synthetic-001", env.paths["synthetic-001"])
    job = SlideJob(slide, tmp_path, options_hash(OPTIONS, None, None))
    plan = cohort.TaskPlan(OPTIONS, device="cpu", torch_threads=1, model_sha256="in-memory")
    threads = torch.get_num_threads()
    try:
        outcome = cohort.run_slide([ref], job, plan)  # in this process, as a worker would
    finally:
        torch.set_num_threads(threads)
    assert outcome.status == "ok", outcome.error
    np.testing.assert_allclose(outcome.scores, first_run.by_id()["synthetic-001"].scores, rtol=1e-6)
    marker = json.loads((tmp_path / "synthetic-001" / "complete.json").read_text())
    assert marker["model_sha256"] == "in-memory"


def test_a_write_failing_in_the_task_leaves_nothing(
    env: Env, ray_session: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fault injected in this process (the writer fails after writing everything into the
    ``.partial`` folder): the slide is failed as internal, and no folder of it is left."""
    from fastinsight.predict.slide import SlideResult

    original = SlideResult.write_outputs

    def disk_full(self: SlideResult, outputs: object) -> list[Path]:
        written = original(self, outputs)  # type: ignore[arg-type]
        assert written and all(p.parent.name == ".synthetic-001.partial" for p in written)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(SlideResult, "write_outputs", disk_full)
    model = load_model(env.model_a, backend="reference", device="cpu")
    ref = ray.put(cohort._model_payload(model, {"sha256": "in-memory"}, "reference"))
    job = SlideJob(CohortSlide("synthetic-001", env.paths["synthetic-001"]), tmp_path, "h")
    plan = cohort.TaskPlan(OPTIONS, device="cpu", torch_threads=1, model_sha256="in-memory")
    threads = torch.get_num_threads()
    try:
        outcome = cohort.run_slide([ref], job, plan)
    finally:
        torch.set_num_threads(threads)
    assert outcome.status == "failed" and outcome.internal, outcome
    assert "OSError" in outcome.error and "No space left" in outcome.error
    assert list(tmp_path.iterdir()) == []


@needs_shared
def test_copy_and_manifest_mpp(first_run: CohortReport) -> None:
    byid = first_run.by_id()
    assert byid["os1-copy"].scores == byid["OS-1-detail"].scores
    report = json.loads((first_run.out_dir / "tcga-mpp" / "report.json").read_text())
    assert report["slide"]["mpp"] == pytest.approx(0.1)


def test_rerun_does_no_work(env: Env, first_run: CohortReport, tmp_path: Path) -> None:
    out = _copy_out(first_run, tmp_path / "out")
    before = {
        p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != "summary.csv"
    }
    good = _good_manifest(env, "good.csv", GOOD)
    report = predict_cohort(good, env.model_a, out, OPTIONS)
    assert report.submitted == 0 and report.exit_code == 0
    assert {o.status for o in report.outcomes} == {"skipped"}
    assert [o.scores for o in report.outcomes] == [first_run.by_id()[i].scores for i in GOOD]
    assert {p: p.stat().st_mtime_ns for p in before} == before
    rows = read_summary(out / "summary.csv")
    assert {r["status"] for r in rows} == {"skipped"} and all(r["score_class0"] for r in rows)

    # The same command again: complete slides are skipped, failed ones get another try.
    again = predict_cohort(env.manifest, env.model_a, out, OPTIONS)
    assert again.submitted == len(FAILED)
    assert {o.slide_id: o.status for o in again.outcomes} == {
        **dict.fromkeys(GOOD, "skipped"),
        **dict.fromkeys(FAILED, "failed"),
    }
    assert {p: p.stat().st_mtime_ns for p in before} == before


def test_rerun_with_another_model_redoes_the_slides(
    env: Env, first_run: CohortReport, tmp_path: Path
) -> None:
    out = _copy_out(first_run, tmp_path / "out")
    ids = ["synthetic-000", "synthetic-001"] + (["OS-1-detail"] if HAVE_SHARED else [])
    report = predict_cohort(_good_manifest(env, "b.csv", ids), env.model_b, out, OPTIONS)
    assert report.submitted == len(ids) and {o.status for o in report.outcomes} == {"ok"}
    sha_b = model_identity(env.model_b)["sha256"]
    for o in report.outcomes:
        marker = json.loads((out / o.slide_id / "complete.json").read_text())
        assert marker["model_sha256"] == sha_b
        assert o.scores != first_run.by_id()[o.slide_id].scores
    # ... and back with model A: redone again, giving model A's scores
    back = predict_cohort(_good_manifest(env, "a.csv", ids[:1]), env.model_a, out, OPTIONS)
    assert back.outcomes[0].status == "ok"
    assert back.outcomes[0].scores == first_run.by_id()[ids[0]].scores


def test_damaged_outputs_are_redone_and_stale_partials_removed(
    env: Env, first_run: CohortReport, tmp_path: Path
) -> None:
    out = _copy_out(first_run, tmp_path / "out")
    (out / "synthetic-001" / "overlay.png").unlink()
    (out / ".synthetic-000.partial").mkdir()
    (out / ".synthetic-000.partial" / "heatmap.tif").write_bytes(b"half")
    (out / ".crashme.old-1234abcd").mkdir()
    report = predict_cohort(
        _good_manifest(env, "d.csv", ["synthetic-000", "synthetic-001"]), env.model_a, out, OPTIONS
    )
    assert [o.status for o in report.outcomes] == ["skipped", "ok"]
    assert report.submitted == 1
    assert {p.name for p in (out / "synthetic-001").iterdir()} == OUTPUTS
    assert (
        not (out / ".synthetic-000.partial").exists()
        and not (out / ".crashme.old-1234abcd").exists()
    )


def test_check_complete_checks_marker_content_and_files(
    env: Env, first_run: CohortReport, tmp_path: Path
) -> None:
    sha = model_identity(env.model_a)["sha256"]
    slide = CohortSlide("synthetic-000", env.paths["synthetic-000"])
    job = SlideJob(slide, tmp_path, options_hash(OPTIONS, None, None))

    def fresh() -> Path:
        d = tmp_path / "synthetic-000"
        shutil.rmtree(d, ignore_errors=True)
        shutil.copytree(first_run.out_dir / "synthetic-000", d)
        return d

    d = fresh()
    marker, reason = check_complete(d, job, sha)
    assert marker is not None and reason == ""
    assert check_complete(d, job, "0" * 64)[1] == "made by another model"
    other = SlideJob(slide, tmp_path, options_hash(CohortOptions(encoding="rgb"), None, None))
    assert check_complete(d, other, sha)[1] == "made with other settings"
    moved = SlideJob(
        CohortSlide("synthetic-000", env.paths["synthetic-001"]), tmp_path, job.options_hash
    )
    assert check_complete(d, moved, sha)[1] == "slide file changed"
    with open(d / "report.json", "a") as fh:
        fh.write(" ")
    assert "report.json has another size" in check_complete(d, job, sha)[1]
    d = fresh()
    data = bytearray((d / "heatmap.tif").read_bytes())
    data[-1] ^= 0xFF
    (d / "heatmap.tif").write_bytes(bytes(data))
    assert "heatmap.tif has another sha256" in check_complete(d, job, sha)[1]
    d = fresh()
    (d / "scores.npz").unlink()
    assert check_complete(d, job, sha)[1] == "missing output scores.npz"
    d = fresh()
    (d / "complete.json").write_text("{not json")
    assert check_complete(d, job, sha)[1] == "unreadable completion marker"
    (d / "complete.json").unlink()
    assert check_complete(d, job, sha)[1] == "no completion marker"


# ---------------------------------------------------------------------------------------------
# The command line, with its own local Ray instance
# ---------------------------------------------------------------------------------------------


def test_cli_starts_and_stops_its_own_local_ray(env: Env, ray_session: None) -> None:
    base = Path(tempfile.mkdtemp(prefix="fi-t-"))  # short: the CLI's Ray temp dir goes inside
    try:
        slides = base / "slides"
        slides.mkdir()
        shutil.copy(env.paths["synthetic-001"], slides / "good.tif")
        (slides / "broken.svs").write_text("not a slide\n")
        proc_env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        proc_env["TMPDIR"] = str(base)
        cmd = [sys.executable, "-m", "fastinsight.cli", "predict-cohort"]
        common = [
            "--model",
            str(env.model_a),
            "--out-dir",
            str(base / "out"),
            "--num-cpus",
            "1",
            "-q",
        ]
        res = subprocess.run(
            [*cmd, str(slides), *common], env=proc_env, capture_output=True, text=True, timeout=240
        )
        assert res.returncode == EXIT_SLIDES_FAILED, res.stderr
        assert "cohort: 1 ok, 1 failed, 0 skipped of 2 slides" in res.stdout
        assert "fastinsight: broken failed: cannot read slide" in res.stderr
        assert {r["slide_id"]: r["status"] for r in read_summary(base / "out" / "summary.csv")} == {
            "broken": "failed",
            "good": "ok",
        }
        assert not _wait_gone(str(base)), "the CLI's Ray processes outlived it"
        assert not list(base.glob("fi-ray-*")), "the local Ray temp dir should be removed"

        # Only the good slide, same model: nothing to do, Ray is not even started; exit 0.
        res = subprocess.run(
            [*cmd, str(slides / "*.tif"), *common],
            env=proc_env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert res.returncode == 0, res.stderr
        assert "cohort: 0 ok, 0 failed, 1 skipped of 1 slides" in res.stdout
        assert not list(base.glob("fi-ray-*"))
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _finished(out: Path) -> set[str]:
    """The slide folders of ``out`` (finished outputs: ``.partial`` folders are hidden)."""
    return {p.name for p in out.iterdir() if not p.name.startswith(".") and p.is_dir()}


def test_sigterm_mid_cohort_keeps_finished_slides_and_the_rerun_completes(
    env: Env, ray_session: None, capsys: pytest.CaptureFixture[str]
) -> None:
    """SIGTERM to a real ``predict-cohort`` (its own local Ray, one slide at a time) once the
    first slide is done: exit 143 with a message, Ray gone, every slide folder complete, the
    others pending; the same command then skips the finished slides and does the rest."""
    base = Path(tempfile.mkdtemp(prefix="fi-t-"))  # short: the CLI's Ray temp dir goes inside
    try:
        slides, out = base / "slides", base / "out"
        slides.mkdir()
        names = [f"s{i}" for i in range(4)]
        for i, name in enumerate(names):
            shutil.copy(env.paths[f"synthetic-00{i % 2}"], slides / f"{name}.tif")
        argv = ["predict-cohort", str(slides), "--model", str(env.model_a), "--out-dir", str(out)]
        argv += ["--num-cpus", "1", "-q"]
        proc_env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        proc_env["TMPDIR"] = str(base)
        proc = subprocess.Popen(
            [sys.executable, "-m", "fastinsight.cli", *argv],
            env=proc_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            deadline = time.monotonic() + 180
            while not list(out.glob("*/complete.json")) and proc.poll() is None:
                assert time.monotonic() < deadline, "no slide finished in 180 s"
                time.sleep(0.05)
            assert proc.poll() is None, proc.communicate()
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 143, err
        assert "shutting Ray down" in err and "Traceback" not in err, err
        assert err.strip().splitlines()[-1].startswith("fastinsight: terminated (SIGTERM)")
        assert not _wait_gone(str(base)), "the CLI's Ray processes outlived it"
        assert not list(base.glob("fi-ray-*")), "the local Ray temp dir should be removed"

        # No half-written output: every slide folder is complete; the rest are pending.
        done = _finished(out)
        assert done and done < set(names), done
        opts = options_from_args(build_parser(argv).parse_args(argv))
        sha = model_identity(env.model_a)["sha256"]
        for sid in done:
            job = SlideJob(
                CohortSlide(sid, slides / f"{sid}.tif"), out, options_hash(opts, None, None)
            )
            assert check_complete(out / sid, job, sha)[1] == "", sid
            assert {p.name for p in (out / sid).iterdir()} == OUTPUTS
        # summary.csv: what the driver had collected ('ok'), the rest 'pending' (a slide may
        # have finished after the driver last looked: its folder is complete all the same)
        rows = {r["slide_id"]: r["status"] for r in read_summary(out / "summary.csv")}
        assert set(rows) == set(names) and set(rows.values()) <= {"ok", "pending"}, rows
        assert {n for n, status in rows.items() if status == "ok"} <= done, rows
        assert all(rows[n] == "pending" for n in set(names) - done), rows
        stray = {p.name for p in out.iterdir() if p.name.startswith(".")}
        assert all(n == ".predict-cohort.lock" or n.endswith(".partial") for n in stray), stray
        before = {p: p.stat().st_mtime_ns for sid in done for p in (out / sid).iterdir()}

        # The same command again (in this process, on the module's Ray): it resumes.
        args = build_parser(argv).parse_args(argv)
        assert args._run(args) == 0
        assert (
            f"{len(names) - len(done)} ok, 0 failed, {len(done)} skipped" in capsys.readouterr().out
        )
        rows = {r["slide_id"]: r["status"] for r in read_summary(out / "summary.csv")}
        assert rows == {n: "skipped" if n in done else "ok" for n in names}
        assert _finished(out) == set(names)
        assert {p: p.stat().st_mtime_ns for p in before} == before  # finished slides untouched
        assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == [
            ".predict-cohort.lock"
        ]
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_cohort_options_are_checked() -> None:
    # the library names its fields; the CLI shows them as its flags
    with pytest.raises(ConfigError, match="cpus_per_slide") as err:
        CohortOptions(cpus_per_slide=0)
    assert error_message(err.value).startswith("--cpus-per-slide must be > 0")
    with pytest.raises(ConfigError, match="max_retries") as err:
        CohortOptions(max_retries=-1)
    assert "--max-retries" in error_message(err.value)
    assert cohort.EXIT_SLIDES_FAILED not in range(2, 8)  # distinct from FastInsightError codes
