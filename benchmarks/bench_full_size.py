"""Full trainers at the default 3d_fullres plan of a PDDCA-sized phantom: one training step's time and
peak memory on the CPU as ratios to nnU-Net's stock ``nnUNetTrainer``, and the GPU memory plan.

Data (built once in ``--work``, then reused): ``organmtl demo-data --families han_pddca --size pddca``
(100 x 256 x 256 at 1 x 1 x 2.5 mm, the PDDCA grid) converted twice with ``organmtl convert pddca``:
plain (Dataset501, for the stock, FocusNetv2 and multi-task trainers; a single-task dataset is the
``all`` task of the multi-task trainers) and with the phantoms' landmarks as Gaussian heatmap
channels, one per landmark (Dataset502, for the landmark-tail and fusion trainers: the landmark
family needs landmark channels and the HaN phantom has landmarks, so this is the same images and
grid). Both are planned by the stock ``nnUNetv2_plan_and_preprocess -c 3d_fullres``
(``nnUNet_n_proc_DA=1``: nnU-Net's planner calls ``torch.set_num_threads`` with it, and 0 fails).

Per trainer (and per FocusNetv2 phase), in this process: the trainer is built as
``nnUNetv2_train`` builds it and initialised (the full trainers' GPU memory plan runs: two CPU probes
under bf16 autocast, nnu-Net's patch/batch kept when it fits ``ORGANMTL_GPU_MEMORY_GB``, else
shrunk), one batch is drawn from its own training dataloader, and one ``train_step`` runs under
:func:`organmtl.memory.measure_trainer_step` (fp32, no warm-up: the peak includes the optimizer state
the first step creates): its wall time and peak memory. ``--timed-steps N`` adds N uninstrumented
steps and reports their median instead. The stock trainer's GPU prediction uses the same probes and
rule (:mod:`organmtl.nnunet_trainers.gpu_memory`) at its plan. When the fp32 probe predicts a CPU
peak above ``--max-cpu-gib`` (the benchmark machine's memory), the step runs on the first samples of
the batch only and the table says so; ratios are also given per voxel of the batch (``ratio/voxel``:
the goals are at equal voxels per batch).

Each result is cached in ``benchmarks/results/full_size.json`` under trainer + phase + plan (hash of
the configuration) + code revision (last commit of the trainer's sources and the shared trainer
modules, ``+dirty`` with uncommitted changes there; a change of this script's method needs
``--redo``) + device + threads, so the benchmark resumes where it stopped and ``--trainers`` runs a
subset; the table is printed from the cache (every result of the current keys) and ``--docs`` writes
it to the "Full-size trainers" section of docs/benchmarks.md.

    .venv/bin/python benchmarks/bench_full_size.py --trainers stock landmark
    .venv/bin/python benchmarks/bench_full_size.py --trainers focusnetv2:snet focusnetv2:sol
    .venv/bin/python benchmarks/bench_full_size.py --table-only --docs
    .venv/bin/python benchmarks/bench_full_size.py --quick        # demo-sized phantom (32 x 80 x 80)
"""
from __future__ import annotations

import argparse
import gc
import hashlib
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "full_size.json"
DOCS = REPO / "docs" / "benchmarks.md"
SECTION = "## Full-size trainers (bench_full_size.py)"
CONFIG = "3d_fullres"
PLAIN, LANDMARK = 501, 502
DATASETS = {PLAIN: ("HaNFull", ()), LANDMARK: ("HaNFullLm", ("--landmark-channels", "heatmap", "--one-channel-per-landmark"))}
COMMON = ("nnunet_trainers/gpu_memory.py", "nnunet_trainers/amp.py", "nnunet_trainers/budget.py",
          "nnunet_trainers/settings.py", "nnunet_trainers/laterality.py", "organmtl/memory.py")
