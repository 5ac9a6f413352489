"""``organmtl demo``: the main job end to end on the built-in demo data, on a CPU.

1. write the phantoms (``organmtl demo-data``), keeping 4 head-and-neck cases aside as a test set;
2. convert PDDCA-style head-and-neck CT -> nnU-Net raw (``organmtl convert pddca --test``);
3. plan + preprocess with the tiny CPU configuration (``organmtl plan-tiny``);
4. train each nnU-Net trainer of the comparison with the stock ``nnUNetv2_train``;
5. predict the test cases with the stock ``nnUNetv2_predict``; Dice per organ (nnU-Net's own
   evaluation); PNG overlays of the reference vs predicted contours;
6. Detectron2: spine slices -> COCO (``organmtl convert volumes --to coco``), ``train_net.py``
   with the tiny Mask R-CNN config, COCO segm AP per structure.

Everything lives under ``--out`` (nnU-Net's three folders included); nothing outside is touched.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

from organmtl.procs import run_in_group, venv_bin

MARKER = ".organmtl-demo"
DATASET_ID = 501
CONFIGURATION = "3d_tiny"
FOLD = 0
TRAINERS = {"nnU-Net baseline": "nnUNetTrainerOMTLBaseline_Tiny"}
DEFAULT_EPOCHS, DEFAULT_ITERATIONS = 40, 25
DETECTRON_ITERATIONS = 300
N_TEST = 4


def _step(title: str):
    print(f"\n=== {title}", flush=True)
    return time.time()


def _done(t0: float):
    print(f"    ({time.time() - t0:.0f} s)", flush=True)


def prepare_out(out: Path, overwrite: bool) -> None:
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).exists():
            raise SystemExit(f"organmtl demo: error: {out} exists and was not made by the demo; choose another --out")
        if not overwrite:
            print(f"{out} holds an earlier demo run: starting again (pass a new --out to keep it)")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("made by organmtl demo\n")


def run_demo(out: Path, epochs: int | None = None, iterations: int | None = None, overwrite: bool = False,
             detectron_iterations: int | None = None) -> int:
    from organmtl.demo_data import write_demo_data
    from organmtl.demo_data.han import write_han

    out = Path(out).resolve()
    detectron_iterations = detectron_iterations or DETECTRON_ITERATIONS
    prepare_out(out, overwrite)
    env = {"nnUNet_raw": str(out / "nnUNet_raw"), "nnUNet_preprocessed": str(out / "nnUNet_preprocessed"),
           "nnUNet_results": str(out / "nnUNet_results"), "nnUNet_n_proc_DA": os.environ.get("nnUNet_n_proc_DA", "0"),
           "nnUNet_def_n_proc": os.environ.get("nnUNet_def_n_proc", "2"),
           "ORGANMTL_EPOCHS": str(epochs or DEFAULT_EPOCHS),
           "ORGANMTL_ITERS_PER_EPOCH": str(iterations or DEFAULT_ITERATIONS)}
    os.environ.update(env)
    logs = out / "logs"
    logs.mkdir()
    organmtl = [sys.executable, "-m", "organmtl.cli"]
    t_all = time.time()

    t0 = _step("1/6 demo data")
    data = out / "demo_data"
    write_demo_data(data, seed=0, families=["han_pddca", "spine"], overwrite=True)
    test_dir = data / "han_pddca_test"
    write_han(test_dir, N_TEST, seed=0, first_index=100, with_missing=False)
    n_train = sum(1 for p in (data / "han_pddca").iterdir() if p.is_dir())
    print(f"    {data}: {n_train} training + {N_TEST} test head-and-neck CTs, spine slices")
    _done(t0)

    t0 = _step("2/6 convert PDDCA-style data to nnU-Net raw format")
    run_in_group(organmtl + ["convert", "pddca", str(data / "han_pddca"), "--test", str(test_dir),
                             "--dataset-id", str(DATASET_ID), "--name", "HaNDemo", "-j", "2"],
                 log_file=logs / "convert.log")
    raw = out / "nnUNet_raw" / f"Dataset{DATASET_ID:03d}_HaNDemo"
    print("    " + "\n    ".join(l for l in (logs / "convert.log").read_text().splitlines() if "%|" not in l))
    _done(t0)

    t0 = _step(f"3/6 nnU-Net plan + preprocess ({CONFIGURATION})")
    run_in_group(organmtl + ["plan-tiny", "-d", str(DATASET_ID), "-c", CONFIGURATION], log_file=logs / "plan.log")
    _done(t0)

    columns, pictures = {}, []
    for label, trainer in TRAINERS.items():
        t0 = _step(f"4/6 nnUNetv2_train {DATASET_ID} {CONFIGURATION} {FOLD} -tr {trainer} "
                   f"({env['ORGANMTL_EPOCHS']} epochs x {env['ORGANMTL_ITERS_PER_EPOCH']} iterations)")
        run_in_group([venv_bin("nnUNetv2_train"), str(DATASET_ID), CONFIGURATION, str(FOLD), "-tr", trainer,
                      "-device", "cpu"], log_file=logs / f"train_{trainer}.log")
        fold_dir = out / "nnUNet_results" / raw.name / f"{trainer}__nnUNetPlans__{CONFIGURATION}" / f"fold_{FOLD}"
        pictures.append(fold_dir / "progress.png")
        _done(t0)
        t0 = _step(f"5/6 nnUNetv2_predict -tr {trainer} on {N_TEST} test cases + evaluation")
        pred = out / "predictions" / trainer
        run_in_group([venv_bin("nnUNetv2_predict"), "-i", str(raw / "imagesTs"), "-o", str(pred), "-d",
                      str(DATASET_ID), "-c", CONFIGURATION, "-f", str(FOLD), "-tr", trainer, "-device", "cpu",
                      "--disable_tta", "-npp", "1", "-nps", "1"], log_file=logs / f"predict_{trainer}.log")
        columns[label] = _evaluate(raw, pred, out / "pictures" / trainer, pictures)
        _done(t0)

    t0 = _step("6/6 Detectron2: spine slices -> COCO -> train_net.py (tiny Mask R-CNN)")
    det = _detectron_demo(out, data, logs, detectron_iterations)
    _done(t0)

    from organmtl.evaluation.segmentation import format_table

    table = format_table(columns)
    det_table = "\n".join([f"Detectron2 Mask R-CNN R18-FPN tiny, {detectron_iterations} iterations, "
                           "spine sagittal slices, validation fold (COCO segm AP):",
                           "| structure | AP | ", "|---|---|"] +
                          [f"| {k} | {v:.1f} |" for k, v in det.items()])
    summary = (f"# organmtl demo ({time.time() - t_all:.0f} s on CPU)\n\n"
               f"Head-and-neck CT phantom, {N_TEST} test cases, nnU-Net {CONFIGURATION}:\n\n{table}\n\n{det_table}\n\n"
               "Pictures:\n" + "\n".join(f"- {p}" for p in pictures) + "\n")
    (out / "summary.md").write_text(summary)
    print("\n" + summary)
    print(f"Everything is under {out}; this summary is {out / 'summary.md'}")
    return 0


def _evaluate(raw: Path, pred: Path, picture_dir: Path, pictures: list) -> dict:
    from organmtl.evaluation.overlays import overlay_case
    from organmtl.evaluation.segmentation import evaluate_folders

    meta = json.loads((raw / "dataset.json").read_text())
    scores = evaluate_folders(pred, raw / "labelsTs", raw / "dataset.json")
    for seg in sorted((raw / "labelsTs").glob(f"*{meta['file_ending']}")):
        case = seg.name[: -len(meta["file_ending"])]
        pictures.append(overlay_case(raw / "imagesTs" / f"{case}_0000{meta['file_ending']}", seg, pred / seg.name,
                                     meta["labels"], picture_dir / f"{case}.png", window=(-160, 240)))
    return scores


def _detectron_demo(out: Path, data: Path, logs: Path, iterations: int) -> dict:
    from importlib import resources

    coco = out / "coco" / "spine_sag_mr"
    run_in_group([sys.executable, "-m", "organmtl.cli", "convert", "volumes", str(data / "spine" / "spine_sag_mr"),
                  "--to", "coco", "--dataset-id", "502", "--name", "SpineSagDemo", "--out", str(coco)],
                 log_file=logs / "convert_coco.log")
    config = resources.files("organmtl.detectron_heads") / "configs/tiny/mask_rcnn_R_18_FPN_baseline_tiny.yaml"
    output_dir = out / "detectron2" / "mask_rcnn_R_18_FPN_baseline_tiny"
    run_in_group([sys.executable, "-m", "organmtl.detectron_heads.train_net", "--config-file", str(config),
                  "ORGANMTL.DATASET_ROOT", str(coco), "ORGANMTL.DATASET_NAME", "spine_sag_demo",
                  "SOLVER.MAX_ITER", str(iterations), "SOLVER.STEPS", f"({int(iterations * 0.8)},)",
                  "OUTPUT_DIR", str(output_dir)], log_file=logs / "train_net.log")
    results = json.loads((output_dir / "final_metrics.json").read_text())
    segm = results.get("segm")
    if not segm:   # COCOEvaluator reports no segm block when the model predicted nothing
        return {"(no instance predicted)": float("nan")}
    return {k[3:]: v for k, v in segm.items() if k.startswith("AP-")} | {"mean (AP)": segm.get("AP", float("nan"))}
