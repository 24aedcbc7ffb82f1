"""Time-to-first-token and peak memory of a LLaVA-shaped host, alone and with a qfusion plugin attached.

The host is a random-weight ``LlavaForConditionalGeneration`` sized to the machine: on CPU a
134M-param Llama LLM (hidden 768, 12 layers) behind a small CLIP tower producing 576 vision tokens
(336 px, patch 14); on a GPU the 7B shape (CLIP ViT-L/14-336, Llama-2-7B) in bfloat16. The plugin is
sized in the paper's proportion to its LLM (~4 % of the LLM's parameters outside the embedding
tables: 256M for Llama-2-7B's 6.5B in the paper; hidden 256 × 4 layers here, the paper's hidden
1024 × 20 layers on the GPU) and reads the vision tower's features, as in the paper, where it takes
the place of LLaVA's projector. Time-to-first-token is the wall time of ``generate(max_new_tokens=1)``:
vision tower, fusion and LLM prefill, as a user sees it. Cases, each with one image:

* 1 and 4 questions in one prompt: the host's 576 vision tokens against N = m fused tokens before
  the first question and n = max(1, N/4) before each later one (N ∈ {1, 16, 64, 256});
* a follow-up turn (question, answer, new question): the host recomputes everything; the plugin
  without a cache recomputes the vision tower and the fusion; with ``FusionCache`` the fusion only
  asks the new question (the LLM prefills the conversation in every case).

Every case is timed in ``--rounds`` rounds that go through all cases in turn (after a warm-up round),
so that other work on the machine disturbs all of them alike; TTFT is the best round (the median is
in the JSON too); speed-ups are against the host with the same questions.

Peak memory is the rise of the process's peak RSS during the call on CPU (``/proc/self/status``
VmHWM, reset before each call) and of ``torch.cuda.max_memory_allocated`` on a GPU.

    python benchmarks/prefill.py [--size auto|cpu|7b] [--rounds 5] [--tokens 1,16,64,256]
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

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

import qfusion
from qfusion import FusionConfig, QuestionFusion
from qfusion.adapters import FusionCache

IMAGE_TOKEN_ID = 32000
VOCAB = 32064
SHAPES = {
    "cpu": dict(
        vision=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4),
        llm=dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                 num_key_value_heads=12),
        fusion=dict(hidden_size=256, num_layers=4, num_heads=4, intermediate_size=704),
    ),
    "7b": dict(
        vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16),
        llm=dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32),
        fusion=dict(hidden_size=1024, num_layers=20, num_heads=16, intermediate_size=2816),
    ),
}
VISION_SOURCE = "tower"  # the fusion reads the vision tower's features, as in the paper (it replaces the projector)
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


def build_host(size: str, device: str, dtype: torch.dtype) -> LlavaForConditionalGeneration:
    shape = SHAPES[size]
    vision = CLIPVisionConfig(image_size=336, patch_size=14, projection_dim=shape["vision"]["hidden_size"],
                              **shape["vision"])
    llm = LlamaConfig(vocab_size=VOCAB, max_position_embeddings=4096, bos_token_id=1, eos_token_id=2,
                      pad_token_id=0, **shape["llm"])
    config = LlavaConfig(vision_config=vision, text_config=llm, image_token_id=IMAGE_TOKEN_ID,
                         vision_feature_layer=-2, vision_feature_select_strategy="default")
    torch.manual_seed(0)
    with torch.device(device):
        model = LlavaForConditionalGeneration._from_config(config, dtype=dtype)
    return model.eval()


def random_ids(count: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(3, IMAGE_TOKEN_ID, (count,), generator=generator)


class Prompts:
    """Token layouts of the benchmark cases (one image, batch of one)."""

    def __init__(self, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.prefix, self.suffix = random_ids(PREFIX, gen), random_ids(SUFFIX, gen)
        self.questions = [random_ids(QUESTION, gen) for _ in range(4)]
        self.answer = random_ids(ANSWER, gen)

    def _ids(self, image_runs: list[int], turns: list[torch.Tensor]) -> torch.Tensor:
        """[prefix | run_0 image tokens, turn 0 | run_1, turn 1 | ... | suffix]; turns without a run follow on."""
        parts = [torch.tensor([1]), self.prefix]
        for g, turn in enumerate(turns):
            if g < len(image_runs) and image_runs[g]:
                parts.append(torch.full((image_runs[g],), IMAGE_TOKEN_ID))
            parts.append(turn)
        parts.append(self.suffix)
        return torch.cat(parts)[None]

    def questions_tensor(self, questions: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        ids = torch.stack(questions)[None]
        return {"qfusion_input_ids": ids, "qfusion_attention_mask": torch.ones_like(ids)}

    def host(self, num_questions: int, vision_tokens: int) -> dict[str, torch.Tensor]:
        ids = self._ids([vision_tokens], self.questions[:num_questions])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def fused(self, num_questions: int, m: int, n: int) -> dict[str, torch.Tensor]:
        ids = self._ids([m] + [n] * (num_questions - 1), self.questions[:num_questions])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                **self.questions_tensor(self.questions[:num_questions])}

    def follow_up_host(self, vision_tokens: int) -> dict[str, torch.Tensor]:
        turns = [self.questions[0], torch.cat([self.answer, self.questions[1]])]
        ids = self._ids([vision_tokens], turns)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def follow_up(self, m: int, n: int, turn: int) -> dict[str, torch.Tensor]:
        """Turn 1 (the first question) or turn 2 (question, answer, follow-up)."""
        if turn == 1:
            return self.fused(1, m, n)
        parts = [torch.tensor([1]), self.prefix, torch.full((m,), IMAGE_TOKEN_ID), self.questions[0], self.answer,
                 torch.full((n,), IMAGE_TOKEN_ID), self.questions[1], self.suffix]
        ids = torch.cat(parts)[None]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                **self.questions_tensor(self.questions[:2])}


@dataclass
class Case:
    """One measured configuration: its inputs, the plugin attached for it (None: the host) and an
    untimed set-up run before each call (the first turn that fills a FusionCache)."""

    name: str
    questions: int
    tokens: int
    inputs: dict
    fusion: QuestionFusion | None = None
    fill_cache: dict | None = None
    times: list = field(default_factory=list)
    peaks: list = field(default_factory=list)


def run_once(model, case: Case, pixels: torch.Tensor, memory: Memory) -> None:
    """Time generate(max_new_tokens=1) once for a case and record its peak memory rise."""
    device = pixels.device
    settings = {"max_new_tokens": 1, "do_sample": False, "pad_token_id": 0}
    if case.fusion is not None:
        qfusion.attach(model, case.fusion, vision_source=VISION_SOURCE)
    extra, images = {}, pixels
    if case.fill_cache is not None:
        cache = FusionCache()
        model.generate(**case.fill_cache, pixel_values=pixels, qfusion_cache=cache, **settings)
        extra, images = {"qfusion_cache": cache}, None  # the follow-up sends no image: the cache holds it
    memory.start()
    start = time.perf_counter()
    model.generate(**case.inputs, **extra, pixel_values=images, **settings)
    if device.type == "cuda":
        torch.cuda.synchronize()
    case.times.append(time.perf_counter() - start)
    case.peaks.append(memory.peak())
    if case.fusion is not None:
        qfusion.detach(model)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("auto", "cpu", "7b"), default="auto",
                        help="model shape (auto: 7b on a GPU, the ~0.1B shape on CPU)")
    parser.add_argument("--tokens", default="1,16,64,256", help="fused-token budgets N = m")
    parser.add_argument("--rounds", type=int, default=5, help="timed calls per case, interleaved across cases")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/prefill-<device>.json)")
    args = parser.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    size = ("7b" if device == "cuda" else "cpu") if args.size == "auto" else args.size
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = build_host(size, device, dtype)
    memory = Memory(device)
    llm_params = sum(p.numel() for p in model.model.language_model.parameters()) + model.lm_head.weight.numel()
    llm_compute_params = llm_params - model.lm_head.weight.numel() - model.get_input_embeddings().weight.numel()
    vision_tokens = (336 // 14) ** 2
    pixels = torch.randn(1, 3, 336, 336, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    prompts = Prompts()

    def on_device(inputs: dict) -> dict:
        return {k: v.to(device) for k, v in inputs.items()}

    cases = [Case("host", g, vision_tokens, on_device(prompts.host(g, vision_tokens))) for g in (1, 4)]
    cases.append(Case("host follow-up", 2, vision_tokens, on_device(prompts.follow_up_host(vision_tokens))))
    fusion_params = fusion_compute_params = None
    vision_dim, hidden = model.config.vision_config.hidden_size, model.config.text_config.hidden_size
    for tokens in (int(t) for t in args.tokens.split(",")):
        m, n = tokens, max(1, tokens // 4)
        torch.manual_seed(0)
        fusion = QuestionFusion(FusionConfig(vision_dim=vision_dim, output_dim=hidden,
                                             text_vocab_size=VOCAB, m=m, n=n, codebook_size=max(768, m),
                                             **SHAPES[size]["fusion"])).to(device=device, dtype=dtype).eval()
        fusion_params = sum(p.numel() for p in fusion.parameters())
        fusion_compute_params = fusion_params - fusion.text_embed.weight.numel() - fusion.codebook.weight.numel()
        follow = on_device(prompts.follow_up(m, n, 2))
        cases += [Case("qfusion", g, tokens, on_device(prompts.fused(g, m, n)), fusion) for g in (1, 4)]
        cases += [Case("qfusion follow-up, no cache", 2, tokens, follow, fusion),
                  Case("qfusion follow-up, cached", 2, tokens, follow, fusion,
                       fill_cache=on_device(prompts.follow_up(m, n, 1)))]

    print(f"host: LLaVA-shaped, LLM {llm_params / 1e6:.0f}M params ({llm_compute_params / 1e6:.0f}M outside its "
          f"embeddings), {vision_tokens} vision tokens; plugin {fusion_params / 1e6:.1f}M params "
          f"({fusion_compute_params / 1e6:.1f}M outside its embedding tables), vision_source={VISION_SOURCE!r}; "
          f"{device} {dtype}, {torch.get_num_threads()} threads; best of {args.rounds} interleaved rounds", flush=True)
    with torch.inference_mode():
        for case in cases:  # warm-up, not recorded
            run_once(model, case, pixels, memory)
            case.times.clear()
            case.peaks.clear()
        for _ in range(args.rounds):
            for case in cases:
                run_once(model, case, pixels, memory)

    hosts = {(c.questions, c.name.endswith("follow-up")): min(c.times) for c in cases if c.fusion is None}
    rows = []
    print(f"{'case':<30} {'G':>3} {'N':>5} {'tokens':>6} {'TTFT (s)':>9} {'peak MiB':>8} {'speedup':>8}")
    for case in cases:
        host = hosts[(case.questions, "follow-up" in case.name)]
        row = {"case": case.name, "questions": case.questions, "N": case.tokens,
               "llm_tokens": int(case.inputs["input_ids"].shape[1]), "ttft_s": min(case.times),
               "ttft_median_s": statistics.median(case.times),
               "peak_mib": None if case.peaks[0] is None else max(case.peaks), "speedup": host / min(case.times)}
        rows.append(row)
        peak = "     n/a" if row["peak_mib"] is None else f"{row['peak_mib']:8.1f}"
        print(f"{row['case']:<30} {row['questions']:>3} {row['N']:>5} {row['llm_tokens']:>6} {row['ttft_s']:>9.3f} "
              f"{peak} {row['speedup']:>7.2f}x")

    result = {
        "device": torch.cuda.get_device_name() if device == "cuda"
        else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "dtype": str(dtype), "size": size, "llm_params": llm_params,
        "llm_params_outside_embeddings": llm_compute_params,
        "fusion_params": fusion_params, "fusion_params_outside_embeddings": fusion_compute_params,
        "vision_source": VISION_SOURCE,
        "vision_tokens": vision_tokens, "text_tokens": {"prefix": PREFIX, "question": QUESTION, "answer": ANSWER,
                                                        "suffix": SUFFIX},
        "n_rule": "n = max(1, N // 4)", "rounds": args.rounds, "timing": "best of interleaved rounds", "rows": rows,
    }
    out = Path(args.out or Path(__file__).parent / "results" / f"prefill-{device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"written {out}")
    return result


if __name__ == "__main__":
    main()
