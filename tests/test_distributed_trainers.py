"""The real landmark and multi-task trainers under DDP (two gloo processes on the CPU): a rank whose
batch holds no landmark, or no sample of a task, must run the same forward/backward/collective
sequence as the others (docs/scaling.md, "Multi-GPU"). A skipped loss term leaves its parameters
without gradient on that rank: DDP's reducer then waits for an all-reduce the rank never starts
(a hang, or "Expected to have finished reduction" on the next step).

Each process builds the trainer as ``nnUNetv2_train -num_gpus 2`` does (``dist`` initialised
before the trainer, so nnU-Net splits the batch and wraps the network in ``DistributedDataParallel``
in ``initialize()``, and builds its losses with ``ddp=True``). nnU-Net's DDP path hard-codes CUDA
(``device = cuda:rank``, ``DDP(..., device_ids=[rank])``); only that device choice is replaced for
the CPU: the device is set back to the CPU before ``initialize()`` and nnU-Net's ``DDP`` name wraps
CPU modules (no ``device_ids``). Rank 1's batches lack landmarks / a task; after two steps both
ranks must hold identical parameters, changed by the steps. A hang fails the test through the
process-group timeout and the join timeout.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from tests.helpers import run_spawned_ranks

WORLD = 2
STEPS = 2
PG_TIMEOUT_S = 60          # a collective one rank never joins fails after this
JOIN_TIMEOUT_S = 300       # the whole two-process run (imports ~10 s, every trainer ~2 s)

#: (trainer, dataset kind, plans batch_dice, what rank 1's batches lack)
CASES = [
    ("nnUNetTrainerOMTLLandmarkJoint_Tiny", "landmarks", False, {"landmarks": False}),
    ("nnUNetTrainerOMTLLandmarkJointLite_Tiny", "landmarks", True, {"landmarks": False}),
    ("nnUNetTrainerOMTLLandmarkAlternate_Tiny", "landmarks", False, {"landmarks": False}),
    ("nnUNetTrainerOMTLLandmarkUncertainty_Tiny", "landmarks", False, {"landmarks": False}),
    ("nnUNetTrainerOMTLMultiTaskBlockDice_Tiny", "landmarks", True, {"landmarks": False, "labels": (1,)}),
    ("nnUNetTrainerOMTLMultiTaskUNet_Tiny", "tasks", False, {"labels": (1,)}),
    ("nnUNetTrainerOMTLMultiTaskUNetDiceCE_Tiny", "tasks", True, {"labels": (2,)}),
]


def _rank_main(rank: int, root: str) -> None:
    from tests.trainer_steps import build_trainer, init_gloo_rank, make_batch, on_cpu, parameters

    init_gloo_rank(rank, root, WORLD, PG_TIMEOUT_S)
    try:
        import organmtl.nnunet_trainers as trainers
        from organmtl.nnunet_trainers.amp import any_rank

        results = {"any_rank": (any_rank(rank == 0, torch.device("cpu")), any_rank(False, torch.device("cpu")))}
        for i, (name, kind, batch_dice, lacking) in enumerate(CASES):
            torch.manual_seed(0)
            trainer = build_trainer(getattr(trainers, name), os.path.join(root, f"{i}_{rank}"), kind,
                                    batch_size=WORLD, batch_dice=batch_dice, before_initialize=on_cpu)
            assert trainer.is_ddp and trainer.batch_size == 1, (name, trainer.is_ddp, trainer.batch_size)
            before = parameters(trainer)
            trainer.network.train()
            losses, tasks = [], []
            for step in range(STEPS):
                batch = make_batch(trainer, 100 * i + 10 * step + rank, **(lacking if rank == 1 else {}))
                out = trainer.train_step(batch)
                losses.append(float(out["loss"]))
                tasks.append(out.get("task"))
            results[name] = {"before": before, "after": parameters(trainer), "losses": losses, "tasks": tasks}
        torch.save(results, os.path.join(root, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp_trainers")
    run_spawned_ranks(_rank_main, [(r, str(root)) for r in range(WORLD)], JOIN_TIMEOUT_S)
    return [torch.load(root / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_ranks_with_different_batch_contents_stay_identical(ddp_runs, name):
    r0, r1 = ddp_runs[0][name], ddp_runs[1][name]
    assert all(torch.isfinite(torch.tensor(r["losses"])).all() for r in (r0, r1))
    assert r0["losses"] != r1["losses"]                     # the ranks did see different batches
    assert r0["after"].keys() == r1["after"].keys()
    differ = [k for k in r0["after"] if not torch.equal(r0["after"][k], r1["after"][k])]
    assert not differ, f"{name}: parameters differ between ranks: {differ[:5]}"
    moved = [k for k in r0["after"] if not torch.equal(r0["after"][k], r0["before"][k])]
    assert len(moved) > len(r0["after"]) // 2, f"{name}: only {len(moved)} parameters changed"
    if "Uncertainty" in name:                               # the log-variances are DDP-reduced parameters
        key = "task_weighting.log_vars"
        assert key in moved and torch.equal(r0["after"][key], r1["after"][key])
    if "Alternate" in name:                                 # the same task on every rank, in turn
        assert r0["tasks"] == r1["tasks"] == ["segmentation", "landmarks"]


def test_any_rank_is_the_or_over_ranks(ddp_runs):
    assert [r["any_rank"] for r in ddp_runs] == [(True, False)] * WORLD
