"""The shape autoencoder of FocusNetv2's adversarial shape constraint (FocusNetv2 paper §3.3,
Appendix A1, Table 9).

Encoder: four 5x5x5 convolutions (strides 2, 2, 1, 2; 64-128-128-256 channels; batch norm + ReLU),
FC to the 512-d latent code (no activation). Decoder: FC to 256 channels at the bottleneck size
(ReLU), then trilinear x2 upsampling followed by 5x5x5 convolutions 128, 128 | 64 | 1.
The ROI is zero-padded to a multiple of 8 per axis (three stride-2 stages) and the output cropped
back. The last layer uses a sigmoid instead of Table 9's ReLU so that reconstructions of binary
masks live in [0, 1] (a ReLU output can die at 0; see docs/focusnetv2.md).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def _conv_bn_relu(cin, cout, stride=1):
    return nn.Sequential(nn.Conv3d(cin, cout, 5, stride=stride, padding=2, bias=False), nn.BatchNorm3d(cout),
                         nn.ReLU(inplace=True))


class ShapeAutoencoder(nn.Module):
    """Table 9 autoencoder for one small organ's ROI mask ``(N, 1, *roi_size)``.

    ``forward`` returns ``(reconstruction, features)`` where ``features`` = [latent code, decoder
    features at each scale]: the ``D_latent`` of Eq. 5 ("latent code and multi-scale decoder
    features").
    """

    def __init__(self, roi_size: Sequence[int], channels: Sequence[int] = (64, 128, 128, 256), latent: int = 512):
        super().__init__()
        c1, c2, c3, c4 = (int(c) for c in channels)
        fc_channels = c4
        self.roi_size = tuple(int(s) for s in roi_size)
        self.padded = tuple(int(math.ceil(s / 8) * 8) for s in self.roi_size)
        self.bottleneck = tuple(p // 8 for p in self.padded)
        self.encoder = nn.Sequential(_conv_bn_relu(1, c1, 2), _conv_bn_relu(c1, c2, 2), _conv_bn_relu(c2, c3, 1),
                                     _conv_bn_relu(c3, c4, 2))
        n_bottleneck = c4 * math.prod(self.bottleneck)
        self.fc_latent = nn.Linear(n_bottleneck, latent)
        self.fc_decode = nn.Linear(latent, fc_channels * math.prod(self.bottleneck))
        self.fc_channels = fc_channels
        self.up1 = nn.Sequential(_conv_bn_relu(fc_channels, c3), _conv_bn_relu(c3, c2))
        self.up2 = _conv_bn_relu(c2, c1)
        self.out = nn.Conv3d(c1, 1, 5, padding=2)

    def encode(self, mask: torch.Tensor) -> torch.Tensor:
        """512-d latent code of a ROI mask (Appendix A1: "the output of the first FC layer")."""
        return self.fc_latent(self.encoder(self._pad(mask)).flatten(1))

    def _pad(self, mask):
        if tuple(mask.shape[2:]) != self.roi_size:
            raise ValueError(f"shape autoencoder: mask of spatial size {tuple(mask.shape[2:])}, expected {self.roi_size}")
        pad = []
        for s, p in zip(reversed(self.roi_size), reversed(self.padded)):
            pad += [0, p - s]
        return F.pad(mask, pad)

    def forward(self, mask: torch.Tensor):
        z = self.encode(mask)
        h = torch.relu(self.fc_decode(z)).view(mask.shape[0], self.fc_channels, *self.bottleneck)
        f1 = self.up1(F.interpolate(h, scale_factor=2, mode="trilinear", align_corners=False))
        f2 = self.up2(F.interpolate(f1, scale_factor=2, mode="trilinear", align_corners=False))
        rec = torch.sigmoid(self.out(F.interpolate(f2, scale_factor=2, mode="trilinear", align_corners=False)))
        crop = (slice(None), slice(None), *[slice(0, s) for s in self.roi_size])
        return rec[crop], [z, h, f1, f2]
