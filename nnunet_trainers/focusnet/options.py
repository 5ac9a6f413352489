"""FocusNetv2 options: small organs, organ sizes, ROI size, phase schedule (FocusNetv2 paper,
§3.1.3, §3.2, §4.2; docs/focusnetv2.md "Options").

:class:`FocusNetOptions` is what a user may set. The stock ``nnUNetv2_train`` command line has no
room for it, so every field has an environment variable; the trainer builds the record once, stores
it with the model (plans and checkpoint) and reads it back from there for ``--c``, ``--val`` and
``nnUNetv2_predict`` (:func:`organmtl.nnunet_trainers.settings.resolve`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm import tqdm

from organmtl.nnunet_trainers.settings import parse_float, parse_int, parse_list, parse_mapping, setting

#: dataset.json key naming the small organs (written by ``organmtl convert pddca``)
SMALL_ORGANS_KEY = "organmtl_small_organs"
#: key of the FocusNet settings inside the nnU-Net configuration of plans.json
PLANS_KEY = "organmtl_focusnet"
#: the paper's ROI in mm (8 x 64 x 64 voxels at 3 x 1 x 1 mm, §3.1.3)
PAPER_ROI_MM = (24.0, 64.0, 64.0)
#: channels of S-Net's first stage in Table 10 (the width factor is the plan's first stage over this)
PAPER_FIRST_STAGE = 32
#: the four phases of §4.2 plus the autoencoder pre-training on ground-truth masks
ALL_PHASES = ("snet", "sol", "ae", "sos", "joint")
#: share of the epochs each phase gets when ORGANMTL_FOCUSNET_PHASE_EPOCHS does not say
DEFAULT_PHASE_SHARE = {"snet": 0.4, "sol": 0.1, "ae": 0.1, "sos": 0.2, "joint": 0.2}
DEFAULT_SMALL_MM3 = 2000.0


def _phase_epochs(name: str, raw: str) -> tuple[tuple[str, int], ...]:
    explicit = parse_mapping(name, raw, ALL_PHASES, lambda n, v: parse_int(n, v, minimum=0))
    return tuple((p, explicit[p]) for p in ALL_PHASES if p in explicit)


def _load_phase_epochs(value) -> tuple[tuple[str, int], ...]:
    items = value.items() if isinstance(value, dict) else value
    return tuple((str(p), int(n)) for p, n in items)


def _roi(name: str, raw: str) -> tuple[int, ...]:
    return parse_list(name, raw, lambda n, v: parse_int(n, v, minimum=1), length=3)


@dataclass(frozen=True)
class FocusNetOptions:
    """The user-settable FocusNet options (``None``: derived, see each field)."""

    phase_epochs: tuple[tuple[str, int], ...] | None = setting(
        None, "ORGANMTL_FOCUSNET_PHASE_EPOCHS", _phase_epochs, _load_phase_epochs,
        "epochs per phase, e.g. snet=400,sol=100; unnamed phases share the rest of the budget")
    lr: float = setting(5e-4, "ORGANMTL_FOCUSNET_LR", lambda n, v: parse_float(n, v, minimum=0.0), float,
                        "Adam learning rate (constant, §4.2)")
    centre_jitter: int = setting(2, "ORGANMTL_FOCUSNET_CENTRE_JITTER", lambda n, v: parse_int(n, v, minimum=0), int,
                                 "training ROIs: ground-truth centre moved by up to this many voxels")
    heat_threshold: float = setting(0.0, "ORGANMTL_FOCUSNET_HEAT_THRESHOLD", parse_float, float,
                                    "inference: lower bound of the calibrated paste floor (a small organ is pasted "
                                    "only where the case's SOL-Net peak reaches the floor)")
    width: float | None = setting(None, "ORGANMTL_FOCUSNET_WIDTH", lambda n, v: parse_float(n, v, minimum=0.0),
                                  float, "factor on the channels of Tables 9-10; None: the plan's first stage / 32")
    small_organs: tuple[str, ...] | None = setting(None, "ORGANMTL_FOCUSNET_SMALL_ORGANS", parse_list, tuple,
                                                   "label names; None: dataset.json, else the volume threshold")
    small_mm3: float = setting(DEFAULT_SMALL_MM3, "ORGANMTL_FOCUSNET_SMALL_MM3",
                               lambda n, v: parse_float(n, v, minimum=0.0), float,
                               "volume threshold (mm^3) when no small organs are named")
    roi: tuple[int, ...] | None = setting(None, "ORGANMTL_FOCUSNET_ROI", _roi, lambda v: tuple(int(x) for x in v),
                                          "SOS-Net ROI z,y,x in voxels; None: the paper's 24 x 64 x 64 mm")

    def explicit_phase_epochs(self, phases: Sequence[str]) -> dict[str, int] | None:
        """The named phase epochs of the phases a variant runs (one setting can serve several variants)."""
        if self.phase_epochs is None:
            return None
        return {p: n for p, n in self.phase_epochs if p in phases}


def phase_schedule(phases: Sequence[str], num_epochs: int, explicit: dict[str, int] | None = None) -> list[tuple[str, int]]:
    """Epochs per phase (§4.2: S-Net -> SOL-Net -> [AE pre-training] -> SOS-Net (+AAE) -> joint).

    Phases named in ``explicit`` get that many epochs (0 skips a phase); the others share
    ``num_epochs`` minus the explicit ones by :data:`DEFAULT_PHASE_SHARE`, at least 1 epoch each.
    """
    explicit = dict(explicit or {})
    rest = [p for p in phases if p not in explicit]
    budget = max(0, num_epochs - sum(explicit.values()))
    shares = np.array([DEFAULT_PHASE_SHARE[p] for p in rest], dtype=float)
    alloc = {}
    if rest:
        raw = shares / shares.sum() * budget
        base = np.maximum(1, np.floor(raw).astype(int))
        left = budget - int(base.sum())
        for i in np.argsort(-(raw - np.floor(raw)))[:max(0, left)]:
            base[i] += 1
        alloc = dict(zip(rest, base.tolist()))
    sched = [(p, int(explicit.get(p, alloc.get(p, 0)))) for p in phases]
    sched = [(p, n) for p, n in sched if n > 0]
    if not sched:
        raise ValueError("FocusNet phase schedule has no epochs at all")
    return sched


def phase_at(schedule: list[tuple[str, int]], epoch: int) -> str:
    """Name of the phase that epoch ``epoch`` (0-based) belongs to; the last phase after the end."""
    acc = 0
    for name, n in schedule:
        acc += n
        if epoch < acc:
            return name
    return schedule[-1][0]


def measure_organ_sizes(seg_files: Sequence[Path], reader, labels: Sequence[int]) -> dict[int, float]:
    """Mean physical size (mm^3) of each label over the cases that contain it (§3.2: alpha_t is
    "inversely proportional to each organ's average size"; labels never seen get 0)."""
    totals = {int(v): 0.0 for v in labels}
    counts = {int(v): 0 for v in labels}
    for f in tqdm(list(seg_files), desc="FocusNet: organ sizes", leave=False):
        seg, props = reader.read_seg(str(f))
        voxel = float(np.prod(props["spacing"]))
        values, n = np.unique(np.asarray(seg), return_counts=True)
        for v, c in zip(values.tolist(), n.tolist()):
            if int(v) in totals:
                totals[int(v)] += c * voxel
                counts[int(v)] += 1
    return {v: (totals[v] / counts[v] if counts[v] else 0.0) for v in totals}


def choose_small_organs(labels: dict, dataset_json: dict, sizes_mm3: dict[int, float] | None,
                        options: FocusNetOptions = FocusNetOptions()) -> list[str]:
    """Names of the small organs: ``options.small_organs``, else dataset.json's ``organmtl_small_organs``,
    else every foreground label whose mean volume is below ``options.small_mm3``."""
    names = list(options.small_organs) if options.small_organs is not None else dataset_json.get(SMALL_ORGANS_KEY)
    fg = {k: int(v) for k, v in labels.items() if k not in ("background", "ignore") and isinstance(v, int) and v > 0}
    if names is not None:
        unknown = [n for n in names if n not in fg]
        if unknown:
            src = "ORGANMTL_FOCUSNET_SMALL_ORGANS" if options.small_organs is not None else f"dataset.json {SMALL_ORGANS_KEY!r}"
            raise ValueError(f"{src}: {unknown} are not labels of this dataset ({sorted(fg)})")
        return list(names)
    if sizes_mm3 is None:
        raise ValueError("no small organs named (dataset.json has no 'organmtl_small_organs') and no organ sizes to threshold")
    return [n for n, v in fg.items() if 0 < sizes_mm3.get(v, 0.0) < options.small_mm3]


def roi_size(spacing: Sequence[float], patch_size: Sequence[int], roi: Sequence[int] | None = None) -> list[int]:
    """SOS-Net ROI in voxels: ``roi`` (``z,y,x``, :attr:`FocusNetOptions.roi`), else the paper's
    24 x 64 x 64 mm at the configuration's spacing; either way at most the patch size (SOS-Net trains on ROIs of
    the training patch; the trainer warns when the patch cuts the paper's ROI)."""
    if roi is not None:
        if len(roi) != len(patch_size) or min(roi) < 1:
            raise ValueError(f"ORGANMTL_FOCUSNET_ROI={','.join(map(str, roi))!r} must be {len(patch_size)} positive integers")
        roi = list(roi)
    else:
        roi = paper_roi_voxels(spacing)
    return [int(min(r, p)) for r, p in zip(roi, patch_size)]


def paper_roi_voxels(spacing: Sequence[float]) -> list[int]:
    """The paper's ROI, 24 x 64 x 64 mm (§3.1.3, 8 x 64 x 64 voxels at 3 x 1 x 1 mm), at ``spacing``."""
    return [max(2, int(round(mm / s))) for mm, s in zip(PAPER_ROI_MM[-len(spacing):], spacing)]
