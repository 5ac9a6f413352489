"""DICOM CT + RTSTRUCT converter: exact rasterisation (squares, a triangle, holes, separate and
overlapping contours, clipping), geometry equal to the CT headers for head-first, feet-first and
oblique orientations, slice order by position, --roi-map, --ct-series, a corpus of bad inputs
through the CLI, byte-identical re-runs, nnU-Net's integrity check and the COCO export."""
import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from matplotlib.path import Path as MplPath

from organmtl.cli import main
from organmtl.converters.dicom_rt import fill_polygons, physical_to_index
from organmtl.demo_data.dicom_rt import (FEET_FIRST_SUPINE, HEAD_FIRST_SUPINE, Case, Contour, Roi, SeriesGeometry,
                                         ground_truth, make_case, save, write_case, write_dicom_rt)
from tests.conftest import run_cli

DEMO_LABELS = {"Body": "Body", "PAROTID_L": "PAROTID_L", "Parotid R": "Parotid_R", "Spinal Cord": "Spinal_Cord",
               "Vertebra": "Vertebra"}


def _convert(src, out, *extra):
    return main(["convert", "dicom-rt", str(src), "--dataset-id", "9", "--name", "T", "--out", str(out),
                 *map(str, extra)])


def _dataset(out) -> Path:
    return Path(out) / "Dataset009_T"


def _read(path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


@pytest.fixture(scope="module")
def rt_src(tmp_path_factory) -> Path:
    """The demo family (4 cases: head first, body clipped, no Parotid R, feet first)."""
    root = tmp_path_factory.mktemp("dicom_rt") / "src"
    write_dicom_rt(root, 4, seed=0)
    return root


def _index_case(root: Path, geometry: SeriesGeometry, rois_ij: dict, case_id="c1", seed=5) -> Case:
    """A case whose ROIs are given as polygons in voxel indices ``(i, j)`` on slices ``k``."""
    rois = []
    for n, (name, contours) in enumerate(rois_ij.items(), start=1):
        rois.append(Roi(n, name, [Contour(geometry.plane_points(k, np.asarray(poly, float) * geometry.spacing_xyz[:2]),
                                          k if 0 <= k < geometry.shape_zyx[0] else None) for k, poly in contours]))
    hu = np.arange(np.prod(geometry.shape_zyx)).reshape(geometry.shape_zyx).astype(np.int16) % 2000 - 1000
    case = Case(case_id, geometry, hu, rois, seed)
    write_case(root / case_id, case)
    return case


def _square(a, b, c, d):
    return [(a, b), (c, b), (c, d), (a, d)]


# ------------------------------------------------------------------ rasterisation, exact voxel sets

def test_rasterisation_equals_analytic_masks(tmp_path):
    """Corners on voxel centres (exact binary fractions end to end), so the tie rule is tested:
    left/top edges in, right/bottom out; inner contours cut holes; contours combine by XOR."""
    g = SeriesGeometry((7, 10, 12), (0.5, 1.25, 2.0), (10.25, -20.5, 33.0))
    rois = {
        "Square": [(0, _square(2, 3, 6, 8))],
        "Ring": [(1, _square(1, 1, 9, 9)), (1, _square(3, 3, 6, 6)[::-1])],
        "Two": [(2, _square(0, 0, 2, 2)), (2, _square(5, 4, 8, 7))],
        "Xor": [(3, _square(0, 0, 4, 4)), (3, _square(2, 2, 6, 6))],
        "Triangle": [(4, [(0, 0), (6, 0), (0, 6)])],
        "Clipped": [(5, _square(-3, -3, 4, 4)), (-2, _square(1, 1, 3, 3)), (9, _square(1, 1, 3, 3))],
        "Between": [(6, [(1.5, 2.5), (4.5, 2.5), (4.5, 5.5), (1.5, 5.5)])],   # edges between centres
    }
    _index_case(tmp_path / "src", g, rois)
    assert _convert(tmp_path / "src", tmp_path / "raw", "--file-ending", ".nrrd") == 0
    ds = _dataset(tmp_path / "raw")
    seg = _read(ds / "labelsTr" / "c1.nrrd")
    labels = json.loads((ds / "dataset.json").read_text())["labels"]
    expected = {name: np.zeros(g.shape_zyx, bool) for name in rois}
    expected["Square"][0, 3:8, 2:6] = True
    expected["Ring"][1, 1:9, 1:9] = True
    expected["Ring"][1, 3:6, 3:6] = False
    expected["Two"][2, 0:2, 0:2] = expected["Two"][2, 4:7, 5:8] = True
    expected["Xor"][3, 0:4, 0:4] = True
    expected["Xor"][3, 2:6, 2:6] ^= True
    jj, ii = np.mgrid[0:10, 0:12]
    expected["Triangle"][4] = (ii + jj < 6)
    expected["Clipped"][5, 0:4, 0:4] = True
    expected["Between"][6, 3:6, 2:5] = True
    for name, mask in expected.items():
        np.testing.assert_array_equal(seg == labels[name], mask, err_msg=name)
    assert expected["Triangle"].sum() == 21 and expected["Xor"].sum() == 24
    record = json.loads((ds / "conversion_report.json").read_text())["cases"][0]
    assert record["contours_clipped"] == {"Clipped": 1}
    assert record["contours_outside_slices"] == {"Clipped": 2}
    assert record["overlap_voxels"] == {}


def _star(rng, center, n, r_min, r_max):
    angles = np.sort(rng.uniform(0, 2 * np.pi, n))
    radii = rng.uniform(r_min, r_max, n)
    return np.stack([center[0] + radii * np.cos(angles), center[1] + radii * np.sin(angles)], axis=1)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2 ** 32 - 1))
