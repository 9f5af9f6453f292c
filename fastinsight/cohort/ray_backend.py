"""The Ray back end: a session (an existing connection, a cluster, or a local instance started and
stopped here), one task per slide, outcomes collected as they finish.

A task asks for one GPU when the cluster has GPUs (so N GPUs run N slides at a time) and for CPU
slots otherwise. The model's weights go into the object store once. A worker process that dies
mid-slide (killed, out of memory, node lost) is a system failure: Ray retries the task up to
``max_retries`` times, then the slide is recorded as failed. Ray is imported here only, when a
cohort has slides to run (it is an optional dependency: ``fastinsight[cohort]``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from fastinsight.cohort.options import CohortOptions
from fastinsight.cohort.process_state import ray_process_state_kept
from fastinsight.cohort.state import SlideJob, remove_partials
from fastinsight.cohort.summary import SlideOutcome, _one_line
from fastinsight.cohort.task import TaskPlan, _model_payload, run_slide
from fastinsight.errors import BackendError

_MIB = 1 << 20


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise BackendError(
            "predict-cohort needs Ray, which is not installed; pip install 'fastinsight[cohort]'"
        ) from None
    return ray


@dataclass
class _RaySession:
    """The Ray module in use and, for a local instance, its session folder (runtime state)."""

    ray: Any
    temp_dir: str | None = None
    keep_logs: bool = False  # a worker died or hit a bug: keep the local logs for a post-mortem
    owned: bool = True  # connected (or started) here, and shut down on the way out


def _init_ray(ray: Any, options: CohortOptions, quiet: bool) -> tuple[str | None, str | None]:
    """Connect to ``--ray-address`` / ``$RAY_ADDRESS`` or start a local instance. Returns the
    local instance's temp folder and, when this call made it, the same path (to remove)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no phoning home from a hospital
    address = options.ray_address or os.environ.get("RAY_ADDRESS") or None
    common: dict[str, Any] = {
        "log_to_driver": False,  # worker chatter would break the progress bar; logs stay on disk
        "configure_logging": True,
        "logging_level": logging.ERROR if quiet else logging.WARNING,
    }
    if address:
        try:
            ray.init(address=address, **common)
        except Exception as exc:
            raise BackendError(
                f"cannot start or reach the Ray cluster at {address!r} ({_one_line(str(exc))}); "
                "check `ray status` on the head node and that this machine can reach it"
            ) from exc
        return None, None
    # Short path: Ray's sockets live under it and Unix socket paths are limited to 107 bytes.
    temp_dir = os.path.abspath(options.ray_temp_dir or tempfile.mkdtemp(prefix="fi-ray-"))
    made_temp = None if options.ray_temp_dir else temp_dir
    try:
        # Light on a laptop: no dashboard, a small object store (it only carries the head's
        # weights and small results), logs in the temp folder.
        ray.init(
            address="local",
            num_cpus=options.num_cpus or os.cpu_count() or 1,
            include_dashboard=False,
            object_store_memory=256 * _MIB,
            _temp_dir=temp_dir,
            **common,
        )
    except Exception as exc:
        if made_temp:
            shutil.rmtree(made_temp, ignore_errors=True)
        raise BackendError(
            f"cannot start or reach a local Ray instance ({_one_line(str(exc))}); check free "
            "memory and /dev/shm, or pass --ray-address of a running cluster"
        ) from exc
    return temp_dir, made_temp


