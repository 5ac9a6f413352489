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
                known = {k.lower() for k in series}                 # heatmap_RMSE (log) is heatmap_rmse
                extra = {k: v for k, v in from_logs.items() if k.removesuffix("__epochs").lower() not in known}
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


def _quantity(name: str) -> str:
    """The quantity (axis) of a logged value, from its name: distances in mm (``..._mm``) share an
    axis; anything else (a task's loss, a heatmap RMSE: different scales) gets its own."""
    low = name.lower()
    return "distance (mm)" if low.endswith("_mm") or "_mm_" in low else name


def _grid(plt, n: int, width: float = 3.2, height: float = 2.4, ncols: int = 4, sharey: bool = False):
    """``n`` small panels in rows of ``ncols`` (unused cells removed); returns (fig, axes list)."""
    ncols = max(1, min(ncols, n))
    nrows = (n + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows + 0.4), squeeze=False,
                             sharey=sharey)
    flat = list(axes.ravel())
    for ax in flat[n:]:
        fig.delaxes(ax)
    return fig, flat[:n]


def nnunet_figures(series: dict[str, list], title: str) -> dict:
    """The figures of an nnU-Net run, one quantity per axis: ``nnunet_curves`` (loss | pseudo Dice
    | learning rate), ``nnunet_aux`` when alphas / uncertainty weights are logged
    (:func:`aux_figure`), ``nnunet_extra`` when a trainer logs other numbers (one panel per
    quantity: distances in mm together, every other name its own). ``{name: matplotlib Figure}``."""
    plt = _plt()
    figures = {}
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    for key, style in [("train_losses", "b-"), ("val_losses", "r-")]:
        if series.get(key):
            axes[0].plot(_x(series, key), series[key], style, marker="o", ms=3, label=key)
    dice = series.get("dice_per_class_or_region")
    if dice:
        arr = np.array([np.atleast_1d(d) for d in dice], dtype=float)
        for c in range(arr.shape[1]):
            axes[1].plot(_x(series, "dice_per_class_or_region"), arr[:, c], marker="o", ms=2, label=f"class {c + 1}", lw=1)
    for key, style in [("mean_fg_dice", "g:"), ("ema_fg_dice", "g-")]:
        if series.get(key):
            axes[1].plot(_x(series, key), series[key], style, marker="o", ms=3, label=key, lw=2)
    if series.get("lrs"):
        axes[2].plot(_x(series, "lrs"), series["lrs"], "k-", marker="o", ms=3)
    for ax, t, y in zip(axes, ["loss", "pseudo Dice (validation)", "learning rate"], ["loss", "Dice", "learning rate"]):
        ax.set_title(t)
        ax.set_xlabel("epoch")
        ax.set_ylabel(y)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    figures["nnunet_curves"] = fig
    aux = {k: v for k, v in series.items() if not k.endswith("__epochs") and any(a in k for a in _AUX) and v}
    if aux:
        figures["nnunet_aux"] = aux_figure({k: (_x(series, k), v) for k, v in aux.items()}, title, "epoch")
    extra = {k: v for k, v in series.items() if k not in _STANDARD and k not in aux and not k.endswith("__epochs")
             and v and all(isinstance(x, numbers.Real) for x in v)}
    if extra:
        groups: dict[str, list[str]] = {}
        for k in extra:
            groups.setdefault(_quantity(k), []).append(k)
        fig, axes = _grid(plt, len(groups), width=4.0, height=2.8, ncols=3)
        for ax, (quantity, names) in zip(axes, groups.items()):
            for k in names:
                ax.plot(_x(series, k), extra[k], "o-", ms=3, lw=1, label=k)
            ax.set_title(quantity if len(names) > 1 else names[0], fontsize=9)
            ax.set_xlabel("epoch")
            ax.set_ylabel(quantity)
            if len(names) > 1:
                ax.legend(fontsize=6)
        fig.suptitle(f"{title}: other values the trainer logged", fontsize=9)
        figures["nnunet_extra"] = fig
    return figures


def plot_nnunet_progress(series: dict[str, list], out_dir: Path, title: str) -> list[Path]:
    """``nnunet_curves.png``, and ``nnunet_aux.png`` / ``nnunet_extra.png`` when there is something
    to show (:func:`nnunet_figures`). Returns the files written."""
    return [_save(fig, Path(out_dir) / f"{name}.png") for name, fig in nnunet_figures(series, title).items()]


