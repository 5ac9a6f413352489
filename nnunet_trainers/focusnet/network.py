"""FocusNetv2's segmentation network: S-Net, SOL-Net, SOS-Net and the shape autoencoder
(FocusNetv2 paper §3.1, Table 10; the autoencoder of Table 9 lives in ``shape_ae.py``).

One ``nn.Module`` (:class:`FocusNet`) holds every part so that nnU-Net checkpoints, DDP and
``nnUNetv2_predict`` see a single network. ``FocusNet(x)`` in eval mode is what nnU-Net's sliding-
window predictor calls per window: S-Net's logits (a window is not the case, and the paper pastes each
small organ once per case at the case's SOL-Net peak: :mod:`.predict` does that on the aggregated
windows, :meth:`FocusNet.paste_case`). ``part="case"`` treats each input sample as a whole case (the
trainer's validation patches). Training phases call it with ``part=...``, which dispatches to one
named method per part with one return type each (see :meth:`FocusNet.forward`).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from organmtl.nnunet_trainers.focusnet.blocks import DenseASPP3d, SEResBlock, se_res_stack
from organmtl.nnunet_trainers.focusnet.roi import crop_roi, heatmap_peak, paste_roi, roi_start
from organmtl.nnunet_trainers.focusnet.shape_ae import ShapeAutoencoder

#: total down-sampling of S-Net per axis (z, y, x): (1,2,2) then (2,2,2) (Table 10)
SNET_DOWNSAMPLING = (2, 4, 4)


class SNet(nn.Module):
    """S-Net (§3.1.1, Table 10): stem conv 32, SEResBlock 32 | maxpool (1,2,2), 2 x SEResBlock 48 |
    maxpool (2,2,2), 2 x SEResBlock 64, 2 x SEResBlock 64 dilated 2, DenseASPP (3,6,12,18 in-plane)
    -> 320 | upsample (2,2,2), skip fusion, SEResBlock 48 | upsample (1,2,2), skip fusion,
    SEResBlock 32 | 1x1x1 conv -> class logits.

    Skip fusion = concatenation of the encoder features of the same scale before the decoder block.
    Input spatial sizes must be multiples of (2, 4, 4); :class:`FocusNet` pads for that.
    """

    def __init__(self, in_channels: int, num_classes: int, channels=(32, 48, 64), aspp_rates=(3, 6, 12, 18),
                 aspp_growth: int = 64):
        super().__init__()
        c1, c2, c3 = channels
        self.stem = nn.Sequential(nn.Conv3d(in_channels, c1, 3, padding=1, bias=False),
                                  nn.InstanceNorm3d(c1, affine=True), nn.ReLU(inplace=True))
        self.enc1 = se_res_stack(c1, c1, 1)
        self.pool1 = nn.MaxPool3d((1, 2, 2))
        self.enc2 = se_res_stack(c1, c2, 2)
        self.pool2 = nn.MaxPool3d((2, 2, 2))
        self.enc3 = se_res_stack(c2, c3, 2)
        self.dilated = se_res_stack(c3, c3, 2, dilation=2)
        self.aspp = DenseASPP3d(c3, aspp_rates, growth=aspp_growth, bottleneck=aspp_growth)
        self.dec2 = SEResBlock(self.aspp.out_channels + c2, c2)
        self.dec1 = SEResBlock(c2 + c1, c1)
        self.head = nn.Conv3d(c1, num_classes, 1)
        self.feature_channels = c1

    def forward(self, x: torch.Tensor):
        """Returns ``(logits, decoder_features)``; the features (32 ch, full resolution) feed SOL-Net
        and SOS-Net (§3.1.2: "the feature volumes from the last layer of the decoder")."""
        s1 = self.enc1(self.stem(x))
        s2 = self.enc2(self.pool1(s1))
        b = self.aspp(self.dilated(self.enc3(self.pool2(s2))))
        d2 = self.dec2(torch.cat([F.interpolate(b, size=s2.shape[2:], mode="trilinear", align_corners=False), s2], 1))
        d1 = self.dec1(torch.cat([F.interpolate(d2, size=s1.shape[2:], mode="trilinear", align_corners=False), s1], 1))
        return self.head(d1), d1



class SOLNet(nn.Module):
    """Small-organ localisation network (§3.1.2, Table 10): SEResBlock 32 + 1x1x1 conv + sigmoid,
    one centre heatmap per small organ."""

    def __init__(self, in_channels: int, n_small: int, channels: int = 32):
        super().__init__()
        self.block = SEResBlock(in_channels, channels)
        self.out = nn.Conv3d(channels, n_small, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.out(self.block(features)))


class SOSNet(nn.Module):
    """Small-organ segmentation network for one organ (§3.1.3, Table 10): 2 x SEResBlock 32 +
    1x1x1 conv + sigmoid on the ROI of [S-Net decoder features, raw image] (or features only for
    the "no concat" ablation of Table 6). Returns the foreground probability ``(N, 1, *roi)``."""

    def __init__(self, in_channels: int, channels: int = 32):
        super().__init__()
        self.blocks = se_res_stack(in_channels, channels, 2)
        self.out = nn.Conv3d(channels, 1, 1)

    def forward(self, roi_input: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.out(self.blocks(roi_input)))


def overlay_probability(logits: torch.Tensor, channel: int, prob: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """Logits ``(C, *roi)`` whose softmax gives class ``channel`` exactly probability ``prob`` (``(*roi)``)
    and shares the rest among the other classes as S-Net did: the paste-back of §3.1.3 ("overlay the
    small-organ segmentation results ... into the large-organ segmentation results") in logit space,
    so that nnU-Net's sliding-window averaging and argmax treat it like any other logit.

    Computed in fp32 whatever the inputs' dtype (nnU-Net predicts under autocast: in fp16 the clamp
    ``1 - eps`` rounds to 1 and ``log1p(-p)`` would give an infinite logit); returned in the dtype of
    ``logits``, which the pasted logit (at most ``|logsumexp| + log(1/eps)``) fits in fp16 and bf16."""
    others = torch.cat([logits[:channel], logits[channel + 1:]], 0).float()
    p = prob.float().clamp(eps, 1 - eps)
    out = logits.clone()
    out[channel] = (torch.logsumexp(others, 0) + torch.log(p) - torch.log1p(-p)).to(logits.dtype)
    return out


@dataclass
class SNetOutput:
    """S-Net logits ``(B, classes, *spatial)`` and decoder features ``(B, C, *spatial)``."""

    logits: torch.Tensor
    features: torch.Tensor


@dataclass
class HeatmapOutput(SNetOutput):
    """S-Net outputs plus the SOL-Net centre heatmaps ``(B, n_small, *spatial)``."""

    heatmaps: torch.Tensor


@dataclass
class SOSRecord:
    """SOS-Net foreground probability ``(1, *roi)`` of small organ ``k`` in sample ``b``, ROI at ``start``
    (``placeholder``: no organ there, see :meth:`FocusNet.run_sos`)."""

    b: int
    k: int
    start: tuple
    prob: torch.Tensor
    placeholder: bool = False


@dataclass
class SOSOutput(HeatmapOutput):
    """Heatmap outputs plus one :class:`SOSRecord` per (sample, small organ) with a centre."""

    records: list


@dataclass
class AEOutput:
    """Shape autoencoder reconstruction ``(N, 1, *roi)`` and its features (latent + decoder scales)."""

    reconstruction: torch.Tensor
    features: list


class FocusNet(nn.Module):
    """S-Net + SOL-Net + one SOS-Net per small organ + one shape autoencoder shared by the small organs.

    Args:
        small_labels: label values (= output channels) of the small organs, in heatmap order.
        roi_size: fixed SOS-Net ROI (z, y, x) in voxels (§3.1.3: 8 x 64 x 64).
        use_sos: build SOL-Net and SOS-Nets (False: the "S-Net only" ablation).
        concat_image: feed the raw image into SOS-Net (False: the "no concat" ablation).
        use_ae: build the shape autoencoder (FocusNetv2 and its ablations).
        heat_threshold: lower bound of the paste floor (an absolute SOL-Net peak value; 0 by default).
        heat_relative: ignored (the per-window rule of earlier versions; accepted so that their stored
            entries still build).
        width: factor on every channel count of Tables 9-10 (1.0 = the paper; the CPU ``_Tiny``
            trainers use 0.25).

    The paste floor is the buffer ``heat_floor`` (one value per small organ, saved with the weights in every
    checkpoint): a small organ is pasted only where the case's SOL-Net peak reaches it. It is +inf until the
    trainer calibrates it on validation (:mod:`.paste`), so untrained or uncalibrated weights paste nothing.
    """

    def __init__(self, in_channels: int, num_classes: int, small_labels: Sequence[int] = (),
                 roi_size: Sequence[int] = (8, 64, 64), use_sos: bool = True, concat_image: bool = True,
                 use_ae: bool = True, heat_threshold: float = 0.0, heat_relative: float | None = None,
                 aspp_rates=(3, 6, 12, 18), width: float = 1.0):
        super().__init__()
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.small_labels = [int(v) for v in small_labels]
        for v in self.small_labels:
            if not 0 < v < num_classes:
                raise ValueError(f"FocusNet: small-organ label {v} is not a foreground output channel (1..{num_classes - 1})")
        self.roi_size = tuple(int(s) for s in roi_size)
        self.use_sos = bool(use_sos) and len(self.small_labels) > 0
        self.concat_image = bool(concat_image)
        self.heat_threshold = float(heat_threshold)

        def w(c):
            return max(4, int(round(c * width)))

        self.snet = SNet(in_channels, num_classes, channels=(w(32), w(48), w(64)), aspp_rates=aspp_rates,
                         aspp_growth=w(64))
        fc = self.snet.feature_channels
        self.sol = SOLNet(fc, len(self.small_labels), channels=w(32)) if self.use_sos else None
        sos_in = fc + (in_channels if self.concat_image else 0)
        self.sos = nn.ModuleList([SOSNet(sos_in, channels=w(32)) for _ in self.small_labels]) if self.use_sos else None
        # one autoencoder shared by all small organs (its latent space holds all their shapes)
        self.shape_ae = (ShapeAutoencoder(self.roi_size, channels=(w(64), w(128), w(128), w(256)), latent=w(512))
                         if (use_ae and self.use_sos) else None)
        #: whether SOS-Net masks are pasted (the trainer switches it off before its ``sos`` phase)
        self.paste_small_organs = self.use_sos
        # whether SOL-Net and SOS-Net of these weights are trained: saved with the weights (every checkpoint),
        # so a checkpoint written before the SOS phase predicts with S-Net only (see :meth:`paste_case`)
        self.register_buffer("sos_trained", torch.tensor(False))
        # per small organ: the SOL-Net peak a case needs for that organ to be pasted (calibrated on validation by
        # the trainer, :mod:`.paste`); +inf = never (untrained, uncalibrated, or SOL-Net does not separate)
        self.register_buffer("heat_floor", torch.full((len(self.small_labels),), float("inf")))
        #: what an eval-mode call on a window returns: "logits" (nnU-Net's predictor) or "logits+heatmaps"
        #: (S-Net logits then the SOL-Net maps, aggregated over the windows by :class:`.predict.FocusNetPredictor`)
        self.window_output = "logits"
        #: what an eval-mode call without ``part`` runs: "window" (:meth:`infer`) or "case" (:meth:`paste_case`:
        #: the trainer's validation epochs, each patch a case)
        self.eval_call = "window"
        #: per sample of the last :meth:`paste_case` call: {label: (voxel, peak value, pasted)}
        self.last_centres: list[dict] = []
        self._warned_per_window = False
        #: weights and activations in channels-last-3d layout (see :meth:`set_channels_last`)
        self.channels_last = False

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # weights saved before the flag existed came from finished trainings: trained; before the calibrated
        # floor existed: no floor (those weights paste nothing, see docs/focusnetv2.md "Inference")
        state_dict.setdefault(prefix + "sos_trained", torch.tensor(True))
        state_dict.setdefault(prefix + "heat_floor", torch.full((len(self.small_labels),), float("inf")))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def floors(self) -> list[float]:
        """The paste floor of each small organ: the calibrated ``heat_floor``, at least ``heat_threshold``."""
        return [max(float(f), self.heat_threshold) for f in self.heat_floor.tolist()]

    def pastes_anything(self) -> bool:
        """Whether this network may paste at all (SOL/SOS-Net present, trained, pasting switched on)."""
        return self.use_sos and self.paste_small_organs and bool(self.sos_trained)

    def set_channels_last(self, enabled: bool = True) -> "FocusNet":
        """Put the weights (and, in :meth:`forward`, the inputs) in ``torch.channels_last_3d`` layout.

        On the CPU, oneDNN's 3D convolutions run faster in this layout: measured on 2 cores, the
        ``_Tiny`` S-Net forward+backward 1.6x and the Table 9 autoencoder 2.3x (its 5x5x5 kernels). The
        trainers switch it on when they train on the CPU and eval-mode prediction on the CPU switches it on
        itself; on CUDA the layout stays nnU-Net's (contiguous). Numerics are the same convolutions.
        """
        fmt = torch.channels_last_3d if enabled else torch.contiguous_format
        self.to(memory_format=fmt)
        self.channels_last = bool(enabled)
        return self

    def _layout(self, t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None or not self.channels_last or t.dim() != 5:
            return t
        return t.contiguous(memory_format=torch.channels_last_3d)

    # ----------------------------------------------------------------------------------- helpers
    @staticmethod
    def _pad(x: torch.Tensor):
        spatial = x.shape[2:]
        target = [-(-s // m) * m for s, m in zip(spatial, SNET_DOWNSAMPLING)]
        pad = []
        for s, t in zip(reversed(spatial), reversed(target)):
            pad += [0, t - s]
        return (F.pad(x, pad) if any(pad) else x), tuple(spatial)

    @staticmethod
    def _crop(t: torch.Tensor, spatial):
        return t[(slice(None), slice(None), *[slice(0, s) for s in spatial])]

    def segment(self, x: torch.Tensor, grad: bool = True):
        """S-Net on any input size: ``(logits, features)`` at the input size (zero-padding to a
        multiple of the fixed down-sampling (2, 4, 4) and cropping back)."""
        xp, spatial = self._pad(x)
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            logits, feats = self.snet(xp)
        return self._crop(logits, spatial), self._crop(feats, spatial)

    def sos_input(self, x: torch.Tensor, feats: torch.Tensor, b: int, start) -> torch.Tensor:
        """ROI of the decoder features (and of the raw image unless "no concat") for sample ``b``."""
        parts = [crop_roi(feats[b], start, self.roi_size)]
        if self.concat_image:
            parts.append(crop_roi(x[b], start, self.roi_size))
        return torch.cat(parts, 0)[None]

    # ----------------------------------------------------------------------------------- forward
    #: ``part`` of :meth:`forward` -> the method it runs
    PARTS = {"snet": "run_snet", "heatmap": "run_heatmap", "sos": "run_sos", "ae": "run_autoencoder",
             "case": "paste_case"}

    def forward(self, x: torch.Tensor | None = None, part: str | None = None, **kwargs):
        """The one entry point that DDP and nnU-Net's predictor call.

        ``part=None``: eval -> :meth:`infer` (one window of nnU-Net's predictor: S-Net logits, see
        :attr:`window_output`), train -> S-Net logits; both tensors. Otherwise the method of :attr:`PARTS`
        with ``kwargs``: ``"snet"`` -> :meth:`run_snet`, ``"heatmap"`` -> :meth:`run_heatmap`, ``"sos"`` ->
        :meth:`run_sos`, ``"ae"`` -> :meth:`run_autoencoder` (``masks=``, no ``x``), ``"case"`` ->
        :meth:`paste_case` (each sample a whole case: the trainer's validation patches). Training steps go
        through here so that DDP sees every forward; code outside DDP may call the named methods directly.
        """
        if part is None:
            if self.training:
                return self.segment(self._layout(x))[0]
            return self.paste_case(x) if self.eval_call == "case" else self.infer(x)
        if part not in self.PARTS:
            raise ValueError(f"FocusNet: unknown part {part!r} (one of {sorted(self.PARTS)})")
        method = getattr(self, self.PARTS[part])
        return method(**kwargs) if x is None else method(x, **kwargs)

    def run_snet(self, x: torch.Tensor, train_snet: bool = True) -> SNetOutput:
        """S-Net logits and decoder features (``train_snet=False``: without gradients, a frozen phase)."""
        logits, feats = self.segment(self._layout(x), grad=train_snet)
        return SNetOutput(logits, feats)

    def _require_sos(self, what: str) -> None:
        if not self.use_sos:
            raise RuntimeError(f"FocusNet: {what} needs SOL/SOS-Net, which this network does not have")

    def run_heatmap(self, x: torch.Tensor, train_snet: bool = True, train_sol: bool = True) -> HeatmapOutput:
        """S-Net outputs plus SOL-Net heatmaps (SOL-Net sees detached features when S-Net is frozen)."""
        self._require_sos("run_heatmap")
        s = self.run_snet(x, train_snet)
        sol_in = s.features if train_snet else s.features.detach()
        with torch.set_grad_enabled(train_sol and torch.is_grad_enabled()):
            heat = self.sol(sol_in)
        return HeatmapOutput(s.logits, sol_in, heat)

    def run_sos(self, x: torch.Tensor, centres, train_snet: bool = True, train_sol: bool = True,
                placeholder: bool = False, heatmaps: bool = True) -> SOSOutput:
        """Heatmap outputs plus SOS-Net on the ROI at ``centres[b][k]`` (voxel or ``None``: organ absent).

        SOS-Net ``k`` runs once, on the ROIs of every sample that has organ ``k`` (a batch: instance norm and
        squeeze-excitation work per sample, so batching changes no output); records come in (sample, organ)
        order. ``heatmaps=False``: SOL-Net is not run (the ``sos`` phase, where its heatmaps are unused) and
        ``heatmaps`` of the output is None.
        ``placeholder``: when no centre is given at all, SOS-Net 0 still runs once, on the ROI at the
        centre of sample 0, as a record marked ``placeholder`` (DDP: the trainer gives it weight 0 so that
        this rank runs the same backward as the others). ``centres`` may be a function of the SOL-Net maps
        (detached; ``None`` without ``heatmaps``) that returns them: ROIs placed where SOL-Net points, in
        the same forward."""
        if heatmaps:
            h = self.run_heatmap(x, train_snet, train_sol)
            logits, feats, heat = h.logits, h.features, h.heatmaps
        else:
            self._require_sos("run_sos")
            s = self.run_snet(x, train_snet)
            logits, feats, heat = s.logits, (s.features if train_snet else s.features.detach()), None
        if callable(centres):
            centres = centres(None if heat is None else heat.detach())
        x = self._layout(x)
        if placeholder and all(c is None for row in centres for c in row):
            start = roi_start([s // 2 for s in x.shape[2:]], self.roi_size)
            prob = self._sos_batch(0, x, feats, [(0, start)])[0]
            return SOSOutput(logits, feats, heat, [SOSRecord(0, 0, start, prob, placeholder=True)])
        records = []
        for k in range(len(self.small_labels)):
            items = [(b, roi_start(centres[b][k], self.roi_size)) for b in range(x.shape[0]) if centres[b][k] is not None]
            if items:
                probs = self._sos_batch(k, x, feats, items)
                records += [SOSRecord(b, k, start, probs[i]) for i, (b, start) in enumerate(items)]
        records.sort(key=lambda r: (r.b, r.k))
        return SOSOutput(logits, feats, heat, records)

    def _sos_batch(self, k: int, x: torch.Tensor, feats: torch.Tensor, items) -> torch.Tensor:
        """SOS-Net ``k`` on the ROIs ``items`` = [(sample, ROI start)], one call: ``(len(items), 1, *roi)``.

        On the CPU a single ROI is run next to an all-zero one: PyTorch's CPU convolution picks its
        non-oneDNN kernel for a batch of 1 small volume, which is slower than oneDNN on a batch of 2
        (measured on the ``_Tiny`` ROI 10 x 40 x 40: forward+backward 0.11 s at batch 1, 0.05 s at batch 2);
        the zero ROI's output is dropped and, per-sample normalisation, changes nothing else."""
        roi = torch.cat([self.sos_input(x, feats, b, start) for b, start in items], 0)
        n = roi.shape[0]
        if n == 1 and roi.device.type == "cpu":
            roi = torch.cat([roi, torch.zeros_like(roi)], 0)
        return self.sos[k](self._layout(roi))[:n]

    def run_autoencoder(self, masks: Sequence[torch.Tensor | None]) -> list[AEOutput | None]:
        """Shape autoencoder on ``masks[k]`` ``(N, 1, *roi)`` per small organ, all in one batch, in fp32;
        ``None`` where ``masks[k]`` is ``None``."""
        if self.shape_ae is None:
            raise RuntimeError("FocusNet: this network has no shape autoencoder")
        masks = [self._layout(m) for m in masks]
        present = [m for m in masks if m is not None]
        if not present:
            return [None for _ in masks]
        batch = torch.cat(present, 0)
        # fp32 even under autocast: batch norm over ROI-sized batches at a 1-voxel-deep bottleneck gave
        # non-finite half-precision gradients on the CPU (bf16); the autoencoder is small next to S-Net
        with torch.autocast(batch.device.type, enabled=False):
            rec, feats = self.shape_ae(batch.float())
        out, i = [], 0
        for m in masks:
            if m is None:
                out.append(None)
                continue
            n = m.shape[0]
            out.append(AEOutput(rec[i:i + n], [f[i:i + n] for f in feats]))
            i += n
        return out

    def _cpu_layout(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and not self.channels_last:
            self.set_channels_last(True)
        return self._layout(x)

    @torch.no_grad()
    def infer(self, x: torch.Tensor) -> torch.Tensor:
        """Eval-mode call on one window of nnU-Net's sliding window: S-Net logits, nothing pasted (a window
        is not the case: the paper pastes each small organ once, at the case's SOL-Net peak, which
        :class:`.predict.FocusNetPredictor` does after aggregating the windows). With :attr:`window_output`
        ``"logits+heatmaps"`` the SOL-Net maps follow the logits as extra channels (for that aggregation)."""
        x = self._cpu_layout(x)
        logits, feats = self.segment(x)
        if self.window_output == "logits+heatmaps":
            return torch.cat([logits, self.sol(feats).to(logits.dtype)], 1)
        if self.pastes_anything() and not self._warned_per_window:
            self._warned_per_window = True
            line = ("FocusNet: nnU-Net's per-window prediction (nnUNetv2_predict) gives S-Net's segmentation; the "
                    "small organs are pasted once per case at the case's SOL-Net peak by `organmtl predict-focusnet` "
                    "(nnUNetv2_predict's options; docs/focusnetv2.md \"Inference\")")
            print(line, flush=True)
        return logits

    @torch.no_grad()
    def paste_case(self, x: torch.Tensor) -> torch.Tensor:
        """Each sample of ``x`` ``(B, C, *spatial)`` as a whole case: S-Net logits, SOL-Net maps, and per small
        organ at most one paste, at the sample's SOL-Net peak when it reaches the organ's floor
        (:meth:`paste_logits`). The trainer's validation calls it on its patches; ``last_heatmaps`` keeps the
        maps (floor calibration, :mod:`.paste`)."""
        x = self._cpu_layout(x)
        logits, feats = self.segment(x)
        self.last_centres = [{} for _ in range(x.shape[0])]
        self.last_heatmaps = None
        if not self.use_sos:
            return logits
        heat = self.sol(feats)
        self.last_heatmaps = heat
        if not self.pastes_anything():
            if self.use_sos and self.paste_small_organs and not bool(self.sos_trained):
                warnings.warn("FocusNet: SOL-Net/SOS-Net of these weights are untrained (a checkpoint written before "
                              "the sos phase): small organs are not pasted, the prediction is S-Net's")
            return logits
        out = []
        for b in range(x.shape[0]):
            lb, centres = self.paste_logits(logits[b], heat[b], x[b], features=feats[b])
            self.last_centres[b] = centres
            out.append(lb)
        return torch.stack(out, 0)

    @torch.no_grad()
    def paste_logits(self, logits: torch.Tensor, heat: torch.Tensor, image: torch.Tensor,
                     patch_size: Sequence[int] | None = None, features: torch.Tensor | None = None):
        """One case's pasted logits (§3.1.3 "overlay"): for each small organ k, the voxel of the highest
        value of its map ``heat[k]`` is its centre; if that value reaches the organ's floor (:meth:`floors`),
        SOS-Net k runs once on the ROI centred there and its probability replaces the organ's
        (:func:`overlay_probability`) inside that ROI only. ``logits`` ``(classes, *spatial)``, ``heat``
        ``(n_small, *spatial)`` and ``image`` ``(C, *spatial)`` cover the same case. SOS-Net's input features
        come from ``features`` (S-Net's decoder on the whole case) or, for a case larger than one window,
        from S-Net run on a ``patch_size`` window centred on the peak (shared by organs whose ROI it holds).
        Returns ``(logits, {label: (voxel, peak value, pasted)})``; voxels outside the pasted ROIs are
        unchanged."""
        out = logits
        centres = {}
        windows = []                                     # (start, x window, features)
        floors = self.floors()
        for k, label in enumerate(self.small_labels):
            peak, value = heatmap_peak(heat[k])
            pasted = bool(self.pastes_anything() and value >= floors[k])
            centres[label] = (peak, value, pasted)
            if not pasted:
                continue
            start = roi_start(peak, self.roi_size)
            if features is not None:
                xw, fw, wstart = image[None], features[None], (0,) * len(peak)
            else:
                xw = fw = wstart = None
                for ws, wx, wf in windows:                 # a window already run that holds this ROI
                    if all(w <= max(s, 0) and min(s + r, n) <= w + p
                           for w, s, r, p, n in zip(ws, start, self.roi_size, patch_size, image.shape[1:])):
                        wstart, xw, fw = ws, wx, wf
                        break
                if xw is None:
                    wstart = tuple(min(max(int(c) - int(p) // 2, 0), max(int(n) - int(p), 0))
                                   for c, p, n in zip(peak, patch_size, image.shape[1:]))
                    xw = self._layout(crop_roi(image, wstart, patch_size)[None])
                    fw = self.segment(xw)[1]
                    windows.append((wstart, xw, fw))
            local = tuple(s - w for s, w in zip(start, wstart))
            prob = self._sos_batch(k, xw, fw, [(0, local)])[0]
            roi_logits = crop_roi(out, start, self.roi_size)
            out = paste_roi(out, overlay_probability(roi_logits, label, prob[0]), start)
        return out, centres
