#!/usr/bin/env python
"""Train / evaluate organmtl's Detectron2 configs (the PointRend ``train_net.py`` pattern).

    python -m organmtl.detectron_heads.train_net --config-file CONFIG.yaml \
        ORGANMTL.DATASET_ROOT /path/to/coco ORGANMTL.DATASET_NAME spine
    python -m organmtl.detectron_heads.train_net --config-file CONFIG.yaml --eval-only MODEL.WEIGHTS model.pth
    python -m organmtl.detectron_heads.train_net --num-gpus 8 --config-file CONFIG.yaml \
        SOLVER.REFERENCE_WORLD_SIZE 1 ...                                             # multi-GPU

``--config-file`` takes a path or a config id as ``organmtl list`` prints it
(``organmtl.detectron_heads:configs/tiny/mask_rcnn_R_18_FPN_baseline_tiny.yaml``, a file inside an installed
package): :func:`resolve_config_file`.

Multi-GPU: ``SOLVER.IMS_PER_BATCH`` is the total batch over all GPUs and must be divisible by
``--num-gpus`` (Detectron2 refuses it otherwise). The paper configs use 3 images on one GPU, so
for N GPUs scale the batch with the GPUs: ``SOLVER.REFERENCE_WORLD_SIZE 1`` makes Detectron2's
``DefaultTrainer.auto_scale_workers`` set IMS_PER_BATCH 3N, BASE_LR x N (linear scaling rule,
Goyal et al., "Accurate, Large Minibatch SGD") and MAX_ITER / STEPS / WARMUP_ITERS / N (same
epochs); or pass those values yourself. See docs/hmrnet.md ("Multi-GPU").

Every config gets ``cfg.ORGANMTL`` (generic) and HMR-Net's keys; the loaders use HMR-Net's mapper
(Detectron2's DatasetMapper plus contour points when the model has a shape head) and the
evaluators add HMR-Net's Dice / Hausdorff / 11-point mAP to COCOEvaluator, for any instance
segmentation config (the Mask R-CNN baselines included).
"""
import json
import logging
import os
import sys
from importlib import resources

import torch

import detectron2.utils.comm as comm
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.engine import DefaultTrainer, default_argument_parser, default_setup, launch
from detectron2.data import build_detection_test_loader, build_detection_train_loader
from detectron2.evaluation import COCOEvaluator, DatasetEvaluators, verify_results

from organmtl.detectron_heads import add_organmtl_config, register_from_cfg
from organmtl.detectron_heads.hmrnet import HMRNetDatasetMapper, HMRNetEvaluator, add_hmrnet_config
from organmtl.detectron_heads.solver import build_lr_scheduler


class Trainer(DefaultTrainer):
    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        """COCO bbox/segm mAP@[.5:.95] (COCOEvaluator) + HMR-Net's Dice, HD (mm), 11-point mAP,
        CSV and overlays (HMRNetEvaluator) in OUTPUT_DIR/inference/<dataset>."""
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        return DatasetEvaluators([
            COCOEvaluator(dataset_name, output_dir=output_folder),
            HMRNetEvaluator(dataset_name, output_dir=output_folder, score_thresh=cfg.TEST.HMRNET.SCORE_THRESH,
                            num_overlays=cfg.TEST.HMRNET.NUM_OVERLAYS),
        ])

    @classmethod
    def build_lr_scheduler(cls, cfg, optimizer):
        """Detectron2's schedulers plus the paper's inverse-time decay (``WarmupInverseTimeDecayLR``)."""
        return build_lr_scheduler(cfg, optimizer)

    @classmethod
    def build_train_loader(cls, cfg):
        """Detectron2's loader with HMRNetDatasetMapper (contour points + INPUT.HMRNET_AUG)."""
        return build_detection_train_loader(cfg, mapper=HMRNetDatasetMapper(cfg, True))

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_detection_test_loader(cfg, dataset_name, mapper=HMRNetDatasetMapper(cfg, False))

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        """Detectron2's test loop; the results are also written to OUTPUT_DIR/final_metrics.json."""
        results = super().test(cfg, model, evaluators)
        if comm.is_main_process():
            with open(os.path.join(cfg.OUTPUT_DIR, "final_metrics.json"), "w") as f:
                json.dump(results, f, indent=2, default=float)
        return results


class ConfigFileError(ValueError):
    """``--config-file`` names neither a file nor a config id (one line, exit code 2)."""


def resolve_config_file(name: str) -> str:
    """A path to the config file named by ``name``: an existing file as given, else a config id
    ``package:relative/path.yaml`` (as ``organmtl list`` prints them) resolved inside the installed package."""
    if not name or os.path.isfile(name):
        return name
    package, sep, rel = name.partition(":")
    if sep and rel and not os.path.isabs(name) and "/" not in package and "\\" not in package:
        try:
            path = resources.files(package).joinpath(rel)
        except (ModuleNotFoundError, TypeError, ValueError):
            raise ConfigFileError(f"--config-file {name}: no installed package {package!r}") from None
        if path.is_file():
            return str(path)
        raise ConfigFileError(f"--config-file {name}: package {package!r} has no file {rel!r} "
                              "(organmtl list shows the config ids)")
    raise ConfigFileError(f"--config-file {name}: no such file, nor a config id 'package:path.yaml' "
                          "(organmtl list shows the config ids)")


def setup(args):
    cfg = get_cfg()
    add_organmtl_config(cfg)
    add_hmrnet_config(cfg)
    args.config_file = resolve_config_file(args.config_file)       # default_setup reads it again
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    register_from_cfg(cfg)
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        logging.getLogger("organmtl").warning("no CUDA device: MODEL.DEVICE set to cpu")
        cfg.MODEL.DEVICE = "cpu"
    cfg.freeze()
    default_setup(cfg, args)
    return cfg


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        res = Trainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, res)
        return res
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def cli():
    args = default_argument_parser().parse_args()
    try:
        args.config_file = resolve_config_file(args.config_file)
    except ConfigFileError as e:
        print(f"train_net.py: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print("Command Line Args:", args)
    launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,))


if __name__ == "__main__":
    cli()
