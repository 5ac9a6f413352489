"""``organmtl demo``: the main job end to end on the built-in demo data, on a CPU.

Every implemented method runs on the demo dataset of its paper, next to the stock baseline it is
compared against. organmtl's own steps are the library functions behind the commands a user types
(their output goes to ``--out/logs``); training and inference are the stock commands, run as
subprocesses:

1. write the phantoms (``write_demo_data``, as ``organmtl demo-data``);
2. per nnU-Net study (:data:`STUDIES`): convert to nnU-Net raw format (the converters, as
   ``organmtl convert``), plan and preprocess the tiny CPU configuration
   (:func:`organmtl.nnunet_plans.plan_tiny`, as ``organmtl plan-tiny``), train each trainer with the
   stock ``nnUNetv2_train``; the head-and-neck study also predicts held-out cases with the stock
   ``nnUNetv2_predict`` and evaluates them (Dice, HD95, small organs, as ``organmtl evaluate``), the
   others report nnU-Net's own fold-0 validation;
3. Detectron2: spine slices -> COCO (as ``organmtl convert volumes --to coco``), ``train_net.py`` with
   the tiny Mask R-CNN baseline and the tiny HMR-Net config, COCO segm AP and Dice per structure;
4. overlays and learning curves (:func:`organmtl.evaluation.report.write_report`, as
   ``organmtl report``); one comparison table in ``summary.md``.

Everything lives under ``--out`` (nnU-Net's three folders included); nothing outside is touched.
An ``--out`` folder of an earlier demo run is replaced; any other non-empty folder is refused.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from organmtl.procs import CommandStopped, run_in_group, venv_bin
from organmtl.workflows.steps import convert, output_to

MARKER = ".organmtl-demo"
FOLD = 0
BASELINE = "nnUNetTrainerOMTLBaseline_Tiny"
DETECTRON_ITERATIONS = 100
N_TEST = 4
#: trainers that train at once (two cores: two; see _train_all)
DEFAULT_JOBS = max(1, min(2, os.cpu_count() or 1))
#: every trainer's seed, so that two demos print the same tables. Unseeded (``--seed none``, stock nnU-Net's
#: behaviour) the short budgets sit on the steep part of the learning curves and one run can differ from
#: the next by more than the methods differ (docs/demo.md). 0: the convergence benchmark's first seed.
DEFAULT_SEED = 0


class DemoError(ValueError):
    """Bad input for ``organmtl demo`` (one line, exit code 2)."""


@dataclass(frozen=True)
class Budget:
    """One trainer's training budget in the demo, set through the stock schedule variables of
    :mod:`organmtl.nnunet_trainers.budget` (``ORGANMTL_EPOCHS``, ``ORGANMTL_ITERS_PER_EPOCH``,
    ``ORGANMTL_VAL_ITERS``); optimiser, learning-rate schedule and augmentation stay the trainer's
    own. ``phases`` (FocusNet: phase -> epochs, ``ORGANMTL_FOCUSNET_PHASE_EPOCHS``) replaces
    ``epochs`` by their sum."""

    epochs: int
    iterations: int
    val_iterations: int = 2
    phases: tuple[tuple[str, int], ...] | None = None

    @property
    def total_epochs(self) -> int:
        return sum(n for _, n in self.phases) if self.phases else self.epochs

    def scaled(self, epochs: int | None = None, iterations: int | None = None) -> "Budget":
        """This budget with the command line's ``--epochs`` / ``--iterations`` where given; ``--epochs``
        scales a phase split to about that many epochs, every phase at least one (as the trainer's own split)."""
        phases = self.phases
        if epochs and phases:
            phases = tuple((p, max(1, round(n * epochs / self.total_epochs))) for p, n in phases)
        return Budget(epochs or self.epochs, iterations or self.iterations, self.val_iterations, phases)

    def environment(self) -> dict[str, str]:
        env = {"ORGANMTL_EPOCHS": str(self.total_epochs), "ORGANMTL_ITERS_PER_EPOCH": str(self.iterations),
               "ORGANMTL_VAL_ITERS": str(self.val_iterations)}
        if self.phases:
            env["ORGANMTL_FOCUSNET_PHASE_EPOCHS"] = ",".join(f"{p}={n}" for p, n in self.phases)
        return env

    def describe(self) -> str:
        text = (f"{self.total_epochs} epochs x {self.iterations} iterations = "
                f"{self.total_epochs * self.iterations} iterations ({self.val_iterations} validation iterations / epoch)")
        if self.phases:
            text += "; phases " + ", ".join(f"{p} {n}" for p, n in self.phases) + " epochs"
        return text


@dataclass(frozen=True)
class Study:
    """One nnU-Net comparison of the demo: a dataset made by ``convert`` commands and the trainers
    trained on it (column label -> trainer class name; the first is the baseline)."""

    key: str
    title: str
    dataset_id: int
    name: str
    families: tuple[str, ...]
    convert: tuple[tuple[str, ...], ...]        # (source, options...) of organmtl convert; "{data}", "{raw}"
    trainers: dict[str, str]
    budgets: dict[str, Budget]                  # column label -> that trainer's demo budget
    configuration: str = "3d_tiny"
    test_set: bool = False                      # predict held-out cases (else: fold-0 validation)

    def __post_init__(self):
        if set(self.budgets) != set(self.trainers):
            raise ValueError(f"study {self.key}: budgets for {sorted(self.budgets)} but trainers {sorted(self.trainers)}")


#: FocusNetv2's phases (§4.2 order) in epochs of ``iterations``: S-Net gets most of it, the small-organ
#: parts enough to show they train
SCHEDULE_FOCUSNET = (("snet", 16), ("sol", 2), ("ae", 2), ("sos", 2), ("joint", 2))

STUDIES = (
    Study("han", "Head-and-neck CT (PDDCA layout): FocusNetv2 vs nnU-Net", 501, "HaNDemo", ("han_pddca",),
          (("pddca", "{data}/han_pddca", "--test", "{data}/han_pddca_test", "--dataset-id", "501",
            "--name", "HaNDemo", "-j", "2"),),
          {"nnU-Net": BASELINE, "FocusNetv2": "nnUNetTrainerOMTLFocusNetV2_Tiny"},
          {"nnU-Net": Budget(22, 250), "FocusNetv2": Budget(0, 50, phases=SCHEDULE_FOCUSNET)}, test_set=True),
    # one conversion with Gaussian landmark channels serves all three: the auxiliary-task trainers
    # need heatmaps, early fusion takes either map (the paper's distance map: --landmark-channels distance)
    Study("abdomen", "Fat/water MR with hip-joint landmarks: landmark U-Nets vs nnU-Net", 503, "AbdomenDemo",
          ("abdomen_mr",),
          (("volumes", "{data}/abdomen_mr", "--dataset-id", "503", "--name", "AbdomenDemo",
            "--landmark-channels", "heatmap"),),
          {"nnU-Net (image only)": "nnUNetTrainerOMTLLandmarkImageOnly_Tiny",
           "landmarks as input (early fusion)": "nnUNetTrainerOMTLLandmarkEarlyFusion_Tiny",
           "landmarks as auxiliary task (joint)": "nnUNetTrainerOMTLLandmarkJoint_Tiny"},
          {"nnU-Net (image only)": Budget(10, 100), "landmarks as input (early fusion)": Budget(12, 100),
           "landmarks as auxiliary task (joint)": Budget(12, 100)}),
    Study("multitask", "Brain MR + breast MR + cardiac CTA in one network: multi-task CNN vs nnU-Net", 504,
          "MultiTaskDemo", ("multimodal",),
          (("volumes", "{data}/multimodal/brain_mr", "--dataset-id", "505", "--name", "BrainDemo"),
           ("volumes", "{data}/multimodal/breast_mr", "--dataset-id", "506", "--name", "BreastDemo"),
           ("volumes", "{data}/multimodal/cardiac_cta", "--dataset-id", "507", "--name", "CardiacDemo"),
           ("merge", "{raw}/Dataset505_BrainDemo", "{raw}/Dataset506_BreastDemo",
            "{raw}/Dataset507_CardiacDemo", "--dataset-id", "504", "--name", "MultiTaskDemo")),
          {"nnU-Net": BASELINE, "multi-task U-Net (balanced)": "nnUNetTrainerOMTLMultiTaskUNet_Tiny",
           "triplanar multi-task CNN": "nnUNetTrainerOMTLTriplanar_Tiny"},
          {"nnU-Net": Budget(10, 100), "multi-task U-Net (balanced)": Budget(10, 100),
           "triplanar multi-task CNN": Budget(8, 50)}),
)

#: what ``--only`` can pick: the nnU-Net studies and the Detectron2 comparison
PARTS = [*(s.key for s in STUDIES), "detectron"]


def _step(title: str):
    print(f"\n=== {title}", flush=True)
    return time.time()


def _done(t0: float):
    print(f"    ({time.time() - t0:.0f} s)", flush=True)


# ---------------------------------------------------------------- progress while a trainer runs

_STAMP = re.compile(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}(?:\.\d+)?: ?")
_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*(?:[eE][-+]?\d+)?|nan|inf)")


