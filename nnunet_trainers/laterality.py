"""No mirroring for datasets whose labels come in left/right pairs.

nnU-Net mirrors patches along every axis during training and test-time augmentation. When a
dataset labels ``Parotid_L`` and ``Parotid_R`` separately, a left-right flip turns one into the
other while the labels stay, so the network cannot learn which is which. This mixin switches
mirroring off (training and inference) when the dataset's labels contain such pairs.
"""
from __future__ import annotations

import re

_SIDE = re.compile(r"(^|[_\- ])(l|r|left|right)($|[_\- ])", re.IGNORECASE)


def lateral_pairs(label_names) -> list[tuple[str, str]]:
    """Pairs of label names that differ only by a left/right marker (``_L``/``_R``, ``left``/``right``)."""
    def key(name):
        return _SIDE.sub(lambda m: m.group(1) + "<side>" + m.group(3), name)

    groups: dict[str, list[str]] = {}
    for name in label_names:
        if _SIDE.search(name):
            groups.setdefault(key(name), []).append(name)
    return [tuple(sorted(g)) for g in groups.values() if len(g) == 2]


class LateralityAwareMirroringMixin:
    """Put before the nnU-Net trainer in the bases."""

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        rotation, dummy_2d, initial_patch_size, mirror_axes = \
            super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        pairs = lateral_pairs(self.dataset_json["labels"])
        if pairs and mirror_axes is not None:
            self.print_to_log_file(f"labels come in left/right pairs {pairs}: mirroring disabled")
            mirror_axes = None
            self.inference_allowed_mirroring_axes = None
        return rotation, dummy_2d, initial_patch_size, mirror_axes
