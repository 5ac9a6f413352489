"""benchmarks/run.py (the suite runner, not run in CI itself): discovery and --only, one script run
in its own process with its returned dict kept (including a spawned worker pool that pickles one
of the script's functions), and the docs page with the machine line."""
import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def suite():
    spec = importlib.util.spec_from_file_location("benchmarks_run", ROOT / "benchmarks" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


DUMMY = '''
import argparse
import multiprocessing


def square(x):
    return x * x


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        value = pool.apply(square, (3,))
    print("| what | value | ratio |")
    print("|---|---|---|")
    print(f"| square | {value} | 1.00 |")
    return {"device": args.device, "quick": args.quick, "value": value}


if __name__ == "__main__":
    main()
'''


def test_discover_and_only(suite):
    names = [p.name for p in suite.discover()]
    assert "bench_evaluation.py" in names and names[-1] == "convert_pddca.py"
    assert [p.name for p in suite.discover(["evaluation"])] == ["bench_evaluation.py"]
    assert [p.name for p in suite.discover(["convert_pddca"])] == ["convert_pddca.py"]
    with pytest.raises(SystemExit, match="no such benchmark"):
        suite.discover(["no_such_thing"])
    assert suite.script_args(ROOT / "benchmarks" / "convert_pddca.py", "cuda", True)[:2] == ["--cases", "5"]
    assert suite.script_args(Path("bench_x.py"), "cuda", True) == ["--device", "cuda", "--quick"]


def test_run_one_script_and_write_page(suite, tmp_path):
    script = tmp_path / "bench_dummy.py"
    script.write_text(DUMMY)
    run = suite.run_one(script, "cpu", True, timeout=300)
    assert run["status"] == "ok", run["stderr_tail"]
    assert run["result"] == {"device": "cpu", "quick": True, "value": 9}
    assert "| square | 9 | 1.00 |" in run["stdout"]
    machine = suite.describe_machine()
    assert "cores usable" in machine and "Python" in machine
    page = suite.write_page([run], machine, SimpleNamespace(quick=True, device="cpu", only=["dummy"]),
                            tmp_path / "docs" / "benchmarks.md")
    text = page.read_text()
    assert f"Machine: {machine}" in text and "| bench_dummy.py | ok |" in text and "| square | 9 | 1.00 |" in text
    assert (tmp_path / "docs" / "benchmarks.json").is_file()
    assert sys.modules.get("bench_dummy") is None     # the script ran in its own process


def test_only_keep_merges_with_the_existing_page(suite, tmp_path, monkeypatch):
    scripts = [Path("bench_a.py"), Path("bench_b.py")]
    monkeypatch.setattr(suite, "discover", lambda only=None: [s for s in scripts if not only or s.stem[6:] in only])
    fake = lambda script, device, quick, timeout: {  # noqa: E731
        "script": script.name, "args": [], "date": "today", "status": "ok", "wall_s": 1.0,
        "stdout": f"| {script.stem} | new |", "stderr_tail": "", "result": {}}
    monkeypatch.setattr(suite, "run_one", fake)
    out = tmp_path / "benchmarks.md"
    assert suite.main(["--out", str(out)]) == 0
    text = out.read_text()
    assert "| bench_a | new |" in text and "| bench_b | new |" in text
    monkeypatch.setattr(suite, "run_one", lambda *a: dict(fake(*a), stdout="| bench_b | newer |"))
    assert suite.main(["--only", "b", "--keep", "--out", str(out)]) == 0
    text = out.read_text()
    assert "| bench_a | new |" in text and "| bench_b | newer |" in text and "| bench_b | new |" not in text
    assert text.index("## bench_a") < text.index("## bench_b")


def test_timeout_ends_the_script_and_its_subprocesses(suite, tmp_path):
    import subprocess

    marker = f"organmtl_bench_timeout_{tmp_path.name}"
    script = tmp_path / "bench_sleepy.py"
    script.write_text(f'''
import subprocess, sys, time


def main(argv=None):
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)  # {marker}"])
    print("| started | 1 | 1.00 |", flush=True)
    time.sleep(120)
    return {{}}
''')
    run = suite.run_one(script, "cpu", True, timeout=20)
    assert run["status"] == "timed out after 20 s" and "| started |" in run["stdout"]
    left = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True).stdout.split()
    assert left == []