@contextlib.contextmanager
def _ray_session(options: CohortOptions, quiet: bool) -> Iterator[_RaySession]:
    """An existing connection when this process already has one (it stays open, and nothing of
    the process is touched), else ``--ray-address`` / ``$RAY_ADDRESS``, else a new local
    instance; what is started here is shut down on the way out, and a local instance's temp
    folder removed (kept if ``keep_logs``).

    The process state ``ray.init`` changes (SIGTERM handler, ``PYTHONBREAKPOINT`` and ``RAY_*``
    variables, faulthandler, the ``ray`` logger; see :mod:`fastinsight.cohort.process_state`) is
    recorded before it and put back after ``ray.shutdown``, also when the run fails or is
    interrupted. The caller's signal handlers come back as soon as ``ray.init`` returns: the
    CLI's, so SIGTERM unwinds through the ``finally`` below and exits 143; a library caller's."""
    ray = _import_ray()
    if ray.is_initialized():
        yield _RaySession(ray, owned=False)
        return
    with ray_process_state_kept() as state:  # restored last, after the shutdown below
        temp_dir, made_temp = _init_ray(ray, options, quiet)
        state.reclaim_signals()  # ray.init made SIGTERM exit(15) at once
        session = _RaySession(ray, temp_dir)
        try:
            yield session
        except KeyboardInterrupt:
            print(
                "fastinsight: stopping: shutting Ray down (finished slides are kept; rerun the "
                "same command to resume)",
                file=sys.stderr,
            )
            raise
        finally:
            try:
                ray.shutdown()
            finally:
                if session.keep_logs and temp_dir:
                    print(
                        f"fastinsight: the Ray logs of the failed slides are in {temp_dir}",
                        file=sys.stderr,
                    )
                elif made_temp:
                    shutil.rmtree(made_temp, ignore_errors=True)


def _plan_resources(ray: Any, options: CohortOptions) -> tuple[float, float]:
    """``(num_cpus, num_gpus)`` per slide task, checked against what the cluster has."""
    resources = ray.cluster_resources()
    cluster_gpus = float(resources.get("GPU", 0.0))
    cluster_cpus = float(resources.get("CPU", 0.0))
    gpus = options.gpus_per_slide
    if gpus is None:
        gpus = 1.0 if cluster_gpus > 0 else 0.0
    if gpus > 0 and cluster_gpus <= 0:
        raise BackendError(
            f"--gpus-per-slide {gpus:g} but the Ray cluster has no GPU; pass --gpus-per-slide 0 "
            "to run on CPUs, or add GPU nodes"
        )
    if options.cpus_per_slide > cluster_cpus:
        raise BackendError(
            f"--cpus-per-slide {options.cpus_per_slide:g} but the Ray cluster has {cluster_cpus:g} "
            "CPUs; lower --cpus-per-slide"
        )
    return options.cpus_per_slide, gpus


class _Progress:
    """The progress bar (stderr, only on a terminal unless disabled) and its counters."""

    def __init__(self, total: int, skipped: int, enabled: bool) -> None:
        from tqdm import tqdm

        self.total, self.skipped = total, skipped
        self.ok = self.failed = self.tiles = 0
        self.start = time.perf_counter()
        self.bar = tqdm(
            total=total,
            initial=skipped,
            unit="slide",
            desc="cohort",
            disable=None if enabled else True,  # None: off when not a terminal
            dynamic_ncols=True,
            file=sys.stderr,
        )

    def restart_clock(self) -> None:
        """Count tiles/s from now: the cluster at work, not Ray's start-up."""
        self.start = time.perf_counter()

    @property
    def tiles_per_s(self) -> float:
        return self.tiles / max(time.perf_counter() - self.start, 1e-9)

    def show(self, refresh: bool = True) -> None:
        left = self.total - self.skipped - self.ok - self.failed
        self.bar.set_postfix_str(
            f"ok={self.ok} failed={self.failed} skipped={self.skipped} left={left} "
            f"{self.tiles_per_s:.1f} tiles/s",
            refresh=refresh,
        )

    def add(self, outcome: SlideOutcome) -> None:
        if outcome.status == "ok":
            self.ok += 1
            self.tiles += outcome.n_tiles
        else:
            self.failed += 1
        self.show(refresh=False)
        self.bar.update(1)


