"""Several nnU-Net raw datasets -> one multi-task dataset (Moeskops et al. 2016, §3.1-3.2; docs/multitask_cnn.md).

Moeskops et al. train one network on tasks of different modality and anatomy with one softmax
over the union of the tasks' classes, "background classes of the target tasks ... merged into one
class" (§3.2; "a background class common among tasks", Fig. 1). This converter builds that label
space for nnU-Net:

- label 0 is the one shared background; each source's other labels follow the previous sources'
  labels, numbered consecutively in the order of their source values; a name used by two sources
  is prefixed with the task name (``brain_CSF``) in every source that uses it, or, with
  ``--shared-labels``, the same-named labels become one label;
- a source's ``ignore`` label becomes one shared ignore label, the highest value (nnU-Net's rule);
- case ids are prefixed with the task name (``<task>_<case>``); images are copied byte for byte
  (rewritten when the source's file ending differs from ``--file-ending``); label maps are
  remapped voxel for voxel; ``imagesTs``/``labelsTs`` and ``landmarks/`` are carried over;
- every source must have the same number of channels; a channel the sources name differently is
  named ``mixed_<name>_<name>...``, which nnU-Net normalises per image (z-score), never with one
  intensity model pooled over modalities as its ``CT`` scheme would;
- ``dataset.json`` gets ``organmtl_tasks`` (per task: source, labels, label values, cases, test
  cases, channel names, the source's ``organmtl_*`` keys), ``organmtl_annotated_labels``
  (:data:`ANNOTATED_KEY`: per case, the merged label values its source annotated, which the
  partial-label trainers and ``organmtl evaluate --annotated-only`` read; docs/partial_labels.md),
  and ``label_remapping.json`` holds ``{task: {source value: merged value}}``.

The task name is the ``Name`` of the source folder ``DatasetXXX_Name`` (or the folder's name).
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from organmtl.converters.command import SourceConverter
from organmtl.converters.common import (ConversionError, check_geometry, check_nifti_complete, copy_geometry,
                                        read_header, read_image, unique_ids, write_image, write_json)

_DATASET_FOLDER = re.compile(r"^Dataset\d{3}_(?P<name>.+)$")
_TASK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]*$")
_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
#: dataset.json key: ``{merged case: [merged label values its source annotated]}`` (background and
#: ignore excluded; a label merged by ``--shared-labels`` is listed for every source that has it)
ANNOTATED_KEY = "organmtl_annotated_labels"


@dataclass(frozen=True)
class Source:
    """One nnU-Net raw dataset to merge."""

    path: Path
    task: str
    meta: dict                  # its dataset.json
    labels: dict[str, int]      # validated: background 0, integers, ignore (if any) the highest

    @property
    def ending(self) -> str:
        return self.meta["file_ending"]

    @property
    def channel_names(self) -> list[str]:
        return [self.meta["channel_names"][str(c)] for c in range(len(self.meta["channel_names"]))]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shared-labels", action="store_true",
                        help="merge labels of the same name into one label (default: prefix them with the task name)")


# ---------------------------------------------------------------- reading and checking the sources

def task_name(path: Path) -> str:
    """``Name`` of ``DatasetXXX_Name``, else the folder name; it prefixes case ids, so it must be simple."""
    m = _DATASET_FOLDER.match(path.name)
    name = m["name"] if m else path.name
    if not _TASK_NAME.match(name):
        raise ConversionError(f"{path}: task name {name!r} must use letters, digits, '_' or '-'")
    return name


def check_labels(labels, path: Path) -> dict[str, int]:
    """A source's ``labels``: plain integers (region-based lists are refused), background 0, distinct
    values, and ``ignore`` (if present) the highest."""
    if not isinstance(labels, dict) or not labels:
        raise ConversionError(f"{path}: 'labels' must be a non-empty mapping of names to values")
    for name, value in labels.items():
        if isinstance(value, (list, tuple)):
            raise ConversionError(f"{path}: region-based label {name!r} {value} cannot be merged")
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ConversionError(f"{path}: label {name!r} has the value {value!r}, not a non-negative integer")
    if labels.get("background") != 0:
        raise ConversionError(f"{path}: labels must map 'background' to 0")
    if len(set(labels.values())) != len(labels):
        raise ConversionError(f"{path}: two labels share a value")
    if "ignore" in labels and labels["ignore"] != max(labels.values()):
        raise ConversionError(f"{path}: the ignore label must be the highest value")
    return dict(labels)


def read_source(path: Path) -> Source:
    """Read and check one source dataset's ``dataset.json``."""
    path = Path(path)
    meta_path = path / "dataset.json"
    if not path.is_dir():
        raise ConversionError(f"{path}: dataset folder not found")
    if not meta_path.is_file():
        raise ConversionError(f"{path}: no dataset.json (not an nnU-Net raw dataset)")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"{meta_path}: invalid JSON ({e.msg} at line {e.lineno})") from None
    if "modality" in meta and "channel_names" not in meta:
        raise ConversionError(f"{meta_path}: nnU-Net v1 format; convert it with "
                              f"nnUNetv2_convert_old_nnUNet_dataset first")
    for key in ("channel_names", "labels", "file_ending", "numTraining"):
        if key not in meta:
            raise ConversionError(f"{meta_path}: missing key {key!r}")
    channels = meta["channel_names"]
    if not isinstance(channels, dict) or sorted(channels) != [str(c) for c in range(len(channels))] or not channels:
        raise ConversionError(f"{meta_path}: channel_names must be keyed '0'..'n-1'")
    return Source(path, task_name(path), meta, check_labels(meta["labels"], meta_path))


