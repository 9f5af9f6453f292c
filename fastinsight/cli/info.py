"""``fastinsight info MODEL``: a checkpoint's format, size and configuration as JSON."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="official INSIGHT .pth or fastinsight .safetensors")


def run(args: argparse.Namespace) -> int:
    from fastinsight.models.checkpoints import load_model, sniff_format

    model = load_model(args.model, backend="reference", device="cpu")
    cfg = json.loads(model.config.to_json())
    print(
        json.dumps(
            {
                "format": sniff_format(Path(args.model)),
                "parameters": model.parameter_count(),
                "config": cfg,
            },
            indent=2,
        )
    )
    return 0
