"""Two nodes on one machine (127.0.0.1), each a `picogpt fit` process with its own NODE_RANK: only node 0
writes the run, a node with its own disk prepares its own copy of the data, a killed node ends the other in
one line, torchrun resumes the run from last.ckpt, and the weights are those of one process with two devices
trained as long. One test, to keep to three two-process runs; as subprocesses (in-process DDP re-launches
pytest)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from helpers import make_config, make_text

NODE_FLAGS = ["--trainer.num_nodes", "2", "--trainer.devices", "1", "--sample_tokens", "0"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch(command: list[str], env: dict | None = None) -> subprocess.Popen:
    """Output goes to files, not pipes: a pipe nobody reads while the nodes train fills, blocks its rank, and the
    other rank then waits for it in a collective for ever."""
    out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
    process = subprocess.Popen(command, stdout=out, stderr=err, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    process.output_files = (out, err)
    return process


def start(*args, env: dict | None = None) -> subprocess.Popen:
    return launch([sys.executable, "-m", "picogpt_lightning.cli", *args], env)


def start_nodes(config: Path, *args, node_args: tuple = ((), ())) -> list[subprocess.Popen]:
    port = str(free_port())
    return [start("fit", "--config", str(config), *NODE_FLAGS, *args, *node_args[rank],
                  env={"NODE_RANK": str(rank), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port})
            for rank in (0, 1)]


def finish(process: subprocess.Popen, timeout: float = 180) -> tuple[int, str, str]:
    """Exit status (-9 when it had to be killed after `timeout`), stdout, stderr."""
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass  # killed below; the caller's assertion shows what it printed
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    texts = []
    for file in process.output_files:
        file.seek(0)
        texts.append(file.read())
        file.close()
    return process.returncode, *texts


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["state_dict"]


def torchrun_nodes(*args) -> list[subprocess.Popen]:
    port = str(free_port())
    return [launch([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                    "--node-rank", str(rank), "--master-addr", "127.0.0.1", "--master-port", port,
                    "-m", "picogpt_lightning.cli", "fit", *args, *NODE_FLAGS])
            for rank in (0, 1)]


def test_two_nodes_killed_and_resumed_with_torchrun_end_with_the_weights_of_two_devices(tmp_path):
    text = make_text(tmp_path / "t.txt")
    # The LR schedule is fixed in steps (not by max_steps), so the interrupted run and the reference share it.
    config = make_config(tmp_path, text, trainer={"max_steps": 100000, "val_check_interval": 2, "strategy": "ddp"},
                         model={"lr_decay_iters": 1000})
    run = tmp_path / "checkpoints" / "run"
    # Node 1 has a disk of its own: its data goes there, and it would put a run folder there if it wrote one.
    node_1_disk = tmp_path / "node-1-disk"
    nodes = start_nodes(config, node_args=((), ("--data.cache_dir", str(node_1_disk / "prepared"),
                                                "--ckpt_dir", str(node_1_disk / "run"))))
    try:
        deadline = time.monotonic() + 120
        while not (run / "last.ckpt").exists() and nodes[0].poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert nodes[0].poll() is None and nodes[1].poll() is None, "the two nodes did not start training"
        nodes[0].send_signal(signal.SIGKILL)  # node 0: the one every other node connects to
        started = time.monotonic()
        code, _, err = finish(nodes[1], timeout=90)
        waited = time.monotonic() - started
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    assert code == 1 and waited < 60, (code, waited, err[-2000:])
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "rank 0 of this distributed run stopped" in errors[0], err[-2000:]
    assert f"resume with: picogpt fit --config {config} --ckpt_path last" in errors[0]
    assert not (node_1_disk / "run").exists()  # only node 0 writes the run
    assert len(list((node_1_disk / "prepared").iterdir())) == 1  # node 1 prepared its own copy on its own disk

    # Resumed by torchrun, both nodes on one disk now: one of them prepares (with the checkpoint's tokenizer).
    step = torch.load(run / "last.ckpt", weights_only=True)["global_step"]
    agents = torchrun_nodes("--config", str(config), "--ckpt_path", "last", "--additional_steps", "2")
    # Node 1 first: when it fails, node 0's agent waits in torchrun's exit barrier (300 s) for it.
    resumed = [finish(agent, timeout=timeout) for agent, timeout in zip(agents[::-1], (180, 30))][::-1]
    assert [code for code, _, _ in resumed] == [0, 0], resumed[0][2][-2000:] + resumed[1][2][-2000:]
    assert f"resuming {run / 'last.ckpt'} (step {step})" in resumed[0][1]
    assert "best val_loss" in resumed[0][1] and "best val_loss" not in resumed[1][1]  # one summary, by node 0
    assert len(list((tmp_path / "prepared").iterdir())) == 2

    devices = start("fit", "--config", str(config), "--trainer.devices", "2", "--sample_tokens", "0",
                    "--trainer.max_steps", str(step + 2), "--ckpt_dir", str(tmp_path / "two-devices"))
    assert finish(devices)[0] == 0
    expected, trained = weights(tmp_path / "two-devices" / "last.ckpt"), weights(run / "last.ckpt")
    assert torch.load(run / "last.ckpt", weights_only=True)["global_step"] == step + 2
    assert expected.keys() == trained.keys()
    assert all(torch.equal(expected[name], trained[name]) for name in expected)
