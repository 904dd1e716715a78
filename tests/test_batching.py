"""Continuous batching: every request gets what it gets alone, joining and leaving between steps."""

from __future__ import annotations

import time

import pytest
import torch

from picogpt_lightning.api import PicoGPT
from picogpt_lightning.batching import (
    BatchGenerator,
    Finish,
    GenerationRequest,
    QueueFull,
    Scheduler,
    generate_many,
)
from picogpt_lightning.checkpoint import LoadedCheckpoint
from picogpt_lightning.generate import make_generator, stream_text
from picogpt_lightning.model import GPT, GPTConfig
from picogpt_lightning.settings import SamplingSettings
from picogpt_lightning.tokenizer import CharTokenizer

TEXT = "You are picoGPT.\n\nQ: What is truth?\nA: What remains.\n\nQ: And virtue?\nA: A habit.\n"
CPU = torch.device("cpu")
GREEDY = SamplingSettings(temperature=0.0)
SAMPLED = SamplingSettings(temperature=1.0, top_k=None, top_p=0.9)


@pytest.fixture(scope="module")
def tokenizer() -> CharTokenizer:
    return CharTokenizer.train([TEXT])


@pytest.fixture(scope="module", params=["classic", "modern"])
def model(request, tokenizer) -> GPT:
    """Large random weights keep logits far apart, so a batched matmul's rounding cannot flip a greedy choice.
    A context of 24 makes the longer requests slide their window."""
    modern = dict(position="rotary", norm="rms", qk_norm=True, mlp="swiglu") if request.param == "modern" else {}
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=24, n_layer=2, n_head=2, n_embd=32, **modern))
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.3)
    return model.eval()


# prompt, max_new_tokens, stop strings, settings
CASES = [
    ("Q: What is truth?\nA:", 5, [], GREEDY),
    ("Q", 40, ["t"], GREEDY),
    ("You are picoGPT.\n\nQ: And virtue?\nA: A habit.\n\nQ: What", 70, [], GREEDY),
    ("A: ", 13, ["ue", "Q:"], SAMPLED),
    ("Q: hi", 1, [], SAMPLED),
    ("What", 60, [], SAMPLED),
    ("\n", 33, ["a"], GREEDY),
]


def alone(model, tokenizer, prompt, max_new_tokens, stop, settings) -> str:
    return "".join(stream_text(model, tokenizer, tokenizer.encode(prompt), max_new_tokens, settings,
                               make_generator(5, CPU), stop))


def requests_for(tokenizer, cases) -> tuple[list[GenerationRequest], list[list]]:
    outputs = [[] for _ in cases]
    requests = [GenerationRequest(tokenizer.encode(prompt), length, settings, make_generator(5, CPU), stop,
                                  outputs[index].append)
                for index, (prompt, length, stop, settings) in enumerate(cases)]
    return requests, outputs


def text_of(output: list) -> str:
    return "".join(item for item in output if isinstance(item, str))


@pytest.mark.parametrize("max_batch_size", [1, 3, 8])
def test_every_request_gets_the_text_it_gets_alone_whatever_the_batch(model, tokenizer, max_batch_size):
    requests, outputs = requests_for(tokenizer, CASES)
    generate_many(model, tokenizer, requests, max_batch_size)
    assert [text_of(output) for output in outputs] == [alone(model, tokenizer, *case) for case in CASES]
    finishes = [output[-1] for output in outputs]
    assert all(isinstance(finish, Finish) for finish in finishes)
    assert finishes[0] == Finish("length", 5) and finishes[4] == Finish("length", 1)


def test_a_request_joining_mid_batch_gets_what_it_gets_alone(model, tokenizer):
    requests, outputs = requests_for(tokenizer, CASES[:3])
    batch = BatchGenerator(model, tokenizer, max_batch_size=4)
    batch.add(requests[1])
    batch.add(requests[2])
    for _ in range(7):
        batch.step()
    batch.add(requests[0])  # joins two requests seven tokens in
    while batch.slots:
        batch.step()
    assert [text_of(output) for output in outputs] == [alone(model, tokenizer, *case) for case in CASES[:3]]


def test_a_cancelled_request_frees_its_slot_at_the_next_step(model, tokenizer):
    requests, outputs = requests_for(tokenizer, [CASES[2], CASES[5]])
    batch = BatchGenerator(model, tokenizer, max_batch_size=2)
    batch.add(requests[0])
    batch.add(requests[1])
    batch.step()
    requests[0].cancelled = True
    batch.step()
    assert batch.free == 1 and outputs[0][-1] == Finish("cancelled", 2)  # the first token came on joining
    while batch.slots:
        batch.step()
    assert text_of(outputs[1]) == alone(model, tokenizer, *CASES[5])


def test_the_scheduler_refuses_a_request_beyond_its_queue_at_once(model, tokenizer):
    scheduler = Scheduler(model, tokenizer, max_batch_size=1, max_queue=2)  # not started: nothing leaves the queue
    requests, _ = requests_for(tokenizer, CASES[:3])
    scheduler.submit(requests[0])
    scheduler.submit(requests[1])
    with pytest.raises(QueueFull):
        scheduler.submit(requests[2])


def test_the_scheduler_thread_answers_requests_and_cancels_the_rest_when_stopped(model, tokenizer):
    scheduler = Scheduler(model, tokenizer, max_batch_size=2, max_queue=4)
    scheduler.start()
    requests, outputs = requests_for(tokenizer, [CASES[0], (CASES[2][0], 10**6, [], GREEDY)])
    for request in requests:
        scheduler.submit(request)
    deadline = time.monotonic() + 30
    while not (outputs[0] and isinstance(outputs[0][-1], Finish)) and time.monotonic() < deadline:
        time.sleep(0.01)
    scheduler.stop()
    assert not scheduler.thread.is_alive()
    assert text_of(outputs[0]) == alone(model, tokenizer, *CASES[0]) and outputs[1][-1].reason == "cancelled"


def test_the_python_api_generates_a_list_of_prompts_together_each_as_alone(model, tokenizer):
    api = PicoGPT(LoadedCheckpoint(model, tokenizer, meta={}, global_step=0))
    prompts = ["Q: What is truth?\nA:", "Q", "What"]
    texts = api.generate(prompts, max_new_tokens=30, seed=5, temperature=1.0, top_k=None)
    assert texts == [api.generate(prompt, max_new_tokens=30, seed=5, temperature=1.0, top_k=None)
                     for prompt in prompts]

