"""Causal temporal convolution on the channel-last layout, shared by gwnet and stgcn."""

from __future__ import annotations

import einops
import torch.nn.functional as F
from torch import Tensor, nn


class CausalConv(nn.Module):
    r"""Convolution over time, shared by all regions, left-padded so ``t`` is kept.

    Output step :math:`\tau` sees input steps :math:`\tau - (K-1)\,\delta, \dots, \tau`
    (kernel ``K``, dilation :math:`\delta`). Written as ``unfold`` plus ``nn.Linear`` on
    ``[b, t, n, c]`` rather than ``nn.Conv1d``, which avoids two transposes and is much
    faster in float64 on CPU (as ``check_backbone`` runs it).

    Args:
        in_channels, out_channels: widths.
        kernel_size: taps ``K`` (default: ``2``). dilation: spacing of the taps (default: ``1``).

    Shapes:
        x: ``[b, t, n, c_in]`` -> ``[b, t, n, c_out]``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 2,
                 dilation: int = 1):
        super().__init__()
        if kernel_size < 1 or dilation < 1:
            raise ValueError(f"CausalConv: expected kernel_size >= 1 and dilation >= 1 "
                             f"(got {kernel_size}, {dilation})")
        self.kernel_size, self.dilation = kernel_size, dilation
        self.span = dilation * (kernel_size - 1) + 1
        self.lin = nn.Linear(kernel_size * in_channels, out_channels)

    def forward(self, x: Tensor) -> Tensor:
        # x: [b, t, n, c]
        padded = F.pad(x, (0, 0, 0, 0, self.span - 1, 0))
        taps = padded.unfold(1, self.span, 1)[..., :: self.dilation]  # [b, t, n, c, k]
        return self.lin(einops.rearrange(taps, "b t n c k -> b t n (k c)"))
