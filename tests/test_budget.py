"""`--budget`: the plan from a measured step time, the corpus-sized recipe, resume, early stopping, bad input.

The probe is replaced by a fake throughput, so the planned steps are known exactly and the tests take no timing.
"""

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback

from picogpt_lightning import budget_keeper, recipe
from picogpt_lightning.budget import LIGHTNING_OVERHEAD, Throughput, parse_budget, plan_budget
from picogpt_lightning.cli import budget as budget_cli
from picogpt_lightning.cli import main
from picogpt_lightning.data import validation_starts
from picogpt_lightning.errors import SettingsError
from picogpt_lightning.optim import lr_at
from picogpt_lightning.recipe import choose, shape_at

from helpers import make_config, make_text

FAKE = Throughput(step_seconds=0.5, val_batch_seconds=0.25)


class StopAt(Callback):
    """Stops a run after step `step` exactly (not again when a resume starts past it)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            trainer.should_stop = True


@pytest.fixture
def fake_probe(monkeypatch):
    """The probe replaced by FAKE; the pace check during the run off, so the plan stays FAKE's."""
    calls = []
    monkeypatch.setattr(budget_keeper, "MIN_STEPS_TO_JUDGE", 10**9)

    def probe(*args, **kwargs):
        calls.append(args)
        return FAKE

    monkeypatch.setattr(budget_cli, "probe", probe)
    return calls


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    return make_text(tmp_path_factory.mktemp("budget") / "corpus.txt")


def run_config(run: Path) -> dict:
    return torch.load(run / "last.ckpt", weights_only=True)["picogpt"]["config"]


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("3m", 180), ("1h", 3600), ("1h30m", 5400), ("45", 45),
                                           ("2.5m", 150)])
def test_budgets_are_read_in_seconds_minutes_and_hours(text, seconds):
    assert parse_budget(text) == seconds


def test_the_plan_fills_the_budget_with_steps_and_validations_and_no_more():
    plan = plan_budget(100, FAKE, tokens_per_step=64, eval_iters=4, warmup_fraction=0.1)
    step, validation = FAKE.step_seconds * LIGHTNING_OVERHEAD, FAKE.val_batch_seconds * 4
    used = plan.max_steps * step + plan.validations * validation
    assert used <= 100 < used + step + validation
    assert plan.validations == 5  # a twentieth of the budget on validations of 1 s
    assert plan.warmup_iters == round(0.1 * plan.max_steps)
    assert plan.tokens == plan.max_steps * 64
    assert lr_at(plan.max_steps, 1.0, 0.1, plan.warmup_iters, plan.max_steps) == 0.1  # decayed at the last step


def test_a_budgeted_run_stops_at_the_planned_step_with_its_schedule_at_the_end(tmp_path, text, fake_probe, capsys):
    config = make_config(tmp_path, text, trainer={"max_steps": 1000})
    assert main(["fit", "--config", str(config), "--budget", "21s"]) == 0
    plan = plan_budget(21, FAKE, 4 * 16, 4, 5 / 1000)
    out = capsys.readouterr().out
    assert f"budget 21s: {plan.max_steps} steps" in out and "epochs of the training split" in out
    run = tmp_path / "checkpoints" / "run"
    last = torch.load(run / "last.ckpt", weights_only=True)
    assert last["global_step"] == plan.max_steps
    stored = last["picogpt"]["config"]
    assert stored["budget"] == "21s" and stored["trainer"]["max_steps"] == plan.max_steps
    hp = last["hyper_parameters"]
    assert last["lr_schedulers"][0]["_last_lr"][0] == pytest.approx(hp["min_lr"])  # adamw: every group at min_lr


