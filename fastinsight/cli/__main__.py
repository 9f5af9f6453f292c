"""``python -m fastinsight.cli``."""

from __future__ import annotations

import sys

from fastinsight.cli.main import main

sys.exit(main())
