"""Geometry of closed 2D contours and masks, shared by the COCO converter and the Detectron2 heads.

Coordinates are COCO's continuous pixel coordinates: pixel (r, c) covers [c, c+1] x [r, r+1], x
points right and y down. The canonical contour, HMR-Net's boundary representation (HMR-Net paper
§2.4; docs/hmrnet.md), runs clockwise as seen on screen from the top crossing of the vertical line
through its bounding-box centre ("12 o'clock"). That start moves continuously when the contour is
rotated, scaled or flipped, so the i-th point means the same place on every (augmented) instance; a
"top-most vertex" start would jump between the corners of a flat-topped organ under a small rotation.
"""
from __future__ import annotations

import numpy as np
from pycocotools import mask as mask_util
from skimage import measure


def signed_area(xy: np.ndarray) -> float:
    """Shoelace area of the closed polygon ``xy`` (N, 2); positive when it runs clockwise on screen."""
    x, y = xy[:, 0], xy[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


def outer_contour(mask: np.ndarray) -> np.ndarray:
    """Outer contour (N, 2) as (x, y) COCO coordinates of the largest-area boundary of ``mask``."""
    padded = np.pad(mask.astype(np.float32), 1)
    contours = measure.find_contours(padded, 0.5)
    if not contours:
        raise ValueError("empty mask has no contour")
    best = max(contours, key=lambda c: abs(signed_area(c[:, ::-1])))
    xy = best[:, ::-1] - 1.0 + 0.5        # undo padding; pixel centres sit at +0.5
    if np.allclose(xy[0], xy[-1]):
        xy = xy[:-1]
    return xy


def canonical_contour(xy: np.ndarray) -> np.ndarray:
    """Orient clockwise on screen (positive shoelace area with y pointing down) and start at the
    top-most crossing of the contour with the vertical line through its bounding-box centre (that
    crossing is inserted as the first vertex unless it is one). Contours without such a crossing
    (all x equal) start at their top-most vertex."""
    xy = np.asarray(xy, dtype=np.float64)
    if signed_area(xy) < 0:
        xy = xy[::-1]
    cx = (xy[:, 0].min() + xy[:, 0].max()) / 2
    a, b = xy, np.roll(xy, -1, axis=0)
    crosses = ((a[:, 0] - cx) * (b[:, 0] - cx) <= 0) & (a[:, 0] != b[:, 0])
    if not crosses.any():
        return np.roll(xy, -int(np.argmin(xy[:, 1])), axis=0)
    edges = np.flatnonzero(crosses)
    t = (cx - a[edges, 0]) / (b[edges, 0] - a[edges, 0])
    hits = a[edges] + t[:, None] * (b[edges] - a[edges])
    k = int(np.argmin(hits[:, 1]))
    edge, start = int(edges[k]), hits[k]
    rest = np.roll(xy, -(edge + 1), axis=0)             # b[edge], ..., a[edge]
    if np.allclose(rest[0], start):
        return rest
    if np.allclose(rest[-1], start):
        return np.roll(rest, 1, axis=0)
    return np.vstack([start[None], rest])


def resample_closed(xy: np.ndarray, p: int) -> np.ndarray:
    """``p`` points evenly spaced by arc length along the closed polyline ``xy`` from ``xy[0]``."""
    closed = np.vstack([xy, xy[:1]])
    seg = np.linalg.norm(np.diff(closed, axis=0), axis=1)
    cum = np.concatenate([[0.0], np.cumsum(seg)])
    targets = np.arange(p) * cum[-1] / p
    return np.stack([np.interp(targets, cum, closed[:, 0]), np.interp(targets, cum, closed[:, 1])], axis=1)


def contour_points(mask: np.ndarray, p: int) -> np.ndarray:
    """HMR-Net's boundary target (§2.4): (p, 2) canonical, evenly spaced outer-contour points."""
    return resample_closed(canonical_contour(outer_contour(mask)), p)


def rasterize_polygon(points_xy: np.ndarray, height: int, width: int) -> np.ndarray:
    """Binary mask of the polygon through ``points_xy`` (COCO coordinates), via pycocotools."""
    rle = mask_util.frPyObjects([np.asarray(points_xy, dtype=float).ravel().tolist()], height, width)
    return mask_util.decode(mask_util.merge(rle)).astype(bool)