def _submit(
    ray: Any, todo: list[SlideJob], model: Any, info: dict[str, Any], opts: CohortOptions
) -> dict[Any, SlideJob]:
    """Put the model into the object store once and submit one task per slide."""
    num_cpus, num_gpus = _plan_resources(ray, opts)
    plan = TaskPlan(
        options=opts,
        device="cuda" if num_gpus > 0 else "cpu",
        torch_threads=max(1, int(num_cpus)),
        model_sha256=str(info["sha256"]),
    )
    model_ref = ray.put(_model_payload(model, info, opts.backend))
    task = ray.remote(
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        max_retries=opts.max_retries,  # worker or node died: retry
        retry_exceptions=False,  # a bad slide fails the same way twice: never retry
    )(run_slide)
    return {
        task.options(name=f"slide {job.slide.slide_id}").remote([model_ref], job, plan): job
        for job in todo
    }


def _run_jobs(
    todo: list[SlideJob],
    model: Any,
    info: dict[str, Any],
    opts: CohortOptions,
    outcomes: dict[str, SlideOutcome],
    flush: Callable[[], None],
) -> float:
    """Submit one task per slide, collect outcomes as they finish (``outcomes`` is updated and
    ``flush`` called after each); returns tiles/s overall. Interrupted (Ctrl-C, SIGTERM), Ray
    is shut down (see :func:`_cancel` for a connection opened before) and the slides not
    collected stay ``pending``."""
    progress = _Progress(len(outcomes), len(outcomes) - len(todo), opts.progress)
    progress.show()
    try:
        with _ray_session(opts, quiet=not opts.progress) as session:
            ray = session.ray
            pending = _submit(ray, todo, model, info, opts)
            progress.restart_clock()
            try:
                while pending:
                    done, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
                    for ref in done:
                        job = pending.pop(ref)
                        outcome = _collect(ray, ref, job, opts.max_retries)
                        session.keep_logs |= outcome.internal
                        outcomes[job.slide.slide_id] = outcome
                        progress.add(outcome)
                        flush()
                    progress.show()
            finally:
                if pending and not session.owned:
                    _cancel(ray, pending)
    finally:
        progress.bar.close()
        flush()  # a killed task's .partial folder stays: the next start removes it
    return progress.tiles_per_s


def _cancel(ray: Any, pending: dict[Any, SlideJob]) -> None:
    """Interrupted on a connection that stays open: stop the tasks not collected (their slides
    stay ``pending``). Not forced: a running task gets a KeyboardInterrupt and its ``.partial``
    folder is removed at the next start. A session opened here is not cancelled task by task:
    ``ray.shutdown`` stops its work (force-cancelling tasks that are finishing while the driver
    shuts down can abort Ray's core worker, and the process would not exit 143)."""
    for ref in pending:
        with contextlib.suppress(Exception):
            ray.cancel(ref, force=False)


def _collect(ray: Any, ref: Any, job: SlideJob, max_retries: int) -> SlideOutcome:
    """The task's outcome; a task Ray gave up on (the worker died every time) becomes failed."""
    sid, path = job.slide.slide_id, str(job.slide.path)
    try:
        outcome = ray.get(ref)
    except ray.exceptions.RayError as exc:
        remove_partials(job.out_dir, [sid])
        text = str(exc).strip()
        first = _one_line(text.splitlines()[0] if text else "")[:300]
        if isinstance(exc, ray.exceptions.RayTaskError):  # raised outside run_slide's guard
            return SlideOutcome(
                sid,
                "failed",
                path,
                error=f"task error ({type(exc).__name__}: {first})",
                internal=True,
            )
        return SlideOutcome(
            sid,
            "failed",
            path,
            error=f"worker died on this slide {max_retries + 1} time(s) ({type(exc).__name__}: "
            f"{first}); look for out-of-memory kills in the Ray logs, or raise --max-retries",
            internal=True,
        )
    if not isinstance(outcome, SlideOutcome) or outcome.slide_id != sid:
        return SlideOutcome(
            sid,
            "failed",
            path,
            error=f"the task returned {type(outcome).__name__}, not an outcome",
            internal=True,
        )
    return outcome


__all__: list[str] = []
