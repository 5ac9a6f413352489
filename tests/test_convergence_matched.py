"""benchmarks/convergence_matched.py without training: the matched plan (equal iterations per task, no
cap, no patience), the statistics against hand-computed values, the per-case scores on tiny arrays
(Dice, task confusion, HD95) and the docs subsection ("Not yet run", tables, paired differences)."""
import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cm():
    spec = importlib.util.spec_from_file_location("benchmarks_convergence_matched",
                                                  ROOT / "benchmarks" / "convergence_matched.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module   # dataclasses resolve the module by name
    spec.loader.exec_module(module)
    return module


def test_multitask_plan_gives_the_all_tasks_arm_three_times_the_iterations_and_no_cap(cm):
    runs = cm.plan(cm.MULTITASK, 400)
    assert sorted({r["seed"] for r in runs}) == [0, 1, 2]
    for seed in (0, 1, 2):
        mine = {r["arm"]: r for r in runs if r["seed"] == seed}
        assert set(mine) == {"single_1", "single_2", "single_3", "all"}
        for key in ("single_1", "single_2", "single_3"):
            assert mine[key]["iterations"] == 400
            assert mine[key]["env"]["ORGANMTL_EPOCHS"] == "16"
        assert mine["all"]["iterations"] == 3 * mine["single_1"]["iterations"] == 1200
        assert mine["all"]["env"]["ORGANMTL_EPOCHS"] == "48"
        for r in mine.values():
            assert r["cap_cpu_s"] is None and r["patience"] is None
            assert r["env"]["ORGANMTL_SEED"] == str(seed)
            assert r["env"]["ORGANMTL_ITERS_PER_EPOCH"] == "25" and r["env"]["ORGANMTL_VAL_ITERS"] == "5"
    # every arm: the same trainer, so the same augmentation
    assert {a.trainer for a in cm.MULTITASK.arms} == {"nnUNetTrainerOMTLMultiTaskUNet_Tiny"}


def test_abdomen_plan_gives_every_arm_the_same_schedule(cm):
    runs = cm.plan(cm.ABDOMEN)
    assert len(runs) == 5 * 3
    envs = {(r["arm"], r["seed"]): r["env"] for r in runs}
    for (arm, seed), env in envs.items():
        assert env == {**envs[("image_only", seed)]}, arm
        assert env["ORGANMTL_EPOCHS"] == str(cm.AB_ITERS // 25)
    assert {r["iterations"] for r in runs} == {cm.AB_ITERS}


def test_check_matched_refuses_a_cap_a_patience_rule_and_unequal_budgets(cm):
    base = cm.plan(cm.MULTITASK, 100, seeds=(0,))
    cm.check_matched(base)
    capped = [dict(r) for r in base]
    capped[0]["cap_cpu_s"] = 150.0
    with pytest.raises(ValueError, match="CPU cap"):
        cm.check_matched(capped)
    patient = [dict(r) for r in base]
    patient[3]["patience"] = {"patience": 10}
    with pytest.raises(ValueError, match="patience"):
        cm.check_matched(patient)
    # the all-tasks arm with the single-task iterations (100 instead of 300): not matched per task
    short = [dict(r) for r in base]
    short[3] = {**short[3], "env": {**short[3]["env"], "ORGANMTL_EPOCHS": "4"}, "iterations": 100}
    with pytest.raises(ValueError, match="iterations"):
        cm.check_matched(short)
    with pytest.raises(SystemExit):
        cm.budget_env(cm.MULTITASK.arms[0], 30)       # not whole epochs of 25


def _rec(arm, seed, cases, iters=400, study="multitask"):
    return {"study": study, "arm": arm, "seed": seed, "iterations_per_task": iters, "iterations": iters,
            "selected_iteration": iters, "n_test_cases": len(cases), "code_revision": "abc123",
            "per_case": cases}


def test_paired_differences_and_interval_equal_hand_computed_values(cm):
    shared = [_rec("all", 0, {"c1": {"Dice": {"A": 0.9}}, "c2": {"Dice": {"A": 0.6}}}),
              _rec("all", 1, {"c1": {"Dice": {"A": 0.8}}, "c2": {"Dice": {"A": 0.7}}})]
    single = [_rec("single_1", 0, {"c1": {"Dice": {"A": 0.8}}, "c2": {"Dice": {"A": 0.8}}}),
              _rec("single_1", 1, {"c1": {"Dice": {"A": 0.5}}, "c2": {"Dice": {"A": 0.7}}}),
              _rec("single_1", 2, {"c1": {"Dice": {"A": 0.1}}})]      # no shared run at seed 2: unpaired
    d = cm.paired_differences(shared, single, "Dice", ["A"])
    assert d == pytest.approx([0.1, -0.2, 0.3, 0.0])
    mean, lo, hi = cm.conv.seed_ci(d)
    # mean 0.05, sd sqrt(0.13 / 3) = 0.208167, t(0.975, 3) = 3.182446, half width 0.331240
    assert mean == pytest.approx(0.05)
    assert (lo, hi) == pytest.approx((0.05 - 0.331240, 0.05 + 0.331240), abs=1e-5)
    assert cm.ci_text(d, signed=True) == "+0.050 [-0.281, +0.381] (n=4)"
    # per-seed means over cases (a case without the class is skipped)
    assert cm.seed_means(single, "Dice", ["A"]) == pytest.approx([0.8, 0.6, 0.1])
    assert cm.seed_means(single, "Dice", ["B"]) == []


def test_confusion_summary_is_the_median_over_scans_of_all_seeds(cm):
    recs = [_rec("all", 0, {"a1": {"task": "T1", "confusion_pct": 0.0}, "b1": {"task": "T2", "confusion_pct": 9.0}}),
            _rec("all", 1, {"a1": {"task": "T1", "confusion_pct": 0.5}, "a2": {"task": "T1", "confusion_pct": 0.1}})]
    assert cm.confusion_summary(recs, "T1") == {"n": 3, "median_pct": 0.1, "max_pct": 0.5}
    assert cm.confusion_summary(recs, "T2") == {"n": 1, "median_pct": 9.0, "max_pct": 9.0}
    assert cm.confusion_summary(recs, "T3")["n"] == 0


def test_case_scores_on_tiny_arrays(cm):
    # union output layer: background 0, task A labels 1 and 2, task B label 3
    heads = np.array([0, 1, 2, 3])
    winner = np.array([[0, 1, 1], [2, 3, 0]])            # argmax label per voxel (2 x 3 voxels)
    probs = np.full((4, 2, 3), 0.1, np.float32)
    for idx, label in np.ndenumerate(winner):
        probs[(int(label),) + idx] = 0.7
    ref = np.array([[0, 1, 0], [2, 2, 0]])
    s = cm.score_multitask_case(probs, heads, ref, (1, 2), alien=(3,))
    assert s["confusion_pct"] == pytest.approx(100 / 6)    # one voxel of six labelled with task B's class
    assert s["Dice"] == pytest.approx({1: 2 / 3, 2: 2 / 3})   # label 1: TP 1 of 2 + 1; label 2: TP 1 of 1 + 2
    assert "Dice PR threshold" not in s
    # a binary task (label 3) at a threshold on its channel: voxels with p >= 0.5 -> only (1, 1)
    ref_b = np.array([[0, 0, 0], [3, 3, 0]])
    b = cm.score_multitask_case(probs, heads, ref_b, (3,), alien=(1, 2), threshold=0.5)
    assert b["Dice PR threshold"] == pytest.approx({3: 2 / 3})
    assert b["confusion_pct"] == pytest.approx(100 * 3 / 6)  # labels 1, 1, 2 are task A's
    # abdomen: a voxel 1 z-step (2 mm) away from the reference voxel; an organ absent in both
    pred, gt = np.zeros((3, 3, 3), np.uint8), np.zeros((3, 3, 3), np.uint8)
    pred[0, 1, 1], gt[1, 1, 1] = 1, 1
    a = cm.score_abdomen_case(pred, gt, (2.0, 1.0, 1.0), {"liver": 1, "spleen": 2})
    assert a["Dice"] == {"liver": 0.0, "spleen": 1.0}
    assert a["HD95 mm"]["liver"] == pytest.approx(2.0)
    assert math.isnan(a["HD95 mm"]["spleen"])


def test_renderer_says_not_yet_run_and_renders_the_runs_there_are(cm):
    empty = cm.render_study("multitask", {})
    assert "Not yet run" in empty and "--multitask-matched --next" in empty
    assert "Not yet run" in cm.render_study("abdomen", {}) and "| arm |" not in cm.render_study("abdomen", {})
    records = {}
    for seed, (shared, one) in enumerate([(0.9, 0.8), (0.8, 0.5)]):
        records[("multitask", "all", seed)] = _rec("all", seed, {"c1": {"task": "T1", "confusion_pct": 0.25,
                                                                        "Dice": {"T1: A": shared}}}, iters=100)
        records[("multitask", "single_1", seed)] = _rec("single_1", seed, {"c1": {"task": "T1", "confusion_pct": 0.0,
                                                                                  "Dice": {"T1: A": one}}}, iters=100)
    text = cm.render_study("multitask", records)
    assert "Not yet run: " in text and "`--multitask-matched --arm single_2 --seed 0`" in text
    assert "`--multitask-matched --arm all --seed 2`" in text and "(`--iters 100`)" in text
    # paired differences 0.1 and 0.3: mean 0.2, sd 0.141421, t(0.975, 1) = 12.706205, half 1.270620
    assert "| T1: A | +0.200 [-1.071, +1.471] (n=2) | - |" in text
    # the all-tasks arm's Dice over seeds: 0.85 [0.85 +- 12.706205 * 0.070711 / sqrt(2)... = 0.85 +- 0.635310]
    assert "| all three tasks, one network | 100 | 2 | 100, 100 | T1: A | 0.850 [0.215, 1.485] (n=2) | - |" in text
    assert "| all three tasks, one network | T1 | 2 | 0.25 | 0.25 |" in text
    assert "shared minus single-task Dice (argmax), including 0: T1: A." in text
    assert "Median confusion of the all-tasks network: T1 0.25 % (paper: < 0.0005 %)." in text


def test_abdomen_renderer_pairs_each_arm_with_image_only(cm):
    records = {}
    for seed in (0, 1):
        for arm, near, far in (("image_only", 0.5, 0.9), ("late_fusion", 0.7 + 0.1 * seed, 0.9)):
            records[("abdomen", arm, seed)] = _rec(arm, seed, {"k": {"Dice": {"bladder": near, "liver": far},
                                                                     "HD95 mm": {"bladder": 4.0, "liver": 2.0}}},
                                                   iters=500, study="abdomen")
    text = cm.render_study("abdomen", records)
    # near-landmark differences 0.2 and 0.3: mean 0.25, sd 0.070711, half 12.706205 * 0.05 = 0.635310
    assert "| landmarks as input (late fusion) | +0.125 [-0.193, +0.443] (n=2) | +0.250 [-0.385, +0.885] (n=2) |" in text
    assert "| landmarks as input (early fusion) | not yet measured | - | - |" in text
    assert "Dice near the landmarks, including 0: late_fusion; Dice of all organs, including 0: late_fusion." in text


def test_results_for_the_committed_folder_need_committed_code(cm, tmp_path):
    with pytest.raises(SystemExit, match="commit first"):
        cm.check_committed("abc+uncommitted changes", cm.RESULTS)
    cm.check_committed("abc+uncommitted changes", tmp_path)      # a smoke run elsewhere is fine
    cm.check_committed("abc", cm.RESULTS)


def test_records_round_trip_and_docs_subsection_replaced_in_place(cm, tmp_path):
    r = _rec("all", 1, {"c1": {"task": "T1", "confusion_pct": 0.0, "Dice": {"T1: A": 0.5}}})
    path = cm.save_record(tmp_path, r)
    assert path == tmp_path / "multitask" / "matched" / "all__seed1.json"
    assert cm.load_records(tmp_path) == {("multitask", "all", 1): json.loads(path.read_text())}
    page = "# B\n\n## Convergence\n\n### S\n\ntext\n\n![fig](f.png)\n\n### T\n\nmore\n\n## Other\n\nkeep\n"
    once = cm.replace_subsection(page, "### S", "BLOCK1\n")
    assert once.endswith("### T\n\nmore\n\n## Other\n\nkeep\n")
    with_heading = cm.replace_subsection(page, "### S", cm.HEADING + "\n\nv1\n")
    again = cm.replace_subsection(with_heading, "### S", cm.HEADING + "\n\nv2\n")
    assert again == page.replace("![fig](f.png)\n\n", "![fig](f.png)\n\n" + cm.HEADING + "\n\nv2\n\n")
    assert "BLOCK1" in once and "v1" not in again


def test_every_arm_of_a_study_trains_with_the_same_augmentation(cm, monkeypatch):
    for study in (cm.MULTITASK, cm.ABDOMEN):
        cm.check_same_augmentation(study)
    trainers = [cm.trainer_class(a.trainer) for a in cm.ABDOMEN.arms]
    assert len({t.get_training_transforms for t in trainers}) == 1
    # a trainer with its own transforms is refused
    base = trainers[0]
    own = type("OwnAugmentation_Tiny", (base,), {"get_training_transforms": lambda self, *a, **k: None})
    mixed = cm.MatchedStudy("abdomen", "--x", "t", (cm.ABDOMEN.arms[0], cm.Arm("own", "own", "OwnAugmentation_Tiny")),
                            500, "image_only")
    real = cm.trainer_class
    monkeypatch.setattr(cm, "trainer_class", lambda name: own if name == "OwnAugmentation_Tiny" else real(name))
    with pytest.raises(ValueError, match="different augmentation"):
        cm.check_same_augmentation(mixed)


def test_main_runs_each_arm_a_failed_run_costs_not_the_others_and_a_recorded_one_is_skipped(cm, tmp_path, monkeypatch,
                                                                                            capsys):
    cm.save_record(tmp_path, _rec("single_2", 0, {}))
    done = []

    def fake_run(study, run, work, results):
        if run["arm"] == "single_1":
            raise RuntimeError("train.log: nnUNetv2_train exited 1")
        done.append((run["arm"], run["seed"], run["iterations"]))
    monkeypatch.setattr(cm, "run_one", fake_run)
    rc = cm.main(["--multitask-matched", "--arm", "single_1", "single_2", "all", "--iters", "50",
                  "--results", str(tmp_path), "--work", str(tmp_path / "work")])
    assert rc == 1
    assert done == [("all", 0, 150)]
    err = capsys.readouterr()
    assert "single_1 seed 0: FAILED: train.log" in err.err and "single_2 seed 0: recorded" in err.out
    with pytest.raises(SystemExit) as e:
        cm.main(["--abdomen-matched", "--arm", "nope", "--results", str(tmp_path)])
    assert e.value.code == 2


def test_landmark_errors_by_name_and_unnamed_peaks_by_least_total_error(cm):
    ref = {"hip_left": [0.0, 0.0, 0.0], "hip_right": [10.0, 0.0, 0.0]}
    # a merged map's two unnamed peaks, listed right first: assigned left <- (1, 0, 0), right <- (9, 0, 3)
    peaks = {"max(hip_left, hip_right) peak 0": [9.0, 0.0, 3.0], "max(hip_left, hip_right) peak 1": [1.0, 0.0, 0.0]}
    assert cm.landmark_errors(peaks, ref) == pytest.approx({"hip_left": 1.0, "hip_right": math.sqrt(10.0)})
    # named predictions are paired by name even when swapping would be cheaper
    named = {"hip_left": [10.0, 0.0, 0.0], "hip_right": [0.0, 0.0, 4.0]}
    assert cm.landmark_errors(named, ref) == pytest.approx({"hip_left": 10.0, "hip_right": math.sqrt(116.0)})
    one = cm.landmark_errors({"peak 0": [10.0, 2.0, 0.0]}, ref)
    assert one["hip_right"] == pytest.approx(2.0) and math.isnan(one["hip_left"])
    assert all(math.isnan(v) for v in cm.landmark_errors({}, ref).values())


def test_reading_sorts_intervals_by_where_zero_lies(cm):
    text = cm.reading({"up": [0.10, 0.11, 0.12], "down": [-0.2, -0.21, -0.19], "both": [-0.5, 0.5, 0.1],
                       "one": [0.3]})
    assert text == "above 0: up; below 0: down; including 0: both, one (n=1)"
