"""``organmtl predict``: new patients' CT in, contours out, in one command (docs/predict.md).

1. Find: every CT series below ``DICOM_IN`` (a folder of one or many patients, loose files or a
   DICOMDIR media folder, or a DICOMDIR file): :func:`organmtl.converters.dicom_ct.find_series`.
2. Convert: each series sorted, checked and read as ``convert dicom-rt`` reads its CT
   (:func:`organmtl.converters.dicom_ct.load_series`), in memory.
3. Predict: nnU-Net's own :class:`~nnunetv2.inference.predict_from_raw_data.nnUNetPredictor`
   loaded from the trained model folder (``-d -c -tr -p``), the folds ``-f`` (default: every
   fold with the checkpoint, as ``nnUNetv2_predict``) ensembled by nnU-Net (softmax averaged over
   the folds), the image passed as nnU-Net's SimpleITK reader would give it (models whose plans
   name another reader get the image through a temporary file read by that reader); or a
   Detectron2 model (``--detectron-config --weights``) through
   ``organmtl.detectron_heads.volume_predictor.predict_volume``, slice by slice in its plane.
4. Export: the label map on the series' grid as an RT Structure Set and/or a DICOM Segmentation
   referencing that series (the builders of ``organmtl export``:
   :func:`organmtl.converters.export_dicom.build_rtstruct` / ``build_seg``), and/or a NIfTI label map.

Outputs in ``OUT``: ``<case>_RTSTRUCT.dcm``, ``<case>_SEG.dcm``, ``<case>.nii.gz`` by ``--format``,
and ``predict_report.json`` (model, the case -> series map with each case's files, failures,
skipped and unreadable files, seconds per step). Each file is written under a temporary name and
renamed; a case that fails leaves none of its files. Exit codes: 0 every series done; 1 some
failed (each reported on stderr with its one-line reason, the others done); 2 bad input or
nothing done.

A NIfTI/NRRD/MHA image as ``DICOM_IN`` is predicted as it is (``--format nifti`` only).
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk

from organmtl.converters.common import IMAGE_SUFFIXES, ConversionError, read_image, strip_image_suffix
from organmtl.devices import resolve_device

EXIT_OK, EXIT_PARTIAL, EXIT_NONE = 0, 1, 2
FORMATS = ("rtstruct", "seg", "nifti")
SUFFIX = {"rtstruct": "_RTSTRUCT.dcm", "seg": "_SEG.dcm", "nifti": ".nii.gz"}


# ------------------------------------------------------------------------------ backends

@dataclass
class Backend:
    """A trained model: ``predict(image) -> label map`` on the image's grid; ``labels`` ``{value: name}``."""

    kind: str
    description: dict
    labels: dict[int, str]
    predict: Callable[[sitk.Image], sitk.Image]
    load_s: float = 0.0


def _labels_from_dataset_json(dataset_json: dict, path: Path) -> dict[int, str]:
    out = {}
    for name, value in dataset_json.get("labels", {}).items():
        if isinstance(value, (list, tuple)):
            raise ConversionError(f"{path}: label {name!r} is a region ({value}); region-based models cannot be "
                                  "exported (one label value per ROI needed)")
        if name.lower() not in ("background", "ignore"):
            out[int(value)] = name
    return out


def model_folder(dataset: str, trainer: str, plans: str, configuration: str) -> Path:
    """nnU-Net's results folder of the model: ``$nnUNet_results/<dataset>/<trainer>__<plans>__<config>``,
    the dataset given by name (``Dataset500_RT``) or id (``500``), as nnU-Net names it."""
    results = os.environ.get("nnUNet_results")
    if not results:
        raise ConversionError("nnUNet_results is not set: export nnUNet_results=/path/to/results (the folder "
                              "nnUNetv2_train wrote the model into)")
    results = Path(results)
    dataset = str(dataset)
    if dataset.isdigit():
        names = sorted(p.name for p in results.glob(f"Dataset{int(dataset):03d}_*") if p.is_dir())
        if len(names) != 1:
            raise ConversionError(f"{results}: {'no' if not names else len(names)} trained dataset(s) with id "
                                  f"{dataset} (Dataset{int(dataset):03d}_*{': ' + ', '.join(names) if names else ''})")
        dataset = names[0]
    folder = results / dataset / f"{trainer}__{plans}__{configuration}"
    if not folder.is_dir():
        raise ConversionError(f"{folder}: model folder not found (check -d, -c, -tr and -p)")
    return folder