def _floats(text: str) -> list[float]:
    """The numbers of a printed list, numpy 2 style (``[np.float32(0.5), ...]``) or plain."""
    return [float(v) for v in _NUMBER.findall(re.sub(r"np\.\w+\(", "", text))]


class EpochLog:
    """Reads nnU-Net's per-epoch lines (``nnUNetTrainer.on_train_epoch_start``/``on_epoch_end``
    write them to ``training_log_*.txt`` and print them: ``Epoch N``, ``train_loss``, ``val_loss``,
    ``Pseudo dice [...]``, ``Epoch time: T s``) one line at a time; :meth:`feed` returns the epoch's
    record when its ``Epoch time`` line arrives."""

    def __init__(self, total_epochs: int):
        self.total_epochs = total_epochs
        self.epochs: list[dict] = []
        self._current: dict | None = None

    def feed(self, line: str) -> dict | None:
        text = _STAMP.sub("", line.strip()).strip()
        if re.fullmatch(r"Epoch \d+", text):
            self._current = {"epoch": int(text.split()[1])}
            return None
        if self._current is None:
            return None
        for key in ("train_loss", "val_loss"):
            if text.startswith(key + " "):
                self._current[key] = _floats(text[len(key):])[0]
                return None
        if text.startswith("Pseudo dice"):
            self._current["pseudo_dice"] = _floats(text[len("Pseudo dice"):])
            return None
        m = re.fullmatch(r"Epoch time: (\S+) s", text)
        if m:
            record, self._current = {**self._current, "epoch_time_s": float(m.group(1))}, None
            self.epochs.append(record)
            return record
        return None

    def seconds_left(self) -> float | None:
        """Mean epoch time so far x epochs left of the budget (the final validation not included)."""
        if not self.epochs:
            return None
        done = self.epochs[-1]["epoch"] + 1
        mean = sum(e["epoch_time_s"] for e in self.epochs) / len(self.epochs)
        return max(self.total_epochs - done, 0) * mean

    def line(self, record: dict) -> str:
        """One progress line: epoch i/n, losses, mean pseudo-Dice over the classes, time left."""
        parts = [f"epoch {record['epoch'] + 1}/{self.total_epochs}"]
        if "train_loss" in record:
            parts.append(f"loss {record['train_loss']:.4f}" + (f" (val {record['val_loss']:.4f})"
                                                                 if "val_loss" in record else ""))
        dice = [d for d in record.get("pseudo_dice", []) if math.isfinite(d)]
        if dice:
            parts.append(f"pseudo-Dice {sum(dice) / len(dice):.3f}")
        parts.append(f"{record['epoch_time_s']:.1f} s/epoch")
        left = self.seconds_left()
        if left is not None:
            parts.append(f"~{_duration(left)} left")
        return "    " + ", ".join(parts)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


