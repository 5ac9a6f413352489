"""CHAOS converter: labels and images equal the phantom truth voxel for voxel, geometry equals the
DICOM series', the PNG-to-slice rule is the documented one (and the demo would catch any other),
MR intensity decoding, T1DUAL channels, bad inputs, byte-identical re-runs, nnU-Net and COCO."""
import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from hypothesis import given
from hypothesis import strategies as st

from organmtl.converters import ConversionError, add_common_arguments, run_conversion
from organmtl.converters.chaos import CONVERTER, MR_LABELS, MR_RANGES, _decode_table, natural_key
from organmtl.demo_data.chaos import (ct_patients, dicom_slice, instance_numbers, make_ct, make_mr, mr_patients,
                                      write_chaos)
from tests.helpers import file_examples, geometries, read_array, rotation, run_cli

N = 3   # patients per modality: InstanceNumber against, along, against the slice normal


@pytest.fixture(scope="module")
def chaos_src(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("chaos") / "Train_Sets"
    write_chaos(root, N, seed=0)
    return root


def _main(argv) -> int:
    """``organmtl convert chaos ARGV`` in this process, as ``organmtl.cli.main`` runs it (exit code 2
    on a ConversionError), without plugin discovery, which a stale ``*.egg-info`` in the working
    directory can hide; registration is exercised by the CLI subprocess tests."""
    parser = argparse.ArgumentParser(prog="organmtl convert chaos")
    add_common_arguments(parser, CONVERTER)
    args = parser.parse_args(argv)
    try:
        run_conversion(CONVERTER, args)
    except ConversionError as e:
        print(f"organmtl convert: error: {e}", file=sys.stderr)
        return 2
    return 0


def _convert(src, out, modality, *extra):
    return _main([str(src), "--modality", modality, "--dataset-id", "9", "--out", str(out), *extra])


def _files(root: Path) -> dict:
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _series_geometry(folder: Path):
    """Spacing, origin and direction (SimpleITK order) of a DICOM folder, from its headers alone."""
    heads = [pydicom.dcmread(p, stop_before_pixels=True) for p in folder.glob("*.dcm")]
    iop = np.array(heads[0].ImageOrientationPatient, float)
    normal = np.cross(iop[:3], iop[3:])
    ipp = sorted((np.array(h.ImagePositionPatient, float) for h in heads), key=lambda p: p @ normal)
    row_mm, col_mm = (float(v) for v in heads[0].PixelSpacing)
    gap = (ipp[-1] - ipp[0]) @ normal / (len(ipp) - 1)
    direction = np.column_stack([iop[:3], iop[3:], normal]).ravel()
    return (col_mm, row_mm, gap), ipp[0], direction


def _assert_geometry(img: sitk.Image, folder: Path, atol=1e-6):
    spacing, origin, direction = _series_geometry(folder)
    np.testing.assert_allclose(img.GetSpacing(), spacing, rtol=0, atol=atol)
    np.testing.assert_allclose(img.GetOrigin(), origin, rtol=0, atol=atol)
    np.testing.assert_allclose(img.GetDirection(), direction, rtol=0, atol=atol)


# ------------------------------------------------------------------ demo data

def test_demo_is_byte_identical_per_seed_and_has_the_pitfalls(chaos_src, tmp_path):
    write_chaos(tmp_path / "again", N, seed=0)
    write_chaos(tmp_path / "other", N, seed=1)
    first = _files(chaos_src)
    assert first == _files(tmp_path / "again")
    assert first != _files(tmp_path / "other")
    assert {p.parts[0] for p in first} == {"CT", "MR"}
    case = chaos_src / "MR" / mr_patients(N)[0]
    for sub in ("T1DUAL/DICOM_anon/InPhase", "T1DUAL/DICOM_anon/OutPhase", "T1DUAL/Ground",
                "T2SPIR/DICOM_anon", "T2SPIR/Ground"):
        assert any((case / sub).iterdir()), sub
    # the real naming; file-name order runs against the normal in patient 0, along it in patient 1
    for i, patient in enumerate(ct_patients(2)):
        names = sorted((chaos_src / "CT" / patient / "DICOM_anon").glob("*.dcm"), key=lambda p: natural_key(p.name))
        assert [p.name for p in names] == [f"i{k:04d},0000b.dcm" for k in range(12)]
        assert [p.name for p in sorted((chaos_src / "CT" / patient / "Ground").glob("*.png"))] == \
            [f"liver_GT_{k:03d}.png" for k in range(12)]
        z = [float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]) for p in names]
        assert z == sorted(z, reverse=(i == 0))
    t2 = sorted(p.name for p in (case / "T2SPIR" / "DICOM_anon").glob("*.dcm"))
    assert t2[0] == "IMG-0002-00031.dcm" and len(t2) == 12
    inp = sorted(p.name for p in (case / "T1DUAL" / "DICOM_anon" / "InPhase").glob("*.dcm"))
    outp = sorted(p.name for p in (case / "T1DUAL" / "DICOM_anon" / "OutPhase").glob("*.dcm"))
    assert inp[:2] == ["IMG-0004-00002.dcm", "IMG-0004-00004.dcm"] and outp[0] == "IMG-0004-00001.dcm"


