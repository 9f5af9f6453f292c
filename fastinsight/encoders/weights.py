"""Reading encoder weight files from local disk and checking them strictly against a model.

Encoders are loaded offline: nothing here downloads. Two file formats are accepted, told apart by
their first bytes rather than their names:

- a PyTorch ``state_dict`` written by ``torch.save`` (zip or legacy pickle; UNI's
  ``pytorch_model.bin``, torchvision's ``resnet50-0676ba61.pth``), read with
  ``torch.load(weights_only=True)`` so that no arbitrary object is ever unpickled;
- a ``.safetensors`` file.

A weight path may also be a Hugging Face hub snapshot folder (``config.json`` next to
``model.safetensors`` or ``pytorch_model.bin``, as ``huggingface-cli download`` or
``snapshot_download`` leave it; a cache folder ``models--ORG--NAME`` with one snapshot works too):
the weight file is taken from it and ``config.json``'s ``architecture`` is checked against the
encoder (:func:`resolve_weights_path`). DINOv2's own torch-hub checkpoints
(``dinov2_vitl14_reg4_pretrain.pth``) are converted to timm's layout by :func:`convert_dinov2_hub`.

Common wrappers (``{"state_dict": ...}``, ``{"model": ...}``) and key prefixes (``module.``
from ``nn.DataParallel``, ``model.``, ``backbone.``, ``encoder.``, ``trunk.``) are removed when
every key carries them.

A ViT's absolute position embedding trained on another grid (DINOv2's 37 x 37 at 518 px loaded
into a model built for 224 px, 16 x 16) is resampled on load by :func:`check_state_dict`
(:func:`resample_grid_embed`: bicubic, antialiased, class/register entries kept as they are).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import Tensor

from fastinsight.errors import CheckpointError
from fastinsight.fileformat import weights_format
from fastinsight.models.statefiles import WRAPPER_KEYS
from fastinsight.text import loads_json

PathLike = str | os.PathLike[str]

# Prefixes that training frameworks put in front of every key; stripped only when all keys share one.
KNOWN_PREFIXES: tuple[str, ...] = ("module.", "model.", "backbone.", "encoder.", "trunk.")


def _sniff(path: Path, what: str) -> str:
    from fastinsight.inputs import check_input_path

    if path.exists() and not path.is_dir():  # a FIFO or device: refused by stat, never opened
        check_input_path(path, "encoder weights file", CheckpointError)
    try:
        with open(path, "rb") as fh:
            head = fh.read(16)
    except FileNotFoundError:
        raise CheckpointError(
            f"encoder weights file {str(path)!r} does not exist; pass the path of {what} "
            "with --encoder-weights PATH"
        ) from None
    except IsADirectoryError:
        raise CheckpointError(
            f"encoder weights path {str(path)!r} is a directory; pass the weight file itself "
            f"({what}) with --encoder-weights PATH"
        ) from None
    except OSError as exc:
        raise CheckpointError(f"cannot read encoder weights file {str(path)!r}: {exc}") from exc
    fmt = weights_format(head)
    if fmt is not None:
        return fmt
    raise CheckpointError(
        f"{str(path)!r} is neither a PyTorch state_dict nor a safetensors file "
        f"(found {len(head)} leading bytes {head[:8]!r}); pass {what}"
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def strip_prefixes(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """Remove prefixes from :data:`KNOWN_PREFIXES` that every key carries; return notes."""
    notes: list[str] = []
    changed = True
    while changed and state:
        changed = False
        for prefix in KNOWN_PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix) :]: v for k, v in state.items()}
                notes.append(f"stripped key prefix {prefix!r}")
                changed = True
    return state, notes


def read_state_dict(path: PathLike, *, what: str) -> tuple[dict[str, Tensor], list[str]]:
    """Read a weight file into a flat ``{key: tensor}`` dict on the CPU.

    ``what`` names the expected file in error messages (e.g. "UNI's pytorch_model.bin").
    Returns the state dict and notes on what was unwrapped or stripped.
    Raises CheckpointError for a missing, unreadable, truncated or non-tensor file.
    """
    p = Path(path).expanduser()
    kind = _sniff(p, what)
    notes: list[str] = []
    if kind == "safetensors":
        from safetensors.torch import load_file

        try:
            obj: object = load_file(str(p), device="cpu")
        except Exception as exc:  # safetensors raises its own error types for truncated headers
            raise CheckpointError(
                f"cannot read safetensors file {str(p)!r} ({_first_line(exc)}); the file is "
                f"truncated or corrupt: fetch {what} again"
            ) from exc
    else:
        try:
            obj = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises zip/pickle/runtime errors of many kinds
            raise CheckpointError(
                f"cannot load {str(p)!r} as a PyTorch state_dict ({_first_line(exc)}); the file "
                f"is truncated or corrupt, or holds objects other than tensors: fetch {what} again"
            ) from exc
    for wrapper in WRAPPER_KEYS:
        if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
            notes.append(f"unwrapped the {wrapper!r} entry")
            break
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(
            f"{str(p)!r} does not hold a state_dict (found {type(obj).__name__}"
            f"{' (empty)' if isinstance(obj, Mapping) else ''}); pass {what}"
        )
    state: dict[str, Tensor] = {}
    for key, value in obj.items():
        if not isinstance(value, Tensor):
            raise CheckpointError(
                f"{str(p)!r}: entry {key!r} is a {type(value).__name__}, not a tensor; "
                f"pass a plain state_dict ({what})"
            )
        state[str(key)] = value
    state, strip_notes = strip_prefixes(state)
    return state, notes + strip_notes


def square_grid_side(entries: int) -> int | None:
    """``g`` when ``entries == g * g`` (``g >= 1``), else None."""
    if entries < 1:
        return None
    side = math.isqrt(entries)
    return side if side * side == entries else None


def resample_grid_embed(
    pos_embed: Tensor,
    new_hw: tuple[int, int],
    *,
    num_prefix: int = 0,
    old_hw: tuple[int, int] | None = None,
) -> Tensor:
    """Resample an absolute position embedding to another grid of patch positions.

    The ``num_prefix`` leading entries (the class token's, and the register tokens' in models
    that give them a position; 0 for ``no_embed_class`` models) are kept as they are. The rest,
    ``old_hw`` (default: a square read off the length) positions in row-major order, is viewed
    as a ``D``-channel image and resized to ``new_hw`` with bicubic interpolation and
    antialiasing (``align_corners=False``) in float32, or float64 for a float64 input; this is
    what timm does when it loads weights at another size and at run time with
    ``dynamic_img_size``. The result is float32 (float64 for float64 input); the input is never
    modified. Needs torch only.

    Shapes: ``[1, P + g*g, D]`` -> ``[1, P + h*w, D]``; returns ``pos_embed`` itself when the
    grid is already ``new_hw``.
    Raises ValueError for an embedding that is not ``[1, P + old_h*old_w, D]`` float.
    """
    if pos_embed.ndim != 3 or pos_embed.shape[0] != 1 or not pos_embed.is_floating_point():
        raise ValueError(
            f"expected a float position embedding [1, N, D], found {pos_embed.dtype} "
            f"{list(pos_embed.shape)}"
        )
    n, d = int(pos_embed.shape[1]), int(pos_embed.shape[2])
    if old_hw is None:
        side = square_grid_side(n - num_prefix)
        if side is None:
            raise ValueError(
                f"{n - num_prefix} position entries after {num_prefix} prefix entries are not "
                "a square grid"
            )
        old_hw = (side, side)
    oh, ow = int(old_hw[0]), int(old_hw[1])
    if num_prefix < 0 or oh * ow + num_prefix != n:
        raise ValueError(
            f"a position embedding of {n} entries is not {num_prefix} prefix entries + "
            f"{oh} x {ow} positions"
        )
    nh, nw = int(new_hw[0]), int(new_hw[1])
    if (nh, nw) == (oh, ow):
        return pos_embed
    work = torch.float64 if pos_embed.dtype == torch.float64 else torch.float32
    prefix = pos_embed[:, :num_prefix].to(work)
    grid = pos_embed[:, num_prefix:].to(work).reshape(1, oh, ow, d).permute(0, 3, 1, 2)
    grid = torch.nn.functional.interpolate(
        grid, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True
    )
    return torch.cat([prefix, grid.permute(0, 2, 3, 1).reshape(1, nh * nw, d)], dim=1)


def _fit_pos_embed(
    key: str, got: Tensor, ref: Tensor, grid_hw: tuple[int, int], *, source: str, hint: str
) -> tuple[Tensor, str] | None:
    """``got`` (a file's ``pos_embed``) resampled to the grid of ``ref`` (the model's), or None
    when it is not a position embedding of the same width (then the plain shape error applies).

    The model's embedding is ``[1, P + h*w, D]`` with ``(h, w) = grid_hw``; the file's must be
    ``[1, P + g*g, D]`` with the same ``P`` prefix entries, else CheckpointError.
    """
    h, w = grid_hw
    prefix = int(ref.shape[1]) - h * w if ref.ndim == 3 else -1
    if (
        prefix < 0
        or got.ndim != 3
        or got.shape[0] != 1
        or got.shape[2] != ref.shape[2]
        or not got.is_floating_point()
    ):
        return None
    side = square_grid_side(int(got.shape[1]) - prefix)
    if side is None:
        raise CheckpointError(
            f"{source}: {key!r} has shape {list(got.shape)}, expected {list(ref.shape)} "
            f"({prefix} class/register entries + {h} x {w} patch positions); its "
            f"{int(got.shape[1]) - prefix} entries after the {prefix} prefix entries are not a "
            f"square grid of patch positions, so it cannot be resampled; {hint}"
        )
    out = resample_grid_embed(got, (h, w), num_prefix=prefix, old_hw=(side, side))
    kept = f"; its {prefix} class/register entries kept" if prefix else ""
    note = (
        f"resampled {key!r} from {side} x {side} to {h} x {w} patch positions (bicubic, "
        f"antialiased{kept})"
    )
    return out, note


def check_state_dict(
    expected: Mapping[str, Tensor],
    state: Mapping[str, Tensor],
    *,
    source: str,
    arch: str,
    what: str,
    ignorable: Callable[[str], bool] = lambda key: False,
    optional: Callable[[str], bool] = lambda key: False,
    pos_embed_grid: tuple[int, int] | None = None,
    pos_embed_key: str = "pos_embed",
) -> tuple[dict[str, Tensor], list[str]]:
    """Check ``state`` against a model's ``expected`` state_dict, key by key, in model order.

    - a key of the model missing from the file is an error, unless ``optional(key)``;
    - a key of the file that the model lacks is an error, unless ``ignorable(key)`` (then it is
      dropped and counted in the returned notes);
    - shapes must match exactly; floating tensors must be floating (dtype is converted on load);
    - except ``pos_embed_key`` when ``pos_embed_grid`` (the model's ``(h, w)`` grid of patch
      positions) is given: a position embedding of the model's width trained on another square
      grid is resampled to it (:func:`resample_grid_embed`, prefix entries kept, with a note);
      one whose entries after the prefix are not a square grid is an error.

    The first bad key is named in the error, together with the file's first key, so that a file of
    another architecture is recognisable at a glance. Returns the filtered state and notes.
    """
    first = next(iter(state), "<empty>")
    hint = f"it is not a {arch} weight file (another architecture?); pass {what}"
    resampled: dict[str, Tensor] = {}
    notes: list[str] = []
    for key, ref in expected.items():
        if key not in state:
            if optional(key):
                continue
            raise CheckpointError(
                f"{source}: missing key {key!r} (the file's first key is {first!r}); {hint}"
            )
        got = state[key]
        if tuple(got.shape) != tuple(ref.shape) and key == pos_embed_key and pos_embed_grid:
            fitted = _fit_pos_embed(key, got, ref, pos_embed_grid, source=source, hint=hint)
            if fitted is not None:
                got, note = fitted
                resampled[key] = got
                notes.append(note)
        if tuple(got.shape) != tuple(ref.shape):
            raise CheckpointError(
                f"{source}: {key!r} has shape {list(got.shape)}, expected {list(ref.shape)}; {hint}"
            )
        if ref.is_floating_point() and not got.is_floating_point():
            raise CheckpointError(
                f"{source}: {key!r} has dtype {got.dtype}, expected a float tensor; {hint}"
            )
    kept: dict[str, Tensor] = {}
    ignored: list[str] = []
    for key, value in state.items():
        if key in expected:
            kept[key] = resampled.get(key, value)
        elif ignorable(key):
            ignored.append(key)
        else:
            raise CheckpointError(f"{source}: unexpected key {key!r}; {hint}")
    if ignored:
        notes.append(
            f"ignored {len(ignored)} keys the encoder does not use ({ignored[0]!r} ... "
            f"{ignored[-1]!r})"
        )
    return kept, notes


#: Weight files looked for in a hub snapshot folder, in this order.
SNAPSHOT_FILES: tuple[str, ...] = ("model.safetensors", "pytorch_model.bin")


def resolve_weights_path(path: PathLike, *, what: str, expect: tuple[str, ...] = ()) -> Path:
    """The weight file of ``path``: the file itself, or the one inside a hub snapshot folder.

    For a folder, ``config.json`` (when present and written by timm's hub integration) must name
    one of the ``expect`` architectures (if any are given), so that a UNI folder passed as UNI2-h
    fails with the folder named rather than on a tensor shape.
    Raises CheckpointError for a folder without weights or of another architecture.
    """
    p = Path(path).expanduser()
    if not p.is_dir():
        return p
    snaps = p / "snapshots"
    if snaps.is_dir():  # a hub cache folder models--ORG--NAME
        found = sorted(d for d in snaps.iterdir() if d.is_dir())
        if len(found) == 1:
            p = found[0]
        else:
            raise CheckpointError(
                f"hub cache folder {str(path)!r} holds {len(found)} snapshots; pass one of them "
                f"(snapshots/<revision>) with --encoder-weights PATH"
            )
    weights = next((p / f for f in SNAPSHOT_FILES if (p / f).is_file()), None)
    if weights is None:
        raise CheckpointError(
            f"{str(p)!r} is a directory that holds none of {', '.join(SNAPSHOT_FILES)}; pass a hub snapshot "
            f"folder or the weight file itself ({what}) with --encoder-weights PATH"
        )
    cfg_path = p / "config.json"
    if expect and cfg_path.is_file():
        try:
            cfg = loads_json(cfg_path.read_text())
        except (OSError, ValueError) as exc:
            raise CheckpointError(
                f"cannot read {str(cfg_path)!r} ({_first_line(exc)}); fetch the snapshot again"
            ) from exc
        arch = cfg.get("architecture") if isinstance(cfg, dict) else None
        if isinstance(arch, str) and arch not in expect:
            raise CheckpointError(
                f"{str(p)!r} is a {arch!r} snapshot (config.json), expected {' or '.join(expect)}; "
                f"it is another model: pass {what}"
            )
    return weights


_DINOV2_MLP = re.compile(r"^(blocks\.\d+\.mlp\.)(w12|w3)(\.(?:weight|bias))$")


def convert_dinov2_hub(
    state: dict[str, Tensor], *, reg_tokens: int, encoder: str = "", what: str = ""
) -> tuple[dict[str, Tensor], list[str]]:
    """facebookresearch/dinov2 torch-hub keys -> timm ``VisionTransformer`` keys.

    DINOv2 adds ``pos_embed[:, 0]`` to the class token, then inserts the register tokens after it
    with no position; its ``pos_embed`` is ``[1, 1 + g*g, D]``. timm's register models are
    ``no_embed_class`` (position only on patch tokens), so for a file with ``register_tokens``:
    ``cls_token' = cls_token + pos_embed[:, :1]``, ``pos_embed' = pos_embed[:, 1:]``,
    ``reg_token = register_tokens``. Without registers the layout already matches. ``mask_token``
    (training only) is dropped; SwiGLU's ``mlp.w12``/``mlp.w3`` become ``mlp.fc1``/``mlp.fc2``.
    Returns the converted state and a note. ``encoder`` / ``what`` (the encoder's name and the
    file it wants) word the refusal of a register mismatch: the user may have given a DINOv2
    file to another encoder.
    """
    wants = f"; encoder {encoder!r} takes {what}" if encoder and what else ""
    out = dict(state)
    out.pop("mask_token", None)
    if "register_tokens" in out:
        regs = out.pop("register_tokens")
        if reg_tokens != regs.shape[1]:
            raise CheckpointError(
                f"the weights are a DINOv2 torch-hub file with {regs.shape[1]} register tokens, "
                f"the encoder has {reg_tokens}{wants or '; pass the matching DINOv2 checkpoint'}"
            )
        pos = out["pos_embed"]
        out["cls_token"] = out["cls_token"] + pos[:, :1]
        out["pos_embed"] = pos[:, 1:]
        out["reg_token"] = regs
    elif reg_tokens:
        raise CheckpointError(
            f"the weights are a DINOv2 torch-hub file without register tokens, the encoder has "
            f"{reg_tokens}{wants or '; pass the _reg4_ checkpoint (dinov2_vitl14_reg4_pretrain.pth)'}"
        )
    renamed = {}
    for key, value in out.items():
        m = _DINOV2_MLP.match(key)
        if m:
            key = m.group(1) + ("fc1" if m.group(2) == "w12" else "fc2") + m.group(3)
        renamed[key] = value
    return renamed, ["converted DINOv2 torch-hub keys to timm's layout"]
