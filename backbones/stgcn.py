"""STGCN-style backbone (Yu et al., IJCAI 2018): ST-Conv blocks of gated temporal
convolutions around a Chebyshev graph convolution, then an output block per region.
"""

from __future__ import annotations

from typing import Any

import einops
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_geometric.nn import ChebConv

from stbat_backbones._common import FeatureBackbone, check_graph_input, graph_cache, register_hook
from stbat_backbones._temporal import CausalConv


class TemporalGLU(nn.Module):
    r"""Gated causal temporal convolution :math:`(P + X_{res}) \odot \sigma(Q)`.

    ``[P, Q]`` is a convolution over time with ``2 * out_channels`` outputs, shared by all
    regions; the residual is ``x`` itself or a linear map of it when the widths differ.
    The input is left-padded by ``kernel_size - 1`` steps, so ``t`` is kept.

    Shapes:
        x: ``[b, t, n, c_in]`` -> ``[b, t, n, c_out]``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3):
        super().__init__()
        self.conv = CausalConv(in_channels, 2 * out_channels, kernel_size)
        self.align = nn.Identity() if in_channels == out_channels else \
            nn.Linear(in_channels, out_channels)

    def forward(self, x: Tensor) -> Tensor:
        # x: [b, t, n, c]
        p, q = self.conv(x).chunk(2, dim=-1)
        return (p + self.align(x)) * torch.sigmoid(q)


class SparseChebConv(ChebConv):
    r"""torch-geometric's ``ChebConv`` on node-major ``[n, B, c]``, propagating with a sparse matmul.

    The same parameters, normalisation (``ChebConv.__norm__``: the scaled Laplacian
    :math:`\tilde L = 2L/\lambda_{max} - I`) and Chebyshev recursion
    :math:`T_0 = X,\ T_1 = \tilde L X,\ T_k = 2\tilde L T_{k-1} - T_{k-2}` as ``ChebConv``; but
    :math:`\tilde L` is built once per graph (:data:`~stbat_backbones._common.graph_cache`) as a
    sparse ``[n, n]`` matrix, and every sample and step is propagated by one sparse matmul
    instead of a gather and scatter over the edges of each.

    Shapes:
        x: ``[n, B, c_in]``, edge_index ``[2, E]``, edge_weight ``[E]`` -> ``[n, B, c_out]``.
    """

    def forward(self, x: Tensor, edge_index: Tensor, edge_weight: Tensor | None = None,
                batch: Tensor | None = None, lambda_max: Tensor | None = None) -> Tensor:
        # x: [n, B, c]
        if batch is not None or lambda_max is not None:
            raise ValueError("SparseChebConv: 'batch' and 'lambda_max' are not supported; "
                             "use torch_geometric.nn.ChebConv for batched graphs")
        n = x.shape[0]
        op = graph_cache.get("cheb", edge_index, edge_weight,
                             (n, x.dtype, x.device, self.normalization),
                             lambda: self._operator(edge_index, edge_weight, n, x.dtype))

        def propagate(h: Tensor) -> Tensor:
            return torch.sparse.mm(op, h.reshape(n, -1)).view(h.shape)

        tx_0, tx_1 = x, x
        out = self.lins[0](tx_0)
        if len(self.lins) > 1:
            tx_1 = propagate(x)
            out = out + self.lins[1](tx_1)
        for lin in self.lins[2:]:
            tx_2 = 2.0 * propagate(tx_1) - tx_0
            out = out + lin(tx_2)
            tx_0, tx_1 = tx_1, tx_2
        return out if self.bias is None else out + self.bias

    def _operator(self, edge_index: Tensor, edge_weight: Tensor | None, n: int,
                  dtype: torch.dtype) -> Tensor:
        """Sparse :math:`\tilde L` ``[n, n]``, row = target (``ChebConv``'s messages, summed)."""
        ei, norm = self.__norm__(edge_index, n, edge_weight, self.normalization, None, dtype=dtype)
        return torch.sparse_coo_tensor(ei.flip(0), norm.to(dtype), (n, n),
                                       check_invariants=False).coalesce()


class STConvBlock(nn.Module):
    """Temporal GLU -> ChebConv (ReLU) -> temporal GLU -> LayerNorm over channels.

    Shapes:
        x: ``[b, t, n, c_in]``, edge_index ``[2, E]`` -> ``[b, t, n, channels[2]]``.
    """

    def __init__(self, in_channels: int, channels: tuple[int, int, int], kernel_size: int,
                 cheb_k: int, dropout: float):
        super().__init__()
        self.temporal1 = TemporalGLU(in_channels, channels[0], kernel_size)
        self.graph = SparseChebConv(channels[0], channels[1], K=cheb_k)
        self.temporal2 = TemporalGLU(channels[1], channels[2], kernel_size)
        self.norm = nn.LayerNorm(channels[2])
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, edge_index: Tensor, edge_weight: Tensor | None) -> Tensor:
        # x: [b, t, n, c]
        b = x.shape[0]
        h = einops.rearrange(self.temporal1(x), "b t n c -> n (b t) c")
        h = F.relu(self.graph(h, edge_index, edge_weight))
        h = einops.rearrange(h, "n (b t) c -> b t n c", b=b)
        return self.drop(self.norm(self.temporal2(h)))


