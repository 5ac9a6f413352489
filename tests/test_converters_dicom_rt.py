"""DICOM CT + RTSTRUCT converter: exact rasterisation (squares, a triangle, holes, islands, separate
and overlapping contours, clipping), geometry equal to the CT headers for head-first, feet-first
and oblique orientations, slice order by position, --roi-map, --ct-series, byte-identical re-runs,
nnU-Net's integrity check, the COCO export, and the quirks of real planning-system exports (empty
and POINT ROIs, DICOMDIR/RTPLAN/RTDOSE/SR/secondary captures beside the CT, files without preamble,
paint order and --priority, several RTSTRUCTs, ROI synonyms). The bad-input corpus is in
tests/test_converters_bad_input.py."""
import copy
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
from organmtl.converters.dicom_rt import fill_polygons, physical_to_index, sanitise
from organmtl.demo_data.dicom_rt import (FEET_FIRST_SUPINE, HEAD_FIRST_SUPINE, Case, Contour, Roi, SeriesGeometry,
                                         ground_truth, make_case, save, write_case, write_dicom_rt)
from tests.helpers import rotation, run_cli

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
    left/top edges in, right/bottom out; nested contours cut holes (and an island inside a hole
    fills again); overlapping contours of one ROI add up (union), never cancel out."""
    g = SeriesGeometry((7, 10, 12), (0.5, 1.25, 2.0), (10.25, -20.5, 33.0))
    rois = {
        "Square": [(0, _square(2, 3, 6, 8))],
        "Ring": [(1, _square(1, 1, 9, 9)), (1, _square(3, 3, 6, 6)[::-1])],
        "Two": [(2, _square(0, 0, 2, 2)), (2, _square(5, 4, 8, 7))],
        "Union": [(3, _square(0, 0, 4, 4)), (3, _square(2, 2, 6, 6))],
        "Triangle": [(4, [(0, 0), (6, 0), (0, 6)])],
        "Clipped": [(5, _square(-3, -3, 4, 4)), (-2, _square(1, 1, 3, 3)), (9, _square(1, 1, 3, 3))],
        "Between": [(6, [(1.5, 2.5), (4.5, 2.5), (4.5, 5.5), (1.5, 5.5)])],   # edges between centres
        "Island": [(6, _square(6, 0, 11, 9)), (6, _square(7, 1, 10, 8)), (6, _square(8, 3, 9, 5))],
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
    expected["Union"][3, 0:4, 0:4] = expected["Union"][3, 2:6, 2:6] = True
    expected["Island"][6, 0:9, 6:11] = True
    expected["Island"][6, 1:8, 7:10] = False
    expected["Island"][6, 3:5, 8:9] = True
    jj, ii = np.mgrid[0:10, 0:12]
    expected["Triangle"][4] = (ii + jj < 6)
    expected["Clipped"][5, 0:4, 0:4] = True
    expected["Between"][6, 3:6, 2:5] = True
    for name, mask in expected.items():
        np.testing.assert_array_equal(seg == labels[name], mask, err_msg=name)
    assert expected["Triangle"].sum() == 21 and expected["Union"].sum() == 28 and expected["Island"].sum() == 26
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
                             lambda a: tuple(np.round(rotation(a)[:, :2].T.ravel(), 10) + 0.0)))


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
    assert _convert(tmp / "src", tmp / "raw", "--file-ending", ".nrrd", "--priority", "Holed") == 0
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
        assert report[case.case_id]["overlap_voxels"]["Spinal_Cord"] == gt["Spinal Cord"].sum()   # on top of Body
        assert report[case.case_id]["paint_order"][0] == "Body" and report[case.case_id]["warnings"] == []
        source = report[case.case_id]["source"]
        ct_dir = Path(source["ct_series_folder"])
        assert ct_dir == (rt_src / case.case_id / "CT").resolve()
        assert source["series_instance_uid"] == case.series_uid and source["frame_of_reference_uid"] == case.frame_uid
        assert source["sop_instance_uids"] == [case.slice_uid(k) for k in range(case.geometry.shape_zyx[0])]
        assert [pydicom.dcmread(ct_dir / f).SOPInstanceUID for f in source["ct_files"]] == source["sop_instance_uids"]
        assert source["rtstruct_file"] == str((rt_src / case.case_id / "RTSTRUCT" / "RS.dcm").resolve())
        assert source["rtstruct_sop_instance_uid"] == pydicom.dcmread(source["rtstruct_file"]).SOPInstanceUID
        assert source["other_rtstructs"] == []
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
    organs = gt["PAROTID_L"] | gt["Parotid R"] | gt["Spinal Cord"]
    np.testing.assert_array_equal(seg == 4, gt["Body"] & ~organs)       # Body listed last, painted first (largest)
    np.testing.assert_array_equal(seg == 3, gt["Spinal Cord"])
    assert "Body" not in report["rt000"]["overlap_voxels"] and report["rt000"]["paint_order"][0] == "Body"
    assert _convert(rt_src, tmp_path / "p", "--roi-map", roi_map, "--priority", "Body") == 0
    seg = _read(_dataset(tmp_path / "p") / "labelsTr" / "rt000.nii.gz")
    np.testing.assert_array_equal(seg == 4, gt["Body"])                 # --priority Body: on top of everything

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


def test_roi_map_matching_two_rois_fails_those_cases(rt_src, tmp_path, capsys):
    roi_map = tmp_path / "map.json"
    roi_map.write_text(json.dumps({"Parotid": "parotid.*"}))
    assert _convert(rt_src, tmp_path / "raw", "--roi-map", roi_map) == 1      # rt002 has one parotid only
    err = [line for line in capsys.readouterr().err.splitlines() if "not converted" in line]
    assert [line.split()[3] for line in err] == ["rt000", "rt001", "rt003"]
    assert all("RS.dcm" in line and "'PAROTID_L' and 'Parotid R' both map to label 'Parotid'" in line for line in err)
    assert sorted(p.name for p in (_dataset(tmp_path / "raw") / "labelsTr").iterdir()) == ["rt002.nii.gz"]


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


# ------------------------------------------------------------------ helpers shared with the bad-input corpus

def edit_rtstruct(case: Path, edit, name="RS.dcm") -> str:
    """Apply ``edit(ds)`` to a case's RTSTRUCT file and save it; returns the file name."""
    path = case / "RTSTRUCT" / name
    ds = pydicom.dcmread(path)
    edit(ds)
    save(ds, path)
    return name


