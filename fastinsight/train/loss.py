"""One slide through the model, differentiably, in checkpointed chunks; the INSIGHT loss."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from fastinsight.errors import InputError
from fastinsight.models.insight import InsightModel
from fastinsight.ops.reference import gate


def _context_halo(model: InsightModel) -> int:
    """Grid rows a band needs on each side so the 3x3 context chain is exact inside it."""
    return sum(
        1 for m in model.context_block if isinstance(m, torch.nn.Conv2d) and m.kernel_size[0] > 1
    )


def _chunks(
    model: InsightModel, tokens: Tensor, chunk_size: int
) -> list[tuple[int, int, int, int]]:
    """(input start, input stop, crop start, crop stop) along the chunked axis.

    Per-tile model: tiles, no halo. Slide-context model: row bands of about ``chunk_size`` tiles'
    cells with a halo as deep as the context chain, cropped back to the band: replication padding
    at a cut edge disturbs one more row per 3x3 layer, all inside the halo, so the band's values
    equal the unchunked ones.
    """
    if model.config.context == "tile":
        n = tokens.shape[0]
        return [
            (a, min(n, a + chunk_size), 0, min(n, a + chunk_size) - a)
            for a in range(0, n, chunk_size)
        ]
    h, w = model.config.grid_size
    rows, cols = tokens.shape[2], tokens.shape[3]
    band = max(1, (chunk_size * h * w) // max(1, cols))
    halo = _context_halo(model)
    out = []
    for r0 in range(0, rows, band):
        r1 = min(rows, r0 + band)
        a, b = max(0, r0 - halo), min(rows, r1 + halo)
        out.append((a, b, r0 - a, r1 - a))
    return out


def _checked_mask(tokens: Tensor, mask: Tensor | None, slide_ctx: bool) -> Tensor:
    """The tissue mask of a training slide (all tissue when None), after checking the shapes.

    Shapes: tokens ``[N, C, h, w]`` (``N = 1``, a stitched grid, for the slide-context model),
    mask ``[N, h, w]`` bool or None -> ``[N, h, w]`` bool.
    """
    if tokens.ndim != 4:
        raise InputError(f"training tokens must be [N, C, h, w], got {tuple(tokens.shape)}")
    if slide_ctx and tokens.shape[0] != 1:
        raise InputError(
            f"the slide-context model trains on one stitched grid [1, C, H, W] per slide, got "
            f"{tuple(tokens.shape)}; stitch the tiles first (SlideFeatures.stitched())"
        )
    if tokens.shape[0] == 0:
        raise InputError("slide has no tiles: the bag of token grids is empty")
    if mask is None:
        return torch.ones(tokens.shape[0], *tokens.shape[2:], dtype=torch.bool)
    if tuple(mask.shape) != (tokens.shape[0], *tokens.shape[2:]):
        raise InputError(
            f"mask must be {(tokens.shape[0], *tokens.shape[2:])} for tokens "
            f"{tuple(tokens.shape)}, got {tuple(mask.shape)}"
        )
    return mask


def slide_forward(
    model: InsightModel,
    tokens: Tensor,
    mask: Tensor | None,
    *,
    chunk_size: int = 512,
    grad_checkpoint: str = "auto",
    train_threshold: str = "chunk",
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """Slide scores and mean squared detection logit, differentiably, in checkpointed chunks.

    Shapes: tokens ``[N, C, h, w]`` (per-tile model) or ``[1, C, H, W]`` (slide context), mask
    ``[N, h, w]`` / ``[1, H, W]`` bool or None -> (scores ``[K]``, mean(D^2) over tissue cells
    and classes, a scalar).
    """
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    slide_ctx = model.config.context == "slide"
    mask = _checked_mask(tokens, mask, slide_ctx)
    chunks = _chunks(model, tokens, chunk_size)
    use_ckpt = torch.is_grad_enabled() and (
        grad_checkpoint == "always" or (grad_checkpoint == "auto" and len(chunks) > 1)
    )
    kept_parts: list[Tensor] = []
    raw_parts: list[Tensor] = []
    sq_total = torch.zeros((), device=dev)
    cells = 0
    for a, b, c0, c1 in chunks:
        if slide_ctx:
            x, m = tokens[:, :, a:b], mask[:, a:b]
        else:
            x, m = tokens[a:b], mask[a:b]
        if not bool(m.any()):
            continue
        x = x.to(dev, torch.float32, non_blocking=True)
        m = m.to(dev, non_blocking=True)

        def head(x: Tensor, m: Tensor, c0: int = c0, c1: int = c1) -> tuple[Tensor, Tensor]:
            d, cx = model.logits(x, m)
            if slide_ctx:
                d, cx, m = d[:, :, c0:c1], cx[:, :, c0:c1], m[:, c0:c1]
            sq = (d.float().square() * m[:, None]).sum()
            keep = m.reshape(-1)
            h = gate(d, cx).float().transpose(0, 1).reshape(d.shape[1], -1)[:, keep]
            return h, sq

        if use_ckpt:
            values, sq = checkpoint(head, x, m, use_reentrant=False)
        else:
            values, sq = head(x, m)
        if values.shape[1] == 0:
            continue
        sq_total = sq_total + sq
        cells += values.numel()
        if train_threshold == "chunk":
            t = model.threshold(values.detach(), None)
            values = values * (values > t[:, None])
            kept_parts.append(values)
        else:
            raw_parts.append(values)
    if cells == 0:
        raise InputError("the tissue mask is empty: no cell of the slide is tissue")
    if train_threshold == "chunk":
        kept = torch.cat(kept_parts, dim=1)
    else:
        kept = torch.cat(raw_parts, dim=1)
        if train_threshold == "slide":
            t = model.threshold(kept.detach(), None)
            kept = kept * (kept > t[:, None])
    scores = model.pool(kept, None)
    return scores, sq_total / cells


def bce_loss(
    scores: Tensor,
    labels: Tensor,
    *,
    floor: float = 1e-6,
    ceiling: float = 0.999,
    label_smoothing: float = 0.0,
    pos_weight: Sequence[float] | None = None,
    neg_weight: Sequence[float] | None = None,
    class_weights: Sequence[float] | None = None,
) -> Tensor:
    """The official INSIGHT BCE on pooled probabilities, mean over classes.

    ``p`` clamped to ``[floor, ceiling]`` (official: ``[0, 0.999]``; the floor keeps ``log p``
    finite), target ``y (1 - ls) + 0.5 ls``, weight ``pos_weight`` where y = 1 and ``neg_weight``
    where y = 0 (official ``InsightTrainLoss``), times ``class_weights``.
    Shapes: scores ``[K]``, labels ``[K]`` -> scalar.
    """
    p = scores.float().clamp(floor, ceiling)
    y = labels.to(p.device, torch.float32)
    target = y * (1.0 - label_smoothing) + 0.5 * label_smoothing
    k = p.shape[0]

    def vec(v: Sequence[float] | None) -> Tensor:
        return torch.ones(k, device=p.device) if v is None else torch.tensor(v, device=p.device)

    weight = y * vec(pos_weight) + (1 - y) * vec(neg_weight)
    weight = weight * vec(class_weights)
    bce = -(target * torch.log(p) + (1 - target) * torch.log1p(-p))
    return (weight * bce).mean()