#: key -> (trainer, dataset, goal: step ratio per voxel to stock, its sources)
TRAINERS = {
    "stock": ("nnUNetTrainer", PLAIN, None, ()),
    "focusnetv2": ("nnUNetTrainerOMTLFocusNetV2", PLAIN, 2.0, ("nnunet_trainers/focusnet",)),
    "landmark": ("nnUNetTrainerOMTLLandmarkJoint", LANDMARK, 1.2, ("nnunet_trainers/landmarks",)),
    "fusion": ("nnUNetTrainerOMTLLandmarkLateFusion", LANDMARK, 1.2, ("nnunet_trainers/landmarks",)),
    "multitask_unet": ("nnUNetTrainerOMTLMultiTaskUNet", PLAIN, None, ("nnunet_trainers/multitask",)),
    "triplanar": ("nnUNetTrainerOMTLTriplanar", PLAIN, 2.5, ("nnunet_trainers/multitask",)),
}
FOCUSNET_PHASES = ("snet", "sol", "ae", "sos", "joint")
#: FocusNetv2's mean step is weighted by the epochs of its default schedule (nnU-Net's 1000 epochs)
DEFAULT_EPOCHS = 1000
GPU_TARGET_GIB = 24.0


# ------------------------------------------------------------------ data

def nnunet_env(work: Path) -> dict[str, str]:
    return {"nnUNet_raw": str(work / "raw"), "nnUNet_preprocessed": str(work / "pre"), "nnUNet_results": str(work / "res"),
            "nnUNet_n_proc_DA": "0", "nnUNet_def_n_proc": "1"}


def _run(cmd: list, env: dict) -> None:
    print("$", " ".join(map(str, cmd)), flush=True)
    subprocess.run([str(c) for c in cmd], env={**os.environ, **env}, check=True)


def prepare(work: Path, size: str, n_cases: int) -> dict[int, Path]:
    """Phantoms -> two converted datasets -> stock 3d_fullres plans (each step skipped when done)."""
    env = nnunet_env(work)
    bin_dir = Path(sys.executable).parent
    demo = work / "demo"
    if not (demo / "han_pddca").is_dir():
        _run([bin_dir / "organmtl", "demo-data", demo, "--families", "han_pddca", "--size", size, "--n-cases", n_cases], env)
    folders = {}
    for ds_id, (name, options) in DATASETS.items():
        folders[ds_id] = work / "pre" / f"Dataset{ds_id}_{name}"
        if not (work / "raw" / f"Dataset{ds_id}_{name}" / "dataset.json").is_file():
            _run([bin_dir / "organmtl", "convert", "pddca", demo / "han_pddca", "--dataset-id", ds_id, "--name", name,
                  *options], env)
    todo = [i for i, f in folders.items() if not (f / "nnUNetPlans.json").is_file() or not (f / "nnUNetPlans_3d_fullres").is_dir()]
    if todo:
        _run([bin_dir / "nnUNetv2_plan_and_preprocess", "-d", *todo, "-c", CONFIG, "-np", "1"],
             {**env, "nnUNet_n_proc_DA": "1"})
    for f in folders.values():
        splits = f / "splits_final.json"
        if not splits.is_file():
            cases = sorted(p.name.removesuffix(".nii.gz") for p in (f / "gt_segmentations").glob("*.nii.gz"))
            splits.write_text(json.dumps([{"train": cases[1:], "val": cases[:1]}]))
    return folders


# ------------------------------------------------------------------ cache keys

def revision(paths) -> str:
    paths = [p for p in (*COMMON, *paths)]
    rev = subprocess.run(["git", "log", "-1", "--format=%h", "--", *paths], cwd=REPO, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", *paths], cwd=REPO, capture_output=True, text=True).stdout
    if dirty.strip():
        diff = subprocess.run(["git", "diff", "--", *paths], cwd=REPO, capture_output=True, text=True).stdout
        rev += "+dirty" + hashlib.sha1((dirty + diff).encode()).hexdigest()[:8]
    return rev


def plan_hash(folder: Path) -> str:
    config = json.loads((folder / "nnUNetPlans.json").read_text())["configurations"][CONFIG]
    return hashlib.sha1(json.dumps(config, sort_keys=True).encode()).hexdigest()[:10]


def cache_key(key: str, phase: str | None, folders: dict, device: str, threads: int) -> str:
    name, ds_id, _, sources = TRAINERS[key]
    return "|".join([name + (f":{phase}" if phase else ""), f"Dataset{ds_id}", plan_hash(folders[ds_id]),
                     revision(sources), device, f"threads{threads}"])


def load_cache() -> dict:
    return json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}


def save_result(ck: str, result: dict) -> None:
    cache = load_cache()
    cache[ck] = result
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(cache, indent=1, sort_keys=True) + "\n")


