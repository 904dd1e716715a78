"""Benchmark logic that a benchmark run would not check itself: nanoGPT's own script, driven by
`benchmarks.speedrun` when a checkout is given (none is here), checked against a stand-in checkout, and how
the recipes benchmark compares runs whose walls differ."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # `benchmarks` is a folder of the repository, not of the installed package
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks import speedrun  # noqa: E402

# Stands in for nanoGPT: its prepare.py must find the text we put there, and its train.py must get the CPU
# recipe's flags; it prints its evaluations as nanoGPT's train.py does.
PREPARE = """from pathlib import Path
Path("prepared").write_text(str(len(Path("input.txt").read_text())))
"""
TRAIN = """import sys
from pathlib import Path
args = sys.argv[1:]
assert args[0] == "config/train_shakespeare_char.py" and "--device=cpu" in args and "--max_iters=2000" in args
assert Path("data/shakespeare_char/prepared").read_text() == "12"
print("step 0: train loss 4.1700, val loss 4.1702")
print("iter 0: loss 4.1650, time 30.00ms, mfu -100.00%")
print("step 2000: train loss 1.7600, val loss 1.8826")
if "--fail" in Path("config/train_shakespeare_char.py").read_text():
    sys.exit("out of memory")
"""


def fake_nanogpt(root: Path, fail: bool = False) -> Path:
    checkout = root / "nanoGPT"
    (checkout / "data" / "shakespeare_char").mkdir(parents=True)
    (checkout / "config").mkdir()
    (checkout / "data" / "shakespeare_char" / "prepare.py").write_text(PREPARE)
    (checkout / "train.py").write_text(TRAIN)
    (checkout / "config" / "train_shakespeare_char.py").write_text("# --fail\n" if fail else "# config\n")
    return checkout


def test_nanogpt_run_reads_its_last_val_loss_and_times_it(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("First Citize")
    result = speedrun.run_nanogpt(fake_nanogpt(tmp_path), threads=1, text=text)
    assert result["final"] == pytest.approx(1.8826)
    assert result["seconds"] > 0
    assert not (tmp_path / "nanoGPT" / "data" / "shakespeare_char" / "input.txt").exists()  # ran on a copy


def test_nanogpt_failure_stops_the_benchmark_with_its_error(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("First Citize")
    with pytest.raises(SystemExit, match="out of memory"):
        speedrun.run_nanogpt(fake_nanogpt(tmp_path, fail=True), threads=1, text=text)


def test_speedrun_reads_the_first_time_a_curve_reaches_the_target():
    curve = [{"seconds": 5.0, "val_loss": 2.4}, {"seconds": 9.0, "val_loss": 1.89}, {"seconds": 12.0, "val_loss": 1.85}]
    assert speedrun.first_reached(curve, 1.90) == 9.0
    assert speedrun.first_reached(curve, 1.80) is None
    assert speedrun.at_time(curve, 10.0) == 1.89
    assert speedrun.at_time(curve, 1.0) is None


def test_recipes_compares_at_the_shorter_runs_wall():
    from benchmarks.recipes import best_within

    curve = [{"seconds": 100.0, "val_loss": 4.6}, {"seconds": 300.0, "val_loss": 4.4},
             {"seconds": 900.0, "val_loss": 4.3}]
    assert best_within(curve, 637.0) == 4.4
    assert best_within(curve, 50.0) != best_within(curve, 50.0)  # nan: nothing validated yet


def test_recipes_stretches_the_schedule_and_with_a_fraction_the_warmup():
    from benchmarks.recipes import run_flags

    assert run_flags(279, 5, None) == ["--trainer.max_steps", "279", "--trainer.val_check_interval", "55"]
    assert run_flags(279, 5, 0.1)[-2:] == ["--model.warmup_iters", "28"]


def test_weight_average_benchmark_validates_the_trained_weights_of_an_averaging_run(tmp_path):
    """The benchmark's exact comparison rests on last.ckpt holding both sets of weights: the copy it validates
    must be the trained weights, with a checksum that loading accepts, and score as a run without the average."""
    from benchmarks.weight_average import trained_weights, validate
    from picogpt_lightning.checkpoint import read_checkpoint
    from picogpt_lightning.cli import main

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from helpers import make_config, make_text

    text = make_text(tmp_path / "t.txt")
    ema = [{"class_path": "picogpt_lightning.callbacks.EMA", "init_args": {"decay": 0.5}}]
    settings = dict(trainer={"max_steps": 6, "val_check_interval": 6}, model={"dropout": 0.0})
    plain = make_config(tmp_path, text, name="plain", **settings)
    averaged = make_config(tmp_path, text, name="ema", **{**settings, "trainer": {**settings["trainer"],
                                                                                 "callbacks": ema}})
    assert main(["fit", "--config", str(plain)]) == 0 and main(["fit", "--config", str(averaged)]) == 0
    runs = tmp_path / "checkpoints"
    copy = trained_weights(runs / "ema" / "last.ckpt", tmp_path / "trained.ckpt")
    trained, reference = read_checkpoint(copy), read_checkpoint(runs / "plain" / "last.ckpt")
    assert all(torch.equal(trained["state_dict"][k], v) for k, v in reference["state_dict"].items())
    assert not torch.equal(read_checkpoint(runs / "ema" / "last.ckpt")["state_dict"]["model.lm_head.weight"],
                           trained["state_dict"]["model.lm_head.weight"])
    assert validate(str(plain), [], copy, threads=1) == validate(str(plain), [], runs / "plain" / "last.ckpt", 1)


def test_weight_average_benchmark_compares_against_a_run_without_any_average(tmp_path, capsys):
    """Its baseline leaves out the config's own average too (tiny.yaml ships one), or it would compare two."""
    from benchmarks.weight_average import main

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from helpers import make_config, make_text

    ema = [{"class_path": "picogpt_lightning.callbacks.EMA", "init_args": {"decay": 0.9}}]
    config = make_config(tmp_path, make_text(tmp_path / "t.txt"), name="shipped",
                         trainer={"max_steps": 6, "val_check_interval": 6, "callbacks": ema})
    main(config=str(config), decay=0.5, threads=1)
    out = capsys.readouterr().out
    assert "trained weights equal a run without the average: yes" in out, out
    assert "EMA decay 0.5" in out and "over 1 run(s)" in out


