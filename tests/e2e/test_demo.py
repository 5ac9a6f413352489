"""The README's main command, `organmtl demo`, end to end with minimal budgets."""
import pytest

from organmtl.workflows.demo import DETECTRON_CONFIGS, STUDIES
from tests.helpers import run_cli

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(2400)]


def test_demo_runs_end_to_end(tmp_path):
    out = tmp_path / "demo"
    r = run_cli("demo", "--out", out, "--epochs", "1", "--iterations", "2", "--detectron-iterations", "2",
                timeout=3600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = (out / "summary.md").read_text()
    for study in STUDIES:                          # one comparison table per study, every trainer a column
        assert f"## {study.title}" in summary
        for label in study.trainers:
            assert f"{label} Dice" in summary
    for label in DETECTRON_CONFIGS:
        assert f"{label} segm AP" in summary
    assert "| BrainStem |" in summary and "HD95 mm" in summary and "| liver |" in summary
    # the budgets it trained with (here the command line's) are printed and in summary.md, with the
    # pointer to the comparison at convergence
    row = "| han | nnU-Net | nnUNetTrainerOMTLBaseline_Tiny | 1 epochs x 2 iterations = 2 iterations"
    assert row in summary and "Budgets (organmtl demo's own" in r.stdout
    assert "| han | FocusNetv2 | nnUNetTrainerOMTLFocusNetV2_Tiny | 5 epochs x 2 iterations" in summary
    assert "benchmarks.md#convergence" in summary
    # trainers of a study ran at once: both HaN trainers' progress lines, tagged
    assert "[han: nnU-Net] epoch 1/1" in r.stdout and "[han: FocusNetv2] epoch 5/5" in r.stdout
    assert (out / "report" / "report.md").is_file()
    assert len(list((out / "report").rglob("*.png"))) >= 6       # overlays and learning curves
    assert "Everything is under" in r.stdout
    # running again replaces the earlier demo folder; a foreign folder is refused
    foreign = tmp_path / "foreign"
    (foreign / "x").mkdir(parents=True)
    r = run_cli("demo", "--out", foreign)
    assert r.returncode != 0 and "not made by the demo" in (r.stdout + r.stderr)