# ------------------------------------------------------------------ measurement

def _first_samples(batch: dict, n: int, size: int) -> dict:
    """The first ``n`` of ``size`` samples of every per-sample entry of an nnU-Net batch."""
    def cut(v):
        if isinstance(v, (list, tuple)) and len(v) != size:
            return type(v)(cut(x) for x in v)
        if hasattr(v, "shape") and len(v.shape) and v.shape[0] == size:
            return v[:n]
        if isinstance(v, (list, tuple)) and len(v) == size:
            return v[:n]
        return v
    return {k: cut(v) for k, v in batch.items()}


def _gpu_prediction(trainer) -> dict:
    """The GPU memory plan's record (full trainers), or the same probes and rule at the stock plan."""
    from organmtl.nnunet_trainers import gpu_memory as G

    record = trainer.configuration_manager.configuration.get(G.PLANS_KEY)
    if record:
        return {"patch": record["patch_size"], "batch": record["batch_size"], "gpu_gib": record["predicted_gib"],
                "planned_patch": record["planned_patch_size"], "planned_batch": record["planned_batch_size"],
                "planned_gpu_gib": record["planned_predicted_gib"]}
    cm = trainer.configuration_manager
    patch, batch = [int(p) for p in cm.patch_size], int(cm.batch_size)
    model = G.probe(trainer.network, trainer.num_input_channels, G.probe_patch(patch, G.pooling_steps(cm)),
                    trainer.optimizer, G.PROBE_AMP["fp16"])
    gib = round(model.predicted_gib(patch, batch), 3)
    return {"patch": patch, "batch": batch, "gpu_gib": gib, "planned_patch": patch, "planned_batch": batch,
            "planned_gpu_gib": gib}


def _cpu_fp32_model(trainer):
    """fixed + per-voxel bytes of an fp32 step (the GPU memory plan's probes without autocast)."""
    from organmtl.nnunet_trainers import gpu_memory as G

    net = trainer.network.module if hasattr(trainer.network, "module") else trainer.network
    patch = [int(p) for p in trainer.configuration_manager.patch_size]
    return G.probe(net, trainer.num_input_channels, G.probe_patch(patch, G.pooling_steps(trainer.configuration_manager)),
                   trainer.optimizer, "none")


def _cpu_gib(model, patch, n) -> float:
    from organmtl.memory import GPU_OVERHEAD_GIB

    return model.predicted_gib(patch, n) - GPU_OVERHEAD_GIB


def _crop(batch: dict, patch, new) -> dict:
    """Centre crop of every 5-D (batch, channel, spatial) array of ``batch`` from ``patch`` to ``new``
    voxels (the deep-supervision targets at their own scale)."""
    def cut(v):
        if isinstance(v, (list, tuple)):
            return type(v)(cut(x) for x in v)
        if not hasattr(v, "shape") or len(v.shape) != 2 + len(patch):
            return v
        index = [slice(None), slice(None)]
        for old_len, new_len, have in zip(patch, new, v.shape[2:]):
            keep = max(1, round(have * new_len / old_len))
            start = (have - keep) // 2
            index.append(slice(start, start + keep))
        return v[tuple(index)]
    return {k: cut(v) for k, v in batch.items()}


def _step(trainer, batch: dict, timed_steps: int, profile: bool = False) -> dict:
    import torch
    from organmtl.memory import GIB, measure_trainer_step

    def copy(b):
        return {k: (v.clone() if isinstance(v, torch.Tensor) else [t.clone() for t in v] if isinstance(v, list)
                    and v and isinstance(v[0], torch.Tensor) else v) for k, v in b.items()}
    mem = measure_trainer_step(trainer, copy(batch), amp="none", warmup=False)
    out = {"instrumented_s": round(mem.seconds, 3), "cpu_peak_gib": round(mem.peak_gib, 3),
           "resident_gib": round(mem.resident_bytes / GIB, 3)}
    times = []
    for _ in range(timed_steps):
        t0 = time.perf_counter()
        trainer.train_step(copy(batch))
        times.append(time.perf_counter() - t0)
    out["timed_s"] = [round(t, 3) for t in times]
    if profile:
        from torch.profiler import ProfilerActivity, profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            trainer.train_step(copy(batch))
        out["profile"] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20)
        print(out["profile"], flush=True)
    out["step_s"] = round(statistics.median(times), 3) if times else out["instrumented_s"]
    return out


