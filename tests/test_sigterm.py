"""SIGTERM is honoured even when a training step never ends: Lightning's flag is read only between steps, so a
clock started by SIGTERM ends the process with one line after the grace time (shortened here to 2 s)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from helpers import make_config, make_text

TESTS = Path(__file__).resolve().parent
SCRIPT = ("import sys; from picogpt_lightning import sigterm_clock; sigterm_clock.GRACE_S = 2; "
          "from picogpt_lightning.cli.main import main; sys.exit(main(sys.argv[1:]))")


def test_sigterm_ends_a_run_whose_step_never_ends(tmp_path):
    text = make_text(tmp_path / "t.txt", sentences=200)
    marker = tmp_path / "stuck"
    config = make_config(tmp_path, text, trainer={"max_steps": 50, "callbacks": [
        {"class_path": "stuck_step.StuckStep", "init_args": {"marker": str(marker)}}]})
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))}
    run = subprocess.Popen([sys.executable, "-c", SCRIPT, "fit", "--config", str(config), "--sample_tokens", "0"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists() and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert marker.exists(), "the run never reached its stuck step"
        run.send_signal(signal.SIGTERM)
        err = run.communicate(timeout=30)[1]  # without the clock: never
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 143
    assert "terminated: the current step did not end within 2 s of SIGTERM" in err and "Traceback" not in err


def test_sigterm_to_one_rank_before_the_first_step_stops_both_ranks_at_step_1_with_last_ckpt(tmp_path):
    """Lightning installs its SIGTERM handler before on_train_start; a signal in between used to reach its
    notifier, which broadcasts from inside the handler while the other rank is in the first step's all-reduce."""
    config = make_config(tmp_path, make_text(tmp_path / "t.txt"), trainer={
        "max_steps": 50, "strategy": "ddp", "devices": 2,
        "callbacks": [{"class_path": "record_batches.SigtermBeforeFirstStep"}]})
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))}
    with open(tmp_path / "out.log", "w+") as out:  # a file: an unread pipe could fill and block a rank
        # As a module, not -c: Lightning starts rank 1 with this command line.
        run = subprocess.Popen([sys.executable, "-m", "picogpt_lightning.cli", "fit", "--config", str(config),
                                "--sample_tokens", "0"], stdout=out, stderr=subprocess.STDOUT, text=True, env=env,
                               start_new_session=True)
        try:
            run.wait(timeout=120)  # about 10 s; the race it checks for hung forever
        finally:
            if run.poll() is None:
                os.killpg(run.pid, signal.SIGKILL)  # both ranks
                run.wait()
        out.seek(0)
        printed = out.read()
    assert "Interrupted at step 1; saved" in printed and "Traceback" not in printed, printed[-4000:]
    assert "terminated:" not in printed, printed[-4000:]  # stopped at the step boundary, not by the clock
