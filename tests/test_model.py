import io
import math

import pytest
import torch
import torch.nn.functional as F

import picogpt_lightning.model as model_module
from picogpt_lightning.model import (CLASSIC, GPT, GPTConfig, apply_rotary, causal_attention_cpu, dropout_disagreement,
                                     next_token_loss)


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


def test_label_smoothing_changes_the_loss_computed_from_the_logits():
    model = tiny()
    idx = torch.randint(0, 50, (2, 16))
    logits, plain = model(idx, idx)
    assert torch.equal(next_token_loss(logits, idx), plain)
    assert not torch.isclose(plain, next_token_loss(logits, idx, label_smoothing=0.1))


def test_dropout_disagreement_is_half_the_symmetric_kl_over_the_scored_positions():
    torch.manual_seed(0)
    first, second = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    targets = torch.randint(0, 7, (2, 5))
    assert dropout_disagreement(first, first, targets) == 0
    p, q = first.log_softmax(-1), second.log_softmax(-1)
    both = (F.kl_div(q, p, log_target=True, reduction="none") + F.kl_div(p, q, log_target=True, reduction="none"))
    assert torch.isclose(dropout_disagreement(first, second, targets), both.sum(-1).mean() / 2)
    targets[:, 3:] = -1  # prompt positions of a conversation: not scored, not compared
    assert torch.isclose(dropout_disagreement(first, second, targets), both[:, :3].sum(-1).mean() / 2)


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


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_cpu_attention_gives_the_values_and_gradients_of_scaled_dot_product_attention(kv_heads):
    torch.manual_seed(0)
    q = torch.randn(3, 4, 12, 8, requires_grad=True)
    k, v = (torch.randn(3, kv_heads, 12, 8, requires_grad=True) for _ in range(2))
    ours = causal_attention_cpu(q, k, v, dropout=0.0)
    theirs = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=kv_heads != 4)
    assert torch.allclose(ours, theirs, atol=1e-5)
    grads = [torch.autograd.grad(out.square().sum(), (q, k, v)) for out in (ours, theirs)]
    for mine, reference in zip(*grads):
        assert torch.allclose(mine, reference, atol=1e-4)


def test_cpu_attention_drops_attention_weights_only_when_asked():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 10, 8) for _ in range(3))
    plain = causal_attention_cpu(q, k, v, dropout=0.0)
    assert torch.equal(plain, causal_attention_cpu(q, k, v, dropout=0.0))
    assert not torch.allclose(plain, causal_attention_cpu(q, k, v, dropout=0.5))
    # The first position sees only itself: its output is its own value, or zero where its one weight was dropped.
    first = causal_attention_cpu(q, k, v, dropout=0.5)[..., 0, :]
    for head, value in zip(first.flatten(0, 1), v[..., 0, :].flatten(0, 1)):
        assert torch.allclose(head, 2 * value) or torch.equal(head, torch.zeros_like(head))


def test_a_bf16_forward_on_the_cpu_takes_the_explicit_attention_and_agrees_with_the_fused_kernels(monkeypatch):
    model = tiny(position="rotary", norm="rms", qk_norm=True, mlp="swiglu", bias=False).eval()
    idx = torch.randint(0, 50, (2, 16))
    calls = []
    explicit = model_module.causal_attention_cpu
    monkeypatch.setattr(model_module, "causal_attention_cpu", lambda *args: calls.append(1) or explicit(*args))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = model(idx)[0].float()
        assert len(calls) == 2  # one per block
        monkeypatch.setattr(model_module, "CPU_ATTENTION_STEPS", 8)  # 16 positions: the fused kernels
        fused = model(idx)[0].float()
    assert len(calls) == 2
    assert torch.allclose(ours, fused, atol=0.05)
    monkeypatch.setattr(model_module, "CPU_ATTENTION_STEPS", 192)
    model(idx)  # float32 never takes it
    assert len(calls) == 2


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


# ----------------------------------------------------------------------------------------------- architecture options

# Every combination of the options that change the network (24), each paired with one of the four
# (zero_init, tie_weights) settings so that each position x mlp pair meets all four of them.
INIT_AND_TYING = [(False, False), (True, True), (False, True), (True, False)]
OPTIONS = [
    dict(position=position, norm=norm, qk_norm=qk_norm, mlp=mlp)
    for position in ("learned", "rotary")
    for norm in ("layer", "rms")
    for qk_norm in (False, True)
    for mlp in ("gelu", "relu2", "swiglu")
]
OPTIONS = [dict(options, zero_init=zero_init, tie_weights=tie)
           for options, (zero_init, tie) in zip(OPTIONS, INIT_AND_TYING * len(OPTIONS))]
MODERN = dict(position="rotary", norm="rms", qk_norm=True, mlp="relu2", zero_init=True, tie_weights=False, bias=False)


def option_id(options: dict) -> str:
    return "-".join(f"{k}={v}" for k, v in options.items())


