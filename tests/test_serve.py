"""The OpenAI-compatible server: a real server process on a free port, real HTTP clients."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

pytest.importorskip("litserve")

from picogpt_lightning.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from picogpt_lightning.chat_template import get_template, template_from_meta  # noqa: E402
from picogpt_lightning.errors import PicoGPTError  # noqa: E402
from picogpt_lightning.model import GPT, GPTConfig  # noqa: E402
from picogpt_lightning.serve import ChatJob, ChatRequest, read_request, reply_pieces  # noqa: E402
from picogpt_lightning.settings import SamplingSettings, ServeSettings  # noqa: E402
from picogpt_lightning.tokenizer import CharTokenizer  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
TEXT = "You are picoGPT.\n\nQ: What is truth?\nA: What remains.\n\nQ: And virtue?\nA: A habit.\n"
QUESTION = [{"role": "user", "content": "What is truth?"}]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A tiny random char model fine-tuned with the `im` template (so the server must read it from meta).

    Large random weights keep logits far apart, so greedy choices cannot flip between two processes."""
    tokenizer = CharTokenizer.train([TEXT])
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=32))
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.3)
    path = tmp_path_factory.mktemp("serve") / "chat.ckpt"
    save_checkpoint(path, model, tokenizer, chat_template=get_template("im").to_dict())
    return path


@pytest.fixture(scope="module")
def server(ckpt, tmp_path_factory):
    """`picogpt serve` with two workers; its base URL. Stopped with SIGTERM, like `kill`."""
    port = free_port()
    log = tmp_path_factory.mktemp("serve-log") / "server.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "picogpt_lightning.cli", "serve", "--ckpt", str(ckpt), "--port", str(port),
               "--device", "cpu", "--workers", "2", "--threads", "1", "--log_level", "warning"]
    with open(log, "w") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env,
                                   cwd=log.parent, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while not _ready(base):
            assert process.poll() is None, f"the server exited:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"the server did not start:\n{log.read_text()}"
            time.sleep(0.2)
        yield base
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        finally:
            try:
                os.killpg(process.pid, signal.SIGKILL)  # whatever of its session is left
            except ProcessLookupError:
                pass


def _ready(base: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def expected(ckpt):
    """The answers generated in this process, by the code the workers run."""
    loaded = load_checkpoint(ckpt)
    template = template_from_meta(loaded.meta)

    def answer(messages, **fields) -> tuple[str, str]:
        job = read_request(ChatRequest(messages=messages, **fields), default_max_tokens=256)
        pieces = list(reply_pieces(loaded.model, loaded.tokenizer, template, job))
        return "".join(p["content"] for p in pieces), pieces[-1]["finish_reason"]

    return answer


@pytest.fixture(scope="module")
def client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=f"{server}/v1", api_key="none", max_retries=0, timeout=60)


def post(url: str, body: bytes) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


# ----------------------------------------------------------------------------------------------- over HTTP


def test_a_plain_request_gets_the_greedy_answer_and_its_token_counts(client, expected):
    response = client.chat.completions.create(model="picogpt", messages=QUESTION, max_tokens=12, temperature=0)
    choice = response.choices[0]
    assert (choice.message.content, choice.finish_reason) == expected(QUESTION, max_tokens=12, temperature=0)
    assert choice.message.role == "assistant" and response.usage.completion_tokens <= 12
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens


def test_a_streamed_request_sends_the_same_answer_in_chunks_then_done(server, expected):
    body = json.dumps({"messages": QUESTION, "max_tokens": 12, "temperature": 0, "stream": True}).encode()
    status, raw = post(f"{server}/v1/chat/completions", body)
    events = [line for line in raw.decode().split("\n\n") if line]
    assert status == 200 and all(event.startswith("data: ") for event in events)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(event[len("data: "):]) for event in events[:-1]]
    assert len({chunk["id"] for chunk in chunks}) == 1 and len(chunks) > 2
    text = "".join(chunk["choices"][0]["delta"]["content"] or "" for chunk in chunks)
    assert (text, chunks[-1]["choices"][0]["finish_reason"]) == expected(QUESTION, max_tokens=12, temperature=0)
    assert chunks[-1]["usage"]["completion_tokens"] <= 12