def test_fill_matches_matplotlib_on_generic_polygons(seed):
    """Away from exact ties the fill is the voxel-centre-in-polygon test, XOR over contours."""
    rng = np.random.default_rng(seed)
    polys = [_star(rng, rng.uniform(-2, 14, 2), int(rng.integers(3, 12)), 0.5, 8.0) for _ in range(rng.integers(1, 4))]
    jj, ii = np.mgrid[0:11, 0:13]
    centres = np.stack([ii.ravel(), jj.ravel()], axis=1)
    expected = np.zeros(ii.size, bool)
    for p in polys:
        expected ^= MplPath(p).contains_points(centres)
    np.testing.assert_array_equal(fill_polygons(polys, (11, 13)).ravel(), expected)


def _rotation(a, b, c):
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _header_geometry(folder: Path):
    """Spacing, origin and direction a CT series' headers define (lowest slice along the normal)."""
    hdr = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(folder.rglob("*.dcm"))]
    hdr = [h for h in hdr if h.Modality == "CT"]
    iop = np.array(hdr[0].ImageOrientationPatient, float)
    normal = np.cross(iop[:3], iop[3:])
    pos = np.array(sorted((np.array(h.ImagePositionPatient, float) for h in hdr), key=lambda p: p @ normal))
    gap = (pos[-1] - pos[0]) @ normal / (len(pos) - 1)
    spacing = (float(hdr[0].PixelSpacing[1]), float(hdr[0].PixelSpacing[0]), gap)
    return spacing, pos[0], np.stack([iop[:3], iop[3:], normal], axis=1).ravel()


orientations = st.one_of(st.just(HEAD_FIRST_SUPINE), st.just(FEET_FIRST_SUPINE),
                         st.tuples(*[st.floats(-np.pi, np.pi)] * 3).map(
                             lambda a: tuple(np.round(_rotation(*a)[:, :2].T.ravel(), 10) + 0.0)))


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(orientations, st.tuples(st.integers(3, 6), st.integers(6, 14), st.integers(6, 14)),
       st.tuples(*[st.sampled_from([0.6, 0.8, 1.0, 1.25, 2.5, 3.0])] * 3), st.integers(0, 2 ** 32 - 1))
