"""Which encoder a name identifies, and whether it is the one a model was trained on.

A head trained on one encoder's features takes any encoder whose tokens have the same geometry
(UNI's 1024 x 14 x 14 grid and another ViT-L/16's) and gives wrong outputs on the other's: the
geometry check (``check_compatible``, ``check_encoder_fits``) cannot tell them apart, the name
can. ``fastinsight predict``, ``predict-volume``, ``export onnx`` and ``export triton-repo`` all
compare names here (the model file's record is read by
:func:`fastinsight.models.checkpoints.recorded_encoder`).
"""

from __future__ import annotations

from pathlib import Path

from fastinsight.encoders.torchscript import PREFIX, is_torchscript_name
from fastinsight.errors import ConfigError

# TRIDENT's names of registry encoders: its feature files record these, and `train` copies them
# into the model (mahmoodlab/TRIDENT, trident/patch_encoder_models/load.py, encoder_factory).
_TRIDENT_NAMES = {
    "uni-v1": "uni",
    "uni-v2": "uni2-h",
    "gigapath": "prov-gigapath",
    "hoptimus0": "h-optimus-0",
    "hoptimus1": "h-optimus-1",
    "resnet50": "resnet50-trunc",
}


def encoder_key(name: str) -> str:
    """What an encoder name identifies, so that two spellings of one encoder compare equal.

    Registry names ignore case and ``_`` vs ``-`` (TRIDENT's ``uni_v1`` is ``uni``);
    ``timm:NAME`` ignores case; ``torchscript:PATH`` is its file name (what the encoder's
    ``name`` keeps: a model trained elsewhere records another folder).
    """
    raw = name.strip()
    if is_torchscript_name(raw):
        return f"{PREFIX}:{Path(raw[len(PREFIX) + 1 :].strip()).name}"
    low = raw.lower()
    if low.startswith("timm:"):
        return "timm:" + low[len("timm:") :].strip()
    key = low.replace("_", "-")
    return _TRIDENT_NAMES.get(key, key)


def check_encoder_identity(
    recorded: str | None,
    encoder: str,
    *,
    model: str = "the model",
    allow_mismatch: bool = False,
) -> str | None:
    """The encoder must be the one the model was trained on (``recorded``, from the model file:
    :func:`fastinsight.models.checkpoints.recorded_encoder`), not only make tokens of the same
    geometry: a head trained on UNI's features takes any 1024 x 14 x 14 grid and gives wrong
    outputs on another ViT-L/16's.

    Names are compared by :func:`encoder_key`. A mismatch is a ``ConfigError`` naming both,
    unless ``allow_mismatch`` (``--allow-encoder-mismatch``: the same network under another
    name). Returns a one-line note for the user, or None: when the model records no encoder
    (an official ``.pth``: accepted on geometry alone), or when a mismatch was allowed.
    """
    if recorded is None:
        return (
            f"note: {model} records no encoder (an official INSIGHT .pth records none): encoder "
            f"{encoder!r} is accepted because its tokens fit the head's geometry; make sure the "
            "head was trained on its features (the official INSIGHT heads: UNI)"
        )
    if encoder_key(recorded) == encoder_key(encoder):
        return None
    if allow_mismatch:
        return (
            f"note: encoder {encoder!r} is not {recorded!r}, the encoder {model} records; "
            "used anyway (--allow-encoder-mismatch): its outputs are right only if both are "
            "the same network"
        )
    raise ConfigError(
        f"encoder {encoder!r} is not the one {model} was trained on ({recorded!r}, recorded in "
        "the model's config), and a head gives wrong outputs on another encoder's tokens even when "
        f"their geometry agrees: pass --encoder {recorded}, or --allow-encoder-mismatch "
        f"(allow_encoder_mismatch=True) if {encoder!r} is the same network under another name"
    )
