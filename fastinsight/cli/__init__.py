"""The ``fastinsight`` command line: all argparse lives here, nothing in the library imports it.

Holds: ``main`` (the COMMANDS table, the parser, exit codes) and one module per command
(``predict``, ``export``, ...). May import anything in fastinsight; a command's module is imported
only when that command runs, so ``fastinsight --help`` loads no torch.
"""

from __future__ import annotations

from fastinsight.cli.main import COMMANDS, main, register

__all__ = ["COMMANDS", "main", "register"]