# ------------------------------------------------------------------ round trip against the phantom truth

@pytest.mark.parametrize("modality", ["CT", "T1DUAL", "T2SPIR"])
def test_round_trip_labels_images_geometry(modality, chaos_src, tmp_path):
    assert _convert(chaos_src, tmp_path / "raw", modality, "--file-ending", ".nrrd") == 0
    ds = tmp_path / "raw" / f"Dataset009_CHAOS_{modality}"           # default name carries the modality
    meta = json.loads((ds / "dataset.json").read_text())
    assert meta["numTraining"] == N
    if modality == "CT":
        assert meta["labels"] == {"background": 0, "liver": 1} and meta["channel_names"] == {"0": "CT"}
    else:
        assert meta["labels"] == MR_LABELS
    patients = ct_patients(N) if modality == "CT" else mr_patients(N)
    for i, patient in enumerate(patients):
        if modality == "CT":
            g, hu, liver = make_ct(0, i)
            channels, truth, folders = [hu], liver.astype(np.uint8), [chaos_src / "CT" / patient / "DICOM_anon"]
        else:
            g, vols, truth = make_mr(0, i, modality)
            channels = list(vols.values())
            base = chaos_src / "MR" / patient / modality / "DICOM_anon"
            folders = [base / sub for sub in vols]
        assert not np.array_equal(truth, truth[::-1])                 # a reversed stack would be caught
        seg = sitk.ReadImage(str(ds / "labelsTr" / f"{patient}.nrrd"))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(seg), truth)
        _assert_geometry(seg, folders[0])
        np.testing.assert_allclose(seg.GetSpacing(), g.spacing, atol=1e-6)
        np.testing.assert_allclose(seg.GetOrigin(), g.origin, atol=1e-6)
        assert sorted(p.name for p in (ds / "imagesTr").glob(f"{patient}_*")) == \
            [f"{patient}_{c:04d}.nrrd" for c in range(len(channels))]
        for c, (vol, folder) in enumerate(zip(channels, folders)):
            img = sitk.ReadImage(str(ds / "imagesTr" / f"{patient}_{c:04d}.nrrd"))
            np.testing.assert_array_equal(sitk.GetArrayFromImage(img), vol)
            _assert_geometry(img, folder)