def test_a_budget_plans_the_doubled_steps_of_r_drop(tmp_path, text, monkeypatch, capsys):
    monkeypatch.setattr(budget_keeper, "MIN_STEPS_TO_JUDGE", 10**9)
    monkeypatch.setattr(budget_cli, "probe", lambda *args, passes=1, **kwargs: Throughput(
        step_seconds=FAKE.step_seconds * passes, val_batch_seconds=FAKE.val_batch_seconds))
    config = make_config(tmp_path, text, trainer={"max_steps": 1000}, model={"dropout": 0.1, "consistency": 1.0})
    assert main(["fit", "--config", str(config), "--budget", "21s"]) == 0
    doubled = Throughput(step_seconds=2 * FAKE.step_seconds, val_batch_seconds=FAKE.val_batch_seconds)
    plan = plan_budget(21, doubled, 4 * 16, 4, 5 / 1000)
    assert plan.max_steps < plan_budget(21, FAKE, 4 * 16, 4, 5 / 1000).max_steps
    assert f"budget 21s: {plan.max_steps} steps" in capsys.readouterr().out
    last = torch.load(tmp_path / "checkpoints" / "run" / "last.ckpt", weights_only=True)
    assert last["global_step"] == plan.max_steps


def test_r_drop_on_a_sized_run_takes_the_recipes_dropout_and_refuses_none(tmp_path, text, fake_probe, capsys):
    common = ["fit", "--data.text_path", str(text), "--data.mode", "char", "--budget", "20s", "--model.consistency",
              "1", "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false", "--sample_tokens", "0",
              "--data.cache_dir", str(tmp_path / "prepared")]
    # Checked once the recipe has set the dropout (0.1 for a text it repeats), not against the default 0.
    assert main([*common, "--ckpt_dir", str(tmp_path / "run")]) == 0
    model = run_config(tmp_path / "run")["model"]
    assert model["consistency"] == 1.0 and model["dropout"] > 0
    capsys.readouterr()
    assert main([*common, "--model.dropout", "0", "--ckpt_dir", str(tmp_path / "none")]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1 and "without dropout they are the same" in errors[0]
    assert not (tmp_path / "none").exists()


def test_time_to_spare_on_a_small_text_goes_into_r_drop():
    def tokens_in(shape, seconds):  # a step that runs its batch twice costs twice as much
        return int(seconds / ((1e-7 * shape.params + 0.01) * shape.passes)) * shape.tokens_per_step

    spare = choose(250_000, "char", 0.1, 3600, tokens_in)  # ~100 passes at the doubled cost: capped at 24
    assert spare.shape.passes == 2 and spare.settings["model.consistency"] == recipe.CONSISTENCY
    assert spare.settings["model.dropout"] > 0 and "R-Drop consistency 1 (each batch twice)" in spare.line()
    assert spare.planned_tokens == recipe.MAX_EPOCHS * spare.train_tokens
    # ~20 passes of single steps, ~10 doubled: not enough passes to spend on a second one
    tight = choose(250_000, "char", 0.1, 357, tokens_in)
    assert tight.shape.passes == 1 and tight.settings["model.consistency"] == 0
    assert "R-Drop" not in tight.line()
    for size, mode in ((100_000_000, "char"), (750_000, "token")):  # a large text; tokens (not measured)
        assert choose(size, mode, 0.1, 3600, tokens_in).settings["model.consistency"] == 0


def test_a_run_faster_than_its_probe_moves_its_last_step_and_schedule_end_together(tmp_path, text, monkeypatch,
                                                                                  capsys):
    monkeypatch.setattr(budget_cli, "probe", lambda *args, **kwargs: FAKE)  # 0.5 s a step: far slower than here
    monkeypatch.setattr(budget_keeper, "MIN_STEPS_TO_JUDGE", 5)
    config = make_config(tmp_path, text, trainer={"max_steps": 1000})
    assert main(["fit", "--config", str(config), "--budget", "8s", "--trainer.val_check_interval", "5"]) == 0
    assert "so the plan moves from" in capsys.readouterr().out
    run = tmp_path / "checkpoints" / "run"
    last = torch.load(run / "last.ckpt", weights_only=True)
    planned = plan_budget(8, FAKE, 4 * 16, 4, 5 / 1000).max_steps
    assert last["global_step"] == last["picogpt"]["config"]["trainer"]["max_steps"] > planned
    assert last["lr_schedulers"][0]["_last_lr"][0] == pytest.approx(last["hyper_parameters"]["min_lr"])


def test_resuming_a_budgeted_run_continues_its_plan_without_a_new_probe(tmp_path, text, fake_probe, capsys,
                                                                         monkeypatch):
    config = make_config(tmp_path, text, trainer={"max_steps": 1000})
    stop = '--trainer.callbacks+={"class_path": "test_budget.StopAt", "init_args": {"step": 12}}'
    assert main(["fit", "--config", str(config), "--budget", "20s", stop]) == 0
    run = tmp_path / "checkpoints" / "run"
    planned = run_config(run)["trainer"]["max_steps"]
    assert torch.load(run / "last.ckpt", weights_only=True)["global_step"] == 12 < planned
    capsys.readouterr()

    def no_probe(*args, **kwargs):
        raise AssertionError("a resume probed again")

    monkeypatch.setattr(budget_cli, "probe", no_probe)
    assert main(["fit", "--ckpt_path", str(run / "last.ckpt")]) == 0
    assert f"continuing the plan stored with the run ({planned:,} steps)" in capsys.readouterr().out
    assert torch.load(run / "last.ckpt", weights_only=True)["global_step"] == planned


def test_a_budget_on_the_resume_of_a_run_without_one_is_refused(tmp_path, text, capsys):
    config = make_config(tmp_path, text, trainer={"max_steps": 5})
    assert main(["fit", "--config", str(config)]) == 0
    capsys.readouterr()
    run = tmp_path / "checkpoints" / "run"
    assert main(["fit", "--ckpt_path", str(run / "last.ckpt"), "--budget", "1m"]) == 2
    assert "this resume continues a run that had no budget" in capsys.readouterr().err


def test_the_sized_recipe_is_the_same_for_the_same_corpus_and_budget():
    def tokens_in(shape, seconds):
        return int(seconds / (1e-7 * shape.params + 0.01)) * shape.tokens_per_step

    first = choose(250_000, "char", 0.1, 3600, tokens_in)
    assert first == choose(250_000, "char", 0.1, 3600, tokens_in)
    bigger = choose(100_000_000, "char", 0.1, 3600, tokens_in)
    assert bigger.shape.params > first.shape.params  # more text holds a larger model at the same budget
    assert first.data_limited and first.dropout > bigger.dropout == 0  # the small text repeats: capped
    shorter = choose(100_000_000, "char", 0.1, 60, tokens_in)
    assert shorter.shape.params < bigger.shape.params  # less time, fewer steps: a smaller model


def test_a_sized_recipe_validates_on_the_whole_val_split_whatever_share_the_random_split_gave():
    # A random split sends whole 4 KB chunks to val, so its share is only about val_fraction (14.8% of a 250 KB
    # text in docs/benchmarks.md): a count of val batches sized from the estimate read a sample of that split.
    def tokens_in(shape, seconds):
        return int(seconds / (1e-7 * shape.params + 0.01)) * shape.tokens_per_step

    settings = choose(250_000, "char", 0.1, 1800, tokens_in).settings
    block, batch, batches = settings["data.block_size"], settings["data.batch_size"], settings["data.eval_iters"]
    for share in (0.05, 0.1, 0.15, 0.2):
        val_tokens = int(250_000 * share)
        starts = validation_starts(val_tokens, block, batch, batches, seed=0)
        assert np.array_equal(np.concatenate(starts), np.arange(0, val_tokens - block, block))
    # A split larger than MAX_VAL_BLOCKS blocks is sampled: that many blocks.
    large = validation_starts(10_000_000, block, batch, batches, seed=0)
    assert sum(map(len, large)) >= recipe.MAX_VAL_BLOCKS


def test_a_sized_run_writes_its_recipe_to_the_config_and_that_config_reproduces_it(tmp_path, text, fake_probe,
                                                                                     capsys):
    run = tmp_path / "sized"
    common = ["--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false", "--sample_tokens", "0",
              "--data.cache_dir", str(tmp_path / "prepared")]
    assert main(["fit", "--data.text_path", str(text), "--data.mode", "char", "--budget", "20s",
                 "--data.batch_size", "4", "--ckpt_dir", str(run), *common]) == 0
    out = capsys.readouterr().out
    assert any(line.startswith("recipe for ") for line in out.splitlines()) and "layers x" in out
    saved = next(run.glob("lightning_logs/version_*/config.yaml"))
    written = yaml.safe_load(saved.read_text())
    assert written["model"]["n_layer"] == 1 and written["model"]["n_embd"] == 64  # d=1 for 30 KB
    assert written["data"]["batch_size"] == 4 and written["data"]["block_size"] == 128  # a flag beats the recipe
    assert any(cb["class_path"].endswith("EarlyStopping") for cb in written["trainer"]["callbacks"])
    assert not any(cb["class_path"].endswith("EMA") for cb in written["trainer"]["callbacks"])  # chars: none
    assert written["trainer"]["gradient_clip_val"] == 1.0
    again = tmp_path / "again"
    assert main(["fit", "--config", str(saved), "--ckpt_dir", str(again), "--overwrite", "true"]) == 0
    first, second = run_config(run), run_config(again)
    for section in ("model", "data"):
        assert first[section] == second[section]
    assert first["trainer"]["max_steps"] == second["trainer"]["max_steps"]


def test_early_stopping_leaves_best_ckpt_and_ends_on_a_validation(tmp_path, text):
    config = make_config(tmp_path, text, trainer={"max_steps": 200, "val_check_interval": 5})
    stop = ('--trainer.callbacks+={"class_path": "lightning.pytorch.callbacks.EarlyStopping", '
            '"init_args": {"monitor": "val_loss", "patience": 1, "min_delta": 10.0}}')
    assert main(["fit", "--config", str(config), stop]) == 0
    run = tmp_path / "checkpoints" / "run"
    last = torch.load(run / "last.ckpt", weights_only=True)
    assert last["global_step"] == 10  # stopped at its second validation, which found no better loss by 10
    assert (run / "best.ckpt").is_file()
    metrics = next(run.glob("lightning_logs/version_*/metrics.csv")).read_text().splitlines()
    validated = [line for line in metrics[1:] if line.split(",")[metrics[0].split(",").index("val_loss")]]
    assert len(validated) == 2


def test_a_budget_with_max_steps_on_the_command_line_is_refused(tmp_path, text, fake_probe, capsys):
    config = make_config(tmp_path, text)
    assert main(["fit", "--config", str(config), "--budget", "1m", "--trainer.max_steps", "50"]) == 2
    assert "give one of --budget and --trainer.max_steps" in capsys.readouterr().err
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("budget", ["0s", "-1m", "abc", "2s"])
def test_a_bad_or_too_short_budget_is_one_line_and_exit_2(tmp_path, text, fake_probe, capsys, budget):
    config = make_config(tmp_path, text)
    assert main(["fit", "--config", str(config), "--budget", budget]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--budget" in err
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "prepared").exists()


def test_a_corpus_too_small_for_the_recipes_context_says_what_would_fit(tmp_path, fake_probe, capsys):
    small = tmp_path / "small.txt"
    small.write_text("To be or not to be, that is the question.\n" * 3)
    code = main(["fit", "--data.text_path", str(small), "--data.mode", "char", "--budget", "1m",
                 "--ckpt_dir", str(tmp_path / "run"), "--data.cache_dir", str(tmp_path / "prepared")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "give a text of at least 170 characters" in err
    assert not (tmp_path / "run").exists() and not (tmp_path / "prepared").exists()


def test_max_time_alone_says_the_schedule_will_not_decay(tmp_path, text, capsys):
    config = make_config(tmp_path, text, trainer={"max_steps": 5})
    assert main(["fit", "--config", str(config), "--trainer.max_time", "00:00:10:00"]) == 0
    assert "pass --budget" in capsys.readouterr().err


def test_the_recipe_refuses_nothing_for_a_text_that_holds_a_few_contexts():
    shape = choose(2_000, "char", 0.1, 60, lambda shape, seconds: 10**6).shape
    assert (shape.n_layer, shape.block_size, shape.batch_size) == (1, 32, 32)
    with pytest.raises(SettingsError, match="too small"):
        choose(100, "char", 0.1, 60, lambda shape, seconds: 10**6)


def test_dropout_grows_with_the_passes_over_the_text():
    from picogpt_lightning.recipe import dropout_for

    assert [dropout_for(epochs) for epochs in (0.5, 1, 1.5, 16, 17, 32)] == [0.0, 0.0, 0.1, 0.1, 0.2, 0.2]


def test_muon_weight_decay_goes_to_characters_seen_at_most_16_times_and_into_the_written_settings():
    from picogpt_lightning.recipe import muon_weight_decay_for

    assert [muon_weight_decay_for("char", epochs) for epochs in (0.5, 6, 16, 17, 32)] == [0.1, 0.1, 0.1, 0.0, 0.0]
    assert muon_weight_decay_for("token", 6) == 0.0
    tokens_in = lambda shape, seconds: 6 * 900_000  # noqa: E731 - six passes of a 1 MB text at any depth
    medium, small = choose(1_000_000, "char", 0.1, 60, tokens_in), choose(250_000, "char", 0.1, 60, tokens_in)
    assert medium.settings["model.muon_weight_decay"] == 0.1 and "Muon weight decay 0.1" in medium.line()
    assert small.settings["model.muon_weight_decay"] == 0.0 and "Muon weight decay" not in small.line()


@pytest.mark.parametrize("mixed_seconds, chosen", [(0.3, "bf16-mixed"), (0.45, None), (2.0, None)])
def test_a_sized_recipe_on_a_cpu_trains_in_bf16_only_where_the_probe_finds_it_faster(tmp_path, text, monkeypatch,
                                                                                   capsys, mixed_seconds, chosen):
    monkeypatch.setattr(budget_keeper, "MIN_STEPS_TO_JUDGE", 10**9)
    seen = []

    def probe(*args, autocast=None, **kwargs):
        seen.append(autocast)
        return FAKE if autocast is None else Throughput(mixed_seconds, FAKE.val_batch_seconds)

    monkeypatch.setattr(budget_cli, "probe", probe)
    run = tmp_path / "run"
    assert main(["fit", "--data.text_path", str(text), "--data.mode", "char", "--budget", "20s",
                 "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false", "--sample_tokens", "0",
                 "--ckpt_dir", str(run), "--data.cache_dir", str(tmp_path / "prepared")]) == 0
    assert torch.bfloat16 in seen  # measured both ways
    assert run_config(run)["trainer"].get("precision") == chosen
    recipe_line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("recipe for "))
    assert ("bf16-mixed (a step 1.7x as fast as float32" in recipe_line) == (chosen is not None)
    if chosen:  # every shape was then probed in it, and the plan follows the faster step
        assert seen[-1] is torch.bfloat16


def test_a_precision_on_the_command_line_is_kept_and_not_measured(tmp_path, text, fake_probe):
    run = tmp_path / "run"
    assert main(["fit", "--data.text_path", str(text), "--data.mode", "char", "--budget", "20s",
                 "--trainer.precision", "32-true", "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar",
                 "false", "--sample_tokens", "0", "--ckpt_dir", str(run),
                 "--data.cache_dir", str(tmp_path / "prepared")]) == 0
    assert run_config(run)["trainer"]["precision"] == "32-true"


def test_the_depth_rule_wants_half_a_trained_token_per_parameter():
    def tokens_in(shape, seconds):  # a step costs in proportion to the parameters
        return int(seconds / (4e-7 * shape.params + 0.05)) * shape.tokens_per_step

    recipe = choose(1_100_000, "char", 0.1, 3000, tokens_in)
    assert recipe.shape.n_layer == 5 and recipe.planned_tokens >= 0.5 * recipe.shape.params
    deeper = shape_at(6, 128, 32)
    assert deeper.params <= 16 * recipe.train_tokens  # the text would hold it, and the budget gives it 200+ steps
    assert 200 * deeper.tokens_per_step < tokens_in(deeper, 3000) < 0.5 * deeper.params  # but too few tokens


def test_a_sized_token_run_averages_its_weights_only_when_it_repeats_its_text():
    def tokens_in(shape, seconds):
        return int(seconds / (1e-7 * shape.params + 0.01)) * shape.tokens_per_step

    assert choose(250_000, "token", 0.1, 600, tokens_in).averaged  # ~10 passes: the average smooths them
    assert not choose(10_000_000, "token", 0.1, 600, tokens_in).averaged  # fresh text: it would lag
    assert not choose(250_000, "char", 0.1, 600, tokens_in).averaged  # characters: it cost, measured


def test_a_sized_token_run_clips_gradients_and_averages_its_weights(tmp_path, text, fake_probe, monkeypatch):
    monkeypatch.setattr(recipe, "TOKEN_EMA_MIN_EPOCHS", 0.0)
    run = tmp_path / "run"
    assert main(["fit", "--data.text_path", str(text), "--data.mode", "token", "--budget", "20s",
                 "--data.batch_size", "4", "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
                 "--sample_tokens", "0", "--ckpt_dir", str(run), "--data.cache_dir", str(tmp_path / "prepared")]) == 0
    written = yaml.safe_load(next(run.glob("lightning_logs/version_*/config.yaml")).read_text())
    assert written["trainer"]["gradient_clip_val"] == 1.0
    callbacks = [callback["class_path"] for callback in written["trainer"]["callbacks"]]
    assert callbacks[-2:] == ["picogpt_lightning.callbacks.EMA", "lightning.pytorch.callbacks.EarlyStopping"]
    assert "current_model_state" in torch.load(run / "last.ckpt", weights_only=True)  # the average was saved


def test_the_sized_recipes_probes_measure_the_model_it_trains(tmp_path, text, fake_probe):
    assert main(["fit", "--data.text_path", str(text), "--data.mode", "char", "--budget", "20s",
                 "--data.batch_size", "4", "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
                 "--sample_tokens", "0", "--ckpt_dir", str(tmp_path / "run"),
                 "--data.cache_dir", str(tmp_path / "prepared")]) == 0
    probed = [args[0].config for args in fake_probe]
    assert probed and all(config.mlp == "swiglu" and config.position == "rotary" for config in probed)


def test_flags_that_override_the_sized_recipe_are_named_beside_its_line(tmp_path, text, fake_probe, capsys):
    assert main(["fit", "--data.text_path", str(text), "--data.mode", "char", "--budget", "20s",
                 "--data.batch_size", "4", "--model.dropout", "0.35", "--trainer.accelerator", "cpu",
                 "--trainer.enable_progress_bar", "false", "--sample_tokens", "0", "--ckpt_dir", str(tmp_path / "run"),
                 "--data.cache_dir", str(tmp_path / "prepared")]) == 0
    lines = capsys.readouterr().out.splitlines()
    recipe_line = next(i for i, line in enumerate(lines) if line.startswith("recipe for "))
    assert "batch 32" in lines[recipe_line]  # the recipe's own choice, as it chose it
    override = lines[recipe_line + 1]
    assert override.startswith("flags override the recipe: ")
    assert "data.batch_size 4 (the recipe's 32)" in override and "model.dropout 0.35 (the recipe's " in override
    assert "model.n_layer" not in override  # not given: the recipe's stands
    written = run_config(tmp_path / "run")
    assert written["data"]["batch_size"] == 4 and written["model"]["dropout"] == 0.35
    # The validation batches were recounted for batch 4, so a validation still reads the same blocks.
    data = written["data"]
    assert data["eval_iters"] * data["batch_size"] >= recipe.MAX_VAL_BLOCKS
