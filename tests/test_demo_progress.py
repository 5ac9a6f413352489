"""The demo's progress while a trainer runs (organmtl.workflows.demo): nnU-Net's per-epoch log
lines -> one line per epoch (epoch, loss, pseudo-Dice, time left from the budget), followed live
from the trainer's log file; and the summary's budget section."""
import io
import threading
import time

import numpy as np
import pytest

from organmtl.workflows.demo import EpochLog, budget_section, epoch_progress

#: the epoch lines of a real run, copied from its training_log_*.txt: tests/e2e/test_multitask_e2e.py's
#: MNI152 run, nnUNetv2_train 730 3d_tiny 0 -tr nnUNetTrainerOMTLTriplanar_Tiny, 1 epoch x 2 iterations
#: (the escaped line ends keep the space nnU-Net writes at the end of every line)
REAL_LOG = """\
2026-12-01 10:05:25.932940: \n\
2026-12-01 10:05:25.932987: Epoch 0 \n\
2026-12-01 10:05:25.933056: Current learning rate: 0.001 \n\
2026-12-01 10:05:26.844202: train_loss 1.5049 \n\
2026-12-01 10:05:26.844367: val_loss 1.3958 \n\
2026-12-01 10:05:26.844425: Pseudo dice [np.float32(0.0), np.float32(0.0), np.float32(0.1656)] \n\
2026-12-01 10:05:26.844488: Epoch time: 0.91 s \n\
2026-12-01 10:05:26.844529: Yayy! New best EMA pseudo Dice: 0.0551999993622303 \n\
2026-12-01 10:05:27.413967: Training done. \n\
"""


def test_epoch_line_of_a_real_nnunet_log():
    log = EpochLog(total_epochs=10)
    records = [r for line in REAL_LOG.splitlines() if (r := log.feed(line))]
    assert len(records) == 1
    (r,) = records
    assert r["epoch"] == 0 and r["train_loss"] == pytest.approx(1.5049) and r["val_loss"] == pytest.approx(1.3958)
    assert r["pseudo_dice"] == pytest.approx([0.0, 0.0, 0.1656]) and r["epoch_time_s"] == pytest.approx(0.91)
    assert log.seconds_left() == pytest.approx(9 * 0.91)                # 9 epochs of the budget left
    assert log.line(r) == "    epoch 1/10, loss 1.5049 (val 1.3958), pseudo-Dice 0.055, 0.9 s/epoch, ~8 s left"


def test_lines_written_by_nnunets_own_logger_and_plain_numbers(tmp_path):
    """What nnUNetTrainer.on_epoch_end passes to its print_to_log_file (numpy 1 prints plain floats)."""
    from types import SimpleNamespace

    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    fake = SimpleNamespace(local_rank=0, log_file=str(tmp_path / "training_log.txt"))
    for e in range(3):
        nnUNetTrainer.print_to_log_file(fake, "", also_print_to_console=False)
        nnUNetTrainer.print_to_log_file(fake, f"Epoch {e}", also_print_to_console=False)
        nnUNetTrainer.print_to_log_file(fake, "train_loss", np.round(np.float32(-0.1 * e), decimals=4),
                                        also_print_to_console=False)
        nnUNetTrainer.print_to_log_file(fake, "Pseudo dice", [np.round(np.float32(0.5), 4)], also_print_to_console=False)
        nnUNetTrainer.print_to_log_file(fake, f"Epoch time: {np.round(61.0, decimals=2)} s", also_print_to_console=False)
    log = EpochLog(total_epochs=5)
    records = [r for line in (tmp_path / "training_log.txt").read_text().splitlines() if (r := log.feed(line))]
    assert [r["train_loss"] for r in records] == pytest.approx([0.0, -0.1, -0.2])
    assert log.line(records[-1]).endswith("pseudo-Dice 0.500, 61.0 s/epoch, ~2 min 02 s left")
    assert log.seconds_left() == pytest.approx(2 * 61.0)
    plain = EpochLog(2)
    assert plain.feed("Epoch 0") is None and plain.feed("Pseudo dice [0.25, 0.75]") is None
    assert plain.feed("Epoch time: 3.0 s")["pseudo_dice"] == [0.25, 0.75]
    plain.feed("Epoch 1")
    plain.feed("Pseudo dice [np.float32(0.5), np.float32(nan)]")    # a class absent from validation
    last = plain.feed("Epoch time: 5.0 s")
    assert np.isnan(last["pseudo_dice"][1]) and plain.line(last).endswith("pseudo-Dice 0.500, 5.0 s/epoch, ~0 s left")
    assert plain.feed("Epoch time: 3.0 s") is None                  # no open epoch: nothing to report


def test_progress_follows_the_log_while_the_trainer_writes_it(tmp_path):
    """A writer thread appends the real log slowly, in pieces cut mid-line; the follower prints
    one line per finished epoch as it appears, nothing for what was in the file before."""
    log_file = tmp_path / "train.log"
    log_file.write_text("an earlier run\n2026-12-01 10:00:00.000000: Epoch 7 \n")
    stream = io.StringIO()
    seen_after_first = []

    def write():
        text = REAL_LOG
        cut = text.index("Epoch time: 0.91 s") + 8                 # stop inside the epoch's last line
        with open(log_file, "a") as f:
            f.write(text[:cut])
            f.flush()
            time.sleep(0.3)
            seen_after_first.append(stream.getvalue())
            f.write(text[cut:])
            f.flush()

    with epoch_progress(log_file, total_epochs=3, period=0.05, stream=stream) as progress:
        writer = threading.Thread(target=write)
        writer.start()
        writer.join()
    assert seen_after_first == [""]                                 # a half-written line is not an epoch
    lines = stream.getvalue().splitlines()
    assert lines == ["    epoch 1/3, loss 1.5049 (val 1.3958), pseudo-Dice 0.055, 0.9 s/epoch, ~2 s left"]
    assert [r["epoch"] for r in progress.epochs] == [0]                # "Epoch 7" of the earlier run: not read


def test_budget_section_names_every_budget_and_the_convergence_table():
    text = budget_section([{"part": "han", "method": "nnU-Net", "trainer": "nnUNetTrainerOMTLBaseline_Tiny",
                            "budget": "20 epochs x 125 iterations = 2500 iterations", "seconds": 298.4},
                           {"part": "detectron", "method": "Mask R-CNN", "trainer": "mask_rcnn.yaml",
                            "budget": "500 iterations", "seconds": 111.0}])
    assert text.startswith("## Budgets")
    assert "| han | nnU-Net | nnUNetTrainerOMTLBaseline_Tiny | 20 epochs x 125 iterations = 2500 iterations | 298 s |" in text
    assert "| detectron | Mask R-CNN | mask_rcnn.yaml | 500 iterations | 111 s |" in text
    assert "docs/benchmarks.md" in text and 'section "Convergence"' in text
    assert "benchmarks.md#convergence" in text                        # the repository's docs are here
    assert "seeded with 0" in budget_section([], seed=0) and "not seeded" in budget_section([], seed=None)