def test_geometry_and_labels_for_any_orientation(tmp_path_factory, orientation, shape, spacing, seed):
    """Output spacing/origin/direction equal what the CT headers define, labels equal the mm-space
    ground truth, for head-first, feet-first and oblique ImageOrientationPatient."""
    rng = np.random.default_rng(seed)
    tmp = tmp_path_factory.mktemp("geom")
    g = SeriesGeometry(shape, spacing, tuple(np.round(rng.uniform(-300, 300, 3), 4)), orientation)
    centre = (shape[2] / 2, shape[1] / 2)
    rois = {"A": [(k, _star(rng, centre, 9, 1.0, 0.7 * max(shape[1:]))) for k in range(shape[0])],
            "Holed": [(k, p) for k in range(0, shape[0], 2)
                      for p in (_star(rng, centre, 7, 2.5, 3.5), _star(rng, centre, 5, 0.6, 1.2))]}
    case = _index_case(tmp / "src", g, rois)
    assert _convert(tmp / "src", tmp / "raw", "--file-ending", ".nrrd") == 0
    ds = _dataset(tmp / "raw")
    img, seg = sitk.ReadImage(str(ds / "imagesTr" / "c1_0000.nrrd")), _read(ds / "labelsTr" / "c1.nrrd")
    spacing_h, origin_h, direction_h = _header_geometry(tmp / "src" / "c1")
    np.testing.assert_allclose(img.GetSpacing(), spacing_h, atol=1e-6)
    np.testing.assert_allclose(img.GetOrigin(), origin_h, atol=1e-6)
    np.testing.assert_allclose(img.GetDirection(), direction_h, atol=1e-6)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img), case.hu)
    gt = ground_truth(case)
    expected = np.zeros(shape, np.uint8)
    expected[gt["A"]] = 1
    expected[gt["Holed"]] = 2
    np.testing.assert_array_equal(seg, expected)
    pts = rng.uniform(-50, 50, (20, 3)) + np.asarray(g.first_position)
    np.testing.assert_allclose(physical_to_index(img, pts),
                               [img.TransformPhysicalPointToContinuousIndex(p.tolist()) for p in pts], atol=1e-9)


# ------------------------------------------------------------------ the demo family

def test_demo_conversion_equals_ground_truth(rt_src, tmp_path):
    assert _convert(rt_src, tmp_path / "raw") == 0
    ds = _dataset(tmp_path / "raw")
    meta = json.loads((ds / "dataset.json").read_text())
    assert list(meta["labels"]) == ["background", *DEMO_LABELS.values()]
    assert meta["numTraining"] == 3 and meta["organmtl_landmarks"] == "landmarks"
    report = {r["case"]: r for r in json.loads((ds / "conversion_report.json").read_text())["cases"]}
    assert report["rt002"]["action"] == "dropped" and report["rt002"]["missing"] == ["Parotid_R"]
    assert report["rt001"]["contours_clipped"] == {"Body": 16}            # body wider than the image
    for i in (0, 1, 3):
        case = make_case(i, 0)
        gt = ground_truth(case)
        seg = _read(ds / "labelsTr" / f"{case.case_id}.nii.gz")
        expected = np.zeros_like(seg)
        for roi, label in DEMO_LABELS.items():
            expected[gt[roi]] = meta["labels"][label]
        np.testing.assert_array_equal(seg, expected)
        img = sitk.ReadImage(str(ds / "imagesTr" / f"{case.case_id}_0000.nii.gz"))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(img), case.hu)
        np.testing.assert_allclose(img.GetDirection(), case.geometry.direction, atol=1e-6)
        assert report[case.case_id]["overlap_voxels"]["Spinal_Cord"] == gt["Spinal Cord"].sum()   # later wins
        lm = json.loads((ds / "landmarks" / f"{case.case_id}.json").read_text())["landmarks"]
        iso = next(r for r in case.rois if r.name == "ISO").contours[0].points[0]
        assert [p["name"] for p in lm] == ["ISO"]
        np.testing.assert_allclose(lm[0]["lps_mm"], iso, atol=1e-4)
    # the hole: the vertebra never covers the spinal canal
    assert not (gt["Vertebra"] & gt["Spinal Cord"]).any() and (gt["Vertebra"].sum(axis=(1, 2)) > 0).any()


