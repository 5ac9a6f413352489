"""The ``organmtl convert`` machinery shared by every source converter."""
from __future__ import annotations

import argparse
import functools
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from organmtl.converters import coco, landmark_encoding, pddca, volumes
from organmtl.converters.common import (CaseRunner, ConversionError, atomic_output_dir, nnunet_target, run_cases,
                                        write_dataset_json, write_json)

EXIT_OK, EXIT_PARTIAL, EXIT_USAGE = 0, 1, 2    # all converted / some case failed / nothing converted or usage


@dataclass(frozen=True)
class SourceConverter:
    """One ``organmtl convert <name>`` source.

    ``convert(src, out, args, run_cases) -> summary`` writes an nnU-Net raw dataset into ``out``
    (a temporary folder) and returns ``labels``, ``channel_names``, ``num_training``, ``cases``
    (one record per case) and ``dataset_json_extra``. ``run_cases`` is a
    :class:`~organmtl.converters.common.CaseRunner`: a converter passes ``case=`` (item -> case id)
    so that a case raising ConversionError is reported and left out instead of stopping the run.
    ``to_nnunet=False`` marks converters whose input is already an nnU-Net dataset (``to-coco``);
    ``many_sources=True`` makes ``src`` a list of one or more folders (``merge``).
    """

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    convert: Callable
    to_nnunet: bool = True
    many_sources: bool = False


PDDCA = SourceConverter("pddca", "PDDCA / MICCAI 2015 head-and-neck CT (NRRD)", pddca.add_arguments, pddca.convert)
VOLUMES = SourceConverter("volumes", "folder of images + label maps (NIfTI/NRRD/MHA) with mapping.json",
                          volumes.add_arguments, volumes.convert)
COCO = SourceConverter("to-coco", "an nnU-Net raw dataset -> COCO per-slice instances (HMR-Net)",
                       lambda parser: None, None, to_nnunet=False)


def add_common_arguments(parser: argparse.ArgumentParser, converter: SourceConverter) -> None:
    parser.add_argument("src", type=Path, nargs="+" if converter.many_sources else None,
                        help="source folder" if converter.to_nnunet and not converter.many_sources
                        else "nnU-Net raw dataset folder(s) (DatasetXXX_Name)")
    if converter.to_nnunet:
        parser.add_argument("--to", choices=("nnunet", "coco"), default="nnunet", help="output format")
        parser.add_argument("-d", "--dataset-id", type=int, required=True, help="nnU-Net dataset id (1-999)")
        parser.add_argument("--name", default=None, help=f"dataset name (default: {converter.name})")
        parser.add_argument("--file-ending", default=".nii.gz", choices=(".nii.gz", ".nrrd", ".mha"),
                            help="file ending of the written images (default .nii.gz)")
        parser.add_argument("--out", type=Path, default=None,
                            help="nnunet: raw root (default $nnUNet_raw); coco: output folder (required)")
        parser.add_argument("--test", type=Path, default=None, metavar="TEST_SRC",
                            help="a second source folder converted into imagesTs/labelsTs")
        landmark_encoding.add_arguments(parser)
    else:
        parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("-j", "--jobs", type=int, default=1, help="cases converted in parallel")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    parser.add_argument("--strict", action="store_true",
                        help="stop at the first bad case (default: convert every good case, list the bad "
                             "ones, exit code 1)")
    converter.add_arguments(parser)
    coco.add_arguments(parser)


def _report(summary: dict) -> list[str]:
    lines = []
    cases = summary.get("cases", [])
    dropped = [r for r in cases if r.get("action") == "dropped"]
    if dropped:
        lines.append(f"  {len(dropped)} of {len(cases)} cases dropped (not written):")
    for r in cases:
        test = " (test)" if r.get("split") == "test" else ""
        if r.get("action") == "dropped":
            lines.append(f"  {r['case']}{test}: dropped: {r.get('reason') or _dropped_reason(r)}")
        elif r.get("action") not in (None, "kept"):
            lines.append(f"  {r['case']}{test}: {r['action']} (missing: {', '.join(r.get('missing', [])) or '-'})")
        for d in r.get("landmarks_dropped", []):
            lines.append(f"  {r['case']}: landmark {d['name']!r} dropped ({d['reason']})")
        if r.get("overlap_voxels"):
            lines.append(f"  {r['case']}: overlapping structures {r['overlap_voxels']} (voxels each took over from "
                         "structures painted before it)")
        for note in r.get("notes", []):
            lines.append(f"  {r['case']}: {note}")
        for warning in r.get("warnings", []):
            lines.append(f"  {r['case']}: warning: {warning}")
    return lines


def _failure_lines(runner: CaseRunner, total: int | None) -> list[str]:
    lines = [f"organmtl convert: case {f.case}{' (test)' if f.split == 'test' else ''} not converted: {f.error}"
             for f in runner.failures]
    if runner.failures and total is not None:
        lines.append(f"organmtl convert: warning: {len(runner.failures)} of {total} cases failed and were left out "
                     "(listed in conversion_report.json; --strict stops at the first)")
    return lines


def _print_failures(runner: CaseRunner, total: int | None) -> None:
    for line in _failure_lines(runner, total):
        print(line, file=sys.stderr)


def _merge_test_split(tmp: Path, test_tmp: Path) -> None:
    for sub, dest in (("imagesTr", "imagesTs"), ("labelsTr", "labelsTs")):
        (test_tmp / sub).rename(tmp / dest)
    if (test_tmp / "landmarks").is_dir():
        for f in (test_tmp / "landmarks").iterdir():
            (tmp / "landmarks").mkdir(exist_ok=True)
            f.rename(tmp / "landmarks" / f.name)
    shutil.rmtree(test_tmp)


