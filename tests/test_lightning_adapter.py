"""Every private name of Lightning that lightning_adapter.py relies on still exists and still means what it did:
these fail loudly after a Lightning upgrade that changes one, instead of a run quietly doing something else."""

import inspect
import signal

import lightning.pytorch as L
import pytest
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging, WeightAveraging
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.model_summary import model_summary

from picogpt_lightning import lightning_adapter
from picogpt_lightning.lightning_adapter import (LightningCLIHooks, attached_trainer, average_model,
                                                 count_one_more_logged_step, replace_sigterm_notifier,
                                                 set_average_model, set_max_steps, stop_at_next_step, summary_table)
from picogpt_lightning.model import GPTConfig
from picogpt_lightning.module import GPTLightningModule


class Blocks(torch.utils.data.Dataset):
    def __len__(self):
        return 64

    def __getitem__(self, index):
        ids = torch.randint(0, 20, (9,), generator=torch.Generator().manual_seed(index))
        return ids[:-1], ids[1:]


def tiny_module():
    return GPTLightningModule(vocab_size=20, block_size=8, n_layer=1, n_head=2, n_embd=8, warmup_iters=0)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A module trained 3 steps with Lightning's EMA, and the checkpoint the Trainer writes afterwards."""
    folder = tmp_path_factory.mktemp("adapter")
    module, average = tiny_module(), EMAWeightAveraging(decay=0.9)
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[average],
                        default_root_dir=folder)
    trainer.fit(module, torch.utils.data.DataLoader(Blocks(), batch_size=4))
    trainer.save_checkpoint(folder / "a.ckpt")
    return module, average, trainer, torch.load(folder / "a.ckpt", weights_only=False)


def test_checkpoints_still_keep_the_logging_step_counter_where_the_adapter_adds_one(trained):
    *_, checkpoint = trained
    count_one_more_logged_step(checkpoint)
    state = checkpoint
    for key in lightning_adapter.LOGGED_STEPS_KEYS[:-1]:
        state = state[key]
    assert state[lightning_adapter.LOGGED_STEPS_KEYS[-1]] == 3 + 1
    with pytest.raises(lightning_adapter.LightningChanged):
        count_one_more_logged_step({"loops": {}})


def test_a_module_still_keeps_its_trainer_where_the_adapter_reads_it(trained):
    module, _, trainer, _ = trained
    assert attached_trainer(module) is trainer and attached_trainer(tiny_module()) is None


def test_weight_averaging_still_keeps_its_average_where_the_adapter_reads_it(trained):
    module, average, _, _ = trained
    assert isinstance(average, WeightAveraging)
    kept = average_model(average)
    assert isinstance(kept, torch.optim.swa_utils.AveragedModel) and kept.n_averaged.item() == 3
    assert average_model(EMAWeightAveraging()) is None
    fresh = EMAWeightAveraging()
    set_average_model(fresh, kept)  # what the EMA does under fsdp (callbacks.EMA._setup_sharded)
    assert average_model(fresh) is kept


def test_a_run_in_progress_still_stops_at_the_last_step_the_adapter_moves(tmp_path):
    class MoveTheEnd(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 2:
                set_max_steps(trainer, 5)

    trainer = L.Trainer(max_steps=20, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[MoveTheEnd()],
                        default_root_dir=tmp_path)
    trainer.fit(tiny_module(), torch.utils.data.DataLoader(Blocks(), batch_size=4))
    assert trainer.global_step == 5 and trainer.max_steps == 5


def test_the_summary_table_still_takes_the_arguments_model_summary_passes_it():
    parameters = list(inspect.signature(model_summary._format_summary_table).parameters)
    assert parameters[:5] == ["total_parameters", "trainable_parameters", "model_size", "total_training_modes",
                              "total_flops"]
    table = summary_table(10, 10, 0.0, {"train": 1, "eval": 0}, 0, (" ", ["0"]), ("Name", ["model"]))
    assert "model" in table and "Trainable params" in table


def test_lightning_cli_still_calls_the_steps_the_hooks_replace_in_that_order():
    source = inspect.getsource(LightningCLI.__init__)
    assert source.index("self.parse_arguments(") < source.index("self._parse_ckpt_path()")
    assert "self._add_subcommands(" in inspect.getsource(LightningCLI.setup_parser)
    assert "self._subcommand_parsers[subcommand] = " in inspect.getsource(LightningCLI._add_subcommands)
    assert list(inspect.signature(LightningCLI._parser).parameters) == ["self", "subcommand"]


def test_the_hooks_run_in_a_real_lightning_cli_between_parsing_and_building_the_classes():
    calls = []

    class Stop(Exception):
        pass

    class CLI(LightningCLIHooks, LightningCLI):
        @staticmethod
        def subcommands():
            return {"fit": LightningCLI.subcommands()["fit"]}

        def after_subcommands_added(self):
            calls.append("parsers")
            self.subcommand_parser("fit").description = "ours"

        def after_parse(self):
            calls.append(("parsed", self.config.fit.model.n_layer, self.subcommand_defaults("fit")["model.n_layer"]))

        def before_instantiate_classes(self):
            raise Stop

    with pytest.raises(Stop):
        CLI(GPTLightningModule, args=["fit", "--model.n_layer", "2"], parser_kwargs={"exit_on_error": False})
    assert calls == ["parsers", ("parsed", 2, GPTConfig.n_layer)]


def test_a_trainer_still_reads_the_stop_flag_the_adapter_sets():
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    assert not trainer.received_sigterm
    stop_at_next_step(trainer)
    assert trainer.received_sigterm


def test_lightnings_sigterm_handler_calls_the_notifier_the_adapter_puts_in_its_place():
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    calls = []
    replace_sigterm_notifier(trainer, lambda signum, frame: calls.append(signum))
    before = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # Lightning chains a handler it finds: call only this one
    trainer._signal_connector.register_signal_handlers()  # what Trainer._run does before the first step
    try:
        signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)
    finally:
        trainer._signal_connector.teardown()
        signal.signal(signal.SIGTERM, before)
    assert calls == [signal.SIGTERM] and not trainer.received_sigterm  # Lightning's own notifier did not run
