import math

import pytest
import torch

from picogpt_lightning.errors import PicoGPTError
from picogpt_lightning.model import dropout_disagreement, next_token_loss
from picogpt_lightning.module import GPTLightningModule
from picogpt_lightning.resume import model_mismatch_message
from picogpt_lightning.optim import lr_at


def test_lr_warms_up_linearly_peaks_and_decays_to_min_lr():
    kwargs = dict(learning_rate=1e-3, min_lr=1e-4, warmup_iters=100, decay_iters=1000, schedule="cosine")
    assert lr_at(0, **kwargs) == pytest.approx(1e-3 / 101)
    assert lr_at(49, **kwargs) == pytest.approx(1e-3 * 50 / 101)
    assert lr_at(100, **kwargs) == pytest.approx(1e-3)
    assert lr_at(550, **kwargs) == pytest.approx((1e-3 + 1e-4) / 2)
    assert lr_at(1000, **kwargs) == pytest.approx(1e-4)
    assert lr_at(5000, **kwargs) == pytest.approx(1e-4)
    values = [lr_at(s, **kwargs) for s in range(100, 1001)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_constant_lr_after_warmup_and_a_straight_line_down_with_linear():
    assert lr_at(500, 1e-3, 1e-4, 10, 1000, "constant") == pytest.approx(1e-3)
    assert lr_at(9, 1e-3, 0.0, 10, 1010, "linear") == pytest.approx(1e-3 * 10 / 11)
    assert lr_at(10, 1e-3, 0.0, 10, 1010, "linear") == pytest.approx(1e-3)
    assert lr_at(510, 1e-3, 0.0, 10, 1010, "linear") == pytest.approx(5e-4)
    assert lr_at(1010, 1e-3, 0.0, 10, 1010, "linear") == lr_at(2000, 1e-3, 0.0, 10, 1010, "linear") == 0.0


def test_the_schedule_follows_lr_schedule_and_the_older_cosine_lr_switch():
    def rates(**overrides):
        module = tiny_module(learning_rate=1e-3, min_lr=0.0, warmup_iters=0, lr_decay_iters=100, **overrides)
        module._trainer = type("T", (), {"max_steps": 100})()
        scheduler = module.configure_optimizers()["lr_scheduler"]["scheduler"]
        return [scheduler.lr_lambdas[0](step) for step in (0, 50, 75)]

    assert rates() == pytest.approx([1.0, 0.5, 0.5 * (1 + math.cos(math.pi * 0.75))])
    assert rates(lr_schedule="linear") == pytest.approx([1.0, 0.5, 0.25])
    assert rates(cosine_lr=False) == rates(lr_schedule="constant") == [1.0, 1.0, 1.0]


def tiny_module(**overrides):
    settings = dict(vocab_size=40, block_size=8, n_layer=1, n_head=2, n_embd=8)
    settings.update(overrides)
    return GPTLightningModule(**settings)


def test_consistency_adds_the_disagreement_of_two_dropout_passes_of_the_batch():
    idx = torch.randint(0, 40, (3, 8))
    plain = tiny_module(dropout=0.3)
    paired = tiny_module(dropout=0.3, consistency=2.0)
    paired.model.load_state_dict(plain.model.state_dict())
    torch.manual_seed(1)
    loss = paired.training_step((idx, idx), 0)
    torch.manual_seed(1)  # the same two dropout masks, drawn again for the doubled batch
    logits, _ = plain.model(torch.cat([idx, idx]))
    expected = next_token_loss(logits, torch.cat([idx, idx])) + 2.0 * dropout_disagreement(*logits.chunk(2), idx)
    assert torch.isclose(loss, expected) and dropout_disagreement(*logits.chunk(2), idx) > 0
    loss.backward()
    assert all(p.grad is not None for p in paired.model.parameters() if p.requires_grad)
    with pytest.raises(PicoGPTError, match="without dropout they are the same"):
        tiny_module(consistency=1.0)


def test_auto_tie_ties_small_corpora_only():
    assert tiny_module(train_tokens=10_000).model.config.tie_weights
    assert not tiny_module(train_tokens=5_000_000).model.config.tie_weights
    assert tiny_module(train_tokens=5_000_000, tie_weights=True).model.config.tie_weights
    assert not tiny_module(train_tokens=10_000, tie_weights=False).model.config.tie_weights
    with pytest.raises(PicoGPTError, match="choose true, false or auto"):
        tiny_module(tie_weights="sometimes")


class FakeTrainer:
    max_steps = 100


def test_optimizer_decays_matrices_only():
    module = tiny_module()
    module._trainer = FakeTrainer()
    optimizer = module.configure_optimizers()["optimizer"]
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and all(p.dim() >= 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.dim() < 2 for p in no_decay["params"])
    counted = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
    assert counted == sum(p.numel() for p in module.parameters())


def test_decay_groups_survive_sharded_parameters():
    """FSDP (use_orig_params) shows configure_optimizers 1-D shards inside wrapper modules; the groups must
    still be the plain model's: matrices decayed, biases and norm gains not."""
    module = tiny_module()
    module._trainer = FakeTrainer()
    expected = [{id(p) for p in group["params"]} for group in module.configure_optimizers()["optimizer"].param_groups]

    class Wrapper(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self._fsdp_wrapped_module = inner

    module.model.blocks[0] = Wrapper(module.model.blocks[0])
    with torch.no_grad():
        for param in module.model.parameters():
            param.data = param.data.reshape(-1)
    groups = module.configure_optimizers()["optimizer"].param_groups
    assert [{id(p) for p in group["params"]} for group in groups] == expected
    assert len(expected[0]) > 0 and len(expected[1]) > 0


def test_invalid_shape_is_a_user_error():
    with pytest.raises(PicoGPTError, match="divisible"):
        tiny_module(n_embd=10, n_head=4)


def test_mismatch_message_names_shape_differences_and_ignores_dropout():
    saved = dict(vocab_size=40, block_size=8, n_layer=1, n_head=2, n_embd=8, bias=True, tie_weights=True, dropout=0.0)
    assert model_mismatch_message(saved, {**saved, "dropout": 0.2}) is None
    message = model_mismatch_message(saved, {**saved, "n_layer": 2})
    assert "n_layer 1 in checkpoint vs 2 now" in message


def test_muon_owns_the_blocks_matrices_and_adamw_the_rest():
    module = tiny_module(optimizer="muon", tie_weights=False)
    module._trainer = FakeTrainer()
    optimizer = module.configure_optimizers()["optimizer"]
    by_name = {group["name"]: group for group in optimizer.param_groups}
    assert set(by_name) == {"muon", "decay", "no_decay"}
    assert set(by_name["muon"]["names"]) == {name for name, p in module.model.named_parameters()
                                            if name.startswith("blocks.") and p.dim() == 2}
    assert set(by_name["decay"]["names"]) == {"wte.weight", "wpe.weight", "lm_head.weight"}
    assert by_name["muon"]["initial_lr"] == 0.02 and by_name["decay"]["initial_lr"] == module.hparams.learning_rate


def test_muon_refuses_flattened_shards_and_names_what_to_use():
    module = tiny_module(optimizer="muon")
    module._trainer = FakeTrainer()
    with torch.no_grad():
        for param in module.model.parameters():
            param.data = param.data.reshape(-1)  # what FSDP's flat parameters look like
    with pytest.raises(PicoGPTError, match="adamw.*ddp"):
        module.configure_optimizers()


def test_resuming_with_another_optimizer_is_refused_in_one_line():
    from picogpt_lightning.resume import optimizer_mismatch_message

    assert optimizer_mismatch_message({}, "adamw") is None  # checkpoints from before the choice
    message = optimizer_mismatch_message({"optimizer": "adamw"}, "muon")
    assert "--model.optimizer adamw" in message and "\n" not in message


def test_architecture_differences_are_named_old_checkpoints_count_as_classic():
    saved = dict(vocab_size=40, block_size=8, n_layer=1, n_head=2, n_embd=8, bias=True, tie_weights=True)
    assert model_mismatch_message(saved, {**saved, "position": "learned", "mlp": "gelu"}) is None
    message = model_mismatch_message(saved, {**saved, "position": "rotary"})
    assert "position learned in checkpoint vs rotary now" in message


def test_muon_under_fsdp_is_refused_before_training_naming_the_alternatives():
    from lightning.pytorch.strategies import FSDPStrategy

    module = tiny_module(optimizer="muon")
    module._trainer = type("Trainer", (), {"strategy": FSDPStrategy()})()
    with pytest.raises(PicoGPTError, match="FSDPStrategy.*--trainer.strategy ddp.*--model.optimizer adamw"):
        module.setup("fit")


def test_warm_start_with_another_vocabulary_of_the_same_size_maps_rows_by_token(tmp_path, capsys):
    """Same vocab size, other tokens (issue 14, item 4c): strict refuses; otherwise each token both tokenizers
    have keeps its trained row, the others keep their fresh initialisation, and the message says so."""
    from picogpt_lightning.checkpoint import save_checkpoint
    from picogpt_lightning.tokenizer import BPETokenizer, vocabulary

    theirs = BPETokenizer.train(["the mind knows the truth of the world " * 50], vocab_size=270)
    ours = BPETokenizer.train(["a friend asks why the law is good " * 50], vocab_size=270)
    assert theirs.vocab_size == ours.vocab_size and theirs.to_json() != ours.to_json()
    source = tiny_module(vocab_size=270, train_tokens=10_000)
    save_checkpoint(tmp_path / "source.ckpt", source.model, theirs)

    with pytest.raises(PicoGPTError, match="its tokenizer is not this data's .* --model.init_strict false"):
        tiny_module(vocab_size=270, train_tokens=10_000).warm_start(str(tmp_path / "source.ckpt"), True, ours)
    target = tiny_module(vocab_size=270, train_tokens=10_000)
    fresh = target.model.wte.weight.detach().clone()
    target.warm_start(str(tmp_path / "source.ckpt"), False, ours)
    message = capsys.readouterr().out
    assert "mapped wte.weight" in message and "token by token" in message and "under the same id" in message
    their_ids = {token: i for i, token in enumerate(vocabulary(theirs))}
    trained, shared, only_ours = source.model.wte.weight.detach(), 0, 0
    for our_id, token in enumerate(vocabulary(ours)):
        row = target.model.wte.weight[our_id].detach()
        if token in their_ids:
            assert torch.equal(row, trained[their_ids[token]]), token
            shared += 1
        else:
            assert torch.equal(row, fresh[our_id]), token
            only_ours += 1
    assert shared > 256 and only_ours > 0  # the bytes are shared; some merges are not
    assert torch.equal(target.model.blocks[0].attn.qkv.weight, source.model.blocks[0].attn.qkv.weight)
