"""Landmarks carried alongside converted cases: read (.fcsv, voxel-coordinate text files),
convert to LPS and voxel coordinates, drop outside/duplicated points, write one JSON per case.

JSON format (``landmarks/<case>.json`` in the converted dataset)::

    {"case": "...", "coordinate_system": "LPS",
     "landmarks": [{"name": "chiasm", "lps_mm": [x, y, z], "voxel_xyz": [i, j, k]}, ...],
     "dropped": [{"name": "...", "reason": "outside the image" | "duplicate of ..."}]}

``voxel_xyz`` are continuous indices in SimpleITK (x, y, z) order; numpy arrays index them as
``array[k, j, i]``.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from organmtl.converters.common import ConversionError, copy_geometry, write_image, write_json

_RAS_TO_LPS = np.array([-1.0, -1.0, 1.0])


def read_fcsv(path: Path) -> list[tuple[str, np.ndarray]]:
    """Points of a 3D Slicer markups ``.fcsv`` in LPS mm.

    The header's ``# CoordinateSystem = RAS|LPS`` (or ``0``/``1``, the numeric form of Slicer
    4.6-4.10) says the system. Without that line the file follows Slicer's convention for the
    version in ``# Markups fiducial file version = X.Y``: before 4.11 (or no version line, as
    hand-written files) RAS, Slicer's coordinate system until 4.10; from 4.11 on LPS, the default
    Slicer 4.11 introduced for markups files.
    """
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConversionError(f"{path}: cannot be read ({e.__class__.__name__})") from None
    system, version = None, None
    columns = ["id", "x", "y", "z", "ow", "ox", "oy", "oz", "vis", "sel", "lock", "label"]
    points = []
    for n, line in enumerate(lines, start=1):
        if line.startswith("#"):
            m = re.match(r"#\s*Markups fiducial file version\s*=\s*(\d+)\.(\d+)", line, re.IGNORECASE)
            if m:
                version = (int(m.group(1)), int(m.group(2)))
            m = re.match(r"#\s*CoordinateSystem\s*=\s*(\S+)", line, re.IGNORECASE)
            if m:
                value = m.group(1).upper()
                system = {"0": "RAS", "RAS": "RAS", "1": "LPS", "LPS": "LPS"}.get(value)
                if system is None:
                    raise ConversionError(f"{path}: unknown CoordinateSystem {m.group(1)!r}")
            m = re.match(r"#\s*columns\s*=\s*(.+)", line)
            if m:
                columns = [c.strip() for c in m.group(1).split(",")]
            continue
        if not line.strip():
            continue
        fields = line.split(",")
        try:
            row = dict(zip(columns, fields))
            xyz = np.array([float(row["x"]), float(row["y"]), float(row["z"])])
        except (KeyError, ValueError):
            raise ConversionError(f"{path}:{n}: malformed landmark line") from None
        label = row.get("label") or row.get("id") or f"point{len(points)}"
        points.append((label, xyz))
    if system is None:
        system = "LPS" if version is not None and version >= (4, 11) else "RAS"
    return [(label, xyz * _RAS_TO_LPS if system == "RAS" else xyz) for label, xyz in points]


def read_voxel_txt(path: Path, image: sitk.Image, names=None) -> list[tuple[str, np.ndarray]]:
    """Points given as three voxel coordinates (x y z) per line, returned in LPS mm."""
    out = []
    for n, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            idx = [float(v) for v in line.replace(",", " ").split()]
            assert len(idx) == 3
        except (ValueError, AssertionError):
            raise ConversionError(f"{path}:{n}: expected three voxel coordinates") from None
        name = names[len(out)] if names and len(out) < len(names) else f"landmark{len(out)}"
        out.append((name, np.array(image.TransformContinuousIndexToPhysicalPoint(idx))))
    return out


def landmarks_record(case: str, points, image: sitk.Image, min_separation_mm: float = 1e-3) -> dict:
    """Validate points against ``image``: keep those inside, drop duplicates (same name or same place)."""
    kept, dropped = [], []
    size = np.array(image.GetSize())
    for name, lps in points:
        voxel = np.array(image.TransformPhysicalPointToContinuousIndex([float(v) for v in lps]))
        if np.any(voxel < -0.5) or np.any(voxel > size - 0.5):
            dropped.append({"name": name, "reason": "outside the image"})
            continue
        dup = next((k for k in kept if k["name"] == name
                    or np.linalg.norm(np.array(k["lps_mm"]) - lps) < min_separation_mm), None)
        if dup is not None:
            dropped.append({"name": name, "reason": f"duplicate of {dup['name']}"})
            continue
        kept.append({"name": name, "lps_mm": [round(float(v), 4) for v in lps],
                     "voxel_xyz": [round(float(v), 4) for v in voxel]})
    return {"case": case, "coordinate_system": "LPS", "landmarks": kept, "dropped": dropped}


def write_case(out: Path, case: str, image: sitk.Image, seg, points, file_ending: str, record: dict) -> dict:
    """Write one converted case: ``imagesTr/<case>_0000``, the label map ``seg`` (numpy, on the
    image's grid) as ``labelsTr/<case>``, and ``landmarks/<case>.json`` when there are ``points``;
    notes the dropped landmarks in ``record`` and returns it."""
    write_image(image, out / "imagesTr" / f"{case}_0000{file_ending}")
    write_image(copy_geometry(seg, image), out / "labelsTr" / f"{case}{file_ending}")
    lm = landmarks_record(case, points, image)
    if points:
        write_json(out / "landmarks" / f"{case}.json", lm)
    record["landmarks_dropped"] = lm["dropped"]
    return record