def nnunet_backend(dataset: str, configuration: str, trainer: str, folds, plans: str, checkpoint: str,
                   device: str, step_size: float = 0.5, tta: bool = True) -> Backend:
    """nnU-Net's predictor for a trained model folder (``folds`` None: every fold with ``checkpoint``)."""
    folder = model_folder(dataset, trainer, plans, configuration)
    if folds is None:
        folds = sorted(int(p.name[5:]) for p in folder.glob("fold_*")
                       if p.name[5:].isdigit() and (p / checkpoint).is_file())
        if not folds:
            raise ConversionError(f"{folder}: no fold_*/{checkpoint} (the model is not trained; or pass -chk)")
    folds = [f if f == "all" else int(f) for f in folds]
    for f in folds:
        if not (folder / f"fold_{f}" / checkpoint).is_file():
            raise ConversionError(f"{folder / f'fold_{f}' / checkpoint}: checkpoint not found (fold {f})")
    dataset_json = json.loads((folder / "dataset.json").read_text())
    channels = dataset_json.get("channel_names", dataset_json.get("modality", {}))
    if len(channels) != 1:
        raise ConversionError(f"{folder / 'dataset.json'}: the model takes {len(channels)} input channels "
                              f"({', '.join(map(str, channels.values()))}); a CT series gives one")
    labels = _labels_from_dataset_json(dataset_json, folder / "dataset.json")
    import torch

    torch_device = torch.device(resolve_device(device))
    t0 = time.perf_counter()
    from organmtl.nnunet_trainers.focusnet.predict import predictor_class

    predictor = predictor_class(trainer)(tile_step_size=step_size, use_gaussian=True, use_mirroring=tta,
                                perform_everything_on_device=torch_device.type == "cuda", device=torch_device,
                                verbose=False, verbose_preprocessing=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(folder), use_folds=tuple(folds), checkpoint_name=checkpoint)
    reader = predictor.plans_manager.image_reader_writer_class
    ending = dataset_json.get("file_ending", ".nii.gz")

    def predict(image: sitk.Image) -> sitk.Image:
        return _nnunet_predict(predictor, reader, ending, image)

    description = {"backend": "nnU-Net", "model_folder": str(folder), "folds": folds, "checkpoint": checkpoint,
                   "device": str(torch_device), "tile_step_size": step_size, "mirroring": tta,
                   "trainer": predictor.trainer_name, "image_reader_writer": reader.__name__}
    return Backend("nnunet", description, labels, predict, time.perf_counter() - t0)


def _nnunet_predict(predictor, reader, ending: str, image: sitk.Image) -> sitk.Image:
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    if reader is SimpleITKIO:
        # exactly what SimpleITKIO.read_images returns for this image (no file round trip)
        data = sitk.GetArrayFromImage(image)[None].astype(np.float32, copy=False)
        props = {"sitk_stuff": {"spacing": image.GetSpacing(), "origin": image.GetOrigin(),
                                "direction": image.GetDirection()},
                 "spacing": list(np.abs(image.GetSpacing()[::-1]))}
        seg = predictor.predict_single_npy_array(data, props, None, None, False)
        out = sitk.GetImageFromArray(np.asarray(seg).astype(np.uint8 if seg.max() < 256 else np.uint16))
        out.CopyInformation(image)
        return out
    with tempfile.TemporaryDirectory(prefix="organmtl-predict-") as tmp:   # another reader: through its files
        io = reader()
        src = os.path.join(tmp, f"case_0000{ending}")
        sitk.WriteImage(image, src)
        data, props = io.read_images([src])
        seg = predictor.predict_single_npy_array(data.astype(np.float32), props, None, None, False)
        dst = os.path.join(tmp, f"pred{ending}")
        io.write_seg(np.asarray(seg).astype(np.uint8 if seg.max() < 256 else np.uint16), dst, props)
        out = sitk.ReadImage(dst)
    if out.GetSize() != image.GetSize():
        raise ConversionError(f"{reader.__name__} gave a label map of size {out.GetSize()} for an image of "
                              f"{image.GetSize()}")
    out.CopyInformation(image)
    return out