@contextmanager
def epoch_progress(log_file: Path, total_epochs: int, period: float = 2.0, stream=None, tag: str | None = None):
    """While the block runs, follow ``log_file`` (a trainer's output, appended to) from its current
    end and print :meth:`EpochLog.line` for every finished epoch (after ``[tag]`` when given: trainers
    that run at once); yields the :class:`EpochLog`."""
    log_file, stream = Path(log_file), stream or sys.stdout
    progress = EpochLog(total_epochs)
    start = log_file.stat().st_size if log_file.is_file() else 0
    stop = threading.Event()

    def follow():
        pos, partial = start, ""
        while True:
            last = stop.wait(period)
            if log_file.is_file():
                with open(log_file, errors="replace") as f:
                    f.seek(pos)
                    chunk = f.read()
                    pos = f.tell()
                lines = (partial + chunk).split("\n")
                partial = lines.pop()
                for line in lines:
                    record = progress.feed(line)
                    if record is not None:
                        text = progress.line(record)
                        print(f"    [{tag}] {text.strip()}" if tag else text, file=stream, flush=True)
            if last:
                return

    thread = threading.Thread(target=follow, name="epoch-progress", daemon=True)
    thread.start()
    try:
        yield progress
    finally:
        stop.set()
        thread.join()


def prepare_out(out: Path) -> None:
    """Make ``out`` the demo's folder: a new or empty folder, or one of an earlier demo run (replaced)."""
    if out.exists() and not out.is_dir():
        raise DemoError(f"{out} exists and is not a folder; choose another --out")
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).exists():
            raise DemoError(f"{out} exists and was not made by the demo; choose another --out")
        print(f"{out} holds an earlier demo run: starting again (pass a new --out to keep it)")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("made by organmtl demo\n")


