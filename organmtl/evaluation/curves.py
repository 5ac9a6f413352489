"""Learning curves from nnU-Net's progress (the checkpoint's ``logging`` dict or the
``training_log_*.txt`` files) and Detectron2's ``metrics.json`` (one JSON object per line, written
by its JSONWriter), including cross-stitch alphas (metric names containing ``alpha``) and
uncertainty weights (names containing ``log_var`` or ``sigma``) when a method logs them; names
containing ``cross_stitch`` (e.g. HMR-Net's ``cross_stitch/p2/a01``) count as alphas too."""
from __future__ import annotations

import json
import numbers
import re
from pathlib import Path

import numpy as np

_TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)?: ?(.*)$")
_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|nan|inf"
_AUX = ("alpha", "cross_stitch", "log_var", "sigma")
_STANDARD = {"train_losses", "val_losses", "dice_per_class_or_region", "mean_fg_dice", "ema_fg_dice", "lrs",
             "epoch_start_timestamps", "epoch_end_timestamps", "epoch_time_s"}


def _numbers(text: str) -> list[float]:
    text = re.sub(r"np\.float\d+\(|np\.int\d+\(|tensor\(", "", text)
    return [float(x) for x in re.findall(_NUMBER, text)]


def _name(text: str) -> str:
    return re.sub(r"\W+", "_", text.strip()).strip("_")


def _log_values(msg: str) -> list[tuple[str, object]]:
    """(series, value) pairs of one log message: nnU-Net's own lines, then the generic forms
    ``name value [unit]`` (comma-separated parts), ``name [v, ...]`` and ``name: {'k': v, ...}``."""
    if msg.startswith("Current learning rate:"):
        return [("lrs", _numbers(msg.split(":", 1)[1])[0])]
    if msg.startswith("Epoch time:"):
        return [("epoch_time_s", _numbers(msg.split(":", 1)[1])[0])]
    if msg.startswith("Pseudo dice"):
        return [("dice_per_class_or_region", _numbers(msg[len("Pseudo dice"):]))]
    if (d := re.fullmatch(r"([A-Za-z][\w ./-]*?):? \{(.*)\}", msg)):
        pairs = re.findall(r"['\"]?([\w./-]+)['\"]?\s*:\s*(?:np\.float\d+\(|tensor\()?(" + _NUMBER + ")", d.group(2))
        return [(f"{_name(d.group(1))}/{k}", float(v)) for k, v in pairs]
    if (lst := re.fullmatch(r"([A-Za-z][\w ./-]*?):? (\[.*\])", msg)):
        return [(_name(lst.group(1)), _numbers(lst.group(2)))]
    out = []
    for part in msg.split(","):
        if (kv := re.fullmatch(r"([A-Za-z][\w ./-]*?):? (" + _NUMBER + r")(?: ?[a-zA-Z%]{1,3})?", part.strip())):
            name = _name(kv.group(1))
            out.append(({"train_loss": "train_losses", "val_loss": "val_losses"}.get(name, name), float(kv.group(2))))
    return out


def parse_nnunet_log(paths: list[Path]) -> dict[str, list]:
    """Per-epoch series from nnU-Net training logs (``print_to_log_file`` lines ``<timestamp>: ...``):
    ``lrs``, ``train_losses``, ``val_losses``, ``dice_per_class_or_region`` (the "Pseudo dice"
    list), ``epoch_time_s``, and any other ``<name> <number or [numbers]>`` line a trainer prints
    (e.g. cross-stitch alphas; names with spaces become ``_``), ``name: {'k': v}`` lines as
    ``name/k`` series, comma-separated ``a 1.0, b 2.0`` parts. Lines after "Training done." are
    ignored. Later files (resumed runs) overwrite earlier epochs."""
    series: dict[str, dict[int, object]] = {}
    for path in sorted(paths):
        epoch = None
        for line in Path(path).read_text(errors="replace").splitlines():
            m = _TIMESTAMP.match(line)
            if not m:
                continue
            msg = m.group(1).strip()
            if (e := re.fullmatch(r"Epoch (\d+)", msg)):
                epoch = int(e.group(1))
                continue
            if msg.startswith("Training done"):
                epoch = None
            if epoch is None or not msg:
                continue
            for key, value in _log_values(msg):
                series.setdefault(key, {})[epoch] = value
    return {k: [v[e] for e in sorted(v)] for k, v in series.items()} | \
        {f"{k}__epochs": sorted(v) for k, v in series.items()}


def read_nnunet_progress(fold_dir: Path) -> tuple[dict[str, list], str]:
    """The progress of an nnU-Net fold folder: the ``logging`` dict of its newest checkpoint
    (final, latest, best) if one loads, plus the series of its training logs that the checkpoint
    lacks (values a trainer prints, e.g. uncertainty log variances); without a checkpoint, the
    logs alone. Returns (series, sources)."""
    fold_dir = Path(fold_dir)
    logs = sorted(fold_dir.glob("training_log_*.txt"))
    from_logs = parse_nnunet_log(logs) if logs else {}
    sources = [str(p) for p in logs]
    for name in ("checkpoint_final.pth", "checkpoint_latest.pth", "checkpoint_best.pth"):
        ck = fold_dir / name
        if ck.is_file():
            import torch

            logging = torch.load(str(ck), map_location="cpu", weights_only=False).get("logging")
            if logging:
                series = {k: list(v) for k, v in logging.items() if isinstance(v, (list, tuple))}
                extra = {k: v for k, v in from_logs.items() if k.removesuffix("__epochs") not in series}
                return series | extra, ", ".join([str(ck)] + sources)
    return from_logs, ", ".join(sources)