def test_t1dual_is_two_channels_in_phase_then_out_phase(chaos_src, tmp_path):
    assert _convert(chaos_src, tmp_path / "raw", "T1DUAL", "--name", "Dual") == 0
    ds = tmp_path / "raw" / "Dataset009_Dual"
    meta = json.loads((ds / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "T1_in_phase", "1": "T1_out_phase"}
    _, vols, labels = make_mr(0, 0, "T1DUAL")
    inp, outp = (read_array(ds / "imagesTr" / f"{mr_patients(N)[0]}_{c:04d}.nii.gz") for c in (0, 1))
    np.testing.assert_array_equal(inp, vols["InPhase"])
    np.testing.assert_array_equal(outp, vols["OutPhase"])
    assert inp[labels == 1].mean() > outp[labels == 1].mean() + 50     # liver loses signal out of phase


def test_mr_masks_are_decoded_by_intensity_range():
    table = _decode_table("MR")
    for name, (lo, hi) in MR_RANGES.items():
        assert table[lo] == table[hi] == MR_LABELS[name]
    for outside in (1, 54, 71, 109, 136, 174, 201, 239):
        assert table[outside] == 255                                 # flagged as unexpected
    ct = _decode_table("CT")
    assert ct[0] == 0 and ct[255] == 1 and (np.delete(ct, [0, 255]) == 255).all()
    assert sorted(["IMG-10.png", "IMG-9.png", "IMG-100.png"], key=natural_key) == \
        ["IMG-9.png", "IMG-10.png", "IMG-100.png"]


def test_demo_pngs_use_in_range_offsets_and_decode_to_the_truth(chaos_src, tmp_path):
    ground = chaos_src / "MR" / mr_patients(N)[1] / "T2SPIR" / "Ground"
    raw = np.stack([read_array(p) for p in sorted(ground.glob("*.png"))])
    assert set(np.unique(raw)) == {0, 58, 121, 184, 247}             # 63/126/189/252 shifted by -5
    assert _convert(chaos_src, tmp_path / "raw", "T2SPIR") == 0
    seg = read_array(tmp_path / "raw" / "Dataset009_CHAOS_T2SPIR" / "labelsTr" / f"{mr_patients(N)[1]}.nii.gz")
    assert set(np.unique(seg)) == {0, 1, 2, 3, 4}


# ------------------------------------------------------------------ the slice rule

def _stack_by(rule: str, dicom: Path, ground: Path) -> np.ndarray:
    """PNG stack placed into position order by a candidate rule (only 'file-name' is right)."""
    files = sorted(dicom.glob("*.dcm"), key=lambda p: natural_key(p.name))
    heads = [pydicom.dcmread(p, stop_before_pixels=True) for p in files]
    z = np.array([float(h.ImagePositionPatient[2]) for h in heads])
    position_of = np.argsort(np.argsort(z))
    pngs = [read_array(p) for p in sorted(ground.glob("*.png"), key=lambda p: natural_key(p.name))]
    n = len(pngs)
    if rule == "instance-number":
        target = [position_of[i] for i in np.argsort([int(h.InstanceNumber) for h in heads])]
    elif rule == "instance-number-minus-one":
        by_value = {int(h.InstanceNumber) - 1: position_of[k] for k, h in enumerate(heads)}
        target = [by_value.get(i, (i + 1) % n) for i in range(n)]
    elif rule == "file-name":
        target = list(position_of)
    elif rule == "position":
        target = list(range(n))
    else:                                                              # "reversed position"
        target = list(range(n - 1, -1, -1))
    out = np.zeros((n, *pngs[0].shape), pngs[0].dtype)
    for png, k in zip(pngs, target):
        out[k] = png
    return out


@pytest.mark.parametrize("rule", ["position", "reversed position", "instance-number-minus-one"])
def test_the_demo_fails_any_other_slice_rule(rule, chaos_src):
    """The documented rule reproduces the truth for every patient; each alternative breaks one."""
    wrong = 0
    for i, patient in enumerate(ct_patients(N)):
        case = chaos_src / "CT" / patient
        truth = make_ct(0, i)[2].astype(np.uint8) * 255
        np.testing.assert_array_equal(_stack_by("file-name", case / "DICOM_anon", case / "Ground"), truth)
        wrong += not np.array_equal(_stack_by(rule, case / "DICOM_anon", case / "Ground"), truth)
    for i, patient in enumerate(mr_patients(N)):
        case = chaos_src / "MR" / patient / "T1DUAL"
        truth = make_mr(0, i, "T1DUAL")[2] > 0
        ok = _stack_by("file-name", case / "DICOM_anon" / "InPhase", case / "Ground") > 0
        np.testing.assert_array_equal(ok, truth)
        wrong += not np.array_equal(_stack_by(rule, case / "DICOM_anon" / "InPhase", case / "Ground") > 0, truth)
    assert wrong > 0


def _write_oblique_case(root: Path, shape, spacing, origin, rot, descending, rng):
    """One CT patient with an oblique orientation, CHAOS file names (in InstanceNumber order, along
    or against the normal) and a distinct mask per slice."""
    n, rows, cols = shape
    dicom, ground = root / "CT" / "7" / "DICOM_anon", root / "CT" / "7" / "Ground"
    dicom.mkdir(parents=True)
    ground.mkdir()
    hu = rng.integers(-1000, 1000, shape).astype(np.int16)
    masks = rng.integers(0, 2, shape).astype(np.uint8)
    masks[np.arange(n), np.arange(n) % rows, np.arange(n) % cols] = 1        # no slice repeats another
    numbers = instance_numbers(0 if descending else 1, n, start=5)
    uids = {"study": "1.2.3", "series": "1.2.3.4", "frame": "1.2.3.5", "patient": "p"}
    for k, f in enumerate(np.argsort(np.argsort(numbers))):
        position = np.asarray(origin) + k * spacing[2] * rot[:, 2]
        ds = dicom_slice(hu[k], "CT", {**uids, "sop": f"1.2.3.4.{k + 1}"}, numbers[k], position,
                         np.concatenate([rot[:, 0], rot[:, 1]]), (spacing[1], spacing[0]), spacing[2])
        pydicom.dcmwrite(dicom / f"i{f:04d},0000b.dcm", ds, enforce_file_format=True)
    for i, k in enumerate(np.argsort(numbers)):
        sitk.WriteImage(sitk.GetImageFromArray(masks[k] * 255), str(ground / f"liver_GT_{i:03d}.png"))
    return hu, masks, dicom


geometry = geometries(((2, 6), (2, 7), (2, 7)), st.booleans())


@file_examples(10)
@given(geometry)
def test_oblique_geometry_and_slice_rule_round_trip(tmp_path_factory, geom):
    shape, spacing, origin, angles, descending = geom
    tmp = tmp_path_factory.mktemp("obl")
    rot = rotation(angles)
    hu, masks, dicom = _write_oblique_case(tmp / "src", shape, spacing, origin, rot, descending,
                                           np.random.default_rng(sum(shape)))
    assert _convert(tmp / "src", tmp / "raw", "CT", "--file-ending", ".nrrd") == 0
    ds = tmp / "raw" / "Dataset009_CHAOS_CT"
    seg = sitk.ReadImage(str(ds / "labelsTr" / "7.nrrd"))
    img = sitk.ReadImage(str(ds / "imagesTr" / "7_0000.nrrd"))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(seg), masks)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img), hu)
    for o in (seg, img):
        _assert_geometry(o, dicom, atol=1e-5)
        np.testing.assert_allclose(o.GetDirection(), rot.ravel(), atol=1e-6)