def detectron_backend(config: Path, weights: Path, device: str, opts: list[str] | None) -> Backend:
    """A Detectron2 model trained with ``train_net.py`` (HMR-Net, Mask R-CNN), predicting slice by slice."""
    for path, what in ((config, "--detectron-config"), (weights, "--weights")):
        if not Path(path).is_file():
            raise ConversionError(f"{path}: {what} file not found")
    try:
        from organmtl.detectron_heads.volume_predictor import label_names, predict_volume
    except ImportError as e:
        raise ConversionError(f"{config}: Detectron2 volume prediction is not available ({e})") from None
    t0 = time.perf_counter()
    device = resolve_device(device)
    try:                                  # the volume predictor says what a config lacks with ValueError
        labels = {int(k): str(v) for k, v in label_names(config, opts).items()}
    except (ValueError, FileNotFoundError) as e:
        message = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        raise ConversionError(message if str(config) in message else f"{config}: {message}") from None

    def predict(image: sitk.Image) -> sitk.Image:
        try:
            return predict_volume(config, weights, image, device=device, opts=opts)
        except ValueError as e:
            raise ConversionError(f"{weights}: {str(e).strip().splitlines()[0]}") from None

    description = {"backend": "Detectron2", "config": str(Path(config).resolve()),
                   "weights": str(Path(weights).resolve()), "opts": list(opts or []), "device": device}
    return Backend("detectron2", description, labels, predict, time.perf_counter() - t0)


# ------------------------------------------------------------------------------ outputs

def ct_grid(folder: Path, headers) -> "CtSeries":  # noqa: F821 - export_dicom's class, imported lazily
    """export_dicom's CtSeries of already sorted slice headers (as ``export_dicom.load_ct`` builds it)."""
    from organmtl.converters.export_dicom import CtSeries

    iop = np.asarray([float(v) for v in headers[0].ImageOrientationPatient])
    positions = np.asarray([[float(v) for v in ds.ImagePositionPatient] for ds in headers])
    row, col = iop[:3], iop[3:]
    gap = float((positions[-1] - positions[0]) @ np.cross(row, col)) / (len(headers) - 1)
    pixel_spacing = [float(v) for v in headers[0].PixelSpacing]
    return CtSeries(Path(folder), list(headers), positions, row, col, (pixel_spacing[1], pixel_spacing[0], gap))


