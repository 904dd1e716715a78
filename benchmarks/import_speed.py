"""`picogpt import` against transformers' own loading, and a training step of each model.

    python -m benchmarks.import_speed                      # a ~0.5B Llama-layout folder, bf16, two shards
    python -m benchmarks.import_speed --layers 4           # a smaller folder, for a quick look

1. Loading. A Llama-layout folder with random bf16 weights (GQA, untied, two safetensors shards with an index)
   is written once; then, each in a fresh process (so peak memory is the process' own), alternating, --repeats
   times: transformers' `AutoModelForCausalLM.from_pretrained` and our in-memory conversion (`import_folder`,
   what `--model.init_from HF_DIR` does), both to bfloat16 and both to float32; and the whole `picogpt import`
   command, which also writes the checkpoint. Printed: median seconds, peak resident memory (ru_maxrss) and
   the ratios ours / theirs (targets: time <= 1, memory <= 1).
2. Training. One step (forward, backward, AdamW) of the imported GPT and of transformers' LlamaForCausalLM
   with the same weights on the same batch, fp32 on CPU, alternating, median of --steps: tokens/s and the ratio
   ours / theirs (target >= 1).

Printed, not tested; the load average is printed, since other jobs slow a shared machine down.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import machine_line, set_threads


def llama_config(layers: int, hidden: int = 1024, heads: int = 16, kv_heads: int = 4, inner: int = 4096,
                 vocab: int = 32768) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab, "hidden_size": hidden,
            "intermediate_size": inner, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv_heads, "head_dim": hidden // heads, "hidden_act": "silu",
            "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "attention_bias": False,
            "mlp_bias": False, "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 0, "dtype": "bfloat16"}


def tensor_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    hidden, inner, head = config["hidden_size"], config["intermediate_size"], config["head_dim"]
    q, kv = config["num_attention_heads"] * head, config["num_key_value_heads"] * head
    shapes = {"model.embed_tokens.weight": (config["vocab_size"], hidden), "model.norm.weight": (hidden,),
              "lm_head.weight": (config["vocab_size"], hidden)}
    for i in range(config["num_hidden_layers"]):
        layer = f"model.layers.{i}."
        shapes.update({layer + "input_layernorm.weight": (hidden,), layer + "post_attention_layernorm.weight": (hidden,),
                       layer + "self_attn.q_proj.weight": (q, hidden), layer + "self_attn.k_proj.weight": (kv, hidden),
                       layer + "self_attn.v_proj.weight": (kv, hidden), layer + "self_attn.o_proj.weight": (hidden, q),
                       layer + "mlp.gate_proj.weight": (inner, hidden), layer + "mlp.up_proj.weight": (inner, hidden),
                       layer + "mlp.down_proj.weight": (hidden, inner)})
    return shapes


def write_folder(folder: Path, config: dict) -> int:
    """Random bf16 weights in two shards with an index, config.json and a small tokenizer; returns parameters."""
    from safetensors.torch import save_file

    from tests.test_import import make_tokenizer  # the tests' tiny byte-level BPE (fewer tokens than rows: padded)

    folder.mkdir(parents=True, exist_ok=True)
    shapes = tensor_shapes(config)
    names = list(shapes)
    halves = [names[: len(names) // 2], names[len(names) // 2 :]]
    weight_map = {}
    generator = torch.Generator().manual_seed(0)
    for index, part in enumerate(halves, start=1):
        shard = f"model-0000{index}-of-00002.safetensors"
        tensors = {name: (torch.randn(shapes[name], generator=generator) * 0.02).to(torch.bfloat16) for name in part}
        save_file(tensors, str(folder / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, shard))
        del tensors
    parameters = sum(torch.Size(shape).numel() for shape in shapes.values())
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(config))
    make_tokenizer().save_pretrained(folder)
    return parameters


# ----------------------------------------------------------------------------------------------- loading


def child(mode: str, folder: str, out: str) -> None:
    """One load in this process (libraries imported first, not timed); prints seconds and peak resident memory
    as JSON."""
    import transformers

    from picogpt_lightning.cli import main
    from picogpt_lightning.hf_import import import_folder

    started = time.perf_counter()
    if mode.startswith("transformers"):
        dtype = torch.bfloat16 if mode.endswith("bf16") else torch.float32
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    elif mode.startswith("ours"):
        model = import_folder(folder, "bfloat16" if mode.endswith("bf16") else "float32")
    else:
        model = main(["import", folder, "--out", out, "--dtype", "bfloat16"])
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux
    del model
    print(json.dumps({"seconds": seconds, "peak": peak}))


def run_child(mode: str, folder: Path, out: Path) -> dict:
    result = subprocess.run([sys.executable, "-m", "benchmarks.import_speed", "--child", mode, "--folder", str(folder),
                             "--out", str(out)], check=True, capture_output=True, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def baseline_peak() -> int:
    """Peak memory of a process that imports torch, transformers and picogpt but loads nothing."""
    code = ("import resource, torch, transformers, picogpt_lightning.hf_import, picogpt_lightning.cli.main; "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)")
    return int(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout)


def compare_loading(folder: Path, repeats: int) -> None:
    modes = ["transformers bf16", "ours bf16", "transformers fp32", "ours fp32", "picogpt import bf16"]
    results: dict[str, list[dict]] = {mode: [] for mode in modes}
    for _ in range(repeats):
        for mode in modes:
            results[mode].append(run_child(mode, folder, folder.parent / "imported.ckpt"))
    base = baseline_peak()
    print(f"peak memory of a process that only imports the libraries: {base / 1e9:.2f} GB (included below)")
    print(f"{'loading':<22} {'seconds':>8} {'peak GB':>8}")
    medians = {}
    for mode in modes:
        seconds = statistics.median(r["seconds"] for r in results[mode])
        peak = statistics.median(r["peak"] for r in results[mode])
        medians[mode] = (seconds, peak)
        print(f"{mode:<22} {seconds:>8.2f} {peak / 1e9:>8.2f}")
    for dtype in ("bf16", "fp32"):
        (ours_s, ours_p), (theirs_s, theirs_p) = medians[f"ours {dtype}"], medians[f"transformers {dtype}"]
        print(f"{dtype}: time ratio ours/transformers {ours_s / theirs_s:.2f} (target <= 1); peak memory ratio "
              f"{ours_p / theirs_p:.2f} (target <= 1); above the baseline: ours {(ours_p - base) / 1e9:.2f} GB, "
              f"transformers {(theirs_p - base) / 1e9:.2f} GB")


# ----------------------------------------------------------------------------------------------- training


def compare_training(steps: int, batch: int, length: int) -> None:
    import transformers

    from picogpt_lightning.hf_import import import_folder
    from picogpt_lightning.model import GPT, GPTConfig

    config = llama_config(layers=4, hidden=256, heads=8, kv_heads=2, inner=768, vocab=8192)
    config["dtype"] = "float32"
    with tempfile.TemporaryDirectory() as work:
        folder = Path(work) / "small"
        torch.manual_seed(0)
        theirs = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config))
        theirs.save_pretrained(folder)
        from tests.test_import import make_tokenizer

        make_tokenizer().save_pretrained(folder)
        imported = import_folder(folder)  # the GPT itself: no masking of the padded rows, as in training
        ours = GPT(GPTConfig.from_dict(imported["picogpt"]["model_config"]))
        ours.load_state_dict({k.removeprefix("model."): v for k, v in imported["state_dict"].items()})
    ours.train()
    theirs.train()
    idx = torch.randint(0, 300, (batch, length + 1), generator=torch.Generator().manual_seed(0))
    inputs, targets = idx[:, :-1], idx[:, 1:]

    def our_step(optimizer):
        _, loss = ours(inputs, targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    def their_step(optimizer):
        logits = theirs(inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    runs = {"ours": (our_step, torch.optim.AdamW(ours.parameters(), lr=1e-5)),
            "transformers": (their_step, torch.optim.AdamW(theirs.parameters(), lr=1e-5))}
    first = {name: step(optimizer).item() for name, (step, optimizer) in runs.items()}  # warm-up, same loss
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(steps):
        for name, (step, optimizer) in runs.items():
            started = time.perf_counter()
            step(optimizer)
            times[name].append(time.perf_counter() - started)
    tokens = batch * length
    rates = {name: tokens / statistics.median(values) for name, values in times.items()}
    print(f"training step, {sum(p.numel() for p in ours.parameters()) / 1e6:.1f}M parameters, batch {batch} x {length} "
          f"tokens, fp32, AdamW; first losses ours {first['ours']:.4f} transformers {first['transformers']:.4f}")
    for name, rate in rates.items():
        print(f"{name:<14} {rate:>10,.0f} tokens/s")
    print(f"tokens/s ratio ours/transformers {rates['ours'] / rates['transformers']:.2f} (target >= 1)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=28, help="28: about 0.49B parameters")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.folder, args.out)
        return
    set_threads(args.threads)
    print(machine_line(torch.device("cpu")))
    with tempfile.TemporaryDirectory() as work:
        folder = Path(work) / "llama"
        parameters = write_folder(folder, llama_config(args.layers))
        size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
        print(f"folder: Llama layout, {parameters / 1e9:.2f}B parameters, bf16, 2 shards ({size / 1e9:.2f} GB)")
        compare_loading(folder, args.repeats)
    compare_training(args.steps, args.batch, args.length)
    print(f"load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
