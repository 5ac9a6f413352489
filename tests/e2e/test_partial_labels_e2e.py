"""Partial labels end to end with the stock commands (docs/partial_labels.md): the demo's two
abdomen annotators (``liver_kidneys``, ``spleen_pancreas_bladder``) converted and merged, planned
once; ``nnUNetv2_train`` with ``nnUNetTrainerOMTLPartialLabels_Tiny`` in both formulations;
``nnUNetv2_predict`` on the held-out full-truth phantoms from a shell asking for the other
formulation (the stored one must win: the two networks have different output layers); ``organmtl
evaluate --never-together`` on the full truth and ``--annotated-only`` on nnU-Net's validation."""
import json

import numpy as np
import pytest
import torch

from organmtl.converters.merge import ANNOTATED_KEY
from organmtl.demo_data import write_demo_data
from organmtl.demo_data.partial import ANNOTATORS, FULL_TRUTH, MERGED_LABELS, convert_commands
from organmtl.nnunet_trainers.multitask.partial_labels import PLANS_KEY
from organmtl.procs import run_in_group, venv_bin
from tests.helpers import assert_crossval_ready, nnunet_env_vars, read_array, run_cli

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(2400)]
MERGED = 760
TRAINER = "nnUNetTrainerOMTLPartialLabels_Tiny"
BUDGET = {"ORGANMTL_EPOCHS": "1", "ORGANMTL_ITERS_PER_EPOCH": "2", "ORGANMTL_VAL_ITERS": "1"}


def _ok(r):
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def partial(tmp_path_factory):
    """3 scans per annotator + 2 full-truth scans -> convert volumes x 2 -> merge -> plan-tiny; fold 0
    validates on the first scan of each annotator."""
    root = tmp_path_factory.mktemp("partial_e2e")
    write_demo_data(root / "demo", families=["abdomen_partial"], n_cases=3)
    env = nnunet_env_vars(root)
    cmds, name = convert_commands(root / "demo" / "abdomen_partial", MERGED)
    for cmd in cmds:
        _ok(run_cli(*[c.format(raw=env["nnUNet_raw"]) for c in cmd], env=env))
    _ok(run_cli("plan-tiny", "-d", MERGED, "-np", "1", env=env, timeout=900))
    raw = root / "raw" / name
    meta = json.loads((raw / "dataset.json").read_text())
    cases = sorted(meta[ANNOTATED_KEY])
    val = [next(c for c in cases if c.startswith(a)) for a in ANNOTATORS]
    (root / "pre" / name / "splits_final.json").write_text(
        json.dumps([{"train": [c for c in cases if c not in val], "val": val}]))
    return {"root": root, "env": env, "name": name, "raw": raw, "meta": meta, "truth": root / "demo" / "abdomen_partial" / FULL_TRUTH}


@pytest.mark.parametrize("formulation,other", [("marginal", "sigmoid"), ("sigmoid", "marginal")])
def test_stock_train_predict_evaluate(partial, formulation, other, tmp_path):
    env = {**partial["env"], **BUDGET, "nnUNet_results": str(tmp_path / "res")}
    if formulation == "sigmoid":
        env["ORGANMTL_PARTIAL_LOSS"] = "sigmoid"              # marginal: the default, variable unset
    log = tmp_path / "train.log"
    run_in_group([venv_bin("nnUNetv2_train"), str(MERGED), "3d_tiny", "0", "-tr", TRAINER, "-device", "cpu",
                  "--npz"], env=env, log_file=log, timeout=900)
    text = log.read_text()
    assert f"partial labels: formulation {formulation} (stored with the plans); 9 class pair(s) never annotated" in text
    assert "task-balanced batches over ['liver_kidneys', 'spleen_pancreas_bladder']" in text
    model = tmp_path / "res" / partial["name"] / f"{TRAINER}__nnUNetPlans__3d_tiny"
    plans = json.loads((model / "plans.json").read_text())
    assert plans["configurations"]["3d_tiny"][PLANS_KEY] == {"options": {"formulation": formulation}}
    ckpt = torch.load(model / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    heads = {k: v.shape[0] for k, v in ckpt["network_weights"].items() if "seg_layers" in k and k.endswith("weight")}
    assert set(heads.values()) == {6 if formulation == "sigmoid" else 7}, heads    # 6 sigmoids / 7 softmax classes
    assert_crossval_ready(model / "fold_0")   # 7 channels either way: ensembles with softmax models (--npz)

    # stock prediction from a shell that asks for the other formulation: the stored one builds the network
    pred = tmp_path / "pred"
    penv = {**env, "ORGANMTL_PARTIAL_LOSS": other}
    run_in_group([venv_bin("nnUNetv2_predict"), "-i", str(partial["truth"] / "images"), "-o", str(pred),
                  "-d", str(MERGED), "-c", "3d_tiny", "-f", "0", "-tr", TRAINER, "-device", "cpu", "-npp", "1",
                  "-nps", "1"], env=penv, log_file=tmp_path / "predict.log", timeout=600)
    truths = sorted((partial["truth"] / "labels").glob("*.nii.gz"))
    for t in truths:
        p = read_array(pred / t.name)
        assert p.shape == read_array(t).shape
        assert set(np.unique(p).tolist()) <= set(MERGED_LABELS.values())   # one label map over the union

    r = _ok(run_cli("evaluate", pred, partial["truth"] / "labels", "--dataset-json", partial["raw"] / "dataset.json",
                    "--never-together", env=env))
    nt = json.loads((pred / "organmtl_summary.json").read_text())["never_annotated_together"]
    assert len(nt["pairs"]) == 9 and sorted(nt["structures"]) == sorted(o for o in MERGED_LABELS if o != "background")
    assert nt["mean_dice"] is not None and "never annotated together: 9 pair(s)" in r.stdout

    val = model / "fold_0" / "validation"
    out = tmp_path / "val_eval"
    _ok(run_cli("evaluate", val, partial["raw"] / "labelsTr", "--dataset-json", partial["raw"] / "dataset.json",
                "--annotated-only", "-o", out, env=env))
    rows = (out / "per_case.csv").read_text().splitlines()
    lk = [r for r in rows[1:] if r.startswith("liver_kidneys_")]
    assert len(lk) == 3 and all(any(f",{o}," in r for o in ANNOTATORS["liver_kidneys"]) for r in lk)
    summary = json.loads((out / "organmtl_summary.json").read_text())
    assert set(summary["per_source"]) == set(ANNOTATORS)