def roi_contours(ds, name):
    number = next(s.ROINumber for s in ds.StructureSetROISequence if s.ROIName == name)
    return next(c for c in ds.ROIContourSequence if c.ReferencedROINumber == number)


def add_roi(ds, name, contours=()):
    """Append an ROI (StructureSetROISequence + ROIContourSequence items) with ``contours``
    (ContourSequence items); none gives an empty placeholder ROI, as TPS exports have."""
    number = max(int(s.ROINumber) for s in ds.StructureSetROISequence) + 1
    s = pydicom.Dataset()
    s.ROINumber, s.ROIName = number, name
    s.ReferencedFrameOfReferenceUID = ds.StructureSetROISequence[0].ReferencedFrameOfReferenceUID
    ds.StructureSetROISequence.append(s)
    c = pydicom.Dataset()
    c.ReferencedROINumber = number
    c.ROIDisplayColor = [255, 0, 0]
    if contours:
        c.ContourSequence = pydicom.Sequence(list(contours))
    ds.ROIContourSequence.append(c)


def copy_cases(rt_src: Path, dest: Path, *cases: str) -> Path:
    for c in cases or [p.name for p in rt_src.iterdir()]:
        shutil.copytree(rt_src / c, dest / c)
    return dest


def _expected_seg(case, labels: dict, names=DEMO_LABELS) -> np.ndarray:
    """The label map the demo case stands for under the default paint order (largest first)."""
    gt = ground_truth(case)
    present = [roi for roi in names if roi in gt]
    expected = np.zeros(case.geometry.shape_zyx, np.uint8)
    for roi in sorted(present, key=lambda r: -gt[r].sum()):
        expected[gt[roi]] = labels[names[roi]]
    return expected


# ------------------------------------------------------------------ real-export quirks

