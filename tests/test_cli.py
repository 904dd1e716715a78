"""End to end: `picogpt fit`, resume, additional steps, validate, warm start, prepare, as a user runs them."""

import csv
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from picogpt_lightning.cli import main
from picogpt_lightning.checkpoint import load_checkpoint
from picogpt_lightning.module import GPTLightningModule

from helpers import make_config, make_text


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    return root, make_text(root / "corpus.txt")


def step_of(path: Path) -> int:
    return torch.load(path, weights_only=True)["global_step"]


def val_losses(ckpt_dir: Path) -> dict[int, float]:
    """val_loss by optimizer step, from every metrics.csv of the run (Lightning's step column is 0-based)."""
    losses = {}
    for metrics in sorted(ckpt_dir.glob("lightning_logs/version_*/metrics.csv")):
        for row in csv.DictReader(metrics.open()):
            if row.get("val_loss"):
                losses[int(row["step"]) + 1] = float(row["val_loss"])
    return losses


@pytest.fixture(scope="module")
def trained(workspace):
    root, text = workspace
    config = make_config(root, text, name="e2e")
    assert main(["fit", "--config", str(config)]) == 0
    return root, text, config, root / "checkpoints" / "e2e"


def test_fit_writes_best_and_a_last_checkpoint_at_the_final_step(trained):
    _, _, _, run = trained
    assert step_of(run / "last.ckpt") == 25  # not 20, the last scheduled validation
    best = torch.load(run / "best.ckpt", weights_only=True)
    losses = val_losses(run)
    assert set(losses) == {10, 20, 25}  # every 10 steps, and once more at the end
    # best.ckpt is the step whose own validation gave the lowest loss
    assert best["global_step"] == min(losses, key=losses.get)
    assert best["picogpt"]["best_val_loss"] == pytest.approx(min(losses.values()), rel=1e-5)


def test_each_validation_writes_a_sample_to_the_log_folder(trained):
    _, _, _, run = trained
    samples = next(run.glob("lightning_logs/version_*/samples.txt")).read_text(encoding="utf-8")
    assert samples.count("--- step ") == 3 and "--- step 10 ---" in samples and "--- step 25 ---" in samples
    after_step_10 = samples.split("--- step 10 ---\n", 1)[1].split("--- step 20 ---", 1)[0]
    assert after_step_10.strip(), "the sample after step 10 is empty"


def test_training_lowers_the_val_loss_below_the_untrained_loss(trained):
    _, _, _, run = trained
    loaded = load_checkpoint(run / "last.ckpt")
    assert min(val_losses(run).values()) < math.log(loaded.tokenizer.vocab_size)


def test_checkpoint_opens_with_weights_only_and_holds_plain_facts(trained):
    _, text, _, run = trained
    checkpoint = torch.load(run / "best.ckpt", weights_only=True)
    meta = checkpoint["picogpt"]
    assert meta["model_config"]["n_embd"] == 16
    assert meta["data"]["mode"] == "char"
    assert '"kind"' in meta["tokenizer"]
    loaded = load_checkpoint(run / "best.ckpt")
    assert loaded.tokenizer.decode(loaded.tokenizer.encode("the mind")) == "the mind"


def test_resume_continues_the_step_count_then_additional_steps_add_to_it(trained, capsys):
    _, _, config, run = trained
    assert main(["fit", "--config", str(config), "--ckpt_path", "last", "--trainer.max_steps", "35"]) == 0
    assert step_of(run / "last.ckpt") == 35
    assert 30 in val_losses(run)  # validation continued on the same schedule
    assert main(["fit", "--config", str(config), "--ckpt_path", "last", "--additional_steps", "6"]) == 0
    assert step_of(run / "last.ckpt") == 41


def test_validate_prints_loss_and_perplexity(trained, capsys):
    _, _, config, run = trained
    assert main(["validate", "--config", str(config), "--ckpt_path", str(run / "best.ckpt")]) == 0
    line = [l for l in capsys.readouterr().out.splitlines() if l.startswith("val_loss")][-1]
    loss, ppl = float(line.split()[1]), float(line.split()[3])
    assert ppl == pytest.approx(math.exp(loss), rel=1e-3)


