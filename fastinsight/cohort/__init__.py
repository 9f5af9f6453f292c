"""``fastinsight predict-cohort``: many slides with Ray (being split into modules by concern)."""

from __future__ import annotations

from fastinsight.cohort.api import *  # noqa: F403
from fastinsight.cohort.api import (  # noqa: F401
    CRASH_DIR_ENV,
    CRASH_ENV,
    TaskPlan,
    SlideJob,
    _model_payload,
    _ray_session,
    options_hash,
    run_slide,
)
from fastinsight.cohort.api import __all__  # noqa: F401
