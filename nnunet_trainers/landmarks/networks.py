"""nnU-Net's own U-Net (from the plans, 2D or 3D, via ``get_network_from_plans``) with the
landmark parts of the two theses attached, never a re-written U-Net.

- :class:`LandmarkTailUNet` — thesis §2.5, Table 3: a landmark tail *next to* the segmentation tail.
  nnU-Net's last decoder stage (two 3x3 convs) plus its 1x1 segmentation layer is the segmentation
  tail; the landmark tail is a sibling fed with the same input (upsampled features concatenated with
  the full-resolution skip), two 3x3 conv blocks and a 1x1 conv with one output per landmark channel.
- :class:`LateFusionUNet` — landmark-input U-Net §3.6, Fig. 6 "late fusion": the landmark maps skip the
  encoder and are concatenated to the last decoder features before the 1x1 segmentation layer.
- :class:`MultiTaskBlockUNet` — landmark-input U-Net §3.4.1, Fig. 2: per organ a double conv + 1x1
  conv on copies of the last decoder features, one logit channel per organ (independent sigmoids).
- :class:`ThesisCTWindow` — thesis §2.2 preprocessing (CT clamped to [-1024, 1024] HU, divided by 500)
  as the first operation of the network, so training and the stock predictor apply it alike.

Every wrapper takes nnU-Net's full input (image channels followed by the landmark-map channels the
converter appended) and uses only what its method allows: the auxiliary-task network never sees the
heatmaps it must predict, so at inference a user supplies the image channels only.
"""
from __future__ import annotations

import torch
from dynamic_network_architectures.building_blocks.simple_conv_blocks import StackedConvBlocks
from dynamic_network_architectures.initialization.weight_init import InitWeights_He
from torch import nn

OUTPUT_MODES = ("segmentation", "landmarks", "both")


def _conv_blocks(encoder, n_convs: int, in_channels: int, features: int) -> StackedConvBlocks:
    """``n_convs`` conv-norm-nonlin blocks with the encoder's own operators and full-resolution kernel."""
    return StackedConvBlocks(n_convs, encoder.conv_op, in_channels, features, encoder.kernel_sizes[0], 1,
                             encoder.conv_bias, encoder.norm_op, encoder.norm_op_kwargs, encoder.dropout_op,
                             encoder.dropout_op_kwargs, encoder.nonlin, encoder.nonlin_kwargs)


class ThesisCTWindow(nn.Module):
    """Thesis §2.2: ``clamp(HU, -1024, 1024) / 500`` for the CT channels (the others pass unchanged).

    nnU-Net's ``CTNormalization`` has already z-scored the input with the dataset's foreground mean
    and std (after clipping to its 0.5/99.5 percentiles); this module undoes the z-score with the
    plans' numbers and applies the thesis window. Buffers are not saved in checkpoints: they are
    rebuilt from the plans.
    """

    def __init__(self, ct_channels: list[int], means: list[float], stds: list[float]):
        super().__init__()
        self.ct_channels = list(ct_channels)
        self.register_buffer("mean", torch.tensor(means, dtype=torch.float32), persistent=False)
        self.register_buffer("std", torch.tensor(stds, dtype=torch.float32), persistent=False)

    @classmethod
    def from_plans(cls, plans_manager, configuration_manager) -> "ThesisCTWindow":
        """CT channels are those nnU-Net normalises with ``CTNormalization``; error if there is none."""
        schemes = configuration_manager.normalization_schemes
        props = plans_manager.plans["foreground_intensity_properties_per_channel"]
        ct = [i for i, s in enumerate(schemes) if s == "CTNormalization"]
        if not ct:
            raise ValueError(f"plans of {plans_manager.dataset_name}: no channel uses CTNormalization; "
                             f"the thesis CT window needs a CT channel")
        return cls(ct, [props[str(i)]["mean"] for i in ct], [max(props[str(i)]["std"], 1e-8) for i in ct])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        shape = (1, -1) + (1,) * (x.ndim - 2)
        hu = x[:, self.ct_channels] * self.std.view(shape) + self.mean.view(shape)
        x[:, self.ct_channels] = hu.clamp(-1024.0, 1024.0) / 500.0
        return x


class _WrappedUNet(nn.Module):
    """nnU-Net's U-Net fed with the first ``n_image`` input channels (after ``input_transform``)."""

    def __init__(self, unet: nn.Module, n_image: int, input_transform: nn.Module | None = None):
        super().__init__()
        self.unet = unet
        self.n_image = n_image
        self.input_transform = input_transform if input_transform is not None else nn.Identity()

    @property
    def decoder(self):
        """nnU-Net's ``set_deep_supervision_enabled`` switches ``network.decoder.deep_supervision``."""
        return self.unet.decoder

    @property
    def encoder(self):
        return self.unet.encoder

    def _image(self, x: torch.Tensor) -> torch.Tensor:
        return self.input_transform(x[:, : self.n_image])


class ImageChannelsUNet(_WrappedUNet):
    """nnU-Net's U-Net on the image channels only: the no-landmark baseline on a dataset that carries
    landmark channels (identical to the stock trainer on the same images without them)."""

    def forward(self, x: torch.Tensor):
        return self.unet(self._image(x))


