"""Faults injected into ``predict-cohort``'s Ray workers from the outside (no hook in shipped code).

:func:`crash_once_after_writing` is a Ray ``worker_process_setup_hook``: every worker process runs
it at start, before any task. It wraps ``SlideResult.write_outputs`` (the one writer) so that a
task whose slide id is listed in ``$FI_TEST_CRASH_ONCE`` kills its own worker process with
``os._exit(1)`` after its outputs are in the ``.partial`` folder and before the completion marker,
once per id: the first attempt leaves ``$FI_TEST_CRASH_DIR/<id>.crashed`` (listing what the
``.partial`` folder held when the worker died) and later attempts see it and run normally.
Use :func:`runtime_env` for ``ray.init``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

IDS_ENV = "FI_TEST_CRASH_ONCE"
DIR_ENV = "FI_TEST_CRASH_DIR"
REPO = Path(__file__).resolve().parents[2]


def crash_once_after_writing() -> None:
    """Arm the crash in this worker process (a Ray worker setup hook)."""
    from fastinsight.predict.slide import SlideResult

    ids = set(filter(None, os.environ.get(IDS_ENV, "").split(",")))
    crash_dir = Path(os.environ[DIR_ENV])
    original = SlideResult.write_outputs

    def write_outputs(self: SlideResult, outputs: Any) -> list[Path]:
        written = original(self, outputs)
        mark = crash_dir / f"{self.slide_id}.crashed"
        if self.slide_id in ids and not mark.exists():
            folder = Path(outputs.report).parent
            mark.write_text("\n".join(sorted(p.name for p in folder.iterdir())) + "\n")
            os._exit(1)  # as a killed worker: no cleanup, no exception
        return written

    SlideResult.write_outputs = write_outputs  # type: ignore[method-assign]


def runtime_env(slide_ids: Iterable[str], crash_dir: Path) -> dict[str, Any]:
    """The ``runtime_env`` that arms :func:`crash_once_after_writing` in every worker."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {
        "worker_process_setup_hook": f"{__name__}.crash_once_after_writing",
        "env_vars": {
            "PYTHONPATH": path,  # the workers import this module by name
            IDS_ENV: ",".join(slide_ids),
            DIR_ENV: str(crash_dir),
        },
    }