def test_stop_seed_and_top_p_are_honoured(client, expected):
    greedy, _ = expected(QUESTION, max_tokens=20, temperature=0)
    stop = greedy[len(greedy) // 2 :][:2]
    response = client.chat.completions.create(model="picogpt", messages=QUESTION, max_tokens=20, temperature=0,
                                              stop=[stop])
    assert response.choices[0].message.content == greedy[: greedy.index(stop)]
    assert response.choices[0].finish_reason == "stop"
    sampled = dict(max_tokens=20, temperature=1.0, top_p=0.9, seed=7)
    answers = {client.chat.completions.create(model="picogpt", messages=QUESTION, **sampled).choices[0]
               .message.content for _ in range(2)}
    assert answers == {expected(QUESTION, **sampled)[0]}


@pytest.mark.parametrize("stream", [False, True])
def test_a_bad_request_is_a_400_with_one_line_of_json(server, stream):
    body = {"messages": [{"role": "bot", "content": "hi"}], "stream": stream}
    for raw, reason in [(json.dumps(body).encode(), "unknown role 'bot'"),
                        (b'{"messages": [', "not valid JSON"),
                        (json.dumps({**body, "messages": QUESTION, "temperature": "hot"}).encode(), "temperature"),
                        (json.dumps({**body, "messages": QUESTION, "temperature": -1}).encode(), "temperature must"),
                        (json.dumps({**body, "messages": QUESTION + [{"role": "assistant", "content": "x"}]})
                         .encode(), "last message must be from the user")]:
        status, answer = post(f"{server}/v1/chat/completions", raw)
        assert status == 400 and answer.count(b"\n") == 0
        assert reason in json.loads(answer)["error"]["message"]


def test_the_openai_client_raises_its_bad_request_error(client):
    openai = pytest.importorskip("openai")
    with pytest.raises(openai.BadRequestError, match="has the unknown role"):
        client.chat.completions.create(model="picogpt", messages=[{"role": "tool", "content": "x"}])


def test_models_lists_the_one_model(client):
    assert [model.id for model in client.models.list().data] == ["picogpt"]


def test_two_concurrent_clients_each_get_their_own_answer(client, expected):
    questions = [QUESTION, [{"role": "system", "content": "You are picoGPT."},
                            {"role": "user", "content": "And virtue?"}]]
    answers: dict[int, str] = {}

    def ask(index: int) -> None:
        stream = client.chat.completions.create(model="picogpt", messages=questions[index], max_tokens=40,
                                                temperature=0, stream=True)
        answers[index] = "".join(chunk.choices[0].delta.content or "" for chunk in stream)

    threads = [threading.Thread(target=ask, args=(index,)) for index in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert answers == {i: expected(questions[i], max_tokens=40, temperature=0)[0] for i in (0, 1)}


# ----------------------------------------------------------------------------------------------- in this process


class ScriptedModel(torch.nn.Module):
    """A stand-in for GPT that writes a fixed text, one character per step, then end-of-text for ever."""

    def __init__(self, tokenizer: CharTokenizer, script: str):
        super().__init__()
        self.config = GPTConfig(vocab_size=tokenizer.vocab_size, block_size=64, n_layer=1, n_head=1, n_embd=8)
        self.wte = torch.nn.Embedding(tokenizer.vocab_size, 1)
        self.script = tokenizer.encode(script)
        self.steps = 0

    def new_cache(self, batch_size: int = 1):
        return None

    def forward(self, idx, cache=None, last_only=False):
        token = self.script[min(self.steps, len(self.script) - 1)]
        self.steps += 1
        return torch.nn.functional.one_hot(torch.tensor([[token]]), self.config.vocab_size).float() * 10, None


def test_an_answer_ends_at_end_of_text_without_the_leading_space():
    tokenizer = CharTokenizer.train([TEXT])
    model = ScriptedModel(tokenizer, " A habit.<|endoftext|>")
    job = ChatJob(QUESTION, SamplingSettings(temperature=0), max_tokens=50, stop=[], seed=None)
    pieces = list(reply_pieces(model, tokenizer, get_template("qa"), job))
    assert "".join(p["content"] for p in pieces) == "A habit."
    assert pieces[-1]["finish_reason"] == "stop" and pieces[-1]["completion_tokens"] == 10


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"n": 2}, "n must be 1"),
        ({"max_tokens": 0}, "max_tokens must be at least 1"),
        ({"top_p": 0}, "top_p must be in"),
        ({"messages": []}, '"messages" is empty'),
    ],
)
def test_read_request_says_what_is_wrong(fields, reason):
    with pytest.raises(PicoGPTError, match=reason):
        read_request(ChatRequest(**{"messages": QUESTION, **fields}), default_max_tokens=10)


def test_read_request_defaults_to_picogpt_sample_settings():
    job = read_request(ChatRequest(messages=QUESTION, stop="\n"), default_max_tokens=10)
    assert (job.settings, job.max_tokens, job.stop, job.seed) == (SamplingSettings(), 10, ["\n"], None)
    assert read_request(ChatRequest(messages=QUESTION, max_completion_tokens=3), 10).max_tokens == 3


def test_serve_refuses_bad_settings_and_checkpoints_before_starting(tmp_path):
    from picogpt_lightning.serve import serve

    with pytest.raises(PicoGPTError, match="host 'example.com' cannot be served"):
        ServeSettings(host="example.com")
    with pytest.raises(PicoGPTError, match="port must be from 1024"):
        ServeSettings(port=80)
    with pytest.raises(PicoGPTError, match="does not exist"):
        serve(str(tmp_path / "missing.ckpt"), device="cpu")