# ------------------------------------------------------------------ bad inputs through the CLI

def _rewrite_png(path: Path, fn):
    arr = read_array(path)
    sitk.WriteImage(sitk.GetImageFromArray(fn(arr)), str(path))


def _edit_dicom(path: Path, **tags):
    ds = pydicom.dcmread(path)
    for k, v in tags.items():
        setattr(ds, k, v)
    ds.save_as(path)


def _corrupt(kind: str, src: Path) -> tuple[str, str, str]:
    """Break one thing; return (modality, culprit path fragment, message fragment)."""
    ct, mr = src / "CT" / "4", src / "MR" / "5"
    dcm = sorted((ct / "DICOM_anon").glob("*.dcm"))
    if kind == "png count":
        sorted((ct / "Ground").glob("*.png"))[-1].unlink()
        return "CT", "CT/4/Ground", "11 PNG masks for 12 DICOM slices"
    if kind == "png transposed":
        _rewrite_png(ct / "Ground" / "liver_GT_003.png", lambda a: np.ascontiguousarray(a.T))
        return "CT", "liver_GT_003.png", "columns x rows"
    if kind == "png intensity CT":
        _rewrite_png(ct / "Ground" / "liver_GT_005.png", lambda a: np.where(a > 0, 128, a).astype(np.uint8))
        return "CT", "liver_GT_005.png", "unexpected mask intensity 128"
    if kind == "png intensity MR":
        png = sorted((mr / "T2SPIR" / "Ground").glob("*.png"))[4]
        _rewrite_png(png, lambda a: np.where(a == 0, a, 100).astype(np.uint8))
        return "T2SPIR", png.name, "unexpected mask intensity 100"
    if kind == "png rgb":
        png = ct / "Ground" / "liver_GT_002.png"
        a = read_array(png)
        sitk.WriteImage(sitk.GetImageFromArray(np.stack([a, a, a], -1), isVector=True), str(png))
        return "CT", "liver_GT_002.png", "3 channels"
    if kind == "not dicom":
        dcm[3].write_text("hello")
        return "CT", dcm[3].name, "not a readable DICOM file"
    if kind == "truncated dicom":
        data = dcm[3].read_bytes()
        dcm[3].write_bytes(data[: len(data) - 500])
        return "CT", dcm[3].name, "truncated pixel data"
    if kind == "missing Ground":
        shutil.rmtree(mr / "T1DUAL" / "Ground")
        return "T1DUAL", "MR/5/T1DUAL/Ground", "Ground folder not found"
    if kind == "mixed series":
        _edit_dicom(dcm[5], SeriesInstanceUID="1.2.3.999")
        return "CT", f"CT/4/DICOM_anon/{dcm[5].name}", "mixed series"
    if kind == "in/out phase geometry":
        for p in (mr / "T1DUAL" / "DICOM_anon" / "OutPhase").glob("*.dcm"):
            ipp = pydicom.dcmread(p).ImagePositionPatient
            _edit_dicom(p, ImagePositionPatient=[float(ipp[0]) + 1.5, ipp[1], ipp[2]])
        return "T1DUAL", "OutPhase", "differ from InPhase"
    if kind == "file names out of position order":
        a, b = dcm[4], dcm[7]
        a.rename(a.with_name("swap"))
        b.rename(a)
        a.with_name("swap").rename(b)
        return "CT", f"CT/4/DICOM_anon/{dcm[5].name}", "file-name order disagrees with ImagePositionPatient"
    if kind == "duplicate position":
        _edit_dicom(dcm[1], ImagePositionPatient=pydicom.dcmread(dcm[2]).ImagePositionPatient)
        return "CT", "CT/4/DICOM_anon", "same slice position"
    raise ValueError(kind)


