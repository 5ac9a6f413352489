"""CT series without contours (new patients) -> nnU-Net ``imagesTs``, and the series finder that
``organmtl predict`` uses (docs/predict.md).

Input: a folder (one patient or many, any depth, any file names: loose files as exported, or a
media folder with a ``DICOMDIR``), or a ``DICOMDIR`` file (then only the files its records
reference are read). Every file is read as :func:`organmtl.converters.dicom_rt.read_dicom` reads
it (headers only) and sorted out by :func:`organmtl.converters.dicom_rt.classify`: CT Image
Storage slices are grouped by SeriesInstanceUID, one series = one case; RTSTRUCTs, plans, doses,
localizers, other SOP classes and non-DICOM files are skipped and listed; a file that cannot be
read (corrupt DICOM) is listed with its reason and costs only the series it belonged to.

Each series is checked and read as ``convert dicom-rt`` reads its CT: slices sorted along the
normal and checked by :func:`~organmtl.converters.dicom_rt.sort_slices`, pixels read by
SimpleITK's series reader (GDCM: uncompressed and compressed transfer syntaxes such as JPEG 2000
lossless, JPEG-LS, JPEG lossless and RLE), rescaled to HU, and the slices must share one
non-empty FrameOfReferenceUID (the export needs it). A series failing any check is reported and
the others go on (exit 1).

Case ids: the sanitised PatientID (``patient`` when empty); a patient with several CT series gets
``<PatientID>_s<SeriesNumber>`` (or ``_s<k>``), and a clash gets ``_<n>`` appended.

``organmtl convert dicom-ct SRC --out DIR`` writes ``DIR/imagesTs/<case>_0000.nii.gz`` and
``DIR/conversion_report.json`` whose case records carry the ``source`` block of ``convert
dicom-rt`` (``ct_series_folder``, ``ct_files``, ``series_instance_uid``,
``frame_of_reference_uid``, ``sop_instance_uids``, ...): ``nnUNetv2_predict -i DIR/imagesTs`` then
``organmtl export rtstruct PRED --out OUT`` finds each case's series through it.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
import SimpleITK as sitk

from organmtl.converters.common import (CaseRunner, ConversionError, atomic_output_dir, write_image,
                                        write_json)
from organmtl.converters.dicom_rt import (MEDIA_STORAGE_DIRECTORY, classify, read_ct, read_dicom, sanitise,
                                          sort_slices)

EXIT_OK, EXIT_PARTIAL, EXIT_NONE = 0, 1, 2
FILE_ENDINGS = (".nii.gz", ".nrrd", ".mha")


# ------------------------------------------------------------------------------ finding series

@dataclass
class FoundSeries:
    """One CT series: its slice files with their headers (file order, not yet sorted)."""

    case: str
    series_uid: str
    slices: list[tuple[Path, pydicom.Dataset]]

    @property
    def first(self) -> pydicom.Dataset:
        return self.slices[0][1]

    @property
    def patient_id(self) -> str:
        return str(self.first.get("PatientID", "") or "")

    @property
    def description(self) -> str:
        return str(self.first.get("SeriesDescription", "") or "")


@dataclass
class Found:
    """What a search found: the CT series (cases), skipped files and unreadable files with reasons."""

    source: Path
    series: list[FoundSeries] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    unreadable: list[tuple[Path, str]] = field(default_factory=list)

    def report(self) -> dict:
        return {"skipped_files": [{"file": str(p), "reason": r} for p, r in self.skipped],
                "unreadable_files": [{"file": str(p), "error": e} for p, e in self.unreadable]}


def is_dicomdir(path: Path) -> bool:
    if path.name.upper() == "DICOMDIR":
        return True
    try:
        meta = pydicom.filereader.read_file_meta_info(str(path))
    except Exception:  # noqa: BLE001 - not a Part 10 file
        return False
    return str(meta.get("MediaStorageSOPClassUID", "")) == MEDIA_STORAGE_DIRECTORY


def dicomdir_files(path: Path) -> list[Path]:
    """The files the records of a DICOMDIR reference (pydicom's FileSet), in record order."""
    from pydicom.fileset import FileSet

    try:
        fs = FileSet(pydicom.dcmread(str(path)))
    except Exception as e:  # noqa: BLE001 - pydicom raises many kinds on a malformed DICOMDIR
        raise ConversionError(f"{path}: not a readable DICOMDIR ({e.__class__.__name__}: {str(e)[:120]})") from None
    return [Path(instance.path) for instance in fs]


def _candidate_files(src: Path) -> list[Path]:
    if src.is_file():
        if not is_dicomdir(src):
            raise ConversionError(f"{src}: not a folder or a DICOMDIR (give the folder holding the CT series)")
        return dicomdir_files(src)
    if not src.is_dir():
        raise ConversionError(f"{src}: not found")
    return sorted(p for p in src.rglob("*")
                  if p.is_file() and not any(part.startswith(".") for part in p.relative_to(src).parts))


def find_series(src: Path) -> Found:
    """Every CT series below ``src`` (a folder or a DICOMDIR), one case each (see the module doc).
    Raises ConversionError when no CT slice is found at all."""
    src = Path(src)
    found = Found(src)
    groups: dict[str, list[tuple[Path, pydicom.Dataset]]] = {}
    for path in _candidate_files(src):
        if not path.is_file():
            found.unreadable.append((path, "referenced by the DICOMDIR but missing"))
            continue
        try:
            ds = read_dicom(path, pixels=False)
            kind, reason = classify(path, ds)
        except ConversionError as e:
            found.unreadable.append((path, str(e)))
            continue
        if kind == "ct":
            groups.setdefault(str(ds.get("SeriesInstanceUID", "") or ""), []).append((path, ds))
        else:
            found.skipped.append((path, reason or "RTSTRUCT (contours are not read here)"))
    if not groups:
        what = f"; {len(found.unreadable)} unreadable file(s), first: {found.unreadable[0][1]}" if found.unreadable else ""
        raise ConversionError(f"{src}: no CT image files (DICOM with Modality CT) found{what}")
    found.series = _name_cases(groups)
    return found


def _series_key(slices) -> tuple:
    ds = slices[0][1]
    try:
        number = int(ds.get("SeriesNumber", 0) or 0)
    except (TypeError, ValueError):
        number = 0
    return (str(ds.get("PatientID", "") or ""), str(ds.get("StudyInstanceUID", "") or ""), number,
            str(ds.get("SeriesInstanceUID", "") or ""))


def _name_cases(groups: dict[str, list]) -> list[FoundSeries]:
    ordered = sorted(groups.items(), key=lambda item: _series_key(item[1]))
    per_patient: dict[str, int] = {}
    for _, slices in ordered:
        pid = str(slices[0][1].get("PatientID", "") or "")
        per_patient[pid] = per_patient.get(pid, 0) + 1
    out, used, k_of = [], set(), {}
    for uid, slices in ordered:
        ds = slices[0][1]
        pid = str(ds.get("PatientID", "") or "")
        base = sanitise(pid) or "patient"
        if per_patient[pid] > 1:
            k_of[pid] = k_of.get(pid, 0) + 1
            number = str(ds.get("SeriesNumber", "") or "").strip()
            base += f"_s{sanitise(number) or k_of[pid]}"
        case, n = base, 1
        while case in used:
            n += 1
            case = f"{base}_{n}"
        used.add(case)
        out.append(FoundSeries(case, uid, slices))
    return out


# ------------------------------------------------------------------------------ reading one series

@dataclass
class LoadedSeries:
    """A series read as one volume: the image, its slice headers and files in slice order."""

    found: FoundSeries
    image: sitk.Image
    paths: list[Path]
    headers: list[pydicom.Dataset]

    @property
    def case(self) -> str:
        return self.found.case

    def source_record(self) -> dict:
        """Where the case came from: the ``source`` block of ``convert dicom-rt``'s report
        (docs/converters.md) without the RTSTRUCT fields, plus patient and series description."""
        folder = Path(os.path.commonpath([str(p.parent.resolve()) for p in self.paths]))
        first = self.headers[0]
        return {"ct_series_folder": str(folder),
                "ct_files": [str(p.resolve().relative_to(folder)) for p in self.paths],
                "sop_instance_uids": [str(ds.get("SOPInstanceUID", "")) for ds in self.headers],
                "series_instance_uid": str(first.get("SeriesInstanceUID", "")),
                "study_instance_uid": str(first.get("StudyInstanceUID", "")),
                "frame_of_reference_uid": str(first.get("FrameOfReferenceUID", "")),
                "patient_id": str(first.get("PatientID", "") or ""),
                "series_number": str(first.get("SeriesNumber", "") or ""),
                "series_description": str(first.get("SeriesDescription", "") or ""),
                "transfer_syntax": str(getattr(first, "file_meta", {}).get("TransferSyntaxUID", "") or "")}


def load_series(found: FoundSeries) -> LoadedSeries:
    """Sort, check and read one series (ConversionError names the file and the problem)."""
    if not found.series_uid:
        raise ConversionError(f"{found.slices[0][0]}: CT slice without SeriesInstanceUID "
                              f"({len(found.slices)} such slices); cannot tell its series apart")
    paths = sort_slices(found.slices)
    by_path = dict(found.slices)
    headers = [by_path[p] for p in paths]
    frames = {str(ds.get("FrameOfReferenceUID", "") or "") for ds in headers}
    if len(frames) != 1 or "" in frames:
        what = "without FrameOfReferenceUID" if "" in frames else f"with {len(frames)} FrameOfReferenceUIDs"
        raise ConversionError(f"{paths[0]}: CT series {found.series_uid} has slices {what}; contours need one "
                              "frame of reference")
    return LoadedSeries(found, read_ct(paths), paths, headers)


# ------------------------------------------------------------------------------ convert dicom-ct

def _convert_one(task) -> dict:
    found, out, ending = task
    series = load_series(found)
    write_image(series.image, out / "imagesTs" / f"{found.case}_0000{ending}")
    return {"case": found.case, "split": "test", "slices": len(series.paths), "size": list(series.image.GetSize()),
            "spacing": [round(s, 6) for s in series.image.GetSpacing()], "source": series.source_record(),
            "action": "kept"}


def convert_series(src: Path, out: Path, file_ending: str = ".nii.gz", jobs: int = 1, strict: bool = False,
                   overwrite: bool = False) -> tuple[dict, int]:
    """Write ``out/imagesTs/<case>_0000<ending>`` for every CT series below ``src`` and
    ``out/conversion_report.json``; the report and the exit code (0 all, 1 some series failed)."""
    found = find_series(src)
    runner = CaseRunner(jobs=jobs, strict=strict)
    with atomic_output_dir(out, overwrite) as tmp:
        (tmp / "imagesTs").mkdir()
        runner.out, runner.split = tmp, "test"
        records = runner(_convert_one, [(s, tmp, file_ending) for s in found.series], desc="dicom-ct",
                         case=lambda task: task[0].case)
        report = {"converter": "dicom-ct", "source": str(Path(src).resolve()), "test_source": None,
                  "status": "partial" if runner.failures else "complete",
                  "counts": {"cases": len(found.series), "converted": len(records), "dropped": 0,
                             "failed": len(runner.failures)},
                  "cases": records, "failed": [f.as_dict() for f in runner.failures], **found.report()}
        write_json(tmp / "conversion_report.json", report)
    return report, EXIT_PARTIAL if runner.failures else EXIT_OK


def run_convert(args) -> int:
    if args.file_ending not in FILE_ENDINGS:
        raise ConversionError(f"--file-ending {args.file_ending}: use one of {', '.join(FILE_ENDINGS)}")
    report, code = convert_series(args.src, args.out, args.file_ending, args.jobs, args.strict, args.overwrite)
    print(f"{report['counts']['converted']} CT series written to {args.out / 'imagesTs'} "
          f"(case -> series map: {args.out / 'conversion_report.json'})")
    for failure in report["failed"]:
        print(f"organmtl convert dicom-ct: case {failure['case']} not converted: {failure['error']}", file=sys.stderr)
    for item in report["unreadable_files"]:
        print(f"organmtl convert dicom-ct: warning: {item['error']}", file=sys.stderr)
    return code


def add_parser(sources) -> argparse.ArgumentParser:
    """``organmtl convert dicom-ct`` on the ``convert`` command's sub-parsers."""
    text = "DICOM CT series without contours (new patients) -> imagesTs + case -> series map"
    p = sources.add_parser("dicom-ct", help=text, description=text)
    p.add_argument("src", type=Path, help="folder of CT series (one or many patients, loose files or a DICOMDIR "
                   "media folder) or a DICOMDIR file")
    p.add_argument("--out", type=Path, required=True, help="output folder: imagesTs/ and conversion_report.json")
    p.add_argument("--file-ending", default=".nii.gz", choices=FILE_ENDINGS, help="image file ending (default .nii.gz)")
    p.add_argument("-j", "--jobs", type=int, default=1, help="series converted in parallel")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--strict", action="store_true", help="stop at the first bad series")
    p.set_defaults(func=run_convert)
    return p
