"""The optimizer and the learning-rate schedule, in plain PyTorch.

`MuonAdamW` is one torch.optim.Optimizer whose param groups each name their update rule: Muon for the hidden
matrices of the transformer blocks, AdamW for embeddings, the output layer, biases and norm gains. One object,
because Lightning's automatic optimization (accumulation, clipping, precision plugins, the LR scheduler) takes
exactly one optimizer; its whole state is in `state_dict()`, so checkpoints resume it bit for bit.
`param_groups` decides which parameter goes where, by name, and `lr_at` is the schedule: warmup, then a
cosine, linear or constant.

Why our own batched Newton-Schulz instead of torch.optim.Muon: measured (`python -m benchmarks.optimizer_step`,
figures in docs/benchmarks.md), it costs about half of torch's at the width of the CPU recipes and a small share
of a training step at 384 wide either way. The matrices of one shape are stacked and orthogonalised together
with batched matmuls (one baddbmm chain per shape instead of one per matrix), on the smaller side of the matrix,
in bfloat16 where the hardware has it (fp32 Newton-Schulz was 2 to 3 times slower). It also keeps the package's
torch floor at 2.4 (torch.optim.Muon first shipped in 2.9) and keeps Muon and AdamW in one optimizer, which
Lightning's automatic optimization needs and torch's separate classes would not give.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable

import torch
from torch.optim.adamw import adamw as adamw_update

from .muon_distributed import orthogonalized

# The quintic of Keller Jordan's Muon: chosen to push small singular values up fast (steep slope at zero) rather
# than to converge. After 5 steps every singular value that started above 1% of the matrix's Frobenius norm lies
# in [0.68, 1.14] instead of at exactly 1, which trains as well as an exact orthogonalisation at a fraction of
# its cost.
NEWTON_SCHULZ_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NEWTON_SCHULZ_STEPS = 5


SCHEDULES = ("cosine", "linear", "constant")


def lr_at(step: int, learning_rate: float, min_lr: float, warmup_iters: int, decay_iters: int,
          schedule: str = "cosine") -> float:
    """Linear warmup to `learning_rate` over `warmup_iters` steps, then down to `min_lr` at `decay_iters` along
    a half cosine (`cosine`) or a straight line (`linear`), and `min_lr` after that; `constant` stays at
    `learning_rate` after warmup."""
    if step < warmup_iters:
        return learning_rate * (step + 1) / (warmup_iters + 1)
    if schedule == "constant":
        return learning_rate
    if step >= decay_iters:
        return min_lr
    progress = (step - warmup_iters) / max(1, decay_iters - warmup_iters)
    shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress
    return min_lr + shape * (learning_rate - min_lr)


OPTIMIZERS = ("adamw", "muon")


def require(value, ok, name: str, rule: str) -> None:
    """A ValueError naming the setting (as its flag spells it) unless `value` is a number that passes `ok`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(value):
        raise ValueError(f"{name} must be {rule}, got {value}")


def in_unit_interval(value: float) -> bool:
    return 0 <= value < 1


def non_negative(value: float) -> bool:
    return math.isfinite(value) and value >= 0


def positive(value: float) -> bool:
    return math.isfinite(value) and value > 0