def test_budget_benchmark_runs_the_shipped_config_as_shipped_beside_the_sized_recipe(tmp_path, monkeypatch, capsys):
    from benchmarks import budget

    calls = []

    def fake_run(name, args, work, threads):
        calls.append((name, args))
        curve = [{"seconds": 10.0, "step": 5, "val_loss": 2.0}, {"seconds": 20.0, "step": 10, "val_loss": 1.5}]
        return {"name": name, "seconds": 20.0, "load": 0.0, "plan": [], "curve": curve, "steps": 10, "best": 1.5,
                "last": 1.5}

    monkeypatch.setattr(budget, "run", fake_run)
    budget.main(["a.txt", "b.txt"], budget="27m", as_shipped=True, together=True, out=str(tmp_path / "out.jsonl"))
    runs = dict(calls)
    assert sorted(runs) == ["a-char-shipped-0", "a-char-sized-0", "b-char-shipped-0", "b-char-sized-0"]
    assert "--budget" not in runs["a-char-shipped-0"] and runs["a-char-sized-0"][-2:] == ["--budget", "27m"]
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 4


def test_val_split_scores_what_a_run_that_reads_its_whole_split_reports(tmp_path, capsys):
    from benchmarks import val_split
    from helpers import make_config, make_text
    from picogpt_lightning.cli import main

    config = make_config(tmp_path, make_text(tmp_path / "t.txt", sentences=200), data={"eval_iters": 1000})
    assert main(["fit", "--config", str(config)]) == 0
    run = tmp_path / "checkpoints" / "run"
    states = torch.load(run / "best.ckpt", weights_only=True)["callbacks"]
    best = next(state["best_model_score"] for name, state in states.items() if "best_model_score" in state)
    prepared = next((tmp_path / "prepared").glob("*/meta.json")).parent
    capsys.readouterr()
    val_split.main(str(prepared), [str(run / "best.ckpt"), str(run / "last.ckpt")])
    out = capsys.readouterr().out
    assert f"best.ckpt: {float(best):.4f} over" in out and "average of the 2: " in out
