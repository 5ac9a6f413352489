"""The triplanar CNN of Moeskops et al. (multi-task CNN paper §3.1, Fig. 1; docs/multitask_cnn.md).

Per voxel, three orthogonal patches (axial, sagittal, coronal) go through ONE shared stack of
3x3 convolution layers (32 kernels each, 25 layers, no subsampling, batch normalisation, ELU); the
32 features of each plane are concatenated to 96 features, followed by two "fully connected" layers
of 192 nodes implemented as 1x1 convolutions (batch normalisation, ELU, dropout) and a softmax layer
over the union of the tasks' classes.

Fully convolutional (§3.1 "to allow fast processing of arbitrarily sized images"): the 2D stack is
applied to every slice of the volume in each of the three orientations (slices folded into the batch
dimension), so one forward pass labels every voxel. The convolutions are zero-padded ("same") so
the output has the input's size, as nnU-Net's patch-based training and sliding-window inference
expect; a voxel whose in-plane neighbourhood of radius ``num_conv`` lies inside the input gets
exactly the value that a 51 x 51 valid triplanar patch (for 25 layers) would give it.

Array axes follow nnU-Net: ``(batch, channel, axis0, axis1, axis2)``; the "axial" plane is
``(axis1, axis2)``, "coronal" ``(axis0, axis2)``, "sagittal" ``(axis0, axis1)`` (for the usual
z, y, x order). For 2D configurations (``ndim=2``) only the in-plane stack exists (32 features).
The network returns logits; nnU-Net's loss and inference apply the softmax.
"""
from __future__ import annotations

import torch
from torch import nn

PLANES_3D = ("axial", "coronal", "sagittal")


def conv_stack(in_channels: int, num_conv: int = 25, features: int = 32) -> nn.Sequential:
    """The shared stack of §3.1: ``num_conv`` x (3x3 conv, BN, ELU), no subsampling."""
    layers = []
    for i in range(num_conv):
        layers += [nn.Conv2d(in_channels if i == 0 else features, features, 3, padding=1, bias=False),
                   nn.BatchNorm2d(features), nn.ELU(inplace=True)]
    return nn.Sequential(*layers)


class TriplanarCNN(nn.Module):
    """Moeskops et al.'s network (§3.1): shared triplanar conv stack -> 2 x 1x1 FC (192) -> classes.

    ``num_conv`` (25 in the paper) sets the in-plane receptive field ``2 * num_conv + 1``
    (51 x 51 for 25 layers); ``dropout`` is applied after both FC layers (the paper gives no rate).
    """

    def __init__(self, in_channels: int, num_classes: int, num_conv: int = 25, features: int = 32,
                 fc_features: int = 192, dropout: float = 0.5, ndim: int = 3):
        super().__init__()
        if ndim not in (2, 3):
            raise ValueError(f"TriplanarCNN: ndim must be 2 or 3, got {ndim}")
        if num_conv < 1:
            raise ValueError(f"TriplanarCNN: num_conv must be >= 1, got {num_conv}")
        self.ndim, self.num_conv, self.features = ndim, num_conv, features
        self.stack = conv_stack(in_channels, num_conv, features)
        conv = nn.Conv3d if ndim == 3 else nn.Conv2d
        bn = nn.BatchNorm3d if ndim == 3 else nn.BatchNorm2d
        planes = 3 if ndim == 3 else 1
        # the FC layers are 1x1 convolutions; dropout is element-wise (nn.Dropout), as on an FC layer
        self.fc = nn.Sequential(
            conv(planes * features, fc_features, 1, bias=False), bn(fc_features), nn.ELU(inplace=True),
            nn.Dropout(dropout),
            conv(fc_features, fc_features, 1, bias=False), bn(fc_features), nn.ELU(inplace=True),
            nn.Dropout(dropout))
        self.classifier = conv(fc_features, num_classes, 1)

    @property
    def receptive_field(self) -> int:
        """In-plane size of the patch one output voxel sees (51 for the paper's 25 layers)."""
        return 2 * self.num_conv + 1

    def _plane(self, x: torch.Tensor, plane: str) -> torch.Tensor:
        """Apply the shared stack to every slice of ``x`` (B, C, D0, D1, D2) in one orientation;
        returns (B, features, D0, D1, D2)."""
        b, c, d0, d1, d2 = x.shape
        f = self.features
        if plane == "axial":          # slices along axis 0, plane (axis1, axis2)
            y = self.stack(x.permute(0, 2, 1, 3, 4).reshape(b * d0, c, d1, d2))
            return y.reshape(b, d0, f, d1, d2).permute(0, 2, 1, 3, 4)
        if plane == "coronal":        # slices along axis 1, plane (axis0, axis2)
            y = self.stack(x.permute(0, 3, 1, 2, 4).reshape(b * d1, c, d0, d2))
            return y.reshape(b, d1, f, d0, d2).permute(0, 2, 3, 1, 4)
        if plane == "sagittal":       # slices along axis 2, plane (axis0, axis1)
            y = self.stack(x.permute(0, 4, 1, 2, 3).reshape(b * d2, c, d0, d1))
            return y.reshape(b, d2, f, d0, d1).permute(0, 2, 3, 4, 1)
        raise ValueError(f"unknown plane {plane!r}")

    def features_per_voxel(self, x: torch.Tensor) -> torch.Tensor:
        """The 96 (3D) or 32 (2D) concatenated features per voxel (§3.1)."""
        if x.ndim != self.ndim + 2:
            raise ValueError(f"TriplanarCNN({self.ndim}D) expects a {self.ndim + 2}D tensor "
                             f"(batch, channel, ...), got shape {tuple(x.shape)}")
        if self.ndim == 2:
            return self.stack(x)
        return torch.cat([self._plane(x, p) for p in PLANES_3D], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits over the union classes for every voxel of ``x`` (softmax is the loss'/inference's)."""
        return self.classifier(self.fc(self.features_per_voxel(x)))