_STAGE = re.compile(r"^cross_stitch/(?P<stage>[^/]+)/(?P<alpha>[^/]+)$")


def aux_panels(aux: dict[str, tuple[list, list]]) -> dict[str, dict]:
    """Group alpha / uncertainty series into panels, one quantity each: HMR-Net's
    ``cross_stitch/<stage>/a<rc>`` one panel per stage (its four alphas), log variances together,
    sigmas together, any other alpha series its own panel (a list-valued series: one line per
    component). ``{panel title: {"ylabel", "lines": [(x, y, label)]}}`` in first-seen order."""
    panels: dict[str, dict] = {}
    for name, (x, y) in aux.items():
        arr = np.array([np.atleast_1d(np.asarray(v, dtype=float)).ravel() for v in y])
        m = _STAGE.match(name)
        if m:
            title, ylabel, label = f"cross-stitch {m['stage']}", "alpha", m["alpha"]
        elif "log_var" in name:
            title, ylabel, label = "uncertainty log variances", "log variance", name
        elif "sigma" in name:
            title, ylabel, label = "uncertainty sigmas", "sigma", name
        else:
            title, ylabel, label = name, "alpha", name
        panel = panels.setdefault(title, {"ylabel": ylabel, "lines": []})
        for c in range(arr.shape[1]):
            panel["lines"].append((list(x[: len(arr)]), arr[:, c], label if arr.shape[1] == 1 else f"{label}[{c}]"))
    return panels


def aux_figure(aux: dict[str, tuple[list, list]], title: str, xlabel: str):
    """Small multiples of :func:`aux_panels`: one panel per cross-stitch stage (the alphas of all
    stages on one shared y scale, so stages compare at a glance), one per other quantity."""
    plt = _plt()
    panels = aux_panels(aux)
    fig, axes = _grid(plt, len(panels))
    alpha_axes = [ax for ax, p in zip(axes, panels.values()) if p["ylabel"] == "alpha"]
    for ax, (name, panel) in zip(axes, panels.items()):
        for x, y, label in panel["lines"]:
            ax.plot(x, y, marker="o", ms=2, lw=1, label=label)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(panel["ylabel"])
        first_alpha = bool(alpha_axes) and ax is alpha_axes[0]
        if len(panel["lines"]) > 1 and (first_alpha or ax not in alpha_axes):     # stages share the a<rc> legend
            ax.legend(fontsize=6)
    if len(alpha_axes) > 1:
        lo = min(min(np.nanmin(l.get_ydata()) for l in ax.get_lines()) for ax in alpha_axes)
        hi = max(max(np.nanmax(l.get_ydata()) for l in ax.get_lines()) for ax in alpha_axes)
        pad = 0.05 * (hi - lo) if hi > lo else 0.05
        for ax in alpha_axes:
            ax.set_ylim(lo - pad, hi + pad)
    fig.suptitle(f"{title}: cross-stitch alphas / uncertainty weights", fontsize=9)
    return fig


def detectron_figures(records: list[dict], title: str) -> dict:
    """``detectron_curves`` (losses | learning rate | evaluation AP over iterations, one quantity
    per axis) and ``detectron_aux`` when alphas / uncertainty weights are logged (:func:`aux_figure`)."""
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
    for ax, t, y in zip(axes, ["losses", "learning rate", "evaluation AP"], ["loss", "learning rate", "AP (0-100)"]):
        ax.set_title(t)
        ax.set_xlabel("iteration")
        ax.set_ylabel(y)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6)
    fig.suptitle(title, fontsize=9)
    figures = {"detectron_curves": fig}
    aux = {k: series(k) for k in keys if any(a in k for a in _AUX)}
    if aux:
        figures["detectron_aux"] = aux_figure(aux, title, "iteration")
    return figures


def plot_detectron_metrics(records: list[dict], out_dir: Path, title: str) -> list[Path]:
    """``detectron_curves.png`` and, when logged, ``detectron_aux.png`` (:func:`detectron_figures`)."""
    return [_save(fig, Path(out_dir) / f"{name}.png") for name, fig in detectron_figures(records, title).items()]
