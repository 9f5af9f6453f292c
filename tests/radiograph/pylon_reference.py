"""An independent PYLON forward in plain ``torch.nn.functional``, straight from a state_dict.

Shares no code with ``fastinsight.models.pylon``: it walks the official key names (from the
shared key lists) and applies the published operations, so a naming or wiring slip in the model
shows up as a mismatch.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

_HERE = Path(__file__).parent


def key_list(up_type: str) -> list[tuple[str, list[int]]]:
    """``(key, shape)`` in file order from the shared key lists (a copy lives beside this file)."""
    name = f"pylon-state-dict-{up_type}.txt"
    path = _HERE / name
    rows = []
    for line in path.read_text().splitlines():
        key, shape = line.split(" ", 1)
        rows.append((key, [int(s) for s in shape.strip("[]").split(",") if s.strip()]))
    return rows


def random_state_dict(up_type: str, num_classes: int = 14, seed: int = 0) -> dict[str, Tensor]:
    """Random weights for every official key, with non-trivial BatchNorm statistics."""
    g = torch.Generator().manual_seed(seed)
    state: dict[str, Tensor] = {}
    for key, shape in key_list(up_type):
        if key.startswith("net.segmentation_head.0."):
            shape = [num_classes, *shape[1:]]
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(1000, dtype=torch.int64)
        elif key.endswith("running_var"):
            state[key] = 0.5 + 1.5 * torch.rand(shape, generator=g)
        elif key.endswith("running_mean"):
            state[key] = 0.2 * torch.randn(shape, generator=g)
        elif len(shape) == 4:
            fan_in = shape[1] * shape[2] * shape[3]
            state[key] = torch.randn(shape, generator=g) * (2.0 / fan_in) ** 0.5
        elif ".bn" in key or ".downsample.1." in key:
            if key.endswith("weight"):
                state[key] = 0.5 + torch.rand(shape, generator=g)
            else:
                state[key] = 0.1 * torch.randn(shape, generator=g)
        else:  # conv biases
            state[key] = 0.05 * torch.randn(shape, generator=g)
    return state


def _bn(x: Tensor, s: dict[str, Tensor], p: str) -> Tensor:
    return F.batch_norm(
        x,
        s[p + "running_mean"],
        s[p + "running_var"],
        s[p + "weight"],
        s[p + "bias"],
        training=False,
        eps=1e-5,
    )


def _cbr(x: Tensor, s: dict[str, Tensor], p: str) -> Tensor:
    w = s[p + "conv.weight"]
    x = F.conv2d(x, w, s[p + "conv.bias"], padding=w.shape[-1] // 2)
    return F.relu(_bn(x, s, p + "bn."))


def _up(x: Tensor, size: tuple[int, int]) -> Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


def reference_forward(s: dict[str, Tensor], x: Tensor) -> Tensor:
    """Official PYLON forward on a state_dict. Shapes: ``[B,1,H,W]`` -> ``[B,K,H/4,W/4]``."""
    e = "net.encoder."
    y = F.conv2d(x, s[e + "conv1.weight"], stride=2, padding=3)
    y = F.relu(_bn(y, s, e + "bn1."))
    y = F.max_pool2d(y, 3, 2, 1)
    feats = []
    for layer in range(1, 5):
        b = 0
        while f"{e}layer{layer}.{b}.conv1.weight" in s:
            p = f"{e}layer{layer}.{b}."
            stride = 2 if layer > 1 and b == 0 else 1
            z = F.relu(_bn(F.conv2d(y, s[p + "conv1.weight"]), s, p + "bn1."))
            z = F.relu(
                _bn(F.conv2d(z, s[p + "conv2.weight"], stride=stride, padding=1), s, p + "bn2.")
            )
            z = _bn(F.conv2d(z, s[p + "conv3.weight"]), s, p + "bn3.")
            if p + "downsample.0.weight" in s:
                y = _bn(
                    F.conv2d(y, s[p + "downsample.0.weight"], stride=stride), s, p + "downsample.1."
                )
            y = F.relu(z + y)
            b += 1
        feats.append(y)
    f2, f3, f4, f5 = feats
    d = "net.decoder."
    h, w = f5.shape[-2:]
    mid = _cbr(f5, s, d + "pa.mid.0.")
    x1 = _cbr(F.max_pool2d(f5, 2), s, d + "pa.down1.1.")
    x2 = _cbr(F.max_pool2d(x1, 2), s, d + "pa.down2.1.")
    x3 = _cbr(F.max_pool2d(x2, 2), s, d + "pa.down3.1.")
    t = _up(_cbr(x3, s, d + "pa.conv3."), (h // 4, w // 4)) + _cbr(x2, s, d + "pa.conv2.")
    t = _up(t, (h // 2, w // 2)) + _cbr(x1, s, d + "pa.conv1.")
    dec = _up(t, (h, w)) * mid
    for name, skip in (("up3", f4), ("up2", f3), ("up1", f2)):
        p = f"{d}{name}.conv1."
        if p + "0.conv.weight" in s:
            k = _cbr(_cbr(skip, s, p + "0."), s, p + "1.")
        else:
            k = _cbr(skip, s, p)
        dec = _up(dec, tuple(skip.shape[-2:])) + k
    return F.conv2d(dec, s["net.segmentation_head.0.weight"], s["net.segmentation_head.0.bias"])