def as_if_trained(model: GPT) -> GPT:
    """Random weights everywhere (gains near 1, zero-initialised projections included), so that every path
    through the network, attention of a zero-init model too, shapes the logits the tests compare."""
    torch.manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(1 + 0.1 * torch.randn_like(param) if param.dim() == 1 else 0.3 * torch.randn_like(param))
    return model


@pytest.mark.parametrize("options", OPTIONS + [MODERN], ids=option_id)
def test_every_option_trains_from_a_loss_near_log_vocab(options):
    model = tiny(**options)
    idx, targets = torch.randint(0, 50, (2, 3, 16))
    logits, loss = model(idx, targets)
    assert logits.shape == (3, 16, 50)
    assert abs(loss.item() - math.log(50)) < 0.3
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("options", OPTIONS + [MODERN], ids=option_id)
def test_every_option_is_causal(options):
    model = as_if_trained(tiny(**options)).eval()
    idx = torch.randint(0, 50, (1, 16))
    changed = idx.clone()
    changed[0, 10] = (idx[0, 10] + 1) % 50
    before, after = model(idx)[0], model(changed)[0]
    assert torch.allclose(before[0, :10], after[0, :10], atol=1e-5)
    assert not torch.allclose(before[0, 11:], after[0, 11:])  # later positions see the change through attention


@pytest.mark.parametrize("options", OPTIONS + [MODERN], ids=option_id)
def test_every_option_gives_cached_logits_equal_to_full_forward(options):
    model = as_if_trained(tiny(block_size=32, **options)).eval()
    idx = torch.randint(0, 50, (2, 20))
    full = model(idx)[0]
    cache = model.new_cache(batch_size=2)
    pieces = [model(idx[:, :7], cache=cache)[0], model(idx[:, 7:12], cache=cache)[0]]
    pieces += [model(idx[:, t : t + 1], cache=cache)[0] for t in range(12, 20)]
    assert torch.allclose(torch.cat(pieces, dim=1), full, atol=1e-4)
    assert cache.length == 20


@pytest.mark.parametrize("options", OPTIONS + [MODERN], ids=option_id)
def test_every_option_round_trips_through_a_saved_state_dict(options):
    model = as_if_trained(tiny(**options)).eval()
    buffer = io.BytesIO()
    torch.save({"config": model.config.to_dict(), "state_dict": model.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    torch.manual_seed(5)
    loaded = GPT(GPTConfig.from_dict(saved["config"])).eval()
    loaded.load_state_dict(saved["state_dict"])
    idx = torch.randint(0, 50, (2, 16))
    assert loaded.config == model.config
    assert torch.equal(loaded(idx)[0], model(idx)[0])


@pytest.mark.parametrize("options", [CLASSIC, MODERN], ids=["classic", "modern"])
def test_last_only_gives_the_last_positions_logits(options):
    model = as_if_trained(tiny(**options)).eval()
    idx = torch.randint(0, 50, (2, 12))
    full = model(idx)[0]
    assert torch.allclose(model(idx, last_only=True)[0], full[:, -1:], atol=1e-5)
    cache = model.new_cache(batch_size=2)
    model(idx[:, :8], cache=cache, last_only=True)
    assert torch.allclose(model(idx[:, 8:], cache=cache, last_only=True)[0], full[:, -1:], atol=1e-5)
    with pytest.raises(ValueError, match="last_only"):
        model(idx, idx, last_only=True)


CLASSIC_KEYS = [
    "wte.weight", "wpe.weight",
    "blocks.0.ln_1.weight", "blocks.0.ln_1.bias", "blocks.0.attn.qkv.weight", "blocks.0.attn.qkv.bias",
    "blocks.0.attn.proj.weight", "blocks.0.attn.proj.bias", "blocks.0.ln_2.weight", "blocks.0.ln_2.bias",
    "blocks.0.mlp.fc.weight", "blocks.0.mlp.fc.bias", "blocks.0.mlp.proj.weight", "blocks.0.mlp.proj.bias",
    "ln_f.weight", "ln_f.bias", "lm_head.weight",
]


def test_an_old_config_dict_builds_the_classic_model_with_todays_parameter_names():
    old_format = dict(vocab_size=50, block_size=16, n_layer=1, n_head=2, n_embd=16, dropout=0.0, bias=True,
                      tie_weights=True)
    config = GPTConfig.from_dict(old_format)
    assert {name: getattr(config, name) for name in CLASSIC} == CLASSIC
    model = GPT(config)
    assert list(model.state_dict()) == CLASSIC_KEYS
    assert isinstance(model.blocks[0].ln_1, torch.nn.LayerNorm)


def test_modern_options_add_and_drop_parameters_without_renaming_the_rest():
    names = set(tiny(n_layer=1, position="rotary", norm="rms", qk_norm=True, mlp="swiglu").state_dict())
    assert "wpe.weight" not in names and not any("rotary" in name for name in names)  # tables are not saved
    assert {"blocks.0.attn.q_norm.weight", "blocks.0.attn.k_norm.weight"} <= names
    assert {"blocks.0.mlp.gate.weight", "blocks.0.mlp.up.weight", "blocks.0.mlp.proj.weight"} <= names
    assert "blocks.0.ln_1.bias" not in names  # RMSNorm has a gain only


def test_rotary_scores_depend_only_on_the_distance_between_positions():
    torch.manual_seed(0)
    model = tiny(position="rotary")
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)

    def score(query_position: int, key_position: int) -> torch.Tensor:
        rotated_q = apply_rotary(q, *model.rotary(query_position, 1))
        rotated_k = apply_rotary(k, *model.rotary(key_position, 1))
        return (rotated_q * rotated_k).sum()

    assert torch.allclose(score(5, 2), score(13, 10), atol=1e-5)
    assert not torch.allclose(score(5, 2), score(5, 4), atol=1e-3)


def test_rotary_qk_norm_swiglu_model_matches_qwen3_weight_for_weight():
    """The layout claims of the options (rotate-half RoPE, QK-norm before it, gate/up/down) hold only if a
    Qwen3 model with our weights gives our logits."""
    transformers = pytest.importorskip("transformers")
    model = as_if_trained(tiny(position="rotary", norm="rms", qk_norm=True, mlp="swiglu", bias=False,
                               tie_weights=False, n_embd=32, n_head=4)).eval()
    cfg, state = model.config, model.state_dict()
    hf_config = transformers.Qwen3Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, intermediate_size=cfg.mlp_hidden,
        num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_head,
        head_dim=cfg.head_size, max_position_embeddings=cfg.block_size, rms_norm_eps=1e-6,
        rope_theta=cfg.rope_theta, tie_word_embeddings=False, attention_bias=False,
    )
    qwen = transformers.Qwen3ForCausalLM(hf_config).eval()
    hf_state = {"model.embed_tokens.weight": state["wte.weight"], "model.norm.weight": state["ln_f.weight"],
                "lm_head.weight": state["lm_head.weight"]}
    ours_to_theirs = {"attn.proj": "self_attn.o_proj", "attn.q_norm": "self_attn.q_norm",
                      "attn.k_norm": "self_attn.k_norm", "mlp.gate": "mlp.gate_proj", "mlp.up": "mlp.up_proj",
                      "mlp.proj": "mlp.down_proj", "ln_1": "input_layernorm", "ln_2": "post_attention_layernorm"}
    for i in range(cfg.n_layer):
        for ours, theirs in ours_to_theirs.items():
            hf_state[f"model.layers.{i}.{theirs}.weight"] = state[f"blocks.{i}.{ours}.weight"]
        for part, weight in zip("qkv", state[f"blocks.{i}.attn.qkv.weight"].split(cfg.n_embd)):
            hf_state[f"model.layers.{i}.self_attn.{part}_proj.weight"] = weight
    qwen.load_state_dict(hf_state, strict=False)
    idx = torch.randint(0, 50, (2, 16))
    with torch.no_grad():
        assert torch.allclose(qwen(idx).logits, model(idx)[0], atol=1e-5)


