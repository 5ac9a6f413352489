"""The real FocusNetV2 trainer under torch DDP: two gloo processes on the CPU (docs/focusnetv2.md "Mixed
precision and multi-GPU"). Each process builds ``nnUNetTrainerOMTLFocusNetV2_Tiny`` (a tiny stored plan,
nnU-Net splits the batch over the ranks) and runs its ``train_step`` in every phase while rank 1's batch
has no small organ: no rank may wait for a collective the other skips (a timeout fails the test), and both
ranks must end with the same parameters."""
from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from tests.helpers import run_spawned_ranks
from tests.test_focusnet_train_steps import make_batch, make_trainer, nnunet_folders, set_phase

WORLD = 2
TIMEOUT_S = 240
#: (phase, rank 0 has a small organ); rank 1 never has one. The second ``ae`` step: no rank has one.
STEPS = [("snet", True), ("sol", True), ("ae", True), ("ae", False), ("sos", True), ("joint", True), ("sos", False)]


def _rank_main(rank: int, root: str, out: str) -> None:
    torch.set_num_threads(1)
    from pathlib import Path

    from torch.nn.parallel import DistributedDataParallel as DDP

    nnunet_folders(Path(root), os.environ)
    dist.init_process_group("gloo", init_method=f"file://{root}/init", rank=rank, world_size=WORLD,
                           timeout=timedelta(seconds=TIMEOUT_S // 2))
    try:
        torch.manual_seed(rank)                       # different initial weights: DDP must broadcast rank 0's
        tr = make_trainer(batch_size=2)
        start = {n: p.detach().clone() for n, p in tr._module().named_parameters()}
        outs = []
        for i, (phase, small) in enumerate(STEPS):
            set_phase(tr, phase)
            torch.manual_seed(100 + i)                # the same centre jitter draws on both ranks
            outs.append(tr.train_step(make_batch(10 * i + rank, n=1, small=small and rank == 0)))
        params = {n: p.detach().clone() for n, p in tr._module().named_parameters()}
        torch.save({"outs": outs, "params": params, "start": start, "batch_size": tr.batch_size,
                    "ddp": isinstance(tr.network, DDP)}, os.path.join(out, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_focusnet_trainer_steps_stay_in_lockstep_when_a_rank_has_no_small_organ(tmp_path):
    root, out = tmp_path / "nnunet", tmp_path / "out"
    out.mkdir()
    nnunet_folders(root, {})
    wall = run_spawned_ranks(_rank_main, [(r, str(root), str(out)) for r in range(WORLD)], TIMEOUT_S)
    print(f"DDP FocusNet steps: {wall:.1f} s")
    r0, r1 = (torch.load(out / f"{r}.pt", weights_only=False) for r in range(WORLD))
    assert r0["ddp"] and r1["ddp"] and r0["batch_size"] == r1["batch_size"] == 1
    assert [o["focusnet_trained"] for o in r0["outs"]] == [o["focusnet_trained"] for o in r1["outs"]] \
        == [True, True, True, False, True, True, True]
    for key, p in r0["params"].items():
        assert torch.equal(p, r1["params"][key]), f"{key} differs between the ranks"
    moved = {k.split(".")[0] for k in r0["params"] if not torch.equal(r0["params"][k], r0["start"][k])}
    assert moved == {"snet", "sol", "sos", "shape_ae"}
