"""Patches that hold every small organ whole, for FocusNet's ``ae``, ``sos`` and ``joint`` phases
(FocusNetv2 paper §4.2: training chunks "always contain all small organs"; docs/focusnetv2.md "Sampling").

:class:`WholeSmallOrganDataLoader` is nnU-Net's own ``nnUNetDataLoader`` with three hooks replaced:

- ``get_indices`` draws the batch's cases (nnU-Net's random draw) among the training cases that hold at
  least one small organ (those with all of them when there are any);
- ``get_do_oversample`` only remembers which slot of the batch nnU-Net is filling;
- ``get_bbox`` places the patch so that the bounding box of the case's small organs (all of them
  together, measured once per case on its preprocessed segmentation) lies inside the *final* patch
  (the central ``final_patch_size`` region that nnU-Net's spatial augmentation keeps) with at least
  one voxel to every face, at a uniformly random position among those that do. In an axis where the
  organs do not fit (extent > final patch - 2) the patch is centred on them, so they are cut
  symmetrically as little as possible; the loader counts such cases (``cases_not_fitting``).

Everything else (loading, cropping, padding, nnU-Net's augmentation, workers) is nnU-Net's. The
guarantee is on the crop: nnU-Net's rotation and scaling around the patch centre can still move a
voxel of an organ that sits near the final patch's border out of it.
"""
from __future__ import annotations

import numpy as np
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader


def small_organ_boxes(dataset, keys, small_labels) -> dict[str, tuple[np.ndarray, np.ndarray, int]]:
    """Per case: ``(lo, hi, n_present)``, the inclusive voxel bounding box of all small organs of the case
    together (in the preprocessed array's axes) and how many of ``small_labels`` it holds; cases without any
    small organ are left out."""
    out = {}
    labels = [int(v) for v in small_labels]
    for key in keys:
        seg = np.asarray(dataset.load_case(key)[1][0])
        mask = np.isin(seg, labels)
        if not mask.any():
            continue
        idx = np.nonzero(mask)
        present = sum(int((seg == v).any()) for v in labels)
        out[key] = (np.array([i.min() for i in idx]), np.array([i.max() for i in idx]), present)
    return out


class WholeSmallOrganDataLoader(nnUNetDataLoader):
    """nnU-Net data loader whose patches contain every small organ of the case whole (see the module).

    ``small_labels``: label values of the small organs. ``random_fraction``: the share of samples placed
    by nnU-Net's own random draw instead (no forced foreground; the ``sos``/``joint`` phases' negatives:
    patches that may miss an organ, where SOS-Net learns to predict nothing). Raises ``ValueError`` when no
    case of ``data`` holds any of them.
    """

    def __init__(self, data, batch_size, patch_size, final_patch_size, label_manager, small_labels,
                 transforms=None, random_fraction: float = 0.0, **kwargs):
        super().__init__(data, batch_size, patch_size, final_patch_size, label_manager,
                         oversample_foreground_percent=0.0, transforms=transforms, **kwargs)
        self.small_labels = [int(v) for v in small_labels]
        self.boxes = small_organ_boxes(data, data.identifiers, self.small_labels)
        if not self.boxes:
            raise ValueError(f"FocusNet sampler: none of the {len(data.identifiers)} training case(s) holds a small "
                             f"organ (labels {self.small_labels})")
        most = max(n for _, _, n in self.boxes.values())
        self.indices = sorted(k for k, (_, _, n) in self.boxes.items() if n == most)
        self.final = np.array(self.final_patch_size)
        size = np.array(self.patch_size)
        self.offset = (size - self.final) // 2            # where nnU-Net's augmentation keeps the final patch
        self.cases_not_fitting = sorted(k for k, (lo, hi, _) in self.boxes.items() if ((hi - lo + 1) > self.final - 2).any())
        self.random_fraction = float(random_fraction)
        self._keys: list[str] = []
        self._slot = 0
        self._random = False
        self.get_do_oversample = self._remember_slot

    def get_indices(self):
        keys = super().get_indices()
        self._keys = list(keys)
        return keys

    def _remember_slot(self, sample_idx: int) -> bool:
        self._slot = sample_idx
        self._random = self.random_fraction > 0 and np.random.uniform() < self.random_fraction
        return False

    def get_bbox(self, data_shape, force_fg, class_locations, overwrite_class=None, verbose=False):
        """The patch (``patch_size``) whose final region holds the case's small organs with a one-voxel margin
        (nnU-Net's random patch for a ``random_fraction`` sample)."""
        if self._random:
            return super().get_bbox(data_shape, False, class_locations, overwrite_class, verbose)
        lo, hi, _ = self.boxes[self._keys[self._slot]]
        size = np.array(self.patch_size)
        start = []
        for d in range(len(size)):
            first, last = hi[d] - self.final[d] + 2, lo[d] - 1        # final-region starts that keep the margin
            f = np.random.randint(first, last + 1) if first <= last else (lo[d] + hi[d] + 1) // 2 - self.final[d] // 2
            start.append(int(f - self.offset[d]))
        return start, [s + int(p) for s, p in zip(start, size)]