@dataclass
class OptimizerSettings:
    """Which rule trains the hidden matrices, each rule's rates, and the training loss's regularisers: the
    training recipe's defaults, defined once (the LightningModule's --model.* flags take theirs from here).

    optimizer: "adamw" (AdamW everywhere, GPT-2's recipe) or "muon" (Muon for the 2-D weights inside the
        blocks, AdamW for the rest).
    learning_rate, beta1, beta2, eps, weight_decay: AdamW's; weight decay applies to matrices and embeddings only.
    muon_lr, muon_momentum, muon_weight_decay: Muon's (Nesterov momentum; decoupled decay, lr * wd per step).
    label_smoothing: of the training loss, a regulariser like weight decay (validation reports plain
        cross-entropy).
    consistency: R-Drop's weight (0: off): each training batch goes through the model twice, under two dropout
        masks, and the loss adds how far apart the two predictions are (`model.dropout_disagreement`) times
        this. A step then costs about twice as much; it needs dropout, or the two passes are the same.
    """

    optimizer: str = "adamw"
    learning_rate: float = 6e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    muon_lr: float = 0.02
    muon_momentum: float = 0.95
    muon_weight_decay: float = 0.0
    label_smoothing: float = 0.0
    consistency: float = 0.0

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer {self.optimizer!r} is unknown; choose adamw or muon")
        require(self.learning_rate, positive, "learning_rate", "a number > 0")
        require(self.weight_decay, non_negative, "weight_decay", "a number >= 0")
        for name in ("beta1", "beta2", "muon_momentum", "label_smoothing"):
            require(getattr(self, name), in_unit_interval, name, "in [0, 1)")
        require(self.eps, positive, "eps", "a number > 0")
        require(self.muon_lr, positive, "muon_lr", "a number > 0")
        require(self.muon_weight_decay, non_negative, "muon_weight_decay", "a number >= 0")
        require(self.consistency, non_negative, "consistency", "a number >= 0")

    @property
    def betas(self) -> tuple[float, float]:
        return self.beta1, self.beta2


@dataclass
class ScheduleSettings:
    """The learning rate over the steps (`lr_at`): linear warmup to the peak, then down to min_lr.

    lr_schedule: after warmup, decay to min_lr along a half cosine (cosine) or a straight line (linear), or keep
        the peak rate (constant).
    min_lr: AdamW's rate at the end of the decay; every group's rate (Muon's too) falls in the same proportion.
    warmup_iters: optimizer steps of linear warmup.
    lr_decay_iters: the step at which the decay reaches min_lr; None: the run's last step (trainer.max_steps).
    """

    lr_schedule: str = "cosine"
    min_lr: float = 6e-5
    warmup_iters: int = 100
    lr_decay_iters: int | None = None

    def __post_init__(self) -> None:
        if self.lr_schedule not in SCHEDULES:
            raise ValueError(f"lr_schedule {self.lr_schedule!r} is unknown; choose cosine, linear or constant")
        require(self.min_lr, non_negative, "min_lr", "a number >= 0")
        require(self.warmup_iters, lambda v: v >= 0, "warmup_iters", "a number of steps >= 0")
        if self.lr_decay_iters is not None:
            require(self.lr_decay_iters, lambda v: v >= 1, "lr_decay_iters",
                    "a positive number of steps (or null: trainer.max_steps)")

    def factor(self, step: int, learning_rate: float, max_steps: int) -> float:
        """Every group's rate at `step` as a share of its peak (what LambdaLR multiplies by)."""
        decay_iters = self.lr_decay_iters or max(1, max_steps)
        return lr_at(step, 1.0, self.min_lr / learning_rate, self.warmup_iters, decay_iters, self.lr_schedule)


def is_hidden_matrix(name: str, param: torch.Tensor) -> bool:
    """A 2-D weight inside a transformer block: attention and MLP matrices, the weights Muon is made for.
    Embeddings and the output layer are lookups and classifiers, not hidden linear maps, and stay with AdamW."""
    return name.startswith("blocks.") and param.dim() == 2