def _convert_test_split(converter: SourceConverter, args, tmp: Path, runner: CaseRunner) -> dict | None:
    """Convert ``--test`` into ``tmp``'s imagesTs/labelsTs; the test summary, or None when every test
    case failed (their failures are in ``runner``: the training cases are still written, exit 1)."""
    runner.out, runner.split = tmp / ".test", "test"
    before = len(runner.failures)
    try:
        test_summary = converter.convert(args.test, tmp / ".test", args, runner)
    except ConversionError:
        if len(runner.failures) == before:        # not a case's bad input (no test folder, a bad option): stop
            raise
        shutil.rmtree(tmp / ".test", ignore_errors=True)
        return None
    finally:
        runner.out, runner.split = tmp, "train"
    _merge_test_split(tmp, tmp / ".test")
    return test_summary


def _dropped_reason(record: dict) -> str:
    missing = ", ".join(record.get("missing", [])) or "a structure"
    return f"lacks {missing} (--missing drop, the default; --missing ignore keeps such cases)"


def _with_reasons(records: list[dict], split: str) -> list[dict]:
    """The case records with their split, and a one-line ``reason`` on each dropped one."""
    return [{**r, "split": split, **({"reason": _dropped_reason(r)} if r.get("action") == "dropped"
                                     and "reason" not in r else {})} for r in records]


def _source_text(src):
    return str(src) if isinstance(src, Path) else [str(s) for s in src]


def report_record(converter: SourceConverter, args, summary: dict, runner: CaseRunner) -> dict:
    """The ``conversion_report.json`` content (format: docs/converters.md, "conversion_report.json")."""
    cases = summary["cases"]
    dropped = sum(1 for r in cases if r.get("action") == "dropped")
    return {"converter": converter.name, "source": _source_text(args.src),
            "test_source": None if getattr(args, "test", None) is None else str(args.test),
            "status": "partial" if runner.failures else "complete",
            "counts": {"cases": len(cases) + len(runner.failures), "converted": len(cases) - dropped,
                       "dropped": dropped, "failed": len(runner.failures)},
            "cases": cases, "failed": [f.as_dict() for f in runner.failures]}


def _to_nnunet(converter: SourceConverter, args, root: Path | None) -> tuple[Path, dict, CaseRunner]:
    name = args.name or converter.name.replace("-", "_").upper()
    target = nnunet_target(root, args.dataset_id, name, args.overwrite)
    runner = CaseRunner(jobs=args.jobs, strict=getattr(args, "strict", False))
    try:
        with atomic_output_dir(target, args.overwrite) as tmp:
            runner.out = tmp
            summary = converter.convert(args.src, tmp, args, runner)
            summary["cases"] = _with_reasons(summary["cases"], "train")
            test_summary = None if getattr(args, "test", None) is None else \
                _convert_test_split(converter, args, tmp, runner)
            if test_summary is not None:
                if test_summary["labels"] != summary["labels"]:
                    raise ConversionError(f"{args.test}: test cases have labels {test_summary['labels']}, "
                                          f"training cases {summary['labels']}")
                clash = {r["case"] for r in summary["cases"]} & {r["case"] for r in test_summary["cases"]}
                if clash:
                    raise ConversionError(f"{args.test}: case id {sorted(clash)[0]!r} is also a training case")
                summary["cases"] += _with_reasons(test_summary["cases"], "test")
            write_dataset_json(tmp, summary["channel_names"], summary["labels"], summary["num_training"],
                               args.file_ending, name, f"converted by organmtl from {converter.name}",
                               **summary.get("dataset_json_extra", {}))
            landmark_encoding.apply(tmp, args, summary)      # extra channels + dataset.json update
            write_json(tmp / "conversion_report.json", report_record(converter, args, summary, runner))
    except ConversionError:
        _print_failures(runner, None)                       # nothing converted: what failed, then the error
        raise
    return target, summary, runner


def convert_with_status(converter: SourceConverter, args) -> tuple[Path, int]:
    """Run one conversion from parsed arguments; print a summary and every failed case (stderr);
    return the output folder and the exit code (0 every case converted, 1 some failed)."""
    if not converter.to_nnunet:
        runner = functools.partial(run_cases, jobs=args.jobs)
        with atomic_output_dir(args.out, args.overwrite) as tmp:
            stats = coco.to_coco(args.src, tmp, args, runner)
        print(f"COCO written to {args.out}: {stats}")
        return args.out, EXIT_OK
    if args.to == "nnunet":
        target, summary, case_runner = _to_nnunet(converter, args, args.out)
        n_test = sum(1 for r in summary["cases"] if r.get("split") == "test" and r.get("action") != "dropped")
        print(f"nnU-Net dataset written to {target}: {summary['num_training']} training cases"
              f"{f', {n_test} test cases' if getattr(args, 'test', None) is not None else ''}, "
              f"labels {summary['labels']}")
        out = target
    else:
        if args.out is None:
            raise ConversionError("--to coco needs --out FOLDER")
        with tempfile.TemporaryDirectory(prefix="organmtl-coco-") as raw_root:
            target, summary, case_runner = _to_nnunet(converter, args, Path(raw_root))
            with atomic_output_dir(args.out, args.overwrite) as tmp:
                stats = coco.to_coco(target, tmp, args, functools.partial(run_cases, jobs=args.jobs))
        print(f"COCO written to {args.out}: {stats}")
        out = args.out
    for line in _report(summary):
        print(line)
    _print_failures(case_runner, len(summary["cases"]) + len(case_runner.failures))
    return out, EXIT_PARTIAL if case_runner.failures else EXIT_OK


def run_conversion(converter: SourceConverter, args) -> Path:
    """:func:`convert_with_status` without the exit code: the output folder."""
    return convert_with_status(converter, args)[0]