def test_empty_open_and_point_rois_are_skipped_in_every_roi_mode(rt_src, tmp_path):
    """An empty placeholder ROI and an open-contour-only ROI are skipped with a note; the POINT ROI
    is still a landmark; an ROI empty in one case leaves that case without the label (--missing)."""
    src = copy_cases(rt_src, tmp_path / "src")

    def placeholders(ds):
        add_roi(ds, "Areola")
        line = pydicom.Dataset()
        line.ContourGeometricType, line.NumberOfContourPoints = "OPEN_PLANAR", 2
        line.ContourData = [0.0, 0.0, float(ds.ROIContourSequence[0].ContourSequence[0].ContourData[2]), 5.0, 0.0,
                            float(ds.ROIContourSequence[0].ContourSequence[0].ContourData[2])]
        add_roi(ds, "Couch", [line])
    edit_rtstruct(src / "rt000", placeholders)
    edit_rtstruct(src / "rt001", lambda ds: delattr(roi_contours(ds, "Vertebra"), "ContourSequence"))
    assert _convert(src, tmp_path / "raw") == 0
    ds = _dataset(tmp_path / "raw")
    meta = json.loads((ds / "dataset.json").read_text())
    assert list(meta["labels"]) == ["background", *DEMO_LABELS.values()]
    report = {r["case"]: r for r in json.loads((ds / "conversion_report.json").read_text())["cases"]}
    assert report["rt000"]["notes"] == ["ROI 'Areola' skipped: no CLOSED_PLANAR contour (no contour)",
                                        "ROI 'Couch' skipped: no CLOSED_PLANAR contour (1 open contour(s) only)"]
    assert report["rt001"]["action"] == "dropped" and report["rt001"]["missing"] == ["Vertebra"]
    assert "ROI 'Vertebra' skipped" in report["rt001"]["notes"][0]
    np.testing.assert_array_equal(_read(ds / "labelsTr" / "rt000.nii.gz"),
                                  _expected_seg(make_case(0, 0), meta["labels"]))
    assert [p["name"] for p in json.loads((ds / "landmarks" / "rt000.json").read_text())["landmarks"]] == ["ISO"]

    roi_map = tmp_path / "map.json"                                    # asked for by the map: missing
    roi_map.write_text(json.dumps({"Body": "body", "Areola": "areola"}))
    assert _convert(src, tmp_path / "m", "--roi-map", roi_map, "--missing", "background") == 0
    report = json.loads((_dataset(tmp_path / "m") / "conversion_report.json").read_text())["cases"]
    assert report[0]["missing"] == ["Areola"]
    assert report[0]["action"] == "kept, missing structures counted as background"
    assert report[0]["notes"] == ["ROI 'Areola' (label 'Areola') has no CLOSED_PLANAR contour: counted as missing"]


def _testdata(name: str) -> Path:
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name, download=False)
    assert path is not None, name
    return Path(path)


def _converted_like_demo_case0(src: Path, raw: Path) -> Path:
    """Convert ``src`` (demo case rt000 plus extra files) and check image and labels are exactly the
    demo case's; returns the dataset folder."""
    assert _convert(src, raw) == 0
    ds = _dataset(raw)
    case = make_case(0, 0)
    np.testing.assert_array_equal(_read(ds / "imagesTr" / "rt000_0000.nii.gz"), case.hu)
    labels = json.loads((ds / "dataset.json").read_text())["labels"]
    np.testing.assert_array_equal(_read(ds / "labelsTr" / "rt000.nii.gz"), _expected_seg(case, labels))
    return ds


def test_other_dicom_objects_in_the_case_folder_are_skipped(rt_src, tmp_path):
    """Real files shipped with pydicom (DICOMDIR, RTPLAN, RTDOSE, SR, a secondary capture) and a
    screenshot/scout of the CT series itself beside the slices: skipped, listed, never fatal."""
    src = copy_cases(rt_src, tmp_path / "src", "rt000")
    case_dir = src / "rt000"
    extra = case_dir / "export"
    extra.mkdir()
    shutil.copy(_testdata("dicomdirtests/DICOMDIR"), case_dir / "DICOMDIR")
    for name in ("rtplan.dcm", "rtdose.dcm", "test-SR.dcm", "SC_rgb_small_odd.dcm"):
        shutil.copy(_testdata(name), extra / name)
    slice0 = pydicom.dcmread(sorted((case_dir / "CT").iterdir())[0])
    shot = copy.deepcopy(slice0)
    shot.SOPClassUID = shot.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"   # secondary capture
    shot.SOPInstanceUID = shot.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4.1"
    save(shot, case_dir / "CT" / "screenshot.dcm")
    scout = copy.deepcopy(slice0)
    scout.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    scout.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 0.0, -1.0]
    scout.SOPInstanceUID = scout.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4.2"
    save(scout, case_dir / "CT" / "scout.dcm")
    (case_dir / "notes.txt").write_text("plan approved\n")
    ds = _converted_like_demo_case0(src, tmp_path / "raw")
    record = json.loads((ds / "conversion_report.json").read_text())["cases"][0]
    skipped = {s["file"]: s["reason"] for s in record["skipped_files"]}
    assert skipped == {
        "CT/scout.dcm": "CT localizer (scout) image", "DICOMDIR": "DICOMDIR (media directory)",
        "CT/screenshot.dcm": "Modality CT but Secondary Capture Image Storage (not a CT Image Storage slice)",
        "export/SC_rgb_small_odd.dcm": "OT object", "export/rtdose.dcm": "RTDOSE object",
        "export/rtplan.dcm": "RTPLAN object", "export/test-SR.dcm": "SR object", "notes.txt": "not DICOM"}
    assert record["other_dicom_files"] == 7


