"""Two partially labelled phantom sets of the same anatomy, plus full truth for evaluation only
(docs/partial_labels.md).

The abdomen phantoms of :mod:`organmtl.demo_data.abdomen` (fat/water MR, six organs) are split
between two "annotators", each labelling only its own organs on its own scans; the organs it did not
label are background in its label maps, as in real partially labelled datasets (CHAOS and VISCERAL
both show liver and kidneys but label different organs)::

    liver_kidneys/                 images/<case>_0000|0001.nii.gz, labels/<case>.nii.gz, mapping.json
    spleen_pancreas_bladder/       (the same layout, other scans)
    full_truth/                    held-out scans with all six organs: for evaluation only, never for training

Each annotator folder is a generic ``volumes`` folder (``organmtl convert volumes``). The full-truth
label values are those ``organmtl convert merge`` gives when ``liver_kidneys`` is merged first
(:data:`MERGED_LABELS`), so predictions of the merged model are scored against them directly.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from organmtl.demo_data.abdomen import make_case
from organmtl.demo_data.shapes import write

#: annotator -> the organs it labels (label values 1.. in this order)
ANNOTATORS = {"liver_kidneys": ("liver", "kidney_left", "kidney_right"),
              "spleen_pancreas_bladder": ("spleen", "pancreas", "bladder")}
FULL_TRUTH = "full_truth"
#: label values of the merge (annotators in :data:`ANNOTATORS` order) and of the full-truth maps
MERGED_LABELS = {"background": 0, **{o: v for v, o in enumerate((o for os_ in ANNOTATORS.values() for o in os_), 1)}}
CHANNELS = {"0": "fat", "1": "water"}


def _write_case(folder: Path, case: str, fat, water, masks, g, organs) -> None:
    write(g.image(fat, np.int16), folder / "images" / f"{case}_0000.nii.gz")
    write(g.image(water, np.int16), folder / "images" / f"{case}_0001.nii.gz")
    labels = np.zeros(g.shape, np.uint8)
    for organ, value in organs.items():
        labels[masks[organ]] = value
    write(g.image(labels, np.uint8), folder / "labels" / f"{case}.nii.gz")


def _mapping(folder: Path, labels: dict, note: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "mapping.json").write_text(json.dumps({"channel_names": CHANNELS, "labels": labels, "note": note},
                                                    indent=2) + "\n")


def write_abdomen_partial(out: Path, n_cases: int, seed: int, n_test: int | None = None) -> dict[str, list[str]]:
    """``n_cases`` scans per annotator (different scans for each) and ``n_test`` (default
    ``max(2, n_cases // 2)``) held-out full-truth scans; returns ``{folder: case ids}``."""
    out = Path(out)
    n_test = max(2, n_cases // 2) if n_test is None else n_test
    index: dict[str, list[str]] = {}
    k = 0
    for a, (annotator, organs) in enumerate(ANNOTATORS.items()):
        values = {o: v for v, o in enumerate(organs, start=1)}
        _mapping(out / annotator, {"background": 0, **values},
                 f"partially labelled: only {', '.join(organs)}; every other organ is background here")
        index[annotator] = []
        for i in range(n_cases):
            fat, water, masks, g, _ = make_case(np.random.default_rng([seed, 8, k]))
            case = f"{annotator[:2]}{i:03d}"
            _write_case(out / annotator, case, fat, water, masks, g, values)
            index[annotator].append(case)
            k += 1
    full = {o: v for o, v in MERGED_LABELS.items() if o != "background"}
    _mapping(out / FULL_TRUTH, dict(MERGED_LABELS), "evaluation only: all organs, in the label values of "
             "`convert merge liver_kidneys spleen_pancreas_bladder`")
    index[FULL_TRUTH] = []
    for i in range(n_test):
        fat, water, masks, g, _ = make_case(np.random.default_rng([seed, 9, i]))
        case = f"ft{i:03d}"
        _write_case(out / FULL_TRUTH, case, fat, water, masks, g, full)
        index[FULL_TRUTH].append(case)
    return index


def convert_commands(folder: Path, merged_id: int, name: str = "PartialAbdomen",
                     shared_labels: bool = False) -> tuple[list[list[str]], str]:
    """The ``organmtl`` command lines that turn :func:`write_abdomen_partial`'s ``folder`` into one
    merged raw dataset: ``convert volumes`` per annotator (ids ``merged_id + 1``, ``+ 2``), then
    ``convert merge`` (``merged_id``). Returns ``(commands, merged dataset folder name)``; the
    ``--out``/``nnUNet_raw`` folder is the caller's. The full truth is never converted."""
    folder = Path(folder)
    sources = [f"Dataset{merged_id + k:03d}_{a}" for k, a in enumerate(ANNOTATORS, start=1)]
    cmds = [["convert", "volumes", str(folder / a), "--dataset-id", str(merged_id + k), "--name", a]
            for k, a in enumerate(ANNOTATORS, start=1)]
    merge = ["convert", "merge", *[f"{{raw}}/{s}" for s in sources], "--dataset-id", str(merged_id), "--name", name]
    cmds.append(merge + (["--shared-labels"] if shared_labels else []))
    return cmds, f"Dataset{merged_id:03d}_{name}"
