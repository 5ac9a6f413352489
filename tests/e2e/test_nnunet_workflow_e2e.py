"""nnU-Net's standard workflow after training, with organmtl trainers (docs/nnunet_workflow.md): the
stock baseline and FocusNetv2 trained on two folds of nnU-Net's own split of the demo HaN data with
``--npz`` (FocusNetv2's second fold without, then ``nnUNetv2_train --val --npz`` as nnU-Net says to
add them later: the session fixture ``han_crossval``), then ``nnUNetv2_find_best_configuration`` over both
trainers (cross-validation results, the ensemble of the two, postprocessing of the best), ``organmtl
evaluate`` on a cross-validation folder followed by ``nnUNetv2_determine_postprocessing`` on it (which reads
nnU-Net's ``summary.json`` there), ``nnUNetv2_ensemble`` of the two trainers' predicted probabilities
(``nnUNetv2_predict`` / ``organmtl predict-focusnet`` with ``--save_probabilities``, both folds) and
``nnUNetv2_apply_postprocessing`` with the chosen postprocessing. All commands in subprocesses.

The other organmtl trainers are checked where their e2e tests train them (``--npz`` and
``tests.helpers.assert_crossval_ready``)."""
from __future__ import annotations

import json
import pickle
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from organmtl.procs import run_in_group, venv_bin
from tests.e2e.conftest import CROSSVAL_BASELINE, CROSSVAL_FOCUSNET, CROSSVAL_FOLDS
from tests.helpers import assert_crossval_ready, read_array, run_cli

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]

BASELINE, FOCUSNET, FOLDS = CROSSVAL_BASELINE, CROSSVAL_FOCUSNET, CROSSVAL_FOLDS


def _softmax_ensemble(files) -> np.ndarray:
    """The label map of the averaged probabilities (argmax over classes), computed here from the npz files."""
    return np.mean([np.load(f)["probabilities"].astype(np.float32) for f in files], axis=0).argmax(0)


