"""Callbacks in isolation, where a real run cannot reach the case (a strategy that needs GPUs)."""

from types import SimpleNamespace

from lightning.pytorch.strategies import FSDPStrategy

from picogpt_lightning.callbacks import ValidationSample


class Untouchable:
    """A module stand-in that fails the test if the callback tries to run the model."""

    @property
    def model(self):
        raise AssertionError("sampled from a model whose weights are sharded over ranks")


def test_no_live_sample_when_the_strategy_shards_the_weights(capsys):
    trainer = SimpleNamespace(strategy=FSDPStrategy(), state=SimpleNamespace(fn="fit"), is_global_zero=True,
                              sanity_checking=False)
    callback = ValidationSample("Q:", max_new_tokens=5)
    callback.on_fit_start(trainer, Untouchable())
    callback.on_validation_end(trainer, Untouchable())
    assert "live samples are off under FSDPStrategy" in capsys.readouterr().err
