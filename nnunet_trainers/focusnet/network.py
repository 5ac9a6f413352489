"""FocusNetv2's segmentation network: S-Net, SOL-Net, SOS-Net and the shape autoencoder
(FocusNetv2 paper §3.1, Table 10; the autoencoder of Table 9 lives in ``shape_ae.py``).

One ``nn.Module`` (:class:`FocusNet`) holds every part so that nnU-Net checkpoints, DDP and
``nnUNetv2_predict`` see a single network. ``FocusNet(x)`` in eval mode is what nnU-Net's sliding-
window predictor calls: S-Net logits with the SOS-Net masks of the small organs pasted back
(inside each window). Training phases call it with ``part=...``, which dispatches to one named
method per part with one return type each (see :meth:`FocusNet.forward`).
"""
from __future__ import annotations

import warnings
import weakref
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


def _report_pastes(tally: dict) -> str | None:
    if not tally["windows"]:
        return None
    pasted = tally["pasted"]
    line = (f"FocusNet: {sum(1 for n in pasted.values() if n)} of {len(pasted)} small organs pasted in this case "
            f"({tally['windows']} window evaluations, test-time mirrors included; pasted per label: {pasted})")
    print(line, flush=True)
    tally["windows"] = 0
    for k in pasted:
        pasted[k] = 0
    return line


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
        heat_threshold: at inference a small organ is processed in a window only if its heatmap
            peak reaches this value (an absolute floor; the only rule when ``heat_relative`` is None).
        heat_relative: None (weights stored before the option existed): the absolute rule alone.
            Else a window also needs its peak to stand out, ``peak - median >= heat_relative * peak``
            over the window's heatmap, and to lie in the window's central region (a quarter of the
            ROI from each face), so that the window holding the organ's centre pastes it whatever
            the peak's absolute height (:meth:`should_paste`).
        width: factor on every channel count of Tables 9-10 (1.0 = the paper; the CPU ``_Tiny``
            trainers use 0.25).
    """

    def __init__(self, in_channels: int, num_classes: int, small_labels: Sequence[int] = (),
                 roi_size: Sequence[int] = (8, 64, 64), use_sos: bool = True, concat_image: bool = True,
                 use_ae: bool = True, heat_threshold: float = 0.5, heat_relative: float | None = None, aspp_rates=(3, 6, 12, 18), width: float = 1.0):
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
        self.heat_relative = None if heat_relative is None else float(heat_relative)
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
        #: whether eval-mode forward pastes SOS-Net masks (the trainer switches it off in its S-Net/SOL phases)
        self.paste_small_organs = self.use_sos
        # whether SOL-Net and SOS-Net of these weights are trained: saved with the weights (every checkpoint),
        # so a checkpoint written before the SOS phase predicts with S-Net only (see :meth:`infer`)
        self.register_buffer("sos_trained", torch.tensor(False))
        #: centres found by the last eval-mode forward: per sample, {label: (voxel, peak value)}
        self.last_centres: list[dict] = []
        #: small-organ pastes since the last ``eval()`` (nnU-Net's predictor calls it once per case and
        #: fold): windows seen and windows pasted per label; reported by :meth:`report_pastes`
        self.paste_tally = {"windows": 0, "pasted": {v: 0 for v in self.small_labels}}
        weakref.finalize(self, _report_pastes, self.paste_tally)
        #: weights and activations in channels-last-3d layout (see :meth:`set_channels_last`)
        self.channels_last = False

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # weights saved before the flag existed came from finished trainings: trained
        state_dict.setdefault(prefix + "sos_trained", torch.tensor(True))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def train(self, mode: bool = True) -> "FocusNet":
        """nn.Module.train; ``eval()`` also closes the paste tally of the previous case (printed)."""
        if not mode:
            self.report_pastes()
        return super().train(mode)

    def report_pastes(self) -> str | None:
        """Print (and return) how many small organs the windows since the last report pasted, and reset."""
        return _report_pastes(self.paste_tally)

    def should_paste(self, heat: torch.Tensor, peak, value: float) -> bool:
        """Whether a window processes a small organ whose heatmap (``(*spatial)``, this window) peaks
        at voxel ``peak`` with ``value`` (see the class docstring: ``heat_threshold``, ``heat_relative``)."""
        if value < self.heat_threshold:
            return False
        if self.heat_relative is None:
            return True
        if value <= 0 or value - float(heat.float().median()) < self.heat_relative * value:
            return False
        margins = [min(r // 4, (n - 1) // 4) for r, n in zip(self.roi_size, heat.shape)]
        return all(m <= p < n - m for p, n, m in zip(peak, heat.shape, margins))

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
    PARTS = {"snet": "run_snet", "heatmap": "run_heatmap", "sos": "run_sos", "ae": "run_autoencoder"}

    def forward(self, x: torch.Tensor | None = None, part: str | None = None, **kwargs):
        """The one entry point that DDP and nnU-Net's predictor call.

        ``part=None``: eval -> :meth:`infer` (logits with SOS-Net pasted), train -> S-Net logits; both
        tensors. Otherwise the method of :attr:`PARTS` with ``kwargs``: ``"snet"`` -> :meth:`run_snet`,
        ``"heatmap"`` -> :meth:`run_heatmap`, ``"sos"`` -> :meth:`run_sos`, ``"ae"`` ->
        :meth:`run_autoencoder` (``masks=``, no ``x``). Training steps go through here so that DDP
        sees every forward; code outside DDP may call the named methods directly.
        """
        if part is None:
            return self.infer(x) if not self.training else self.segment(self._layout(x))[0]
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
        this rank runs the same backward as the others)."""
        if heatmaps:
            h = self.run_heatmap(x, train_snet, train_sol)
            logits, feats, heat = h.logits, h.features, h.heatmaps
        else:
            self._require_sos("run_sos")
            s = self.run_snet(x, train_snet)
            logits, feats, heat = s.logits, (s.features if train_snet else s.features.detach()), None
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

    @torch.no_grad()
    def infer(self, x: torch.Tensor) -> torch.Tensor:
        """Eval-mode prediction of one window (§3.1, the decision documented in docs/focusnetv2.md):
        S-Net logits; for every small organ whose SOL-Net peak passes :meth:`should_paste` the SOS-Net
        probability on the ROI at the peak is pasted over the S-Net logits (:func:`overlay_probability`)."""
        if x.device.type == "cpu" and not self.channels_last:
            self.set_channels_last(True)
            x = self._layout(x)
        logits, feats = self.segment(x)
        self.last_centres = [{} for _ in range(x.shape[0])]
        if not (self.use_sos and self.paste_small_organs):
            return logits
        if not bool(self.sos_trained):
            warnings.warn("FocusNet: SOL-Net/SOS-Net of these weights are untrained (a checkpoint written before "
                          "the sos phase): small organs are not pasted, the prediction is S-Net's")
            return logits
        heat = self.sol(feats)
        out = []
        for b in range(x.shape[0]):
            lb = logits[b]
            self.paste_tally["windows"] += 1
            for k, label in enumerate(self.small_labels):
                peak, value = heatmap_peak(heat[b, k])
                self.last_centres[b][label] = (peak, value)
                if not self.should_paste(heat[b, k], peak, value):
                    continue
                self.paste_tally["pasted"][label] += 1
                start = roi_start(peak, self.roi_size)
                prob = self._sos_batch(k, x, feats, [(b, start)])[0]
                roi_logits = crop_roi(lb, start, self.roi_size)
                lb = paste_roi(lb, overlay_probability(roi_logits, label, prob[0]), start)
            out.append(lb)
        return torch.stack(out, 0)