def check_budget(**budget: int | None) -> None:
    """Every budget given (epochs, iterations ...) is a positive integer."""
    for name, value in budget.items():
        if value is not None and value < 1:
            raise DemoError(f"--{name.replace('_', '-')} must be at least 1 (got {value})")


def run_demo(out: Path, epochs: int | None = None, iterations: int | None = None,
             detectron_iterations: int | None = None, only: list[str] | None = None, jobs: int | None = None,
             seed: int | None = DEFAULT_SEED) -> int:
    from organmtl.demo_data import write_demo_data
    from organmtl.demo_data.han import write_han
    from organmtl.evaluation.report import write_report

    check_budget(epochs=epochs, iterations=iterations, detectron_iterations=detectron_iterations, jobs=jobs)
    jobs = jobs or DEFAULT_JOBS
    unknown = sorted(set(only or ()) - set(PARTS))
    if unknown:
        raise DemoError(f"--only: unknown part(s) {', '.join(unknown)}")
    out = Path(out).resolve()
    detectron_iterations = detectron_iterations or DETECTRON_ITERATIONS
    studies = [s for s in STUDIES if not only or s.key in only]
    run_detectron = not only or "detectron" in only
    prepare_out(out)
    env = {"nnUNet_raw": str(out / "nnUNet_raw"), "nnUNet_preprocessed": str(out / "nnUNet_preprocessed"),
           "nnUNet_results": str(out / "nnUNet_results"), "nnUNet_n_proc_DA": os.environ.get("nnUNet_n_proc_DA", "0"),
           "nnUNet_def_n_proc": os.environ.get("nnUNet_def_n_proc", "2")}
    os.environ.update(env)
    logs = out / "logs"
    logs.mkdir()
    t_all = time.time()
    plan = demo_budgets(studies, epochs, iterations)
    print("Budgets (organmtl demo's own; --epochs / --iterations / --detectron-iterations override them), "
          + (f"every trainer seeded with {seed} (--seed):" if seed is not None else "unseeded (--seed none):"))
    for study in studies:
        for label, trainer in study.trainers.items():
            print(f"    {study.key}: {label} ({trainer}): {plan[study.key][label].describe()}")
    if run_detectron:
        print(f"    detectron: {', '.join(DETECTRON_CONFIGS)}: {detectron_iterations} iterations each", flush=True)

    t0 = _step("demo data")
    data = out / "demo_data"
    families = sorted({f for s in studies for f in s.families} | ({"spine"} if run_detectron else set()))
    write_demo_data(data, seed=0, families=families, overwrite=True)
    if any(s.key == "han" for s in studies):
        write_han(data / "han_pddca_test", N_TEST, seed=0, first_index=100, with_missing=False)
    print(f"    {data}: {', '.join(families)}")
    _done(t0)

    sections, budgets = _train_all(studies, run_detectron, out, data, logs, plan, detectron_iterations, jobs, seed)

    t0 = _step("organmtl report: overlays and learning curves")
    with output_to(logs / "report.log"):
        write_report(out, out_dir=out / "report")
    _done(t0)

    summary = (f"# organmtl demo ({time.time() - t_all:.0f} s on CPU)\n\n" + budget_section(budgets, seed) + "\n\n"
               + "\n\n".join(sections) + f"\n\nPictures and learning curves: {out / 'report' / 'report.md'}\n")
    (out / "summary.md").write_text(summary)
    print("\n" + summary)
    print(f"Everything is under {out}; this summary is {out / 'summary.md'}")
    return 0


def demo_budgets(studies, epochs: int | None = None, iterations: int | None = None) -> dict[str, dict[str, Budget]]:
    """study key -> column label -> the budget it trains with: the study's own, with the command
    line's ``--epochs`` / ``--iterations`` where given (:meth:`Budget.scaled`)."""
    return {s.key: {label: b.scaled(epochs, iterations) for label, b in s.budgets.items()} for s in studies}


