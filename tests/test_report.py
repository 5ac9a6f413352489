"""``organmtl report RUN_DIR`` on tiny fake runs built from real formats: an nnU-Net results folder
whose fold_0 log is written by nnU-Net's own ``nnUNetTrainer.print_to_log_file`` and whose fold_1
checkpoint holds nnU-Net's own logger state, with validation predictions; and a Detectron2
OUTPUT_DIR whose metrics.json is written by Detectron2's own JSONWriter/EventStorage."""
import json
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk

from organmtl.evaluation import curves
from organmtl.evaluation.report import ReportError, detect_run_kind
from tests.helpers import run_cli

DATASET = "Dataset901_Fake"
TRAINER = "nnUNetTrainer__nnUNetPlans__3d_tiny"


def _nnunet_log(fold, epochs=3):
    """Write the lines nnUNetTrainer writes per epoch, through its own print_to_log_file."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    fake = SimpleNamespace(local_rank=0, log_file=str(fold / "training_log_2026_11_22_10_00_00.txt"))
    log = lambda *a: nnUNetTrainer.print_to_log_file(fake, *a, also_print_to_console=False)  # noqa: E731
    for e in range(epochs):
        log("")
        log(f"Epoch {e}")
        log(f"Current learning rate: {np.round(0.01 * (1 - e / epochs), decimals=5)}")
        log("train_loss", np.round(np.float32(-0.1 * e), decimals=4))
        log("val_loss", np.round(np.float32(-0.05 * e), decimals=4))
        log("Pseudo dice", [np.round(np.float32(v), decimals=4) for v in (0.2 * e, 0.1 * e)])
        log("cross_stitch_alpha", [np.round(np.float32(0.9 - 0.1 * e), 4), np.round(np.float32(0.1 + 0.1 * e), 4)])
        log(f"uncertainty weighting log variances: {({'segmentation': 0.1 * e, 'landmarks': -0.2 * e})}")
        log(f"train segmentation loss {1.5 - 0.5 * e}, landmark MSE {2.0 / (e + 1)}")
        log(f"Epoch time: {np.round(12.3456, decimals=2)} s")
        log(f"Yayy! New best EMA pseudo Dice: {np.round(0.1 * e, decimals=4)}")
    log("Training done.")
    log("Mean Validation Dice: ", 0.5)


def _nnunet_checkpoint(fold, epochs=2):
    import torch
    from nnunetv2.training.logging.nnunet_logger import MetaLogger

    logger = MetaLogger(str(fold), resume=False)
    for e in range(epochs):
        logger.log("lrs", 0.01, e)
        logger.log("train_losses", -0.1 * e, e)
        logger.log("val_losses", -0.05 * e, e)
        logger.log("mean_fg_dice", 0.3 * e, e)
        logger.log("dice_per_class_or_region", [0.3 * e, 0.2 * e], e)
        logger.log("epoch_start_timestamps", 100.0 * e, e)
        logger.log("epoch_end_timestamps", 100.0 * e + 10, e)
    torch.save({"logging": logger.get_checkpoint(), "network_weights": {}}, fold / "checkpoint_final.pth")


def _vol(arr, path):
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((1.0, 1.0, 3.0))
    sitk.WriteImage(img, str(path))


@pytest.fixture(scope="module")
def nnunet_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("nnrun")
    results = root / "results" / DATASET / TRAINER
    raw, pre = root / "raw" / DATASET, root / "pre" / DATASET
    for d in (results / "fold_0" / "validation", results / "fold_1", raw / "imagesTr", pre / "gt_segmentations"):
        d.mkdir(parents=True)
    _nnunet_log(results / "fold_0")
    _nnunet_checkpoint(results / "fold_1")
    meta = {"labels": {"background": 0, "liver": 1, "spleen": 2}, "channel_names": {"0": "CT"},
            "file_ending": ".nii.gz", "numTraining": 2}
    (results / "dataset.json").write_text(json.dumps(meta))
    rng = np.random.default_rng(0)
    for i in range(2):
        g = np.zeros((6, 20, 20), np.uint8)
        g[1:5, 3:12, 3:12] = 1
        g[2:4, 14:18, 14:18] = 2
        p = g.copy()
        p[1:5, 3:12, 3:6] = 0 if i else 1
        _vol(rng.normal(size=g.shape).astype(np.float32) + g, raw / "imagesTr" / f"case{i}_0000.nii.gz")
        _vol(g, pre / "gt_segmentations" / f"case{i}.nii.gz")
        _vol(p, results / "fold_0" / "validation" / f"case{i}.nii.gz")
    env = {"nnUNet_raw": str(root / "raw"), "nnUNet_preprocessed": str(root / "pre"), "nnUNet_results": str(root / "results")}
    return results, env


def test_nnunet_log_parsed_from_real_format(nnunet_run):
    results, _ = nnunet_run
    series = curves.parse_nnunet_log(sorted((results / "fold_0").glob("training_log_*.txt")))
    assert series["train_losses"] == pytest.approx([0.0, -0.1, -0.2])
    assert series["lrs"] == pytest.approx([0.01, 0.00667, 0.00333])
    assert series["dice_per_class_or_region"][2] == pytest.approx([0.4, 0.2])
    assert series["cross_stitch_alpha"][1] == pytest.approx([0.8, 0.2])
    assert series["epoch_time_s"] == pytest.approx([12.35] * 3)
    assert series["uncertainty_weighting_log_variances/landmarks"] == pytest.approx([0.0, -0.2, -0.4])
    assert series["train_segmentation_loss"] == pytest.approx([1.5, 1.0, 0.5])
    assert series["landmark_MSE"] == pytest.approx([2.0, 1.0, 2 / 3])
    assert not any(k.startswith("Mean_Validation") for k in series)          # after "Training done."


def test_report_nnunet_results_folder(nnunet_run, tmp_path):
    results, env = nnunet_run
    assert detect_run_kind(results) == "nnunet_results"
    assert detect_run_kind(results / "fold_0") == "nnunet_fold"
    out = tmp_path / "rep"
    r = run_cli("report", results, "-o", out, "--max-cases", "1", env=env)
    assert r.returncode == 0, r.stderr
    page = (out / "report.md").read_text()
    for f in ["fold_0/nnunet_curves.png", "fold_0/nnunet_aux.png", "fold_0/nnunet_extra.png", "fold_1/nnunet_curves.png",
              "fold_0/evaluation/organmtl_summary.json", "fold_0/evaluation/per_case.csv"]:
        assert (out / f).is_file(), f
        assert f.split("/")[-1] in page or f.endswith(".json") or f.endswith(".csv")
    overlays = list((out / "fold_0" / "overlays").glob("*.png"))
    assert [p.name for p in overlays] == ["case1.png"]           # the case with the lowest mean Dice
    assert "fold_0/overlays/case1.png" in page and "| liver |" in page
    assert not (out / "fold_1" / "nnunet_aux.png").exists()       # nothing auxiliary logged there


def test_report_detectron_output_dir(tmp_path):
    from detectron2.utils.events import EventStorage, JSONWriter

    run = tmp_path / "output"
    run.mkdir()
    writer = JSONWriter(str(run / "metrics.json"))
    with EventStorage(0) as storage:
        for it in range(6):
            storage.iter = it
            storage.put_scalars(total_loss=2.0 - 0.2 * it, loss_cls=1.0 - 0.1 * it, loss_mask=0.5, lr=0.01,
                                cross_stitch_alpha_00=0.9 - 0.01 * it, log_var_seg=0.1 * it, smoothing_hint=False)
            if it == 5:
                storage.put_scalars(**{"segm/AP": 12.5, "segm/AP-liver": 20.0}, smoothing_hint=False)
            writer.write()
    writer.close()
    assert detect_run_kind(run) == "detectron2"
    records = curves.read_detectron_metrics(run / "metrics.json")
    assert len(records) == 6 and records[0]["total_loss"] == pytest.approx(2.0)
    r = run_cli("report", run)
    assert r.returncode == 0, r.stderr
    page = (run / "report" / "report.md").read_text()
    assert "detectron_curves.png" in page and "detectron_aux.png" in page
    assert (run / "report" / "detectron_curves.png").stat().st_size > 1000

    # with the COCO ground truth: evaluation table and per-category overlays
    from tests.test_evaluation_cli import write_coco_pair

    coco = tmp_path / "coco"
    res, gt = write_coco_pair(coco)
    (run / "inference").mkdir()
    res.rename(run / "inference" / "coco_instances_results.json")
    r = run_cli("report", run, "--coco-gt", gt, "--coco-images", coco / "images")
    assert r.returncode == 0, r.stderr
    page = (run / "report" / "report.md").read_text()
    assert "| kidney |" in page and "| segm |" in page and "overlays/coco.png" in page
    assert (run / "report" / "overlays" / "coco.png").is_file()


def test_report_demo_folder(nnunet_run, tmp_path):
    """An ``organmtl demo`` output: marker, nnUNet_raw/Dataset*/labelsTs + imagesTs, predictions/<trainer>."""
    import shutil

    results, _ = nnunet_run
    root = results.parents[2]
    demo = tmp_path / "demo"
    raw = demo / "nnUNet_raw" / DATASET
    (raw / "labelsTs").mkdir(parents=True)
    shutil.copytree(root / "raw" / DATASET / "imagesTr", raw / "imagesTs")
    shutil.copytree(root / "pre" / DATASET / "gt_segmentations", raw / "labelsTs", dirs_exist_ok=True)
    shutil.copy(results / "dataset.json", raw / "dataset.json")
    shutil.copytree(results / "fold_0" / "validation", demo / "predictions" / "nnUNetTrainerOMTLBaseline_Tiny")
    shutil.copytree(results / "fold_0", demo / "nnUNet_results" / DATASET / TRAINER / "fold_0")
    # a second study trained the same (baseline) trainer on another dataset: its curves must not overwrite
    shutil.copytree(results / "fold_0", demo / "nnUNet_results" / "Dataset999_Other" / TRAINER / "fold_0")
    (demo / ".organmtl-demo").write_text("made by organmtl demo\n")
    assert detect_run_kind(demo) == "demo"
    r = run_cli("report", demo, "--max-cases", "2")
    assert r.returncode == 0, r.stderr
    page = (demo / "report" / "report.md").read_text()
    assert "## Predictions nnUNetTrainerOMTLBaseline_Tiny" in page and "| spleen |" in page
    assert len(list((demo / "report" / "nnUNetTrainerOMTLBaseline_Tiny" / "overlays").glob("*.png"))) == 2
    for dataset in (DATASET, "Dataset999_Other"):
        assert (demo / "report" / dataset / TRAINER / "nnunet_curves.png").is_file()
        assert f"## nnU-Net {dataset} {TRAINER} fold_0" in page


def test_report_unknown_folder_is_usage_error(tmp_path):
    with pytest.raises(ReportError, match="nothing to report"):
        detect_run_kind(tmp_path)
    r = run_cli("report", tmp_path)
    assert r.returncode == 2 and "nothing to report" in r.stderr


# ---------------------------------------------------------------- figures read at a glance

def _axes_by_title(fig):
    return {ax.get_title(): ax for ax in fig.axes}


def test_landmark_error_in_mm_never_shares_an_axis_with_losses():
    """One quantity per axis: the landmark trainers' error in mm, heatmap RMSE and per-task losses
    (logged per epoch) each get their own panel; nnU-Net's loss | Dice | lr panels are labelled."""
    n = 4
    series = {"train_losses": [-0.1 * e for e in range(n)], "val_losses": [-0.05 * e for e in range(n)],
              "lrs": [0.01] * n, "dice_per_class_or_region": [[0.1 * e, 0.2 * e] for e in range(n)],
              "landmark_error_mm": [30.0 - 5 * e for e in range(n)], "heatmap_rmse": [0.2] * n,
              "train_segmentation_loss": [1.5 - 0.2 * e for e in range(n)], "landmark_MSE": [0.01] * n,
              "log_var_segmentation": [0.0] * n}
    figs = curves.nnunet_figures(series, "run")
    assert set(figs) == {"nnunet_curves", "nnunet_aux", "nnunet_extra"}
    main = figs["nnunet_curves"].axes
    assert [a.get_ylabel() for a in main] == ["loss", "Dice", "learning rate"]
    assert [line.get_label() for line in main[0].get_lines()] == ["train_losses", "val_losses"]
    extra = _axes_by_title(figs["nnunet_extra"])
    assert len(extra) == 4
    for title, ax in extra.items():
        assert [line.get_label() for line in ax.get_lines()] == [title]
    assert extra["landmark_error_mm"].get_ylabel() == "distance (mm)"
    aux = figs["nnunet_aux"].axes
    assert len(aux) == 1 and aux[0].get_ylabel() == "log variance"