def test_files_without_preamble_are_read(rt_src, tmp_path):
    """``.dcm`` files without the 128-byte preamble (bare data sets) are read with force=True: our
    RTSTRUCT and half the slices rewritten so, and pydicom's real ``rtstruct.dcm`` (no preamble, drawn
    on another series) beside them, which is set aside and reported."""
    from organmtl.demo_data.dicom_rt import save_raw

    src = copy_cases(rt_src, tmp_path / "src", "rt000")
    case_dir = src / "rt000"
    for p in [case_dir / "RTSTRUCT" / "RS.dcm", *sorted((case_dir / "CT").iterdir())[::2]]:
        save_raw(pydicom.dcmread(p), p)
        assert p.read_bytes()[128:132] != b"DICM"
    shutil.copy(_testdata("rtstruct.dcm"), case_dir / "RTSTRUCT" / "RS_other_series.dcm")
    ds = _converted_like_demo_case0(src, tmp_path / "raw")
    source = json.loads((ds / "conversion_report.json").read_text())["cases"][0]["source"]
    assert source["rtstruct_file"].endswith("RS.dcm")
    assert [(Path(o["file"]).name, o["reason"]) for o in source["other_rtstructs"]] == [
        ("RS_other_series.dcm", "references no CT series of the case folder")]


def test_several_rtstructs_choose_by_rule(rt_src, tmp_path):
    """Re-contouring: the newest StructureSetDate/Time wins by default; oldest and label=REGEX
    choose otherwise; a byte copy (same SOPInstanceUID) counts once; the others are reported."""
    src = copy_cases(rt_src, tmp_path / "src", "rt000")
    rs = src / "rt000" / "RTSTRUCT"
    shutil.copy(rs / "RS.dcm", rs / "RS_copy.dcm")

    def newer(ds):
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4.9"
        ds.StructureSetDate, ds.StructureSetTime, ds.StructureSetLabel = "20240102", "101500", "revised"
        next(s for s in ds.StructureSetROISequence if s.ROIName == "PAROTID_L").ROIName = "Parotid_L_v2"
    ds = pydicom.dcmread(rs / "RS.dcm")
    newer(ds)
    save(ds, rs / "RS_v2.dcm")

    def run(out, *extra):
        assert _convert(src, tmp_path / out, *extra) == 0
        record = json.loads((_dataset(tmp_path / out) / "conversion_report.json").read_text())["cases"][0]
        others = {Path(o["file"]).name: o["reason"] for o in record["source"]["other_rtstructs"]}
        return Path(record["source"]["rtstruct_file"]).name, set(record["rois"]), others

    chosen, rois, others = run("newest")
    assert chosen == "RS_v2.dcm" and "Parotid_L_v2" in rois
    assert others == {"RS_copy.dcm": "copy of RS.dcm (same SOPInstanceUID)",
                      "RS.dcm": "older (--rtstruct-select newest)"}
    chosen, rois, _ = run("oldest", "--rtstruct-select", "oldest")
    assert chosen == "RS.dcm" and "PAROTID_L" in rois
    chosen, _, others = run("label", "--rtstruct-select", "label=organmtl.*")
    assert chosen == "RS.dcm" and others["RS_v2.dcm"] == "StructureSetLabel does not match 'organmtl.*'"


