"""Mixed precision in the landmark trainers' training steps (docs/scaling.md, "Mixed precision").

Every landmark trainer's ``train_step`` goes through nnU-Net's AMP path
(:class:`organmtl.nnunet_trainers.amp.AMPTrainStepMixin`): in fp32 on the CPU it must reproduce the
step as it was before (the landmark tails) or nnU-Net's own ``train_step`` (the stock-step trainers)
bit for bit; under CPU autocast (fp16 and bf16, the test-only ``cpu_autocast_dtype``) the step must
really run in low precision and give finite losses, and nnU-Net's predictor must give finite logits
of a confident network.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import organmtl.nnunet_trainers as trainers
from organmtl.nnunet_trainers.amp import float32_region
from organmtl.nnunet_trainers.landmarks.losses import UncertaintyWeighting
from organmtl.nnunet_trainers.landmarks.predict import LandmarkPredictor
from tests.trainer_steps import (build_trainer, landmark_step_before_amp, logit_margin, make_batch, make_confident,
                                 predict_logits, run_steps, stock_step)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TAILS = ("nnUNetTrainerOMTLLandmarkJoint_Tiny", "nnUNetTrainerOMTLLandmarkJointL5_Tiny",
         "nnUNetTrainerOMTLLandmarkJointLite_Tiny", "nnUNetTrainerOMTLLandmarkJointThesisCT_Tiny",
         "nnUNetTrainerOMTLLandmarkAlternate_Tiny", "nnUNetTrainerOMTLLandmarkUncertainty_Tiny")
STOCK_STEP = ("nnUNetTrainerOMTLLandmarkEarlyFusion_Tiny", "nnUNetTrainerOMTLLandmarkLateFusion_Tiny",
              "nnUNetTrainerOMTLLandmarkImageOnly_Tiny", "nnUNetTrainerOMTLMultiTaskBlock_Tiny",
              "nnUNetTrainerOMTLMultiTaskBlockDice_Tiny")


@pytest.mark.parametrize("name", TAILS + STOCK_STEP)
def test_fp32_cpu_step_is_bit_identical_to_the_reference_step(name, tmp_path):
    cls = getattr(trainers, name)
    reference = landmark_step_before_amp if name in TAILS else stock_step
    losses, params = run_steps(cls, tmp_path / "new", "landmarks", lambda tr, b: tr.train_step(b))
    ref_losses, ref_params = run_steps(cls, tmp_path / "ref", "landmarks", reference)
    assert losses == ref_losses and all(np.isfinite(losses))
    assert params.keys() == ref_params.keys()
    changed = [k for k in params if not torch.equal(params[k], ref_params[k])]
    assert not changed, f"{name}: parameters differ from the reference step: {changed[:5]}"


def _first_conv_dtypes(trainer) -> set:
    seen = set()
    conv = next(m for m in trainer.network.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d)))
    conv.register_forward_hook(lambda m, a, out: seen.add(out.dtype))
    return seen


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("name", ["nnUNetTrainerOMTLLandmarkJoint_Tiny", "nnUNetTrainerOMTLLandmarkAlternate_Tiny",
                                  "nnUNetTrainerOMTLLandmarkUncertainty_Tiny",
                                  "nnUNetTrainerOMTLLandmarkLateFusion_Tiny",
                                  "nnUNetTrainerOMTLMultiTaskBlockDice_Tiny"])
def test_cpu_autocast_steps_and_confident_prediction_are_finite(name, dtype, tmp_path):
    torch.manual_seed(0)
    trainer = build_trainer(getattr(trainers, name), tmp_path, "landmarks")
    trainer.cpu_autocast_dtype = dtype
    seen = _first_conv_dtypes(trainer)
    for i in range(3):
        out = trainer.train_step(make_batch(trainer, i))
        assert out["loss"].dtype == np.float32 and np.isfinite(out["loss"]), (name, i, out)
        for part in ("seg_loss", "landmark_loss"):
            if part in out:
                assert np.isfinite(out[part]), (name, part, out)
    assert seen == {dtype}, f"{name}: the step did not run under autocast ({seen})"
    assert all(torch.isfinite(p).all() for p in trainer.network.parameters())

    image = make_batch(trainer, 7, n=1)["data"][0]
    reference = make_confident(trainer, image)
    low = predict_logits(trainer, image, dtype)
    assert torch.isfinite(low).all(), name
    if trainer.label_manager.has_regions:
        agree = ((low > 0) == (reference > 0)).float().mean()
    else:
        agree = (low.argmax(0) == reference.argmax(0)).float().mean()
    assert agree >= 0.99, f"{name}: {dtype} prediction agrees with fp32 on {float(agree):.4f} of the voxels"
    assert float(logit_margin(reference, trainer.label_manager.has_regions).median()) >= 20

    if hasattr(trainer._module(), "landmark_tail"):     # the heatmaps of organmtl predict-landmarks
        predictor = LandmarkPredictor(use_mirroring=False, perform_everything_on_device=False,
                                      device=torch.device("cpu"), allow_tqdm=False)
        net = trainer._module().eval()
        predictor.manual_initialization(net, trainer.plans_manager, trainer.configuration_manager,
                                        [net.state_dict()], trainer.dataset_json, type(trainer).__name__, None)
        with torch.autocast("cpu", dtype=dtype):
            heatmaps = predictor.predict_heatmaps(image)
        assert heatmaps.shape == (trainer.landmark_channels.n_landmark, *image.shape[1:])
        assert torch.isfinite(heatmaps).all() and net.outputs == "segmentation"


def test_uncertainty_weighting_runs_in_fp32_under_autocast():
    weighting = UncertaintyWeighting()
    with torch.no_grad():
        weighting.log_vars.copy_(torch.tensor([-12.0, 3.0]))       # exp(12) = 1.6e5 > fp16's 65504
    losses = [torch.tensor(2.0, dtype=torch.float16), torch.tensor(0.5, dtype=torch.bfloat16)]
    expected = np.exp(12.0) * 2.0 - 6.0 + np.exp(-3.0) / 2.0 * 0.5 + 1.5
    with torch.autocast("cpu", dtype=torch.float16):
        value = weighting(losses)
        assert torch.is_autocast_enabled("cpu")
        with float32_region("cpu"):
            assert not torch.is_autocast_enabled("cpu")
    assert value.dtype == torch.float32 and value.item() == pytest.approx(expected, rel=1e-6)


def test_multitask_block_batch_dice_outside_ddp(tmp_path):
    """Plans with ``batch_dice`` (nnU-Net's 2d and lowres plans): the per-organ soft Dice gathers over
    DDP ranks only under DDP (it used to call ``all_gather`` in a single process and fail)."""
    torch.manual_seed(0)
    trainer = build_trainer(trainers.nnUNetTrainerOMTLMultiTaskBlockDice_Tiny, tmp_path, "landmarks", batch_dice=True)
    dice = trainer.loss.loss.dice
    assert dice.batch_dice and not dice.ddp
    assert np.isfinite(trainer.train_step(make_batch(trainer, 0))["loss"])