class STGCN(FeatureBackbone):
    r"""STGCN-style feature extractor for graph cities.

    Paper: https://arxiv.org/abs/1709.04875 (Yu et al., IJCAI 2018).

    The spatial layer is ``torch_geometric.nn.ChebConv`` (Chebyshev polynomials of the
    scaled Laplacian up to order ``cheb_k - 1``). Differences from the original, so that one
    model runs on cities of any size and on 6-step windows: temporal convolutions are
    left-padded (causal) instead of shrinking ``t`` by ``kernel_size - 1`` each (two blocks
    would consume a 6-step window), and LayerNorm normalises channels only (the original's
    ``LayerNorm([n, c])`` has per-node parameters). The output block is a temporal GLU whose
    last step sees the whole window, LayerNorm, then ``ReLU(FC)`` as the features.

    Args:
        in_channels: input channels ``c`` (default: ``1``).
        channels: widths of each ST-Conv block, temporal / graph / temporal
            (default: ``(64, 16, 64)``, as the paper).
        num_blocks: ST-Conv blocks (default: ``2``).
        kernel_size: temporal kernel ``K_t`` (default: ``3``).
        cheb_k: Chebyshev filter size ``K`` (default: ``3``).
        dropout: (default: ``0.0``). feature_dim: size ``d`` of the features (default: ``128``).

    Shapes:
        x: ``[b, t, n, c]``, edge_index ``[2, E]``, edge_weight ``[E]`` -> ``[b, n, d]``.
    """

    layout = "graph"

    def __init__(self, in_channels: int = 1, channels: tuple[int, int, int] = (64, 16, 64),
                 num_blocks: int = 2, kernel_size: int = 3, cheb_k: int = 3,
                 dropout: float = 0.0, feature_dim: int = 128):
        super().__init__()
        if len(channels) != 3 or num_blocks < 1:
            raise ValueError(f"STGCN: expected channels=(temporal, graph, temporal) and "
                             f"num_blocks >= 1 (got channels={channels}, num_blocks={num_blocks})")
        widths = [in_channels] + [channels[2]] * num_blocks
        self.blocks = nn.ModuleList(
            STConvBlock(widths[i], tuple(channels), kernel_size, cheb_k, dropout)
            for i in range(num_blocks)
        )
        self.output = TemporalGLU(channels[2], channels[2], kernel_size)
        self.norm = nn.LayerNorm(channels[2])
        self.fc = nn.Linear(channels[2], feature_dim)
        self.feature_dim = feature_dim

    def forward_features(self, x: Tensor, edge_index: Tensor | None = None,
                         edge_weight: Tensor | None = None, **_: Any) -> Tensor:
        # x: [b, t, n, c]
        edge_index = check_graph_input("STGCN", x, edge_index)
        h = x
        for block in self.blocks:
            h = block(h, edge_index, edge_weight)
        h = self.norm(self.output(h)[:, -1])
        return F.relu(self.fc(h))


stbat_register_backbones = register_hook(
    "stgcn", STGCN, "STGCN: ST-Conv blocks of gated temporal convs around ChebConv (K=3)")