def test_slices_ordered_by_position_not_name_or_instance_number(rt_src, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(rt_src / "rt003", src / "rt003")                      # feet first: normal to the feet
    ct = src / "rt003" / "CT"
    hdr = {p: pydicom.dcmread(p) for p in ct.iterdir()}
    by_position = sorted(hdr, key=lambda p: float(hdr[p].ImagePositionPatient[2]), reverse=True)
    assert sorted(hdr) != by_position                                   # the demo shuffles names
    for n, p in enumerate(by_position):                                 # names and numbers now run backwards
        ds = hdr[p]
        ds.InstanceNumber = len(hdr) - n
        p.unlink()
        save(ds, ct / f"z{len(hdr) - n:03d}")                           # no .dcm suffix: DICOM by preamble
    (src / "rt003" / "README.txt").write_text("not DICOM, skipped\n")
    assert _convert(src, tmp_path / "raw") == 0
    img = sitk.ReadImage(str(_dataset(tmp_path / "raw") / "imagesTr" / "rt003_0000.nii.gz"))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img), make_case(3, 0).hu)
    assert img.GetDirection()[8] == -1.0


def test_roi_map_regex_missing_policies_and_label_order(rt_src, tmp_path):
    roi_map = tmp_path / "map.json"
    roi_map.write_text(json.dumps({"Parotid_L": "parotid[ _-]?(l|left)", "Parotid_R": "parotid[ _-]?(r|right)",
                                   "Cord": ["spinal[ _]cord", "cord"], "Body": "body|external"}))
    assert _convert(rt_src, tmp_path / "a", "--roi-map", roi_map) == 0
    ds = _dataset(tmp_path / "a")
    labels = json.loads((ds / "dataset.json").read_text())["labels"]
    assert labels == {"background": 0, "Parotid_L": 1, "Parotid_R": 2, "Cord": 3, "Body": 4}
    report = {r["case"]: r for r in json.loads((ds / "conversion_report.json").read_text())["cases"]}
    assert report["rt000"]["rois"] == {"Parotid_L": "PAROTID_L", "Parotid_R": "Parotid R", "Cord": "Spinal Cord",
                                       "Body": "Body"}
    assert report["rt000"]["unmatched_rois"] == ["Vertebra"]          # the POINT ROI goes to landmarks
    assert report["rt002"]["action"] == "dropped"
    gt = ground_truth(make_case(0, 0))
    seg = _read(ds / "labelsTr" / "rt000.nii.gz")
    np.testing.assert_array_equal(seg == 4, gt["Body"])                 # Body listed last: it wins everywhere
    assert report["rt000"]["overlap_voxels"]["Body"] == (gt["PAROTID_L"] | gt["Parotid R"] | gt["Spinal Cord"]).sum()

    body_first = tmp_path / "body_first.json"
    body_first.write_text(json.dumps({"Body": "body", **json.loads(roi_map.read_text())}))
    assert _convert(rt_src, tmp_path / "b", "--roi-map", body_first, "--missing", "ignore") == 0
    ds = _dataset(tmp_path / "b")
    assert json.loads((ds / "dataset.json").read_text())["labels"] == {
        "background": 0, "Body": 1, "Parotid_L": 2, "Parotid_R": 3, "Cord": 4, "ignore": 5}
    seg = _read(ds / "labelsTr" / "rt002.nii.gz")
    assert set(np.unique(seg)) == {1, 2, 4, 5}                          # no Parotid_R, no background
    assert _convert(rt_src, tmp_path / "c", "--roi-map", body_first, "--missing", "background") == 0
    assert set(np.unique(_read(_dataset(tmp_path / "c") / "labelsTr" / "rt002.nii.gz"))) == {0, 1, 2, 4}


