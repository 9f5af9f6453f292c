"""``python -m fastinsight``: the command line, as ``fastinsight`` and ``python -m fastinsight.cli``."""

from __future__ import annotations

import sys

from fastinsight.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
