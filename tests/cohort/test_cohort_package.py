"""``fastinsight.cohort`` as a package split by concern: every name of the single-file module of
earlier versions still imports from ``fastinsight.cohort``, the face is lazy, no function is long,
and no test-only hook ships in it."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import fastinsight.cohort as cohort

PACKAGE = Path(cohort.__file__).parent

# Every name the single-file fastinsight/cohort.py defined, less its test-only crash hook.
OLD_NAMES = """
EXIT_SLIDES_FAILED SLIDE_EXTENSIONS MARKER_NAME MARKER_FORMAT SUMMARY_NAME LOCK_NAME
PARTIAL_SUFFIX OLD_INFIX STATUSES _ID_RE _RESERVED_IDS _MANIFEST_PATH_COLUMNS _MANIFEST_ID_COLUMNS
_MIB CohortSlide default_slide_id check_slide_id _is_glob _parse_mpp read_manifest discover_slides
check_unique CohortOptions file_fingerprint options_hash SlideJob check_complete SlideOutcome
_one_line _fmt summary_header write_summary read_summary CohortReport ModelPayload TaskPlan
_WORKER_CACHE _worker_model _worker_encoder slide_dir partial_dir _install run_slide _import_ray
_cohort_lock _clean_stale _check_class _RaySession _ray_session _plan_resources _model_payload
_check_encoder predict_cohort _run_jobs _collect
""".split()


def test_every_old_name_still_imports() -> None:
    for name in OLD_NAMES + cohort.__all__:
        value = getattr(cohort, name)
        home = importlib.import_module(cohort._LAZY[name])
        assert value is getattr(home, name), name
    assert set(cohort.__all__) <= set(dir(cohort))


def test_the_face_and_the_slide_list_load_no_torch() -> None:
    code = (
        "import sys\n"
        "import fastinsight.cohort\n"
        "assert 'fastinsight.cohort.api' not in sys.modules\n"
        "from fastinsight.cohort import EXIT_SLIDES_FAILED, check_complete, discover_slides\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy', 'ray')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == "[]"


def test_no_long_functions_and_no_test_hooks() -> None:
    for path in sorted(PACKAGE.glob("*.py")):
        text = path.read_text()
        assert "FASTINSIGHT_TEST" not in text and "os._exit" not in text, path.name
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1  # type: ignore[operator]
                assert length <= 80, f"{path.name}: {node.name} has {length} lines"
