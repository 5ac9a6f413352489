"""organmtl's networks and losses under torch.distributed (DDP, gloo backend, 2 CPU processes).

nnU-Net's ``-num_gpus`` and Detectron2's ``launch`` run our trainers with torch DDP; nnU-Net's DDP
path itself needs CUDA, so what can run on a CPU is checked here: every method's network and loss,
wrapped in ``DistributedDataParallel`` over two gloo ranks that each see half of a batch, must give
the same gradients on both ranks (no process-local state), and for the losses that are means over
the batch, the gradient of the full batch in one process.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

WORLD = 2


def _models_and_losses():
    """(name, module factory, batch factory, loss(module, batch), decomposable over the batch)."""
    import torch.nn.functional as F

    from organmtl.nnunet_trainers.focusnet.losses import SegmentationLoss
    from organmtl.nnunet_trainers.landmarks.losses import UncertaintyWeighting, heatmap_mse
    from organmtl.nnunet_trainers.multitask.triplanar import TriplanarCNN
    from organmtl.detectron_heads.hmrnet.manifold_loss import manifold_loss

    def batch(seed, n=4, classes=3):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, 1, 6, 8, 8, generator=g)
        y = torch.randint(0, classes, (n, 1, 6, 8, 8), generator=g)
        return x, y

    class SegAndLandmarks(torch.nn.Module):
        """A two-tail network with Kendall weighting, as the landmark auxiliary-task trainers use."""

        def __init__(self):
            super().__init__()
            self.body = torch.nn.Conv3d(1, 4, 3, padding=1)
            self.seg, self.lm = torch.nn.Conv3d(4, 3, 1), torch.nn.Conv3d(4, 1, 1)
            self.weighting = UncertaintyWeighting()

        def forward(self, x):
            h = torch.relu(self.body(x))
            return self.seg(h), torch.sigmoid(self.lm(h))

    def seg_lm_loss(m, b):
        x, y = b
        seg, lm = m(x)
        target = (y == 1).float()
        inner = m.module if isinstance(m, DDP) else m
        return inner.weighting([F.cross_entropy(seg, y[:, 0]), heatmap_mse(lm, target)])

    class ShapeRegressor(torch.nn.Module):
        """Latent + point regression, the SRN's manifold-regularised part."""

        def __init__(self):
            super().__init__()
            self.latent, self.out = torch.nn.Linear(16, 8), torch.nn.Linear(8, 10)

        def forward(self, x):
            z = torch.tanh(self.latent(x))
            return z, self.out(z)

    def manifold_batch(seed):
        g = torch.Generator().manual_seed(seed)
        return torch.randn(8, 16, generator=g), torch.rand(8, 10, generator=g)

    def manifold_total(m, b):
        x, y = b
        z, q = m(x)
        return F.mse_loss(q, y) + manifold_loss(z, y, k=2)

    focal_gdl = SegmentationLoss(alpha=[0.2, 0.5, 0.3])
    return [
        ("triplanar CNN + cross-entropy", lambda: TriplanarCNN(1, 3, num_conv=2, features=4, fc_features=8),
         batch, lambda m, b: F.cross_entropy(m(b[0]), b[1][:, 0]), True),
        ("landmark tails + uncertainty weighting", SegAndLandmarks, batch, seg_lm_loss, True),
        ("FocusNet focal + generalised Dice", lambda: torch.nn.Conv3d(1, 3, 3, padding=1), batch,
         lambda m, b: focal_gdl(m(b[0]), b[1]), False),
        ("HMR-Net shape MSE + manifold", ShapeRegressor, manifold_batch, manifold_total, False),
    ]


def _rank_main(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)
        for i, (name, make, make_batch, loss_fn, _) in enumerate(_models_and_losses()):
            torch.manual_seed(i)
            model = make().eval()          # running BN statistics, no dropout: the same function on every rank
            full = make_batch(100 + i)
            half = tuple(t.chunk(WORLD)[rank] for t in full)
            ddp = DDP(model)
            loss = loss_fn(ddp, half)
            loss.backward()
            grads = {n: p.grad.clone() for n, p in ddp.module.named_parameters() if p.grad is not None}
            torch.save({"name": name, "loss": loss.detach(), "grads": grads}, os.path.join(out_dir, f"{i}_{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_rank_main, args=(str(out / "init"), str(out)), nprocs=WORLD, join=True)
    return out


@pytest.mark.parametrize("index", range(4))
def test_ddp_gradients_agree_across_ranks_and_with_one_process(ddp_results, index):
    name, make, make_batch, loss_fn, decomposable = _models_and_losses()[index]
    ranks = [torch.load(ddp_results / f"{index}_{r}.pt") for r in range(WORLD)]
    assert all(torch.isfinite(r["loss"]) for r in ranks), name
    assert ranks[0]["grads"].keys() == ranks[1]["grads"].keys() and ranks[0]["grads"], name
    for key in ranks[0]["grads"]:                        # DDP all-reduced: identical on every rank
        torch.testing.assert_close(ranks[0]["grads"][key], ranks[1]["grads"][key], msg=f"{name}: {key}")
    if decomposable:                                     # mean losses: 2 ranks x half batch == 1 process x batch
        torch.manual_seed(index)
        model = make().eval()
        loss_fn(model, make_batch(100 + index)).backward()
        for key, p in model.named_parameters():
            if p.grad is not None:
                torch.testing.assert_close(ranks[0]["grads"][key], p.grad, rtol=1e-4, atol=1e-6,
                                           msg=f"{name}: {key}")
