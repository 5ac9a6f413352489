"""The partial-label trainer under DDP (two gloo processes on the CPU, as
tests/test_distributed_trainers.py does for the other multi-task trainers): rank 0's batches come
from the source that annotated organ_a only, rank 1's from the one that annotated organ_b only, so
the ranks' loss masks differ. With ``batch_dice`` the masked Dice sums are all-gathered. After two
steps both ranks must hold identical, changed parameters (no hang, no skipped reduction), in both
formulations."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.distributed as dist

from tests.helpers import run_spawned_ranks

WORLD = 2
STEPS = 2
PG_TIMEOUT_S = 60
JOIN_TIMEOUT_S = 300
#: (formulation, plans batch_dice)
CASES = [("marginal", True), ("marginal", False), ("sigmoid", True)]
KEYS = {0: ["task_a_0"], 1: ["task_b_1"]}          # one sample per rank (nnU-Net splits the batch of 2)


def _rank_main(rank: int, root: str) -> None:
    from tests.trainer_steps import build_trainer, init_gloo_rank, make_batch, on_cpu, parameters

    init_gloo_rank(rank, root, WORLD, PG_TIMEOUT_S)
    try:
        import organmtl.nnunet_trainers as trainers

        results = {}
        for i, (formulation, batch_dice) in enumerate(CASES):
            os.environ["ORGANMTL_PARTIAL_LOSS"] = formulation
            torch.manual_seed(0)
            trainer = build_trainer(trainers.nnUNetTrainerOMTLPartialLabels_Tiny, os.path.join(root, f"{i}_{rank}"),
                                    "tasks", batch_size=WORLD, batch_dice=batch_dice, before_initialize=on_cpu)
            assert trainer.is_ddp and trainer.batch_size == 1 and trainer.formulation == formulation
            before = parameters(trainer)
            trainer.network.train()
            losses = []
            for step in range(STEPS):
                batch = make_batch(trainer, 100 * i + 10 * step + rank, labels=(1,) if rank == 0 else (2,))
                batch["keys"] = np.array(KEYS[rank])
                losses.append(float(trainer.train_step(batch)["loss"]))
            results[f"{formulation}-{batch_dice}"] = {"before": before, "after": parameters(trainer), "losses": losses}
        torch.save(results, os.path.join(root, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp_partial")
    run_spawned_ranks(_rank_main, [(r, str(root)) for r in range(WORLD)], JOIN_TIMEOUT_S)
    return [torch.load(root / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("case", [f"{f}-{b}" for f, b in CASES])
def test_ranks_with_different_annotated_classes_stay_identical(ddp_runs, case):
    r0, r1 = ddp_runs[0][case], ddp_runs[1][case]
    assert all(np.isfinite(r["losses"]).all() for r in (r0, r1))
    assert r0["losses"] != r1["losses"]
    differ = [k for k in r0["after"] if not torch.equal(r0["after"][k], r1["after"][k])]
    assert not differ, f"{case}: parameters differ between ranks: {differ[:5]}"
    moved = [k for k in r0["after"] if not torch.equal(r0["after"][k], r0["before"][k])]
    assert len(moved) > len(r0["after"]) // 2, f"{case}: only {len(moved)} parameters changed"
