"""Settings of a run on several processes or machines that disagree with its launcher (torchrun, SLURM,
Lightning's own with NODE_RANK/MASTER_ADDR/MASTER_PORT) stop `picogpt fit` in one line with exit status 2,
before any data is prepared or any folder made. No process group is started here."""

from __future__ import annotations

import socket
import time

import pytest
import torch

from picogpt_lightning.cli import main
from picogpt_lightning.cli import launch_checks
from picogpt_lightning.cli.launch_checks import devices_per_node, master_answers
from picogpt_lightning.errors import SettingsError
from picogpt_lightning.launch import is_global_rank_zero, launcher, local_rank
from picogpt_lightning.same_data import difference, identity
from picogpt_lightning.sharding import check_sharding

from helpers import make_config, make_text

LAUNCHER_VARIABLES = ("TORCHELASTIC_RUN_ID", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "RANK", "LOCAL_RANK", "GROUP_RANK",
                      "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_NTASKS", "SLURM_NNODES",
                      "SLURM_NTASKS_PER_NODE", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NODEID", "SLURM_JOB_NAME")
TORCHRUN_2x1 = {"TORCHELASTIC_RUN_ID": "x", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1", "RANK": "0",
                "LOCAL_RANK": "0", "GROUP_RANK": "0"}
SLURM_2x1 = {"SLURM_NTASKS": "2", "SLURM_NNODES": "2", "SLURM_NTASKS_PER_NODE": "1", "SLURM_PROCID": "0",
             "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_JOB_NAME": "picogpt"}
OWN_NODE_1 = {"NODE_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29512"}


@pytest.fixture
def clean_env(monkeypatch):
    for name in LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.mark.parametrize("env, flags, expected", [
    ({}, ["--trainer.strategy", "dpp"], "trainer.strategy 'dpp' is not a strategy Lightning knows: did you mean ddp?"),
    ({}, ["--trainer.strategy", "DDPStrategy"], "a strategy class goes in with its path, e.g. --trainer.strategy "
                                                 "'{\"class_path\": \"lightning.pytorch.strategies.DDPStrategy\"}'"),
    (TORCHRUN_2x1, [], "torchrun started 2 node(s) x 1 process(es) (--nnodes 2 --nproc-per-node 1) but "
                       "trainer.num_nodes is 1"),
    (TORCHRUN_2x1, ["--trainer.num_nodes", "2", "--trainer.devices", "2"], "pass --trainer.num_nodes 2 "
                                                                             "--trainer.devices 1"),
    (SLURM_2x1, [], "SLURM gave this job 2 node(s) (--nodes) but trainer.num_nodes is 1"),
    (SLURM_2x1, ["--trainer.num_nodes", "2", "--trainer.devices", "2"], "SLURM starts 1 task(s) per node"),
    ({"NODE_RANK": "1"}, [], "NODE_RANK is 1 but trainer.num_nodes is 1"),
    ({"NODE_RANK": "1", "MASTER_ADDR": "127.0.0.1"}, ["--trainer.num_nodes", "2"],
     "trainer.num_nodes is 2 but MASTER_PORT is not set"),
    ({**OWN_NODE_1, "NODE_RANK": "2"}, ["--trainer.num_nodes", "2"], "NODE_RANK is 2 but trainer.num_nodes is 2"),
    ({**OWN_NODE_1, "MASTER_ADDR": "node0.invalid"}, ["--trainer.num_nodes", "2"],
     "MASTER_ADDR node0.invalid is not a host name or address this machine can resolve"),
], ids=["unknown strategy", "strategy class by name", "torchrun nodes", "torchrun devices", "slurm nodes", "slurm tasks per node",
        "node rank without nodes", "no master port", "node rank too large", "unresolvable master"])
def test_a_launch_that_disagrees_with_the_settings_is_one_line_exit_2_and_writes_nothing(
        tmp_path, clean_env, capsys, env, flags, expected):
    for name, value in env.items():
        clean_env.setenv(name, value)
    config = make_config(tmp_path, make_text(tmp_path / "t.txt"), trainer={"strategy": "ddp", "devices": 1})
    assert main(["fit", "--config", str(config), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("picogpt fit: error: ") and expected in err[0], err
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "prepared").exists()


def test_a_master_address_that_never_answers_is_refused_after_the_bounded_wait(monkeypatch):
    tries = []

    def no_answer(address, timeout):  # what a machine that drops the connection attempts looks like
        tries.append(timeout)
        time.sleep(timeout)
        raise TimeoutError("timed out")

    monkeypatch.setattr(socket, "create_connection", no_answer)
    monkeypatch.setattr(launch_checks, "CONNECT_TRY_S", 0.2)
    started = time.monotonic()
    with pytest.raises(SettingsError, match=r"^MASTER_ADDR 10\.1\.2\.3 port 29512 did not answer for 1 s \(timed out\): "
                                            r"check that it is node 0's address"):
        master_answers("10.1.2.3", 29512, wait_s=1.0)
    assert 1.0 <= time.monotonic() - started < 3 and len(tries) >= 2  # tried again until the wait was over


def test_a_master_that_listens_or_whose_machine_refuses_is_reachable():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert master_answers("127.0.0.1", port, wait_s=1.0) is True
    assert master_answers("127.0.0.1", port, wait_s=1.0) is False  # nothing listens yet: torch waits for node 0


def test_devices_per_node_counts_what_lightning_starts_on_each_node():
    assert [devices_per_node(value, "cpu") for value in (2, "2", [0, 1], "0,1", "auto", -1)] == [2, 2, 2, 2, 1, None]
    assert devices_per_node("auto", "auto") == (torch.cuda.device_count() if torch.cuda.is_available() else 1)


def test_the_rank_of_a_process_comes_from_the_launcher_lightning_detects():
    slurm_rank_1 = {**SLURM_2x1, "SLURM_PROCID": "1", "SLURM_LOCALID": "0"}
    assert launcher(slurm_rank_1) == "slurm" and not is_global_rank_zero(slurm_rank_1) and local_rank(slurm_rank_1) == 0
    assert launcher({**slurm_rank_1, "SLURM_JOB_NAME": "interactive"}) == "lightning"
    assert launcher({**SLURM_2x1, **TORCHRUN_2x1}) == "torchrun"  # torchrun inside a SLURM job: torchrun's ranks
    assert not is_global_rank_zero(OWN_NODE_1) and local_rank(OWN_NODE_1) == 0  # node 1 prepares its own disk's copy
    assert is_global_rank_zero({}) and is_global_rank_zero(SLURM_2x1)


def test_ranks_that_prepared_different_data_are_named_with_what_differs():
    def rank(tokenizer: str, host: str) -> dict:
        meta = {"source": {"sha256": "a" * 64}, "tokenizer_sha256": tokenizer, "vocab_size": 50, "train_tokens": 900,
                "val_tokens": 100, "checksums": {"train": "c"}, "settings": {}}
        return {"identity": identity(meta), "folder": f"/{host}/prepared/t-1", "host": host}

    assert difference([rank("t" * 64, "n0"), rank("t" * 64, "n1")]) is None
    message = difference([rank("t" * 64, "n0"), rank("t" * 64, "n1"), rank("u" * 64, "n2")])
    other_text = {**rank("t" * 64, "n1"), "identity": identity({"source": {"sha256": "b" * 64}})}
    assert "its text sha256 is bbbbbbbbbbbbbbbb..., rank 0's aaaaaaaaaaaaaaaa..." in difference([rank("t" * 64, "n0"),
                                                                                             other_text])
    assert message.startswith("rank 2 (n2: /n2/prepared/t-1) prepared other data than rank 0 (n0: /n0/prepared/t-1): "
                              "its tokenizer sha256 is uuuuuuuuuuuuuuuu..., rank 0's tttttttttttttttt...")


FSDP = ["--trainer.strategy", "fsdp", "--trainer.devices", "2"]
LIGHTNING_FSDP = '{"class_path": "lightning.pytorch.strategies.FSDPStrategy"}'
MODEL_PARALLEL = ('{"class_path": "lightning.pytorch.strategies.ModelParallelStrategy", "init_args": '
                  '{"data_parallel_size": 3}}')


@pytest.mark.parametrize("flags, expected", [
    ([*FSDP, "--trainer.precision", "16-mixed"], "trainer.precision 16-mixed does not work with the fsdp strategy "
                                                 "(FSDP2): pass --trainer.precision with one of 32-true, bf16-mixed, "
                                                 "bf16-true"),
    ([*FSDP, "--trainer.precision", "64-true"], "trainer.precision 64-true does not work with the fsdp strategy"),
    ([*FSDP, "--trainer.precision", "16-true"], "trainer.precision 16-true does not work with the fsdp strategy on "
                                                "CPU"),
    (["--trainer.strategy", LIGHTNING_FSDP, "--trainer.devices", "2"],
     "Lightning's FSDPStrategy needs a GPU (accelerator cuda): pass --trainer.strategy fsdp"),
    (["--trainer.strategy", MODEL_PARALLEL, "--trainer.devices", "2"],
     "data_parallel_size 3 x tensor_parallel_size auto is not the run's 2 rank(s)"),
    (["--trainer.strategy", MODEL_PARALLEL.replace('"data_parallel_size": 3', '"tensor_parallel_size": 2'),
      "--trainer.devices", "2"], "tensor_parallel_size 2: picogpt shards the model FSDP-style over every rank"),
], ids=["16-mixed", "64-true", "16-true on cpu", "lightning's fsdp on cpu", "split not the ranks",
        "tensor parallel"])
def test_fsdp_settings_it_cannot_shard_with_are_one_line_exit_2_and_write_nothing(tmp_path, clean_env, capsys,
                                                                                   flags, expected):
    config = make_config(tmp_path, make_text(tmp_path / "t.txt"))
    assert main(["fit", "--config", str(config), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("picogpt fit: error: ") and expected in err[0], err
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "prepared").exists()


def test_the_precisions_fsdp_trains_with_pass_the_check():
    for precision in ("32-true", "32", 32, None, "bf16-mixed", "bf16", "bf16-true"):
        check_sharding("fsdp", precision, "cpu", 2, 1)
    check_sharding("fsdp", "16-true", "cuda", 2, 1)  # float16 without loss scaling: on GPUs only
    check_sharding("ddp", "16-mixed", "cpu", 2, 1)  # other strategies: Lightning's to judge
