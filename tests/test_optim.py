import io

import pytest
import torch

from picogpt_lightning.model import GPT, GPTConfig
from picogpt_lightning.optim import MuonAdamW, OptimizerSettings, lr_at, orthogonalize, param_groups

CLASSIC = dict()
MODERN = dict(position="rotary", norm="rms", qk_norm=True, mlp="swiglu", zero_init=True, bias=False)


def tiny(tie_weights: bool = True, **options) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=30, block_size=8, n_layer=2, n_head=2, n_embd=16, tie_weights=tie_weights,
                         **options))


def groups_by_role(model: GPT, **settings) -> dict[str, list[str]]:
    roles = {}
    for group in param_groups(model.named_parameters(), OptimizerSettings(**{"optimizer": "muon", **settings})):
        role = "muon" if group["rule"] == "muon" else f"adamw decay {group['weight_decay'] > 0}"
        roles[role] = group["names"]
    return roles


def train(model: GPT, optimizer: torch.optim.Optimizer, schedule, steps: int, first_step: int = 0) -> None:
    for step in range(first_step, first_step + steps):
        generator = torch.Generator().manual_seed(step)  # batch k is a function of k, as in the data module
        idx = torch.randint(0, 30, (4, 9), generator=generator)
        _, loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()


def scheduled(optimizer: torch.optim.Optimizer, warmup_iters: int = 3, decay_iters: int = 20):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_at(step, 1.0, 0.1, warmup_iters, decay_iters, "cosine")
    )


@pytest.mark.parametrize("options", [CLASSIC, MODERN], ids=["classic", "modern"])
@pytest.mark.parametrize("tie_weights", [True, False], ids=["tied", "untied"])
def test_muon_owns_the_blocks_matrices_and_adamw_the_rest(options, tie_weights):
    model = tiny(tie_weights, **options)
    roles = groups_by_role(model)
    per_block = (["attn.qkv.weight", "attn.proj.weight"]
                 + (["mlp.gate.weight", "mlp.up.weight"] if options else ["mlp.fc.weight"]) + ["mlp.proj.weight"])
    assert sorted(roles["muon"]) == sorted(f"blocks.{i}.{name}" for i in range(2) for name in per_block)
    embeddings = ["wte.weight"] + ([] if options else ["wpe.weight"]) + ([] if tie_weights else ["lm_head.weight"])
    assert sorted(roles["adamw decay True"]) == sorted(embeddings)
    gains_and_biases = [name for name, param in model.named_parameters() if param.dim() == 1]
    assert roles["adamw decay False"] == gains_and_biases and gains_and_biases
    if options:
        assert "blocks.0.attn.q_norm.weight" in gains_and_biases


def test_adamw_choice_keeps_todays_decay_split():
    model = tiny(tie_weights=False)
    roles = groups_by_role(model, optimizer="adamw")
    assert "muon" not in roles
    assert sorted(roles["adamw decay True"]) == sorted(n for n, p in model.named_parameters() if p.dim() == 2)


def test_every_parameter_is_in_exactly_one_group():
    model = tiny(tie_weights=False, **MODERN)
    names = [name for group in param_groups(model.named_parameters(), OptimizerSettings()) for name in group["names"]]
    assert sorted(names) == sorted(name for name, _ in model.named_parameters())


def test_weight_decay_shrinks_matrices_and_embeddings_but_not_gains_or_biases():
    model = tiny(tie_weights=False)
    settings = OptimizerSettings(optimizer="muon", learning_rate=0.1, weight_decay=0.5, muon_lr=0.1, muon_weight_decay=0.2)
    optimizer = MuonAdamW(param_groups(model.named_parameters(), settings))
    before = {name: param.detach().clone() for name, param in model.named_parameters()}
    for param in model.parameters():  # a zero gradient leaves only the decay to move the weights
        param.grad = torch.zeros_like(param)
    optimizer.step()
    after = dict(model.named_parameters())
    assert torch.allclose(after["wte.weight"], before["wte.weight"] * (1 - 0.1 * 0.5))
    assert torch.allclose(after["blocks.0.mlp.fc.weight"], before["blocks.0.mlp.fc.weight"] * (1 - 0.1 * 0.2))
    assert torch.equal(after["blocks.0.ln_1.weight"], before["blocks.0.ln_1.weight"])
    assert torch.equal(after["blocks.0.attn.qkv.bias"], before["blocks.0.attn.qkv.bias"])


def test_one_lambda_lr_schedules_every_group_from_its_own_rate():
    model = tiny()
    optimizer = MuonAdamW(param_groups(model.named_parameters(), OptimizerSettings(optimizer="muon", learning_rate=1e-3, muon_lr=0.02)))
    schedule = scheduled(optimizer)
    train(model, optimizer, schedule, steps=7)
    factor = lr_at(7, 1.0, 0.1, 3, 20, "cosine")
    assert [group["lr"] for group in optimizer.param_groups] == pytest.approx([0.02 * factor, 1e-3 * factor, 1e-3 * factor])


def build(options: dict) -> tuple[GPT, MuonAdamW, torch.optim.lr_scheduler.LambdaLR]:
    model = tiny(tie_weights=False, **options)
    optimizer = MuonAdamW(param_groups(model.named_parameters(), OptimizerSettings(optimizer="muon", weight_decay=0.1, muon_weight_decay=0.1)))
    return model, optimizer, scheduled(optimizer)