def read_detectron_metrics(path: Path) -> list[dict]:
    """The records of a Detectron2 ``metrics.json`` (skipping blank or truncated lines)."""
    records = []
    for line in Path(path).read_text(errors="replace").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and "iteration" in rec:
            records.append(rec)
    return records


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out_png: Path) -> Path:
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out_png, dpi=90, bbox_inches="tight")
    _plt().close(fig)
    return out_png


def _x(series: dict, key: str) -> list:
    return series.get(f"{key}__epochs") or list(range(len(series[key])))


def plot_nnunet_progress(series: dict[str, list], out_dir: Path, title: str) -> list[Path]:
    """``nnunet_curves.png`` (losses, pseudo Dice per class and its EMA, learning rate) and, when
    logged, ``nnunet_aux.png`` (alpha / log_var / sigma series). Returns the files written."""
    plt = _plt()
    out = []
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    for key, style in [("train_losses", "b-"), ("val_losses", "r-")]:
        if series.get(key):
            axes[0].plot(_x(series, key), series[key], style, marker="o", ms=3, label=key)
    axes[0].set_title("loss")
    axes[0].set_xlabel("epoch")
    dice = series.get("dice_per_class_or_region")
    if dice:
        arr = np.array([np.atleast_1d(d) for d in dice], dtype=float)
        for c in range(arr.shape[1]):
            axes[1].plot(_x(series, "dice_per_class_or_region"), arr[:, c], marker="o", ms=2, label=f"class {c + 1}", lw=1)
    for key, style in [("mean_fg_dice", "g:"), ("ema_fg_dice", "g-")]:
        if series.get(key):
            axes[1].plot(_x(series, key), series[key], style, marker="o", ms=3, label=key, lw=2)
    axes[1].set_title("pseudo Dice (validation)")
    axes[1].set_xlabel("epoch")
    if series.get("lrs"):
        axes[2].plot(_x(series, "lrs"), series["lrs"], "k-", marker="o", ms=3)
    axes[2].set_title("learning rate")
    axes[2].set_xlabel("epoch")
    for ax in axes[:2]:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    out.append(_save(fig, Path(out_dir) / "nnunet_curves.png"))
    aux = {k: v for k, v in series.items() if not k.endswith("__epochs") and any(a in k for a in _AUX) and v}
    if aux:
        out.append(_plot_aux({k: (_x(series, k), v) for k, v in aux.items()}, Path(out_dir) / "nnunet_aux.png",
                             title, "epoch"))
    extra = {k: v for k, v in series.items() if k not in _STANDARD and k not in aux and not k.endswith("__epochs")
             and v and all(isinstance(x, numbers.Real) for x in v)}
    if extra:
        fig, ax = plt.subplots(1, 1, figsize=(6, 3.2))
        for k, v in extra.items():
            ax.plot(_x(series, k), v, "o-", ms=3, lw=1, label=k)
        ax.set_title("other values the trainer logged")
        ax.set_xlabel("epoch")
        ax.legend(fontsize=6)
        fig.suptitle(title, fontsize=9)
        out.append(_save(fig, Path(out_dir) / "nnunet_extra.png"))
    return out


def _plot_aux(aux: dict[str, tuple[list, list]], out_png: Path, title: str, xlabel: str) -> Path:
    plt = _plt()
    lines = []
    for name, (x, y) in aux.items():
        arr = np.array([np.atleast_1d(np.asarray(v, dtype=float)).ravel() for v in y])
        lines += [(x[: len(arr)], arr[:, c], name if arr.shape[1] == 1 else f"{name}[{c}]") for c in range(arr.shape[1])]
    ncol = (len(lines) + 19) // 20
    fig, ax = plt.subplots(1, 1, figsize=(6 + 2.4 * ncol, max(3.2, 1.2 + 0.16 * min(len(lines), 20))))
    for x, y, label in lines:
        ax.plot(x, y, marker="o", ms=3, lw=1, label=label)
    ax.set_title("cross-stitch alphas / uncertainty weights")
    ax.set_xlabel(xlabel)
    ax.legend(fontsize=6, ncol=ncol, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.suptitle(title, fontsize=9)
    return _save(fig, out_png)


def plot_detectron_metrics(records: list[dict], out_dir: Path, title: str) -> list[Path]:
    """``detectron_curves.png`` (total and per-head losses, learning rate, evaluation AP over
    iterations) and, when logged, ``detectron_aux.png`` (alpha / log_var / sigma)."""
    plt = _plt()
    keys = list(dict.fromkeys(k for r in records for k in r))

    def series(k):
        pts = [(r["iteration"], r[k]) for r in records if isinstance(r.get(k), (int, float, list))]
        return [p[0] for p in pts], [p[1] for p in pts]

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    for k in keys:
        if k == "total_loss" or k.startswith("loss"):
            x, y = series(k)
            if x and all(isinstance(v, (int, float)) for v in y):
                axes[0].plot(x, y, lw=2 if k == "total_loss" else 1, label=k)
        elif k == "lr":
            axes[1].plot(*series(k), "k-")
        elif "/AP" in k and not k.split("/AP")[1].startswith("-"):
            x, y = series(k)
            axes[2].plot(x, y, "o-", label=k)
    for ax, t in zip(axes, ["losses", "learning rate", "evaluation AP"]):
        ax.set_title(t)
        ax.set_xlabel("iteration")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6)
    fig.suptitle(title, fontsize=9)
    out = [_save(fig, Path(out_dir) / "detectron_curves.png")]
    aux = {k: series(k) for k in keys if any(a in k for a in _AUX)}
    if aux:
        out.append(_plot_aux(aux, Path(out_dir) / "detectron_aux.png", title, "iteration"))
    return out
