"""Impossible sizes are refused in one line before any data is prepared or any tensor allocated: the estimate of
weights, gradients, optimizer state and one batch's activations against the machine's memory."""

from __future__ import annotations

import pytest

from picogpt_lightning import memory
from picogpt_lightning.cli import main
from picogpt_lightning.errors import SettingsError
from picogpt_lightning.memory import MemoryEstimate, check_fits, count_parameters, estimate
from picogpt_lightning.model import GPT, GPTConfig

from helpers import make_config, make_text


@pytest.mark.parametrize("architecture", [
    {}, {"tie_weights": False}, {"mlp": "relu2", "bias": False},
    {"mlp": "swiglu", "position": "rotary", "norm": "rms", "bias": False},
])
def test_the_parameter_count_is_the_models_within_one_percent(architecture):
    model = GPT(GPTConfig(vocab_size=100, block_size=32, n_layer=2, n_head=2, n_embd=48, **architecture))
    real = sum(parameter.numel() for parameter in model.parameters())
    given = {name: value for name, value in architecture.items() if name != "norm"}
    assert real <= count_parameters(100, 32, 2, 48, **given) <= 1.01 * real


def test_the_estimate_grows_with_the_model_and_the_batch():
    small = estimate(50257, 1024, 12, 768, batch_size=8)
    assert 124e6 <= small.parameters <= 125e6  # GPT-2 small
    assert small.training_bytes == small.parameters * 16  # fp32 weights, gradients, AdamW's two moments
    assert estimate(50257, 1024, 12, 768, batch_size=16).batch_bytes == 2 * small.batch_bytes
    assert estimate(50257, 1024, 12, 768, 8, optimizer="muon").training_bytes == small.parameters * 12


def test_a_run_that_does_not_fit_is_one_line_with_the_estimate_and_what_is_available():
    with pytest.raises(SettingsError, match=r"needs at least 2.0 GiB .* more than the GPU \(1.0 GiB\)"):
        check_fits(MemoryEstimate(10, 1 << 30, 1 << 30), 1 << 30, "the GPU")
    check_fits(MemoryEstimate(10, 1 << 29, 1 << 29), 1 << 30, "the GPU")
    check_fits(MemoryEstimate(10, 1 << 40, 0), None, "unknown")  # memory that cannot be read refuses nothing


@pytest.mark.parametrize("flags", [["--model.n_embd", "200000", "--model.n_head", "2"],
                                   ["--model.n_embd", "1000000", "--model.n_head", "2"],
                                   ["--data.batch_size", "1000000000"]])
def test_impossible_sizes_are_refused_before_data_is_prepared(tmp_path, capsys, flags):
    text = make_text(tmp_path / "text.txt", sentences=50)
    config = make_config(tmp_path, text)
    assert main(["fit", "--config", str(config), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "this run needs at least" in err and "available memory" in err
    assert not (tmp_path / "prepared").exists() and not (tmp_path / "checkpoints").exists()


def test_a_run_that_fits_is_not_refused(monkeypatch):
    monkeypatch.setattr(memory, "available_host_bytes", lambda: 16 << 30)  # GPT-2 small at batch 8 needs about 9.4
    memory.check_run_memory({"n_layer": 12, "n_embd": 768, "vocab_size": 50304}, {"block_size": 1024,
                            "batch_size": 8}, {"accelerator": "cpu"})
    with pytest.raises(SettingsError, match="2 processes"):
        memory.check_run_memory({"n_layer": 12, "n_embd": 768, "vocab_size": 50304}, {"block_size": 1024,
                                "batch_size": 8}, {"accelerator": "cpu", "devices": 2})
    with pytest.raises(SettingsError, match="this run needs at least"):  # R-Drop: each batch twice at once
        memory.check_run_memory({"n_layer": 12, "n_embd": 768, "vocab_size": 50304, "consistency": 1.0},
                                {"block_size": 1024, "batch_size": 8}, {"accelerator": "cpu"})


def test_on_a_gpu_the_gpus_memory_is_the_limit(monkeypatch):
    import types

    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: types.SimpleNamespace(total_memory=8 << 30))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index: "Test GPU")
    monkeypatch.setattr(memory, "available_host_bytes", lambda: 1 << 50)  # the host's memory is not the limit
    settings = ({"n_layer": 12, "n_embd": 768, "vocab_size": 50304}, {"block_size": 1024, "batch_size": 8})
    with pytest.raises(SettingsError, match=r"more than the GPU's Test GPU \(8.0 GiB\)"):
        memory.check_run_memory(*settings, {"accelerator": "gpu"})
    memory.check_run_memory(*settings, {"accelerator": "cpu"})
