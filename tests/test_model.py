import math

import pytest
import torch

from picogpt_lightning.model import GPT, GPTConfig


def tiny(**overrides) -> GPT:
    settings = dict(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=16)
    settings.update(overrides)
    torch.manual_seed(0)
    return GPT(GPTConfig(**settings))


def test_sanity_check_from_the_readme_builds_a_default_model():
    model = GPT(GPTConfig(vocab_size=100))
    assert model.config.n_layer == 6 and model.num_params() > 10_000_000


def test_forward_shapes_and_untrained_loss_is_near_log_vocab():
    model = tiny()
    idx = torch.randint(0, 50, (3, 16))
    logits, loss = model(idx, idx)
    assert logits.shape == (3, 16, 50)
    assert abs(loss.item() - math.log(50)) < 0.3
    assert model(idx)[1] is None


def test_label_smoothing_changes_the_loss():
    model = tiny()
    idx = torch.randint(0, 50, (2, 16))
    plain = model(idx, idx)[1]
    smoothed = model(idx, idx, label_smoothing=0.1)[1]
    assert not torch.isclose(plain, smoothed)


def test_targets_of_minus_one_are_ignored():
    model = tiny()
    idx = torch.randint(0, 50, (1, 16))
    targets = idx.clone()
    targets[:, 8:] = -1
    _, masked = model(idx, targets)
    logits, _ = model(idx)
    expected = torch.nn.functional.cross_entropy(logits[0, :8], idx[0, :8])
    assert torch.isclose(masked, expected, atol=1e-6)


def test_tied_weights_share_storage_and_untied_do_not():
    tied = tiny(tie_weights=True)
    assert tied.lm_head.weight.data_ptr() == tied.wte.weight.data_ptr()
    untied = tiny(tie_weights=False)
    assert untied.lm_head.weight.data_ptr() != untied.wte.weight.data_ptr()
    assert untied.num_params() == tied.num_params() + 50 * 16


def test_residual_projections_get_the_scaled_init():
    model = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=8, n_head=2, n_embd=64))
    expected = 0.02 / math.sqrt(2 * 8)
    assert abs(model.blocks[0].attn.proj.weight.std().item() - expected) < expected * 0.2
    assert abs(model.blocks[0].attn.qkv.weight.std().item() - 0.02) < 0.004


def test_attention_is_causal():
    model = tiny().eval()
    idx = torch.randint(0, 50, (1, 16))
    changed = idx.clone()
    changed[0, 10] = (idx[0, 10] + 1) % 50
    before, after = model(idx)[0], model(changed)[0]
    assert torch.allclose(before[0, :10], after[0, :10], atol=1e-6)
    assert not torch.allclose(before[0, 10:], after[0, 10:])


def test_kv_cache_matches_full_forward_for_prefill_chunks_and_single_tokens():
    model = tiny(block_size=32).eval()
    idx = torch.randint(0, 50, (2, 20))
    full = model(idx)[0]
    cache = model.new_cache(batch_size=2)
    pieces = [model(idx[:, :7], cache=cache)[0], model(idx[:, 7:12], cache=cache)[0]]
    pieces += [model(idx[:, t : t + 1], cache=cache)[0] for t in range(12, 20)]
    assert torch.allclose(torch.cat(pieces, dim=1), full, atol=1e-5)
    assert cache.length == 20


def test_sequences_longer_than_block_size_are_refused():
    model = tiny()
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 17, dtype=torch.long))


@pytest.mark.parametrize("settings", [dict(n_embd=30, n_head=4), dict(n_layer=0), dict(dropout=1.5)])
def test_invalid_configs_are_rejected_with_a_reason(settings):
    with pytest.raises(ValueError):
        GPTConfig(vocab_size=10, **settings)


def test_config_round_trips_through_a_plain_dict():
    config = GPTConfig(vocab_size=10, n_layer=3, dropout=0.1)
    assert GPTConfig.from_dict({**config.to_dict(), "unknown": 1}) == config