def param_groups(named_parameters: Iterable[tuple[str, torch.Tensor]], settings: OptimizerSettings) -> list[dict]:
    """Param groups for `MuonAdamW`, decided by name on the unwrapped model (names like
    `blocks.0.attn.qkv.weight`; wrappers that flatten parameters lose the shapes, not the names).

    Matrices and embeddings decay; biases and norm gains do not, since shrinking them toward zero only fights
    the normalisation. Each group carries its own lr and weight_decay, so one LambdaLR (which multiplies each
    group's initial lr) schedules both rules. Groups also list their parameters' `names`, for tests and logs.
    """
    named = [(name, param) for name, param in named_parameters if param.requires_grad]
    use_muon = settings.optimizer == "muon"
    hidden = [(n, p) for n, p in named if use_muon and is_hidden_matrix(n, p)]
    if use_muon and not hidden:
        raise ValueError("optimizer 'muon' needs 2-D weight matrices inside the blocks and this model has none; "
                         "use optimizer 'adamw'")
    hidden_names = {n for n, _ in hidden}
    decayed = [(n, p) for n, p in named if n not in hidden_names and p.dim() >= 2]
    not_decayed = [(n, p) for n, p in named if p.dim() < 2]
    adamw = dict(rule="adamw", betas=settings.betas, eps=settings.eps, lr=settings.learning_rate)
    groups = [
        dict(rule="muon", lr=settings.muon_lr, momentum=settings.muon_momentum, nesterov=True,
             ns_steps=NEWTON_SCHULZ_STEPS, weight_decay=settings.muon_weight_decay, members=hidden),
        dict(adamw, weight_decay=settings.weight_decay, members=decayed),
        dict(adamw, weight_decay=0.0, members=not_decayed),
    ]
    return [
        {**{k: v for k, v in group.items() if k != "members"},
         "params": [p for _, p in group["members"]], "names": [n for n, _ in group["members"]]}
        for group in groups if group["members"]
    ]


def newton_schulz_dtype(device: torch.device) -> torch.dtype:
    """bfloat16, as Muon is run everywhere (the iteration tolerates its precision), except on CPUs without
    native bf16 matmuls (AVX512-BF16), which emulate it slower than float32. `torch.cpu._is_avx512_bf16_supported`
    is private but present from torch 2.4 on; without it we assume no bf16 units."""
    if device.type != "cpu":
        return torch.bfloat16
    has_bf16_units = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
    return torch.bfloat16 if has_bf16_units else torch.float32


def orthogonalize(matrices: torch.Tensor, steps: int = NEWTON_SCHULZ_STEPS) -> torch.Tensor:
    """Approximately U V^T of each matrix U S V^T in the stack `matrices` (count, rows, cols), by the quintic
    Newton-Schulz iteration, batched over the stack.

    It works on the wide orientation (rows <= cols), where the Gram matrix X X^T is the smaller one, in the
    dtype of `newton_schulz_dtype`.
    """
    a, b, c = NEWTON_SCHULZ_COEFFICIENTS
    dtype = newton_schulz_dtype(matrices.device)
    tall = matrices.size(-2) > matrices.size(-1)
    x = matrices.to(dtype)
    if tall:
        x = x.mT
    # Dividing by the Frobenius norm puts every singular value in [0, 1], where the iteration converges.
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        gram = torch.bmm(x, x.mT)
        polynomial = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)  # b * G + c * G^2
        x = torch.baddbmm(x, polynomial, x, beta=a)  # a * X + (b * G + c * G^2) X
    return x.mT if tall else x


def muon_lr_scale(shape: torch.Size) -> float:
    """Keller Jordan's shape scaling, torch.optim.Muon's default: sqrt(max(1, rows / cols)). An orthogonal
    update has unit singular values whatever its shape, so its per-entry size shrinks as the matrix grows
    taller; the scale gives tall matrices (qkv, the MLP's up projection) the same per-entry step as square ones."""
    return math.sqrt(max(1.0, shape[0] / shape[1]))