def test_paint_order_largest_first_and_overlap_warning(tmp_path, capsys):
    """An enclosing ROI listed after the organs no longer erases them; two ROIs that overlap
    without nesting by more than a few percent are warned about; nested ones are not."""
    g = SeriesGeometry((2, 12, 12), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0))
    rois = {"A": [(0, _square(0, 0, 6, 6))], "B": [(0, _square(4, 4, 10, 10))],
            "Inner": [(0, _square(1, 1, 3, 3))], "Outline": [(0, _square(0, 0, 12, 12)), (1, _square(0, 0, 12, 12))]}
    _index_case(tmp_path / "src", g, rois)
    assert _convert(tmp_path / "src", tmp_path / "raw") == 0
    ds = _dataset(tmp_path / "raw")
    labels = json.loads((ds / "dataset.json").read_text())["labels"]
    seg = _read(ds / "labelsTr" / "c1.nii.gz")
    expected = np.full((2, 12, 12), labels["Outline"], np.uint8)
    expected[0, 0:6, 0:6] = labels["A"]
    expected[0, 4:10, 4:10] = labels["B"]                              # equal volume: map order, B on top
    expected[0, 1:3, 1:3] = labels["Inner"]
    np.testing.assert_array_equal(seg, expected)
    record = json.loads((ds / "conversion_report.json").read_text())["cases"][0]
    assert record["paint_order"] == ["Outline", "A", "B", "Inner"]
    assert record["warnings"] == ["'A' and 'B' overlap by 4 voxels (11.1% of 'A') without one containing the "
                                  "other; 'B' is painted over 'A' (see --priority)"]
    assert "c1: warning: 'A' and 'B' overlap" in capsys.readouterr().out
    assert _convert(tmp_path / "src", tmp_path / "p", "--priority", "A", "B") == 0
    seg = _read(_dataset(tmp_path / "p") / "labelsTr" / "c1.nii.gz")
    assert (seg[0, 4:6, 4:6] == labels["A"]).all() and (seg[0, 1:3, 1:3] == labels["A"]).all()


@pytest.mark.parametrize("name,label", [
    ("Lt Lung", "Lung_L"), ("Lung_L", "Lung_L"), ("LUNG LT", "Lung_L"), ("Left Lung", "Lung_L"),
    ("lung-left", "Lung_L"),
    ("Rt Lung", "Lung_R"), ("LUNG_R", "Lung_R"), ("Lungs", "Lungs"), ("Lung Total", "Lungs"), ("Parotid", None),
    ("PAROTID_L", "Parotid_L"), ("Parotid R", "Parotid_R"), ("Spinal Cord", "SpinalCord"), ("BODY", "External"),
    ("External", "External"), ("Brain Stem", "Brainstem"), ("Femoral Head Lt", "Femur_Head_L"), ("GTV", None),
    ("Oesophagus", "Esophagus"), ("Chiasm", "OpticChiasm"), ("OpticNerve_R", "OpticNrv_R"), ("Heart", "Heart"),
])
def test_synonym_table(name, label):
    from organmtl.converters.roi_synonyms import synonym_label

    assert synonym_label(name) == label


def test_synonym_table_from_roi_map_and_documented(tmp_path):
    from organmtl.converters.roi_synonyms import SYNONYMS

    g = SeriesGeometry((2, 10, 10), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0))
    rois = {"BODY": [(0, _square(0, 0, 10, 10)), (1, _square(0, 0, 10, 10))], "Lt Lung": [(0, _square(1, 1, 4, 8))],
            "LUNG RT": [(0, _square(5, 1, 9, 8))], "Heart": [(1, _square(3, 3, 6, 6))],
            "GTV": [(1, _square(7, 7, 9, 9))]}
    _index_case(tmp_path / "src", g, rois)
    assert _convert(tmp_path / "src", tmp_path / "a", "--roi-map", "tg263") == 0
    ds = _dataset(tmp_path / "a")
    assert json.loads((ds / "dataset.json").read_text())["labels"] == {
        "background": 0, "External": 1, "Lung_L": 2, "Lung_R": 3, "Heart": 4}
    record = json.loads((ds / "conversion_report.json").read_text())["cases"][0]
    assert record["rois"] == {"External": "BODY", "Lung_L": "Lt Lung", "Lung_R": "LUNG RT", "Heart": "Heart"}
    assert record["unmatched_rois"] == ["GTV"]
    roi_map = tmp_path / "map.json"
    roi_map.write_text(json.dumps({"Lung_L": "@tg263", "Tumour": ["@tg263", "gtv"]}))
    assert _convert(tmp_path / "src", tmp_path / "b", "--roi-map", roi_map) == 2    # Tumour is not in the table
    roi_map.write_text(json.dumps({"Lung_L": "@tg263", "Tumour": "gtv"}))
    assert _convert(tmp_path / "src", tmp_path / "b", "--roi-map", roi_map) == 0
    seg = _read(_dataset(tmp_path / "b") / "labelsTr" / "c1.nii.gz")
    assert (seg[0, 1:8, 1:4] == 1).all() and (seg[1, 7:9, 7:9] == 2).all()
    docs = (Path(__file__).resolve().parent.parent / "docs" / "converters.md").read_text()
    assert all(f"`{label}`" in docs for label in SYNONYMS), [l for l in SYNONYMS if f"`{l}`" not in docs]


