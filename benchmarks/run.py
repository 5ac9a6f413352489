"""Run the benchmark suite: every ``benchmarks/bench_*.py`` and ``benchmarks/convert_pddca.py``, each
in its own process, then write ``docs/benchmarks.md`` with the date, the machine and each script's
printed Markdown tables (every figure given as a ratio to the stock baseline of the same run).

Not a test (not collected by pytest, not run in CI). Run::

    .venv/bin/python benchmarks/run.py --quick                  # everything, small sizes
    .venv/bin/python benchmarks/run.py --device cuda            # on a GPU machine
    .venv/bin/python benchmarks/run.py --only evaluation hmrnet --quick
    .venv/bin/python benchmarks/run.py --list

A ``bench_*.py`` script takes ``--device cpu|cuda`` and ``--quick`` and has ``main(argv=None) ->
dict``; its return value is saved beside the page (``docs/benchmarks.json``). convert_pddca.py
runs on the CPU (``--quick``: 5 cases, -j 1, 1 repeat).
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def describe_machine() -> str:
    """One line: CPU model, cores, RAM, GPU (if torch sees one), OS, Python and torch versions."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = ""
    try:
        kb = int(next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                      if line.startswith("MemTotal")))
        ram = f", {kb / 1024 ** 2:.0f} GiB RAM"
    except (OSError, StopIteration, ValueError):
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu, torch_version = "no GPU", "torch not installed"
    try:
        import torch

        torch_version = f"torch {torch.__version__}"
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            gpu = f"GPU {props.name} ({props.total_memory / 1024 ** 3:.0f} GiB, CUDA {torch.version.cuda})"
    except ImportError:
        pass
    return (f"{cpu}, {cores} cores usable{ram}, {gpu}; {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}, {torch_version}")


def discover(only: list[str] | None = None) -> list[Path]:
    """``bench_*.py`` (sorted) then ``convert_pddca.py``; ``only`` keeps the scripts whose name
    without ``bench_`` and ``.py`` (or whole stem) is listed."""
    scripts = sorted(HERE.glob("bench_*.py")) + [p for p in [HERE / "convert_pddca.py"] if p.is_file()]
    if only:
        wanted = set(only)
        unknown = wanted - {s.stem for s in scripts} - {s.stem.removeprefix("bench_") for s in scripts}
        if unknown:
            names = ", ".join(s.stem.removeprefix("bench_") for s in scripts)
            raise SystemExit(f"benchmarks/run.py: error: --only {sorted(unknown)[0]}: no such benchmark (have: {names})")
        scripts = [s for s in scripts if s.stem in wanted or s.stem.removeprefix("bench_") in wanted]
    return scripts


def script_args(script: Path, device: str, quick: bool) -> list[str]:
    if script.name == "convert_pddca.py":
        return ["--cases", "5", "--jobs", "1", "--repeats", "1"] if quick else []
    return ["--device", device] + (["--quick"] if quick else [])


def _child(script: Path, json_out: Path, argv: list[str]) -> int:
    """In the child process: import the script, call ``main(argv)``, save what it returns."""
    # imported under its own name from its folder, so that worker processes (spawn) and pickling
    # find the same module
    sys.path.insert(0, str(script.parent))
    module = importlib.import_module(script.stem)
    result = module.main(argv)
    json_out.write_text(json.dumps(result, indent=2, default=str))
    return 0 if not isinstance(result, int) or result == 0 else int(result)


def run_one(script: Path, device: str, quick: bool, timeout: int) -> dict:
    argv = script_args(script, device, quick)
    with tempfile.TemporaryDirectory() as tmp:
        json_out = Path(tmp) / "result.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--_child", str(script), "--_json", str(json_out), "--", *argv]
        print(f"\n=== {script.name} {' '.join(argv)}", flush=True)
        t0 = time.time()
        # own process group, so that a timeout also ends the script's workers and subprocesses
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                                env={**os.environ, "TQDM_DISABLE": "1"}, start_new_session=True)
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
            status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                stdout, stderr = proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                stdout, stderr = proc.communicate()
            status = f"timed out after {timeout} s"
        wall = time.time() - t0
        print(stdout, end="", flush=True)
        if status != "ok":
            print(stderr[-3000:], file=sys.stderr)
        result = json.loads(json_out.read_text()) if json_out.is_file() else None
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return {"script": script.name, "args": argv, "date": date, "status": status, "wall_s": round(wall, 1), "stdout": stdout,
            "stderr_tail": stderr[-2000:] if status != "ok" else "", "result": result}


def write_page(runs: list[dict], machine: str, args, out: Path) -> Path:
    """docs/benchmarks.md: date, machine, command, then each script's printed output."""
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = ["# Benchmarks", "",
             f"Written {now} by `benchmarks/run.py{' --quick' if args.quick else ''} --device {args.device}"
             f"{' --only ' + ' '.join(args.only) if args.only else ''}` (see benchmarks/README.md); the table "
             "gives when each script was measured.", "",
             f"Machine: {machine}", "",
             "Every figure is compared with the stock baseline measured in the same run. Wall times on shared "
             "or busy cores vary by 20 % or more between runs; ratios within one run are the numbers to read.", "",
             "| benchmark | status | wall s | measured |", "|---|---|---|---|"]
    lines += [f"| {r['script']} | {r['status']} | {r['wall_s']} | {r.get('date', now)} |" for r in runs]
    for r in runs:
        lines += ["", f"## {r['script']} {' '.join(r['args'])}", ""]
        body = r["stdout"].strip()
        lines.append(body if body else "(no output)")
        if r["status"] != "ok":
            lines += ["", "```", r["stderr_tail"].strip(), "```"]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(
        {"date": now, "machine": machine, "runs": runs},
        indent=2, default=str) + "\n")
    return out


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--_child"]:
        sep = argv.index("--")
        return _child(Path(argv[1]), Path(argv[3]), argv[sep + 1:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="passed to every bench_*.py")
    parser.add_argument("--quick", action="store_true", help="passed to every bench_*.py (small sizes)")
    parser.add_argument("--only", nargs="+", default=None, metavar="NAME",
                        help="run only these (e.g. evaluation hmrnet convert_pddca)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md", help="Markdown page to write")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per script (default 3600)")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    parser.add_argument("--keep", action="store_true",
                        help="with --only: keep the other scripts' sections of the existing page (from its .json)")
    args = parser.parse_args(argv)
    scripts = discover(args.only)
    if args.list:
        print("\n".join(s.name for s in scripts))
        return 0
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("benchmarks/run.py: error: --device cuda but torch sees no CUDA device")
    machine = describe_machine()
    print(f"Machine: {machine}")
    runs = [run_one(s, args.device, args.quick, args.timeout) for s in scripts]
    if args.keep and args.out.with_suffix(".json").is_file():
        previous = json.loads(args.out.with_suffix(".json").read_text())
        if previous.get("machine") != machine:
            print(f"note: the kept sections were measured on: {previous.get('machine')}")
        order = [p.name for p in discover()]
        fresh = {r["script"] for r in runs}
        runs = sorted(runs + [r for r in previous.get("runs", []) if r["script"] not in fresh and "stdout" in r],
                      key=lambda r: order.index(r["script"]) if r["script"] in order else len(order))
    page = write_page(runs, machine, args, args.out)
    print(f"\n{page} written ({sum(r['status'] == 'ok' for r in runs)}/{len(runs)} benchmarks ok)")
    return 0 if all(r["status"] == "ok" for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
