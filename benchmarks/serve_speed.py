"""Serving speed: requests per second and time to first token, for 1 and 8 concurrent clients.

    python -m benchmarks.serve_speed --ckpt checkpoints/tiny/best.ckpt
    python -m benchmarks.serve_speed --ckpt checkpoints/tiny/best.ckpt --workers 2 --requests 16

Starts the OpenAI-compatible server (`picogpt serve`) over the checkpoint in a child process on a free
port, sends one warm-up request, then for each number of clients has every client send `requests` streamed
chat requests one after the other. Time to first token is measured from sending a request to receiving its
first piece of answer text; requests/s is all requests of a round over its wall time. Each request has its own
seed, so answers differ but every run sends the same ones. Answers may end before max_tokens at end-of-text,
hence the tokens per answer beside the figures. Run it on an idle machine: other work shifts every figure.
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


def start_server(ckpt: str, port: int, workers: int, threads: int | None) -> subprocess.Popen:
    """`picogpt serve` in its own session (so that it and its workers can be stopped together)."""
    command = [sys.executable, "-m", "picogpt_lightning.cli", "serve", "--ckpt", ckpt, "--port", str(port),
               "--device", "cpu", "--workers", str(workers), "--log_level", "warning"]
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


def main(
    ckpt: str,
    clients: tuple[int, ...] = (1, 8),
    requests: int = 8,
    max_tokens: int = 64,
    workers: int = 1,
    threads: int | None = None,
) -> None:
    """Print requests/s and time to first token of the server for each number of concurrent clients.

    Args:
        ckpt: Checkpoint to serve (a tiny model shows the server's own overhead best).
        clients: Numbers of concurrent clients, one round each.
        requests: Requests each client sends, one after the other.
        max_tokens: Longest answer per request.
        workers: The server's inference processes.
        threads: torch threads per worker; null: the CPU cores shared out between the workers.
    """
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    print(f"serving {ckpt} on cpu: {workers} worker(s), {threads or 'default'} thread(s) each; "
          f"{requests} streamed requests per client, max_tokens {max_tokens}", flush=True)
    print(machine_line(torch.device("cpu")), flush=True)
    server = start_server(ckpt, port, workers, threads)
    try:
        wait_until_ready(base, server)
        streamed_request(base, QUESTIONS[0], max_tokens, seed=0)  # warm-up: first calls pay for allocations
        for count in clients:
            figures = round_of_clients(base, count, requests, max_tokens)
            print(f"{count} client(s): {figures['requests_per_second']:.2f} requests/s, time to first token "
                  f"median {figures['ttft_median'] * 1000:.0f} ms (p90 {figures['ttft_p90'] * 1000:.0f} ms), "
                  f"{figures['tokens_per_answer']:.0f} tokens per answer, {figures['tokens_per_second']:.0f} "
                  f"tokens/s in all", flush=True)
    finally:
        stop_server(server)


if __name__ == "__main__":
    from jsonargparse import auto_cli

    auto_cli(main, as_positional=False)
