"""INSIGHT over a volume's slices, with an optional cross-slice (3x3x3) context branch.

The official CT reading (spec section 1; radiographs-and-ct.md 3.2) treats each slice like a WSI
tile: 2-D context per slice with replication at its border, SmoothMax over every slice's cells.
That is :class:`fastinsight.models.insight.InsightModel` as it stands, fed ``[D, C, h, w]``.

:class:`CrossSliceInsight` extends the context branch to the neighbouring slices: each 3x3
convolution becomes 3x3x3 over ``(slice, row, column)``, with replication padding at the first
and last slice as at the in-plane border. Detection (1x1) is unchanged. Norms stay per slice
(``LayerNorm([c, h, w])`` or the per-cell channel norm), so parameter names and every shape but
the context kernels match the 2-D model. :meth:`CrossSliceInsight.from_2d` puts a 2-D model's
kernels in the centre slice (zeros elsewhere): the result computes exactly the 2-D model.

The slices of one forward call must be consecutive slices of one volume, in order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastinsight.models.config import InsightConfig
from fastinsight.models.insight import InsightModel
from fastinsight.ops.reference import gate

SLICE_CONTEXTS = ("2d", "3d")


class CrossSliceInsight(InsightModel):
    """INSIGHT whose context convolutions span neighbouring slices (3x3x3).

    Input: one volume's slice grids ``[D, C, h, w]`` in slice order. Always the PyTorch path
    (the fused kernels are 2-D).
    """

    slice_context = "3d"

    def __init__(self, config: InsightConfig | None = None, backend: str = "reference") -> None:
        super().__init__(config, backend="reference")
        if self.config.context != "tile":
            from fastinsight.errors import CheckpointError

            raise CheckpointError(
                "the cross-slice model takes per-slice grids (context='tile'), got "
                f"context={self.config.context!r}"
            )
        # Swap each 3x3 conv for a 3x3x3 one; pads become 3-D replication pads. Indices (and so
        # state_dict names) stay those of the official context_block.
        for i, m in enumerate(self.context_block):
            if isinstance(m, nn.ReplicationPad2d):
                self.context_block[i] = nn.ReplicationPad3d(1)
            elif isinstance(m, nn.Conv2d):
                self.context_block[i] = nn.Conv3d(m.in_channels, m.out_channels, 3)

    @property
    def uses_kernels(self) -> bool:
        return False

    def _context(self, z: Tensor) -> Tensor:
        """Shapes: z ``[D, c, h, w]`` -> context logits ``[D, K, h, w]``."""
        x = z.transpose(0, 1)[None]  # [1, c, D, h, w]
        for m in self.context_block:
            if isinstance(m, (nn.ReplicationPad3d, nn.Conv3d)):
                x = m(x)
            elif isinstance(m, nn.GELU):
                x = F.gelu(x)
            else:  # a per-slice norm: over [c, h, w] (tile) or c (channel) of each slice
                x = m(x[0].transpose(0, 1)).transpose(0, 1)[None]
        return x[0].transpose(0, 1)

    def logits(self, tokens: Tensor, cell_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Shapes: tokens ``[D, C, h, w]`` | ``[D, h*w, C]`` -> (D, Cx) each ``[D, K, h, w]``.

        ``cell_mask`` is ignored (as for the per-tile model): every slice's cells are context.
        """
        grid = self._check_tokens(tokens)
        grid = grid.to(next(self.parameters()).dtype)
        z = self.reduce_dimension_block(grid)
        return self.backbone_block(z), self._context(z)

    def forward(self, tokens: Tensor, cell_mask: Tensor | None = None) -> Tensor:
        """Raw heatmap. Shapes: ``[D, C, h, w]`` -> ``[D, K, h, w]``."""
        return gate(*self.logits(tokens))

    def raw_heatmap(self, tokens: Tensor, chunk_size: int | None = 4096) -> Tensor:
        """The whole volume at once: chunking along slices would cut the 3-D context."""
        return self(tokens)

    @classmethod
    def from_2d(cls, model: InsightModel) -> CrossSliceInsight:
        """A cross-slice model that computes exactly ``model`` (kernels in the centre slice)."""
        out = cls(model.config)
        state = {}
        for key, value in model.state_dict().items():
            target = out.state_dict()[key]
            if value.ndim == 4 and target.ndim == 5:
                w = torch.zeros_like(target)
                w[:, :, 1] = value
                value = w
            state[key] = value
        out.load_state_dict(state, strict=True)
        return out.to(next(model.parameters()).device)


def build_volume_model(
    config: InsightConfig, slice_context: str = "2d", backend: str = "auto"
) -> InsightModel:
    """``"2d"``: the official per-slice model; ``"3d"``: :class:`CrossSliceInsight`."""
    if slice_context == "2d":
        return InsightModel(config, backend=backend)
    if slice_context == "3d":
        return CrossSliceInsight(config)
    from fastinsight.errors import InputError

    raise InputError(f"slice_context must be one of {SLICE_CONTEXTS}, got {slice_context!r}")


def slice_context_of(model: InsightModel) -> str:
    return "3d" if isinstance(model, CrossSliceInsight) else "2d"
