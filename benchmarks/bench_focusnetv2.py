"""FocusNetv2 vs stock nnU-Net on the demo head-and-neck phantom (issue #5, FocusNetv2 paper
Tables 6-7): equal budget, same plans.

For the stock baseline (``nnUNetTrainerOMTLBaseline_Tiny``), S-Net, FocusNetv1 and FocusNetv2
(``_Tiny`` trainers, the same ``ORGANMTL_EPOCHS`` x ``ORGANMTL_ITERS_PER_EPOCH``) it trains with the
stock ``nnUNetv2_train`` and reads nnU-Net's own final validation (fold 0):

- Dice and HD95 (mean of both directed 95th percentiles, §4.3) per organ, small-organ average;
- SOL-Net localisation error (mm) and identification rate at 3/4/5 mm (Table 7) from the
  ``validation/<case>_centres.json`` the FocusNet trainers write, against the ground-truth centroids;
- training step time and peak memory (a fresh process per network, one training step on a batch
  of the plans' patch size, repeated) and inference seconds per volume (nnU-Net's predictor);

every figure also as a ratio to the stock baseline of the same run. Not run in CI.

    python benchmarks/bench_focusnetv2.py --quick [--device cpu|cuda] [--work DIR]
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

TRAINERS = ["nnUNetTrainerOMTLBaseline_Tiny", "nnUNetTrainerOMTLSNet_Tiny", "nnUNetTrainerOMTLFocusNetV1_Tiny",
            "nnUNetTrainerOMTLFocusNetV2_Tiny"]
SHORT = {"nnUNetTrainerOMTLBaseline_Tiny": "stock nnU-Net", "nnUNetTrainerOMTLSNet_Tiny": "S-Net",
         "nnUNetTrainerOMTLFocusNetV1_Tiny": "FocusNetv1", "nnUNetTrainerOMTLFocusNetV2_Tiny": "FocusNetv2"}
DATASET = "652"


def _bin(name):
    return str(Path(sys.executable).parent / name)


def _run(cmd, env, log):
    with open(log, "w") as fh:
        r = subprocess.run(cmd, env={**os.environ, **env}, stdout=fh, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} failed, see {log}")


def prepare(work: Path, n_cases: int, env: dict) -> Path:
    """Demo HaN phantom -> PDDCA converter -> tiny plans (once per work folder)."""
    from organmtl.demo_data import write_demo_data

    raw = Path(env["nnUNet_raw"]) / f"Dataset{DATASET}_BenchHaN"
    if not (Path(env["nnUNet_preprocessed"]) / f"Dataset{DATASET}_BenchHaN" / "nnUNetPlans.json").is_file():
        write_demo_data(work / "demo", seed=0, families=["han_pddca"], n_cases=n_cases, overwrite=True)
        _run([_bin("organmtl"), "convert", "pddca", str(work / "demo" / "han_pddca"), "--dataset-id", DATASET,
              "--name", "BenchHaN"], env, work / "convert.log")
        _run([_bin("organmtl"), "plan-tiny", "-d", DATASET, "-np", "1"], env, work / "plan.log")
    return raw


def _model_dir(env, trainer):
    return Path(env["nnUNet_results"]) / f"Dataset{DATASET}_BenchHaN" / f"{trainer}__nnUNetPlans__3d_tiny"


def train(trainer: str, env: dict, work: Path, device: str) -> float:
    t0 = time.time()
    _run([_bin("nnUNetv2_train"), DATASET, "3d_tiny", "0", "-tr", trainer, "-device", device], env,
         work / f"train_{trainer}.log")
    return time.time() - t0


def evaluate(trainer: str, env: dict, dataset_json: dict) -> dict:
    """Per-organ Dice / HD95 and SOL-Net centre errors on fold 0's validation cases."""
    import SimpleITK as sitk

    from organmtl.evaluation.centres import SUFFIX as CENTRES_SUFFIX, evaluate_centre_folder
    from organmtl.evaluation.metrics import dice, hausdorff_distance_mean_directed

    val = _model_dir(env, trainer) / "fold_0" / "validation"
    gt_dir = Path(env["nnUNet_preprocessed"]) / f"Dataset{DATASET}_BenchHaN" / "gt_segmentations"
    labels = {k: v for k, v in dataset_json["labels"].items() if v > 0}
    small = dataset_json.get("organmtl_small_organs", [])
    per = {n: {"dice": [], "hd95": []} for n in labels}
    for f in sorted(val.glob("*.nii.gz")):
        pred_img, gt_img = sitk.ReadImage(str(f)), sitk.ReadImage(str(gt_dir / f.name))
        pred, gt = sitk.GetArrayFromImage(pred_img), sitk.GetArrayFromImage(gt_img)
        spacing = gt_img.GetSpacing()[::-1]
        for n, v in labels.items():
            if not (gt == v).any():
                continue
            per[n]["dice"].append(dice(pred == v, gt == v))
            per[n]["hd95"].append(hausdorff_distance_mean_directed(pred == v, gt == v, spacing, 95.0))
    out = {"dice": {n: float(np.nanmean(d["dice"])) if d["dice"] else float("nan") for n, d in per.items()},
           "hd95": {n: float(np.nanmean(d["hd95"])) if d["hd95"] else float("nan") for n, d in per.items()}}
    out["small_dice"] = float(np.nanmean([out["dice"][n] for n in small])) if small else float("nan")
    out["all_dice"] = float(np.nanmean(list(out["dice"].values())))
    if any(val.glob(f"*{CENTRES_SUFFIX}")):              # the library's Table 7 metrics (organmtl evaluate)
        loc = evaluate_centre_folder(val, gt_dir, ".nii.gz", cases={f.name[:-7] for f in val.glob("*.nii.gz")})[1]
        out["loc_error_mm"] = loc["error_mm"]["mean"] if loc["error_mm"]["mean"] is not None else float("nan")
        out["id_rates"] = loc["identification_rates"]
    else:
        out["loc_error_mm"], out["id_rates"] = float("nan"), {}
    return out


