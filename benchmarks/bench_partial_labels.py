"""Partial labels, convergence style (docs/partial_labels.md, issue 18): on the demo's two
partially labelled abdomen sets (``liver_kidneys`` and ``spleen_pancreas_bladder``, different
scans), Dice on the held-out full-truth phantoms of

- ``shared_bg``: ``convert merge`` + ``nnUNetTrainerOMTLMultiTaskUNetDiceCE_Tiny`` (one shared
  background: each source teaches that the other's organs are background; the baseline),
- ``marginal`` / ``sigmoid``: ``nnUNetTrainerOMTLPartialLabels_Tiny`` in both formulations,
- ``per_source``: one stock ``nnUNetTrainerOMTLBaseline_Tiny`` per source dataset (each organ
  scored from the network of the source that annotated it; both get the same epochs x iterations).

Every organ is "never annotated together" with the three organs of the other source. Each arm is
trained by the stock ``nnUNetv2_train`` and predicted by ``nnUNetv2_predict``; scores come from
``organmtl evaluate --never-together``. Arms are cached in ``--work`` (resumable: one arm per call
with ``--arms``). Not a test; run by hand::

    .venv/bin/python benchmarks/bench_partial_labels.py --work /tmp/pl_bench --epochs 20 --iters 25
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MERGED = 780
ARMS = {"shared_bg": ("nnUNetTrainerOMTLMultiTaskUNetDiceCE_Tiny", {}),
        "marginal": ("nnUNetTrainerOMTLPartialLabels_Tiny", {"ORGANMTL_PARTIAL_LOSS": "marginal"}),
        "sigmoid": ("nnUNetTrainerOMTLPartialLabels_Tiny", {"ORGANMTL_PARTIAL_LOSS": "sigmoid"}),
        "per_source": ("nnUNetTrainerOMTLBaseline_Tiny", {})}


def _bin(name: str) -> str:
    from organmtl.procs import venv_bin
    return venv_bin(name)


def _run(cmd: list[str], env: dict, log: Path, timeout: float = 3600) -> None:
    from organmtl.procs import run_in_group
    run_in_group([str(c) for c in cmd], env=env, log_file=log, timeout=timeout)


def prepare(work: Path, n_cases: int, n_test: int) -> dict:
    """Demo sets -> two source datasets + their merge, all tiny-planned; fold 0 validates on the first
    scan of each source (the same scans in the per-source datasets)."""
    from organmtl.demo_data.partial import ANNOTATORS, FULL_TRUTH, convert_commands, write_abdomen_partial

    env = {**os.environ, "nnUNet_raw": str(work / "raw"), "nnUNet_preprocessed": str(work / "pre"),
           "nnUNet_results": str(work / "res"), "nnUNet_n_proc_DA": "0", "nnUNet_def_n_proc": "1"}
    info_file = work / "prepared.json"
    if info_file.is_file():
        return {**json.loads(info_file.read_text()), "env": env}
    demo = work / "demo"
    index = write_abdomen_partial(demo, n_cases, seed=0, n_test=n_test)
    cmds, merged = convert_commands(demo, MERGED)
    log = work / "prepare.log"
    for cmd in cmds:
        _run([_bin("organmtl"), *[c.format(raw=work / "raw") for c in cmd]], env, log)
    sources = {a: f"Dataset{MERGED + k:03d}_{a}" for k, a in enumerate(ANNOTATORS, start=1)}
    for ds_id in [MERGED, *(MERGED + k for k in range(1, len(ANNOTATORS) + 1))]:
        _run([_bin("organmtl"), "plan-tiny", "-d", ds_id, "-np", "1"], env, log)
    merged_val = []
    for a, name in sources.items():
        cases = sorted(index[a])
        (work / "pre" / name / "splits_final.json").write_text(json.dumps([{"train": cases[1:], "val": cases[:1]}]))
        merged_val.append(f"{a}_{cases[0]}")
    meta = json.loads((work / "raw" / merged / "dataset.json").read_text())
    all_cases = sorted(c for t in meta["organmtl_tasks"].values() for c in t["cases"])
    (work / "pre" / merged / "splits_final.json").write_text(
        json.dumps([{"train": [c for c in all_cases if c not in merged_val], "val": merged_val}]))
    info = {"merged": merged, "sources": sources, "truth": str(demo / FULL_TRUTH), "n_cases": n_cases,
            "n_test": len(index[FULL_TRUTH])}
    info_file.write_text(json.dumps(info, indent=2))
    return {**info, "env": env}


def _train_predict(info: dict, ds_id: int, dataset: str, trainer: str, extra: dict, out: Path, budget: dict,
                   log: Path) -> None:
    env = {**info["env"], **budget, **extra}
    _run([_bin("nnUNetv2_train"), ds_id, "3d_tiny", "0", "-tr", trainer, "-device", "cpu"], env, log)
    _run([_bin("nnUNetv2_predict"), "-i", Path(info["truth"]) / "images", "-o", out, "-d", ds_id, "-c", "3d_tiny",
          "-f", "0", "-tr", trainer, "-device", "cpu", "-npp", "1", "-nps", "1"], env, log)


def _combine_per_source(info: dict, per_source: Path, out: Path) -> None:
    """Each source network's label map in the merged values; organs of the second source painted
    where the first predicted background."""
    import SimpleITK as sitk

    from organmtl.demo_data.partial import ANNOTATORS, MERGED_LABELS

    out.mkdir(parents=True, exist_ok=True)
    for t in sorted((Path(info["truth"]) / "labels").glob("*.nii.gz")):
        merged = None
        for a, organs in ANNOTATORS.items():
            img = sitk.ReadImage(str(per_source / a / t.name))
            arr = sitk.GetArrayFromImage(img)
            lut = np.zeros(len(organs) + 1, np.uint8)
            for v, o in enumerate(organs, start=1):
                lut[v] = MERGED_LABELS[o]
            mapped = lut[arr]
            merged = mapped if merged is None else np.where(merged == 0, mapped, merged)
        res = sitk.GetImageFromArray(merged)
        res.CopyInformation(img)
        sitk.WriteImage(res, str(out / t.name))


def run_arm(arm: str, info: dict, work: Path, budget: dict) -> dict:
    from organmtl.evaluation.evaluate import run_evaluation

    cache = work / f"result_{arm}_{budget['ORGANMTL_EPOCHS']}x{budget['ORGANMTL_ITERS_PER_EPOCH']}.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    trainer, extra = ARMS[arm]
    log = work / f"{arm}.log"
    t0 = time.monotonic()
    tag = f"{budget['ORGANMTL_EPOCHS']}x{budget['ORGANMTL_ITERS_PER_EPOCH']}"
    pred = work / f"pred_{arm}_{tag}"
    if arm == "per_source":
        for k, (a, name) in enumerate(info["sources"].items(), start=1):
            env_res = {"nnUNet_results": str(work / f"res_per_source_{tag}")}
            _train_predict(info, MERGED + k, name, trainer, env_res, work / f"pred_per_source_{tag}" / a, budget, log)
        _combine_per_source(info, work / f"pred_per_source_{tag}", pred)
    else:
        _train_predict(info, MERGED, info["merged"], trainer, {**extra, "nnUNet_results": str(work / f"res_{arm}_{tag}")},
                       pred, budget, log)
    wall = time.monotonic() - t0
    summary, _ = run_evaluation(pred, Path(info["truth"]) / "labels", out_dir=work / f"eval_{arm}",
                                dataset_json=work / "raw" / info["merged"] / "dataset.json", never_together=True)
    nt = summary["never_annotated_together"]
    result = {"arm": arm, "trainer": trainer, "extra_env": extra, "wall_s": round(wall, 1), "dice": nt["dice"],
              "mean_dice": nt["mean_dice"], "n_pairs": len(nt["pairs"]), "budget": budget}
    cache.write_text(json.dumps(result, indent=2))
    return result


def table(results: dict, budget: dict, info: dict) -> str:
    from organmtl.demo_data.partial import MERGED_LABELS

    organs = [o for o in MERGED_LABELS if o != "background"]
    arms = [a for a in ARMS if a in results]
    ref = results.get("per_source", {}).get("mean_dice")
    lines = [f"Dice on {info['n_test']} full-truth phantoms; {info['n_cases']} training scans per source (1 validates), "
             f"{budget['ORGANMTL_EPOCHS']} epochs x {budget['ORGANMTL_ITERS_PER_EPOCH']} iterations per network; "
             "every organ is never annotated together with the other source's three", "",
             "| organ | " + " | ".join(arms) + " |", "|---" * (len(arms) + 1) + "|"]
    for o in organs:
        lines.append(f"| {o} | " + " | ".join(f"{results[a]['dice'].get(o, float('nan')):.3f}" for a in arms) + " |")
    lines.append("| **mean** | " + " | ".join(f"**{results[a]['mean_dice']:.3f}**" for a in arms) + " |")
    if ref is not None:
        lines.append("| mean - per_source | " + " | ".join(f"{results[a]['mean_dice'] - ref:+.3f}" for a in arms) + " |")
    lines.append("| wall s (train + predict, 1 thread) | " + " | ".join(f"{results[a]['wall_s']:.0f}" for a in arms) + " |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=None, help="working folder (cached arms; default a temp folder)")
    ap.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--iters", type=int, default=25)
    ap.add_argument("--n-cases", type=int, default=6, help="training scans per source (default 6)")
    ap.add_argument("--n-test", type=int, default=3, help="full-truth phantoms (default 3)")
    ap.add_argument("--quick", action="store_true", help="4 epochs x 10 iterations, 4 scans per source")
    ap.add_argument("--device", default="cpu", choices=["cpu"], help="CPU only (the nnU-Net commands get -device cpu)")
    a = ap.parse_args(argv)
    if a.quick:
        a.epochs, a.iters, a.n_cases = 4, 10, 4
    import tempfile

    work = a.work or Path(tempfile.mkdtemp(prefix="bench_partial_"))
    work.mkdir(parents=True, exist_ok=True)
    budget = {"ORGANMTL_EPOCHS": str(a.epochs), "ORGANMTL_ITERS_PER_EPOCH": str(a.iters), "ORGANMTL_VAL_ITERS": "2"}
    info = prepare(work, a.n_cases, a.n_test)
    for arm in a.arms:
        run_arm(arm, info, work, budget)
    tag = f"{a.epochs}x{a.iters}"
    results = {arm: json.loads((work / f"result_{arm}_{tag}.json").read_text()) for arm in ARMS
               if (work / f"result_{arm}_{tag}.json").is_file()}
    print("## bench_partial_labels\n\n" + table(results, budget, info))
    return {"results": results, "budget": budget}


if __name__ == "__main__":
    main()