def test_roi_map_matching_two_rois_is_refused(rt_src, tmp_path, capsys):
    roi_map = tmp_path / "map.json"
    roi_map.write_text(json.dumps({"Parotid": "parotid.*"}))
    assert _convert(rt_src, tmp_path / "raw", "--roi-map", roi_map) == 2
    err = capsys.readouterr().err
    assert "RS.dcm" in err and "'PAROTID_L' and 'Parotid R' both map to label 'Parotid'" in err


def _add_decoy_series(case_dir: Path) -> None:
    write_case(case_dir / "decoy", dataclasses.replace(make_case(1, 0), case_id="decoy"))
    shutil.rmtree(case_dir / "decoy" / "RTSTRUCT")


def test_ct_series_referenced_picks_the_rtstruct_series(rt_src, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(rt_src / "rt000", src / "rt000")
    _add_decoy_series(src / "rt000")
    assert _convert(src, tmp_path / "raw", "--ct-series", "referenced") == 0
    img = _read(_dataset(tmp_path / "raw") / "imagesTr" / "rt000_0000.nii.gz")
    np.testing.assert_array_equal(img, make_case(0, 0).hu)


def test_verify_dataset_integrity_with_nnunet(rt_src, tmp_path):
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    assert _convert(rt_src, tmp_path / "raw", "--missing", "ignore") == 0
    verify_dataset_integrity(str(_dataset(tmp_path / "raw")), num_processes=1)


def test_rerun_gives_identical_bytes(rt_src, tmp_path):
    write_dicom_rt(tmp_path / "again", 4, seed=0)                      # the demo writer too
    for p in rt_src.rglob("*"):
        if p.is_file():
            assert (tmp_path / "again" / p.relative_to(rt_src)).read_bytes() == p.read_bytes(), p
    assert _convert(rt_src, tmp_path / "a") == 0
    before = {p.relative_to(tmp_path / "a"): p.read_bytes() for p in (tmp_path / "a").rglob("*") if p.is_file()}
    assert _convert(rt_src, tmp_path / "a", "--overwrite", "-j", "2") == 0
    after = {p.relative_to(tmp_path / "a"): p.read_bytes() for p in (tmp_path / "a").rglob("*") if p.is_file()}
    assert before.keys() == after.keys() and all(before[k] == after[k] for k in before)


def test_to_coco_loads_in_pycocotools(rt_src, tmp_path):
    from pycocotools.coco import COCO

    r = run_cli("convert", "dicom-rt", rt_src, "--dataset-id", "9", "--to", "coco", "--out", tmp_path / "coco",
                "--instances", "class", "--num-folds", "3")
    assert r.returncode == 0, r.stderr
    names = set()
    for split in ("train", "val"):
        coco = COCO(str(tmp_path / "coco" / "annotations" / f"instances_{split}.json"))
        assert coco.getImgIds() and coco.getAnnIds()
        names |= {c["name"] for c in coco.loadCats(coco.getCatIds())}
        vertebra = coco.getCatIds(catNms=["Vertebra"])
        for ann in coco.loadAnns(coco.getAnnIds(catIds=vertebra)):
            assert isinstance(ann["segmentation"], dict)                 # a ring: RLE keeps the hole
            assert coco.annToMask(ann).sum() == ann["area"]
    assert names == set(DEMO_LABELS.values())


# ------------------------------------------------------------------ bad input corpus (through the CLI)

def _edit_rtstruct(case: Path, edit) -> str:
    path = case / "RTSTRUCT" / "RS.dcm"
    ds = pydicom.dcmread(path)
    edit(ds)
    save(ds, path)
    return "RS.dcm"


def _roi_contours(ds, name):
    number = next(s.ROINumber for s in ds.StructureSetROISequence if s.ROIName == name)
    return next(c for c in ds.ROIContourSequence if c.ReferencedROINumber == number)


def _shift_contour(ds):
    contour = _roi_contours(ds, "Spinal Cord").ContourSequence[3]
    data = [float(v) for v in contour.ContourData]
    data[2::3] = [z + 1.0 for z in data[2::3]]
    contour.ContourData = data


def _other_series(ds):
    ds.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0].RTReferencedSeriesSequence[0] \
        .SeriesInstanceUID = "1.2.3.4.5"