def enter_phases(trainer, schedule):
    """Yield each phase of ``schedule`` after putting the trainer at its first epoch and running nnU-Net's
    ``on_train_epoch_start`` (FocusNet switches phase, loader and optimiser there); "stock": nothing to enter."""
    from organmtl.nnunet_trainers.focusnet.options import phase_at

    first_epoch = 0
    for phase, n_epochs in schedule:
        trainer.current_epoch = first_epoch
        first_epoch += n_epochs
        if phase != "stock":
            assert phase_at(trainer.schedule, trainer.current_epoch) == phase
            trainer.on_train_epoch_start()
        yield phase


def _cost_child(trainer_name: str, model_dir: str, device: str, n_steps: int, queue) -> None:
    """In a fresh process: the trainer's own ``train_step`` (what ``nnUNetv2_train`` runs: loss, backward,
    optimiser, and for the adversarial variants the G and D steps) on one fixed batch of the plans' patch
    size, timed per phase of its schedule over ``n_steps`` after a warm-up; peak memory (CUDA allocator,
    or the process's maximum RSS on CPU); predictor seconds per volume of 2x the patch per axis."""
    import random

    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    import organmtl.nnunet_trainers as trainers
    from trainer_timing import initialized_trainer, train_step_seconds

    dev = torch.device(device)
    folder = Path(model_dir)
    plans = json.loads((folder / "plans.json").read_text())
    dataset_json = json.loads((folder / "dataset.json").read_text())
    trainer = initialized_trainer(getattr(trainers, trainer_name), plans, "3d_tiny", dataset_json, device)
    random.seed(0), np.random.seed(0), torch.manual_seed(0)     # the same training batch for every trainer
    batch = next(trainer.get_dataloaders()[0])
    schedule = getattr(trainer, "schedule", [("stock", 1)])

    phases = {}
    for phase in enter_phases(trainer, schedule):
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        phases[phase] = float(np.mean(train_step_seconds(trainer, batch, n_steps)))
    peak = (torch.cuda.max_memory_allocated() / 2 ** 20 if dev.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    # per-iteration mean over the schedule a full run follows (phase epochs as the trainer planned them)
    total = sum(n for _, n in schedule)
    mean_step = sum(phases[p] * n for p, n in schedule) / total
    params_m = sum(p.numel() for p in trainer.network.parameters()) / 1e6
    pred = nnUNetPredictor(device=dev, allow_tqdm=False, use_mirroring=False)
    pred.initialize_from_trained_model_folder(model_dir, ("0",), "checkpoint_final.pth")
    vol = torch.randn(1, *[int(s * 2) for s in pred.configuration_manager.patch_size])
    t0 = time.time()
    pred.predict_sliding_window_return_logits(vol)
    queue.put({"step_s": mean_step, "step_s_phase": phases, "step_s_max": max(phases.values()), "peak_mb": peak,
               "infer_s": time.time() - t0, "params_m": params_m})


def _small_organ_batch(trainer, dataset_json: dict, max_draws: int = 40) -> dict:
    """The first of the seeded training batches (nnU-Net's loader of the S-Net phase) in which every sample
    holds every small organ: the work a FocusNet step with small organs does, the same batch for every
    trainer and every code state (falls back to the batch with the most (sample, organ) pairs)."""
    small = [dataset_json["labels"][n] for n in dataset_json.get("organmtl_small_organs", [])]
    loader = trainer.get_dataloaders()[0]
    best, best_n = None, -1
    for _ in range(max_draws):
        batch = next(loader)
        target = batch["target"][0] if isinstance(batch["target"], list) else batch["target"]
        n = sum(int((target[b] == v).any()) for b in range(target.shape[0]) for v in small)
        if n > best_n:
            best, best_n = batch, n
        if n == target.shape[0] * len(small):
            break
    return {"data": best["data"], "target": best["target"], "pairs": best_n}


def _steps_child(trainer_name: str, work: str, device: str, n_steps: int, queue) -> None:
    """``--steps-only``: the trainer initialised from the preprocessed plans (random weights, no training)
    and its own ``train_step`` timed per phase on :func:`_small_organ_batch`."""
    import random

    import torch

    import organmtl.nnunet_trainers as trainers
    from trainer_timing import initialized_trainer, train_step_seconds

    pre = Path(os.environ["nnUNet_preprocessed"]) / f"Dataset{DATASET}_BenchHaN"
    plans = json.loads((pre / "nnUNetPlans.json").read_text())
    dataset_json = json.loads((pre / "dataset.json").read_text())
    trainer = initialized_trainer(getattr(trainers, trainer_name), plans, "3d_tiny", dataset_json, device)
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    batch = _small_organ_batch(trainer, dataset_json)
    pairs = batch.pop("pairs")
    schedule = getattr(trainer, "schedule", [("stock", 1)])
    phases = {}
    for phase in enter_phases(trainer, schedule):
        torch.manual_seed(1)
        phases[phase] = float(np.median(train_step_seconds(trainer, batch, n_steps)))
    total = sum(n for _, n in schedule)
    queue.put({"step_s": sum(phases[p] * n for p, n in schedule) / total, "step_s_phase": phases,
               "step_s_max": max(phases.values()), "schedule": [list(p) for p in schedule], "small_pairs": pairs})


def steps_only(trainers: list[str], env: dict, device: str, n_steps: int) -> str:
    """Step-time ratios to the stock trainer, all trainers in one run (one fresh process each)."""
    ctx = mp.get_context("spawn")
    res = {}
    old = dict(os.environ)
    os.environ.update(env)
    try:
        for t in trainers:
            q = ctx.Queue()
            p = ctx.Process(target=_steps_child, args=(t, "", device, n_steps, q))
            p.start()
            res[t] = q.get(timeout=3600)
            p.join()
    finally:
        os.environ.clear()
        os.environ.update(old)
    ref = res[TRAINERS[0]]["step_s"]
    lines = ["| trainer | " + " | ".join(["phase " + p for p in O_PHASES]) + " | mean over the schedule | max |",
             "|---|" + "---|" * (len(O_PHASES) + 2)]
    for t, r in res.items():
        ph = r["step_s_phase"]
        ph = {p: ph["stock"] for p in O_PHASES} if "stock" in ph else ph
        cells = [f"{ph[p]:.3f} ({ph[p] / ref:.2f}x)" if p in ph else "" for p in O_PHASES]
        lines.append(f"| {SHORT[t]} | " + " | ".join(cells) + f" | {r['step_s'] / ref:.2f}x | {r['step_s_max'] / ref:.2f}x |")
    print(json.dumps(res, indent=1))
    return "\n".join(lines)


def _focal_child(setting: str, n_steps: int, n_val: int, queue) -> None:
    """``--focal-study``: S-Net (the ``snet`` phase of ``nnUNetTrainerOMTLSNet_Tiny``) trained ``n_steps`` steps
    from the same seed and batches with Eq. 3's focal weights as the trainer sets them (``mean1``: voxel-frequency
    weighted mean 1), scaled so that the focal gradient w.r.t. the logits equals Dice's at initialisation
    (``matched``), or summing to 1 as before (``sum1``); then Dice per organ on ``n_val`` validation patches."""
    import random

    import torch

    import organmtl.nnunet_trainers as trainers
    from organmtl.nnunet_trainers.focusnet import losses as L
    from trainer_timing import initialized_trainer

    pre = Path(os.environ["nnUNet_preprocessed"]) / f"Dataset{DATASET}_BenchHaN"
    plans = json.loads((pre / "nnUNetPlans.json").read_text())
    dataset_json = json.loads((pre / "dataset.json").read_text())
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    trainer = initialized_trainer(trainers.nnUNetTrainerOMTLSNet_Tiny, plans, "3d_tiny", dataset_json, "cpu")
    train_gen, val_gen = trainer.get_dataloaders()
    alpha = trainer.loss.focal.alpha.clone()
    first = next(train_gen)
    data, target = first["data"], first["target"][0] if isinstance(first["target"], list) else first["target"]
    logits = trainer._module().segment(trainer._module()._layout(data))[0].detach().requires_grad_(True)

    def grad_norm(fn):
        (g,) = torch.autograd.grad(fn(logits), logits)
        return float(g.norm())

    dice_g = grad_norm(lambda z: trainer.loss(z, target) - trainer.loss.focal(z, target))
    if setting == "sum1":
        trainer.loss.focal.alpha.copy_(L.alpha_from_sizes([trainer.organ_sizes_mm3.get(c, 0.0) for c in range(len(alpha))]))
    elif setting == "matched":
        trainer.loss.focal.alpha.mul_(dice_g / grad_norm(lambda z: trainer.loss.focal(z, target)))
    ratio = grad_norm(lambda z: trainer.loss.focal(z, target)) / dice_g
    scale = float(trainer.loss.focal.alpha.sum() / alpha.sum())
    trainer.current_epoch = 0
    trainer.on_train_epoch_start()
    t0, losses = time.time(), []
    for i in range(n_steps):
        losses.append(float(trainer.train_step(first if i == 0 else next(train_gen))["loss"]))
    train_s = time.time() - t0
    net = trainer._module()
    net.train(False)
    labels = {k: v for k, v in dataset_json["labels"].items() if v > 0}
    inter, size = {v: 0.0 for v in labels.values()}, {v: 0.0 for v in labels.values()}
    np.random.seed(1), torch.manual_seed(1)
    with torch.no_grad():
        for _ in range(n_val):
            b = next(val_gen)
            t = b["target"][0] if isinstance(b["target"], list) else b["target"]
            pred = net.segment(net._layout(b["data"]))[0].argmax(1, keepdim=True)
            for v in labels.values():
                inter[v] += float(((pred == v) & (t == v)).sum())
                size[v] += float((pred == v).sum() + (t == v).sum())
    dice = {n: (2 * inter[v] / size[v] if size[v] else float("nan")) for n, v in labels.items()}
    small = dataset_json.get("organmtl_small_organs", [])
    queue.put({"setting": setting, "alpha_scale": scale, "focal_over_dice_grad_at_init": ratio, "dice": dice, "train_s": train_s, "loss_first_last": [losses[0], losses[-1]],
               "small_mean": float(np.nanmean([dice[n] for n in small])),
               "large_mean": float(np.nanmean([d for n, d in dice.items() if n not in small]))})


def focal_study(env: dict, n_steps: int, n_val: int = 20) -> str:
    """The three focal-weight scales, one fresh process each, same seeds (see :func:`_focal_child`)."""
    ctx = mp.get_context("spawn")
    old = dict(os.environ)
    os.environ.update(env)
    res = []
    try:
        for setting in ("mean1", "matched", "sum1"):
            q = ctx.Queue()
            p = ctx.Process(target=_focal_child, args=(setting, n_steps, n_val, q))
            p.start()
            res.append(q.get(timeout=3600))
            p.join()
    finally:
        os.environ.clear()
        os.environ.update(old)
    print(json.dumps(res, indent=1))
    organs = list(res[0]["dice"])
    lines = ["| focal weights | focal / Dice gradient at init | large-organ mean Dice | small-organ mean Dice | "
             + " | ".join(organs) + " |", "|---|---|---|---|" + "---|" * len(organs)]
    for r in res:
        ratio = f"{r['focal_over_dice_grad_at_init']:.2f}x"
        lines.append(f"| {r['setting']} | {ratio} | {r['large_mean']:.3f} | {r['small_mean']:.3f} | "
                     + " | ".join(f"{r['dice'][n]:.2f}" for n in organs) + " |")
    return "\n".join(lines)


#: the code before the one-paste-per-case rule (per-window paste, floor 0.0): its network is loaded from git
PER_WINDOW_REVISION = "81fa3b8"


def _old_focusnet_class():
    """``FocusNet`` of :data:`PER_WINDOW_REVISION` (per-window paste), from ``git show`` (its other modules are
    unchanged since), for the before/after inference timing."""
    import importlib.util

    root = Path(__file__).resolve().parents[1]
    text = subprocess.run(["git", "-C", str(root), "show", f"{PER_WINDOW_REVISION}:nnunet_trainers/focusnet/network.py"],
                          check=True, capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp(prefix="focusnet_old_")) / "old_network.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location("focusnet_old_network", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod                     # its dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod.FocusNet


def _infer_child(device: str, n_runs: int, queue) -> None:
    """``--infer-only``: seconds per volume of 2x the patch per axis (median of ``n_runs`` after a warm-up, mirroring
    off), freshly initialised trainers (the cost does not depend on the weights, only on how many pastes run):
    stock nnU-Net, S-Net and FocusNetv2 through nnU-Net's predictor; FocusNetv2 with every small organ pasted,
    (a) before: the per-window rule of :data:`PER_WINDOW_REVISION` with every window pasting (floor 0, no relative
    test: its worst case; trained models pasted in 1-9 of 27 windows, docs/focusnetv2.md), (b) now: one paste per
    organ and case (:class:`FocusNetPredictor`, floor 0: its worst case)."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    import organmtl.nnunet_trainers as trainers
    from organmtl.nnunet_trainers.focusnet.predict import FocusNetPredictor
    from trainer_timing import initialized_trainer

    pre = Path(os.environ["nnUNet_preprocessed"]) / f"Dataset{DATASET}_BenchHaN"
    plans = json.loads((pre / "nnUNetPlans.json").read_text())
    dataset_json = json.loads((pre / "dataset.json").read_text())
    dev = torch.device(device)

    def seconds(predictor_cls, network, trainer, name):
        pred = predictor_cls(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                             perform_everything_on_device=dev.type == "cuda", device=dev, allow_tqdm=False)
        if hasattr(pred, "quiet"):
            pred.quiet = True
        pred.manual_initialization(network, trainer.plans_manager, trainer.configuration_manager, None,
                                   trainer.dataset_json, name, None)
        torch.manual_seed(0)
        vol = torch.randn(1, *[int(s * 2) for s in trainer.configuration_manager.patch_size])
        times = []
        for i in range(n_runs + 1):
            t0 = time.perf_counter()
            pred.predict_sliding_window_return_logits(vol)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            if i:
                times.append(time.perf_counter() - t0)
        return float(np.median(times))

    out = {}
    torch.manual_seed(0)
    for key, name in (("stock", TRAINERS[0]), ("snet", TRAINERS[1]), ("focusnetv2", TRAINERS[3])):
        tr = initialized_trainer(getattr(trainers, name), plans, "3d_tiny", dataset_json, device)
        if key != "focusnetv2":
            out[key] = seconds(nnUNetPredictor, tr.network.eval(), tr, name)
            continue
        net = tr._module().eval()
        net.sos_trained.fill_(True)
        net.heat_floor.fill_(0.0)
        out["focusnetv2_once_per_case"] = seconds(FocusNetPredictor, net, tr, name)
        old_cls = _old_focusnet_class()
        s = tr.focus_settings
        old = old_cls(net.in_channels, net.num_classes, s["small_labels"], s["roi_size"], use_sos=s["use_sos"],
                      concat_image=s["concat_image"], use_ae=s["use_ae"], heat_threshold=0.0, heat_relative=None,
                      width=s["width"]).to(dev)
        old.load_state_dict({k: v for k, v in net.state_dict().items() if k != "heat_floor"})
        old.eval()
        out["focusnetv2_per_window"] = seconds(nnUNetPredictor, old, tr, name)
        out["per_window_pastes"] = old.paste_tally["pasted"]
        out["windows"] = old.paste_tally["windows"]
    queue.put(out)


def _in_child(target, args: tuple, env: dict):
    """``target(*args, queue)`` in a fresh spawned process with ``env`` added to its environment; what it puts."""
    ctx = mp.get_context("spawn")
    old = dict(os.environ)
    os.environ.update(env)
    try:
        q = ctx.Queue()
        p = ctx.Process(target=target, args=(*args, q))
        p.start()
        result = q.get(timeout=3600)
        p.join()
    finally:
        os.environ.clear()
        os.environ.update(old)
    return result


def infer_only(env: dict, device: str, n_runs: int) -> str:
    """Inference seconds per volume, before/after the one-paste-per-case rule, in one fresh process."""
    r = _in_child(_infer_child, (device, n_runs), env)
    print(json.dumps(r, indent=1))
    ref = r["stock"]
    rows = [("stock nnU-Net", r["stock"]), ("S-Net", r["snet"]),
            ("FocusNetv2, per-window paste (before; every window pasting)", r["focusnetv2_per_window"]),
            ("FocusNetv2, one paste per organ and case (now; every organ pasted)", r["focusnetv2_once_per_case"])]
    lines = ["| predictor | s / volume | vs stock | vs S-Net |", "|---|---|---|---|"]
    lines += [f"| {n} | {v:.3f} | {v / ref:.2f}x | {v / r['snet']:.2f}x |" for n, v in rows]
    return "\n".join(lines)


#: phase columns of the ``--steps-only`` table
O_PHASES = ("snet", "sol", "ae", "sos", "joint")


def cost(trainer: str, env: dict, device: str, n_steps: int) -> dict:
    return _in_child(_cost_child, (trainer, str(_model_dir(env, trainer)), device, n_steps), env)


def _ratio(v, ref):
    if ref is None or not np.isfinite(ref) or ref == 0 or not np.isfinite(v):
        return "–"
    return f"{v / ref:.2f}x"


def table(results: dict, dataset_json: dict) -> str:
    base = results[TRAINERS[0]]
    organs = [n for n, v in dataset_json["labels"].items() if v > 0]
    names = [SHORT[t] for t in results]
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]

    def row(label, get, fmt="{:.3f}"):
        cells = []
        for t, r in results.items():
            v = get(r)
            ref = get(base)
            txt = "–" if v is None or not np.isfinite(v) else fmt.format(v)
            if t != TRAINERS[0] and v is not None and ref is not None:
                txt += f" ({_ratio(v, ref)})"
            cells.append(txt)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    for n in organs:
        row(f"Dice {n}", lambda r, n=n: r["eval"]["dice"].get(n))
    row("**Dice small-organ mean**", lambda r: r["eval"]["small_dice"])
    row("Dice all-organ mean", lambda r: r["eval"]["all_dice"])
    for n in organs:
        row(f"HD95 {n} (mm)", lambda r, n=n: r["eval"]["hd95"].get(n), "{:.1f}")
    row("SOL-Net centre error (mm)", lambda r: r["eval"]["loc_error_mm"], "{:.1f}")
    for k in ("3mm", "4mm", "5mm"):
        row(f"identification rate <= {k}", lambda r, k=k: r["eval"]["id_rates"].get(k), "{:.2f}")
    row("train step (s), mean over the schedule", lambda r: r["cost"]["step_s"], "{:.3f}")
    row("train step (s), slowest phase", lambda r: r["cost"].get("step_s_max"), "{:.3f}")
    phases = dict.fromkeys(ph for r in results.values() for ph in r["cost"].get("step_s_phase", {}) if ph != "stock")
    for ph in phases:
        row(f"train step (s), phase {ph}",
            lambda r, ph=ph: r["cost"].get("step_s_phase", {}).get(ph, r["cost"].get("step_s_phase", {}).get("stock")),
            "{:.3f}")
    row("peak memory (MiB)", lambda r: r["cost"]["peak_mb"], "{:.0f}")
    row("inference (s / volume)", lambda r: r["cost"]["infer_s"], "{:.2f}")
    row("parameters (M)", lambda r: r["cost"]["params_m"], "{:.2f}")
    row("nnUNetv2_train wall (s)", lambda r: r["train_s"], "{:.0f}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--quick", action="store_true", help="5 epochs x 3 iterations, 8 cases, 3 timed steps")
    ap.add_argument("--work", type=Path, default=None, help="working folder (default: a temporary one)")
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--trainers", nargs="+", default=TRAINERS, choices=TRAINERS,
                    help="subset to run (results are cached in --work, so runs can be split and combined)")
    ap.add_argument("--steps", type=int, default=None, help="timed train steps per phase (default 3 with --quick, else 10)")
    ap.add_argument("--recost", action="store_true", help="time the cached trained models again (no training)")
    ap.add_argument("--skip-cost", action="store_true",
                    help="train and score only (e.g. while the machine is busy); time later with --recost")
    ap.add_argument("--steps-only", action="store_true",
                    help="only the train-step times per phase of freshly initialised trainers (no training): "
                         "median of --steps steps on one batch holding every small organ, ratios to stock")
    ap.add_argument("--infer-only", action="store_true",
                    help="only inference seconds per volume (fresh weights, every paste permitted): stock, S-Net, "
                         "FocusNetv2 per-window paste (the code before the one-paste rule) and one paste per case")
    ap.add_argument("--focal-study", type=int, default=None, metavar="STEPS",
                    help="S-Net trained STEPS steps with three scales of the focal weights (no other output)")
    a = ap.parse_args(argv)
    if a.trainers[0] != TRAINERS[0] and not a.work:
        ap.error("--trainers without the baseline needs --work with the baseline's cached result")
    epochs = a.epochs or (5 if a.quick else 50)
    iters = a.iters or (3 if a.quick else 25)
    work = a.work or Path(tempfile.mkdtemp(prefix="bench_focusnetv2_"))
    work.mkdir(parents=True, exist_ok=True)
    env = {"nnUNet_raw": str(work / "raw"), "nnUNet_preprocessed": str(work / "pre"),
           "nnUNet_results": str(work / "res"), "nnUNet_n_proc_DA": "0", "nnUNet_def_n_proc": "1",
           "ORGANMTL_EPOCHS": str(epochs), "ORGANMTL_ITERS_PER_EPOCH": str(iters), "ORGANMTL_VAL_ITERS": "1"}
    raw = prepare(work, 8 if a.quick else 16, env)
    if a.focal_study:
        md = focal_study(env, a.focal_study)
        print(md)
        return {"markdown": md, "work": str(work)}
    if a.infer_only:
        md = infer_only(env, a.device, a.steps or 3)
        print(md)
        return {"markdown": md, "work": str(work)}
    if a.steps_only:
        md = steps_only(a.trainers, env, a.device, a.steps or (3 if a.quick else 10))
        print(md)
        return {"markdown": md, "work": str(work)}
    dataset_json = json.loads((raw / "dataset.json").read_text())
    results = {}
    for t in a.trainers:
        cache = work / f"result_{t}_{epochs}x{iters}.json"
        if cache.is_file():
            results[t] = json.loads(cache.read_text())
            if a.skip_cost or ("step_s_phase" in results[t].get("cost", {}) and not a.recost):
                continue
        else:
            print(f"[bench_focusnetv2] training {t} ({epochs} epochs x {iters} iterations)", flush=True)
            train_s = train(t, env, work, a.device)
            results[t] = {"train_s": train_s, "eval": evaluate(t, env, dataset_json)}
        if not a.skip_cost:
            results[t]["cost"] = cost(t, env, a.device, a.steps or (3 if a.quick else 10))
        cache.write_text(json.dumps(results[t], indent=1))
    if TRAINERS[0] not in results:
        cache = work / f"result_{TRAINERS[0]}_{epochs}x{iters}.json"
        if not cache.is_file():
            raise FileNotFoundError(f"{cache}: run the baseline first (it is the reference of every ratio)")
        results = {TRAINERS[0]: json.loads(cache.read_text()), **results}
    results = {t: results[t] for t in TRAINERS if t in results}
    if a.skip_cost:
        print(json.dumps({t: r["eval"] for t, r in results.items()}, indent=1))
        return {"results": results, "work": str(work)}
    md = table(results, dataset_json)
    machine = (f"machine: {platform.machine()} {os.cpu_count()} CPU cores, {platform.system()}, device {a.device}, "
               f"python {platform.python_version()}; budget {epochs} epochs x {iters} iterations per trainer, "
               f"same 3d_tiny plans; ratios are to the stock baseline of this run")
    print(md)
    print(machine)
    return {"markdown": md, "machine": machine, "results": results, "work": str(work)}


if __name__ == "__main__":
    main()
