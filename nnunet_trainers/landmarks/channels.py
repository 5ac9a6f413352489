"""Which input channels of a converted dataset hold landmark maps, and where the trainers keep that.

``organmtl convert ... --landmark-channels distance|heatmap`` appends the maps as the last channels
of every case and describes them in ``dataset.json`` under ``organmtl_landmark_channels``
(:mod:`organmtl.converters.landmark_encoding`). nnU-Net then carries them through its own
preprocessing (cropping, resampling; ``noNorm`` channels are not normalised), so the trainers only
have to know how many of the input channels are image and how many are landmark maps.

``build_network_architecture`` is a static method that nnU-Net's predictor calls with the plans
but without ``dataset.json``; the trainers therefore copy this description into their
configuration in the plans (key :data:`PLANS_KEY`), which nnU-Net saves as ``plans.json`` beside the
checkpoints and hands back to the predictor.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

PLANS_KEY = "organmtl_landmark_channels"


class LandmarkChannelsError(ValueError):
    """A dataset lacks the landmark channels a landmark trainer needs."""


@dataclass(frozen=True)
class LandmarkChannels:
    """``n_image`` image channels followed by ``n_landmark`` landmark-map channels.

    ``encoding`` is ``heatmap`` (thesis §2.3) or ``distance`` (landmark-input U-Net §3.6);
    ``channel_names`` names what each landmark channel holds (one landmark or the merged map);
    ``sigma_mm`` is the heatmap Gaussian's sigma (None for distance maps).
    """

    n_image: int
    n_landmark: int
    encoding: str
    channel_names: tuple
    landmarks: tuple
    sigma_mm: float | None = None

    @property
    def merged(self) -> bool:
        """True when one channel holds all landmarks (voxel-wise max/sum), False for one per landmark."""
        return self.n_landmark == 1 and len(self.landmarks) > 1

    @classmethod
    def from_dataset_json(cls, dataset_json: dict, dataset_name: str = "dataset") -> "LandmarkChannels":
        """Read ``organmtl_landmark_channels`` of ``dataset.json``; the landmark channels must be the last ones."""
        meta = dataset_json.get("organmtl_landmark_channels")
        if not meta:
            raise LandmarkChannelsError(
                f"{dataset_name}/dataset.json: no 'organmtl_landmark_channels'; convert the dataset with "
                f"'organmtl convert ... --landmark-channels heatmap|distance' to train a landmark trainer")
        n_total = len(dataset_json["channel_names"])
        idx = sorted(int(k) for k in meta["channels"])
        if idx != list(range(n_total - len(idx), n_total)) or len(idx) == n_total:
            raise LandmarkChannelsError(
                f"{dataset_name}/dataset.json: landmark channels {idx} must be the last channels after at least "
                f"one image channel (have {n_total} channels)")
        return cls(n_image=n_total - len(idx), n_landmark=len(idx), encoding=meta["encoding"],
                   channel_names=tuple(meta["channels"][str(i)] for i in idx),
                   landmarks=tuple(meta.get("landmarks", ())), sigma_mm=meta.get("sigma_mm"))

    @classmethod
    def from_configuration(cls, configuration: dict) -> "LandmarkChannels":
        """Read the copy a landmark trainer stored in its plans configuration (see module docstring)."""
        if PLANS_KEY not in configuration:
            raise LandmarkChannelsError(
                f"plans configuration has no '{PLANS_KEY}': this network was not built by an organmtl landmark trainer")
        d = dict(configuration[PLANS_KEY])
        d["channel_names"], d["landmarks"] = tuple(d["channel_names"]), tuple(d["landmarks"])
        return cls(**d)

    def store_in_plans(self, plans_manager, configuration_manager, configuration_name: str) -> None:
        """Record this description in the plans dict (saved as ``plans.json``) and the live configuration."""
        d = asdict(self)
        plans_manager.plans["configurations"][configuration_name][PLANS_KEY] = d
        configuration_manager.configuration[PLANS_KEY] = d