def merged_channel_names(sources: list[Source]) -> dict[str, str]:
    """The first source's channel names where all agree, ``mixed_<a>_<b>...`` where they differ;
    a different number of channels is an error."""
    first = sources[0]
    for s in sources[1:]:
        if len(s.channel_names) != len(first.channel_names):
            raise ConversionError(f"{s.path / 'dataset.json'}: {len(s.channel_names)} channel(s), "
                                  f"{first.path.name} has {len(first.channel_names)}")
    out = {}
    for c in range(len(first.channel_names)):
        names = list(dict.fromkeys(s.channel_names[c] for s in sources))
        out[str(c)] = names[0] if len(names) == 1 else "mixed_" + "_".join(names)
    return out


# ---------------------------------------------------------------- the union label space

def _merged_names(sources: list[Source], shared: bool) -> dict[str, dict[str, str]]:
    """``{task: {source label name: merged name}}``: names used by several sources are prefixed with
    the task name (unless ``shared``); a prefixed name clashing with another name is an error."""
    counts = Counter(n for s in sources for n in s.labels if n not in ("background", "ignore"))
    names = {s.task: {n: (f"{s.task}_{n}" if counts[n] > 1 and not shared else n)
                      for n in s.labels if n not in ("background", "ignore")} for s in sources}
    owner: dict[str, str] = {}
    for s in sources:
        for old, new in names[s.task].items():
            clash = owner.get(new)
            if new in ("background", "ignore") or (clash is not None and not (shared and old == new)):
                raise ConversionError(f"{s.path / 'dataset.json'}: label {old!r} becomes {new!r}, "
                                      f"which {clash or 'nnU-Net'} already uses; rename one of them")
            owner.setdefault(new, s.task)
    return names


def merge_label_spaces(sources: list[Source], shared: bool = False):
    """Union label space with one background (§3.2): returns ``(labels, remap, task_labels)``.

    ``labels``: merged ``{name: value}``; ``remap``: ``{task: {source value: merged value}}``;
    ``task_labels``: ``{task: [merged names of that task's structures]}``.
    """
    names = _merged_names(sources, shared)
    labels = {"background": 0}
    remap, task_labels = {}, {}
    for s in sources:
        remap[s.task] = {0: 0}
        task_labels[s.task] = []
        for old, value in sorted(s.labels.items(), key=lambda kv: kv[1]):
            if old in ("background", "ignore"):
                continue
            new = names[s.task][old]
            labels.setdefault(new, len(labels))
            remap[s.task][value] = labels[new]
            task_labels[s.task].append(new)
    if any("ignore" in s.labels for s in sources):
        labels["ignore"] = len(labels)
        for s in sources:
            if "ignore" in s.labels:
                remap[s.task][s.labels["ignore"]] = labels["ignore"]
    return labels, remap, task_labels


# ---------------------------------------------------------------- cases of one source

def _images_by_case(folder: Path, ending: str, n_channels: int) -> dict[str, list[Path]]:
    """``<case>_<XXXX><ending>`` files of ``folder`` grouped by case; every channel must be there."""
    cases: dict[str, dict[int, Path]] = {}
    if not folder.is_dir():
        return {}
    for p in sorted(folder.iterdir()):
        if not p.name.endswith(ending):
            continue
        m = _CHANNEL.match(p.name[: -len(ending)])
        if m is None:
            raise ConversionError(f"{p}: image name is not <case>_<XXXX>{ending}")
        cases.setdefault(m["case"], {})[int(m["channel"])] = p
    for case, chans in cases.items():
        if sorted(chans) != list(range(n_channels)):
            raise ConversionError(f"{folder}: case {case!r} has channels {sorted(chans)}, expected 0..{n_channels - 1}")
    return {case: [chans[c] for c in range(n_channels)] for case, chans in sorted(cases.items())}


