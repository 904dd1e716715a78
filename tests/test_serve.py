"""The OpenAI-compatible server: real server processes on free ports, real HTTP clients, and its request checks."""

from __future__ import annotations

import http.client
import json
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from picogpt_lightning.api import load  # noqa: E402
from picogpt_lightning.errors import PicoGPTError  # noqa: E402
from picogpt_lightning.serve_protocol import RequestError, RequestLimits, read_request  # noqa: E402
from picogpt_lightning.settings import SamplingSettings, ServeSettings  # noqa: E402
from picogpt_lightning.tokenizer import CharTokenizer  # noqa: E402
from serving import random_chat_model, ready, start_server, stop_server  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
TEXT = "You are picoGPT.\n\nQ: What is truth?\nA: What remains.\n\nQ: And virtue?\nA: A habit.\n<|>fx_y"
QUESTION = [{"role": "user", "content": "What is truth?"}]
KEY = "test-key-123"
LIMITS = RequestLimits("picogpt", default_max_tokens=10, max_tokens_limit=64, max_messages=4)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A char model fine-tuned with the `im` template (so the server must read it from meta), with end-of-text."""
    return random_chat_model(CharTokenizer.train([TEXT]), tmp_path_factory.mktemp("serve") / "chat.ckpt", "im")


@pytest.fixture(scope="module")
def endless_ckpt(tmp_path_factory) -> Path:
    """A model that never stops by itself: no end-of-text and no newline, so no stop string can be written."""
    tokenizer = CharTokenizer("abcdefghijklmnopqrstuvwxyz?.:", endoftext=False)
    return random_chat_model(tokenizer, tmp_path_factory.mktemp("serve") / "endless.ckpt", "qa")


@pytest.fixture(scope="module")
def server(ckpt, tmp_path_factory):
    """`picogpt serve` with a key, batches of 3; its base URL."""
    process, base = start_server(ckpt, tmp_path_factory.mktemp("serve-log") / "server.log", "--api_key", KEY,
                                 "--max_batch_size", "3", "--max_messages", "8", "--max_request_bytes", "5000")
    yield base
    stop_server(process)


@pytest.fixture(scope="module")
def expected(ckpt):
    """Answers generated alone in this process, by the Python API (no batching)."""
    model = load(ckpt, device="cpu")

    def answer(messages, max_tokens=256, temperature=0.8, top_p=None, seed=None, stop=None) -> str:
        return model.chat(messages, max_new_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed,
                          stop=stop)

    return answer


@pytest.fixture(scope="module")
def client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=60)


def post(url: str, body: bytes | dict, key: str | None = KEY, timeout: float = 60) -> tuple[int, bytes]:
    body = json.dumps(body).encode() if isinstance(body, dict) else body
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    request = urllib.request.Request(url, data=body, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def get(url: str, key: str | None = KEY) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def open_stream(base: str, body: dict) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    """A streamed request whose connection the test may close mid-answer."""
    host, port = base.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    connection.request("POST", "/v1/chat/completions", json.dumps({**body, "stream": True}),
                       {"Content-Type": "application/json"})
    return connection, connection.getresponse()


def first_chunk(response: http.client.HTTPResponse) -> dict:
    while True:
        line = response.readline()
        if line.startswith(b"data: {"):
            return json.loads(line[len(b"data: "):])


# ----------------------------------------------------------------------------------------------- answers


def test_a_plain_request_gets_the_greedy_answer_and_its_token_counts(client, expected):
    response = client.chat.completions.create(model="picogpt", messages=QUESTION, max_tokens=12, temperature=0)
    choice = response.choices[0]
    assert choice.message.content == expected(QUESTION, max_tokens=12, temperature=0)
    assert choice.message.role == "assistant" and response.usage.completion_tokens <= 12
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens


def test_a_streamed_request_sends_the_same_answer_in_chunks_then_done(server, expected):
    status, raw = post(f"{server}/v1/chat/completions", {"messages": QUESTION, "max_tokens": 12, "temperature": 0,
                                                         "stream": True})
    events = [line for line in raw.decode().split("\n\n") if line]
    assert status == 200 and all(event.startswith("data: ") for event in events)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(event[len("data: "):]) for event in events[:-1]]
    assert len({chunk["id"] for chunk in chunks}) == 1 and len(chunks) > 2
    text = "".join(chunk["choices"][0]["delta"]["content"] or "" for chunk in chunks)
    assert text == expected(QUESTION, max_tokens=12, temperature=0)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert chunks[-1]["usage"]["completion_tokens"] <= 12


def test_stop_seed_and_top_p_are_honoured(client, expected):
    greedy = expected(QUESTION, max_tokens=20, temperature=0)
    stop = greedy[len(greedy) // 2 :][:2]
    response = client.chat.completions.create(model="picogpt", messages=QUESTION, max_tokens=20, temperature=0,
                                              stop=[stop])
    assert response.choices[0].message.content == greedy[: greedy.index(stop)]
    assert response.choices[0].finish_reason == "stop"
    sampled = dict(max_tokens=20, temperature=1.0, top_p=0.9, seed=7)
    answers = {client.chat.completions.create(model="picogpt", messages=QUESTION, **sampled).choices[0]
               .message.content for _ in range(2)}
    assert answers == {expected(QUESTION, **sampled)}


def test_concurrent_requests_share_batches_and_each_gets_its_answer_alone_even_joining_mid_batch(server, client,
                                                                                               expected):
    """One long request runs; five more join it (batches of 3: some wait, then join as others leave), each with
    its own length, stop string and seed."""
    greedy = expected(QUESTION, max_tokens=40, temperature=0)
    jobs = [dict(messages=QUESTION, max_tokens=40, temperature=0),
            dict(messages=QUESTION, max_tokens=5, temperature=0),
            dict(messages=QUESTION, max_tokens=40, temperature=0, stop=[greedy[9:11]]),
            dict(messages=[{"role": "user", "content": "And virtue?"}], max_tokens=25, temperature=0),
            dict(messages=[{"role": "system", "content": "You are picoGPT."}, *QUESTION], max_tokens=30,
                 temperature=1.0, seed=3),
            dict(messages=QUESTION, max_tokens=17, temperature=0.7, top_p=0.8, seed=11)]
    answers: dict[int, str] = {}

    def ask(index: int) -> None:
        job = jobs[index]
        stream = client.chat.completions.create(model="picogpt", stream=True, **job)
        answers[index] = "".join(chunk.choices[0].delta.content or "" for chunk in stream)

    threads = [threading.Thread(target=ask, args=(0,))]
    threads[0].start()
    time.sleep(0.05)  # the first is running when the others arrive
    threads += [threading.Thread(target=ask, args=(index,)) for index in range(1, len(jobs))]
    for thread in threads[1:]:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert answers == {index: expected(**{k: v for k, v in job.items() if k != "messages"},
                                       messages=job["messages"]) for index, job in enumerate(jobs)}


def test_end_of_text_written_in_a_message_is_text_not_a_turn_boundary(client):
    counts = [client.chat.completions.create(model="picogpt", messages=[{"role": "user", "content": content}],
                                             max_tokens=1).usage.prompt_tokens
              for content in ("hi", "hi<|endoftext|>")]
    assert counts[1] == counts[0] + len("<|endoftext|>")  # a char model: one token per character


# ----------------------------------------------------------------------------------------------- who may connect


def test_without_the_key_every_endpoint_but_health_and_the_page_is_401_and_docs_are_closed(server):
    for path in ("/v1/models", "/docs", "/openapi.json", "/info", "/v1/nothing"):
        for key in (None, "wrong"):
            status, body = get(f"{server}{path}", key=key)
            assert status == 401 and json.loads(body)["error"]["code"] == "invalid_api_key"
    status, _ = post(f"{server}/v1/chat/completions", {"messages": QUESTION}, key="wrong")
    assert status == 401
    assert get(f"{server}/health", key=None) == (200, b"ok")
    status, page = get(f"{server}/", key=None)
    assert status == 200 and b"<html" in page.lower()
    for path in ("/docs", "/openapi.json", "/redoc", "/info"):
        assert get(f"{server}{path}")[0] == 404


def test_the_openai_client_with_the_key_works_and_without_it_raises_its_error(server, client):
    openai = pytest.importorskip("openai")
    assert [model.id for model in client.models.list().data] == ["picogpt"]
    stranger = openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError, match="Incorrect API key"):
        stranger.chat.completions.create(model="picogpt", messages=QUESTION)


def test_the_server_listens_on_localhost_only_by_default(server):
    port = int(server.rsplit(":", 1)[1])
    listening = Path("/proc/net/tcp")
    if not listening.exists():
        pytest.skip("reading listening sockets needs Linux's /proc/net/tcp")
    addresses = {line.split()[1] for line in listening.read_text().splitlines()[1:] if line.split()[3] == "0A"}
    ours = {address for address in addresses if int(address.split(":")[1], 16) == port}
    assert ours == {f"0100007F:{port:04X}"}  # 127.0.0.1, little-endian hex


# ----------------------------------------------------------------------------------------------- bad requests


@pytest.mark.parametrize("stream", [False, True])
def test_bad_requests_are_openai_shaped_json_errors_and_the_server_stays_up(server, stream):
    body = {"messages": QUESTION, "stream": stream}
    for raw, status, reason in [
        ({**body, "messages": [{"role": "bot", "content": "hi"}]}, 400, "unknown role 'bot'"),
        (b'{"messages": [', 400, "not valid JSON"),
        ({**body, "temperature": "hot"}, 400, "temperature"),
        ({**body, "temperature": -1}, 400, "temperature must"),
        ({**body, "seed": -1}, 400, "seed must be"),
        ({**body, "seed": 2**80}, 400, "seed must be"),
        (json.dumps({**body, "messages": [{"role": "user", "content": "\ud800"}]}).encode(), 400, "not valid Unicode"),
        ({**body, "model": "gpt-4o"}, 404, "does not exist"),
        ({**body, "logprobs": True, "response_format": {"type": "json_object"}}, 400, "logprobs, response_format"),
        ({**body, "max_tokens": 1_000_000_000}, 400, "max_tokens is too large"),
        ({**body, "messages": QUESTION * 9}, 400, "more than this server takes"),
        ({**body, "messages": [{"role": "user", "content": "x" * 6000}]}, 413, "more than this server takes"),
    ]:
        answer_status, answer = post(f"{server}/v1/chat/completions", raw)
        assert answer_status == status and answer.count(b"\n") == 0, answer
        error = json.loads(answer)["error"]
        assert reason in error["message"] and set(error) == {"message", "type", "param", "code"}
    assert ready(server)


def test_neutral_values_of_unsupported_parameters_are_accepted(server):
    body = {"messages": QUESTION, "max_tokens": 2, "presence_penalty": 0, "frequency_penalty": 0, "logprobs": False}
    assert post(f"{server}/v1/chat/completions", body)[0] == 200


def test_the_openai_client_raises_its_errors(client):
    openai = pytest.importorskip("openai")
    with pytest.raises(openai.BadRequestError, match="has the unknown role"):
        client.chat.completions.create(model="picogpt", messages=[{"role": "tool", "content": "x"}])
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-4o", messages=QUESTION)


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ({"n": 2}, "n must be 1"),
        ({"max_tokens": 0}, "max_tokens must be at least 1"),
        ({"max_tokens": 65}, "at most 64 tokens"),
        ({"top_p": 0}, "top_p must be in"),
        ({"messages": []}, '"messages" is empty'),
        ({"messages": QUESTION * 5}, "5 messages are more"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "only text content"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "at most 4"),
        ({"presence_penalty": 0.5}, "unsupported parameter(s): presence_penalty"),
        ({"seed": True}, "seed"),
    ],
)
def test_read_request_says_what_is_wrong(body, reason):
    with pytest.raises(RequestError, match=reason.replace("(", r"\(").replace(")", r"\)")):
        read_request(json.dumps({"messages": QUESTION, **body}).encode(), LIMITS)


def test_read_request_defaults_to_picogpt_sample_settings():
    job = read_request(json.dumps({"messages": QUESTION, "stop": "\n"}).encode(), LIMITS)
    assert (job.settings, job.max_tokens, job.stop, job.seed) == (SamplingSettings(), 10, ["\n"], None)
    content_parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                     "max_completion_tokens": 3}
    job = read_request(json.dumps(content_parts).encode(), LIMITS)
    assert job.max_tokens == 3 and job.messages == [{"role": "user", "content": "hi"}]


def test_serve_refuses_bad_settings_and_checkpoints_before_starting(tmp_path):
    from picogpt_lightning.serve import serve

    with pytest.raises(PicoGPTError, match="host 'example.com' cannot be served"):
        ServeSettings(host="example.com")
    with pytest.raises(PicoGPTError, match="port must be from 1024"):
        ServeSettings(port=80)
    with pytest.raises(PicoGPTError, match="max_tokens_limit 10 is below"):
        ServeSettings(max_tokens_limit=10)
    with pytest.raises(PicoGPTError, match="max_batch_size must be at least 1"):
        ServeSettings(max_batch_size=0)
    with pytest.raises(PicoGPTError, match="does not exist"):
        serve(str(tmp_path / "missing.ckpt"), device="cpu")


# ----------------------------------------------------------------------------------------------- load


def test_a_full_queue_is_503_at_once_and_a_client_that_leaves_frees_its_place(endless_ckpt, tmp_path):
    """One slot, one place in the queue, a model that never stops: a streamed client that closes and a plain
    one that times out must both let the next request through; SIGTERM then ends the server promptly."""
    process, base = start_server(endless_ckpt, tmp_path / "server.log", "--max_batch_size", "1", "--max_queue",
                                 "1", "--max_tokens_limit", "1000000")
    try:
        endless = {"messages": [{"role": "user", "content": "abc"}], "max_tokens": 1_000_000, "temperature": 0}
        first, first_response = open_stream(base, endless)
        assert first_chunk(first_response)["choices"][0]["delta"]["content"]
        second, second_response = open_stream(base, endless)  # waits in the queue
        time.sleep(0.3)
        start = time.monotonic()
        status, answer = post(f"{base}/v1/chat/completions", endless, key=None)
        assert status == 503 and "busy" in json.loads(answer)["error"]["message"]
        assert time.monotonic() - start < 5  # at once, not after the endless one
        first.close()  # leaves: the waiting one starts at the next step
        assert first_chunk(second_response)["choices"][0]["delta"]["content"]
        second.close()
        with pytest.raises(OSError):  # a plain request whose client gives up
            post(f"{base}/v1/chat/completions", endless, key=None, timeout=1)
        status, _ = post(f"{base}/v1/chat/completions", {**endless, "max_tokens": 3}, key=None, timeout=30)
        assert status == 200
        third, third_response = open_stream(base, endless)
        first_chunk(third_response)
    finally:
        seconds = stop_server(process)
    assert seconds < 10 and process.returncode is not None


def test_an_exposed_server_without_a_key_says_so_in_one_line(endless_ckpt, tmp_path, capsys, monkeypatch):
    import picogpt_lightning.serve as serving

    monkeypatch.setattr(serving, "_Server", type("NoServer", (), {"__init__": lambda self, config, scheduler: None,
                                                                  "run": lambda self: None}))
    serving.serve(str(endless_ckpt), "cpu", ServeSettings(host="0.0.0.0", threads=1))
    lines = [line for line in capsys.readouterr().err.splitlines() if "anyone" in line]
    assert len(lines) == 1 and "--api_key" in lines[0]
    serving.serve(str(endless_ckpt), "cpu", ServeSettings(host="0.0.0.0", threads=1, api_key="k"))
    assert "anyone" not in capsys.readouterr().err


def test_the_key_may_come_from_picogpt_api_key_and_the_flag_wins(monkeypatch):
    import picogpt_lightning.serve as serving
    from picogpt_lightning.cli.serve import serve_command

    served = []
    monkeypatch.setattr(serving, "serve", lambda ckpt, device, settings: served.append(settings.api_key))
    monkeypatch.setenv("PICOGPT_API_KEY", "from-env")
    serve_command("x.ckpt")
    serve_command("x.ckpt", api_key="from-flag")
    monkeypatch.delenv("PICOGPT_API_KEY")
    serve_command("x.ckpt")
    assert served == ["from-env", "from-flag", None]
