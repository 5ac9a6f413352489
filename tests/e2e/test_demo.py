"""The README's main command, `organmtl demo`, end to end with minimal budgets."""
import pytest

from tests.conftest import run_cli

pytestmark = pytest.mark.e2e


def test_demo_runs_end_to_end(tmp_path):
    out = tmp_path / "demo"
    r = run_cli("demo", "--out", out, "--epochs", "1", "--iterations", "2", "--detectron-iterations", "2",
                timeout=1800)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = (out / "summary.md").read_text()
    assert "| BrainStem |" in summary and "Detectron2 Mask R-CNN" in summary
    assert len(list((out / "pictures").rglob("*.png"))) == 4
    assert "Everything is under" in r.stdout
    # running again replaces the earlier demo folder; a foreign folder is refused
    foreign = tmp_path / "foreign"
    (foreign / "x").mkdir(parents=True)
    r = run_cli("demo", "--out", foreign)
    assert r.returncode != 0 and "not made by the demo" in (r.stdout + r.stderr)