def _labels_by_case(folder: Path, ending: str) -> dict[str, Path]:
    if not folder.is_dir():
        return {}
    return {p.name[: -len(ending)]: p for p in sorted(folder.iterdir()) if p.name.endswith(ending)}


def source_cases(s: Source) -> dict[str, list[tuple[str, list[Path], Path | None]]]:
    """``{"train": [...], "test": [...]}`` of ``(case, channel images, label map or None)``."""
    n = len(s.channel_names)
    images, labels = _images_by_case(s.path / "imagesTr", s.ending, n), _labels_by_case(s.path / "labelsTr", s.ending)
    if not labels:
        raise ConversionError(f"{s.path / 'labelsTr'}: no label maps ending in {s.ending}")
    for case, p in labels.items():
        if case not in images:
            raise ConversionError(f"{p}: label map without image in imagesTr")
    for case, imgs in images.items():
        if case not in labels:
            raise ConversionError(f"{imgs[0]}: image without label map in labelsTr")
    if s.meta["numTraining"] != len(labels):
        raise ConversionError(f"{s.path / 'dataset.json'}: numTraining is {s.meta['numTraining']}, "
                              f"labelsTr holds {len(labels)} cases")
    test_images = _images_by_case(s.path / "imagesTs", s.ending, n)
    test_labels = _labels_by_case(s.path / "labelsTs", s.ending)
    for case, p in test_labels.items():
        if case not in test_images:
            raise ConversionError(f"{p}: label map without image in imagesTs")
    return {"train": [(c, images[c], labels[c]) for c in labels],
            "test": [(c, imgs, test_labels.get(c)) for c, imgs in test_images.items()]}


# ---------------------------------------------------------------- one case

def remap_label_map(arr: np.ndarray, remap: dict[int, int], path: Path, meta_path: Path) -> np.ndarray:
    """Source label values -> merged values; a value the source's dataset.json does not name is an error."""
    if not np.issubdtype(arr.dtype, np.integer):
        if not np.all(np.mod(arr, 1) == 0):
            raise ConversionError(f"{path}: label map holds non-integer values")
        arr = arr.astype(np.int64)
    present = [int(v) for v in np.unique(arr)]
    unknown = [v for v in present if v not in remap]
    if unknown:
        raise ConversionError(f"{path}: value(s) {unknown[:5]} not in the labels of {meta_path}")
    lut = np.zeros(max(max(remap), max(present)) + 1, np.uint8 if max(remap.values()) < 256 else np.uint16)
    for old, new in remap.items():
        lut[old] = new
    return lut[arr]


def _copy_channel(path: Path, target: Path, reference, reference_path: Path, rewrite: bool) -> None:
    """One channel image: checked against the case's reference grid, then copied byte for byte, or
    read and rewritten when the file ending changes."""
    check_nifti_complete(path)
    img = read_image(path) if rewrite else read_header(path)
    check_geometry(reference, img, path, reference_path)
    target.parent.mkdir(parents=True, exist_ok=True)
    if rewrite:
        write_image(img, target)
    else:
        shutil.copyfile(path, target)


def _merge_case(job) -> dict:
    """Copy one case's images and write its remapped label map; returns the report record."""
    (task, source_case, images, label_path, split, out, remap, meta_path, src_ending, ending) = job
    new_case = f"{task}_{source_case}"
    img_dir, lab_dir = ("imagesTr", "labelsTr") if split == "train" else ("imagesTs", "labelsTs")
    record = {"case": new_case, "task": task, "source_case": source_case, "split": split, "action": "kept"}
    if label_path is not None:
        check_nifti_complete(label_path)
        reference, reference_path = read_image(label_path), label_path
        merged = remap_label_map(sitk.GetArrayFromImage(reference), remap, label_path, meta_path)
        record["labels_present"] = [int(v) for v in np.unique(merged)]
    else:
        reference, reference_path = read_header(images[0]), images[0]
    for c, p in enumerate(images):
        _copy_channel(p, out / img_dir / f"{new_case}_{c:04d}{ending}", reference, reference_path,
                      rewrite=src_ending != ending)
    if label_path is not None:
        (out / lab_dir).mkdir(parents=True, exist_ok=True)
        write_image(copy_geometry(merged, reference), out / lab_dir / f"{new_case}{ending}")
    return record


