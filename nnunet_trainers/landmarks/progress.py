"""Landmark numbers in nnU-Net's progress log and ``progress.png``.

nnU-Net's ``LocalLogger`` accepts only keys it knows (one value per epoch) and draws a fixed
three-panel figure. :class:`LandmarkProgressLogger` adds the landmark keys and draws them, after nnU-Net's own
``progress.png``, into ``progress_landmarks.png`` beside it (composing one image with nnU-Net's
30 x 54 inch figure took ~25 s per epoch on a CPU): validation landmark error (mm, argmax vs truth)
and heatmap RMSE (thesis Eq. 3), plus extra per-epoch series (uncertainty weighting's log-variances).
"""
from __future__ import annotations

import os

import matplotlib

matplotlib.use("agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from nnunetv2.training.logging.nnunet_logger import LocalLogger  # noqa: E402

LANDMARK_KEYS = ("landmark_error_mm", "heatmap_rmse")


class LandmarkProgressLogger(LocalLogger):
    """nnU-Net's local logger with ``landmark_error_mm``, ``heatmap_rmse`` and ``extra_keys``."""

    def __init__(self, extra_keys=(), verbose: bool = False):
        super().__init__(verbose)
        self.extra_keys = tuple(extra_keys)
        for k in (*LANDMARK_KEYS, *self.extra_keys):
            self.my_fantastic_logging[k] = []

    def load_checkpoint(self, checkpoint: dict):
        """Restore, keeping our keys if the checkpoint predates them (nnU-Net replaces the whole dict)."""
        super().load_checkpoint(checkpoint)
        epochs = len(checkpoint.get("train_losses", []))
        for k in (*LANDMARK_KEYS, *self.extra_keys):
            self.my_fantastic_logging.setdefault(k, [float("nan")] * epochs)

    def plot_progress_png(self, output_folder):
        """nnU-Net's ``progress.png``, then ``progress_landmarks.png`` beside it with the landmark series."""
        super().plot_progress_png(output_folder)
        log = self.my_fantastic_logging
        epoch = min(len(v) for v in log.values()) - 1
        x = list(range(epoch + 1))
        fig, ax = plt.subplots(1, 1, figsize=(12, 6))
        ax.plot(x, log["landmark_error_mm"][:epoch + 1], color="m", marker="o", label="landmark error (mm)")
        ax.set_xlabel("epoch")
        ax.set_ylabel("landmark error [mm]")
        ax2 = ax.twinx()
        ax2.plot(x, log["heatmap_rmse"][:epoch + 1], color="c", marker="o", label="heatmap RMSE")
        for k, color in zip(self.extra_keys, ("k", "y", "g", "r")):
            ax2.plot(x, log[k][:epoch + 1], color=color, ls="dotted", marker=".", label=k)
        ax2.set_ylabel("RMSE / log variance")
        ax.legend(loc="upper left")
        ax2.legend(loc="upper right")
        fig.tight_layout()
        fig.savefig(os.path.join(output_folder, "progress_landmarks.png"))
        plt.close(fig)


def nanmean_or_nan(values) -> float:
    """Mean of the finite values, nan when there are none (no landmark in any validation patch)."""
    a = np.asarray(values, dtype=float)
    a = a[np.isfinite(a)]
    return float(a.mean()) if a.size else float("nan")
