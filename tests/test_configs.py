"""Every shipped config parses as written (keys and types), and points at the data its README row says."""

from pathlib import Path

import pytest
import yaml

from picogpt_lightning.cli import main

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_config_parses_and_resolves(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["data"]["text_path"].startswith("data/")
    assert resolved["trainer"]["gradient_clip_val"] > 0
    assert resolved["trainer"]["max_steps"] > 0


def test_every_readme_config_exists():
    names = {c.name for c in CONFIGS}
    assert {"tiny.yaml", "small.yaml", "regularized.yaml", "char.yaml", "gpt2-124m.yaml"} <= names
