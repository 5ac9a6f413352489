"""Shared machinery of the converters: one-line errors, atomic output folders, checked image I/O,
parallel per-case execution with a progress bar, and the nnU-Net raw dataset writer."""
from __future__ import annotations

import functools
import json
import os
import re
import shutil
import tempfile
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import SimpleITK as sitk
from tqdm import tqdm

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
GEOMETRY_TOL = 1e-4  # mm / direction cosine; NIfTI stores geometry in float32


class ConversionError(Exception):
    """Bad input: the message is one line naming the file and the problem (CLI exit code 2)."""


def strip_image_suffix(name: str) -> str:
    for suffix in IMAGE_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def read_image(path: Path) -> sitk.Image:
    """Read with SimpleITK; unreadable/truncated files and NaN/Inf voxels raise ConversionError."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{path}: file not found")
    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError as e:
        first = str(e).strip().splitlines()[-1] if str(e).strip() else "unreadable"
        raise ConversionError(f"{path}: cannot be read as an image ({first[:160]})") from None
    if img.GetPixelID() in (sitk.sitkFloat32, sitk.sitkFloat64):
        arr = sitk.GetArrayViewFromImage(img)
        if not np.isfinite(arr).all():
            raise ConversionError(f"{path}: contains NaN or Inf intensities")
    return img


def read_header(path: Path) -> sitk.ImageFileReader:
    """Image information only (size, spacing, origin, direction: the ``sitk.Image`` getters), voxels
    left unread; an unreadable file raises ConversionError."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        raise ConversionError(f"{path}: cannot be read as an image") from None
    return reader


def same_geometry(a: sitk.Image, b: sitk.Image, tol: float = GEOMETRY_TOL) -> bool:
    if (a.GetSize(), a.GetSpacing(), a.GetOrigin(), a.GetDirection()) == \
            (b.GetSize(), b.GetSpacing(), b.GetOrigin(), b.GetDirection()):
        return True                                   # the usual case, without numpy's overhead
    return (a.GetSize() == b.GetSize()
            and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=tol)
            and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=tol)
            and np.allclose(a.GetDirection(), b.GetDirection(), atol=tol))


def check_geometry(reference: sitk.Image, img: sitk.Image, path: Path, reference_path: Path) -> None:
    if img.GetSize() != reference.GetSize():
        raise ConversionError(f"{path}: size {img.GetSize()} differs from {reference_path.name} "
                              f"{reference.GetSize()}")
    if not same_geometry(reference, img):
        raise ConversionError(f"{path}: spacing/origin/direction differ from {reference_path.name}")


def read_binary_mask(path: Path, reference: sitk.Image, reference_path: Path) -> np.ndarray:
    """A structure mask as bool (z, y, x); must match the image grid, hold only 0 and one other
    value, and not be empty (an empty structure file is reported, not taken as "absent")."""
    img = read_image(path)
    check_geometry(reference, img, path, reference_path)
    arr = sitk.GetArrayViewFromImage(img)
    low, high = arr.min(), arr.max()
    nonzero = arr != 0
    if low != high and not (low == 0 and (arr[nonzero] == high).all()):   # not {0, v}: name the values
        values = np.unique(arr)
        shown = ", ".join(str(v) for v in values[:6])
        raise ConversionError(f"{path}: mask is not binary (values {shown}{'...' if len(values) > 6 else ''})")
    if low == high == 0:
        raise ConversionError(f"{path}: mask is empty")
    return nonzero


def copy_geometry(array: np.ndarray, reference: sitk.Image) -> sitk.Image:
    img = sitk.GetImageFromArray(array)
    img.CopyInformation(reference)
    return img


def write_image(img: sitk.Image, path: Path) -> None:
    sitk.WriteImage(img, str(path), useCompression=True)