def test_zero_init_starts_every_output_projection_at_zero():
    model = tiny(zero_init=True, mlp="swiglu")
    projections = [p for n, p in model.named_parameters() if n.endswith(("attn.proj.weight", "mlp.proj.weight"))]
    assert len(projections) == 4 and all(not p.any() for p in projections)
    assert model.blocks[0].attn.qkv.weight.std() > 0.01


def test_swiglu_hidden_width_keeps_the_mlp_cost_of_the_4x_mlp():
    assert GPTConfig(vocab_size=10, n_embd=128, n_head=4, mlp="swiglu").mlp_hidden == 352
    assert GPTConfig(vocab_size=10, n_embd=384, mlp="swiglu").mlp_hidden == 1024
    gelu, swiglu = (GPT(GPTConfig(vocab_size=10, n_layer=1, n_embd=384, mlp=mlp)) for mlp in ("gelu", "swiglu"))
    assert abs(swiglu.num_params() / gelu.num_params() - 1) < 0.02


def test_flops_count_every_matrix_and_no_position_table_with_rotary():
    rotary = tiny(position="rotary", mlp="swiglu")
    assert rotary.num_params(non_embedding=True) == rotary.num_params(non_embedding=False)
    matrices = sum(p.numel() for p in rotary.parameters())
    assert rotary.flops_per_token(16) == 6 * matrices + 12 * 2 * 16 * 16
    learned = tiny()
    assert learned.num_params(non_embedding=False) - learned.num_params() == 16 * 16


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(mlp="geglu"), "mlp 'geglu' is unknown; choose gelu, gelu_tanh, relu2 or swiglu"),
        (dict(norm="batch"), "norm 'batch' is unknown; choose layer or rms"),
        (dict(position="alibi"), "position 'alibi' is unknown; choose learned or rotary"),
        (dict(position="rotary", n_embd=30, n_head=2), "position 'rotary' needs an even head size.*n_embd=32"),
        (dict(position="rotary", rope_theta=0.0), "rope_theta"),
    ],
)
def test_impossible_options_are_refused_naming_the_setting_and_a_fix(settings, message):
    with pytest.raises(ValueError, match=message):
        GPTConfig(vocab_size=10, **settings)
