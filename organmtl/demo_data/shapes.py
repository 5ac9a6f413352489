"""Geometry helpers for the synthetic phantoms: physical grids, ellipsoids, tubes, writers."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk


class Grid:
    """A voxel grid with numpy (z, y, x) order and physical coordinates in mm (LPS, identity direction).

    ``spacing`` and ``origin`` are given in SimpleITK (x, y, z) order.
    """

    def __init__(self, shape_zyx, spacing_xyz, origin_xyz=(0.0, 0.0, 0.0)):
        self.shape = tuple(int(s) for s in shape_zyx)
        self.spacing = tuple(float(s) for s in spacing_xyz)
        self.origin = tuple(float(o) for o in origin_xyz)
        z, y, x = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in self.shape], indexing="ij")
        self.x = self.origin[0] + x * self.spacing[0]
        self.y = self.origin[1] + y * self.spacing[1]
        self.z = self.origin[2] + z * self.spacing[2]

    @property
    def center(self) -> np.ndarray:
        """Physical centre (x, y, z) of the grid in mm."""
        return np.array([o + (n - 1) * s / 2 for o, n, s in zip(self.origin, self.shape[::-1], self.spacing)])

    def ellipsoid(self, center_xyz, radii_xyz) -> np.ndarray:
        cx, cy, cz = center_xyz
        rx, ry, rz = radii_xyz
        return ((self.x - cx) / rx) ** 2 + ((self.y - cy) / ry) ** 2 + ((self.z - cz) / rz) ** 2 <= 1.0

    def tube(self, points_xyz, radius) -> np.ndarray:
        """Voxels within ``radius`` mm of the polyline through ``points_xyz``."""
        pts = np.asarray(points_xyz, dtype=np.float32)
        p = np.stack([self.x, self.y, self.z], axis=-1)
        d2 = np.full(self.shape, np.inf, dtype=np.float32)
        for a, b in zip(pts[:-1], pts[1:]):
            ab = b - a
            t = np.clip(((p - a) @ ab) / max(float(ab @ ab), 1e-6), 0.0, 1.0)
            closest = a + t[..., None] * ab
            d2 = np.minimum(d2, ((p - closest) ** 2).sum(-1))
        return d2 <= radius ** 2

    def to_voxel(self, point_xyz) -> np.ndarray:
        """Continuous voxel index (x, y, z) of a physical point."""
        return (np.asarray(point_xyz, dtype=float) - np.array(self.origin)) / np.array(self.spacing)

    def image(self, array, dtype=None) -> sitk.Image:
        arr = np.asarray(array if dtype is None else array.astype(dtype))
        img = sitk.GetImageFromArray(arr)
        img.SetSpacing(self.spacing)
        img.SetOrigin(self.origin)
        return img


def rounded_box_2d(yy, xx, center, half_size, radius) -> np.ndarray:
    """2D rounded rectangle mask (all lengths in pixels): a box whose corners are circles of ``radius``."""
    cy, cx = center
    hy, hx = half_size
    dy = np.maximum(np.abs(yy - cy) - (hy - radius), 0)
    dx = np.maximum(np.abs(xx - cx) - (hx - radius), 0)
    return dy ** 2 + dx ** 2 <= radius ** 2


def write(image: sitk.Image, path: Path) -> None:
    """Write with compression (NIfTI .gz / NRRD gzip) and create parent folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), useCompression=True)


def write_fcsv(path: Path, labelled_points_lps, coordinate_system: str = "RAS") -> None:
    """Write a 3D Slicer markups ``.fcsv`` file (format 4.11) from LPS points in mm.

    Slicer writes RAS by default: x and y are negated with respect to LPS (ITK/DICOM convention).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    flip = np.array([-1.0, -1.0, 1.0]) if coordinate_system == "RAS" else np.ones(3)
    lines = ["# Markups fiducial file version = 4.11",
             f"# CoordinateSystem = {coordinate_system}",
             "# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID"]
    for i, (label, p) in enumerate(labelled_points_lps):
        q = np.asarray(p, dtype=float) * flip
        lines.append(f"vtkMRMLMarkupsFiducialNode_{i},{q[0]:.4f},{q[1]:.4f},{q[2]:.4f},0,0,0,1,1,1,0,{label},,")
    path.write_text("\n".join(lines) + "\n")
