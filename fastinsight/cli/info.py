"""``fastinsight info MODEL``: a checkpoint's format, size and configuration as JSON."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="official INSIGHT .pth or fastinsight .safetensors")


def run(args: argparse.Namespace) -> int:
    from fastinsight.errors import CheckpointError
    from fastinsight.models.checkpoints import load_model, sniff_format

    try:
        model = load_model(args.model, backend="reference", device="cpu")
    except CheckpointError:
        path = Path(args.model)
        if path.name.endswith(".train.pt"):
            # What `fastinsight train` writes beside the model: optimizer moments, history and
            # split to resume from, not a model (the message would say "not a state_dict").
            model_path = path.with_name(path.name[: -len(".train.pt")] + ".safetensors")
            raise CheckpointError(
                f"{str(path)!r} is a training-resume state written by `fastinsight train` (to "
                f"resume that run), not a model; the model is {str(model_path)!r}: run "
                "`fastinsight info` on it"
            ) from None
        raise
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