def test_real_ct_headers_from_pydicom(tmp_path):
    """A series made of pydicom's real ``CT_small.dcm`` (a GE CT slice: signed 16-bit pixels,
    RescaleIntercept -1024, private tags) stacked at four positions, with an RTSTRUCT drawn in its
    frame: HU equal pydicom's decoding, labels equal the mm-space ground truth."""
    from organmtl.demo_data.dicom_rt import rtstruct

    real = pydicom.dcmread(_testdata("CT_small.dcm"))
    iop = tuple(float(v) for v in real.ImageOrientationPatient)
    first = tuple(float(v) for v in real.ImagePositionPatient)
    g = SeriesGeometry((4, int(real.Rows), int(real.Columns)), (float(real.PixelSpacing[1]),
                       float(real.PixelSpacing[0]), 5.0), first, iop)
    case = Case("gecase", g, np.zeros(g.shape_zyx, np.int16),
                [Roi(1, "Lesion", [Contour(g.plane_points(k, _star(np.random.default_rng(k), (40, 40), 11, 8, 25)), k)
                                   for k in range(4)]),
                 Roi(2, "Lt Lung", [Contour(g.plane_points(k, [(5, 5), (30, 5), (30, 60), (5, 60)]), k)
                                    for k in (1, 2)])])
    folder = tmp_path / "src" / "gecase"
    expected_hu = []
    for k in range(4):
        ds = copy.deepcopy(real)
        ds.ImagePositionPatient = [float(v) for v in g.position(k)]
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = case.slice_uid(k)
        ds.SeriesInstanceUID, ds.StudyInstanceUID = case.series_uid, case.study_uid
        ds.FrameOfReferenceUID, ds.InstanceNumber = case.frame_uid, 4 - k
        pixels = np.roll(real.pixel_array, 9 * k, axis=1)
        ds.PixelData = pixels.astype("<i2").tobytes()
        expected_hu.append(pixels.astype(np.int32) * int(ds.RescaleSlope) + int(ds.RescaleIntercept))
        save(ds, folder / "DICOM" / f"{k:08d}")
    save(rtstruct(case), folder / "RS.gecase.dcm")
    assert _convert(tmp_path / "src", tmp_path / "raw2") == 0
    ds = _dataset(tmp_path / "raw2")
    img = sitk.ReadImage(str(ds / "imagesTr" / "gecase_0000.nii.gz"))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img), np.stack(expected_hu))
    np.testing.assert_allclose(img.GetOrigin(), first, atol=1e-4)
    labels = json.loads((ds / "dataset.json").read_text())["labels"]
    gt = ground_truth(case)
    expected = np.zeros(g.shape_zyx, np.uint8)
    for roi in sorted(gt, key=lambda r: -gt[r].sum()):
        expected[gt[roi]] = labels[sanitise(roi)]
    np.testing.assert_array_equal(_read(ds / "labelsTr" / "gecase.nii.gz"), expected)
    assert _convert(tmp_path / "src", tmp_path / "tg", "--roi-map", "tg263") == 0
    labels = json.loads((_dataset(tmp_path / "tg") / "dataset.json").read_text())["labels"]
    assert labels == {"background": 0, "Lung_L": 1}
