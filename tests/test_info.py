"""`picogpt info`: the facts `fit` stores, shown plainly; missing facts shown as unknown, never an error."""

import json

import pytest
import torch
from jsonargparse import auto_cli

from picogpt_lightning.checkpoint import load_checkpoint, save_checkpoint
from picogpt_lightning.cli import main
from picogpt_lightning.cli.info import info_command
from picogpt_lightning.errors import PicoGPTError
from picogpt_lightning.info import describe_checkpoint
from picogpt_lightning.model import GPT, GPTConfig
from picogpt_lightning.tokenizer import CharTokenizer

from helpers import make_config, make_text


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    root = tmp_path_factory.mktemp("info")
    config = make_config(root, make_text(root / "corpus.txt", sentences=200), name="info",
                         trainer={"max_steps": 4, "val_check_interval": 2})
    assert main(["fit", "--config", str(config)]) == 0
    return root / "checkpoints" / "info" / "best.ckpt"


def test_fit_checkpoint_shows_shape_size_tokenizer_data_steps_loss_and_versions(fitted, capsys):
    info_command(str(fitted))
    out = capsys.readouterr().out
    checkpoint = torch.load(fitted, weights_only=True)
    meta = checkpoint["picogpt"]
    assert "GPT, 1 layers, 2 heads, 16 wide, context 16 tokens" in out
    assert f"char, {load_checkpoint(fitted).tokenizer.vocab_size} tokens" in out
    assert "corpus.txt" in out and meta["data"]["source"]["sha256"] in out
    assert f"step {checkpoint['global_step']}, best val loss {meta['best_val_loss']:.4f}" in out
    assert f"torch {torch.__version__}" in out and "lightning 2." in out
    assert "n_embd: 16" in out  # the resolved config (stored, or the hyperparameters when it is not)
    assert "unknown" not in out


def test_json_parameter_count_equals_the_models_own(fitted, capsys):
    auto_cli(info_command, args=["--ckpt", str(fitted), "--json", "true"], as_positional=False)
    facts = json.loads(capsys.readouterr().out)
    model = load_checkpoint(fitted).model
    assert facts["parameters"] == model.num_params(non_embedding=False)
    assert facts["parameters_without_position_embeddings"] == model.num_params()
    assert facts["model_config"] == model.config.to_dict()
    assert facts["data"]["mode"] == "char" and facts["tokenizer"]["kind"] == "char"


def test_a_stored_config_is_shown_as_is(fitted, tmp_path, capsys):
    checkpoint = torch.load(fitted, weights_only=True)
    checkpoint["picogpt"]["config"] = {"trainer": {"max_steps": 4}, "model": {"n_layer": 1}, "sample_prompt": "Q:\nA:"}
    path = tmp_path / "with-config.ckpt"
    torch.save(checkpoint, path)
    facts = describe_checkpoint(path)
    assert facts["config_source"] == "stored" and facts["config"]["trainer"] == {"max_steps": 4}
    info_command(str(path))
    out = capsys.readouterr().out
    assert "\nconfig:\n  trainer:\n    max_steps: 4\n" in out
    assert '  sample_prompt: "Q:\\nA:"' in out  # one line, as typed in a YAML config


def test_save_checkpoint_files_show_absent_facts_as_unknown(tmp_path, capsys):
    tokenizer = CharTokenizer("ab\n")
    config = GPTConfig(vocab_size=3, block_size=8, n_layer=1, n_head=1, n_embd=8, tie_weights=False)
    save_checkpoint(tmp_path / "plain.ckpt", GPT(config), tokenizer)
    info_command(str(tmp_path / "plain.ckpt"))
    out = capsys.readouterr().out
    assert "data          unknown" in out and "versions      unknown" in out
    assert "best val loss unknown" in out and "untied embeddings" in out
    info_command(str(tmp_path / "plain.ckpt"), json=True)
    facts = json.loads(capsys.readouterr().out)
    assert facts["data"] is None and facts["best_val_loss"] is None and facts["versions"] is None
    assert facts["parameters"] == GPT(config).num_params(non_embedding=False)


def test_a_file_that_is_not_a_checkpoint_is_a_clear_error(tmp_path):
    (tmp_path / "notes.ckpt").write_text("not a checkpoint")
    with pytest.raises(PicoGPTError, match="not a readable checkpoint"):
        info_command(str(tmp_path / "notes.ckpt"))


def test_picogpt_info_command_line(fitted, tmp_path, capsys):
    assert main(["info", "--ckpt", str(fitted), "--json", "true"]) == 0
    assert json.loads(capsys.readouterr().out)["model_config"]["n_embd"] == 16
    assert main(["info", "--ckpt", str(tmp_path / "missing.ckpt")]) == 1
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_a_run_folder_stands_for_its_best_checkpoint_and_an_export_folder_is_read(fitted, tmp_path, capsys):
    run = fitted.parent
    assert main(["info", "--ckpt", str(run), "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["path"] == str(run / "best.ckpt")
    assert f"(using {run / 'best.ckpt'}, the run's best checkpoint)" in captured.err
    assert main(["sample", "--ckpt", str(run), "--max_new_tokens", "3"]) == 0
    capsys.readouterr()

    assert main(["export", "--ckpt", str(run), "--out_dir", str(tmp_path / "weights"), "--format", "safetensors"]) == 0
    assert main(["export", "--ckpt", str(run), "--out_dir", str(tmp_path / "hf")]) == 0
    capsys.readouterr()
    assert main(["info", "--ckpt", str(tmp_path / "weights"), "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["model_config"]["n_embd"] == 16 and facts["parameters"] == load_checkpoint(fitted).model.num_params(
        non_embedding=False)
    assert main(["info", "--ckpt", str(tmp_path / "hf"), "--json"]) == 0  # a Hugging Face folder, imported
    facts = json.loads(capsys.readouterr().out)
    assert facts["model_config"]["n_embd"] == 16 and facts["data"]["kind"] == "huggingface"
