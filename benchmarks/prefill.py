"""Time-to-first-token and peak memory of VLM hosts, alone, with a qfusion plugin, and at the N-token limit.

Hosts are random-weight transformers models sized to the machine (on CPU a 134M-param LLM, hidden
768 × 12 layers, behind a small vision tower; on a GPU the 7B shape in bfloat16):

* ``llava``: ``LlavaForConditionalGeneration``, one 336 px image = 576 vision tokens; the plugin
  reads the vision tower's features, as in the paper, where it takes the place of LLaVA's projector;
* ``qwen2_5_vl``: ``Qwen2_5_VLForConditionalGeneration`` with an image (672 px: 576 merged tokens)
  and a video (32 frames of 336 px: 16 × 12 × 12 = 2,304 merged tokens); the plugin reads the
  features after the patch merger, and its fused tokens take the M-RoPE positions of the rule in docs/hosts.md.

The plugin is sized in the paper's proportion to its LLM (~4 % of the LLM's parameters outside the
embedding tables: hidden 256 × 4 layers here, the paper's hidden 1024 × 20 layers on the GPU).
Time-to-first-token is the wall time of ``generate(max_new_tokens=1)``: vision encoder, fusion and
LLM prefill, as a user sees it. Cases per host and visual input, N ∈ ``--tokens``:

* ``host``: the host alone with all its vision tokens;
* ``limit``: the host's own vision encoder, then its LLM fed only the first N of the vision tokens
  in their place — a compressor that costs nothing, the physical limit of any N-token method that
  reads the pixels (``ratio_to_limit`` = limit TTFT / case TTFT, i.e. the share of the limit's
  speed-up a case reaches);
* ``qfusion``: the plugin with N = m fused tokens (LLaVA also with 4 questions, n = max(1, N/4));
* follow-ups (question, answer, new question): the host recomputes everything; the plugin with
  ``FusionCache`` only asks the new question (no vision encoder, no new vision prefix); its limit is
  the LLM prefill of the same m + n tokens without any vision work.

Every case is timed in ``--rounds`` rounds that go through all cases in turn (after a warm-up round),
so that other work on the machine disturbs all of them alike; TTFT is the best round (the median is
in the JSON too); speed-ups are against the host with the same questions and visual input.

Peak memory is the rise of the process's peak RSS during the call on CPU (``/proc/self/status``
VmHWM, reset before each call) and of ``torch.cuda.max_memory_allocated`` on a GPU.

    python benchmarks/prefill.py [--hosts llava,qwen2_5_vl] [--size auto|cpu|7b] [--rounds 3] [--tokens 1,16,64]
    python benchmarks/prefill.py --table benchmarks/results/prefill-cpu.json   # the table in docs/kernels.md
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import platform
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

import qfusion
from qfusion import FusionConfig, QuestionFusion
from qfusion.adapters import FusionCache
from qfusion.files import write_json

VOCAB = 32064
IMAGE_TOKEN_ID, VIDEO_TOKEN_ID, VISION_START, VISION_END = 32000, 32001, 32002, 32003
LLM_SHAPES = {
    "cpu": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                num_key_value_heads=12),
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32),
}
VISION_SHAPES = {
    "cpu": dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4),
    "7b": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16),
}
FUSION_SHAPES = {
    "cpu": dict(hidden_size=256, num_layers=4, num_heads=4, intermediate_size=704),
    "7b": dict(hidden_size=1024, num_layers=20, num_heads=16, intermediate_size=2816),
}
PREFIX, QUESTION, ANSWER, SUFFIX = 20, 24, 8, 6  # text tokens: template, each question, each answer, turn end


class Memory:
    """Peak memory rise during a call: CUDA allocator peak, or the process's peak RSS on CPU."""

    def __init__(self, device: str):
        self.device = device
        self._libc = ctypes.CDLL("libc.so.6") if device == "cpu" and platform.system() == "Linux" else None

    @staticmethod
    def _status(key: str) -> int:
        return int(re.search(rf"{key}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024

    def start(self) -> None:
        gc.collect()
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
        elif self._libc is not None:
            self._libc.malloc_trim(0)
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            self._base = self._status("VmRSS")

    def peak(self) -> float | None:
        """MiB above the level at start()."""
        if self.device == "cuda":
            torch.cuda.synchronize()
            return (torch.cuda.max_memory_allocated() - self._base) / 2**20
        if self._libc is None:
            return None
        return (self._status("VmHWM") - self._base) / 2**20


def random_ids(count: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(3, IMAGE_TOKEN_ID, (count,), generator=generator)


class Prompts:
    """Token layouts of the benchmark cases (batch of one): per question a placeholder run, then its text.

    token: the placeholder id; wrap: whether each run stands between vision start / end tokens (Qwen).
    """

    def __init__(self, token: int = IMAGE_TOKEN_ID, wrap: bool = False, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.token, self.wrap = token, wrap
        self.prefix, self.suffix = random_ids(PREFIX, gen), random_ids(SUFFIX, gen)
        self.questions = [random_ids(QUESTION, gen) for _ in range(4)]
        self.answer = random_ids(ANSWER, gen)

    def _run(self, count: int) -> list[torch.Tensor]:
        run = torch.full((count,), self.token)
        return [torch.tensor([VISION_START]), run, torch.tensor([VISION_END])] if self.wrap else [run]

    def ids(self, runs: list[int], follow_up: bool = False) -> dict[str, torch.Tensor]:
        """[bos | prefix | run_0, question 0 | (answer) | run_1, question 1 | ... | suffix]."""
        turns = self.questions[: max(len(runs), 2 if follow_up else 1)]
        parts = [torch.tensor([1]), self.prefix]
        for g, turn in enumerate(turns):
            if g == 1 and follow_up:
                parts.append(self.answer)
            if g < len(runs):
                parts += self._run(runs[g])
            parts.append(turn)
        parts.append(self.suffix)
        ids = torch.cat(parts)[None]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def questions_tensor(self, count: int) -> dict[str, torch.Tensor]:
        ids = torch.stack(self.questions[:count])[None]
        return {"qfusion_input_ids": ids, "qfusion_attention_mask": torch.ones_like(ids)}


@dataclass
class Visual:
    """One visual input of a host: its host inputs, how many vision tokens it has, how the host encodes it."""

    name: str
    tokens: int
    pixels: dict  # the host's pixel inputs (pixel_values and grids)
    encode: Callable[[], torch.Tensor]  # () -> (tokens, hidden) the host's vision features, as its LLM gets them
    prompts: Prompts
    mm: Callable[[list[int]], dict]  # placeholder runs -> the host's extra inputs for those runs (Qwen: grids, types)
    key: str = "image"  # mm_encoder_outputs key


@dataclass
class Case:
    """One measured configuration: a () -> None call to time, and an untimed set-up run before it."""

    host: str
    visual: str
    name: str
    questions: int
    tokens: int
    llm_tokens: int
    call: Callable[[], None]
    setup: Callable[[], None] | None = None
    times: list = field(default_factory=list)
    peaks: list = field(default_factory=list)


SETTINGS = {"max_new_tokens": 1, "do_sample": False, "pad_token_id": 0}


def build_llava(size: str, device: str, dtype: torch.dtype):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(image_size=336, patch_size=14, projection_dim=VISION_SHAPES[size]["hidden_size"],
                              **VISION_SHAPES[size])
    llm = LlamaConfig(vocab_size=VOCAB, max_position_embeddings=4096, bos_token_id=1, eos_token_id=2,
                      pad_token_id=0, **LLM_SHAPES[size])
    config = LlavaConfig(vision_config=vision, text_config=llm, image_token_id=IMAGE_TOKEN_ID,
                         vision_feature_layer=-2, vision_feature_select_strategy="default")
    torch.manual_seed(0)
    with torch.device(device):
        model = LlavaForConditionalGeneration._from_config(config, dtype=dtype).eval()
    pixels = {"pixel_values": torch.randn(1, 3, 336, 336, generator=torch.Generator().manual_seed(0)).to(device, dtype)}

    def encode():
        return model.model.get_image_features(**pixels, return_dict=True).pooler_output[0]

    visual = Visual("image", 576, pixels, encode, Prompts(), lambda runs: {})
    return model, [visual], {"vision_source": "tower"}, model.config.vision_config.hidden_size


def build_qwen2_5_vl(size: str, device: str, dtype: torch.dtype):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    shape = VISION_SHAPES[size]
    llm = LLM_SHAPES[size]
    head_dim = llm["hidden_size"] // llm["num_attention_heads"]
    vision = dict(depth=shape["num_hidden_layers"] * 2, hidden_size=shape["hidden_size"],
                  intermediate_size=shape["intermediate_size"], num_heads=shape["num_attention_heads"],
                  out_hidden_size=llm["hidden_size"], patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                  window_size=112, fullatt_block_indexes=[shape["num_hidden_layers"] * 2 - 1])
    text = dict(vocab_size=VOCAB, max_position_embeddings=32768, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                 "mrope_section": [head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16]},
                **llm)
    config = Qwen2_5_VLConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN_ID,
                              video_token_id=VIDEO_TOKEN_ID, vision_start_token_id=VISION_START,
                              vision_end_token_id=VISION_END)
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=dtype).eval()
    gen = torch.Generator().manual_seed(0)

    def patches(grid):
        return torch.randn(grid[0] * grid[1] * grid[2], 3 * 2 * 14 * 14, generator=gen).to(device, dtype)

    image_grid, video_grid = [1, 48, 48], [16, 24, 24]  # 672 px image; 32 frames of 336 px
    image = {"pixel_values": patches(image_grid), "image_grid_thw": torch.tensor([image_grid], device=device)}
    video = {"pixel_values_videos": patches(video_grid), "video_grid_thw": torch.tensor([video_grid], device=device)}

    def mm(token: int, grid_key: str):
        def extra(runs: list[int]) -> dict:  # what the host's processor returns beside the ids, for these runs
            return {grid_key: torch.tensor([[1, 2, 2 * k] for k in runs], device=device)}
        return extra

    def encode_image():
        return model.model.get_image_features(**image, return_dict=True).pooler_output[0]

    def encode_video():
        return model.model.get_video_features(**video, return_dict=True).pooler_output[0]

    visuals = [Visual("image", 576, image, encode_image, Prompts(IMAGE_TOKEN_ID, wrap=True),
                      mm(IMAGE_TOKEN_ID, "image_grid_thw")),
               Visual("video", 2304, video, encode_video, Prompts(VIDEO_TOKEN_ID, wrap=True),
                      mm(VIDEO_TOKEN_ID, "video_grid_thw"), key="video")]
    return model, visuals, {"vision_source": "merger"}, llm["hidden_size"]


HOSTS = {"llava": build_llava, "qwen2_5_vl": build_qwen2_5_vl}


def token_types(ids: torch.Tensor) -> torch.Tensor:
    return (ids == IMAGE_TOKEN_ID).int() + 2 * (ids == VIDEO_TOKEN_ID).int()


def host_cases(host: str, model, visual: Visual, fusion_for: Callable[[int, int], QuestionFusion],
               options: dict, budgets: list[int], many_questions: bool) -> list[Case]:
    """The cases of one host and visual input (see the module docstring)."""
    device = model.device
    qwen = visual.prompts.wrap

    def on_device(inputs: dict) -> dict:
        inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        if qwen:
            inputs["mm_token_type_ids"] = token_types(inputs["input_ids"])
        return inputs

    def generate(inputs: dict, **extra) -> Callable[[], None]:
        return lambda: model.generate(**inputs, **extra, **SETTINGS)

    def attached(fusion: QuestionFusion, call: Callable[[], None]) -> Callable[[], None]:
        def run():
            qfusion.attach(model, fusion, **options)
            try:
                call()
            finally:
                qfusion.detach(model)
        return run

    def limit(runs: list[int], follow_up: bool, with_vision: bool) -> Callable[[], None]:
        inputs = on_device(dict(visual.prompts.ids(runs, follow_up), **visual.mm(runs)))
        cached = visual.encode() if not with_vision else None

        def run():
            features = visual.encode() if with_vision else cached  # a free compressor: the first rows
            pieces, start = [], 0
            for k in runs:
                pieces.append(features[start: start + k])
                start += k
            outputs = {visual.key: BaseModelOutputWithPooling(pooler_output=pieces if qwen else [torch.cat(pieces)])}
            model.generate(**inputs, mm_encoder_outputs=outputs, **SETTINGS)
        return run

    groups = (1, 4) if many_questions else (1,)
    cases = []
    for g in groups:
        inputs = on_device(dict(visual.prompts.ids([visual.tokens] + [0] * (g - 1)), **visual.pixels))
        cases.append(Case(host, visual.name, "host", g, visual.tokens, inputs["input_ids"].shape[1], generate(inputs)))
    follow = on_device(dict(visual.prompts.ids([visual.tokens], follow_up=True), **visual.pixels))
    cases.append(Case(host, visual.name, "host follow-up", 2, visual.tokens, follow["input_ids"].shape[1],
                      generate(follow)))
    for tokens in budgets:
        for g in groups:
            m, n = tokens, max(1, tokens // 4)
            runs = [m] + [n] * (g - 1)
            fusion = fusion_for(m, n)
            fused = on_device(dict(visual.prompts.ids(runs), **visual.pixels, **visual.prompts.questions_tensor(g)))
            length = fused["input_ids"].shape[1]
            cases.append(Case(host, visual.name, "limit", g, tokens, length, limit(runs, False, True)))
            cases.append(Case(host, visual.name, "qfusion", g, tokens, length, attached(fusion, generate(fused))))
        m, n = tokens, max(1, tokens // 4)
        fusion = fusion_for(m, n)
        first = on_device(dict(visual.prompts.ids([m]), **visual.pixels, **visual.prompts.questions_tensor(1)))
        second = on_device(dict(visual.prompts.ids([m, n], follow_up=True), **visual.prompts.questions_tensor(2)))
        cache = FusionCache()

        def fill(first=first, cache=cache, fusion=fusion):
            cache.clear()
            attached(fusion, generate(first, qfusion_cache=cache))()

        length = second["input_ids"].shape[1]
        cases.append(Case(host, visual.name, "limit follow-up", 2, tokens, length, limit([m, n], True, False)))
        cases.append(Case(host, visual.name, "qfusion follow-up, cached", 2, tokens, length,
                          attached(fusion, generate(second, qfusion_cache=cache)), setup=fill))
    return cases


def measure(cases: list[Case], rounds: int, memory: Memory, device: str) -> None:
    with torch.inference_mode():
        for r in range(rounds + 1):  # round 0 warms up and is not recorded
            for case in cases:
                if case.setup is not None:
                    case.setup()
                memory.start()
                start = time.perf_counter()
                case.call()
                if device == "cuda":
                    torch.cuda.synchronize()
                if r:
                    case.times.append(time.perf_counter() - start)
                    case.peaks.append(memory.peak())


def rows_of(cases: list[Case]) -> list[dict]:
    """One row per case with its speed-up against the host and its ratio to the limit."""
    best = {(c.host, c.visual, c.name, c.questions, c.tokens): min(c.times) for c in cases}
    host_tokens = {(c.host, c.visual): c.tokens for c in cases if c.name == "host"}
    rows = []
    for c in cases:
        follow = "follow-up" in c.name
        host = best[c.host, c.visual, "host follow-up" if follow else "host", c.questions,
                    host_tokens[c.host, c.visual]]
        limit = best.get((c.host, c.visual, "limit follow-up" if follow else "limit", c.questions, c.tokens))
        ttft = min(c.times)
        rows.append({"host": c.host, "visual": c.visual, "case": c.name, "questions": c.questions, "N": c.tokens,
                     "llm_tokens": int(c.llm_tokens), "ttft_s": ttft, "ttft_median_s": statistics.median(c.times),
                     "peak_mib": None if c.peaks[0] is None else max(c.peaks), "speedup": host / ttft,
                     "ratio_to_limit": None if c.name.startswith(("host", "limit")) or limit is None else limit / ttft})
    return rows


def markdown_table(result: dict) -> str:
    """The table in docs/kernels.md of a result: one line per case."""
    lines = ["| host | visual | case | G | N | LLM tokens | TTFT (s) | peak MiB | speed-up | of the limit's |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in result["rows"]:
        peak = "n/a" if row["peak_mib"] is None else f"{row['peak_mib']:.0f}"
        ratio = "" if row["ratio_to_limit"] is None else f"{100 * row['ratio_to_limit']:.0f} %"
        lines.append(f"| {row['host']} | {row['visual']} | {row['case']} | {row['questions']} | {row['N']} | "
                     f"{row['llm_tokens']} | "
                     f"{row['ttft_s']:.3f} | {peak} | {row['speedup']:.2f}× | {ratio} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", default="llava,qwen2_5_vl", help=f"comma-separated, from {sorted(HOSTS)}")
    parser.add_argument("--size", choices=("auto", "cpu", "7b"), default="auto",
                        help="model shape (auto: 7b on a GPU, the ~0.1B shape on CPU)")
    parser.add_argument("--tokens", default="1,16,64", help="fused-token budgets N = m")
    parser.add_argument("--rounds", type=int, default=3, help="timed calls per case, interleaved across cases")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/prefill-<device>.json)")
    parser.add_argument("--table", default=None, help="print the markdown table of a result JSON and exit")
    args = parser.parse_args(argv)
    if args.table:
        result = json.loads(Path(args.table).read_text())
        print(markdown_table(result))
        return result

    device = "cuda" if torch.cuda.is_available() else "cpu"
    size = ("7b" if device == "cuda" else "cpu") if args.size == "auto" else args.size
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    memory = Memory(device)
    budgets = [int(t) for t in args.tokens.split(",")]
    rows, hosts = [], {}
    for name in args.hosts.split(","):
        model, visuals, options, vision_dim = HOSTS[name](size, device, dtype)
        hidden = model.config.text_config.hidden_size
        fusions: dict = {}

        def fusion_for(m: int, n: int) -> QuestionFusion:
            if (m, n) not in fusions:
                torch.manual_seed(0)
                config = FusionConfig(vision_dim=vision_dim, output_dim=hidden, text_vocab_size=VOCAB, m=m, n=n,
                                      codebook_size=max(768, m), **FUSION_SHAPES[size])
                fusions[m, n] = QuestionFusion(config).to(device=device, dtype=dtype).eval()
            return fusions[m, n]

        cases = [case for visual in visuals
                 for case in host_cases(name, model, visual, fusion_for, options, budgets, name == "llava")]
        llm = model.model.language_model
        llm_params = sum(p.numel() for p in llm.parameters()) + model.lm_head.weight.numel()
        llm_compute = llm_params - model.lm_head.weight.numel() - model.get_input_embeddings().weight.numel()
        fusion = fusion_for(budgets[0], max(1, budgets[0] // 4))
        fusion_params = sum(p.numel() for p in fusion.parameters())
        hosts[name] = {"llm_params": llm_params, "llm_params_outside_embeddings": llm_compute,
                       "fusion_params": fusion_params,
                       "fusion_params_outside_embeddings":
                           fusion_params - fusion.text_embed.weight.numel() - fusion.codebook.weight.numel(),
                       "vision_source": options["vision_source"],
                       "vision_tokens": {v.name: v.tokens for v in visuals}}
        print(f"{name}: LLM {llm_params / 1e6:.0f}M params ({llm_compute / 1e6:.0f}M outside its embeddings), "
              f"vision tokens {hosts[name]['vision_tokens']}; plugin {fusion_params / 1e6:.1f}M params; "
              f"{device} {dtype}, {torch.get_num_threads()} threads", flush=True)
        measure(cases, args.rounds, memory, device)
        rows += rows_of(cases)
        del model, cases, fusions
        gc.collect()

    print(f"{'host':<11} {'visual':<6} {'case':<26} {'G':>2} {'N':>5} {'tokens':>6} {'TTFT (s)':>9} "
          f"{'peak MiB':>8} {'speedup':>8} {'of limit':>8}")
    for row in rows:
        peak = "     n/a" if row["peak_mib"] is None else f"{row['peak_mib']:8.1f}"
        ratio = "" if row["ratio_to_limit"] is None else f"{100 * row['ratio_to_limit']:7.0f}%"
        print(f"{row['host']:<11} {row['visual']:<6} {row['case']:<26} {row['questions']:>2} {row['N']:>5} "
              f"{row['llm_tokens']:>6} {row['ttft_s']:>9.3f} {peak} {row['speedup']:>7.2f}x {ratio:>8}")
    result = {
        "device": torch.cuda.get_device_name() if device == "cuda"
        else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "dtype": str(dtype), "size": size, "hosts": hosts,
        "text_tokens": {"prefix": PREFIX, "question": QUESTION, "answer": ANSWER, "suffix": SUFFIX},
        "n_rule": "n = max(1, N // 4)", "rounds": args.rounds, "timing": "best of interleaved rounds",
        "limit": "the host's vision encoder, then its LLM fed the first N vision tokens in their place (follow-up: "
                 "the LLM prefill alone)",
        "rows": rows,
    }
    out = Path(args.out or Path(__file__).parent / "results" / f"prefill-{device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(result, out)
    print(f"written {out}")
    return result


if __name__ == "__main__":
    main()