@contextmanager
def atomic_output_dir(target: Path, overwrite: bool):
    """Yield a temporary folder next to ``target``; move it into place only if the block succeeds.

    An existing ``target`` is refused unless ``overwrite``. A failed run removes its temporary
    folder; a killed one (``kill -9``) leaves a hidden ``.<target>.tmp-...-<pid>`` folder, or, if
    killed while replacing an old output, ``.<target>.old-<pid>``, which the next run removes (or,
    when ``target`` itself is gone, moves back first) once that pid is no longer running, so a
    re-run always starts from the last complete output or none.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale(target)
    if target.exists() and not overwrite:
        raise ConversionError(f"{target}: already exists (use --overwrite to replace it)")
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", suffix=f"-{os.getpid()}", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            old = target.parent / f".{target.name}.old-{os.getpid()}"
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _clean_stale(target: Path) -> None:
    """Remove what killed runs left beside ``target`` (see :func:`atomic_output_dir`)."""
    for stale in sorted(target.parent.glob(f".{target.name}.old-*")):
        if stale.is_dir() and not _pid_alive(stale.name.rsplit("-", 1)[-1]):
            if not target.exists():
                stale.rename(target)               # killed between the two renames: the old output
            else:
                shutil.rmtree(stale, ignore_errors=True)
    for stale in target.parent.glob(f".{target.name}.tmp-*"):
        if stale.is_dir() and not _pid_alive(stale.name.rsplit("-", 1)[-1]):
            shutil.rmtree(stale, ignore_errors=True)


def _pid_alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def run_cases(fn: Callable, items: list, jobs: int = 1, desc: str = "cases", case: Callable | None = None) -> list:
    """``[fn(item) for item in items]``, in ``jobs`` processes, with a tqdm bar; order kept; the
    first error stops the run (``case`` is accepted for :class:`CaseRunner`'s signature)."""
    if jobs <= 1 or len(items) <= 1:
        return [fn(item) for item in tqdm(items, desc=desc, unit="case")]
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        return list(tqdm(pool.map(fn, items), total=len(items), desc=desc, unit="case"))


def _guarded(fn: Callable, item):
    """``("ok", fn(item))`` or ``("failed", one-line message)`` for a ConversionError."""
    try:
        return "ok", fn(item)
    except ConversionError as e:
        return "failed", " ".join(str(e).split())


@dataclass
class CaseFailure:
    """A case left out because its input is bad (``error``: one line naming the file and problem)."""

    case: str
    split: str
    error: str

    def as_dict(self) -> dict:
        return {"case": self.case, "split": self.split, "error": self.error}


class CaseRunner:
    """The ``run_cases`` a converter receives: one bad case must not cost the others.

    ``runner(fn, items, desc=..., case=lambda item: case_id)`` runs ``fn`` on every item (in
    ``jobs`` processes) and returns the results of the items that did not raise
    :class:`ConversionError`, in order. A failed item is recorded in :attr:`failures` and its
    files are removed from :attr:`out` (``images*/<case>_XXXX.*``, ``labels*/<case>.*``,
    ``landmarks/<case>.json``), so the output holds only whole cases; an item whose case already
    failed (in an earlier pass over the same cases) is skipped. When every item of a call fails
    the conversion stops (nothing converted). ``strict=True``: the first error stops the run.
    Errors other than ConversionError (bugs, a full disk) always stop it.
    """

    def __init__(self, jobs: int = 1, strict: bool = False, out: Path | None = None):
        self.jobs, self.strict, self.out = jobs, strict, out
        self.split = "train"
        self.failures: list[CaseFailure] = []

    def failed(self, case: str) -> bool:
        return any(f.case == case and f.split == self.split for f in self.failures)

    def __call__(self, fn: Callable, items: list, jobs: int | None = None, desc: str = "cases",
                 case: Callable | None = None) -> list:
        jobs = self.jobs if jobs is None else jobs
        if self.strict or case is None:
            return run_cases(fn, items, jobs=jobs, desc=desc)
        todo = [item for item in items if not self.failed(case(item))]
        outcomes = run_cases(functools.partial(_guarded, fn), todo, jobs=jobs, desc=desc)
        results = []
        for item, (status, value) in zip(todo, outcomes):
            if status == "ok":
                results.append(value)
                continue
            self.failures.append(CaseFailure(case(item), self.split, value))
            self._remove_case_files(case(item))
        if todo and not results:
            first = self.failures[-len(todo)].error
            raise ConversionError(first if len(todo) == 1 else
                                  f"no case converted: all {len(todo)} cases failed (first: {first})")
        return results

    def _remove_case_files(self, case: str) -> None:
        if self.out is None or not Path(self.out).is_dir():
            return
        pattern = re.compile(rf"^{re.escape(case)}(_\d{{4}})?(\.[A-Za-z0-9.]+)$")
        for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs", "landmarks"):
            folder = Path(self.out) / sub
            if folder.is_dir():
                for p in folder.iterdir():
                    m = pattern.match(p.name)
                    if m and (sub.startswith("images") == bool(m.group(1)) or sub == "landmarks"):
                        p.unlink()


def dataset_folder_name(dataset_id: int, name: str) -> str:
    if not 1 <= dataset_id <= 999:
        raise ConversionError(f"--dataset-id {dataset_id}: must be between 1 and 999")
    if not re.fullmatch(r"[A-Za-z0-9_\-]+", name):
        raise ConversionError(f"--name {name!r}: use letters, digits, '_' or '-'")
    return f"Dataset{dataset_id:03d}_{name}"


def nnunet_target(root: Path | None, dataset_id: int, name: str, overwrite: bool) -> Path:
    """``<nnUNet_raw or root>/DatasetXXX_Name``; refuses a different dataset with the same id."""
    if root is None:
        raw = os.environ.get("nnUNet_raw")
        if not raw:
            raise ConversionError("nnUNet_raw is not set: export it or pass --out")
        root = Path(raw)
    folder = dataset_folder_name(dataset_id, name)
    if Path(root).is_dir():
        for other in Path(root).glob(f"Dataset{dataset_id:03d}_*"):
            if other.name != folder and other.is_dir():
                raise ConversionError(f"{other}: dataset id {dataset_id} is already used by another dataset")
    return Path(root) / folder


def write_dataset_json(folder: Path, channel_names: dict, labels: dict, num_training: int,
                       file_ending: str, name: str, description: str, **extra) -> None:
    """dataset.json through nnU-Net's own generator (extra keys are kept, as nnU-Net allows)."""
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json

    generate_dataset_json(str(folder), channel_names=channel_names, labels=labels,
                          num_training_cases=num_training, file_ending=file_ending, dataset_name=name,
                          description=description, converted_by="organmtl", license="see source dataset",
                          **extra)


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def find_files(folder: Path, what: str) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise ConversionError(f"{folder}: {what} folder not found")
    return sorted(p for p in folder.iterdir() if p.name.endswith(IMAGE_SUFFIXES))


def unique_ids(pairs: Iterable[tuple[str, Path]]) -> None:
    seen: dict[str, Path] = {}
    for case, path in pairs:
        if case in seen:
            raise ConversionError(f"{path}: duplicate case id {case!r} (also {seen[case]})")
        seen[case] = path


# ---------------------------------------------------------------- structures -> one label map
# (the ``--missing`` logic of PDDCA, generalised for every source with one mask file per structure)

MISSING_POLICIES = ("drop", "ignore", "background")


def add_missing_argument(parser, default: str = "drop") -> None:
    """The ``--missing drop|ignore|background`` option (see :func:`apply_missing_policy`)."""
    parser.add_argument("--missing", choices=MISSING_POLICIES, default=default,
                        help=f"what to do with cases lacking a structure file (default: {default})")


def structure_labels(names: list[str], missing: str) -> dict[str, int]:
    """nnU-Net labels for structure ``names``: background 0, the names 1..n in the given order, and
    nnU-Net's ``ignore`` label (n + 1, the highest value as nnU-Net requires) under ``--missing ignore``."""
    labels = {"background": 0, **{n: i for i, n in enumerate(names, start=1)}}
    if missing == "ignore":
        labels["ignore"] = len(names) + 1
    return labels


def paint_structures(shape, masks: Iterable[tuple[str, np.ndarray]], labels: dict[str, int]):
    """One uint8 label map from ``(name, bool mask)`` pairs (read lazily, one at a time).

    A later pair overwrites an earlier one where they overlap; returns ``(label_map, overlaps)``
    with ``overlaps = {name: voxels it took over}`` for the conversion report.
    """
    seg = np.zeros(shape, np.uint8)
    overlaps = {}
    for name, mask in masks:
        clash = mask & (seg > 0)
        if clash.any():
            overlaps[name] = int(clash.sum())
        seg[mask] = labels[name]
    return seg, overlaps


def apply_missing_policy(seg: np.ndarray, missing: list[str], policy: str, labels: dict[str, int]) -> str:
    """Decide what happens to a case lacking the structures ``missing``; returns the report's action.

    ``drop``: the case is left out; ``ignore``: every voxel not annotated as another structure gets
    nnU-Net's ignore label (``seg`` is changed in place), so the case never teaches "background"
    where the missing organ lies; ``background``: kept as is (explicit opt-in).
    """
    if not missing:
        return "kept"
    if policy == "drop":
        return "dropped"
    if policy == "ignore":
        seg[seg == 0] = labels["ignore"]
        return "kept, unannotated voxels set to the ignore label"
    return "kept, missing structures counted as background"


# ---------------------------------------------------------------- truncated NIfTI files
# ITK reads a NIfTI file (plain or gzip) whose voxel data stop early without an error, filling the
# rest with zeros; NRRD and MetaImage readers do report it.

def _nifti_data_end(header: bytes) -> int | None:
    """Byte offset where a NIfTI-1/-2 file's voxel data end (``vox_offset`` + voxels x bitpix / 8)."""
    import struct

    for e in "<>":
        if len(header) >= 348 and struct.unpack(e + "i", header[:4])[0] == 348:
            dims = struct.unpack(e + "8h", header[40:56])
            bitpix, vox_offset = struct.unpack(e + "h", header[72:74])[0], struct.unpack(e + "f", header[108:112])[0]
        elif len(header) >= 540 and struct.unpack(e + "i", header[:4])[0] == 540:
            dims = struct.unpack(e + "8q", header[16:80])
            bitpix, vox_offset = struct.unpack(e + "h", header[14:16])[0], struct.unpack(e + "q", header[168:176])[0]
        else:
            continue
        if not 1 <= dims[0] <= 7:
            return None
        return int(vox_offset) + int(np.prod(dims[1: dims[0] + 1], dtype=np.int64)) * bitpix // 8
    return None


def check_nifti_complete(path: Path) -> None:
    """Raise ConversionError when a ``.nii``/``.nii.gz`` file is shorter than its header says, or its
    gzip stream is cut off; other formats are left to their readers."""
    import zlib

    path = Path(path)
    if not path.name.endswith((".nii", ".nii.gz")):
        return
    head, length = b"", 0
    with open(path, "rb") as f:
        if path.name.endswith(".gz"):
            inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
            while chunk := f.read(1 << 20):
                data = inflate.decompress(chunk)
                head += data[: 540 - len(head)]
                length += len(data)
            if not inflate.eof:
                raise ConversionError(f"{path}: truncated file (gzip stream ends early)")
        else:
            head = f.read(540)
            length = path.stat().st_size
    end = _nifti_data_end(head)
    if end is not None and length < end:
        raise ConversionError(f"{path}: truncated file ({length} bytes, its header needs {end})")
