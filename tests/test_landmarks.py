"""Landmark reading: Slicer .fcsv RAS/LPS conventions, voxel text files, outside/duplicate drops."""
import numpy as np
import pytest
import SimpleITK as sitk

from organmtl.converters.common import ConversionError
from organmtl.converters.landmarks import landmarks_record, read_fcsv, read_voxel_txt
from organmtl.demo_data.shapes import write_fcsv


def _image():
    img = sitk.Image(10, 20, 30, sitk.sitkInt16)
    img.SetSpacing((2.0, 1.0, 0.5))
    img.SetOrigin((-10.0, 5.0, 100.0))
    return img


@pytest.mark.parametrize("system", ["RAS", "LPS"])
def test_fcsv_is_returned_in_lps(tmp_path, system):
    write_fcsv(tmp_path / "p.fcsv", [("a", np.array([1.0, 2.0, 3.0]))], system)
    (name, p), = read_fcsv(tmp_path / "p.fcsv")
    assert name == "a"
    np.testing.assert_allclose(p, [1.0, 2.0, 3.0])


def test_fcsv_numeric_coordinate_system_and_default(tmp_path):
    body = "vtkMRMLMarkupsFiducialNode_0,1,2,3,0,0,0,1,1,1,0,x,,\n"
    (tmp_path / "ras0.fcsv").write_text("# CoordinateSystem = 0\n" + body)
    (tmp_path / "lps1.fcsv").write_text("# CoordinateSystem = 1\n" + body)
    (tmp_path / "none.fcsv").write_text(body)                   # Slicer's default is RAS
    np.testing.assert_allclose(read_fcsv(tmp_path / "ras0.fcsv")[0][1], [-1, -2, 3])
    np.testing.assert_allclose(read_fcsv(tmp_path / "lps1.fcsv")[0][1], [1, 2, 3])
    np.testing.assert_allclose(read_fcsv(tmp_path / "none.fcsv")[0][1], [-1, -2, 3])
    (tmp_path / "bad.fcsv").write_text("# CoordinateSystem = XYZ\n" + body)
    with pytest.raises(ConversionError, match="bad.fcsv"):
        read_fcsv(tmp_path / "bad.fcsv")


def test_record_drops_outside_and_duplicates():
    img = _image()
    inside = np.array(img.TransformIndexToPhysicalPoint((3, 4, 5)))
    rec = landmarks_record("c", [("a", inside), ("far", inside + [0, 0, 1000]), ("a", inside + 1),
                                 ("b", inside)], img)
    assert [l["name"] for l in rec["landmarks"]] == ["a"]
    np.testing.assert_allclose(rec["landmarks"][0]["voxel_xyz"], [3, 4, 5])
    assert [d["reason"] for d in rec["dropped"]] == ["outside the image", "duplicate of a", "duplicate of a"]


def test_voxel_text_file(tmp_path):
    img = _image()
    (tmp_path / "hips.txt").write_text("1 2 3\n4 5 6\n")
    pts = read_voxel_txt(tmp_path / "hips.txt", img, names=["hip_left", "hip_right"])
    assert [n for n, _ in pts] == ["hip_left", "hip_right"]
    np.testing.assert_allclose(pts[0][1], img.TransformContinuousIndexToPhysicalPoint((1, 2, 3)))
    (tmp_path / "bad.txt").write_text("1 2\n")
    with pytest.raises(ConversionError, match="bad.txt:1"):
        read_voxel_txt(tmp_path / "bad.txt", img)
