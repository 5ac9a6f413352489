"""The demo's per-trainer budgets (organmtl.workflows.demo.Budget): what each trainer is told
through the stock schedule variables, what the command line overrides, what summary.md says."""
import pytest

from organmtl.nnunet_trainers.focusnet.options import phase_schedule
from organmtl.workflows.demo import BASELINE, STUDIES, Budget, Study, demo_budgets


def test_environment_sets_the_stock_schedule_variables():
    env = Budget(20, 250, val_iterations=3).environment()
    assert env == {"ORGANMTL_EPOCHS": "20", "ORGANMTL_ITERS_PER_EPOCH": "250", "ORGANMTL_VAL_ITERS": "3"}


def test_focusnet_phases_set_the_total_and_the_trainers_own_schedule():
    b = Budget(0, 100, phases=(("snet", 12), ("sol", 2), ("ae", 2), ("sos", 2), ("joint", 2)))
    env = b.environment()
    assert b.total_epochs == 20 and env["ORGANMTL_EPOCHS"] == "20"
    assert env["ORGANMTL_FOCUSNET_PHASE_EPOCHS"] == "snet=12,sol=2,ae=2,sos=2,joint=2"
    # the trainer derives exactly this schedule from the setting (options.phase_schedule)
    explicit = dict(p.split("=") for p in env["ORGANMTL_FOCUSNET_PHASE_EPOCHS"].split(","))
    sched = phase_schedule(("snet", "sol", "ae", "sos", "joint"), 20, {k: int(v) for k, v in explicit.items()})
    assert sched == list(b.phases)
    assert b.describe() == ("20 epochs x 100 iterations = 2000 iterations (2 validation iterations / epoch); "
                            "phases snet 12, sol 2, ae 2, sos 2, joint 2 epochs")


def test_command_line_overrides_every_trainer_and_scales_the_phase_split():
    b = Budget(0, 100, phases=(("snet", 12), ("joint", 8)))
    assert b.scaled(epochs=10).phases == (("snet", 6), ("joint", 4))
    small = b.scaled(epochs=1, iterations=2)                       # every phase at least one epoch
    assert small.environment() == {"ORGANMTL_EPOCHS": "2", "ORGANMTL_ITERS_PER_EPOCH": "2", "ORGANMTL_VAL_ITERS": "2",
                                   "ORGANMTL_FOCUSNET_PHASE_EPOCHS": "snet=1,joint=1"}
    assert b.scaled(iterations=7).phases == b.phases and b.scaled(iterations=7).iterations == 7
    plan = demo_budgets(STUDIES, epochs=1, iterations=2)
    sizes = {(bb.total_epochs, bb.iterations) for per in plan.values() for bb in per.values() if not bb.phases}
    assert sizes == {(1, 2)}
    assert plan["han"]["FocusNetv2"].total_epochs == 5                # five phases, one epoch each


def test_every_study_trainer_has_a_budget_and_the_baseline_the_largest_of_its_study():
    plan = demo_budgets(STUDIES)
    for study in STUDIES:
        assert set(plan[study.key]) == set(study.trainers)
    han = next(s for s in STUDIES if s.key == "han")
    base = next(label for label, t in han.trainers.items() if t == BASELINE)
    # the measured HaN learning curve (docs/demo.md): the stock baseline needs thousands of iterations
    assert plan["han"][base].total_epochs * plan["han"][base].iterations >= 4000


def test_a_study_without_a_budget_for_a_trainer_is_refused():
    with pytest.raises(ValueError, match="budgets for"):
        Study("x", "X", 1, "X", (), (), {"a": BASELINE, "b": BASELINE}, {"a": Budget(1, 1)})


def test_a_stop_event_kills_a_running_command_and_its_group(tmp_path):
    """Trainers of a study train in worker threads: when one fails (or Ctrl-C reaches the main
    thread) the demo sets ``stop`` and the others' process groups are killed, not left running."""
    import subprocess
    import threading
    import time

    from organmtl.procs import CommandFailed, run_in_group

    pid_file = tmp_path / "child.pid"
    stop = threading.Event()
    threading.Timer(1.0, stop.set).start()
    t0 = time.time()
    with pytest.raises(CommandFailed, match="stopped"):
        # the shell starts a grandchild in the same group and waits for it
        run_in_group(["bash", "-c", f"sleep 60 & echo $! > {pid_file}; wait"], stop=stop)
    assert time.time() - t0 < 10
    grandchild = int(pid_file.read_text())
    time.sleep(0.2)
    state = subprocess.run(["ps", "-o", "stat=", "-p", str(grandchild)], capture_output=True, text=True).stdout.strip()
    assert state in ("", "Z"), f"sleep {grandchild} still running ({state})"
    run_in_group(["true"], stop=threading.Event())           # an unset event changes nothing


def test_progress_lines_of_trainers_running_at_once_carry_their_tag(tmp_path):
    import io
    import time

    from organmtl.workflows.demo import epoch_progress

    log, stream = tmp_path / "train.log", io.StringIO()
    with epoch_progress(log, 4, period=0.05, stream=stream, tag="han: nnU-Net"):
        log.write_text("Epoch 0\ntrain_loss 0.5\nEpoch time: 2.0 s\n")
        time.sleep(0.3)
    assert stream.getvalue() == "    [han: nnU-Net] epoch 1/4, loss 0.5000, 2.0 s/epoch, ~6 s left\n"


def test_the_failure_reported_is_the_trainer_that_failed_not_the_one_it_stopped():
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from organmtl.procs import CommandFailed, CommandStopped, run_in_group
    from organmtl.workflows.demo import _raise_first_failure

    stop = threading.Event()

    def failing():
        try:
            run_in_group(["bash", "-c", "sleep 0.5; exit 3"], stop=stop)
        finally:
            stop.set()

    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(run_in_group, ["sleep", "30"], stop=stop), pool.submit(failing)]
    assert isinstance(futures[0].exception(), CommandStopped)
    with pytest.raises(CommandFailed, match="exited with 3"):
        _raise_first_failure(futures)


def test_commands_side_by_side_share_the_cores_instead_of_each_taking_all():
    import os

    from organmtl.nnunet_trainers.budget import THREADS_VARIABLE
    from organmtl.workflows.demo import cpu_threads

    assert cpu_threads(1) == {}
    share = str(max(1, (os.cpu_count() or 1) // 2))
    assert cpu_threads(2) == {THREADS_VARIABLE: share, "OMP_NUM_THREADS": share, "MKL_NUM_THREADS": share,
                              "nnUNet_def_n_proc": share}