def _phase_batch(trainer, phase, stepped):
    """A FocusNet phase that trains on whole small organs (``ae``/``sos``/``joint``) steps a batch of its own
    sampler (:class:`~organmtl.nnunet_trainers.focusnet.sampler.WholeSmallOrganDataLoader`), as in training;
    None for every other trainer and phase (the batch of nnU-Net's loader)."""
    from organmtl.memory import as_tensors
    from organmtl.nnunet_trainers.focusnet.trainer import _finish

    if not (phase and hasattr(trainer, "_whole_organ_sampling") and trainer._whole_organ_sampling(phase)):
        return None
    gen = trainer._training_loader(True)
    try:
        return stepped(as_tensors(next(gen)))
    finally:
        _finish(gen)


def _small_organs(trainer, batch) -> dict:
    """FocusNet: how many (sample, small organ) pairs of the stepped batch hold the organ (SOS-Net and the
    autoencoder work on one ROI per pair); {} for other trainers."""
    labels = getattr(trainer, "focus_settings", {}).get("small_labels")
    if not labels:
        return {}
    target = batch["target"][0] if isinstance(batch["target"], (list, tuple)) else batch["target"]
    return {"small_organ_rois": int(sum(bool((t == lab).any()) for t in target for lab in labels)),
            "small_organ_pairs": len(target) * len(labels)}


def measure(key: str, phases, args, folders, threads: int) -> None:
    """Build, initialise and step trainer ``key`` (each FocusNet phase in ``phases``); cache each result."""
    import torch
    from nnunetv2.run.run_training import get_trainer_from_args
    from organmtl.memory import as_tensors
    from organmtl.nnunet_trainers import gpu_memory as G

    name, ds_id, _, _ = TRAINERS[key]
    t0 = time.perf_counter()
    trainer = get_trainer_from_args(str(ds_id), CONFIG, 0, name, "nnUNetPlans", device=torch.device(args.device))
    trainer.initialize()
    init_s = time.perf_counter() - t0
    gpu = _gpu_prediction(trainer)
    dl_tr, dl_val = trainer.get_dataloaders()
    full = as_tensors(next(dl_tr))
    for dl in (dl_tr, dl_val):
        if hasattr(dl, "_finish"):
            dl._finish()
    patch, batch_size = [int(p) for p in trainer.configuration_manager.patch_size], int(trainer.configuration_manager.batch_size)
    model = _cpu_fp32_model(trainer)
    cpu_pred = _cpu_gib(model, patch, batch_size)
    n, measured = batch_size, list(patch)
    while n > 1 and _cpu_gib(model, measured, n) > args.max_cpu_gib:
        n -= 1
    steps = G.pooling_steps(trainer.configuration_manager)
    while _cpu_gib(model, measured, n) > args.max_cpu_gib:           # even one sample too large: crop it
        a = max(range(len(measured)), key=lambda i: measured[i])
        if measured[a] - steps[a] < steps[a]:
            break
        measured[a] -= steps[a]
    def stepped(full_batch):
        b = _first_samples(full_batch, n, batch_size) if n < batch_size else full_batch
        return _crop(b, patch, measured) if measured != patch else b

    default_batch = stepped(full)
    for phase in phases:
        batch = _phase_batch(trainer, phase, stepped) or default_batch
        ck = cache_key(key, phase, folders, args.device, threads)
        if phase:
            trainer.current_epoch = [p for p, _ in trainer.schedule].index(phase)
            trainer.on_train_epoch_start()
        else:
            trainer.on_train_epoch_start()
        print(f"[bench_full_size] {name}{':' + phase if phase else ''}: patch {patch} x batch {batch_size}, "
              f"stepping {n} sample(s) of {measured} (fp32 CPU peak predicted {cpu_pred:.1f} GiB at batch "
              f"{batch_size})", flush=True)
        result = {"trainer": name, "phase": phase, "dataset": ds_id, "patch": patch, "batch": batch_size,
                  **_small_organs(trainer, batch),
                  "measured_batch": n, "measured_patch": measured, "cpu_fp32_predicted_gib": round(cpu_pred, 3), "init_s": round(init_s, 1),
                  **gpu, **_step(trainer, batch, args.timed_steps, args.profile), "date": time.strftime("%Y-%m-%d %H:%M"),
                  "threads": threads}
        print(f"[bench_full_size] {json.dumps(result)}", flush=True)
        save_result(ck, result)
    del trainer
    gc.collect()