def test_refitting_the_same_run_does_not_abort_on_the_saved_config(workspace):
    root, text = workspace
    config = make_config(root, text, name="refit", trainer={"max_steps": 4, "val_check_interval": 2})
    assert main(["fit", "--config", str(config)]) == 0
    assert main(["fit", "--config", str(config), "--overwrite", "true"]) == 0


def test_resume_with_a_different_model_shape_fails_with_a_clear_message(trained, capsys):
    _, _, config, _ = trained
    assert main(["fit", "--config", str(config), "--ckpt_path", "last", "--model.n_embd", "32"]) == 1
    error = capsys.readouterr().err.strip()
    assert "n_embd 16 in checkpoint vs 32 now" in error and "Traceback" not in error
    assert len(error.splitlines()) == 1


def test_resume_last_without_a_run_says_there_is_nothing_to_resume(workspace, capsys):
    root, text = workspace
    config = make_config(root, text, name="never-run")
    assert main(["fit", "--config", str(config), "--ckpt_path", "last"]) == 1
    assert "no last.ckpt" in capsys.readouterr().err


def test_warm_start_strict_loads_and_strict_mismatch_fails_nonstrict_maps_tokens(trained, workspace, capsys):
    root, text = workspace
    _, _, _, run = trained
    source = str(run / "best.ckpt")
    same = make_config(root, text, name="warm", trainer={"max_steps": 2, "val_check_interval": 2})
    assert main(["fit", "--config", str(same), "--model.init_from", source]) == 0
    assert "warm start: loaded" in capsys.readouterr().out

    other_vocab = make_text(root / "other.txt", seed=1)
    other_vocab.write_text(other_vocab.read_text() + "Zebras quote Xenophon; jazz!\n")
    different = make_config(root, other_vocab, name="warm2", trainer={"max_steps": 2, "val_check_interval": 2})
    assert main(["fit", "--config", str(different), "--model.init_from", source]) == 1
    assert "init_strict false" in capsys.readouterr().err
    assert main(["fit", "--config", str(different), "--model.init_from", source,
                 "--model.init_strict", "false"]) == 0
    out = capsys.readouterr().out
    assert "mapped wte.weight" in out and "token by token" in out


def test_prepare_command_writes_bins_and_tokenizer(workspace, tmp_path):
    _, text = workspace
    out = tmp_path / "prepared"
    assert main(["prepare", "--text_path", str(text), "--out_dir", str(out), "--mode", "token",
                 "--vocab_size", "300"]) == 0
    for name in ("train.bin", "val.bin", "meta.json", "tokenizer.json"):
        assert (out / name).is_file()


def test_warm_start_runs_once_not_again_on_resume_or_reload(trained, workspace, capsys):
    root, text = workspace
    _, _, _, run = trained
    source = root / "warm-source.ckpt"
    source.write_bytes((run / "best.ckpt").read_bytes())
    config = make_config(root, text, name="warm-once", trainer={"max_steps": 4, "val_check_interval": 2},
                         model={"init_from": str(source)})
    assert main(["fit", "--config", str(config)]) == 0
    assert capsys.readouterr().out.count("warm start: loaded") == 1
    source.unlink()  # the warm-start file is gone: resuming and reloading must not need it
    assert main(["fit", "--config", str(config), "--ckpt_path", "last", "--additional_steps", "2"]) == 0
    assert "warm start" not in capsys.readouterr().out
    resumed = root / "checkpoints" / "warm-once" / "last.ckpt"
    assert step_of(resumed) == 6
    module = GPTLightningModule.load_from_checkpoint(resumed, weights_only=True)
    assert module.hparams.init_from == str(source)


# ---------------------------------------------------------------------------------------------------------------
# Nothing silently wrong (issue 14)


