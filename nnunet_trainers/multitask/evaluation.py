"""Evaluation of a multi-task network (Moeskops et al. §4).

- Dice per class (§4), with :func:`organmtl.evaluation.metrics.dice`;
- per-task output masking: a case of task t may only receive background or t's classes
  (:func:`task_masked_labels`), measured against the unmasked argmax (:func:`argmax_labels`);
- cross-task confusion (§4 "voxels per scan labelled with a class alien to the target"):
  :func:`confusion_rate`, the share of a case's voxels given another task's class;
- binary tasks: the Dice-optimal operating point of the precision-recall curve (§4 "precision-recall
  curve analysis ... the highest Dice coefficient"), :class:`DiceOptimalThreshold`, chosen on
  validation cases and applied to the test cases.

Inputs are nnU-Net's saved probabilities (``--npz`` of ``nnUNetv2_train``, ``--save_probabilities``
of ``nnUNetv2_predict``): ``<case>.npz`` with ``probabilities`` of shape (classes, *image array shape).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from organmtl.evaluation.metrics import dice


def head_label_values(labels: dict) -> np.ndarray:
    """Label value of each network output channel: nnU-Net's heads are the labels sorted by value,
    without ``ignore`` (label training, not regions)."""
    values = sorted(int(v) for k, v in labels.items() if k != "ignore")
    return np.asarray(values, dtype=np.int64)


def load_probabilities(path: Path) -> np.ndarray:
    """``probabilities`` of an nnU-Net ``.npz``; a missing file or key is a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no saved probabilities (train with --npz / predict with --save_probabilities)")
    with np.load(path) as z:
        if "probabilities" not in z:
            raise KeyError(f"{path}: no 'probabilities' array")
        return z["probabilities"].astype(np.float32)


def argmax_labels(probabilities: np.ndarray, head_values: np.ndarray) -> np.ndarray:
    """Highest class activation over all union classes (§4, brain MRI), as label values."""
    return head_values[np.argmax(probabilities, axis=0)]


def task_masked_labels(probabilities: np.ndarray, head_values: np.ndarray, allowed) -> np.ndarray:
    """Argmax restricted to the task's classes (background and its own labels): per-task output masking."""
    keep = np.isin(head_values, np.asarray(list(allowed)))
    if not keep.any():
        raise ValueError(f"none of the allowed labels {tuple(allowed)} is an output of the network")
    masked = np.where(keep[(slice(None),) + (None,) * (probabilities.ndim - 1)], probabilities, -np.inf)
    return head_values[np.argmax(masked, axis=0)]


def confusion_rate(labels: np.ndarray, alien_labels) -> float:
    """Share of the voxels of a case labelled with a class of another task (§4)."""
    if labels.size == 0:
        raise ValueError("confusion_rate: empty label map")
    return float(np.isin(labels, np.asarray(list(alien_labels), dtype=labels.dtype)).mean()) if len(alien_labels) \
        else 0.0


class DiceOptimalThreshold:
    """Operating point of the precision-recall curve with the highest Dice over a set of cases (§4).

    Probabilities are accumulated as histograms (``bins`` equal bins on [0, 1]) of positive and
    negative voxels, so any number of cases fits in memory; every bin edge is a candidate threshold
    ``p >= t``, which covers every point of the curve up to the bin width. Dice = 2 TP / (2 TP + FP + FN)
    is the harmonic mean of precision and recall (F1), so the best point on the curve is the best Dice.
    """

    def __init__(self, bins: int = 1000):
        if bins < 2:
            raise ValueError("DiceOptimalThreshold: bins must be >= 2")
        self.bins = bins
        self.positives = np.zeros(bins, np.int64)
        self.negatives = np.zeros(bins, np.int64)

    def _index(self, p: np.ndarray) -> np.ndarray:
        return np.clip((np.asarray(p, np.float64) * self.bins).astype(np.int64), 0, self.bins - 1)

    def add(self, probability: np.ndarray, reference: np.ndarray) -> None:
        """Add one case: the class probability map and the boolean reference mask."""
        probability, reference = np.asarray(probability), np.asarray(reference, bool)
        if probability.shape != reference.shape:
            raise ValueError(f"probability shape {probability.shape} differs from reference {reference.shape}")
        idx = self._index(probability)
        self.positives += np.bincount(idx[reference], minlength=self.bins)
        self.negatives += np.bincount(idx[~reference], minlength=self.bins)

    def curve(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(thresholds, precision, recall, dice)`` for ``p >= threshold``, thresholds = bin lower edges."""
        tp = np.cumsum(self.positives[::-1])[::-1].astype(np.float64)
        fp = np.cumsum(self.negatives[::-1])[::-1].astype(np.float64)
        total_pos = float(self.positives.sum())
        fn = total_pos - tp
        with np.errstate(invalid="ignore", divide="ignore"):
            precision = np.where(tp + fp > 0, tp / (tp + fp), 1.0)
            recall = np.where(total_pos > 0, tp / max(total_pos, 1.0), 1.0)
            dsc = np.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), 1.0)
        thresholds = np.arange(self.bins) / self.bins
        return thresholds, precision, recall, dsc

    def best(self) -> tuple[float, float]:
        """``(threshold, Dice)`` of the Dice-optimal point; ties go to the higher threshold."""
        thresholds, _, _, dsc = self.curve()
        i = int(len(dsc) - 1 - np.argmax(dsc[::-1]))
        return float(thresholds[i]), float(dsc[i])


def thresholded_labels(probabilities: np.ndarray, head_values: np.ndarray, label: int, threshold: float) -> np.ndarray:
    """Binary task: ``label`` where its probability is >= ``threshold``, else background (§4)."""
    channel = int(np.flatnonzero(head_values == label)[0])
    return np.where(probabilities[channel] >= threshold, label, 0).astype(head_values.dtype)


def dice_per_label(pred: np.ndarray, reference: np.ndarray, labels) -> dict[int, float]:
    """Dice of every label value in ``labels`` (§4)."""
    if pred.shape != reference.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from reference shape {reference.shape}")
    return {int(v): dice(pred == v, reference == v) for v in labels}