# ------------------------------------------------------------------ table

def _voxels(r: dict) -> int:
    return r["measured_batch"] * math.prod(r["measured_patch"])


def table(results: dict[str, dict]) -> tuple[str, dict]:
    """Markdown table of the cached results of the current keys; ratios to the stock row."""
    from organmtl.nnunet_trainers.focusnet.options import phase_schedule

    stock = results.get("stock")
    rows, verdicts = [], {}

    def ratio(a, b):
        return f"{a / b:.2f}" if b else "-"

    def row(label, r, goal=None, step=None, peak=None):
        step = r["step_s"] if step is None else step
        peak = r["cpu_peak_gib"] if peak is None else peak
        per_voxel = (step / _voxels(r)) / (stock["step_s"] / _voxels(stock)) if stock else None
        fits = r["gpu_gib"] <= GPU_TARGET_GIB
        goal_text = "-" if goal is None or per_voxel is None else (f"<= {goal:g}: " + ("met" if per_voxel <= goal else
                                                                                       f"missed by {per_voxel / goal - 1:.0%}"))
        rows.append(f"| {label} | {r['planned_patch']} x {r['planned_batch']} | {r['patch']} x {r['batch']} | "
                    f"{r['measured_patch']} x {r['measured_batch']} | {step:.1f} | {ratio(step, stock['step_s']) if stock else '-'} | "
                    f"{f'{per_voxel:.2f}' if per_voxel is not None else '-'} | {peak:.2f} | "
                    f"{ratio(peak, stock['cpu_peak_gib']) if stock else '-'} | {r['gpu_gib']:.1f} "
                    f"({'fits' if fits else 'does NOT fit'}) | {goal_text} |")
        verdicts[label] = {"step_ratio_per_voxel": per_voxel, "fits_24gb": fits, "goal": goal}

    for key, (name, _, goal, _) in TRAINERS.items():
        if key == "focusnetv2":
            phased = {p: results.get(f"focusnetv2:{p}") for p in FOCUSNET_PHASES}
            for p, r in phased.items():
                if r:
                    row(f"`{name}` {p}", r)
            if all(phased.values()):
                sched = [(p, n) for p, n in phase_schedule(FOCUSNET_PHASES, DEFAULT_EPOCHS)]
                total = sum(n for _, n in sched)
                mean = sum(n * phased[p]["step_s"] for p, n in sched) / total
                peak = max(phased[p]["cpu_peak_gib"] for p in FOCUSNET_PHASES)
                row(f"`{name}` mean over {dict(sched)} (peak: max)", phased["snet"], goal, step=mean, peak=peak)
        elif key in results:
            row(f"`{name}`" + (" (baseline)" if key == "stock" else ""), results[key], goal)
    head = ("| trainer | nnU-Net plan (patch x batch) | GPU plan (patch x batch) | stepped (patch x batch) | step s | "
            "step ratio | ratio/voxel | CPU peak GiB (fp32) | peak ratio | predicted GPU GiB (fp16) | step goal (ratio/voxel) |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|")
    return head + "\n" + "\n".join(rows), verdicts


def current_results(folders, device: str, threads: int) -> dict[str, dict]:
    cache = load_cache()
    out = {}
    for key in TRAINERS:
        for phase in (FOCUSNET_PHASES if key == "focusnetv2" else (None,)):
            ck = cache_key(key, phase, folders, device, threads)
            if ck in cache:
                out[key + (f":{phase}" if phase else "")] = cache[ck]
    return out


def write_docs(markdown: str, section: str = SECTION) -> None:
    """``markdown`` in place of docs/benchmarks.md's ``section`` (up to the next ``## ``), or appended."""
    text = DOCS.read_text()
    start = text.find(section)
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + markdown.rstrip("\n") + "\n"
    else:
        end = text.find("\n## ", start + len(section))
        text = text[:start] + markdown.rstrip("\n") + "\n" + (text[end:] if end >= 0 else "")
    DOCS.write_text(text)