def _copy_landmarks(s: Source, cases: set[str], out: Path, converted: set[str] | None = None) -> int:
    """``landmarks/<case>.json`` of a source -> ``landmarks/<task>_<case>.json`` for the
    ``converted`` merged case ids (default: all); returns how many."""
    folder = s.path / "landmarks"
    if not folder.is_dir():
        return 0
    n = 0
    for p in sorted(folder.glob("*.json")):
        if p.stem not in cases:
            raise ConversionError(f"{p}: landmark file without image")
        if converted is not None and f"{s.task}_{p.stem}" not in converted:
            continue
        try:
            lm = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ConversionError(f"{p}: invalid JSON ({e.msg} at line {e.lineno})") from None
        lm["case"] = f"{s.task}_{p.stem}"
        write_json(out / "landmarks" / f"{s.task}_{p.stem}.json", lm)
        n += 1
    return n


# ---------------------------------------------------------------- the converter

def _task_entry(s: Source, labels: dict, task_labels: list[str], cases: dict) -> dict:
    return {"source": str(s.path), "labels": task_labels, "label_values": [labels[n] for n in task_labels],
            "cases": [f"{s.task}_{c}" for c, _, _ in cases["train"]],
            "test_cases": [f"{s.task}_{c}" for c, _, _ in cases["test"]],
            "channel_names": s.meta["channel_names"],
            "organmtl_extra": {k: v for k, v in s.meta.items() if k.startswith("organmtl_")}}


def _small_organs(sources: list[Source], names: dict[str, dict[str, str]]) -> list[str]:
    """The sources' ``organmtl_small_organs`` under their merged names."""
    return [names[s.task][n] for s in sources for n in s.meta.get("organmtl_small_organs", [])
            if n in names[s.task]]


def convert(src, out: Path, args, run_cases) -> dict:
    """Merge the datasets ``src`` (a list of folders) into ``out`` (a temporary folder)."""
    if getattr(args, "test", None) is not None:
        raise ConversionError("--test: merge takes test cases from each source's imagesTs/labelsTs")
    paths = [Path(p) for p in (src if isinstance(src, (list, tuple)) else [src])]
    if len(paths) < 2:
        raise ConversionError(f"{paths[0]}: merge needs at least two datasets")
    sources = [read_source(p) for p in paths]
    seen = {}
    for s in sources:
        if s.task in seen:
            raise ConversionError(f"{s.path}: task name {s.task!r} is also that of {seen[s.task]}")
        seen[s.task] = s.path
    channel_names = merged_channel_names(sources)
    labels, remap, task_labels = merge_label_spaces(sources, args.shared_labels)
    cases = {s.task: source_cases(s) for s in sources}
    unique_ids((f"{s.task}_{c}", imgs[0]) for s in sources for split in ("train", "test")
               for c, imgs, _ in cases[s.task][split])
    (out / "imagesTr").mkdir(parents=True)
    (out / "labelsTr").mkdir()
    jobs = [(s.task, c, imgs, lab, split, out, remap[s.task], s.path / "dataset.json", s.ending,
             args.file_ending)
            for s in sources for split in ("train", "test") for c, imgs, lab in cases[s.task][split]]
    records = run_cases(_merge_case, jobs, desc="merge", case=lambda j: f"{j[0]}_{j[1]}")
    done = {r["case"] for r in records}                 # a case that failed is left out everywhere
    n_landmarks = sum(_copy_landmarks(s, {c for split in cases[s.task].values() for c, _, _ in split}, out, done)
                      for s in sources)
    cases = {t: {split: [c for c in rows if f"{t}_{c[0]}" in done] for split, rows in by_split.items()}
             for t, by_split in cases.items()}
    write_json(out / "label_remapping.json",
               {task: {str(k): v for k, v in sorted(table.items())} for task, table in remap.items()})
    names = _merged_names(sources, args.shared_labels)
    extra = {"organmtl_tasks": {s.task: _task_entry(s, labels, task_labels[s.task], cases[s.task])
                                for s in sources}}
    extra[ANNOTATED_KEY] = {f"{s.task}_{c}": [labels[n] for n in task_labels[s.task]]
                            for s in sources for split in ("train", "test") for c, _, _ in cases[s.task][split]}
    small = _small_organs(sources, names)
    if small:
        extra["organmtl_small_organs"] = list(dict.fromkeys(small))
    if n_landmarks:
        extra["organmtl_landmarks"] = "landmarks"
    return {"labels": labels, "channel_names": channel_names,
            "num_training": sum(len(cases[s.task]["train"]) for s in sources),
            "cases": records, "dataset_json_extra": extra}


CONVERTER = SourceConverter("merge", "several nnU-Net raw datasets -> one multi-task dataset (shared background)",
                            add_arguments, convert, many_sources=True)
