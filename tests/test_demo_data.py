"""Demo phantoms: deterministic, in the raw layouts the converters read, with the promised quirks."""
import hashlib
import json

import numpy as np
import pytest
import SimpleITK as sitk

from organmtl.cli import main
from organmtl.demo_data import FAMILIES, write_demo_data


def _digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(root).as_posix().encode())
            if p.suffix in (".gz", ".nrrd"):
                h.update(sitk.GetArrayFromImage(sitk.ReadImage(str(p))).tobytes())
            else:
                h.update(p.read_bytes())
    return h.hexdigest()


def test_deterministic_from_seed(tmp_path):
    a = write_demo_data(tmp_path / "a", seed=3, families=["han_pddca", "visceral_ct"], n_cases=2)
    write_demo_data(tmp_path / "b", seed=3, families=["han_pddca", "visceral_ct"], n_cases=2)
    write_demo_data(tmp_path / "c", seed=4, families=["han_pddca", "visceral_ct"], n_cases=2)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b") != _digest(tmp_path / "c")
    assert a["families"]["han_pddca"] == ["0522c0000", "0522c0001"]


def test_layouts(demo_root):
    assert set(json.loads((demo_root / "index.json").read_text())["families"]) == set(FAMILIES)
    case = demo_root / "han_pddca" / "0522c0000"
    img = sitk.ReadImage(str(case / "img.nrrd"))
    assert img.GetSpacing() == pytest.approx((1.0, 1.0, 2.5))
    assert not (demo_root / "han_pddca" / "0522c0003" / "structures" / "Submandibular_L.nrrd").exists()
    chiasm = sitk.GetArrayFromImage(sitk.ReadImage(str(case / "structures" / "Chiasm.nrrd")))
    brainstem = sitk.GetArrayFromImage(sitk.ReadImage(str(case / "structures" / "BrainStem.nrrd")))
    assert 0 < chiasm.sum() < brainstem.sum() / 5                        # a small organ
    ab = demo_root / "abdomen_mr"
    assert {p.name for p in ab.iterdir()} == {"images", "labels", "landmarks", "mapping.json"}
    assert (ab / "images" / "wb000_0001.nii.gz").is_file()
    assert len((ab / "landmarks" / "wb000.txt").read_text().split("\n")[0].split()) == 3
    vis = demo_root / "visceral_ct"
    assert (vis / "Volumes" / "10000100_1_CT_wb.nii.gz").is_file()
    assert (vis / "Segmentations" / "10000100_1_CT_wb_29662_1.nii.gz").is_file()
    assert (vis / "Landmarks" / "10000100_1_CT_wb_landmarks_1.fcsv").is_file()
    for task in ("brain_mr", "breast_mr", "cardiac_cta"):
        assert (demo_root / "multimodal" / task / "mapping.json").is_file()
    spine = sitk.ReadImage(str(demo_root / "spine" / "spine_sag_mr" / "images" / "spine_sag_mr_000_0000.nii.gz"))
    assert spine.GetSize() == (128, 128, 1)


def test_cli_refuses_to_overwrite(tmp_path):
    assert main(["demo-data", str(tmp_path / "d"), "--families", "spine", "--n-cases", "1"]) == 0
    assert main(["demo-data", str(tmp_path / "d"), "--families", "spine", "--n-cases", "1"]) == 2
    assert main(["demo-data", str(tmp_path / "d"), "--families", "spine", "--n-cases", "1", "--overwrite"]) == 0


def test_demo_dicom_rt_validates_with_dciodvfy(demo_root):
    """One CT slice and the RTSTRUCT of the feet-first DICOM-RT demo case pass dciodvfy (dicom3tools,
    an independent validator of the CT Image and RT Structure Set IODs) with no Error line."""
    from pydicom import dcmread

    from tests.helpers import dciodvfy

    case = demo_root / "dicom_rt" / "rt003"
    ct = sorted((case / "CT").glob("*.dcm"))[0]
    for path in (ct, case / "RTSTRUCT" / "RS.dcm"):
        errors, warnings = dciodvfy(path)
        assert errors == [], (path, errors, warnings)
    assert dcmread(ct, stop_before_pixels=True).PatientPosition == "FFS"     # feet first, as its orientation says
