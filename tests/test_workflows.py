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