def _train_all(studies, run_detectron: bool, out: Path, data: Path, logs: Path, plan: dict[str, dict[str, Budget]],
               detectron_iterations: int, jobs: int, seed: int | None = None) -> tuple[list[str], list[dict]]:
    """Prepare each part in turn and queue its trainers on ONE pool of ``jobs`` workers, so that a
    part's trainers start beside the previous part's last ones instead of after them (nnU-Net's
    CPU training is mostly single-threaded small kernels and augmentation, so two trainers on two
    cores finish sooner than one after the other). Returns the Markdown sections and the budget
    rows (trainer, budget, wall time), in part order. The first failure stops every command. ``seed``:
    every trainer's (``ORGANMTL_SEED``; Detectron2's ``SEED``), None: unseeded."""
    stop = threading.Event()
    parts: list[tuple[object, dict]] = []     # (columns -> section, column label -> future)
    env = {**cpu_threads(jobs), **seed_environment(seed)}
    # the trainers print progress to the console while the main thread prepares the next part with its
    # output redirected to a log (output_to re-points file descriptors 1 and 2 for the whole process), so
    # they write to a duplicate of the console's descriptor taken now
    try:
        sys.stdout.flush()
        console = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    except (AttributeError, OSError, ValueError):     # no real descriptor (captured in-process)
        console = sys.stdout

    def guarded(fn, *args):
        if stop.is_set():                  # queued behind a command that failed: do not start
            return None
        try:
            return fn(*args, stop, env, console)
        except BaseException:
            stop.set()                     # the other commands stop too
            raise

    with ThreadPoolExecutor(max_workers=max(1, jobs), thread_name_prefix="demo") as pool:
        try:
            for study in studies:
                if stop.is_set():
                    break
                raw = _prepare_study(study, out, data, logs)
                # longest budgets first, so that the shorter ones fill in beside them
                order = sorted(study.trainers, key=lambda label: -plan[study.key][label].total_epochs
                               * plan[study.key][label].iterations)
                futures = {label: pool.submit(guarded, _train_and_score, study, label, plan[study.key][label], out,
                                              raw, logs) for label in order}
                parts.append((lambda columns, study=study: _study_section(study, columns),
                              {label: futures[label] for label in study.trainers}))
            if run_detectron and not stop.is_set():
                coco = _prepare_detectron(out, data, logs)
                futures = {label: pool.submit(guarded, _train_detectron, label, rel, out, coco, logs,
                                              detectron_iterations) for label, rel in DETECTRON_CONFIGS.items()}
                parts.append((lambda columns: _detectron_section(columns, detectron_iterations), futures))
            wait([f for _, fs in parts for f in fs.values()], return_when=FIRST_EXCEPTION)
        except BaseException:             # a preparation failed, or Ctrl-C: stop the running ones
            stop.set()
            raise
    if console is not sys.stdout:
        console.close()
    _raise_first_failure([f for _, fs in parts for f in fs.values()])
    sections, budgets = [], []
    for section, futures in parts:
        rows = {label: f.result() for label, f in futures.items()}
        budgets.extend(row for _, row in rows.values())
        sections.append(section({label: column for label, (column, _) in rows.items()}))
    return sections, budgets


def _prepare_study(study: Study, out: Path, data: Path, logs: Path) -> Path:
    """Convert, plan and preprocess one study (its fold-0 split written); its nnU-Net raw folder."""
    from organmtl.nnunet_plans import plan_tiny

    raw_root = out / "nnUNet_raw"
    t0 = _step(f"{study.title}: convert, plan + preprocess ({study.configuration})")
    for source, *options in study.convert:
        with output_to(logs / f"{study.key}_convert.log"):
            convert(source, *(o.format(data=data, raw=raw_root) for o in options))
    with output_to(logs / f"{study.key}_plan.log"):
        plan_tiny(study.dataset_id, configurations=(study.configuration,))
    raw = raw_root / f"Dataset{study.dataset_id:03d}_{study.name}"
    write_default_split(out / "nnUNet_preprocessed" / raw.name, study.configuration)
    _done(t0)
    return raw


def _study_section(study: Study, columns: dict[str, dict]) -> str:
    where = "held-out test cases (nnUNetv2_predict)" if study.test_set else "nnU-Net's fold-0 validation cases"
    return f"## {study.title}\n\nDataset{study.dataset_id:03d}, {study.configuration}, {where}.\n\n" + \
        _comparison_table(columns)


def seed_environment(seed: int | None) -> dict[str, str]:
    """``ORGANMTL_SEED`` for the trainers (torch, numpy and random seeded before the network is built)."""
    from organmtl.nnunet_trainers.budget import SEED_VARIABLE

    return {} if seed is None else {SEED_VARIABLE: str(seed)}


