"""The per-slide work, run in a Ray worker process: :func:`run_slide`.

A task rebuilds the model from the object store (never from the checkpoint file; cached per
worker process, one model at a time), builds the encoder the model's config names (cached per
name, weights and device), runs :func:`fastinsight.predict.slide.predict_slide`, writes every
output through ``SlideResult.write_outputs`` (the one writer) into ``DIR/.<id>.partial``, writes
``complete.json`` last and renames the folder into place. A FastInsightError (a bad slide) comes
back as a ``failed`` outcome and is never retried; a worker that dies is Ray's to retry.
"""

from __future__ import annotations

import dataclasses
import shutil
import socket
import traceback
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fastinsight.cohort.layout import partial_dir, slide_dir
from fastinsight.cohort.options import CohortOptions
from fastinsight.cohort.state import SlideJob, _install, slide_fingerprint, write_marker
from fastinsight.cohort.summary import SlideOutcome, _one_line
from fastinsight.encoders import build_encoder
from fastinsight.errors import FastInsightError
from fastinsight.malloc import keep_freed_memory
from fastinsight.models.config import InsightConfig
from fastinsight.models.insight import InsightModel
from fastinsight.predict.slide import Outputs, SlideResult, predict_slide


@dataclass(frozen=True)
class ModelPayload:
    """The model as it travels through the object store: config JSON and numpy weights
    (numpy so that workers on one node share one read-only copy)."""

    config_json: str
    state: dict[str, Any]
    backend: str
    info: dict[str, Any]

    @property
    def sha256(self) -> str:
        return str(self.info["sha256"])


@dataclass(frozen=True)
class TaskPlan:
    """Everything a task needs besides its slide and the model."""

    options: CohortOptions
    device: str
    torch_threads: int
    model_sha256: str


def _model_payload(model: Any, info: dict[str, Any], backend: str) -> ModelPayload:
    """The model as numpy arrays plus its config, for ``ray.put`` (done once per cohort)."""
    state = {k: v.detach().to("cpu").contiguous().numpy() for k, v in model.state_dict().items()}
    return ModelPayload(model.config.to_json(), state, backend, dict(info))


# Per worker process: the model (rebuilt once per checkpoint) and the encoder (built once per
# name/weights/device). Ray reuses worker processes, so a worker pays for each only once.
_WORKER_CACHE: dict[tuple[Any, ...], Any] = {}


def _worker_model(model_box: list[Any], sha256: str, device: str) -> tuple[Any, dict[str, Any]]:
    key = ("model", sha256, device)
    if key not in _WORKER_CACHE:
        import ray  # a task runs in a Ray worker: Ray is there

        payload: ModelPayload = ray.get(model_box[0])
        model = InsightModel(InsightConfig.from_json(payload.config_json), backend=payload.backend)
        # The object store hands out read-only arrays; copy before they become parameters.
        model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in payload.state.items()})
        for k in [k for k in _WORKER_CACHE if k[0] == "model"]:
            del _WORKER_CACHE[k]  # one model per worker: a rerun with another model frees the old
        _WORKER_CACHE[key] = (model.to(device).eval(), dict(payload.info))
    return _WORKER_CACHE[key]  # type: ignore[no-any-return]


def _worker_encoder(model: Any, weights: str | None, device: str) -> Any:
    cfg = model.config
    key = ("encoder", cfg.encoder, weights, cfg.tile_size_px, device)
    if key not in _WORKER_CACHE:
        _WORKER_CACHE[key] = build_encoder(
            cfg.encoder, weights, tile_size_px=cfg.tile_size_px, device=device
        ).eval()
    return _WORKER_CACHE[key]


def _predict(model_box: list[Any], job: SlideJob, plan: TaskPlan) -> SlideResult:
    """The slide through the encoder and the model, with this slide's mpp and the plan's device."""
    slide = job.slide
    torch.set_num_threads(plan.torch_threads)
    model, info = _worker_model(model_box, plan.model_sha256, plan.device)
    predict = plan.options.predict
    encoder = _worker_encoder(model, predict.encoder_weights, plan.device)
    mpp = slide.mpp if slide.mpp is not None else predict.mpp
    opts = dataclasses.replace(predict, device=plan.device, mpp=mpp, progress=False)
    result = predict_slide(slide.path, model, encoder, opts, model_info=info)
    result.slide_id = slide.slide_id
    return result


def _write(result: SlideResult, job: SlideJob, plan: TaskPlan, fingerprint: str) -> SlideOutcome:
    """Every output into a fresh ``.partial`` folder, the marker last, then the folder into place."""
    slide, options = job.slide, plan.options
    partial = partial_dir(job.out_dir, slide.slide_id)
    shutil.rmtree(partial, ignore_errors=True)  # left by an attempt that died
    partial.mkdir(parents=True)
    written = result.write_outputs(
        Outputs.folder(
            partial,
            class_=options.class_,
            encoding=options.encoding,
            all_classes=options.all_classes,
        )
    )
    outcome = SlideOutcome(
        slide_id=slide.slide_id,
        status="ok",
        slide_path=str(slide.path),
        scores=tuple(float(s) for s in result.scores),
        n_tiles=int(result.n_tiles),
        timings={k: float(v) for k, v in result.timings.items()},
        tiles_per_s=float(result.tiles_per_second),
        node=socket.gethostname(),
    )
    write_marker(partial, job, plan.model_sha256, fingerprint, written, outcome.as_json())
    _install(partial, slide_dir(job.out_dir, slide.slide_id))
    return outcome


def run_slide(model_box: list[Any], job: SlideJob, plan: TaskPlan) -> SlideOutcome:
    """One slide, in a Ray worker: predict, write into ``.<id>.partial``, marker last, rename.

    ``model_box`` is ``[ObjectRef]`` (a list, so Ray hands the reference over unresolved and the
    weights are fetched only on a worker's first slide for this model). FastInsightErrors come
    back as a ``failed`` outcome (never retried); a worker that dies is Ray's to retry.
    """
    slide = job.slide
    node = socket.gethostname()
    partial = partial_dir(job.out_dir, slide.slide_id)

    def failed(error: str, internal: bool = False) -> SlideOutcome:
        shutil.rmtree(partial, ignore_errors=True)
        return SlideOutcome(
            slide.slide_id, "failed", str(slide.path), error=error, node=node, internal=internal
        )

    try:
        # Ray's worker processes reuse freed memory batch after batch, as the CLI's does.
        keep_freed_memory()
        # Fingerprint before reading: a file replaced during the run does not pass as this one.
        try:
            fingerprint = slide_fingerprint(slide.path)
        except (OSError, FastInsightError):
            fingerprint = ""  # unreadable: _predict says what is wrong with the slide
        result = _predict(model_box, job, plan)
        return _write(result, job, plan, fingerprint)
    except FastInsightError as exc:
        return failed(_one_line(str(exc)))
    except torch.cuda.OutOfMemoryError:
        batch = plan.options.predict.batch_size
        return failed(f"GPU out of memory on this slide with --batch-size {batch}; lower it")
    except Exception as exc:  # a bug or an unexpected library error: record it, keep going
        traceback.print_exc()  # lands in the Ray worker log
        return failed(
            f"unexpected {type(exc).__name__}: {_one_line(str(exc))} (a fastinsight bug? please "
            "report it)",
            internal=True,
        )


__all__ = ["ModelPayload", "TaskPlan", "run_slide"]
