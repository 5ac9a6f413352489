"""Small layers of HMR-Net: maxout (§2.3, §2.5), CoordConv channels (§2.2) and cross-stitch
units (§2.2, Fig. 4)."""
from __future__ import annotations

import torch
from torch import nn


class Maxout(nn.Module):
    """Fully connected maxout layer (Goodfellow et al. 2013), the activation HMR-Net puts on the
    last FC of the LRN box head (§2.3) and of the SRN shape head (§2.5): ``pieces`` affine maps
    per output unit, the output is their maximum. ``(N, in) -> (N, out)``."""

    def __init__(self, in_features: int, out_features: int, pieces: int = 2):
        super().__init__()
        if pieces < 1:
            raise ValueError(f"Maxout: pieces must be >= 1, got {pieces}")
        self.out_features, self.pieces = out_features, pieces
        self.linear = nn.Linear(in_features, out_features * pieces)
        nn.init.kaiming_normal_(self.linear.weight)       # He init (Table 2, step 1)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x.flatten(1))
        return y.view(y.shape[0], self.out_features, self.pieces).amax(dim=2)


def add_coord_channels(x: torch.Tensor) -> torch.Tensor:
    """CoordConv input (§2.2, Liu et al. 2018): append two channels holding the column (x) and
    row (y) coordinate of each pixel, normalised to [-1, 1] over the (padded) batch tensor.
    ``(N, C, H, W) -> (N, C + 2, H, W)``."""
    n, _, h, w = x.shape
    ys = torch.linspace(-1.0, 1.0, h, device=x.device, dtype=x.dtype)
    xs = torch.linspace(-1.0, 1.0, w, device=x.device, dtype=x.dtype)
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    coords = torch.stack([xx, yy]).unsqueeze(0).expand(n, 2, h, w)
    return torch.cat([x, coords], dim=1)


class CrossStitchUnit(nn.Module):
    """Cross-stitch unit (Misra et al. 2016; learned as in Ruder et al. 2017), §2.2 / Fig. 4:
    ``[a'; b'] = alpha @ [a; b]`` with one learned 2x2 ``alpha`` per unit, mixing the same stage of
    the detection N-Net (a) and the shape N-Net (b). Initialised to ``[[s, 1-s], [1-s, s]]``
    (near identity for s = 0.9); ``s = 1`` gives two independent networks exactly."""

    def __init__(self, self_weight: float = 0.9):
        super().__init__()
        s = float(self_weight)
        self.alpha = nn.Parameter(torch.tensor([[s, 1.0 - s], [1.0 - s, s]]))

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        al = self.alpha.to(a.dtype)
        return al[0, 0] * a + al[0, 1] * b, al[1, 0] * a + al[1, 1] * b
