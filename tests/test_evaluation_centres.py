"""SOL-Net localisation in ``organmtl evaluate`` (FocusNetv2 paper Table 7): hand-made centres with
known offsets from the organs' centres of mass -> known errors in mm and identification rates."""
import csv
import json
import math

import numpy as np
import pytest
import SimpleITK as sitk

from organmtl.evaluation.centres import evaluate_centre_folder, reference_centres
from tests.helpers import run_cli

SPACING_XYZ = (0.5, 1.0, 2.0)
ORIGIN = (-20.0, 10.0, 5.0)
#: a 90-degree rotation about z: image x runs along physical y, image y along physical -x
DIRECTION = (0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0)
LABELS = {"chiasm": 3, "optic_nerve_L": 4}


def _image(arr):
    img = sitk.GetImageFromArray(arr.astype(np.uint8))
    img.SetSpacing(SPACING_XYZ)
    img.SetOrigin(ORIGIN)
    img.SetDirection(DIRECTION)
    return img


def _world(z, y, x):
    """Physical point of the continuous array index (z, y, x), computed by hand from the geometry."""
    d = np.asarray(DIRECTION).reshape(3, 3)
    return np.asarray(ORIGIN) + d @ (np.asarray([x, y, z]) * np.asarray(SPACING_XYZ))


def _centres_file(path, centres):
    path.write_text(json.dumps({"format": "organmtl.focusnet.centres/1", "coordinates": "world_mm is (x, y, z)",
                                "centres": {n: {"label": LABELS[n], "voxel_preprocessed": [0, 0, 0], "peak": 0.9,
                                                "world_mm": list(map(float, w))} for n, w in centres.items()}}))


@pytest.fixture()
def han(tmp_path):
    """c0: chiasm exact (0 mm), optic nerve off by (3, 4, 0) mm (5 mm). c1: chiasm off by 3.5 mm,
    optic nerve missing from the file (not identified). c2: no optic nerve in the reference (not
    scored), chiasm off by 4.5 mm."""
    ds, pred = tmp_path / "Dataset901_HaN", tmp_path / "pred"
    (ds / "labelsTs").mkdir(parents=True)
    pred.mkdir()
    offsets = {"c0": {"chiasm": (0, 0, 0), "optic_nerve_L": (3, 4, 0)}, "c1": {"chiasm": (0, 0, 3.5)},
               "c2": {"chiasm": (4.5, 0, 0), "optic_nerve_L": (0, 0, 0)}}
    for case, off in offsets.items():
        g = np.zeros((10, 12, 14), np.uint8)
        g[2:5, 3:6, 4:8] = 3                         # centre of mass (3, 4, 5.5)
        if case != "c2":
            g[6:9, 8:9, 9:13] = 4                    # centre of mass (7, 8, 10.5)
        sitk.WriteImage(_image(g), str(ds / "labelsTs" / f"{case}.nii.gz"))
        sitk.WriteImage(_image(g), str(pred / f"{case}.nii.gz"))
        centre = {"chiasm": _world(3, 4, 5.5), "optic_nerve_L": _world(7, 8, 10.5)}
        _centres_file(pred / f"{case}_centres.json", {n: centre[n] + np.asarray(o, float) for n, o in off.items()})
    (ds / "dataset.json").write_text(json.dumps({
        "labels": {"background": 0, "chiasm": 3, "optic_nerve_L": 4}, "channel_names": {"0": "CT"},
        "file_ending": ".nii.gz", "numTraining": 0}))
    return pred, ds


def test_reference_centre_is_the_physical_centre_of_mass(han):
    pred, ds = han
    ref = reference_centres(ds / "labelsTs" / "c0.nii.gz", LABELS)
    np.testing.assert_allclose(ref["chiasm"], _world(3, 4, 5.5), atol=1e-9)
    # by hand: x = -20 - 1.0*4, y = 10 + 0.5*5.5, z = 5 + 2*3
    np.testing.assert_allclose(ref["chiasm"], [-24.0, 12.75, 11.0], atol=1e-9)
    assert reference_centres(ds / "labelsTs" / "c2.nii.gz", LABELS)["optic_nerve_L"] is None


