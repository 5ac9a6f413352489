"""The real landmark and multi-task trainers on a tiny in-memory plan, and batches for their
``train_step`` (used by tests/test_landmark_amp.py, tests/test_multitask_cnn.py and
tests/test_distributed_trainers.py).

The plan is nnU-Net's ``PlainConvUNet`` at 3 stages of 4/8/16 features on a 16^3 patch; one real
preprocessed case (nnU-Net's numpy dataset format) is written so that ``initialize()`` finds the
dataset class as in a real run. Batches are made here rather than by the data loader, so a test
decides what a rank's batch holds (no landmark, no sample of a task).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetNumpy

PATCH = (16, 16, 16)
LABELS = {"background": 0, "organ_a": 1, "organ_b": 2}


def _plans(batch_size: int = 2, batch_dice: bool = False) -> dict:
    arch = {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
            "arch_kwargs": {"n_stages": 3, "features_per_stage": [4, 8, 16], "conv_op": "torch.nn.modules.conv.Conv3d",
                            "kernel_sizes": [[3, 3, 3]] * 3, "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]],
                            "n_conv_per_stage": [1, 1, 1], "n_conv_per_stage_decoder": [1, 1], "conv_bias": True,
                            "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                            "norm_op_kwargs": {"eps": 1e-5, "affine": True}, "dropout_op": None,
                            "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}},
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}
    cfg = {"data_identifier": "d", "preprocessor_name": "DefaultPreprocessor", "batch_size": batch_size,
           "patch_size": list(PATCH), "median_image_size_in_voxels": list(PATCH), "spacing": [1.0, 1.0, 1.0],
           "normalization_schemes": ["CTNormalization", "NoNormalization"], "use_mask_for_norm": [False, False],
           "resampling_fn_data": "resample_data_or_seg_to_shape", "resampling_fn_seg": "resample_data_or_seg_to_shape",
           "resampling_fn_data_kwargs": {}, "resampling_fn_seg_kwargs": {},
           "resampling_fn_probabilities": "resample_data_or_seg_to_shape", "resampling_fn_probabilities_kwargs": {},
           "batch_dice": batch_dice, "architecture": arch}
    return {"continue_training": False, "dataset_name": "Dataset998_Steps", "plans_name": "nnUNetPlans",
            "original_median_spacing_after_transp": [1, 1, 1], "original_median_shape_after_transp": list(PATCH),
            "image_reader_writer": "SimpleITKIO", "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
            "experiment_planner_used": "test", "label_manager": "LabelManager",
            "foreground_intensity_properties_per_channel": {"0": {"mean": 40.0, "std": 200.0}},
            "configurations": {"3d_steps": cfg}}


def _dataset_json(kind: str) -> dict:
    base = {"labels": dict(LABELS), "file_ending": ".nii.gz", "numTraining": 4}
    if kind == "landmarks":
        return {**base, "channel_names": {"0": "CT", "1": "heatmap"},
                "organmtl_landmark_channels": {"channels": {"1": "max(p, q)"}, "encoding": "heatmap",
                                               "landmarks": ["p", "q"], "sigma_mm": 3.0}}
    if kind == "tasks":
        return {**base, "channel_names": {"0": "CT"}, "organmtl_tasks": {
            "task_a": {"label_values": [1], "cases": ["task_a_0", "task_a_1"]},
            "task_b": {"label_values": [2], "cases": ["task_b_0", "task_b_1"]}}}
    raise ValueError(kind)


def build_trainer(cls, root: Path, kind: str, batch_size: int = 2, batch_dice: bool = False,
                  device: torch.device = torch.device("cpu"), before_initialize=None):
    """``cls`` constructed as ``nnUNetv2_train`` does and initialized; nnU-Net's folder variables are
    set to ``root/raw``, ``root/preprocessed``, ``root/results`` in ``os.environ`` (a test that
    must restore them uses ``monkeypatch``).
    ``kind``: ``"landmarks"`` (CT + one merged heatmap channel) or ``"tasks"`` (two tasks, one
    organ each). ``before_initialize(trainer)`` runs between construction and ``initialize()``."""
    root = Path(root)
    for var, sub in (("nnUNet_raw", "raw"), ("nnUNet_preprocessed", "preprocessed"), ("nnUNet_results", "results")):
        os.environ[var] = str(root / sub)          # nnU-Net reads its folders from the environment
    trainer = cls(_plans(batch_size, batch_dice), "3d_steps", 0, _dataset_json(kind), device)
    os.makedirs(trainer.preprocessed_dataset_folder, exist_ok=True)
    n_channels = len(trainer.dataset_json["channel_names"])
    nnUNetDatasetNumpy.save_case(np.zeros((n_channels, *PATCH), np.float32), np.zeros((1, *PATCH), np.int16),
                                 {"class_locations": {}}, os.path.join(trainer.preprocessed_dataset_folder, "case_0"))
    if before_initialize is not None:
        before_initialize(trainer)
    trainer.initialize()
    return trainer


def _downsampled(target: torch.Tensor, trainer) -> list[torch.Tensor] | torch.Tensor:
    if not trainer.enable_deep_supervision:
        return target
    out = []
    for scale in trainer._get_deep_supervision_scales():
        size = [int(round(p * s)) for p, s in zip(PATCH, scale)]
        out.append(F.interpolate(target, size=size, mode="nearest"))
    return out


def make_batch(trainer, seed: int, n: int | None = None, landmarks: bool = True,
               labels: tuple[int, ...] = (1, 2)) -> dict:
    """A batch as nnU-Net's loader + transforms give it: ``data`` (image, then the landmark heatmap
    channel when the dataset has one) and ``target`` (label map, or one channel per region, at every
    deep-supervision scale). ``landmarks=False``: an all-zero heatmap (no landmark in the patch);
    ``labels``: the organs present (a batch of one task holds only that task's labels)."""
    g = torch.Generator().manual_seed(seed)
    n = n or trainer.batch_size
    grid = torch.stack(torch.meshgrid(*[torch.arange(float(p)) for p in PATCH], indexing="ij"))
    seg = torch.zeros(n, 1, *PATCH)
    for value in labels:
        centre = torch.randint(4, 12, (n, 3), generator=g).float()
        for i in range(n):
            seg[i, 0][((grid - centre[i].view(3, 1, 1, 1)) ** 2).sum(0) < 9] = value
    image = seg + 0.3 * torch.randn(seg.shape, generator=g)
    channels = [image]
    lc = getattr(trainer, "landmark_channels", None)
    if lc is not None and lc.n_landmark:
        peak = torch.randint(3, 13, (n, 3), generator=g).float()
        d2 = ((grid[None] - peak.view(n, 3, 1, 1, 1)) ** 2).sum(1, keepdim=True)
        heat = torch.exp(-d2 / (2 * 2.0 ** 2))
        channels.append(heat if landmarks else torch.zeros_like(heat))
    data = torch.cat(channels, 1)
    lm = trainer.label_manager
    if lm.has_regions:
        regions = [r if isinstance(r, (list, tuple)) else (r,) for r in lm.foreground_regions]
        target = torch.cat([torch.isin(seg, torch.tensor(r, dtype=seg.dtype)).float() for r in regions], 1)
    else:
        target = seg
    return {"data": data, "target": _downsampled(target, trainer)}


def parameters(trainer) -> dict[str, torch.Tensor]:
    """The network module's parameters (unwrapped from DDP), detached copies."""
    net = trainer.network.module if hasattr(trainer.network, "module") else trainer.network
    return {k: p.detach().clone() for k, p in net.named_parameters()}


# ---------------------------------------------------------------------------------- reference steps
def stock_step(trainer, batch: dict) -> dict:
    """nnU-Net's own ``nnUNetTrainer.train_step`` on ``trainer`` (the reference of a stock-step trainer)."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    return nnUNetTrainer.train_step(trainer, batch)


def landmark_step_before_amp(trainer, batch: dict) -> dict:
    """The landmark-tail trainers' train step as written before the shared AMP helper (fp32 on the
    CPU, no scaler), kept as the reference the new step must reproduce bit for bit."""
    data = batch["data"]
    target = [t for t in batch["target"]] if isinstance(batch["target"], list) else batch["target"]
    heatmap_target = data[:, trainer.landmark_channels.n_image:]
    trainer._module().outputs = "both"
    trainer.optimizer.zero_grad(set_to_none=True)
    try:
        seg, heatmaps = trainer.network(data)
        seg_loss = trainer.loss(seg, target)
        landmark_loss = F.mse_loss(heatmaps.float(), heatmap_target.float())
        loss = trainer.combine_losses(seg_loss, landmark_loss)
    finally:
        trainer._module().outputs = "segmentation"
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trainer.network.parameters(), 12)
    trainer.optimizer.step()
    if hasattr(trainer, "current_task"):          # the alternate trainer's turn counter
        trainer.global_iteration = getattr(trainer, "global_iteration", 0) + 1
    return {"loss": loss.detach().cpu().numpy()}


def run_steps(cls, root: Path, kind: str, step, n: int = 2, seed: int = 0) -> tuple[list[float], dict]:
    """``n`` steps of ``step(trainer, batch)`` on a freshly built ``cls`` with fixed seeds:
    the losses and the parameters afterwards."""
    torch.manual_seed(seed)
    trainer = build_trainer(cls, root, kind)
    trainer.network.train()
    losses = []
    for i in range(n):
        torch.manual_seed(seed + 10 + i)
        losses.append(float(step(trainer, make_batch(trainer, i))["loss"]))
    return losses, parameters(trainer)


# ---------------------------------------------------------------------------------- prediction
def output_layers(network) -> list[torch.nn.Module]:
    """The layers that produce the network's outputs (segmentation logits, landmark heatmaps)."""
    from organmtl.nnunet_trainers.multitask.triplanar import TriplanarCNN
    net = network.module if hasattr(network, "module") else network
    if isinstance(net, TriplanarCNN):
        return [net.classifier]
    layers = [net.unet.decoder.seg_layers[-1] if hasattr(net, "unet") else net.decoder.seg_layers[-1]]
    if hasattr(net, "landmark_tail"):
        layers.append(net.landmark_tail[-1])
    return layers