@pytest.mark.parametrize("options", [CLASSIC, MODERN], ids=["classic", "modern"])
def test_resuming_from_the_state_dicts_continues_bit_for_bit(options):
    straight, optimizer, schedule = build(options)
    train(straight, optimizer, schedule, steps=10)

    first, optimizer, schedule = build(options)
    train(first, optimizer, schedule, steps=5)
    buffer = io.BytesIO()  # as a Lightning checkpoint holds them, and loads them with weights_only=True
    torch.save({"model": first.state_dict(), "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict()},
               buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed, optimizer, schedule = build(options)
    resumed.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    schedule.load_state_dict(saved["schedule"])
    assert {"momentum_buffer"} <= set(optimizer.state[resumed.blocks[0].attn.qkv.weight])
    train(resumed, optimizer, schedule, steps=5, first_step=5)

    for (name, expected), actual in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(expected, actual), name


def test_muon_without_hidden_matrices_is_refused_in_one_sentence():
    embedding_only = [("wte.weight", torch.nn.Parameter(torch.zeros(30, 16))),
                      ("ln_f.weight", torch.nn.Parameter(torch.ones(16)))]
    with pytest.raises(ValueError, match="optimizer 'muon' needs 2-D weight matrices inside the blocks.*adamw"):
        param_groups(embedding_only, OptimizerSettings(optimizer="muon"))
    assert param_groups(embedding_only, OptimizerSettings(optimizer="adamw"))


def test_muon_refuses_flattened_parameters_and_unknown_settings_are_refused():
    flat = dict(rule="muon", params=[torch.nn.Parameter(torch.zeros(64))], lr=0.02, momentum=0.95, nesterov=True,
                ns_steps=5, weight_decay=0.0)
    with pytest.raises(ValueError, match="2-D matrices.*FSDP"):
        MuonAdamW([flat])
    with pytest.raises(ValueError, match="optimizer 'lion' is unknown; choose adamw or muon"):
        OptimizerSettings(optimizer="lion")


@pytest.mark.parametrize("shape", [(3, 16, 64), (3, 96, 32)], ids=["wide", "tall"])
def test_newton_schulz_brings_every_singular_value_into_the_quintics_band(shape):
    torch.manual_seed(0)
    gradients = torch.randn(shape) * torch.logspace(-1, 0, shape[-1])  # columns of ten times different scale
    orthogonal = orthogonalize(gradients)
    assert orthogonal.shape == shape
    singular_values = torch.linalg.svdvals(orthogonal.float())
    # Exact orthogonalisation would give 1; five quintic steps leave every singular value that starts above 1%
    # of the Frobenius norm in [0.68, 1.14] (the band widens slightly with bf16 rounding).
    assert singular_values.min() > 0.6 and singular_values.max() < 1.25


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon arrived in torch 2.9")
def test_muon_update_follows_torchs_muon():
    torch.manual_seed(0)
    start = torch.randn(48, 16)
    ours, theirs = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    group = dict(rule="muon", params=[ours], lr=0.02, momentum=0.95, nesterov=True, ns_steps=5, weight_decay=0.1)
    optimizers = [MuonAdamW([group]), torch.optim.Muon([theirs], lr=0.02, momentum=0.95, weight_decay=0.1)]
    for _ in range(3):
        gradient = torch.randn(48, 16)
        for param, optimizer in zip((ours, theirs), optimizers):
            param.grad = gradient.clone()
            optimizer.step()
    moved_ours, moved_theirs = ours.detach() - start, theirs.detach() - start
    assert (moved_ours - moved_theirs).norm() < 0.02 * moved_theirs.norm()  # bf16 rounding apart, the same


def test_adamw_groups_are_bit_for_bit_torchs_adamw():
    ours_model, theirs_model = tiny(tie_weights=False), tiny(tie_weights=False)
    groups = param_groups(ours_model.named_parameters(), OptimizerSettings(optimizer="adamw", learning_rate=1e-2))
    ours = MuonAdamW(groups)
    theirs = torch.optim.AdamW(
        [{"params": g["params"], "weight_decay": g["weight_decay"]}
         for g in param_groups(theirs_model.named_parameters(), OptimizerSettings(optimizer="adamw"))],
        lr=1e-2, betas=(0.9, 0.95), eps=1e-8, foreach=True,
    )
    train(ours_model, ours, scheduled(ours), steps=4)
    train(theirs_model, theirs, scheduled(theirs), steps=4)
    for expected, actual in zip(theirs_model.parameters(), ours_model.parameters()):
        assert torch.equal(expected, actual)


def test_training_with_muon_lowers_the_loss_and_step_accepts_a_closure():
    model = tiny(tie_weights=False, **MODERN)
    optimizer = MuonAdamW(param_groups(model.named_parameters(), OptimizerSettings(optimizer="muon", learning_rate=1e-2)))
    idx = torch.randint(0, 30, (8, 9), generator=torch.Generator().manual_seed(0))

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = model(idx[:, :-1], idx[:, 1:])[1]
        loss.backward()
        return loss

    first = optimizer.step(closure)
    for _ in range(30):
        last = optimizer.step(closure)
    assert last < first - 1.0

