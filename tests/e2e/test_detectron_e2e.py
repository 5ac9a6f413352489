"""train_net.py (run as a script, the way Detectron2 projects are) trains a registered organmtl
config on a registered COCO demo dataset and evaluates it with COCOEvaluator."""
import json
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest

from organmtl.cli import main
from organmtl.procs import run_in_group

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(2400)]
REPO = Path(__file__).resolve().parents[2]


def test_registration_on_import_and_cfg(tmp_path, demo_root):
    from detectron2.config import get_cfg
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from organmtl.detectron_heads import add_organmtl_config, register_from_cfg

    coco = tmp_path / "coco"
    assert main(["convert", "volumes", str(demo_root / "spine" / "spine_sag_mr"), "--to", "coco",
                 "--dataset-id", "40", "--out", str(coco)]) == 0
    cfg = get_cfg()
    add_organmtl_config(cfg)
    cfg.merge_from_file(str(resources.files("organmtl.detectron_heads") / "configs/tiny/mask_rcnn_R_18_FPN_baseline_tiny.yaml"))
    cfg.ORGANMTL.DATASET_ROOT = str(coco)
    cfg.ORGANMTL.DATASET_NAME = "unit_spine"
    register_from_cfg(cfg)
    assert cfg.DATASETS.TRAIN == ("unit_spine_train",) and cfg.DATASETS.TEST == ("unit_spine_val",)
    records = DatasetCatalog.get("unit_spine_train")
    assert records[0]["pixel_spacing"] == pytest.approx([0.8, 0.8])
    assert "contour_points" in records[0]["annotations"][0]
    assert MetadataCatalog.get("unit_spine_train").thing_classes == ["L1", "L2", "L3", "L4", "L5", "disc"]
    assert cfg.MODEL.PIXEL_STD == [57.375, 57.120, 58.395]
    assert cfg.MODEL.ROI_HEADS.NUM_CLASSES == 6


def test_train_net_script_two_iterations(tmp_path, demo_root):
    coco = tmp_path / "coco"
    assert main(["convert", "volumes", str(demo_root / "spine" / "spine_sag_mr"), "--to", "coco",
                 "--dataset-id", "41", "--out", str(coco)]) == 0
    config = REPO / "detectron_heads" / "configs" / "tiny" / "mask_rcnn_R_18_FPN_baseline_tiny.yaml"
    out = tmp_path / "run"
    log = tmp_path / "train_net.log"
    run_in_group([sys.executable, str(REPO / "detectron_heads" / "train_net.py"), "--config-file", str(config),
                  "ORGANMTL.DATASET_ROOT", str(coco), "ORGANMTL.DATASET_NAME", "e2e_spine",
                  "SOLVER.MAX_ITER", "2", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0",
                  "OUTPUT_DIR", str(out)], log_file=log, timeout=600)
    results = json.loads((out / "final_metrics.json").read_text())
    assert {"bbox", "segm"} <= set(results) and "AP-disc" in results["segm"]
    assert (out / "model_final.pth").is_file()
    logged = [json.loads(l) for l in (out / "metrics.json").read_text().splitlines()]
    assert any("total_loss" in m and m["iteration"] == 1 for m in logged)     # the 2nd iteration trained