def _write_nifti(image: sitk.Image, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.nii.gz")
    try:
        sitk.WriteImage(image, str(tmp), useCompression=True)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def export_case(case: str, seg_image: sitk.Image, labels: dict[int, str], formats, out: Path,
                series=None) -> dict:
    """Write ``case``'s outputs; ``series``: its LoadedSeries (needed by rtstruct/seg)."""
    from organmtl.converters.export_dicom import build_rtstruct, build_seg, write_atomic

    seg = sitk.GetArrayFromImage(seg_image)
    values = [int(v) for v in np.unique(seg) if v != 0]
    unknown = [v for v in values if v not in labels]
    if unknown:
        raise ConversionError(f"{case}: the model predicted label value {unknown[0]}, which its labels "
                              f"({', '.join(f'{k}={v}' for k, v in sorted(labels.items()))}) do not name")
    present = {v: labels[v] for v in values}
    dicom = [f for f in formats if f != "nifti"]
    if dicom and not present:
        raise ConversionError(f"{case}: the prediction is empty (no foreground voxel); no "
                              f"{'/'.join(f.upper() for f in dicom)} written")
    ct = ct_grid(series.paths[0].parent, series.headers) if dicom else None
    written: list[Path] = []
    rois = {}
    try:
        for fmt in formats:
            path = out / f"{case}{SUFFIX[fmt]}"
            if fmt == "nifti":
                _write_nifti(seg_image, path)
            else:
                ds, counts = (build_rtstruct if fmt == "rtstruct" else build_seg)(ct, seg, present)
                write_atomic(ds, path)
                rois[fmt] = counts
            written.append(path)
    except BaseException:
        for path in written:                # a case is written whole or not at all
            path.unlink(missing_ok=True)
        raise
    voxels = np.bincount(seg.ravel().astype(np.int64), minlength=max(labels, default=0) + 1)
    return {"files": {fmt: str(p) for fmt, p in zip(formats, written)},
            "voxels": {labels[v]: int(voxels[v]) for v in sorted(labels) if v < len(voxels)},
            "labels_absent": [labels[v] for v in sorted(labels) if v not in present], "rois": rois}


# ------------------------------------------------------------------------------ the run

@dataclass
class Outcome:
    records: list[dict] = field(default_factory=list)
    failures: list[dict] = field(default_factory=list)


def _targets_free(out: Path, cases: list[str], formats, overwrite: bool) -> None:
    if overwrite:
        return
    for case in cases:
        for fmt in formats:
            path = out / f"{case}{SUFFIX[fmt]}"
            if path.exists():
                raise ConversionError(f"{path}: already exists (pass --overwrite to replace it)")


def _write_report(out: Path, report: dict) -> Path:
    path = out / "predict_report.json"
    tmp = out / f".predict_report.json.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def predict_image_file(path: Path, out: Path, backend_factory, formats, overwrite: bool) -> int:
    """A NIfTI/NRRD/MHA image: predicted as it is, written as OUT/<name>.nii.gz."""
    if set(formats) != {"nifti"}:
        raise ConversionError(f"{path}: an image file has no DICOM series to reference; use --format nifti "
                              "(or give the CT's DICOM folder)")
    case = strip_image_suffix(path.name)
    if case.endswith("_0000"):
        case = case[:-5]
    image = read_image(path)
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise ConversionError(f"{path}: expected a 3D one-channel image")
    _targets_free(out, [case], formats, overwrite)
    backend = backend_factory()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    seg = backend.predict(image)
    t1 = time.perf_counter()
    record = export_case(case, seg, backend.labels, formats, out)
    report = {"input": str(path), "model": backend.description, "formats": list(formats),
              "cases": [{"case": case, "status": "done", "image": str(path), **record,
                         "seconds": {"predict": round(t1 - t0, 3), "export": round(time.perf_counter() - t1, 3)}}],
              "failed": []}
    _write_report(out, report)
    print(f"{case}: {out / (case + SUFFIX['nifti'])}")
    return EXIT_OK


def predict_dicom(src: Path, out: Path, backend_factory, formats, overwrite: bool = False,
                  progress: bool = True) -> tuple[dict, int]:
    """Every CT series below ``src`` -> outputs in ``out``; (report, exit code)."""
    from tqdm import tqdm

    from organmtl.converters.dicom_ct import find_series, load_series

    t0 = time.perf_counter()
    found = find_series(src)
    find_s = time.perf_counter() - t0
    _targets_free(out, [s.case for s in found.series], formats, overwrite)
    backend = backend_factory()
    out.mkdir(parents=True, exist_ok=True)
    outcome = Outcome()
    for item in tqdm(found.series, desc="predict", unit="series", disable=not progress):
        record = {"case": item.case, "series_instance_uid": item.series_uid, "patient_id": item.patient_id,
                  "slice_files": len(item.slices)}
        try:
            t1 = time.perf_counter()
            series = load_series(item)
            t2 = time.perf_counter()
            seg = backend.predict(series.image)
            if seg.GetSize() != series.image.GetSize():
                raise ConversionError(f"{item.case}: the model returned a label map of size {seg.GetSize()} for "
                                      f"the CT's {series.image.GetSize()}")
            t3 = time.perf_counter()
            written = export_case(item.case, seg, backend.labels, formats, out, series)
            t4 = time.perf_counter()
        except ConversionError as e:
            outcome.failures.append({**record, "status": "failed", "error": str(e)})
            print(f"organmtl predict: {item.case}: error: {e}", file=sys.stderr)
            continue
        outcome.records.append({**record, "status": "done", **written, "source": series.source_record(),
                                "seconds": {"read": round(t2 - t1, 3), "predict": round(t3 - t2, 3),
                                            "export": round(t4 - t3, 3)}})
    for path, error in found.unreadable:
        print(f"organmtl predict: warning: {error}", file=sys.stderr)
    report = {"input": str(Path(src).resolve()), "model": backend.description, "formats": list(formats),
              "labels": {str(k): v for k, v in sorted(backend.labels.items())},
              "counts": {"series": len(found.series), "done": len(outcome.records), "failed": len(outcome.failures)},
              "seconds": {"find": round(find_s, 3), "load_model": round(backend.load_s, 3)},
              "cases": outcome.records, "failed": outcome.failures, **found.report()}
    _write_report(out, report)
    done, failed = len(outcome.records), len(outcome.failures)
    print(f"{done} of {done + failed} CT series predicted into {out}"
          + (f"; {failed} failed (see {out / 'predict_report.json'})" if failed else ""))
    return report, EXIT_OK if not failed else EXIT_PARTIAL if done else EXIT_NONE


def run_predict(args) -> int:
    """The ``organmtl predict`` command (parsed arguments; see organmtl/cli.py)."""
    formats = list(dict.fromkeys(args.format))
    if args.detectron_config is not None:
        clash = [flag for flag, value in (("-d", args.dataset_id), ("-c", args.c), ("-tr", args.tr)) if value is not None]
        if clash:
            raise ConversionError(f"{args.detectron_config}: --detectron-config is a Detectron2 model; "
                                  f"{', '.join(clash)} name an nnU-Net model (give one or the other)")
        if args.weights is None:
            raise ConversionError(f"{args.detectron_config}: --detectron-config needs --weights W.pth")

        def factory():
            return detectron_backend(args.detectron_config, args.weights, args.device, args.opts)
    else:
        missing = [flag for flag, value in (("-d", args.dataset_id), ("-c", args.c), ("-tr", args.tr)) if value is None]
        if missing:
            raise ConversionError(f"{args.input}: give the nnU-Net model ({', '.join(missing)} missing) or "
                                  "--detectron-config CFG --weights W.pth")

        def factory():
            return nnunet_backend(args.dataset_id, args.c, args.tr, args.f, args.p, args.chk, args.device,
                                  args.step_size, not args.disable_tta)
    src = Path(args.input)
    if src.is_file() and src.name.endswith(IMAGE_SUFFIXES):
        return predict_image_file(src, args.out, factory, formats, args.overwrite)
    return predict_dicom(src, args.out, factory, formats, args.overwrite)[1]


def add_arguments(p) -> None:
    p.add_argument("input", metavar="DICOM_IN", type=Path,
                   help="folder of CT series (one or many patients; loose files or DICOMDIR media), a DICOMDIR, "
                   "or a NIfTI/NRRD/MHA image (then --format nifti)")
    p.add_argument("out", metavar="OUT", type=Path, help="output folder")
    p.add_argument("-d", "--dataset-id", dest="dataset_id", default=None, help="nnU-Net dataset name or id")
    p.add_argument("-c", default=None, metavar="CONFIG", help="nnU-Net configuration (e.g. 3d_fullres)")
    p.add_argument("-tr", default=None, metavar="TRAINER", help="nnU-Net trainer class")
    p.add_argument("-f", nargs="+", default=None, metavar="FOLD",
                   help="folds to ensemble (default: every fold with the checkpoint, as nnUNetv2_predict)")
    p.add_argument("-p", default="nnUNetPlans", metavar="PLANS", help="plans identifier (default %(default)s)")
    p.add_argument("-chk", default="checkpoint_final.pth", metavar="CHECKPOINT",
                   help="checkpoint file name (default %(default)s)")
    p.add_argument("-step_size", type=float, default=0.5, help="sliding-window step, fraction of the patch (0.5)")
    p.add_argument("--disable_tta", action="store_true", help="no mirroring test-time augmentation")
    p.add_argument("--detectron-config", type=Path, default=None, metavar="CFG",
                   help="a Detectron2 model (HMR-Net, Mask R-CNN) instead of -d/-c/-tr: its config file")
    p.add_argument("--weights", type=Path, default=None, metavar="W.pth", help="Detectron2 weights (model_final.pth)")
    p.add_argument("--opts", nargs="+", default=None, metavar="KEY VALUE",
                   help="Detectron2 config overrides (as train_net.py's opts)")
    p.add_argument("-device", default="auto", choices=("auto", "cuda", "cpu", "mps"),
                   help="auto (default): CUDA when available, else CPU")
    p.add_argument("--format", nargs="+", choices=FORMATS, default=["rtstruct"],
                   help="outputs per series: rtstruct (default), seg, nifti; several allowed")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
