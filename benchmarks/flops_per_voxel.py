"""Arithmetic of one training step per voxel: forward + backward FLOPs of each full trainer's network
(as its ``build_network_architecture`` builds it for a plan, the hook ``nnUNetv2_train`` and
``nnUNetv2_predict`` use) over the stock nnU-Net U-Net's, counted by ``torch.utils.flop_counter`` on
one random sample of a small patch (the networks are fully convolutional, so FLOPs per voxel hardly
depend on the patch). Loss and optimizer are not counted. Where a trainer's measured step ratio
(bench_full_size.py) is above this ratio, the difference is per-FLOP efficiency (kernel shapes,
memory traffic); where a goal is below it, no implementation of that network reaches the goal.

    .venv/bin/python benchmarks/flops_per_voxel.py --plans PATH/nnUNetPlans.json [--patch 32 64 64]

``--plans`` defaults to the PDDCA-sized plan of bench_full_size.py's work folder.
"""
from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path

TRAINERS = ("nnUNetTrainer", "nnUNetTrainerOMTLMultiTaskUNet", "nnUNetTrainerOMTLTriplanar")
CONFIG = "3d_fullres"
DEFAULT_PLANS = Path(tempfile.gettempdir()) / "organmtl_bench_full_size" / "pddca" / "pre" / "Dataset501_HaNFull" / "nnUNetPlans.json"


def _trainer_class(name: str):
    """nnU-Net's trainer class ``name``: stock nnU-Net's or one of organmtl's."""
    import importlib
    import pkgutil

    import nnunetv2
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class

    import organmtl.nnunet_trainers as ours
    found = recursive_find_python_class(str(Path(nnunetv2.__path__[0]) / "training" / "nnUNetTrainer"), name,
                                        "nnunetv2.training.nnUNetTrainer")
    for mod in ([] if found else pkgutil.walk_packages(ours.__path__, ours.__name__ + ".")):
        found = getattr(importlib.import_module(mod.name), name, None)
        if found:
            break
    if found is None:
        raise SystemExit(f"{name}: no such nnU-Net trainer (stock or organmtl)")
    return found


def flops_per_voxel(trainer_name: str, plans_file: Path, patch, in_channels: int = 1, classes: int = 10) -> float:
    import torch
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from torch.utils.flop_counter import FlopCounterMode

    cls = _trainer_class(trainer_name)
    pm = PlansManager(json.loads(Path(plans_file).read_text()))
    net = cls.build_network_architecture(pm, pm.get_configuration(CONFIG), in_channels, classes, True)
    x = torch.randn(1, in_channels, *patch)
    with FlopCounterMode(display=False) as counter:
        out = net(x)
        outs = out if isinstance(out, (list, tuple)) else [out]
        sum(o.float().mean() for o in outs).backward()
    return counter.get_total_flops() / math.prod(patch)


def main(argv=None) -> dict[str, float]:
    import torch
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--plans", type=Path, default=DEFAULT_PLANS)
    p.add_argument("--patch", type=int, nargs=3, default=[32, 64, 64])
    p.add_argument("--trainers", nargs="+", default=list(TRAINERS))
    args = p.parse_args(argv)
    if not args.plans.is_file():
        raise SystemExit(f"{args.plans}: no plans file (run bench_full_size.py first or pass --plans)")
    torch.set_num_threads(1)
    out = {name: flops_per_voxel(name, args.plans, args.patch) for name in args.trainers}
    base = out[args.trainers[0]]
    print(f"| network (trainer) | MFLOP / voxel, forward + backward | ratio to {args.trainers[0]} |\n|---|---|---|")
    for name, v in out.items():
        print(f"| `{name}` | {v / 1e6:.2f} | {v / base:.2f} |")
    return out


if __name__ == "__main__":
    main()
