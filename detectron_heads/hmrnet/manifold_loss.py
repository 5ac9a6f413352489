"""Manifold regularisation of HMR-Net (paper §2.5, Eq. 2-6).

Over the N positive ROIs of a batch with shape targets ``Y`` (N, 2p) and SRN latent features ``Z``
(N, M):

* Eq. 2: kNN graph on Y with heat-kernel weights ``S_ij = exp(-||Yi - Yj||^2 / (2 sigma^2))`` for
  ``Yj`` among the k nearest neighbours of ``Yi`` (i != j), 0 otherwise;
  ``sigma = 2 / (N (N-1)) * sum_{i<j} ||Yi - Yj||`` (mean pairwise distance);
* symmetrised ``S = max(S, S^T)``;
* Eq. 5: normalised Laplacian ``L = D^-1/2 (D - S) D^-1/2``;
* Eq. 4/6: ``loss = 2 / #{S_ij > 0} * tr(Z^T L Z)``.

The graph is built from the targets only (no gradient); the gradient flows into Z. With fewer than
k+1 samples every other sample is a neighbour (k_eff = N - 1). Degenerate batches (N < 2, all
targets identical, or no edge left) give an exact 0 that is still connected to Z's graph.
"""
from __future__ import annotations

import torch


def heat_kernel_knn_similarity(y: torch.Tensor, k: int) -> torch.Tensor:
    """Eq. 2 + symmetrisation: the (N, N) similarity matrix ``max(S, S^T)`` of targets ``y`` (N, D)
    on the k-nearest-neighbour graph with heat-kernel weights and sigma = mean pairwise distance."""
    if y.dim() != 2:
        raise ValueError(f"heat_kernel_knn_similarity: targets must be (N, D), got {tuple(y.shape)}")
    if k < 1:
        raise ValueError(f"heat_kernel_knn_similarity: k must be >= 1, got {k}")
    n = y.shape[0]
    y = y.double()
    s = y.new_zeros((n, n))
    if n < 2:
        return s
    dist = torch.cdist(y, y)                                   # ||Yi - Yj||_2
    iu = torch.triu_indices(n, n, offset=1, device=y.device)
    sigma = dist[iu[0], iu[1]].mean()                          # 2/(N(N-1)) sum_{i<j}
    if not torch.isfinite(sigma) or sigma <= 0:
        return s
    k_eff = min(k, n - 1)
    masked = dist + torch.diag(torch.full((n,), float("inf"), dtype=dist.dtype, device=dist.device))
    nn_idx = masked.topk(k_eff, dim=1, largest=False).indices  # N_k(Yi), excluding i itself
    rows = torch.arange(n, device=y.device).unsqueeze(1).expand_as(nn_idx)
    s[rows, nn_idx] = torch.exp(-dist[rows, nn_idx] ** 2 / (2 * sigma ** 2))
    return torch.maximum(s, s.T)


def normalized_laplacian(s: torch.Tensor) -> torch.Tensor:
    """Eq. 5: ``D^-1/2 (D - S) D^-1/2`` with ``D = diag(sum_j S_ij)``; isolated vertices (degree 0)
    get zero rows/columns instead of a division by zero."""
    deg = s.sum(dim=1)
    inv_sqrt = torch.where(deg > 0, deg.clamp_min(torch.finfo(s.dtype).tiny).rsqrt(), torch.zeros_like(deg))
    lap = torch.diag(deg) - s
    return inv_sqrt[:, None] * lap * inv_sqrt[None, :]


def manifold_loss(z: torch.Tensor, y: torch.Tensor, k: int = 5) -> torch.Tensor:
    """Eq. 6: ``2 / #{S_ij > 0} * tr(Z^T L_norm Z)`` for latent features ``z`` (N, M) and shape
    targets ``y`` (N, 2p). Returns a 0-dim tensor in ``z``'s dtype; exactly 0 (with a gradient path
    to ``z``) for N < 2 or a graph without edges."""
    if z.dim() != 2 or y.dim() != 2 or z.shape[0] != y.shape[0]:
        raise ValueError(f"manifold_loss: z (N, M) and y (N, D) must share N, got {tuple(z.shape)} and {tuple(y.shape)}")
    zero = z.sum() * 0.0
    if z.shape[0] < 2:
        return zero
    with torch.no_grad():
        s = heat_kernel_knn_similarity(y.detach(), k)
        nnz = int((s > 0).sum())
        if nnz == 0:
            return zero
        lap = normalized_laplacian(s).to(z.dtype)
    return 2.0 / nnz * torch.trace(z.T @ lap @ z)