def test_known_errors_and_identification_rates(han):
    pred, ds = han
    rows, s = evaluate_centre_folder(pred, ds / "labelsTs")
    got = {(r["case"], r["organ"]): r["error_mm"] for r in rows}
    assert set(got) == {("c0", "chiasm"), ("c0", "optic_nerve_L"), ("c1", "chiasm"), ("c1", "optic_nerve_L"),
                        ("c2", "chiasm")}
    assert got[("c0", "chiasm")] == pytest.approx(0.0, abs=1e-9)
    assert got[("c0", "optic_nerve_L")] == pytest.approx(5.0)
    assert got[("c1", "chiasm")] == pytest.approx(3.5) and got[("c2", "chiasm")] == pytest.approx(4.5)
    assert math.isnan(got[("c1", "optic_nerve_L")])
    assert s["n_centres"] == 5 and s["n_missing"] == 1 and s["n_no_reference"] == 1
    assert s["error_mm"]["mean"] == pytest.approx((0 + 5 + 3.5 + 4.5) / 4) and s["error_mm"]["n_undefined"] == 1
    # errors 0, 5, 3.5, 4.5, missing: <=3: 1/5, <=4: 2/5, <=5: 4/5
    assert s["identification_rates"] == pytest.approx({"3mm": 0.2, "4mm": 0.4, "5mm": 0.8})
    assert s["per_organ"]["chiasm"]["identification_rates"] == pytest.approx({"3mm": 1 / 3, "4mm": 2 / 3, "5mm": 1.0})
    assert s["per_organ"]["optic_nerve_L"]["identification_rates"] == pytest.approx({"3mm": 0.0, "4mm": 0.0, "5mm": 0.5})
    # only the cases asked for (those of the segmentation evaluation)
    rows, s = evaluate_centre_folder(pred, ds / "labelsTs", cases={"c1"})
    assert s["n_cases"] == 1 and s["identification_rates"]["4mm"] == pytest.approx(0.5)


def test_organmtl_evaluate_reports_centres(han, tmp_path):
    pred, ds = han
    out = tmp_path / "eval"
    r = run_cli("evaluate", pred, ds / "labelsTs", "-o", out)
    assert r.returncode == 0, r.stderr
    s = json.loads((out / "organmtl_summary.json").read_text())["centres"]
    assert s["identification_rates"] == pytest.approx({"3mm": 0.2, "4mm": 0.4, "5mm": 0.8})
    assert s["per_organ"]["optic_nerve_L"]["error_mm"]["mean"] == pytest.approx(5.0)
    md = (out / "summary.md").read_text()
    assert "| SOL-Net centres | n | mean error mm | median mm | ID rate <= 3mm | ID rate <= 4mm | ID rate <= 5mm |" in md
    assert "| all | 5 | 3.25 | 4.00 | 20.0% | 40.0% | 80.0% |" in md and "| chiasm | 3 | 2.67 |" in md
    with open(out / "centres_per_case.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 5 and {r["status"] for r in rows} == {"ok", "missing_prediction"}
    # --centres pointing elsewhere, and bad input: one line, exit 2
    other = tmp_path / "centres"
    other.mkdir()
    (other / "c0_centres.json").write_text((pred / "c0_centres.json").read_text())
    r = run_cli("evaluate", pred, ds / "labelsTs", "-o", tmp_path / "e2", "--centres", other)
    assert r.returncode == 0, r.stderr
    s = json.loads((tmp_path / "e2" / "organmtl_summary.json").read_text())["centres"]
    assert s["n_missing"] == 3 and s["identification_rates"]["5mm"] == pytest.approx(2 / 5)
    (other / "c0_centres.json").write_text("{\"centres\": 3}")
    r = run_cli("evaluate", pred, ds / "labelsTs", "-o", tmp_path / "e3", "--centres", other)
    assert r.returncode == 2 and "c0_centres.json: not a SOL-Net centres file" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