def logit_margin(logits: torch.Tensor, regions: bool) -> torch.Tensor:
    """Per voxel, how sure the prediction is: top-1 minus top-2 logit (softmax), |logit| (sigmoid)."""
    if regions or logits.shape[0] == 1:
        return logits.abs().amin(0)
    top = logits.topk(2, 0).values
    return top[0] - top[1]


def make_confident(trainer, image: torch.Tensor, margin: float = 20.0) -> torch.Tensor:
    """Scale the output layers' weights and biases (x4 at a time) until the fp32 prediction of
    ``image`` has a median :func:`logit_margin` >= ``margin``: a network as sure of itself as a
    well-trained one (at 20, 1 - p < 2e-9: the probability is 1.0 in fp16). Returns that fp32
    prediction."""
    regions = trainer.label_manager.has_regions
    for _ in range(10):
        logits = predict_logits(trainer, image, None)
        if float(logit_margin(logits, regions).median()) >= margin:
            return logits
        with torch.no_grad():
            for layer in output_layers(trainer.network):
                for p in layer.parameters():
                    p.mul_(4.0)
    raise AssertionError(f"{type(trainer).__name__}: output layers x 4^10 still give a median margin < {margin}")


def predict_logits(trainer, image: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """nnU-Net's sliding-window prediction of one case (``image``: C, X, Y, Z) with the trainer's
    network in eval mode; ``dtype``: run it under CPU autocast, as the predictor runs on CUDA
    (its logits are accumulated in fp16 and it raises on inf)."""
    import contextlib

    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                perform_everything_on_device=False, device=torch.device("cpu"), verbose=False,
                                allow_tqdm=False)
    predictor.manual_initialization(trainer.network, trainer.plans_manager, trainer.configuration_manager, None,
                                    trainer.dataset_json, type(trainer).__name__, None)
    trainer.set_deep_supervision_enabled(False)
    try:
        with torch.autocast("cpu", dtype=dtype) if dtype is not None else contextlib.nullcontext():
            return predictor.predict_sliding_window_return_logits(image).float()
    finally:
        trainer.set_deep_supervision_enabled(trainer.enable_deep_supervision)
        trainer.network.train()


# ------------------------------------------------------------------ trainers under DDP on the CPU (gloo ranks)

def cpu_ddp(module, device_ids=None, **kwargs):
    """nnU-Net's ``DDP(network, device_ids=[rank])`` for a CPU module (gloo): replaces nnU-Net's ``DDP`` name."""
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(module, **kwargs)


def on_cpu(trainer) -> None:
    """``before_initialize`` hook of :func:`build_trainer` for a DDP rank: nnU-Net's DDP path sets
    ``cuda:rank``; a gloo rank stays on the CPU (and nnU-Net makes a GradScaler for CUDA only)."""
    trainer.device = torch.device("cpu")
    trainer.grad_scaler = None


def init_gloo_rank(rank: int, root, world: int, timeout_s: float) -> None:
    """One thread, then this process's gloo rank (file rendezvous under ``root``; a collective one rank
    never joins fails after ``timeout_s``) and nnU-Net's ``DDP`` name pointed at :func:`cpu_ddp`."""
    import datetime

    import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as nnunet_trainer_module
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{root}/init", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))
    nnunet_trainer_module.DDP = cpu_ddp
