"""organmtl's Detectron2 registration: importing the package registers its config keys and the COCO
demo dataset named by the config (``train_net.py`` runs every tiny config, the Mask R-CNN baseline
among them, in tests/e2e/test_hmrnet_e2e.py)."""
from importlib import resources

import pytest

from organmtl.cli import main

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(2400)]


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
