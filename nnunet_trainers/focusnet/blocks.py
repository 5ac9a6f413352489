"""Building blocks of FocusNetv2's networks: SEResBlock and DenseASPP (FocusNetv2 paper §3.1.1,
Fig. 3, Table 10).

Tensors are ``(batch, channels, z, y, x)`` as everywhere in nnU-Net; "in-plane" means (y, x).
Normalisation is instance norm (nnU-Net's default for batch sizes of 1-2; the paper trains with
batch 1, where batch norm degenerates to the same statistics per sample).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


def _triple(v) -> tuple[int, int, int]:
    if isinstance(v, int):
        return (v, v, v)
    v = tuple(int(i) for i in v)
    if len(v) != 3:
        raise ValueError(f"expected an int or three ints, got {v}")
    return v


class SqueezeExcitation3d(nn.Module):
    """Channel attention of Hu et al. 2018 (the "SE" of the SEResBlock, paper §3.1.1): global average
    pool -> FC (C/r) -> ReLU -> FC (C) -> sigmoid -> channel-wise scaling."""

    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.fc1 = nn.Conv3d(channels, hidden, 1)
        self.fc2 = nn.Conv3d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = x.mean(dim=(2, 3, 4), keepdim=True)
        w = torch.sigmoid(self.fc2(torch.relu(self.fc1(w))))
        return x * w


class SEResBlock(nn.Module):
    """Residual block with squeeze-and-excitation (paper Fig. 3, Table 10): two 3x3x3 convolutions
    (instance norm, ReLU), SE re-weighting, identity (or 1x1x1 projection) shortcut, ReLU.

    ``dilation`` is per axis (z, y, x); the padding keeps the spatial size.
    """

    def __init__(self, in_channels: int, out_channels: int, dilation=1, se_reduction: int = 4):
        super().__init__()
        d = _triple(dilation)
        self.conv1 = nn.Conv3d(in_channels, out_channels, 3, padding=d, dilation=d, bias=False)
        self.norm1 = nn.InstanceNorm3d(out_channels, affine=True)
        self.conv2 = nn.Conv3d(out_channels, out_channels, 3, padding=d, dilation=d, bias=False)
        self.norm2 = nn.InstanceNorm3d(out_channels, affine=True)
        self.se = SqueezeExcitation3d(out_channels, se_reduction)
        self.shortcut = (nn.Identity() if in_channels == out_channels else
                         nn.Sequential(nn.Conv3d(in_channels, out_channels, 1, bias=False),
                                       nn.InstanceNorm3d(out_channels, affine=True)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.norm1(self.conv1(x)))
        y = self.se(self.norm2(self.conv2(y)))
        return torch.relu(y + self.shortcut(x))


def se_res_stack(in_channels: int, out_channels: int, n: int, dilation=1) -> nn.Sequential:
    """``n`` SEResBlocks in a row (Table 10's "SEResBlock x n")."""
    return nn.Sequential(*[SEResBlock(in_channels if i == 0 else out_channels, out_channels, dilation)
                           for i in range(n)])


class DenseASPP3d(nn.Module):
    """Densely connected atrous spatial pyramid pooling (Yang et al. 2018; paper §3.1.1, Table 10).

    Each layer sees the concatenation of the input and every previous layer's output, reduces it
    with a 1x1x1 convolution and applies a 3x3x3 convolution dilated by ``rate`` in y and x only
    (z dilation 1: small organs span only a few slices). Output = concatenation of the input and all
    layers: ``in_channels + len(rates) * growth`` channels (64 + 4 x 64 = 320 in the paper).
    """

    def __init__(self, in_channels: int = 64, rates: Sequence[int] = (3, 6, 12, 18), growth: int = 64,
                 bottleneck: int = 64):
        super().__init__()
        self.rates = tuple(int(r) for r in rates)
        self.layers = nn.ModuleList()
        ch = in_channels
        for r in self.rates:
            d = (1, r, r)
            self.layers.append(nn.Sequential(
                nn.Conv3d(ch, bottleneck, 1, bias=False), nn.InstanceNorm3d(bottleneck, affine=True),
                nn.ReLU(inplace=True),
                nn.Conv3d(bottleneck, growth, 3, padding=d, dilation=d, bias=False),
                nn.InstanceNorm3d(growth, affine=True), nn.ReLU(inplace=True)))
            ch += growth
        self.out_channels = ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [x]
        for layer in self.layers:
            feats.append(layer(torch.cat(feats, dim=1)))
        return torch.cat(feats, dim=1)
