"""The one rule that picks a pyramid level, shared by the grid, the readers and tissue detection.

Every stage that reads pixels at some physical resolution (tiles at the target mpp, the tissue
image at ``mask_mpp``, a thumbnail) reads the *coarsest level that is not coarser than what it
needs* and resamples down from there: never an upsample (beyond ``tolerance``), never a level
"closest" in log-scale that could sit on the wrong side. With one rule and one tolerance, two
containers holding the same pixels pick the same level for the same request, so they give the
same answer.

This module imports nothing from the rest of ``fastinsight.slide`` (no import cycle).
"""

from __future__ import annotations

from collections.abc import Sequence

# A level at 2.0005 (a real Aperio downsample) must serve a requested 2.0: a 0.03 % upsample is
# invisible, while falling back to a level four times larger costs 4x the reading. 1 % is well
# above every rounding we have seen (level sizes are rounded to whole pixels) and far below
# the next power of two.
LEVEL_TOLERANCE = 0.01


def best_level(
    level_downsamples: Sequence[float], downsample: float, tolerance: float = LEVEL_TOLERANCE
) -> int:
    """The coarsest level whose downsample is at most ``downsample * (1 + tolerance)``.

    Reading from it and resampling never upsamples by more than ``tolerance`` (1 %): a level at
    2.0005 serves a requested 2.0, a level at 4 never serves 3.9. Level 0 serves anything finer
    than itself. Ties (two levels with the same downsample) go to the lower index.
    """
    best = 0
    for level, ds in enumerate(level_downsamples):
        if ds <= downsample * (1.0 + tolerance) and ds > level_downsamples[best]:
            best = level
    return best