def files_of(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in run.rglob("*") if p.is_file()}


def test_validate_takes_the_checkpoints_own_settings_and_logs_nothing_into_the_run(trained, tmp_path, monkeypatch,
                                                                                    capsys):
    _, _, _, run = trained
    before = files_of(run)
    monkeypatch.chdir(tmp_path)  # no config, another folder: the checkpoint says which data and model
    assert main(["validate", "--ckpt_path", str(run / "best.ckpt")]) == 0
    out = capsys.readouterr().out
    loss = float([line for line in out.splitlines() if line.startswith("val_loss")][-1].split()[1])
    best = torch.load(run / "best.ckpt", weights_only=True)["picogpt"]["best_val_loss"]
    assert loss == pytest.approx(best, abs=1e-4)  # the same val set as the run's own validation
    assert "preparing" not in out  # the run's cached preparation, not a new tokenizer
    assert files_of(run) == before and not (tmp_path / "checkpoints").exists()  # no logs, no folder


def test_fast_dev_run_never_touches_the_runs_checkpoints_or_logs(trained, capsys):
    _, _, config, run = trained
    before = files_of(run)
    assert main(["fit", "--config", str(config), "--trainer.fast_dev_run", "true"]) == 0
    assert "fast_dev_run: 1 step(s) and a validation ran; nothing was saved" in capsys.readouterr().out
    assert files_of(run) == before


def test_a_run_that_ends_before_its_first_validation_still_validates_and_writes_best(workspace, capsys):
    root, text = workspace
    config = make_config(root, text, name="short", trainer={"max_steps": 5, "val_check_interval": 10})
    assert main(["fit", "--config", str(config)]) == 0
    run = root / "checkpoints" / "short"
    assert step_of(run / "best.ckpt") == 5 and set(val_losses(run)) == {5}
    assert f"at step 5 in {run / 'best.ckpt'}" in capsys.readouterr().out


def test_seed_everything_alone_changes_the_order_of_the_training_blocks(workspace, tmp_path):
    root, text = workspace
    record = {"class_path": "record_batches.RecordFirstBatch", "init_args": {"out_dir": str(tmp_path)}}
    first = []
    for seed in (1, 2):
        config = make_config(root, text, name=f"seed{seed}", trainer={"max_steps": 1, "callbacks": [record]})
        assert main(["fit", "--config", str(config), "--seed_everything", str(seed)]) == 0
        first.append(torch.load(tmp_path / "rank0.pt"))
        stored = torch.load(root / "checkpoints" / f"seed{seed}" / "last.ckpt", weights_only=True)
        assert stored["picogpt"]["config"]["data"]["seed"] == seed  # resolved, so a resume keeps it
    assert not torch.equal(first[0], first[1])


def test_a_typo_in_fit_is_refused_before_lightning_is_imported():
    script = ("import sys; from picogpt_lightning.cli import main; "
              "status = main(['fit', '--trainer.max_step', '60']); print(status, 'lightning' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.stdout.split() == ["2", "False"], result.stderr
    assert result.stderr.strip() == ("picogpt fit: error: unknown option --trainer.max_step; did you mean "
                                     "--trainer.max_steps? (see `picogpt fit --help`)")


@pytest.mark.parametrize("command", ["fit", "finetune", "validate"])
def test_the_early_option_check_knows_every_option_of_the_parser(command, capsys):
    from picogpt_lightning.cli.flags import lightning_options

    known, unchecked = lightning_options(command)
    assert not unchecked
    with pytest.raises(SystemExit):
        main([command, "--help"])
    listed = set(re.findall(r"^ {2,4}(--[\w.]+)", capsys.readouterr().out, flags=re.MULTILINE))
    # Nested keys of known options (--trainer.logger.init_args...) and the free sections are checked only
    # up to their first part.
    listed = {option for option in listed if option.count(".") <= 1 and not option.startswith(
        ("--optimizer", "--lr_scheduler"))}
    assert listed and listed - known == set()
