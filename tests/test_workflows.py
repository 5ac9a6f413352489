"""The workflows' shared steps (organmtl.workflows.steps): a conversion as a library call with the
command's options and defaults, and a step's output (child processes' too) sent to its log."""
import json
import subprocess
import sys

import pytest

from organmtl.converters import ConversionError
from organmtl.workflows.steps import convert, output_to


def test_convert_is_the_command_as_a_library_call(tmp_path, capfd):
    from organmtl.demo_data import write_demo_data

    write_demo_data(tmp_path / "data", seed=0, families=["multimodal"], n_cases=3)
    log = tmp_path / "convert.log"
    with output_to(log):
        out = convert("volumes", tmp_path / "data" / "multimodal" / "brain_mr", "-d", 7, "--name", "Brain",
                      "--out", tmp_path / "raw")
    assert out == tmp_path / "raw" / "Dataset007_Brain"
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["numTraining"] == 3 and meta["file_ending"] == ".nii.gz"      # the command's default ending
    assert "nnU-Net dataset written to" in log.read_text()
    assert "nnU-Net dataset written to" not in capfd.readouterr().out          # went to the log only
    with pytest.raises(ConversionError, match="mapping"):
        convert("volumes", tmp_path / "nothing_here", "-d", 8, "--out", tmp_path / "raw")
    with pytest.raises(ValueError, match="no converter named 'nope'"):
        convert("nope", tmp_path)


def test_output_to_catches_child_processes_and_restores(tmp_path, capfd):
    log = tmp_path / "step.log"
    with output_to(log):
        print("from python", flush=True)
        subprocess.run([sys.executable, "-c", "import sys; print('from a child'); print('err', file=sys.stderr)"],
                       check=True)
    print("after the step")
    text = log.read_text()
    assert "from python" in text and "from a child" in text and "err" in text
    captured = capfd.readouterr()
    assert "after the step" in captured.out and "from a child" not in captured.out + captured.err


# ---------------------------------------------------------------- multi-task experiments with test images

def _merged_with_test_images(tmp_path):
    """Two demo tasks converted with ``volumes --test`` (so each has imagesTs/labelsTs), merged."""
    from organmtl.demo_data import write_demo_data

    import shutil

    write_demo_data(tmp_path / "train", seed=0, families=["multimodal"], n_cases=5)
    raws = []
    for i, task in enumerate(("breast_mr", "cardiac_cta"), start=1):
        src, test = tmp_path / "train" / "multimodal" / task, tmp_path / "test" / task
        for sub in ("images", "labels"):                   # cases 003, 004 become the source's test cases
            (test / sub).mkdir(parents=True)
            for p in sorted((src / sub).glob(f"{task}_00[34]*")):
                shutil.move(p, test / sub / p.name)
        shutil.copy(src / "mapping.json", test / "mapping.json")
        raws.append(convert("volumes", src, "--test", test, "-d", i, "--name", task, "--out", tmp_path / "raw"))
    return convert("merge", *raws, "-d", 9, "--name", "MT", "--out", tmp_path / "raw")


def _one_hot_npz(label_file, heads, out):
    import SimpleITK as sitk

    import numpy as np

    lab = sitk.GetArrayFromImage(sitk.ReadImage(str(label_file)))
    probs = np.stack([(lab == v).astype(np.float32) for v in heads])
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, probabilities=probs)


def test_multitask_experiments_test_on_the_sources_test_images(tmp_path):
    """A task whose source has labelled test images is tested on them (imagesTs/labelsTs), never
    on training cases, and they are never trained or validated on; the others hold out n_test."""
    import numpy as np

    from organmtl.nnunet_trainers.multitask.evaluation import head_label_values
    from organmtl.nnunet_trainers.multitask.tasks import TaskTable
    from organmtl.workflows.multitask_experiments import (copy_test_images, evaluate_experiment,
                                                          plan_experiments)

    raw = _merged_with_test_images(tmp_path)
    meta = json.loads((raw / "dataset.json").read_text())
    table = TaskTable.from_dataset_json(meta)
    assert all(len(table.tasks[t].cases) == 3 for t in table.names)      # imagesTr cases only
    ts = {t: sorted(table.tasks[t].test_cases) for t in table.names}
    assert ts == {t: [f"{t}_{t}_003", f"{t}_{t}_004"] for t in ("breast_mr", "cardiac_cta")}
    labelled = set(ts["breast_mr"] + ts["cardiac_cta"])
    exps = plan_experiments(table, table.names, n_test=2, n_val=1, labelled_test=labelled)
    both = exps[2]
    assert sorted(both.test) == sorted(labelled) and sorted(both.test_from_ts) == sorted(labelled)
    assert len(both.train) == 4 and len(both.val) == 2                   # 3 training cases: 2 train + 1 val
    assert not set(both.test) & set(both.train + both.val)
    # a task without labelled test images holds out the last n_test of its training cases
    only_breast = plan_experiments(table, table.names, n_test=1, n_val=1, labelled_test=set(ts["breast_mr"]))[2]
    cardiac = sorted(table.tasks["cardiac_cta"].cases)
    assert [c for c in only_breast.test if c.startswith("cardiac")] == cardiac[2:]
    assert only_breast.test_from_ts == ts["breast_mr"]

    inp = copy_test_images(both, raw, tmp_path / "exp" / "test_images", 1, ".nii.gz")
    for case in both.test:
        assert (inp / f"{case}_0000.nii.gz").read_bytes() == (raw / "imagesTs" / f"{case}_0000.nii.gz").read_bytes()
    # "predictions" equal to the references: every Dice is 1 only if scored against labelsTs
    heads = head_label_values(meta["labels"])
    for case in both.val:
        _one_hot_npz(raw / "labelsTr" / f"{case}.nii.gz", heads, tmp_path / "val" / f"{case}.npz")
    for case in both.test:
        _one_hot_npz(raw / "labelsTs" / f"{case}.nii.gz", heads, tmp_path / "pred" / f"{case}.npz")
    rows = evaluate_experiment(both, table, meta["labels"], raw / "labelsTr", tmp_path / "val", tmp_path / "pred",
                               ".nii.gz", raw / "labelsTs")
    assert [r["n_test"] for r in rows] == [2, 2]
    for r in rows:
        assert r["dice_argmax"] == 1.0 and r["dice_task_masked"] == 1.0 and r["confusion_mean_pct"] == 0.0
    assert np.isfinite([r["threshold"] for r in rows]).all()