class MuonAdamW(torch.optim.Optimizer):
    """Muon for groups with rule "muon", AdamW for groups with rule "adamw" (see `param_groups`).

    Muon: Nesterov momentum on the gradient, then the update is orthogonalised (`orthogonalize`) so that every
    direction of the matrix moves by the same amount, whatever the gradient's scale per direction; lr is scaled
    by `muon_lr_scale`, weight decay is decoupled (p *= 1 - lr * weight_decay). Same-shaped matrices are
    orthogonalised as one batch (stacked as they are: a tall stack is turned wide inside `orthogonalize`).
    AdamW: torch's own functional AdamW, fused when every parameter of the group is on CUDA, foreach otherwise,
    so it is bit for bit torch.optim.AdamW.
    """

    MUON_KEYS = ("lr", "momentum", "nesterov", "ns_steps", "weight_decay")
    ADAMW_KEYS = ("lr", "betas", "eps", "weight_decay")

    def __init__(self, groups: list[dict]):
        super().__init__(groups, defaults={})

    def add_param_group(self, param_group: dict) -> None:
        rule = param_group.get("rule")
        if rule not in ("muon", "adamw"):
            raise ValueError(f"param group rule {rule!r} is unknown; choose muon or adamw")
        missing = [k for k in (self.MUON_KEYS if rule == "muon" else self.ADAMW_KEYS) if k not in param_group]
        if missing:
            raise ValueError(f"a {rule} param group needs {', '.join(missing)}")
        params = list(param_group["params"])
        if rule == "muon" and any(p.dim() != 2 for p in params):
            raise ValueError("Muon updates whole 2-D matrices, but this group holds a parameter that is not one "
                             "(a strategy that flattens or shards parameters, such as FSDP?); use optimizer "
                             "'adamw' with it, or a strategy that keeps whole parameters, such as ddp")
        if rule == "adamw":
            # Stored in the group, as torch.optim.AdamW does, so load_state_dict puts `step` where fused wants it.
            param_group.setdefault("fused", bool(params) and all(p.is_cuda for p in params))
        super().add_param_group(param_group)

    def load_state_dict(self, state_dict: dict) -> None:
        """torch replaces each group's settings by the saved ones; settings a saved group lacks keep their
        current value, so a checkpoint of torch.optim.AdamW (ours before Muon) resumes as the "adamw" rule."""
        current = [{key: value for key, value in group.items() if key != "params"} for group in self.param_groups]
        super().load_state_dict(state_dict)
        for group, settings in zip(self.param_groups, current):
            for key, value in settings.items():
                group.setdefault(key, value)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["rule"] == "muon":
                self._muon_step(group)
            else:
                self._adamw_step(group)
        return loss

    def _muon_step(self, group: dict) -> None:
        params = [p for p in group["params"] if p.grad is not None]
        by_shape = defaultdict(list)
        for param in params:
            by_shape[param.shape].append(param)
        for shape, same_shape in by_shape.items():
            grads = [p.grad for p in same_shape]
            buffers = [self._state(p, "momentum_buffer") for p in same_shape]
            torch._foreach_lerp_(buffers, grads, 1 - group["momentum"])
            updates = torch._foreach_lerp(grads, buffers, group["momentum"]) if group["nesterov"] else buffers
            # Shared out over the ranks under DDP, on whole matrices under FSDP (muon_distributed.py).
            orthogonal = orthogonalized(updates, lambda stack: orthogonalize(stack, group["ns_steps"]))
            steps = [step.to(same_shape[0].dtype) for step in orthogonal]
            torch._foreach_mul_(steps, muon_lr_scale(shape))
            if group["weight_decay"]:
                torch._foreach_mul_(same_shape, 1 - group["lr"] * group["weight_decay"])
            torch._foreach_add_(same_shape, steps, alpha=-group["lr"])

    def _adamw_step(self, group: dict) -> None:
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        fused = group["fused"]
        for param in params:
            if "step" not in self.state[param]:
                device = param.device if fused else "cpu"
                self.state[param]["step"] = torch.tensor(0.0, dtype=torch.float32, device=device)
        states = [self.state[p] for p in params]
        beta1, beta2 = group["betas"]
        adamw_update(
            params,
            [p.grad for p in params],
            [self._state(p, "exp_avg") for p in params],
            [self._state(p, "exp_avg_sq") for p in params],
            [],
            [state["step"] for state in states],
            foreach=not fused,
            fused=fused,
            amsgrad=False,
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=False,
        )

    def _state(self, param: torch.Tensor, key: str) -> torch.Tensor:
        """The per-parameter buffer `key`, created as zeros on first use."""
        state = self.state[param]
        if key not in state:
            state[key] = torch.zeros_like(param, memory_format=torch.preserve_format)
        return state[key]