def test_cross_stitch_alphas_are_small_multiples_per_stage(tmp_path):
    """HMR-Net's 12 cross-stitch units x 4 alphas (metrics.json as Detectron2's JSONWriter writes
    it): one panel per stage with its four alphas on one shared scale, not 48 lines on one axis."""
    from detectron2.utils.events import EventStorage, JSONWriter

    stages = ["stem", "res2", "res3", "res4", "res5", "p2", "p3", "p4", "p5", "h3", "h4", "h5"]
    writer = JSONWriter(str(tmp_path / "metrics.json"))
    with EventStorage(0) as storage:
        for it in range(0, 60, 20):
            storage.iter = it
            alphas = {f"cross_stitch/{s}/a{r}{c}": (0.9 if r == c else 0.1) + 0.001 * it * (k + 1)
                      for k, s in enumerate(stages) for r in (0, 1) for c in (0, 1)}
            storage.put_scalars(total_loss=2.0 - 0.01 * it, loss_shape=0.5, lr=0.01, log_var_shape=0.01 * it,
                                **alphas, smoothing_hint=False)
            writer.write()
    writer.close()
    figs = curves.detectron_figures(curves.read_detectron_metrics(tmp_path / "metrics.json"), "hmrnet")
    axes = _axes_by_title(figs["detectron_aux"])
    assert len(axes) == 13
    assert [t for t in axes if t.startswith("cross-stitch ")] == [f"cross-stitch {s}" for s in sorted(stages)]
    limits = set()
    for s in stages:
        ax = axes[f"cross-stitch {s}"]
        assert sorted(line.get_label() for line in ax.get_lines()) == ["a00", "a01", "a10", "a11"]
        assert ax.get_ylabel() == "alpha"
        limits.add(ax.get_ylim())
    assert len(limits) == 1                                      # one scale: stages compare at a glance
    lo, hi = limits.pop()
    assert lo < 0.1 and hi > 0.9 + 0.001 * 40 * 12
    assert axes["uncertainty log variances"].get_ylabel() == "log variance"
    curves_ax = figs["detectron_curves"].axes
    assert [a.get_ylabel() for a in curves_ax] == ["loss", "learning rate", "AP (0-100)"]
    assert {line.get_label() for line in curves_ax[0].get_lines()} == {"total_loss", "loss_shape"}
    pngs = curves.plot_detectron_metrics(curves.read_detectron_metrics(tmp_path / "metrics.json"), tmp_path, "hmr")
    assert [p.name for p in pngs] == ["detectron_curves.png", "detectron_aux.png"]
