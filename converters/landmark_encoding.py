"""Landmarks encoded as extra input channels of an nnU-Net raw dataset.

Two encodings, both in numpy (z, y, x) order (2D arrays are (y, x)) and computed by broadcasting
one ``|i - l_i|`` term per axis, never by looping over voxels:

``distance``: the landmark-input U-Net's inverse Manhattan distance map
    (landmark-input U-Net thesis, §3.6). Per landmark ``l`` and voxel ``i``,
    ``d = sum_a |i_a - l_a|`` in voxels (as the paper: one voxel step counts 1 along every axis,
    whatever the spacing), then ``1 / (1 + d)``; the maps of the case's landmarks are summed and
    the sum is divided by its maximum. For one landmark, or the paper's landmark pair, that maximum
    is the value at the landmark(s): every value lies in (0, 1] and the landmark voxels read 1.
``heatmap``: the multi-task thesis' Gaussian landmark maps
    (landmark multi-task U-Net thesis, §2.3): ``exp(-|x - l|^2 / (2 sigma^2))`` with ``|x - l|``
    in mm (the per-axis voxel offsets times the spacing, so the blob is round in the patient even
    on anisotropic grids), peak 1 at the landmark; blobs are merged with a voxel-wise maximum so
    they never add up, or written one channel per landmark.

:func:`add_landmark_channels` writes these maps as channels ``<case>_000K`` of a converted dataset
(with the image's exact geometry) and names them ``noNorm`` in ``dataset.json``, the key nnU-Net's
``get_normalization_scheme`` maps to ``NoNormalization``: the maps already lie in [0, 1].
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from organmtl.converters.common import ConversionError, read_header, run_cases, write_image

ENCODINGS = ("distance", "heatmap")
NO_NORMALIZATION = "noNorm"   # casefolds to nnU-Net's 'nonorm' -> NoNormalization
SPLITS = (("imagesTr", "labelsTr"), ("imagesTs", "labelsTs"))


def _axis_offsets(shape, landmark, spacing) -> list[np.ndarray]:
    """Per axis ``|i_a - l_a| * s_a``, shaped to broadcast against the grid ``shape``."""
    out = []
    for axis, (n, l, s) in enumerate(zip(shape, landmark, spacing)):
        view = [1] * len(shape)
        view[axis] = n
        out.append((np.abs(np.arange(n, dtype=np.float64) - float(l)) * float(s)).reshape(view))
    return out


def _landmark_array(landmarks_voxel, shape) -> np.ndarray:
    pts = np.asarray(landmarks_voxel, dtype=np.float64)
    if pts.size == 0:
        raise ValueError("no landmarks given")
    if pts.ndim != 2 or pts.shape[1] != len(shape):
        raise ValueError(f"landmarks of shape {pts.shape} do not fit a {len(shape)}D grid: need (n, {len(shape)})")
    return pts


def inverse_manhattan_map(shape_zyx, spacing_zyx, landmarks_voxel, per_landmark: bool = False) -> np.ndarray:
    """Normalised inverse Manhattan distance map (landmark_input_unet §3.6), float32.

    ``landmarks_voxel``: (n, ndim) continuous voxel indices in the array's axis order ((z, y, x) in
    3D, (y, x) in 2D). ``spacing_zyx=None`` measures ``d`` in voxels, as the paper does; with
    anisotropic voxels the map then falls off faster in mm along the finer axes (a 3.5 x 3.5 x 4 mm
    grid counts one step as 1 in each direction). Passing a spacing measures ``d`` in mm instead.

    Merged (default): ``M = sum_k 1 / (1 + d_k)`` divided by ``max M``. The paper divides by the
    value at the landmark; for one landmark or a pair on voxel centres that value is the maximum
    (``1/(1+s) + 1/(1+t)`` with ``s + t >= d_12`` peaks at ``s = 0``), so both readings agree and the
    landmarks read exactly 1. For three or more landmarks the sum can peak between them; dividing
    by the maximum keeps the range (0, 1]. ``per_landmark=True`` returns (n, *shape), one
    normalised single-landmark map each.
    """
    shape = tuple(int(n) for n in shape_zyx)
    spacing = (1.0,) * len(shape) if spacing_zyx is None else tuple(spacing_zyx)
    maps = (1.0 / (1.0 + np.broadcast_to(sum(_axis_offsets(shape, landmark, spacing)), shape))
            for landmark in _landmark_array(landmarks_voxel, shape))
    if per_landmark:
        return np.stack([m / m.max() for m in maps]).astype(np.float32)
    total = np.zeros(shape)
    for m in maps:                       # one full-size map in memory at a time
        total += m
    return (total / total.max()).astype(np.float32)


def gaussian_heatmap(shape_zyx, spacing_zyx, landmarks_voxel, sigma_mm: float,
                     per_landmark: bool = False) -> np.ndarray:
    """Gaussian landmark heatmap (landmark_mtl_unet_thesis §2.3), float32.

    One ``exp(-r^2 / (2 sigma_mm^2))`` per landmark, ``r`` the distance in mm from the voxel centre
    to the landmark's continuous position (``landmarks_voxel`` as in :func:`inverse_manhattan_map`),
    so the value is 1 at the landmark and ``exp(-0.5)`` at ``sigma_mm`` along any axis. Computed as
    the product of one 1D Gaussian per axis (the Gaussian is separable). Merged with a voxel-wise
    maximum (blobs never add up; each landmark keeps its maximum), or ``per_landmark=True``:
    (n, *shape), one channel per landmark.
    """
    if not sigma_mm > 0:
        raise ValueError(f"sigma_mm must be positive, got {sigma_mm}")
    shape = tuple(int(n) for n in shape_zyx)

    def blob(landmark):
        factors = [np.exp(-0.5 * (o / float(sigma_mm)) ** 2) for o in _axis_offsets(shape, landmark, spacing_zyx)]
        out = factors[0]
        for f in factors[1:]:
            out = out * f
        return np.broadcast_to(out, shape).astype(np.float32)

    blobs = (blob(landmark) for landmark in _landmark_array(landmarks_voxel, shape))
    if per_landmark:
        return np.stack(list(blobs))
    merged = next(blobs).copy()
    for b in blobs:
        np.maximum(merged, b, out=merged)
    return merged


def encode(encoding: str, shape_zyx, spacing_zyx, landmarks_voxel, sigma_mm: float,
           per_landmark: bool) -> np.ndarray:
    """(channels, *shape) maps of one case for ``encoding`` (``distance`` measured in voxels)."""
    if encoding == "distance":
        maps = inverse_manhattan_map(shape_zyx, None, landmarks_voxel, per_landmark)
    elif encoding == "heatmap":
        maps = gaussian_heatmap(shape_zyx, spacing_zyx, landmarks_voxel, sigma_mm, per_landmark)
    else:
        raise ValueError(f"unknown landmark encoding {encoding!r}; choose from {', '.join(ENCODINGS)}")
    return maps if per_landmark else maps[None]


# ---------------------------------------------------------------- nnU-Net raw dataset

def _read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None


def _cases(folder: Path, file_ending: str) -> list[tuple[str, str]]:
    """(split folder, case id) of every case, from its ``_0000`` channel; training cases first."""
    suffix = f"_0000{file_ending}"
    out = []
    for images, _ in SPLITS:
        if (folder / images).is_dir():
            out += [(images, p.name[: -len(suffix)]) for p in sorted((folder / images).iterdir())
                    if p.name.endswith(suffix)]
    return out


def _case_landmarks(folder: Path, case: str) -> dict[str, list[float]] | None:
    """``{name: voxel_xyz}`` of ``landmarks/<case>.json``, or None when the case has no file."""
    path = folder / "landmarks" / f"{case}.json"
    if not path.is_file():
        return None
    record = _read_json(path)
    try:
        return {lm["name"]: [float(v) for v in lm["voxel_xyz"]] for lm in record["landmarks"]}
    except (KeyError, TypeError, ValueError):
        raise ConversionError(f"{path}: malformed landmark record (needs landmarks[].name/voxel_xyz)") from None


def _missing_reason(folder: Path, case: str, found: dict | None, names: list[str]) -> str | None:
    if found is None:
        return "has no landmarks file"
    lacking = [n for n in names if n not in found]
    if not lacking:
        return None
    record = _read_json(folder / "landmarks" / f"{case}.json")
    why = {d.get("name"): d.get("reason") for d in record.get("dropped", [])}
    return "lacks landmark(s) " + ", ".join(f"{n!r}" + (f" ({why[n]})" if n in why else "") for n in lacking)


def _remove_case(folder: Path, split: str, case: str, file_ending: str) -> None:
    for p in (folder / split).glob(f"{case}_[0-9][0-9][0-9][0-9]{file_ending}"):
        p.unlink()
    labels = folder / dict(SPLITS)[split] / f"{case}{file_ending}"
    labels.unlink(missing_ok=True)
    (folder / "landmarks" / f"{case}.json").unlink(missing_ok=True)


def _geometry(path: Path) -> tuple:
    """(size, spacing, origin, direction) from the header of ``path``, voxels left unread."""
    reader = read_header(path)
    return reader.GetSize(), reader.GetSpacing(), reader.GetOrigin(), reader.GetDirection()


def _write_case_channels(task) -> None:
    folder, split, case, file_ending, first_channel, points_xyz, encoding, sigma_mm, per_landmark = task
    reference = folder / split / f"{case}_0000{file_ending}"
    size, spacing, origin, direction = _geometry(reference)
    if any(len(p) != len(size) for p in points_xyz):
        raise ConversionError(f"landmarks/{case}.json: voxel_xyz needs {len(size)} coordinates "
                              f"for the {len(size)}D image {reference.name}")
    points_zyx = [p[::-1] for p in points_xyz]
    maps = encode(encoding, size[::-1], spacing[::-1], points_zyx, sigma_mm, per_landmark)
    for k, arr in enumerate(maps):
        img = sitk.GetImageFromArray(arr)
        img.SetSpacing(spacing), img.SetOrigin(origin), img.SetDirection(direction)
        write_image(img, folder / split / f"{case}_{first_channel + k:04d}{file_ending}")


def add_landmark_channels(dataset_folder: Path, encoding: str, sigma_mm: float = 5.0, per_landmark: bool = False,
                          drop_incomplete: bool = False, jobs: int = 1) -> dict:
    """Append landmark channels to every case of a converted nnU-Net raw dataset.

    Reads ``landmarks/<case>.json`` (see :mod:`organmtl.converters.landmarks`), writes
    ``imagesTr|imagesTs/<case>_000K<file_ending>`` (K after the existing channels) as float32 with
    the geometry of the case's ``_0000`` image, and adds ``K: "noNorm"`` to ``channel_names`` plus
    ``organmtl_landmark_channels`` (encoding, sigma, landmark names per channel) to dataset.json.

    The landmark set is the union of the names kept in any case (in order of first appearance).
    With one merged channel (``per_landmark=False``) a case lacking some of those names (e.g.
    dropped as outside the image) keeps its channel, made of the landmarks it has (one blob
    fewer), and is listed under ``partial``. Every case needs the same channels: a case without a
    landmarks file or without any kept landmark, or (``per_landmark``) lacking one of the names, is
    an error naming the case, unless ``drop_incomplete``, which removes its images, label and
    landmarks file and lowers ``numTraining``. Returns ``{"channels": {K: description},
    "dropped": [{"case", "split", "reason"}], "partial": [{"case", "split", "missing": [names],
    "reason"}]}``.
    """
    folder = Path(dataset_folder)
    if encoding not in ENCODINGS:
        raise ConversionError(f"--landmark-channels {encoding!r}: choose from {', '.join(ENCODINGS)}")
    meta = _read_json(folder / "dataset.json")
    ending = meta["file_ending"]
    cases = _cases(folder, ending)
    found = {case: _case_landmarks(folder, case) for _, case in cases}
    names = list(dict.fromkeys(n for _, case in cases for n in (found[case] or {})))
    if not names:
        raise ConversionError(f"{folder / 'landmarks'}: no case has landmarks; landmark channels need them")
    dropped, partial = [], []
    for split, case in cases:
        reason = _missing_reason(folder, case, found[case], names)
        if reason is None:
            continue
        if not per_landmark and found[case]:
            partial.append({"case": case, "split": split, "reason": reason,
                            "missing": [n for n in names if n not in found[case]]})
            continue
        if not drop_incomplete:
            # named relative to the dataset: under ``organmtl convert`` the folder is a temporary one
            raise ConversionError(f"landmarks/{case}.json: case {case!r} {reason}; every case needs the same "
                                  f"landmark channels (drop such cases with --landmark-incomplete drop)")
        dropped.append({"case": case, "split": split, "reason": reason})
    kept = [(s, c) for s, c in cases if c not in {d["case"] for d in dropped}]
    if not any(s == "imagesTr" for s, _ in kept):
        raise ConversionError(f"{folder}: no training case has every landmark ({', '.join(names)})")
    for d in dropped:
        _remove_case(folder, d["split"], d["case"], ending)
    first = len(meta["channel_names"])
    tasks = [(folder, split, case, ending, first, [found[case][n] for n in names if n in found[case]], encoding,
              sigma_mm, per_landmark) for split, case in kept]
    run_cases(_write_case_channels, tasks, jobs=jobs, desc=f"landmark {encoding}")
    merged = f"{'sum' if encoding == 'distance' else 'max'}({', '.join(names)})"
    described = names if per_landmark else [merged]
    channels = {str(first + k): text for k, text in enumerate(described)}
    meta["channel_names"].update({k: NO_NORMALIZATION for k in channels})
    meta["numTraining"] = sum(s == "imagesTr" for s, _ in kept)
    meta["organmtl_landmark_channels"] = {"encoding": encoding, "channels": channels, "landmarks": names,
                                          **({"sigma_mm": float(sigma_mm)} if encoding == "heatmap" else {}),
                                          "distance_unit": "voxel" if encoding == "distance" else "mm"}
    (folder / "dataset.json").write_text(json.dumps(meta, indent=4))
    return {"channels": channels, "dropped": dropped, "partial": partial}


# ---------------------------------------------------------------- ``organmtl convert`` options

def add_arguments(parser) -> None:
    """The ``--landmark-*`` options of every source converter that writes an nnU-Net dataset."""
    g = parser.add_argument_group("landmark channels")
    g.add_argument("--landmark-channels", choices=("none", *ENCODINGS), default="none",
                   help="append landmark maps as input channels: inverse Manhattan distance map or "
                        "Gaussian heatmap (default none)")
    g.add_argument("--landmark-sigma-mm", type=float, default=5.0,
                   help="heatmap Gaussian sigma in mm (default 5.0)")
    g.add_argument("--one-channel-per-landmark", action="store_true",
                   help="one channel per landmark instead of one merged channel")
    g.add_argument("--landmark-incomplete", choices=("error", "drop"), default="error",
                   help="cases lacking a landmark: stop with an error (default) or drop the case")


def apply(folder: Path, args, summary: dict) -> None:
    """Run :func:`add_landmark_channels` as the options in ``args`` ask (nothing for ``none``) and
    note dropped cases in the conversion ``summary`` (its records and ``num_training``)."""
    if getattr(args, "landmark_channels", "none") == "none":
        return
    if not args.landmark_sigma_mm > 0:
        raise ConversionError(f"--landmark-sigma-mm {args.landmark_sigma_mm}: must be positive")
    result = add_landmark_channels(folder, args.landmark_channels, sigma_mm=args.landmark_sigma_mm,
                                   per_landmark=args.one_channel_per_landmark,
                                   drop_incomplete=args.landmark_incomplete == "drop", jobs=args.jobs)
    reasons = {d["case"]: d["reason"] for d in result["dropped"]}
    partial = {d["case"]: d for d in result["partial"]}
    for record in summary["cases"]:
        if record["case"] in reasons and record.get("action") != "dropped":
            record["action"] = f"dropped: {reasons[record['case']]}"
        if record["case"] in partial and record.get("action") != "dropped":
            missing = partial[record["case"]]["missing"]
            record["landmark_channel_missing"] = missing
            record.setdefault("notes", []).append(
                f"landmark channel without {', '.join(missing)} ({partial[record['case']]['reason']})")
    summary["num_training"] = _read_json(folder / "dataset.json")["numTraining"]
    summary["landmark_channels"] = result["channels"]