def cpu_threads(jobs: int) -> dict[str, str]:
    """Environment of a command that runs beside ``jobs - 1`` others: an equal share of the cores for
    torch (``ORGANMTL_CPU_THREADS`` for the _Tiny trainers, which nnUNetv2_train would set to every
    core; ``OMP_NUM_THREADS`` and ``MKL_NUM_THREADS`` for train_net.py, whose MKL otherwise keeps what the
    shell set; ``nnUNet_def_n_proc`` for nnUNetv2_predict, which sets torch to every core and caps its
    sliding window at that many threads). Oversubscribed, the processes spin: measured 5.5x slower per
    iteration with two nnU-Net trainings of 2 threads each on 2 cores, 11x for two Mask R-CNN trainings
    started from a shell with ``MKL_NUM_THREADS=2`` (3.9 s against 0.35 s per iteration)."""
    if jobs <= 1:
        return {}
    share = str(max(1, (os.cpu_count() or 1) // jobs))
    return {"ORGANMTL_CPU_THREADS": share, "OMP_NUM_THREADS": share, "MKL_NUM_THREADS": share,
            "nnUNet_def_n_proc": share}


def _raise_first_failure(futures) -> None:
    """Re-raise the error of the command that failed first, not the ones it stopped."""
    errors = [f.exception() for f in futures if f.done() and not f.cancelled() and f.exception()]
    if errors:
        raise next((e for e in errors if not isinstance(e, CommandStopped)), errors[0])


def write_default_split(preprocessed: Path, configuration: str) -> Path:
    """Write nnU-Net's own 5-fold split (what ``nnUNetTrainer.do_split`` writes when it finds none:
    the sorted case ids, ``generate_crossval_split`` seed 12345) before trainers start at once, so that
    no two of them write ``splits_final.json`` at the same time; an existing file is kept."""
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from nnunetv2.utilities.crossval_split import generate_crossval_split
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    path = preprocessed / "splits_final.json"
    if not path.is_file():
        data_identifier = PlansManager(str(preprocessed / "nnUNetPlans.json")).get_configuration(configuration).data_identifier
        folder = str(preprocessed / data_identifier)
        keys = sorted(infer_dataset_class(folder).get_identifiers(folder))
        path.write_text(json.dumps(generate_crossval_split(keys, seed=12345, n_splits=5), indent=4))
    return path


def _train_and_score(study: Study, label: str, budget: Budget, out: Path, raw: Path, logs: Path,
                     stop: threading.Event, run_env: dict[str, str], console=None) -> tuple[dict, dict]:
    """Train one trainer of ``study`` (stock ``nnUNetv2_train``), predict the test cases
    (``nnUNetv2_predict``; ``organmtl predict-focusnet`` for FocusNet, which pastes its small organs once per
    case) where the study has them, score; (its table column, its budget row)."""
    from organmtl.nnunet_trainers.focusnet.predict import predict_command

    trainer, t0, tag = study.trainers[label], time.time(), f"{study.key}: {label}"
    print(f"\n=== [{tag}] nnUNetv2_train {study.dataset_id} {study.configuration} {FOLD} -tr {trainer} "
          f"({budget.total_epochs} epochs x {budget.iterations} iterations)", flush=True, file=console)
    train_log = logs / f"{study.key}_train_{trainer}.log"
    env = {**budget.environment(), **run_env}
    with epoch_progress(train_log, budget.total_epochs, tag=tag, stream=console):
        run_in_group([venv_bin("nnUNetv2_train"), str(study.dataset_id), study.configuration, str(FOLD), "-tr",
                      trainer, "-device", "cpu"], env=env, log_file=train_log, stop=stop)
    if study.test_set:
        pred = out / "predictions" / trainer
        run_in_group([*predict_command(trainer), "-i", str(raw / "imagesTs"), "-o", str(pred), "-d",
                      str(study.dataset_id), "-c", study.configuration, "-f", str(FOLD), "-tr", trainer,
                      "-device", "cpu", "--disable_tta", "-npp", "1", "-nps", "1"],
                     env=env, log_file=logs / f"{study.key}_predict_{trainer}.log", stop=stop)
        column = _evaluate_test_set(raw, pred, out / "evaluation" / trainer)
    else:
        fold_dir = out / "nnUNet_results" / raw.name / f"{trainer}__nnUNetPlans__{study.configuration}" / f"fold_{FOLD}"
        column = _validation_scores(fold_dir, raw)
    seconds = time.time() - t0
    print(f"    [{tag}] done ({seconds:.0f} s)", flush=True, file=console)
    return column, {"part": study.key, "method": label, "trainer": trainer, "budget": budget.describe(),
                    "seconds": seconds}


def _evaluate_test_set(raw: Path, pred: Path, eval_dir: Path) -> dict:
    """Dice (nnU-Net's evaluation) and HD95 in mm (organmtl's) per structure of the test predictions."""
    from organmtl.evaluation.results import SUMMARY_JSON
    from organmtl.evaluation.segmentation import evaluate_folders

    dice = evaluate_folders(pred, raw / "labelsTs", raw / "dataset.json", full_output_dir=eval_dir)
    full = json.loads((eval_dir / SUMMARY_JSON).read_text())
    hd95 = {}
    for name, stats in full["segmentation"]["per_structure"].items():
        value = stats.get("hd95_mm")
        hd95[name] = value.get("mean") if isinstance(value, dict) else value
    return {name: {"Dice": d, "HD95 mm": hd95.get(name)} for name, d in dice.items()}


def _validation_scores(fold_dir: Path, raw: Path) -> dict:
    """Mean Dice per structure from nnU-Net's own fold validation (``validation/summary.json``), each
    structure averaged over the cases whose source annotated it (``organmtl evaluate --annotated-only``).

    nnU-Net's ``mean`` averages a structure over every validation case. On a merged dataset a brain case
    has no pectoral muscle in its reference, so a few stray voxels there score Dice 0 and halve the
    structure's mean (the stock U-Net's GM: 0.918 on the brain case, 0.459 in ``mean``). On a dataset
    without ``organmtl_annotated_labels`` / ``organmtl_tasks`` every case annotates every label and the
    result is nnU-Net's ``mean``."""
    from organmtl.evaluation.partial import annotated_labels

    source = raw / "dataset.json"
    summary = json.loads((fold_dir / "validation" / "summary.json").read_text())
    meta = json.loads(source.read_text())
    names = {str(v): k for k, v in meta["labels"].items() if isinstance(v, int)}
    ann = annotated_labels(meta, str(source))
    ending = meta["file_ending"]
    dice: dict[str, list[float]] = {label: [] for label in summary["mean"]}
    for row in summary["metric_per_case"]:
        own = ann.of(Path(row["reference_file"]).name[: -len(ending)])
        for label, m in row["metrics"].items():
            value = m["Dice"]
            if label in dice and (not label.isdigit() or int(label) in own) and value is not None \
                    and not math.isnan(value):
                dice[label].append(value)
    return {names.get(label, label): {"Dice": sum(v) / len(v) if v else math.nan} for label, v in dice.items()}


#: where the paper comparison at convergence is (written by benchmarks/convergence.py)
CONVERGENCE_DOC = "docs/benchmarks.md"
CONVERGENCE_SECTION = "Convergence"


def budget_section(budgets: list[dict], seed: int | None = None) -> str:
    """The demo's budgets (one row per trained model: its training budget and wall time) and where
    the comparison at convergence is."""
    doc = Path(__file__).resolve().parents[2] / CONVERGENCE_DOC
    anchor = "#" + CONVERGENCE_SECTION.lower()
    where = (f"[{CONVERGENCE_DOC}, section \"{CONVERGENCE_SECTION}\"]({doc}{anchor})" if doc.is_file()
             else f"{CONVERGENCE_DOC} of the organmtl repository, section \"{CONVERGENCE_SECTION}\"")
    lines = ["## Budgets", "",
             "Every model is trained with the budget below on the CPU (the papers train for days on GPUs; "
             "stock nnU-Net trains 1000 epochs x 250 iterations), so the tables show that each method learns "
             "on the demo phantoms, not how the methods compare once trained to convergence. The paper "
             f"comparison, every method trained until validation stops improving, is in {where}. "
             "Each budget is the run length only (ORGANMTL_EPOCHS x ORGANMTL_ITERS_PER_EPOCH, "
             "ORGANMTL_VAL_ITERS; FocusNet's phase split): optimiser, learning-rate schedule and augmentation "
             "are each trainer's own, the stock nnU-Net baseline's included. The trainers train "
             "two at a time (a study's next to the previous study's last), so their wall times overlap. "
             + (f"Every trainer was seeded with {seed} (`--seed`); unseeded runs can differ by more than the "
                "methods do." if seed is not None else "The trainers were not seeded (`--seed none`)."), "",
             "| part | method | trainer / config | budget | wall time |", "|---|---|---|---|---|"]
    lines += [f"| {b['part']} | {b['method']} | {b['trainer']} | {b['budget']} | {b['seconds']:.0f} s |" for b in budgets]
    return "\n".join(lines)


def _fmt(v) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}" if abs(v) < 100 else f"{v:.0f}"


def _comparison_table(columns: dict[str, dict[str, dict]]) -> str:
    """Markdown table, one row per structure, one column per (method, metric)."""
    metrics = list(dict.fromkeys(m for col in columns.values() for row in col.values() for m in row))
    structures = list(dict.fromkeys(s for col in columns.values() for s in col))
    heads = [f"{label} {m}" for label in columns for m in metrics]
    lines = [f"| structure | {' | '.join(heads)} |", "|" + "---|" * (len(heads) + 1)]
    for s in structures:
        cells = [_fmt(columns[label].get(s, {}).get(m)) for label in columns for m in metrics]
        lines.append(f"| {s} | {' | '.join(cells)} |")
    means = []
    for label in columns:
        for m in metrics:
            vals = [r.get(m) for r in columns[label].values()]
            vals = [v for v in vals if v is not None and not (isinstance(v, float) and math.isnan(v))]
            means.append(_fmt(sum(vals) / len(vals)) if vals else "-")
    lines.append(f"| mean | {' | '.join(means)} |")
    return "\n".join(lines)


DETECTRON_CONFIGS = {"Mask R-CNN R18-FPN": "configs/tiny/mask_rcnn_R_18_FPN_baseline_tiny.yaml",   # in detectron_heads/
                     "HMR-Net R18 (shape head + manifold + cross-stitch)": "hmrnet/configs/tiny/hmrnet_R_18_FPN_tiny.yaml"}


def _prepare_detectron(out: Path, data: Path, logs: Path) -> Path:
    """Spine slices -> COCO; the COCO folder."""
    t0 = _step("Detectron2: spine slices -> COCO (train_net.py: Mask R-CNN vs HMR-Net, tiny)")
    coco = out / "coco" / "spine_sag_mr"
    with output_to(logs / "convert_coco.log"):
        convert("volumes", data / "spine" / "spine_sag_mr", "--to", "coco", "--dataset-id", "502", "--name",
                "SpineSagDemo", "--out", coco)
    _done(t0)
    return coco


def _train_detectron(label: str, rel: str, out: Path, coco: Path, logs: Path, iterations: int,
                     stop: threading.Event, run_env: dict[str, str], console=None) -> tuple[dict, dict]:
    """``train_net.py`` with one of :data:`DETECTRON_CONFIGS`; (its segm AP column, its budget row)."""
    from importlib import resources

    from organmtl.nnunet_trainers.budget import SEED_VARIABLE

    config, name = resources.files("organmtl.detectron_heads") / rel, Path(rel).name
    output_dir = out / "detectron2" / name.removesuffix(".yaml")
    t0 = time.time()
    print(f"\n=== [detectron: {label}] train_net.py --config-file {name} ({iterations} iterations)", flush=True,
          file=console)
    run_in_group([sys.executable, "-m", "organmtl.detectron_heads.train_net", "--config-file", str(config),
                  "ORGANMTL.DATASET_ROOT", str(coco), "ORGANMTL.DATASET_NAME", "spine_sag_demo",
                  "SOLVER.MAX_ITER", str(iterations), "SOLVER.STEPS", f"({int(iterations * 0.8)},)",
                  *(("SEED", run_env[SEED_VARIABLE]) if SEED_VARIABLE in run_env else ()),
                  "OUTPUT_DIR", str(output_dir)], env=run_env, log_file=logs / f"train_net_{name}.log", stop=stop)
    print(f"    [detectron: {label}] done ({time.time() - t0:.0f} s)", flush=True, file=console)
    results = json.loads((output_dir / "final_metrics.json").read_text())
    segm = results.get("segm") or {}   # COCOEvaluator reports no segm block when nothing was predicted
    return ({k[3:]: {"segm AP": v} for k, v in segm.items() if k.startswith("AP-")},
            {"part": "detectron", "method": label, "trainer": name, "budget": f"{iterations} iterations",
             "seconds": time.time() - t0})


def _detectron_section(columns: dict[str, dict], iterations: int) -> str:
    return ("## Spine sagittal MR slices (Detectron2): HMR-Net vs Mask R-CNN\n\n"
            f"COCO validation split, {iterations} iterations each; COCO segm AP (0-100) per structure.\n\n"
            + _comparison_table(columns))
