"""Serving speed: requests per second and time to first token for 1, 2, 4 and 8 concurrent clients, of the
batched server against the same server answering one request at a time.

    python -m benchmarks.serve_speed --ckpt checkpoints/chat/best.ckpt
    python -m benchmarks.serve_speed --ckpt checkpoints/chat/best.ckpt --requests 16 --max_batch_size 8

Starts the OpenAI-compatible server (`picogpt serve`) over the checkpoint in a child process on a free port,
twice: with `--max_batch_size 1` (one request at a time, the server before batching) and with batches of
`max_batch_size`. Each sends one warm-up request, then for each number of clients has every client send
`requests` streamed chat requests one after the other. Time to first token is measured from sending a request to receiving its
first piece of answer text; requests/s is all requests of a round over its wall time. Each request has its own
seed, so answers differ but every run sends the same ones. Answers may end before max_tokens at end-of-text,
hence the tokens per answer beside the figures. Ratios are against one client of the same server; the target
of batching is 8 clients at >= 3x one client's requests/s with a median time to first token <= 2x one
client's. Run it on an idle machine: other work shifts every figure.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import torch

from benchmarks.common import machine_line

QUESTIONS = ("What is knowledge?", "Why is a lucky guess not the same as knowing?", "What is courage?",
             "Can a whole society know something that no single member knows?")


def start_server(ckpt: str, port: int, max_batch_size: int, threads: int | None) -> subprocess.Popen:
    """`picogpt serve` in its own session (so that it and anything it starts can be stopped together)."""
    command = [sys.executable, "-m", "picogpt_lightning.cli", "serve", "--ckpt", ckpt, "--port", str(port),
               "--device", "cpu", "--max_batch_size", str(max_batch_size), "--log_level", "warning"]
    if threads is not None:
        command += ["--threads", str(threads)]
    repo_root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([repo_root, os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen(command, env=env, start_new_session=True)


def wait_until_ready(base: str, server: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with status {server.returncode}")
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"the server was not ready after {timeout:.0f} s")


def stop_server(server: subprocess.Popen) -> None:
    server.send_signal(signal.SIGTERM)  # shuts down like Ctrl-C
    try:
        server.wait(timeout=30)
    finally:
        try:
            os.killpg(server.pid, signal.SIGKILL)  # whatever of its session is left
        except ProcessLookupError:
            pass


def streamed_request(base: str, question: str, max_tokens: int, seed: int) -> tuple[float, int]:
    """Seconds to the first piece of answer text, and the answer's tokens, for one streamed request."""
    body = {"messages": [{"role": "user", "content": question}], "max_tokens": max_tokens, "seed": seed,
            "stream": True}
    request = urllib.request.Request(f"{base}/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    first_text, tokens = None, 0
    with urllib.request.urlopen(request, timeout=600) as response:
        for line in response:
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[len(b"data: "):])
            if chunk["choices"][0]["delta"].get("content") and first_text is None:
                first_text = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return (first_text if first_text is not None else time.perf_counter() - start), tokens


def round_of_clients(base: str, clients: int, requests: int, max_tokens: int) -> dict[str, float]:
    """`clients` threads sending `requests` requests each; requests/s, time-to-first-token quantiles."""
    results: list[tuple[float, int]] = []
    lock = threading.Lock()

    def client(index: int) -> None:
        for number in range(requests):
            seed = index * requests + number
            outcome = streamed_request(base, QUESTIONS[seed % len(QUESTIONS)], max_tokens, seed)
            with lock:
                results.append(outcome)

    threads = [threading.Thread(target=client, args=(index,)) for index in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - start
    first = sorted(ttft for ttft, _ in results)
    return {
        "requests_per_second": len(results) / seconds,
        "ttft_median": statistics.median(first),
        "ttft_p90": first[min(len(first) - 1, int(0.9 * len(first)))],
        "tokens_per_answer": statistics.mean(tokens for _, tokens in results),
        "tokens_per_second": sum(tokens for _, tokens in results) / seconds,
    }


def measure(ckpt: str, max_batch_size: int, clients: tuple[int, ...], requests: int, max_tokens: int,
            threads: int | None) -> dict[int, dict[str, float]]:
    """Figures of one server for each number of clients, printed as they come."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    server = start_server(ckpt, port, max_batch_size, threads)
    results = {}
    try:
        wait_until_ready(base, server)
        streamed_request(base, QUESTIONS[0], max_tokens, seed=0)  # warm-up: first calls pay for allocations
        for count in clients:
            figures = results[count] = round_of_clients(base, count, requests, max_tokens)
            one = results[clients[0]]
            print(f"max_batch_size {max_batch_size}, {count} client(s): {figures['requests_per_second']:.2f} "
                  f"requests/s ({figures['requests_per_second'] / one['requests_per_second']:.2f}x), time to first "
                  f"token median {figures['ttft_median'] * 1000:.0f} ms "
                  f"({figures['ttft_median'] / one['ttft_median']:.2f}x; p90 {figures['ttft_p90'] * 1000:.0f} ms), "
                  f"{figures['tokens_per_answer']:.0f} tokens per answer, {figures['tokens_per_second']:.0f} "
                  f"tokens/s in all", flush=True)
    finally:
        stop_server(server)
    return results


def main(
    ckpt: str,
    clients: tuple[int, ...] = (1, 2, 4, 8),
    requests: int = 8,
    max_tokens: int = 64,
    max_batch_size: int = 8,
    threads: int | None = None,
) -> None:
    """Print requests/s and time to first token for each number of concurrent clients, one request at a time
    and batched, then whether batching met its target.

    Args:
        ckpt: Checkpoint to serve (a tiny model shows the server's own overhead best).
        clients: Numbers of concurrent clients, one round each; the first is the reference of the ratios.
        requests: Requests each client sends, one after the other.
        max_tokens: Longest answer per request.
        max_batch_size: The batched server's batch.
        threads: torch threads of the server; null: its default (every core).
    """
    print(f"serving {ckpt} on cpu, {threads or 'default'} thread(s); {requests} streamed requests per client, "
          f"max_tokens {max_tokens}", flush=True)
    print(machine_line(torch.device("cpu")), flush=True)
    measure(ckpt, 1, clients, requests, max_tokens, threads)
    batched = measure(ckpt, max_batch_size, clients, requests, max_tokens, threads)
    one, most = batched[clients[0]], batched[clients[-1]]
    throughput = most["requests_per_second"] / one["requests_per_second"]
    first_token = most["ttft_median"] / one["ttft_median"]
    met = "met" if throughput >= 3 and first_token <= 2 else "NOT met"
    print(f"batched, {clients[-1]} clients against {clients[0]}: {throughput:.2f}x the requests/s (target >= 3x), "
          f"median time to first token {first_token:.2f}x (target <= 2x): {met}", flush=True)


if __name__ == "__main__":
    from jsonargparse import auto_cli

    auto_cli(main, as_positional=False)