BAD = ["png count", "png transposed", "png intensity CT", "png intensity MR", "png rgb", "not dicom",
       "truncated dicom", "missing Ground", "mixed series", "in/out phase geometry", "duplicate position",
       "file names out of position order"]


@pytest.mark.parametrize("kind", BAD)
def test_bad_input_one_line_exit_2_nothing_written(kind, chaos_src, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(chaos_src, src)
    modality, culprit, problem = _corrupt(kind, src)
    r = run_cli("convert", "chaos", src, "--modality", modality, "--dataset-id", "9", "--out", tmp_path / "raw",
                "--strict", timeout=120)
    assert r.returncode == 2, r.stderr
    err = [l for l in r.stderr.replace("\r", "\n").splitlines() if "error:" in l or "Traceback" in l]
    assert len(err) == 1 and culprit in err[0] and problem in err[0], err
    assert not (tmp_path / "raw").exists() or not any((tmp_path / "raw").iterdir())


# ------------------------------------------------------------------ re-runs, nnU-Net, COCO

def test_rerun_gives_identical_bytes(chaos_src, tmp_path):
    assert _convert(chaos_src, tmp_path / "a", "T1DUAL") == 0
    before = _files(tmp_path / "a")
    assert _convert(chaos_src, tmp_path / "a", "T1DUAL", "--overwrite", "-j", "2") == 0
    assert _files(tmp_path / "a") == before
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["Dataset009_CHAOS_T1DUAL"]


@pytest.mark.parametrize("modality", ["CT", "T1DUAL"])
def test_verify_dataset_integrity_with_nnunet(modality, chaos_src, tmp_path):
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    assert _convert(chaos_src, tmp_path / "raw", modality) == 0
    verify_dataset_integrity(str(tmp_path / "raw" / f"Dataset009_CHAOS_{modality}"), num_processes=1)


def test_to_coco_loads_in_pycocotools(chaos_src, tmp_path):
    from pycocotools.coco import COCO

    assert _convert(chaos_src, tmp_path / "coco", "T2SPIR", "--to", "coco", "--num-folds", "3") == 0
    names = set()
    for split in ("train", "val"):
        coco = COCO(str(tmp_path / "coco" / "annotations" / f"instances_{split}.json"))
        names |= {c["name"] for c in coco.loadCats(coco.getCatIds())}
        assert coco.getAnnIds() and coco.getImgIds()
        ann = coco.loadAnns(coco.getAnnIds()[:1])[0]
        img = coco.loadImgs(ann["image_id"])[0]
        assert coco.annToMask(ann).shape == (img["height"], img["width"]) == (56, 64)
    assert names == {"liver", "kidney_right", "kidney_left", "spleen"}


def test_modality_is_required_and_name_order_does_not_matter(chaos_src, tmp_path):
    r = run_cli("convert", "chaos", chaos_src, "--dataset-id", "9", "--out", tmp_path / "x")
    assert r.returncode == 2 and "--modality" in r.stderr and not (tmp_path / "x").exists()
    assert _main([str(chaos_src), "--name", "Liver", "--modality", "CT", "--dataset-id", "9",
                  "--out", str(tmp_path / "y")]) == 0
    assert (tmp_path / "y" / "Dataset009_Liver" / "dataset.json").is_file()
    report = json.loads((tmp_path / "y" / "Dataset009_Liver" / "conversion_report.json").read_text())
    assert [r["file_names_run"] for r in report["cases"]] == \
        ["against the slice normal", "along the slice normal", "against the slice normal"]


def test_instance_numbers_play_no_part(chaos_src, tmp_path):
    """Masks follow the DICOM file names (the organisers' rule) even when InstanceNumbers are shuffled."""
    src = tmp_path / "src"
    shutil.copytree(chaos_src, src)
    files = sorted((src / "CT" / "1" / "DICOM_anon").glob("*.dcm"))
    for p, number in zip(files, np.random.default_rng(3).permutation(len(files)) + 40):
        _edit_dicom(p, InstanceNumber=int(number))
    assert _convert(src, tmp_path / "raw", "CT") == 0
    ds = tmp_path / "raw" / "Dataset009_CHAOS_CT"
    np.testing.assert_array_equal(read_array(ds / "labelsTr" / "1.nii.gz"), make_ct(0, 0)[2])
    record = next(r for r in json.loads((ds / "conversion_report.json").read_text())["cases"] if r["case"] == "1")
    assert record["file_names_run"] == "against the slice normal"


def test_file_names_out_of_position_order_fail_only_that_patient(chaos_src, tmp_path, capsys):
    from organmtl.cli import main

    src = tmp_path / "src"
    shutil.copytree(chaos_src, src)
    _, culprit, problem = _corrupt("file names out of position order", src)
    assert main(["convert", "chaos", str(src), "--modality", "CT", "--dataset-id", "9", "--out",
                 str(tmp_path / "raw")]) == 1
    lines = [l for l in capsys.readouterr().err.splitlines() if "not converted" in l]
    assert len(lines) == 1 and culprit in lines[0] and problem in lines[0], lines
    ds = tmp_path / "raw" / "Dataset009_CHAOS_CT"
    assert sorted(p.name for p in (ds / "labelsTr").iterdir()) == ["1.nii.gz", "7.nii.gz"]


def test_test_sets_without_ground_become_imagests(chaos_src, tmp_path):
    """CHAOS Test_Sets hold no Ground folder: with --test their patients are written as images only."""
    test = tmp_path / "Test_Sets"
    shutil.copytree(chaos_src, test)
    for patient in mr_patients(N):
        shutil.rmtree(test / "MR" / patient / "T1DUAL" / "Ground")
        (test / "MR" / patient).rename(test / "MR" / f"{int(patient) + 100}")
    assert _convert(chaos_src, tmp_path / "raw", "T1DUAL", "--test", str(test)) == 0
    ds = tmp_path / "raw" / "Dataset009_CHAOS_T1DUAL"
    ids = [str(int(p) + 100) for p in mr_patients(N)]
    assert sorted(p.name for p in (ds / "imagesTs").iterdir()) == sorted(f"{i}_{c:04d}.nii.gz" for i in ids
                                                                          for c in (0, 1))
    assert not any((ds / "labelsTs").iterdir())
    np.testing.assert_array_equal(read_array(ds / "imagesTs" / f"{ids[0]}_0001.nii.gz"),
                                  make_mr(0, 0, "T1DUAL")[1]["OutPhase"])
    report = json.loads((ds / "conversion_report.json").read_text())
    tests = [r for r in report["cases"] if r["split"] == "test"]
    assert len(tests) == N and all(r["action"].startswith("kept, image only") for r in tests)
    assert json.loads((ds / "dataset.json").read_text())["numTraining"] == N
