"""Multi-task multi-modality CNN (Moeskops et al., "Deep Learning for Multi-task Medical Image
Segmentation in Multiple Modalities"; docs/multitask_cnn.md): the seven-experiment table on the demo
data, and the training-step time of the triplanar network against nnU-Net's U-Net at the same patch.

1. Step time: one training step (forward, cross-entropy, backward, optimizer step) on a random batch
   of the merged dataset's ``3d_tiny`` patch and batch size, after warm-up steps, median of
   ``--steps``. Baseline: nnU-Net's planned ``3d_fullres`` U-Net of the same dataset (stock
   PlainConvUNet, deep supervision as in training) at that patch; also the tiny U-Net, the paper's
   triplanar network (25 x 32 conv, 2 x 192 FC) and the triplanar network the 3d_tiny plan gives (docs/trainers.md).
2. The experiments: demo phantoms (``organmtl demo-data --families multimodal``) -> ``convert
   volumes`` x 3 -> ``convert merge`` -> ``plan-tiny`` -> ``organmtl multitask-experiments`` (all
   2^3 - 1 = 7 subsets). Dice figures are also given relative to the single-task experiment of
   the same task (the paper's comparison, Fig. 2), masked and thresholded Dice relative to the
   plain argmax of the same row.

``--quick``: 6 cases per task (1 test, 1 validation), 1 epoch x 3 iterations, 3 timed steps.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

TASKS = ("brain_mr", "breast_mr", "cardiac_cta")


def _machine() -> str:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from run import describe_machine

    return describe_machine()


def prepare(work: Path, n_cases: int, dataset_id: int) -> None:
    """Demo phantoms -> three nnU-Net datasets -> merged -> planned (3d_tiny)."""
    from organmtl.cli import main as cli

    demo = work / "demo"
    assert cli(["demo-data", str(demo), "--families", "multimodal", "--n-cases", str(n_cases)]) == 0
    for i, t in enumerate(TASKS, start=dataset_id + 1):
        assert cli(["convert", "volumes", str(demo / "multimodal" / t), "--dataset-id", str(i), "--name", t]) == 0
    raw = Path(os.environ["nnUNet_raw"])
    assert cli(["convert", "merge", *[str(raw / f"Dataset{i:03d}_{t}") for i, t in enumerate(TASKS, dataset_id + 1)],
                "--dataset-id", str(dataset_id), "--name", "MultiTaskBench"]) == 0
    assert cli(["plan-tiny", "-d", str(dataset_id), "-np", "1"]) == 0


def step_times(dataset_id: int, device: str, steps: int) -> list[dict]:
    """Median seconds per training step of each network at the 3d_tiny patch (see module docstring)."""
    import torch
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.dataset_name_id_conversion import convert_id_to_dataset_name

    from organmtl.nnunet_trainers.multitask.trainers import nnUNetTrainerOMTLTriplanar_Tiny
    from organmtl.nnunet_trainers.multitask.triplanar import TriplanarCNN

    pm = PlansManager(str(Path(nnUNet_preprocessed) / convert_id_to_dataset_name(dataset_id) / "nnUNetPlans.json"))
    tiny = pm.get_configuration("3d_tiny")
    patch, batch = tuple(tiny.patch_size), tiny.batch_size
    n_classes = 6

    def unet(cfg):
        return get_network_from_plans(cfg.network_arch_class_name, cfg.network_arch_init_kwargs,
                                      cfg.network_arch_init_kwargs_req_import, 1, n_classes, allow_init=True,
                                      deep_supervision=True)

    nets = {"nnU-Net U-Net 3d_fullres (baseline)": (unet(pm.get_configuration("3d_fullres")), "sgd"),
            "nnU-Net U-Net 3d_tiny": (unet(tiny), "sgd"),
            "triplanar 25 x 32 (paper)": (TriplanarCNN(1, n_classes), "adam"),
            "triplanar of the 3d_tiny plan (_Tiny)": (nnUNetTrainerOMTLTriplanar_Tiny.build_network_architecture(
                pm, tiny, 1, n_classes), "adam")}
    dev = torch.device(device)
    x = torch.randn(batch, 1, *patch, device=dev)
    y = torch.randint(0, n_classes, (batch, *patch), device=dev)
    rows = []
    for name, (net, opt_name) in nets.items():
        net = net.to(dev).train()
        opt = (torch.optim.SGD(net.parameters(), 1e-2, momentum=0.99, nesterov=True) if opt_name == "sgd"
               else torch.optim.Adam(net.parameters(), 1e-3))
        times = []
        for i in range(steps + 1):                          # first step: warm-up
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            out = net(x)
            out = out[0] if isinstance(out, (list, tuple)) else out
            torch.nn.functional.cross_entropy(out, y).backward()
            opt.step()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            if i:
                times.append(time.perf_counter() - t0)
        rows.append({"network": name, "params": sum(p.numel() for p in net.parameters()),
                     "step_s": statistics.median(times), "patch": patch, "batch": batch})
    base = rows[0]["step_s"]
    for r in rows:
        r["ratio"] = r["step_s"] / base
    return rows


def _f(v, nd=3):
    return "-" if v is None or v == "" else f"{float(v):.{nd}f}"


def tables(step_rows, exp_rows) -> str:
    lines = [f"Training step at patch {step_rows[0]['patch']}, batch {step_rows[0]['batch']} (median):", "",
             "| network | parameters | s / step | ratio to stock 3d_fullres U-Net |", "|---|---|---|---|"]
    lines += [f"| {r['network']} | {r['params']:,} | {r['step_s']:.3f} | {r['ratio']:.2f} |" for r in step_rows]
    single = {r["task"] + "/" + r["class"]: float(r["dice_argmax"]) for r in exp_rows if "+" not in r["tasks"]}
    lines += ["", "Seven experiments (Dice per class on held-out cases; ratios: to the single-task experiment of "
              "the class for argmax, to the row's argmax for masked / PR-threshold):", "",
              "| exp | tasks | class | Dice argmax | vs single-task | Dice task-masked | ratio | Dice PR threshold "
              "| ratio | threshold | confusion median % |", "|---|---|---|---|---|---|---|---|---|---|---|"]

    def ratio(a, b):
        a, b = (None if a in (None, "") else float(a)), (None if b in (None, "") else float(b))
        return "-" if a is None or b is None or b == 0 else f"{a / b:.2f}"

    for r in exp_rows:
        key = r["task"] + "/" + r["class"]
        lines.append(f"| {r['experiment']} | {r['tasks']} | {key} | {_f(r['dice_argmax'])} | "
                     f"{ratio(r['dice_argmax'], single.get(key))} | {_f(r['dice_task_masked'])} | "
                     f"{ratio(r['dice_task_masked'], r['dice_argmax'])} | {_f(r['dice_pr_threshold'])} | "
                     f"{ratio(r['dice_pr_threshold'], r['dice_argmax'])} | {_f(r['threshold'], 2)} | "
                     f"{_f(r['confusion_median_pct'], 2)} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--quick", action="store_true", help="6 cases per task, 1 epoch x 3 iterations, 3 steps")
    parser.add_argument("--trainer", default="nnUNetTrainerOMTLTriplanar_Tiny", help="trainer of the experiments")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--iterations", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="timed training steps per network")
    parser.add_argument("--skip-experiments", action="store_true", help="step times only")
    parser.add_argument("--work", type=Path, default=None, help="working folder (default: a temporary one)")
    args = parser.parse_args(argv)
    n_cases = 6 if args.quick else 10
    epochs = args.epochs or (1 if args.quick else 20)
    iterations = args.iterations or (3 if args.quick else 25)
    steps = args.steps or (3 if args.quick else 10)
    dataset_id = 840
    with tempfile.TemporaryDirectory(prefix="bench_multitask_") as tmp:
        work = Path(args.work or tmp)
        os.environ.update({"nnUNet_raw": str(work / "raw"), "nnUNet_preprocessed": str(work / "pre"),
                           "nnUNet_results": str(work / "res"), "nnUNet_n_proc_DA": "0", "nnUNet_def_n_proc": "1"})
        t0 = time.perf_counter()
        prepare(work, n_cases, dataset_id)
        t_prep = time.perf_counter() - t0
        step_rows = step_times(dataset_id, args.device, steps)
        exp_rows, t_exp = [], 0.0
        if not args.skip_experiments:
            from organmtl.workflows.multitask_experiments import run_experiments

            t0 = time.perf_counter()
            result = run_experiments(dataset_id, work / "experiments", trainer=args.trainer, n_test=1 if args.quick else 2,
                                     n_val=1, epochs=epochs, iterations=iterations, val_iterations=1,
                                     device=args.device)
            t_exp = time.perf_counter() - t0
            exp_rows = result["rows"]
    text = tables(step_rows, exp_rows)
    result = {"steps": step_rows, "experiments": exp_rows, "markdown": text, "machine": _machine(),
              "settings": {"cases_per_task": n_cases, "epochs": epochs, "iterations": iterations,
                           "trainer": args.trainer, "device": args.device, "prepare_s": t_prep,
                           "experiments_s": t_exp}}
    print(text)
    print(f"Settings: {result['settings']}")
    print(f"\nMachine: {result['machine']}")
    return result


if __name__ == "__main__":
    main()
