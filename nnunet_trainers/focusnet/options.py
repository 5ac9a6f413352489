"""FocusNetv2 options: small organs, organ sizes, ROI size, phase schedule (papers/focusnetv2.txt
§3.1.3, §3.2, §4.2). Everything a user may change is an environment variable, so the stock
``nnUNetv2_train`` command line stays unchanged (table in docs/focusnetv2.md):

- ``ORGANMTL_FOCUSNET_PHASE_EPOCHS`` e.g. ``snet=400,sol=100,ae=100,sos=200,joint=200``
- ``ORGANMTL_FOCUSNET_SMALL_ORGANS`` e.g. ``Chiasm,OpticNerve_L,OpticNerve_R``
- ``ORGANMTL_FOCUSNET_SMALL_MM3`` volume threshold (mm^3) when dataset.json names no small organs
- ``ORGANMTL_FOCUSNET_ROI`` ROI size in voxels ``z,y,x``
- ``ORGANMTL_FOCUSNET_HEAT_THRESHOLD``, ``ORGANMTL_FOCUSNET_CENTRE_JITTER``, ``ORGANMTL_FOCUSNET_LR``
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm import tqdm

#: dataset.json key naming the small organs (written by ``organmtl convert pddca``)
SMALL_ORGANS_KEY = "organmtl_small_organs"
#: key of the FocusNet settings inside the nnU-Net configuration of plans.json
PLANS_KEY = "organmtl_focusnet"
#: the paper's ROI in mm (8 x 64 x 64 voxels at 3 x 1 x 1 mm, §3.1.3)
PAPER_ROI_MM = (24.0, 64.0, 64.0)
#: the four phases of §4.2 plus the autoencoder pre-training on ground-truth masks
ALL_PHASES = ("snet", "sol", "ae", "sos", "joint")
#: share of the epochs each phase gets when ORGANMTL_FOCUSNET_PHASE_EPOCHS does not say
DEFAULT_PHASE_SHARE = {"snet": 0.4, "sol": 0.1, "ae": 0.1, "sos": 0.2, "joint": 0.2}
DEFAULT_SMALL_MM3 = 2000.0


def env_str(name: str) -> str | None:
    v = os.environ.get(name)
    return v if v not in (None, "") else None


def env_float(name: str, default: float) -> float:
    raw = env_str(name)
    if raw is None:
        return default
    try:
        return float(raw)
    except ValueError as e:
        raise ValueError(f"environment variable {name}={raw!r} is not a number") from e


def parse_phase_epochs(raw: str, phases: Sequence[str]) -> dict[str, int]:
    """``"snet=2,sol=1"`` -> ``{"snet": 2, "sol": 1}`` restricted to ``phases`` (one setting can serve
    several variants: phases a variant does not run are ignored); every name must be a known phase."""
    out = {}
    for item in raw.split(","):
        item = item.strip()
        if not item:
            continue
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or name not in ALL_PHASES:
            raise ValueError(f"ORGANMTL_FOCUSNET_PHASE_EPOCHS: {item!r} is not NAME=EPOCHS with NAME one of {list(ALL_PHASES)}")
        try:
            n = int(value)
        except ValueError as e:
            raise ValueError(f"ORGANMTL_FOCUSNET_PHASE_EPOCHS: {item!r} has no integer epoch count") from e
        if n < 0:
            raise ValueError(f"ORGANMTL_FOCUSNET_PHASE_EPOCHS: {item!r} is negative")
        if name in phases:
            out[name] = n
    return out


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
                        threshold_mm3: float | None = None) -> list[str]:
    """Names of the small organs: ``ORGANMTL_FOCUSNET_SMALL_ORGANS``, else dataset.json's
    ``organmtl_small_organs``, else every foreground label whose mean volume is below the threshold
    (``ORGANMTL_FOCUSNET_SMALL_MM3``, default 2000 mm^3)."""
    raw = env_str("ORGANMTL_FOCUSNET_SMALL_ORGANS")
    names = [n.strip() for n in raw.split(",") if n.strip()] if raw else dataset_json.get(SMALL_ORGANS_KEY)
    fg = {k: int(v) for k, v in labels.items() if k not in ("background", "ignore") and isinstance(v, int) and v > 0}
    if names is not None:
        unknown = [n for n in names if n not in fg]
        if unknown:
            src = "ORGANMTL_FOCUSNET_SMALL_ORGANS" if raw else f"dataset.json {SMALL_ORGANS_KEY!r}"
            raise ValueError(f"{src}: {unknown} are not labels of this dataset ({sorted(fg)})")
        return list(names)
    if sizes_mm3 is None:
        raise ValueError("no small organs named (dataset.json has no 'organmtl_small_organs') and no organ sizes to threshold")
    thr = env_float("ORGANMTL_FOCUSNET_SMALL_MM3", DEFAULT_SMALL_MM3) if threshold_mm3 is None else threshold_mm3
    return [n for n, v in fg.items() if 0 < sizes_mm3.get(v, 0.0) < thr]


def roi_size(spacing: Sequence[float], patch_size: Sequence[int]) -> list[int]:
    """SOS-Net ROI in voxels: ``ORGANMTL_FOCUSNET_ROI`` (``z,y,x``), else the paper's 24 x 64 x 64 mm at
    the configuration's spacing; either way at most the patch size (one window must hold it)."""
    raw = env_str("ORGANMTL_FOCUSNET_ROI")
    if raw:
        try:
            roi = [int(v) for v in raw.split(",")]
        except ValueError as e:
            raise ValueError(f"ORGANMTL_FOCUSNET_ROI={raw!r} is not three integers z,y,x") from e
        if len(roi) != len(patch_size) or min(roi) < 1:
            raise ValueError(f"ORGANMTL_FOCUSNET_ROI={raw!r} must be {len(patch_size)} positive integers")
    else:
        roi = [max(2, int(round(mm / s))) for mm, s in zip(PAPER_ROI_MM[-len(spacing):], spacing)]
    return [int(min(r, p)) for r, p in zip(roi, patch_size)]