def _parse(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="device of the training steps")
    p.add_argument("--quick", action="store_true", help="the demo-sized phantom (32 x 80 x 80) instead of PDDCA's grid")
    p.add_argument("--work", type=Path, default=None,
                   help="data + nnU-Net folders, kept for the next run (default: TMPDIR/organmtl_bench_full_size/SIZE)")
    p.add_argument("--cases", type=int, default=3, help="phantom cases (default 3: 2 train, 1 validation)")
    p.add_argument("--trainers", nargs="+", default=None, metavar="KEY[:PHASE]",
                   help=f"subset of {list(TRAINERS)} (focusnetv2:PHASE for one of {list(FOCUSNET_PHASES)}); default all")
    p.add_argument("--timed-steps", type=int, default=0, help="uninstrumented steps to time after the measured one")
    p.add_argument("--max-cpu-gib", type=float, default=12.0,
                   help="step fewer samples when the fp32 CPU peak is predicted above this (default 12)")
    p.add_argument("--table-only", action="store_true", help="measure nothing, print the table of the cache")
    p.add_argument("--docs", action="store_true", help="write the table to docs/benchmarks.md (own section)")
    p.add_argument("--redo", action="store_true", help="measure again even when cached")
    p.add_argument("--note", action="append", default=[], help="a paragraph added below the table (repeatable)")
    p.add_argument("--profile", action="store_true",
                   help="also profile one more step (torch.profiler, top 20 operators by self CPU time; cached with the result)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = _parse(argv)
    size = "demo" if args.quick else "pddca"
    work = args.work or Path(tempfile.gettempdir()) / "organmtl_bench_full_size" / size
    os.environ.update(nnunet_env(work))                  # before nnunetv2 is imported (it reads them once)
    # the trainers plan for a 24 GiB GPU although they are built on the CPU (the GPU column below)
    os.environ["ORGANMTL_GPU_MEMORY_GB"] = f"{GPU_TARGET_GIB:g}"
    threads = int(os.environ.get("ORGANMTL_HEAVY_THREADS") or os.environ.get("OMP_NUM_THREADS") or 1)
    import torch

    torch.set_num_threads(threads)
    folders = prepare(work, size, args.cases)
    wanted = {}
    for item in args.trainers or list(TRAINERS):
        key, _, phase = item.partition(":")
        if key not in TRAINERS or (phase and (key != "focusnetv2" or phase not in FOCUSNET_PHASES)):
            raise SystemExit(f"--trainers: unknown {item!r} (keys {list(TRAINERS)}, focusnetv2:{'|'.join(FOCUSNET_PHASES)})")
        wanted.setdefault(key, [])
        wanted[key] += [phase] if phase else (list(FOCUSNET_PHASES) if key == "focusnetv2" else [None])
    if not args.table_only:
        cache = load_cache()
        if "focusnetv2" in wanted:
            os.environ["ORGANMTL_FOCUSNET_PHASE_EPOCHS"] = ",".join(f"{p}=1" for p in FOCUSNET_PHASES)
        for key, phases in wanted.items():
            todo = [p for p in phases if args.redo or cache_key(key, p, folders, args.device, threads) not in cache]
            if todo:
                measure(key, todo, args, folders, threads)
            else:
                print(f"[bench_full_size] {key}: cached", flush=True)
    results = current_results(folders, args.device, threads)
    md, verdicts = table(results)
    header = (f"{SECTION}\n\nPDDCA-sized HaN phantom ({size}: `organmtl demo-data --size {size}`, {args.cases} cases), "
              f"stock `nnUNetv2_plan_and_preprocess -c 3d_fullres`; one fp32 `train_step` per trainer/phase on the "
              f"{args.device} with {threads} thread(s) (instrumented by organmtl/memory.py, no warm-up); cache "
              f"`benchmarks/results/full_size.json`. GPU column: the trainer's GPU memory plan (fp16 AMP, probed "
              f"under CPU bf16 autocast; stock: the same probes at its plan), target {GPU_TARGET_GIB:g} GiB.\n")
    markdown = header + "\n" + md + "\n" + "".join(f"\n{note}\n" for note in args.note)
    print(markdown)
    if args.docs:
        write_docs(markdown)
    return {"results": results, "verdicts": verdicts}


if __name__ == "__main__":
    main()