def _other_frame(ds):
    for s in ds.StructureSetROISequence:
        s.ReferencedFrameOfReferenceUID = "1.2.3.4.6"


def _corrupt(kind: str, case: Path) -> str:
    ct = case / "CT"
    if kind == "no CT files":
        shutil.rmtree(ct)
        return "rt001"
    if kind == "no RTSTRUCT":
        shutil.rmtree(case / "RTSTRUCT")
        return "rt001"
    if kind == "two RTSTRUCTs":
        shutil.copy(case / "RTSTRUCT" / "RS.dcm", case / "RS_copy.dcm")
        return "RS_copy.dcm"
    if kind == "not DICOM":
        (ct / "IM0007.dcm").write_text("hello")
        return "IM0007.dcm"
    if kind == "truncated slice":
        data = (ct / "IM0007.dcm").read_bytes()
        (ct / "IM0007.dcm").write_bytes(data[: len(data) // 2])
        return "IM0007.dcm"
    if kind == "missing slice":
        hdr = {p: float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]) for p in ct.iterdir()}
        order = sorted(hdr, key=hdr.get)
        order[5].unlink()
        return order[6].name
    if kind == "two CT series":
        _add_decoy_series(case)
        return "rt001"
    if kind == "references another series":
        return _edit_rtstruct(case, _other_series)
    if kind == "another frame of reference":
        return _edit_rtstruct(case, _other_frame)
    if kind == "contour off-plane":
        return _edit_rtstruct(case, _shift_contour)
    if kind == "empty ROI":
        return _edit_rtstruct(case, lambda ds: delattr(_roi_contours(ds, "Vertebra"), "ContourSequence"))
    if kind == "malformed ContourData":
        return _edit_rtstruct(case, lambda ds: setattr(_roi_contours(ds, "Body").ContourSequence[0], "ContourData",
                                                       [1.0, 2.0, 3.0, 4.0]))
    raise AssertionError(kind)


BAD = {"no CT files": "no CT image files", "no RTSTRUCT": "no RTSTRUCT file", "two RTSTRUCTs": "second RTSTRUCT",
       "not DICOM": "not a DICOM file", "truncated slice": "truncated", "missing slice": "missing slice",
       "two CT series": "2 CT series", "references another series": "references another series",
       "another frame of reference": "references another series", "contour off-plane": "off the nearest CT slice",
       "empty ROI": "empty ROI", "malformed ContourData": "malformed ContourData"}


@pytest.mark.parametrize("kind", list(BAD))
def test_bad_input_one_line_exit_2_nothing_written(kind, rt_src, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(rt_src, src)
    culprit = _corrupt(kind, src / "rt001")
    r = run_cli("convert", "dicom-rt", src, "--dataset-id", "9", "--name", "T", "--out", tmp_path / "raw")
    err = [line for line in r.stderr.replace("\r", "\n").splitlines() if "error:" in line or "Traceback" in line]
    assert r.returncode == 2, r.stderr
    assert len(err) == 1 and culprit in err[0] and "rt001" in err[0] and BAD[kind] in err[0], err
    assert not (tmp_path / "raw").exists() or not any((tmp_path / "raw").iterdir())