class LandmarkTailUNet(_WrappedUNet):
    """U-Net with a segmentation tail and a landmark tail (thesis §2.5, Fig. 3, Table 3).

    ``outputs`` selects what ``forward`` returns: ``"segmentation"`` (default; what nnU-Net's stock
    predictor expects), ``"landmarks"`` (the landmark heatmaps, used for sliding-window landmark
    prediction) or ``"both"`` (``(segmentation, heatmaps)`` for training). ``tail_features``: width of
    the landmark tail's convs (the thesis' 64 is its U-Net's full-resolution width; default: nnU-Net's
    full-resolution width from the plans, times ``tail_width``, at least 4).
    """

    def __init__(self, unet: nn.Module, n_image: int, n_landmark: int, tail_features: int | None = None,
                 input_transform: nn.Module | None = None, tail_width: float = 1.0):
        super().__init__(unet, n_image, input_transform)
        encoder = unet.decoder.encoder
        skip = encoder.output_channels[0]
        features = tail_features or max(4, int(round(skip * tail_width)))
        self.landmark_tail = nn.Sequential(_conv_blocks(encoder, 2, 2 * skip, features),
                                           encoder.conv_op(features, n_landmark, 1, 1, 0, bias=True))
        self.landmark_tail.apply(InitWeights_He(1e-2))
        self.outputs = "segmentation"
        self.keep_landmarks = False      # "segmentation" mode: also keep the heatmaps in last_landmarks
        self.last_landmarks = None
        self._tail_input = None
        unet.decoder.stages[-1].register_forward_hook(self._keep_tail_input)

    def _keep_tail_input(self, module, args, output):
        self._tail_input = args[0]

    def forward(self, x: torch.Tensor):
        if self.outputs not in OUTPUT_MODES:
            raise ValueError(f"LandmarkTailUNet.outputs={self.outputs!r}; choose from {OUTPUT_MODES}")
        seg = self.unet(self._image(x))
        features, self._tail_input = self._tail_input, None
        if self.outputs == "segmentation":
            if self.keep_landmarks:
                self.last_landmarks = self.landmark_tail(features)
            return seg
        heatmaps = self.landmark_tail(features)
        return heatmaps if self.outputs == "landmarks" else (seg, heatmaps)


class _LateFusionHead(nn.Module):
    """1x1 segmentation layer over ``cat(decoder features, landmark maps)``."""

    def __init__(self, conv_op, in_features: int, n_maps: int, n_classes: int):
        super().__init__()
        self.conv = conv_op(in_features + n_maps, n_classes, 1, 1, 0, bias=True)
        self.maps = None

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.maps is None:
            raise RuntimeError("late-fusion head called without landmark maps (use LateFusionUNet.forward)")
        return self.conv(torch.cat((features, self.maps.to(features.dtype)), 1))


class LateFusionUNet(_WrappedUNet):
    """Landmark-input U-Net late fusion (§3.6, Fig. 6): encoder and decoder see the image channels only;
    the landmark-map channels (cropped and augmented with the patch) join the last decoder features
    right before the full-resolution 1x1 segmentation layer. Deep-supervision outputs are nnU-Net's."""

    def __init__(self, unet: nn.Module, n_image: int, n_landmark: int, input_transform: nn.Module | None = None):
        super().__init__(unet, n_image, input_transform)
        old = unet.decoder.seg_layers[-1]
        head = _LateFusionHead(unet.decoder.encoder.conv_op, old.in_channels, n_landmark, old.out_channels)
        head.apply(InitWeights_He(1e-2))
        unet.decoder.seg_layers[-1] = head

    def forward(self, x: torch.Tensor):
        head = self.unet.decoder.seg_layers[-1]
        head.maps = x[:, self.n_image:]
        try:
            return self.unet(self._image(x))
        finally:
            head.maps = None


class _MultiTaskBlock(nn.Module):
    """Per organ: double conv + 1x1 conv to one logit, on copies of the same features (§3.4.1)."""

    def __init__(self, encoder, in_features: int, n_organs: int, features: int):
        super().__init__()
        self.organs = nn.ModuleList(
            nn.Sequential(_conv_blocks(encoder, 2, in_features, features), encoder.conv_op(features, 1, 1, 1, 0, bias=True))
            for _ in range(n_organs))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.cat([organ(features) for organ in self.organs], 1)


class MultiTaskBlockUNet(_WrappedUNet):
    """Landmark-input U-Net's multi-task block (§3.4.1, Fig. 2) replacing nnU-Net's full-resolution 1x1
    segmentation layer: one head per organ, one output channel each (independent sigmoid outputs).

    The encoder sees the first ``n_image`` input channels: all of them when the dataset carries
    landmark maps and they are meant as early-fusion input, the image channels otherwise.
    """

    def __init__(self, unet: nn.Module, n_image: int, n_organs: int, features: int | None = None,
                 input_transform: nn.Module | None = None):
        super().__init__(unet, n_image, input_transform)
        encoder = unet.decoder.encoder
        in_features = unet.decoder.seg_layers[-1].in_channels
        block = _MultiTaskBlock(encoder, in_features, n_organs, features or in_features)
        block.apply(InitWeights_He(1e-2))
        unet.decoder.seg_layers[-1] = block

    def forward(self, x: torch.Tensor):
        return self.unet(self._image(x))
