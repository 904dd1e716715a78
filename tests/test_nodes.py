"""Two nodes on one machine (127.0.0.1), each a `picogpt fit` process with its own NODE_RANK: they train
together like one process with two devices, only node 0 writes the run, a node with its own disk prepares its
own copy of the data, a killed node ends the other in one line, and torchrun resumes the run from last.ckpt.
Run as subprocesses (in-process DDP would re-launch pytest)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

from helpers import make_config, make_text

NODE_FLAGS = ["--trainer.num_nodes", "2", "--trainer.devices", "1", "--sample_tokens", "0"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start(*args, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "picogpt_lightning.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def start_nodes(config: Path, *args, node_args: tuple = ((), ())) -> list[subprocess.Popen]:
    port = str(free_port())
    return [start("fit", "--config", str(config), *NODE_FLAGS, *args, *node_args[rank],
                  env={"NODE_RANK": str(rank), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port})
            for rank in (0, 1)]


def finish(process: subprocess.Popen, timeout: float = 180) -> tuple[int, str, str]:
    try:
        out, err = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            process.kill()
    return process.returncode, out, err


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["state_dict"]


def test_two_nodes_train_like_two_devices_and_only_node_0_writes(tmp_path):
    text = make_text(tmp_path / "t.txt")
    config = make_config(tmp_path, text, trainer={"max_steps": 6, "val_check_interval": 3, "strategy": "ddp"})
    devices = start("fit", "--config", str(config), "--trainer.devices", "2", "--sample_tokens", "0",
                    "--ckpt_dir", str(tmp_path / "two-devices"))
    assert finish(devices)[0] == 0
    # Node 1 has a disk of its own: its data goes there, and it would put a run folder there if it wrote one.
    node_1_disk = tmp_path / "node-1-disk"
    nodes = start_nodes(config, "--ckpt_dir", str(tmp_path / "two-nodes"),
                        node_args=((), ("--data.cache_dir", str(node_1_disk / "prepared"),
                                        "--ckpt_dir", str(node_1_disk / "run"))))
    (code_0, out_0, err_0), (code_1, out_1, err_1) = [finish(node) for node in nodes]
    assert (code_0, code_1) == (0, 0), err_0[-2000:] + err_1[-2000:]

    expected, trained = weights(tmp_path / "two-devices" / "last.ckpt"), weights(tmp_path / "two-nodes" / "last.ckpt")
    assert torch.load(tmp_path / "two-nodes" / "last.ckpt", weights_only=True)["global_step"] == 6
    assert expected.keys() == trained.keys()
    assert all(torch.equal(expected[name], trained[name]) for name in expected)
    assert "best val_loss" in out_0 and "best val_loss" not in out_1  # one summary, by node 0
    assert not (node_1_disk / "run").exists()
    assert len(list((node_1_disk / "prepared").iterdir())) == 1  # its own copy, prepared on its own disk
    assert len(list((tmp_path / "prepared").iterdir())) == 1


def test_a_killed_node_ends_the_other_in_one_line_and_torchrun_resumes_the_run(tmp_path):
    text = make_text(tmp_path / "t.txt")
    config = make_config(tmp_path, text, trainer={"max_steps": 100000, "val_check_interval": 2, "strategy": "ddp"})
    run = tmp_path / "checkpoints" / "run"
    nodes = start_nodes(config)  # one disk for both: node 0 or node 1 prepares, the other waits for it
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
    assert len(list((tmp_path / "prepared").iterdir())) == 1

    step = torch.load(run / "last.ckpt", weights_only=True)["global_step"]
    port = str(free_port())
    agents = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1", "--node-rank",
         str(rank), "--master-addr", "127.0.0.1", "--master-port", port, "-m", "picogpt_lightning.cli", "fit",
         "--config", str(config), *NODE_FLAGS, "--ckpt_path", "last", "--additional_steps", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        for rank in (0, 1)]
    results = [finish(agent) for agent in agents]
    assert [code for code, _, _ in results] == [0, 0], results[0][2][-2000:] + results[1][2][-2000:]
    assert torch.load(run / "last.ckpt", weights_only=True)["global_step"] == step + 2
    assert f"resuming {run / 'last.ckpt'} (step {step})" in results[0][1]