def test_crossval_find_best_configuration_ensemble_and_postprocessing(han_crossval, tmp_path):
    ds, splits = han_crossval.ds, han_crossval.splits
    env = {**ds.env, "ORGANMTL_CPU_THREADS": "1"}
    cfg, did = ds.configuration, str(ds.dataset_id)
    logs = tmp_path / "logs"
    logs.mkdir()

    def predict(trainer: str):
        """Both folds of ``trainer`` on one image with ``--save_probabilities``, for ``nnUNetv2_ensemble``:
        ``nnUNetv2_predict``, for FocusNet ``organmtl predict-focusnet`` (the same options; it pastes the small
        organs as the final validation did, nnUNetv2_predict gives S-Net's segmentation)."""
        out = tmp_path / "predict" / trainer
        command = [venv_bin("organmtl"), "predict-focusnet"] if trainer == FOCUSNET else [venv_bin("nnUNetv2_predict")]
        run_in_group([*command, "-i", str(images), "-o", str(out), "-d", did, "-c", cfg,
                      "-f", *map(str, FOLDS), "-tr", trainer, "-device", "cpu", "--save_probabilities",
                      "-npp", "1", "-nps", "1"], env=env, log_file=logs / f"predict_{trainer}.log", timeout=900)
        return out

    images = tmp_path / "images"
    images.mkdir()
    (case,) = splits[0]["val"]
    (images / f"{case}_0000.nii.gz").write_bytes((ds.raw / "imagesTr" / f"{case}_0000.nii.gz").read_bytes())
    beside = ThreadPoolExecutor(1)                         # the predictions run beside find_best_configuration
    predictions = beside.submit(lambda: [predict(t) for t in (BASELINE, FOCUSNET)])
    beside.shutdown(wait=False)
    val_cases = {k: splits[k]["val"] for k in FOLDS}
    for trainer in (BASELINE, FOCUSNET):
        for k in FOLDS:
            assert_crossval_ready(ds.fold(trainer, k), val_cases[k])
    # FocusNetv2's SOL-Net centres stay beside nnU-Net's files without disturbing them
    assert list((ds.fold(FOCUSNET, 0) / "validation").glob("*_centres.json"))

    # ---- nnUNetv2_find_best_configuration over both trainers and their ensemble
    run_in_group([venv_bin("nnUNetv2_find_best_configuration"), did, "-c", cfg, "-tr", BASELINE, FOCUSNET,
                  "-f", *map(str, FOLDS), "-np", "1"], env=env, log_file=logs / "find_best.log", timeout=900)
    from nnunetv2.evaluation.evaluate_predictions import load_summary_json
    from nnunetv2.utilities.file_path_utilities import get_ensemble_name

    models = {t: ds.fold(t, 0).parent for t in (BASELINE, FOCUSNET)}
    ensemble = get_ensemble_name(str(models[BASELINE]), str(models[FOCUSNET]), FOLDS)
    info = json.loads((ds.results / ds.name / "inference_information.json").read_text())
    assert set(info["all_results"]) == {models[BASELINE].name, models[FOCUSNET].name, ensemble}
    all_cases = sorted(c for k in FOLDS for c in val_cases[k])
    for trainer, model in models.items():
        cv = model / "crossval_results_folds_0_1"
        summary = load_summary_json(str(cv / "summary.json"))
        assert summary["foreground_mean"]["Dice"] == pytest.approx(info["all_results"][model.name])
        # the pooled cross-validation scores each case exactly as its fold's validation did
        pooled = {c["prediction_file"].rsplit("/", 1)[1]: c["metrics"] for c in summary["metric_per_case"]}
        assert sorted(pooled) == [f"{c}.nii.gz" for c in all_cases]
        for k in FOLDS:
            fold_summary = load_summary_json(str(ds.fold(trainer, k) / "validation" / "summary.json"))
            for c in fold_summary["metric_per_case"]:
                for label, m in c["metrics"].items():
                    assert pooled[c["prediction_file"].rsplit("/", 1)[1]][label]["Dice"] == \
                        pytest.approx(m["Dice"], nan_ok=True)
    ens_dir = ds.results / ds.name / "ensembles" / ensemble
    for k in FOLDS:
        for c in val_cases[k]:
            expected = _softmax_ensemble([ds.fold(t, k) / "validation" / f"{c}.npz" for t in models])
            np.testing.assert_array_equal(read_array(ens_dir / f"{c}.nii.gz"), expected)
    best = info["best_model_or_ensemble"]
    assert best["result_on_crossval_post_pp"] >= 0 and Path(best["postprocessing_file"]).is_file()

    # ---- organmtl evaluate on a cross-validation folder, then nnU-Net's postprocessing search on it
    cv = models[FOCUSNET] / "crossval_results_folds_0_1"
    nnunet_summary = (cv / "summary.json").read_bytes()
    r = run_cli("evaluate", cv, ds.raw / "labelsTr", env=env)
    assert r.returncode == 0, r.stderr
    assert (cv / "summary.json").read_bytes() == nnunet_summary and (cv / "organmtl_summary.json").is_file()
    run_in_group([venv_bin("nnUNetv2_determine_postprocessing"), "-i", str(cv), "-ref", str(ds.raw / "labelsTr"),
                  "-np", "1"], env=env, log_file=logs / "determine_pp.log", timeout=900)
    pp = json.loads((cv / "postprocessing.json").read_text())
    assert pp["input_folder"]["foreground_mean"]["Dice"] == pytest.approx(info["all_results"][models[FOCUSNET].name])

    # ---- nnUNetv2_predict --save_probabilities of both models (2 folds each), nnUNetv2_ensemble of the two,
    # nnUNetv2_apply_postprocessing of the result with the postprocessing found above
    members = [str(m) for m in predictions.result()]
    ens = tmp_path / "ensemble"
    run_in_group([venv_bin("nnUNetv2_ensemble"), "-i", *members, "-o", str(ens), "-np", "1"], env=env,
                 log_file=logs / "ensemble.log", timeout=900)
    merged = read_array(ens / f"{case}.nii.gz")
    assert merged.shape == read_array(images / f"{case}_0000.nii.gz").shape
    np.testing.assert_array_equal(merged, _softmax_ensemble([f"{m}/{case}.npz" for m in members]))
    out = tmp_path / "postprocessed"
    run_in_group([venv_bin("nnUNetv2_apply_postprocessing"), "-i", str(ens), "-o", str(out), "-pp_pkl_file",
                  best["postprocessing_file"], "-plans_json", best["some_plans_file"], "-np", "1"], env=env,
                 log_file=logs / "apply_pp.log", timeout=900)
    final = read_array(out / f"{case}.nii.gz")
    with open(best["postprocessing_file"], "rb") as f:
        fns, kwargs = pickle.load(f)
    changed = final != merged
    assert not final[changed].any()                      # postprocessing only removes voxels
    full = ndimage.generate_binary_structure(3, 3)       # nnU-Net's components: full connectivity
    for i, kw in enumerate(kwargs):
        labels = kw["labels_or_regions"]
        if not isinstance(labels, list) or i == len(kwargs) - 1:   # a later removal may split the union
            assert ndimage.label(np.isin(final, labels), structure=full)[1] <= 1, labels
    if not fns:
        assert not changed.any()
