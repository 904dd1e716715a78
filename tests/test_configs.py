"""Every shipped config parses as written (keys and types), and points at the data its row in docs/training.md says."""

from pathlib import Path

import pytest
import yaml

from picogpt_lightning.cli import main

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))


def command_for(config: Path) -> str:
    """finetune for the configs that fine-tune a checkpoint on conversations (they name data.path), else fit."""
    return "finetune" if "path" in (yaml.safe_load(config.read_text()).get("data") or {}) else "fit"


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_config_parses_and_resolves(config, capsys):
    command = command_for(config)
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    resolved = yaml.safe_load(capsys.readouterr().out)
    data_path = resolved["data"]["path" if command == "finetune" else "text_path"]
    assert data_path.startswith("data/")
    assert resolved["trainer"]["gradient_clip_val"] > 0
    assert resolved["trainer"]["max_steps"] > 0
    if command == "finetune":
        assert resolved["model"]["init_from"].startswith("checkpoints/") and data_path.endswith(".jsonl")


def test_the_chat_config_fine_tunes_the_tiny_configs_model():
    chat = yaml.safe_load((CONFIGS[0].parent / "chat.yaml").read_text())
    assert chat["model"]["init_from"] == "checkpoints/tiny/best.ckpt"  # where `picogpt fit --config tiny.yaml` writes
    assert "block_size" not in chat["data"]  # the base model's context, whatever it is


def test_every_readme_config_exists():
    names = {c.name for c in CONFIGS}
    assert {"tiny.yaml", "small.yaml", "regularized.yaml", "char.yaml", "gpt2-124m.yaml", "chat.yaml",
            "shakespeare-char-cpu.yaml", "shakespeare-char-speedrun.yaml"} <= names
