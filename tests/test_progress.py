"""Training progress a user can watch in a log file: plain lines with img/s and ETA without a
terminal, the run's key choices at start, and honest throughput after ``--resume``."""

import re
import subprocess
import sys
from types import SimpleNamespace

import pytest

pytest.importorskip("torch")

from conftest import ROOT, tiny_config

from hiseg.progress import ProgressLog, format_duration
from hiseg.training import train

PROGRESS = re.compile(
    r"epoch (\d+)/(\d+) step (\d+)/(\d+) \(batch \d+/\d+\) loss (?:[\d.]+|\?) ([\d.]+) img/s "
    r"ETA epoch (\d+:\d\d:\d\d) run (\d+:\d\d:\d\d)"
)


def fake_trainer(**values):
    base = dict(
        global_step=0,
        is_global_zero=True,
        world_size=1,
        num_training_batches=10,
        estimated_stepping_batches=40,
        max_epochs=4,
        current_epoch=0,
        callback_metrics={},
    )
    return SimpleNamespace(**{**base, **values})


def test_a_line_every_n_steps_and_at_least_every_interval():
    now = [0.0]
    lines: list[str] = []
    log = ProgressLog(every_n_steps=5, interval_s=60, write=lines.append, clock=lambda: now[0])
    trainer = fake_trainer()
    log.on_train_start(trainer, None)
    batch = (list(range(8)),)
    for step in range(1, 5):  # fast steps, not due: silent
        now[0] += 1.0
        trainer.global_step = step
        log.on_train_batch_end(trainer, None, None, batch, step - 1)
    assert lines == []
    now[0] += 1.0
    trainer.global_step = 5
    log.on_train_batch_end(trainer, None, None, batch, 4)
    assert len(lines) == 1
    line = PROGRESS.search(lines[0])
    assert line, lines[0]
    assert float(line.group(5)) == pytest.approx(8.0)  # 5 batches of 8 images in 5 s
    assert line.group(6) == "0:00:05"  # 5 batches left in the epoch at 1 s each
    assert line.group(7) == "0:00:35"  # 35 steps left in the run
    # a slow step: a line after a minute even though step 6 is not a multiple of 5
    now[0] += 61.0
    trainer.global_step = 6
    log.on_train_batch_end(trainer, None, None, batch, 5)
    assert len(lines) == 2
    assert float(PROGRESS.search(lines[1]).group(5)) == pytest.approx(8 / 61, abs=0.05)


def test_durations_read_as_clock_times():
    assert format_duration(3723.4) == "1:02:03"
    assert format_duration(float("nan")) == "?" and format_duration(float("inf")) == "?"


@pytest.mark.slow
def test_train_without_a_terminal_logs_progress_with_eta(tiny_data, tmp_path):
    """`hiseg train ... > train.log`: the progress bar is off by itself, plain lines appear
    within the first steps, the start line names the run and the resolved config is saved."""
    overrides = [
        f"data.root={tiny_data}", f"out_dir={tmp_path}", "name=logged", "data.crop_size=96",
        "data.batch_size=4", "data.num_workers=0", "data.val_long_side=128",
        "trainer.max_epochs=2", "trainer.precision=32-true", "trainer.log_every_n_steps=1",
    ]  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "hiseg", "train", "configs/pascal-person-part.yaml", *overrides,
         "--no-track"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    log = done.stdout + done.stderr
    assert done.returncode == 0, log
    lines = [m for m in map(PROGRESS.search, log.splitlines()) if m]
    assert lines, log
    assert int(lines[0].group(3)) <= 2  # within the first steps
    assert all(float(m.group(5)) > 0 for m in lines)
    assert re.search(r"run .*logged: fpn on tf_efficientnet_lite0, crop 96, batch 4, 2 epochs", log)
    assert re.search(r"epoch 2/2 val: miou0 [\d.]+ miou1 [\d.]+ miou2 [\d.]+", log), log
    assert (tmp_path / "logged" / "config.yaml").is_file()


@pytest.mark.slow
def test_a_resumed_run_reports_its_own_throughput(tiny_data, tmp_path, capsys):
    """After --resume the first throughput line is measured from the resumed point: above 0."""
    settings = {"trainer.progress_bar": "auto", "trainer.log_every_n_steps": 1}
    train(tiny_config(tiny_data, tmp_path, **{**settings, "trainer.max_epochs": 1}), track=False)
    capsys.readouterr()
    more = {**settings, "trainer.max_epochs": 2}
    train(tiny_config(tiny_data, tmp_path, **more), resume=True, track=False)
    lines = [m for m in map(PROGRESS.search, capsys.readouterr().out.splitlines()) if m]
    assert lines and lines[0].group(1) == "2", lines
    assert float(lines[0].group(5)) > 0
