"""HMR-Net end to end (docs/hmrnet.md): ``train_net.py`` run as a script trains the tiny HMR-Net
and Mask R-CNN baseline configs 2 iterations on CPU and evaluates each (COCO bbox/segm, Dice/HD/11-point mAP, CSV, overlays); the full tiny HMR-Net overfits
two demo spine slices (segm Dice >= 0.8)."""
import json
import os
import sys
import time
from pathlib import Path

import pytest

from organmtl.procs import run_in_group

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(2400)]
REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "detectron_heads" / "hmrnet" / "configs" / "tiny"
BASELINE_TINY = REPO / "detectron_heads" / "configs" / "tiny"      # generic Mask R-CNN baseline
OVERFIT_ITERS = int(os.environ.get("ORGANMTL_HMRNET_OVERFIT_ITERS", "80"))
CHEAP = ["SOLVER.MAX_ITER", "2", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", "TEST.HMRNET.SCORE_THRESH", "0.0",
         "TEST.DETECTIONS_PER_IMAGE", "10", "TEST.HMRNET.NUM_OVERLAYS", "1"]


def train_net(config: Path, coco: Path, name: str, out: Path, *opts: str, timeout: int = 600) -> dict:
    log = out.parent / f"{out.name}.log"
    run_in_group([sys.executable, str(REPO / "detectron_heads" / "train_net.py"), "--config-file", str(config),
                  "ORGANMTL.DATASET_ROOT", str(coco), "ORGANMTL.DATASET_NAME", name, "OUTPUT_DIR", str(out), *opts],
                 log_file=log, timeout=timeout)
    return json.loads((out / "final_metrics.json").read_text())


#: HMR-Net and the generic Mask R-CNN baseline through the script; the ablation configs' parts (shape vs mask
#: head, manifold loss, cross-stitch) are checked in process (tests/test_hmrnet_model.py)
@pytest.mark.parametrize("config", ["hmrnet_R_18_FPN_tiny", "mask_rcnn_R_18_FPN_baseline_tiny"])
def test_train_net_trains_and_evaluates_each_tiny_config(tmp_path, spine_coco, config):
    out = tmp_path / "run"
    folder = BASELINE_TINY if config.startswith("mask_rcnn") else TINY
    results = train_net(folder / f"{config}.yaml", spine_coco, f"e2e_{config}", out, *CHEAP)
    assert {"bbox", "segm", "hmrnet"} <= set(results)
    assert "AP-disc" in results["segm"]
    hm = results["hmrnet"]
    assert {"Dice-disc", "HD-disc", "mDice", "bbox_AP11", "segm_AP11", "segm_AP11-disc"} <= set(hm)
    inference = out / "inference" / f"e2e_{config}_val"
    assert (inference / "hmrnet_metrics.csv").read_text().startswith("class,Dice,HD (mm)")
    assert list((inference / "overlays").glob("*.png"))
    logged = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    last = [m for m in logged if m.get("iteration") == 1 and "total_loss" in m]
    assert last, "the 2nd iteration did not train"
    keys = set(last[0])
    assert ("loss_shape" in keys) == ("mask" not in config)
    assert ("loss_manifold" in keys) == (config in ("hmrnet_R_18_FPN_tiny", "hmrnet_R_18_FPN_no_cross_stitch_tiny"))
    twin = config.startswith("hmrnet") and "no_cross_stitch" not in config
    logged_keys = set().union(*logged)                  # alphas are logged every LOG_ALPHA_PERIOD (from iteration 0)
    assert ("cross_stitch/res3/a01" in logged_keys) == twin


def test_full_tiny_hmrnet_overfits_two_spine_slices(tmp_path, spine_coco):
    """Train and evaluate on the same two slices (no augmentation): segm Dice >= 0.8."""
    sub = tmp_path / "two_slices"
    (sub / "annotations").mkdir(parents=True)
    (sub / "images").symlink_to(spine_coco / "images")
    data = json.loads((spine_coco / "annotations" / "instances_train.json").read_text())
    images = data["images"][:2]
    ids = {im["id"] for im in images}
    data = dict(data, images=images, annotations=[a for a in data["annotations"] if a["image_id"] in ids])
    for split in ("train", "val"):
        (sub / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
    t0 = time.time()
    results = train_net(TINY / "hmrnet_R_18_FPN_tiny.yaml", sub, "overfit_spine", tmp_path / "run",
                        "SOLVER.MAX_ITER", str(OVERFIT_ITERS), "SOLVER.STEPS", "(100000,)",
                        "INPUT.HMRNET_AUG.NAMES", "[]", "INPUT.RANDOM_FLIP", "none",
                        "TEST.HMRNET.NUM_OVERLAYS", "2", timeout=1200)
    hm = results["hmrnet"]
    print(f"overfit: {OVERFIT_ITERS} iterations, {time.time() - t0:.0f} s wall, mDice {hm['mDice']:.3f}, "
          f"mHD {hm['mHD']:.2f} mm, segm AP {results['segm']['AP']:.1f}")
    assert hm["mDice"] >= 0.8
