"""The partially labelled demo phantoms (``organmtl demo-data --families abdomen_partial``): two
annotators of the same anatomy on different scans, held-out full truth in the merged label values,
and the convert -> merge route that records which labels each case's source annotated."""
from __future__ import annotations

import numpy as np
import pytest

from organmtl.cli import main
from organmtl.converters.merge import ANNOTATED_KEY
from organmtl.demo_data.partial import ANNOTATORS, FULL_TRUTH, MERGED_LABELS, convert_commands
from tests.helpers import dataset_json, read_array


@pytest.fixture(scope="module")
def partial_demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("partial") / "demo"
    assert main(["demo-data", str(root), "--families", "abdomen_partial", "--n-cases", "2"]) == 0
    return root / "abdomen_partial"


def test_annotators_label_only_their_organs_on_different_scans(partial_demo):
    images = {}
    for annotator, organs in ANNOTATORS.items():
        labels = sorted((partial_demo / annotator / "labels").glob("*.nii.gz"))
        assert len(labels) == 2
        for p in labels:
            present = set(np.unique(read_array(p)).tolist())
            assert present == set(range(len(organs) + 1)), (p, present)     # every one of its organs, nothing else
            images[p.name] = read_array(partial_demo / annotator / "images" / p.name.replace(".nii.gz", "_0001.nii.gz"))
    arrays = list(images.values())
    assert all(not np.array_equal(arrays[0], a) for a in arrays[1:])       # different scans
    truth = sorted((partial_demo / FULL_TRUTH / "labels").glob("*.nii.gz"))
    assert len(truth) == 2                                                  # max(2, n_cases // 2) held out
    for p in truth:
        assert set(np.unique(read_array(p)).tolist()) == set(MERGED_LABELS.values())


def test_convert_and_merge_give_the_full_truth_label_values(partial_demo, tmp_path):
    raw = tmp_path / "raw"
    cmds, merged = convert_commands(partial_demo, 70)
    for cmd in cmds:
        assert main([c.format(raw=raw) for c in cmd] + ["--out", str(raw)]) == 0, cmd
    meta = dataset_json(raw / merged)
    assert meta["labels"] == MERGED_LABELS
    ann = meta[ANNOTATED_KEY]
    assert len(ann) == 4
    lk = [MERGED_LABELS[o] for o in ANNOTATORS["liver_kidneys"]]
    spb = [MERGED_LABELS[o] for o in ANNOTATORS["spleen_pancreas_bladder"]]
    assert all(v == (lk if c.startswith("liver_kidneys_") else spb) for c, v in ann.items())
