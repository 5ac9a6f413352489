"""HMR-Net losses (docs/hmrnet.md): manifold regularisation (Eq. 2-6) against a hand computation,
gradient check, degenerate batches; shape regression loss (Eq. 10); point normalisation (§2.4)."""
import math

import pytest
import torch

from organmtl.detectron_heads.hmrnet.manifold_loss import heat_kernel_knn_similarity, manifold_loss, normalized_laplacian
from organmtl.detectron_heads.hmrnet.shape_head import decode_points, encode_points, shape_regression_loss

# 4 targets on a line: pairwise distances 1, 3, 7, 2, 6, 4 -> sigma = 23/6
Y4 = torch.tensor([[0.0, 0.0], [1.0, 0.0], [3.0, 0.0], [7.0, 0.0]], dtype=torch.float64)
Z4 = torch.tensor([[1.0], [2.0], [0.0], [-1.0]], dtype=torch.float64)


def test_manifold_loss_equals_hand_computed_value_k1():
    sigma = (1 + 3 + 7 + 2 + 6 + 4) / 6
    e = lambda d: math.exp(-d * d / (2 * sigma * sigma))  # noqa: E731
    # k = 1 nearest neighbours: 0->1, 1->0, 2->1, 3->2; after max(S, S^T): edges 01, 12, 23 (6 non-zeros)
    s01, s12, s23 = e(1), e(2), e(4)
    deg = [s01, s01 + s12, s12 + s23, s23]
    z = [1.0, 2.0, 0.0, -1.0]
    n = [z[i] / math.sqrt(deg[i]) for i in range(4)]
    # tr(Z^T D^-1/2 (D - S) D^-1/2 Z) = sum over undirected edges S_ij (z_i/sqrt(d_i) - z_j/sqrt(d_j))^2
    trace = s01 * (n[0] - n[1]) ** 2 + s12 * (n[1] - n[2]) ** 2 + s23 * (n[2] - n[3]) ** 2
    expected = 2.0 / 6 * trace
    s = heat_kernel_knn_similarity(Y4, k=1)
    assert s[0, 1] == pytest.approx(s01) and s[2, 1] == pytest.approx(s12) and s[3, 2] == pytest.approx(s23)
    assert int((s > 0).sum()) == 6 and torch.equal(s, s.T)
    assert manifold_loss(Z4, Y4, k=1).item() == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(1.03345, abs=1e-5)    # S = 0.9666, 0.8727, 0.5800


def test_normalized_laplacian_definition():
    s = heat_kernel_knn_similarity(Y4, k=2)
    d = torch.diag(s.sum(1))
    dm = torch.diag(s.sum(1) ** -0.5)
    assert torch.allclose(normalized_laplacian(s), dm @ (d - s) @ dm)


def test_manifold_loss_gradcheck_and_gradient_only_to_latent():
    z = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    y = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda zz: manifold_loss(zz, y, k=2), (z,))
    manifold_loss(z, y, k=2).backward()
    assert z.grad is not None and y.grad is None


@pytest.mark.parametrize("n", [0, 1, 2, 3])
def test_manifold_loss_degenerate_batches_are_finite(n):
    z = torch.randn(n, 4, requires_grad=True)
    y = torch.randn(n, 10)
    loss = manifold_loss(z, y, k=5)                  # n < k + 1 throughout
    assert torch.isfinite(loss)
    if n < 2:
        assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(z.grad).all()


def test_manifold_loss_identical_targets_is_zero():
    z = torch.randn(4, 3, requires_grad=True)
    loss = manifold_loss(z, torch.ones(4, 6), k=2)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(z.grad, torch.zeros_like(z))


def test_shape_regression_loss_eq10():
    q = torch.tensor([[0.5, -0.5], [0.0, 1.0]])
    q_star = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    # MSE = (0.25 + 0.25 + 0 + 1) / 4 ; mean q^2 = (0.25 + 0.25 + 0 + 1) / 4
    assert shape_regression_loss(q, q_star).item() == pytest.approx(0.375)
    assert shape_regression_loss(q, q_star, norm_weight=0.5).item() == pytest.approx(0.375 + 0.5 * 0.375)
    empty = torch.zeros(0, 2, requires_grad=True)
    assert shape_regression_loss(empty, empty.detach()).item() == 0.0


def test_point_normalisation_round_trip():
    boxes = torch.tensor([[10.0, 20.0, 50.0, 40.0]])
    pts = torch.tensor([[[10.0, 20.0], [50.0, 40.0], [30.0, 30.0]]])
    q = encode_points(pts, boxes)
    assert torch.allclose(q, torch.tensor([[-1.0, -1.0, 1.0, 1.0, 0.0, 0.0]]))
    assert torch.allclose(decode_points(q, boxes), pts)
    assert decode_points(torch.zeros(0, 6), torch.zeros(0, 4)).shape == (0, 3, 2)     # no detections
