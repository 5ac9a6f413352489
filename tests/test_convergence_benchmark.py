"""benchmarks/convergence.py without training: the stop rule, the per-run cache and resume, reading
nnU-Net's epoch lines, the table and the docs section, and the ORGANMTL_SEED hook of the _Tiny trainers."""
import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def conv():
    spec = importlib.util.spec_from_file_location("benchmarks_convergence", ROOT / "benchmarks" / "convergence.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module   # dataclasses resolve the module by name
    spec.loader.exec_module(module)
    return module


def _stop_index(conv, rule, values):
    """Index of the evaluation at which ``rule`` says stop (None: never)."""
    return next((i for i, v in enumerate(values) if rule.update(v)), None)


def test_patience_stops_after_n_evaluations_without_improvement(conv):
    values = [0.1, 0.3, 0.5, 0.49, 0.5005, 0.2, 0.45, 0.9]
    # best 0.5 at index 2; 0.5005 is within min_delta, so indices 3, 4, 5 are three misses
    rule = conv.Patience(patience=3, min_delta=0.001)
    assert _stop_index(conv, rule, values) == 5
    assert rule.best == 0.5 and rule.best_index == 2
    # without min_delta 0.5005 is the new best at index 4: 5 and 6 miss, 7 improves, no stop
    assert _stop_index(conv, conv.Patience(patience=3, min_delta=0.0), values) is None


def test_patience_waits_for_min_evaluations_and_nan_is_no_improvement(conv):
    flat = [0.0] * 10 + [0.4, 0.5]
    assert _stop_index(conv, conv.Patience(patience=2), flat) == 2          # 0.0 counts as a first best
    assert _stop_index(conv, conv.Patience(patience=2, min_evaluations=8), flat) == 7
    assert _stop_index(conv, conv.Patience(patience=2), [0.2, float("nan"), float("nan")]) == 2


def test_ema_is_nnunets_moving_average(conv, tmp_path):
    from nnunetv2.training.logging.nnunet_logger import MetaLogger

    values = [0.0, 0.5, 0.25, 1.0]
    logger = MetaLogger(str(tmp_path), resume=False)
    for epoch, v in enumerate(values):
        logger.log("mean_fg_dice", v, epoch)
    assert conv.ema(values) == pytest.approx(logger.get_value("ema_fg_dice", step=None))


def _write_nnunet_log(path, epochs, start_next=False):
    """Epoch lines as nnUNetTrainer.on_train_epoch_start / on_epoch_end print them."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    fake = SimpleNamespace(local_rank=0, log_file=str(path))
    for e, dice in enumerate(epochs):
        nnUNetTrainer.print_to_log_file(fake, "", also_print_to_console=False)
        nnUNetTrainer.print_to_log_file(fake, f"Epoch {e}", also_print_to_console=False)
        nnUNetTrainer.print_to_log_file(fake, "train_loss", np.round(np.float32(1 - e / 10), 4), also_print_to_console=False)
        nnUNetTrainer.print_to_log_file(fake, "Pseudo dice", [np.round(np.float32(d), 4) for d in dice],
                                        also_print_to_console=False)
        nnUNetTrainer.print_to_log_file(fake, f"Epoch time: {np.round(2.5, decimals=2)} s", also_print_to_console=False)
    if start_next:
        nnUNetTrainer.print_to_log_file(fake, f"Epoch {len(epochs)}", also_print_to_console=False)


def test_nnunet_curve_and_checkpoint_safe_point_from_nnunets_log_lines(conv, tmp_path):
    log = tmp_path / "train.log"
    _write_nnunet_log(log, [[0.0, 0.2], [0.4, float("nan")], [0.6, 0.8]])
    curve = conv.nnunet_curve(log, iters_per_epoch=25)
    assert [p["step"] for p in curve] == [25, 50, 75]
    means = [0.1, 0.4, 0.7]                                # nanmean per epoch, as nnU-Net's mean_fg_dice
    assert [p["pseudo_dice"] for p in curve] == pytest.approx(means)
    assert [p["value"] for p in curve] == pytest.approx([0.1, 0.9 * 0.1 + 0.04, 0.9 * (0.9 * 0.1 + 0.04) + 0.07])
    assert curve[0]["train_loss"] == pytest.approx(1.0)
    assert not conv.nnunet_between_epochs(log)             # the last epoch may be writing checkpoint_best
    _write_nnunet_log(tmp_path / "next.log", [[0.1]], start_next=True)
    assert conv.nnunet_between_epochs(tmp_path / "next.log")
    assert not conv.nnunet_between_epochs(tmp_path / "missing.log")


def _record(study, method, seed, dice, cpu=100.0):
    return {"study": study, "method": method, "seed": seed, "stop_reason": "converged", "best_step": 500,
            "last_step": 800, "curve": [{"step": 25, "value": 0.1}, {"step": 50, "value": dice}],
            "curve_quantity": "EMA pseudo-Dice", "cpu_s": {"train": cpu - 10, "total": cpu},
            "metrics": {name: {"Dice": d, "HD95 mm": 3.0} for name, d in dice.items()} if isinstance(dice, dict)
            else {"organ": {"Dice": dice}}}


def test_cache_resume_picks_the_first_missing_run(conv, tmp_path):
    plan = [("spine", "mask_rcnn", 0), ("spine", "hmrnet", 0), ("han", "nnunet", 0)]
    assert conv.missing_runs(plan, conv.load_runs(tmp_path)) == plan
    path = conv.save_run(tmp_path, _record("spine", "hmrnet", 0, 0.5))
    assert path == tmp_path / "spine" / "hmrnet__seed0.json" and not list(tmp_path.glob("*/*.tmp"))
    runs = conv.load_runs(tmp_path)
    assert list(runs) == [("spine", "hmrnet", 0)] and runs[("spine", "hmrnet", 0)]["metrics"]["organ"]["Dice"] == 0.5
    assert conv.missing_runs(plan, runs) == [plan[0], plan[2]]
    # a record filed under another run's name is refused, not silently mixed in
    (tmp_path / "spine" / "mask_rcnn__seed0.json").write_text(path.read_text())
    with pytest.raises(SystemExit, match="expected at"):
        conv.load_runs(tmp_path)


def test_main_skips_a_cached_run_and_only_rewrites_the_docs(conv, tmp_path, monkeypatch, capsys):
    conv.save_run(tmp_path, _record("spine", "mask_rcnn", 0, 0.7))
    calls = []
    monkeypatch.setattr(conv, "run_one", lambda *a, **k: calls.append(a))
    monkeypatch.setattr(conv, "write_docs", lambda results: calls.append(("docs", results)))
    assert conv.main(["--study", "spine", "--method", "mask_rcnn", "--seed", "0", "--results", str(tmp_path)]) == 0
    assert "cached" in capsys.readouterr().out and calls == [("docs", tmp_path)]
    calls.clear()
    assert conv.main(["--next", "--results", str(tmp_path)]) == 0
    assert calls[0] == ("spine", "hmrnet", 0)          # PLAN order: the next spine method, seed 0


def test_study_table_means_seeds_marks_missing_runs_and_gives_the_verdict(conv):
    han = conv.study("han")
    names = {"Chiasm": 0.2, "OpticNerve_L": 0.4, "Mandible": 0.9, "Brainstem": 0.7}
    runs = {("han", "nnunet", 0): _record("han", "nnunet", 0, names),
            ("han", "nnunet", 1): _record("han", "nnunet", 1, {**names, "Chiasm": 0.4}, cpu=200.0)}
    text = conv.render_study(han, runs)
    row = next(line for line in text.splitlines() if line.startswith("| stock nnU-Net |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    small = [0.3, 0.4]                                   # (0.2+0.4)/2, (0.4+0.4)/2
    assert cells[1] == "2/2"
    assert cells[2] == f"{np.mean(small):.3f} ± {np.std(small, ddof=1):.3f}"
    assert cells[3] == "0.800 ± 0.000"                   # large organs: mandible, brainstem
    assert cells[6] == "100, 200" and f"{conv.NNUNET_CAP_S:.0f} CPU s" in cells[7]
    snet = next(line for line in text.splitlines() if line.startswith("| S-Net"))
    assert "not run yet" in snet and "`--study han --method snet --seed 0`, `--study han --method snet --seed 1`" in snet
    chiasm = next(line for line in text.splitlines() if line.startswith("| Chiasm |"))
    assert chiasm.split("|")[2].strip() == "0.300" and chiasm.split("|")[3].strip() == "-"
    assert "not yet measured (missing snet, focusnetv1, focusnetv2; small-organ Dice so far: nnunet 0.350)" in text


def test_cap_caveat_names_what_would_have_ended_the_runs(conv):
    capped = {**_record("han", "nnunet", 0, 0.5), "stop_reason": "cap"}
    han = conv.render_study(conv.study("han"), {("han", "nnunet", 0): capped})     # no patience rule in HaN
    assert "1 of the 1 runs were stopped by the CPU cap before their schedule ended them" in han
    abdomen = conv.study("abdomen")
    key = ("abdomen", abdomen.methods[0].key, 0)
    text = conv.render_study(abdomen, {key: {**_record(*key, 0.5), "stop_reason": "cap"}})
    assert "before the patience rule ended them" in text


def test_han_verdict_reproduced_only_when_v2_best_and_snet_worst(conv):
    han = conv.study("han")
    small = {"nnunet": 0.3, "snet": 0.1, "focusnetv1": 0.35, "focusnetv2": 0.5}
    runs = {("han", m, 0): _record("han", m, 0, {"Chiasm": v, "Mandible": 0.9}) for m, v in small.items()}
    assert han.verdict(runs).startswith("reproduced: small-organ Dice nnunet 0.300, snet 0.100")
    assert "(means over 1 seed). FocusNetv2, S-Net phase 2300 it: not run yet." in han.verdict(runs)
    runs[("han", "focusnetv2_matched", 0)] = _record("han", "focusnetv2_matched", 0, {"Chiasm": 0.2, "Mandible": 0.9})
    assert han.verdict(runs).endswith("(means over 1 seed). FocusNetv2, S-Net phase 2300 it (seed 0): small-organ "
                                      "Dice 0.200 against S-Net alone's 0.100 at the same seed.")
    runs[("han", "focusnetv1", 0)] = _record("han", "focusnetv1", 0, {"Chiasm": 0.6, "Mandible": 0.9})
    assert han.verdict(runs).startswith("not reproduced")
    runs[("han", "nnunet", 1)] = _record("han", "nnunet", 1, {"Chiasm": 0.3, "Mandible": 0.9})
    assert "(means over 1-2 seeds)." in han.verdict(runs)


def test_spine_verdict_compares_hmrnet_to_mask_rcnn_and_lists_each_ablation(conv):
    sp = conv.study("spine")

    def ap(method, seed, value):
        r = _record("spine", method, seed, 0.9)
        r["metrics"] = {"L1": {"segm AP": value, "Dice": 0.9}}
        return r
    runs = {("spine", "mask_rcnn", 0): ap("mask_rcnn", 0, 90.0)}
    assert sp.verdict(runs).startswith("not yet measured")
    runs[("spine", "hmrnet", 0)] = ap("hmrnet", 0, 80.0)
    runs[("spine", "hmrnet", 1)] = ap("hmrnet", 1, 84.0)
    text = sp.verdict(runs)
    assert text.startswith("not reproduced") and "HMR-Net segm AP 82.0 vs Mask R-CNN 90.0" in text
    assert "Ablations" not in text
    runs[("spine", "hmrnet_no_manifold", 0)] = ap("hmrnet_no_manifold", 0, 75.0)
    assert "HMR-Net, no manifold loss 75.0 (-7.0)" in sp.verdict(runs)
    runs[("spine", "mask_rcnn", 0)] = ap("mask_rcnn", 0, 82.0)
    assert sp.verdict(runs).startswith("reproduced")


def test_multitask_verdict_compares_each_class_to_its_single_task_network(conv):
    mt = conv.study("multitask")
    runs = {("multitask", "single_1", 0): _record("multitask", "single_1", 0, {"brain: wm": 0.8}),
            ("multitask", "single_2", 0): _record("multitask", "single_2", 0, {"breast: muscle": 0.6})}
    assert mt.verdict(runs).startswith("not yet measured")
    runs[("multitask", "all", 0)] = _record("multitask", "all", 0, {"brain: wm": 0.79, "breast: muscle": 0.58})
    assert mt.verdict(runs).startswith("reproduced for the 2 classes learned by either network: shared minus "
                                       "single-task Dice -0.015")
    runs[("multitask", "all", 0)] = _record("multitask", "all", 0, {"brain: wm": 0.7, "breast: muscle": 0.58})
    assert mt.verdict(runs).startswith("not reproduced") and "worst brain: wm -0.100" in mt.verdict(runs)
    # a class neither network learned is left out of the mean and named as no evidence
    runs[("multitask", "single_3", 0)] = _record("multitask", "single_3", 0, {"cardiac: coronary": 0.0})
    runs[("multitask", "all", 0)] = _record("multitask", "all", 0, {"brain: wm": 0.79, "breast: muscle": 0.58,
                                                                    "cardiac: coronary": 0.02})
    text = mt.verdict(runs)
    assert text.startswith("reproduced for the 2 classes learned") and "Dice -0.015" in text
    assert "Not evidence either way: cardiac: coronary" in text
    runs[("multitask", "all", 0)]["metrics"]["cardiac: coronary"]["Dice"] = 0.5       # learned by one: counts
    assert mt.verdict(runs).startswith("reproduced for the 3 classes learned")


def test_replace_section_keeps_the_rest_of_the_page(conv):
    page = "# Benchmarks\n\n## A\ntext a\n\n## Convergence\nold\n### sub\nold too\n\n## B\ntext b\n"
    out = conv.replace_section(page, "## Convergence\n\nnew\n")
    assert out == "# Benchmarks\n\n## A\ntext a\n\n## Convergence\n\nnew\n\n## B\ntext b\n"
    assert conv.replace_section(out, "## Convergence\n\nnew\n") == out
    appended = conv.replace_section("# B\n\n## A\nx\n", "## Convergence\nc\n")
    assert appended == "# B\n\n## A\nx\n\n## Convergence\nc\n"


def test_rendered_section_has_every_planned_run(conv):
    text = conv.render_section({})
    assert text.startswith("## Convergence\n")
    for study, method, seed in conv.PLAN:
        assert f"--study {study} --method {method} --seed {seed}" in text
    assert text.count("not yet measured") == len(conv.STUDIES)


def test_organmtl_seed_seeds_torch_numpy_random_and_unset_changes_nothing(monkeypatch):
    import random

    import torch

    from organmtl.nnunet_trainers.budget import seed_from_env

    monkeypatch.setenv("ORGANMTL_SEED", "3")
    assert seed_from_env() == 3
    first = (torch.rand(3), np.random.rand(3), random.random())
    seed_from_env()
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1]) and first[2] == again[2]
    monkeypatch.delenv("ORGANMTL_SEED")
    state = torch.get_rng_state()
    assert seed_from_env() is None and torch.equal(torch.get_rng_state(), state)
    monkeypatch.setenv("ORGANMTL_SEED", "-1")
    with pytest.raises(ValueError, match="ORGANMTL_SEED"):
        seed_from_env()


def _curve_from(path):
    if not path.is_file():
        return []
    return [{"step": i + 1, "value": float(v)} for i, v in enumerate(path.read_text().split())]


def test_monitored_stops_a_running_command_by_the_rule_or_the_cap(conv, tmp_path):
    """A child that writes one evaluation every 20 ms forever: the rule stops it (killed, not finished)."""
    out = tmp_path / "curve.txt"
    script = ("import time, itertools\n"
              f"f = open({str(out)!r}, 'a', buffering=1)\n"
              "for i in itertools.count():\n"
              "    f.write(str(min(i, 3) / 10) + '\\n')\n"
              "    time.sleep(0.02)\n")
    result = conv.monitored([sys.executable, "-c", script], {}, tmp_path / "log.txt", lambda: _curve_from(out),
                            conv.Patience(patience=4), cap_cpu_s=600, poll=0.2)
    assert result["stop_reason"] == "converged"
    assert len(result["curve"]) >= 8                 # best 0.3 at the 4th, stop at the 8th or later poll
    spin = "import time\nt = time.time()\nwhile True:\n    pass\n"
    result = conv.monitored([sys.executable, "-c", spin], {}, tmp_path / "log2.txt", lambda: [], None,
                            cap_cpu_s=0.3, poll=0.1)
    assert result["stop_reason"] == "cap" and result["cpu_s"] >= 0.3
    done = conv.monitored([sys.executable, "-c", "pass"], {}, tmp_path / "log3.txt", lambda: [], None, 600, poll=0.1)
    assert done["stop_reason"] == "schedule end"
    with pytest.raises(RuntimeError, match="exited with 3"):
        conv.monitored([sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"], {}, tmp_path / "log4.txt",
                       lambda: [], None, 600, poll=0.1)


def test_nnunet_runs_are_told_their_thread_count(conv, tmp_path, monkeypatch):
    # nnUNetv2_train -device cpu sets one thread per core; the organmtl trainers take ORGANMTL_CPU_THREADS instead
    from organmtl.nnunet_trainers.budget import THREADS_VARIABLE
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    env = conv.nnunet_env(tmp_path)
    assert env[THREADS_VARIABLE] == "1" == env["OMP_NUM_THREADS"] and env["nnUNet_n_proc_DA"] == "0"
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert conv.nnunet_env(tmp_path)[THREADS_VARIABLE] == "2"


def test_a_method_can_run_at_fewer_seeds_than_its_study(conv):
    han = conv.study("han")
    matched = han.method("focusnetv2_matched")
    assert han.seeds_of(matched) == (0,) and han.seeds_of(han.method("snet")) == (0, 1)
    assert ("han", "focusnetv2_matched", 0) in conv.PLAN and ("han", "focusnetv2_matched", 1) not in conv.PLAN
    assert "snet=92," in matched.budget["ORGANMTL_FOCUSNET_PHASE_EPOCHS"]
    assert int(matched.budget["ORGANMTL_EPOCHS"]) == 92 + 6 + 6 + 12 + 12
    with pytest.raises(SystemExit, match="plans seeds"):
        conv.run_one("han", "focusnetv2_matched", 1, Path("/nonexistent"), Path("/nonexistent"))


# ---------------------------------------------------------------- issue 26: matched spine comparison

def test_spine_benchmark_splits_are_disjoint_and_artefact_cases_are_tagged(conv, tmp_path):
    from organmtl.converters.coco import TAGS_KEY, tag_images
    from organmtl.demo_data.spine import write_spine_benchmark
    splits, tags = write_spine_benchmark(tmp_path / "v", {"train": 2, "select": 2, "score": 5}, seed=3)
    assert splits == {"train": ["train_000", "train_001"], "select": ["select_000", "select_001"],
                      "score": [f"score_{i:03d}" for i in range(5)]}
    # every second case, artefacts in turn; the others untagged
    assert tags == {"train_001": ["metal"], "select_001": ["metal"], "score_001": ["metal"],
                    "score_003": ["low_contrast"]}
    assert len(list((tmp_path / "v" / "images").glob("*.nii.gz"))) == 9
    coco = {"categories": [{"id": 1, "name": "L1"}], "images": [], "annotations": []}
    for k, case in enumerate(c for s in splits.values() for c in s):
        coco["images"].append({"id": k + 1, "case": case, "file_name": f"{case}.png", "height": 4, "width": 4})
        coco["annotations"].append({"id": k + 1, "image_id": k + 1, "category_id": 1, "bbox": [0, 0, 2, 2]})
    tag_images(coco, tags)
    assert [im[TAGS_KEY] for im in coco["images"]][:2] == [[], ["metal"]]
    parts = conv.split_coco(coco, splits)
    assert {s: [im["case"] for im in p["images"]] for s, p in parts.items()} == splits
    assert sorted(a["image_id"] for p in parts.values() for a in p["annotations"]) == list(range(1, 10))
    assert conv.subset_image_ids(parts["score"], "artefact") == [6, 8]
    assert conv.subset_image_ids(parts["score"], "clean") == [5, 7, 9]
    assert conv.subset_image_ids(parts["score"], "low_contrast") == [8]
    with pytest.raises(ValueError, match="score_000 is in splits train and score"):
        conv.split_coco(coco, {"train": ["score_000"], "score": ["score_000"]})
    with pytest.raises(ValueError, match="in no split"):
        conv.split_coco(coco, {"train": ["train_000"]})


def test_artefacts_change_the_image_not_the_label():
    from organmtl.demo_data.spine import ARTEFACTS, add_artefact, sagittal_slice
    img, lab = sagittal_slice(np.random.default_rng(0))
    for kind in ARTEFACTS:
        out = add_artefact(img, lab.copy(), kind, np.random.default_rng(1))
        assert out.shape == img.shape and out.dtype == img.dtype
        assert np.abs(out.astype(float) - img).mean() > 2.0
    low = add_artefact(img, lab, "low_contrast", np.random.default_rng(1))
    # the chosen bodies lose contrast: their mean falls from ~320 toward tissue (180)
    changed = [v for v in range(1, 6) if abs(low[lab == v].mean() - img[lab == v].mean()) > 50]
    assert changed and all(low[lab == v].mean() < 260 for v in changed)
    with pytest.raises(ValueError, match="unknown artefact"):
        add_artefact(img, lab, "motion", np.random.default_rng(0))


def test_seed_ci_equals_the_t_interval_by_hand(conv):
    mean, lo, hi = conv.seed_ci([1.0, 2.0, 3.0])
    half = 4.302652729911275 / 3 ** 0.5         # t(0.975, 2) * sd 1 / sqrt(3)
    assert mean == 2.0 and lo == pytest.approx(2 - half) and hi == pytest.approx(2 + half)


def _square(image_id, ann_id, x0, score=None):
    from pycocotools import mask as mask_util
    m = np.zeros((16, 16), np.uint8, order="F")
    m[4:10, x0:x0 + 6] = 1
    rle = mask_util.encode(m)
    rle["counts"] = rle["counts"].decode()
    rec = {"image_id": image_id, "category_id": 1, "segmentation": rle}
    if score is None:
        return {**rec, "id": ann_id, "area": 36, "bbox": [x0, 4, 6, 6], "iscrowd": 0}
    return {**rec, "score": score}


def test_segm_ap_hand_values_and_bootstrap_repeats(conv):
    gt = {"categories": [{"id": 1, "name": "L1"}], "annotations": [_square(1, 1, 2), _square(2, 2, 3)],
          "images": [{"id": i, "height": 16, "width": 16, "file_name": f"{i}.png", "organmtl_tags": []} for i in (1, 2)]}
    assert conv.segm_ap(gt, [_square(1, 0, 2, 1.0), _square(2, 0, 3, 1.0)], [1, 2]) == pytest.approx(100.0)
    # image 2 missed: precision 1 up to recall 0.5 = 51 of COCO's 101 recall points
    assert conv.segm_ap(gt, [_square(1, 0, 2, 1.0)], [1, 2]) == pytest.approx(100 * 51 / 101)
    assert conv.segm_ap(gt, [_square(1, 0, 2, 1.0)], [1, 1]) == pytest.approx(100.0)   # a bootstrap draw
    assert conv.segm_ap(gt, [], [1, 2]) == 0.0
    lo, hi = conv.bootstrap_ci(gt, [_square(1, 0, 2, 1.0)], [1, 2], n=30, seed=0)
    assert 0.0 <= lo < hi <= 100.0


@pytest.mark.parametrize("config", ["hmrnet/configs/tiny/hmrnet_R_18_FPN_tiny.yaml",
                                    "configs/tiny/mask_rcnn_R_18_FPN_baseline_tiny.yaml"])
def test_oracle_box_path_on_an_untrained_tiny_model(config):
    import torch
    from importlib import resources

    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    from organmtl.detectron_heads import add_organmtl_config
    from organmtl.detectron_heads.hmrnet import add_hmrnet_config
    from organmtl.detectron_heads.hmrnet.evaluator import predict_with_boxes
    cfg = get_cfg()
    add_organmtl_config(cfg)
    add_hmrnet_config(cfg)
    cfg.merge_from_file(str(resources.files("organmtl.detectron_heads") / config))
    cfg.MODEL.DEVICE, cfg.MODEL.ROI_HEADS.NUM_CLASSES, cfg.MODEL.HMRNET.NUM_POINTS = "cpu", 3, 8
    cfg.MODEL.FPN.OUT_CHANNELS, cfg.MODEL.ROI_BOX_HEAD.FC_DIM, cfg.MODEL.ROI_MASK_HEAD.CONV_DIM = 16, 16, 8
    cfg.MODEL.ROI_SHAPE_HEAD.CONV_DIMS, cfg.MODEL.ROI_SHAPE_HEAD.FC_DIM = [8, 8], 16
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    # a 64 x 64 input of a 128 x 128 original: the given boxes are in the original's pixels
    inp = {"image": torch.rand(3, 64, 64) * 255, "height": 128, "width": 128}
    boxes = [[10.0, 20.0, 50.0, 60.0], [60.0, 70.0, 120.0, 100.0]]
    out = predict_with_boxes(model, [inp], [boxes], [[2, 0]])[0]["instances"]
    assert out.image_size == (128, 128)
    assert torch.allclose(out.pred_boxes.tensor, torch.tensor(boxes), atol=1e-4)
    assert out.pred_classes.tolist() == [2, 0] and out.scores.tolist() == [1.0, 1.0]
    assert out.pred_masks.shape == (2, 128, 128)
    if "hmrnet" in config:   # the shape head's points are decoded from the given boxes
        assert out.pred_points.shape == (2, 8, 2)
