"""The demo's one pool of trainers (organmtl.workflows.demo._train_all): a part's trainers start
beside the previous part's last ones, sections and budget rows come back in part order, and the
first failure stops what is queued. Preparation and training are replaced by fakes that record
when they ran; no nnU-Net or Detectron2 command runs here."""
import threading
import time
from pathlib import Path

import pytest

from organmtl.procs import CommandFailed
from organmtl.workflows import demo
from organmtl.workflows.demo import Budget, Study


def _study(key, labels):
    return Study(key, f"title {key}", 500, key, (), (), {label: f"Trainer_{label}" for label in labels},
                 {label: Budget(1, 1) for label in labels})


class _Fakes:
    def __init__(self, seconds, fail=None):
        self.seconds, self.fail = seconds, fail
        self.started, self.ended, self.lock = {}, {}, threading.Lock()

    def prepare(self, study, out, data, logs):
        return Path(f"raw_{study.key}")

    def train(self, study, label, budget, out, raw, logs, stop, threads, console):
        with self.lock:
            self.started[label] = time.monotonic()
        if label == self.fail:
            raise CommandFailed(f"{label} failed")
        deadline = time.monotonic() + self.seconds[label]
        while time.monotonic() < deadline:
            if stop.is_set():
                raise demo.CommandStopped(f"{label} stopped")
            time.sleep(0.01)
        with self.lock:
            self.ended[label] = time.monotonic()
        return {"organ": {"Dice": 1.0}}, {"part": study.key, "method": label, "trainer": label, "budget": "b",
                                          "seconds": self.seconds[label], "threads": dict(threads)}


@pytest.fixture
def fakes(monkeypatch):
    def install(seconds, fail=None):
        f = _Fakes(seconds, fail)
        monkeypatch.setattr(demo, "_prepare_study", f.prepare)
        monkeypatch.setattr(demo, "_train_and_score", f.train)
        return f
    return install


def test_next_part_fills_the_free_worker_and_results_keep_part_order(fakes, tmp_path):
    f = fakes({"long": 2.0, "short": 0.1, "b1": 0.1, "b2": 0.1})
    a, b = _study("a", ["long", "short"]), _study("b", ["b1", "b2"])
    plan = demo.demo_budgets([a, b])
    sections, rows = demo._train_all([a, b], False, tmp_path, tmp_path, tmp_path, plan, 1, jobs=2, seed=7)
    # part b's first trainer starts on the worker that "short" freed, while "long" still runs
    assert f.started["b1"] < f.ended["long"]
    assert f.started["b2"] < f.ended["long"]
    assert [r["method"] for r in rows] == ["long", "short", "b1", "b2"]        # part order, column order
    assert sections[0].startswith("## title a") and sections[1].startswith("## title b")
    # each command got its share of the cores
    assert {r["threads"].get("ORGANMTL_CPU_THREADS") for r in rows} == {demo.cpu_threads(2).get("ORGANMTL_CPU_THREADS")}
    assert {r["threads"].get("ORGANMTL_SEED") for r in rows} == {"7"}          # every trainer the same seed


def test_unseeded_demo_sets_no_seed(fakes, tmp_path):
    fakes({"x": 0.0})
    a = _study("a", ["x"])
    _, rows = demo._train_all([a], False, tmp_path, tmp_path, tmp_path, demo.demo_budgets([a]), 1, jobs=1, seed=None)
    assert "ORGANMTL_SEED" not in rows[0]["threads"]


def test_demo_command_line_seed():
    from organmtl.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["demo"]).seed == demo.DEFAULT_SEED == 0
    assert parser.parse_args(["demo", "--seed", "3"]).seed == 3
    assert parser.parse_args(["demo", "--seed", "none"]).seed is None
    with pytest.raises(SystemExit):
        parser.parse_args(["demo", "--seed", "-2"])


def test_first_failure_is_raised_and_queued_trainers_never_start(fakes, tmp_path):
    f = fakes({"bad": 0.0, "slow": 5.0, "later": 0.1}, fail="bad")
    a, b = _study("a", ["slow", "bad"]), _study("b", ["later"])
    t0 = time.monotonic()
    with pytest.raises(CommandFailed, match="bad failed"):
        demo._train_all([a, b], False, tmp_path, tmp_path, tmp_path, demo.demo_budgets([a, b]), 1, jobs=2)
    assert time.monotonic() - t0 < 4.0                  # "slow" was stopped, not waited for
    assert "later" not in f.started and "slow" not in f.ended
