"""Time to first token of 7B-shaped VLM hosts, alone and with a paper-sized plugin, through the hosts' own parts.

Stage S6 of ``gpu_validate.py``: the absolute numbers a user would quote for one image and one
question, batch 1. Hosts are random-weight transformers models built from their configs (nothing
is downloaded), in the shapes users run:

* ``llava`` — LLaVA-1.5-7B: CLIP ViT-L/14 at 336 px (576 vision tokens: the second-to-last layer
  without its CLS token), the 2-layer GELU projector, a Llama-2-7B-shaped LLM (hidden 4096,
  32 layers, 32 heads, MLP 11008, vocabulary 32064);
* ``qwen2_5_vl`` — Qwen2.5-VL-7B: its vision tower (32 blocks of hidden 1280, windowed attention,
  4 full-attention blocks) and patch merger, a Qwen2-7B-shaped LLM (hidden 3584, 28 layers, 28
  heads / 4 KV heads, MLP 18944, vocabulary 152064, M-RoPE); one 896 px image = 1,024 merged tokens.

The plugin has the paper's size: hidden 1024, 20 layers, 16 heads, MLP 2816 (257M parameters in
its layers, about 262M with its input and output projections; its question vocabulary is the CLIP
tokenizer's, 49,408 ids; the counts are recorded per host). It reads what
``qfusion.attach`` has it read on these hosts: LLaVA's tower features (it takes the projector's
place, as in the paper) and Qwen's merged features. Its attention implementation is the caller's
choice (``gpu_validate.py --ttft-fusion-impl``, default ``sdpa``: under the paper's causal mask a
full forward runs SDPA's causal kernel, with nothing to compile inside a short visit); the one that
ran is recorded.

**Why the hosts' submodules and not ``qfusion.attach`` + ``generate``.** The GPU image has
transformers 5.17, below qfusion's floor (5.18, where ``attach`` refuses to patch), and nothing
can be installed there. Carrying wheels of a newer transformers in the working tree would also
mean carrying whatever of its dependencies the image holds in other versions, and installing them
at the start of every visit, inside the same few minutes. The time of a first token is spent in the
host's own modules either way, and those are stable across 5.x: so each call runs them directly —

1. vision: the host's tower (LLaVA: ``vision_tower``, then ``multi_modal_projector`` for the host
   alone; Qwen: ``visual`` with its merger);
2. fusion (plugin cases): ``QuestionFusion`` over those features and the question, N fused tokens;
3. LLM: the host's token embedding, the vision (or N fused) tokens in the placeholder run, the
   host's position rule (Qwen: its own ``get_rope_index``, with a grid of 1 × N merged patches for
   the fused run, the rule ``qfusion.attach`` uses), ``language_model`` over the prompt with a KV
   cache, ``lm_head`` at the last position, argmax, and the token id on the host.

What ``generate`` adds around this (input preparation, logits processors, stopping checks) is not
timed. The attention of every host module is the host's ``sdpa`` (on a GPU, SDPA runs its
FlashAttention kernel for the causal prefill); the implementation the config names is recorded.

Models are built on their device under ``torch.device`` in their dtype (the hosts' own constructors
compute their rotary buffers, and the random initialisation runs where the weights live, with no
host-side copy of 7B weights); the build time is recorded. Each case is called twice to warm up
(compilation, allocator), then timed in ``rounds`` rounds that go through all cases of a host in
turn; TTFT is the median round (the best is recorded too), and the parts are CUDA-event spans of
the same calls (``perf_counter`` on the CPU). Prompts: a chat-template prefix, the vision run, a
24-token question and the turn's end (``TEXT_TOKENS``).
"""

from __future__ import annotations

import gc
import statistics
import time
from typing import Callable

import torch

HOSTS = ("llava", "qwen2_5_vl")
TEXT_TOKENS = {"prefix": 20, "question": 24, "suffix": 6}

LLAVA = {
    "7b": dict(vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                           image_size=336, patch_size=14, projection_dim=768),
               text=dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5),
               image_token_id=32000),
    "smoke": dict(vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                              image_size=56, patch_size=14, projection_dim=32),
                  text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=4, vocab_size=1024, max_position_embeddings=512, rms_norm_eps=1e-5),
                  image_token_id=1000),
}
QWEN2_5_VL = {
    "7b": dict(vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                           fullatt_block_indexes=[7, 15, 23, 31]),
               text=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                         num_key_value_heads=4, vocab_size=152064, max_position_embeddings=128000,
                         rms_norm_eps=1e-6, rope_theta=1e6),
               grid=(1, 64, 64), image_token_id=151655, vision_start_token_id=151652, vision_end_token_id=151653),
    "smoke": dict(vision=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                              patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                              fullatt_block_indexes=[1]),
                  text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=1024, max_position_embeddings=512, rms_norm_eps=1e-6,
                            rope_theta=1e6),
                  grid=(1, 8, 8), image_token_id=1000, vision_start_token_id=1001, vision_end_token_id=1002),
}
FUSION = {
    "7b": dict(hidden_size=1024, num_layers=20, num_heads=16, intermediate_size=2816, text_vocab_size=49408),
    "smoke": dict(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, text_vocab_size=1024),
}
TOKENS = {"7b": (64, 16), "smoke": (8, 4)}
"""The fused-token budgets N (= m, one question) timed per size."""


class Clock:
    """Part boundaries of one call: CUDA events on a GPU (no synchronisation between parts), else wall time."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.marks: list = []

    def mark(self) -> None:
        """Record a boundary on the current stream (or now)."""
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def spans_ms(self) -> list[float]:
        """Milliseconds between consecutive marks (read after the call has synchronised)."""
        if self.cuda:
            return [a.elapsed_time(b) for a, b in zip(self.marks, self.marks[1:])]
        return [(b - a) * 1e3 for a, b in zip(self.marks, self.marks[1:])]


def _random_ids(count: int, high: int, gen: torch.Generator, device) -> torch.Tensor:
    return torch.randint(3, high, (count,), generator=gen).to(device)


def _build(model_class, config, device: str, dtype: torch.dtype):
    # Built where it runs: no host-side copy of the weights; the host's own constructors set its buffers.
    with torch.device(device):
        return model_class._from_config(config, dtype=dtype, attn_implementation="sdpa").eval()


class Host:
    """A built host: its model, one image's pixel inputs, and the prompt pieces of its chat turn.

    Subclasses say how the host encodes the image and where its LLM takes the vision run.
    """

    name: str
    vision_tokens: int  # V, the image's tokens as the LLM takes them
    feature_dim: int  # the width of what the plugin reads

    def __init__(self, model, device: str, dtype: torch.dtype, gen: torch.Generator):
        self.model, self.device, self.dtype = model, device, dtype
        # Plain text ids stay below every special id of both hosts (LLaVA's start at 32000).
        high = min(model.config.text_config.vocab_size, 32000)
        self.prefix, self.question, self.suffix = (_random_ids(TEXT_TOKENS[part], high, gen, device)
                                                   for part in ("prefix", "question", "suffix"))

    def encode(self, for_fusion: bool) -> torch.Tensor:
        """(V, d) the image's vision tokens: as the LLM takes them, or as the plugin reads them."""
        raise NotImplementedError

    def markers(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The host's token ids right before and right after a placeholder run (none here)."""
        return [], []

    def positions(self, ids: torch.Tensor, count: int, fused: bool) -> torch.Tensor | None:
        """Position ids of the prompt ``ids`` (1, L) holding a run of ``count`` vision (or fused) tokens;
        None: the LLM's default (1-D positions)."""
        return None

    def prompt(self, count: int) -> tuple[torch.Tensor, int]:
        """(1, L) ids of [bos | prefix | run of ``count`` | question | suffix] and where the run starts."""
        before, after = self.markers()
        head = [torch.ones(1, dtype=torch.long, device=self.device), self.prefix, *before]
        run = torch.full((count,), self.model.config.image_token_id, device=self.device)
        ids = torch.cat(head + [run, *after, self.question, self.suffix])[None]
        return ids, sum(len(t) for t in head)

    def first_token(self, ids: torch.Tensor, start: int, tokens: torch.Tensor, positions) -> int:
        """Prefill the LLM over ``ids`` with ``tokens`` (k, d) in the run at ``start``; the greedy first token."""
        embeds = self.model.get_input_embeddings()(ids)
        embeds = torch.cat([embeds[:, :start], tokens[None].to(embeds.dtype), embeds[:, start + len(tokens):]], dim=1)
        hidden = self.model.model.language_model(inputs_embeds=embeds, position_ids=positions,
                                                 use_cache=True).last_hidden_state
        return int(self.model.lm_head(hidden[:, -1]).argmax(-1))


class LlavaHost(Host):
    """LLaVA-1.5: CLIP tower (second-to-last layer, no CLS), 2-layer projector, Llama LLM."""

    name = "llava"

    def __init__(self, size: str, device: str, dtype: torch.dtype, gen: torch.Generator):
        from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

        shape = LLAVA[size]
        config = LlavaConfig(vision_config=CLIPVisionConfig(**shape["vision"]),
                             text_config=LlamaConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0, **shape["text"]),
                             image_token_id=shape["image_token_id"], vision_feature_layer=-2,
                             vision_feature_select_strategy="default", projector_hidden_act="gelu")
        super().__init__(_build(LlavaForConditionalGeneration, config, device, dtype), device, dtype, gen)
        vision = self.model.config.vision_config
        self.vision_tokens = (vision.image_size // vision.patch_size) ** 2
        self.feature_dim = vision.hidden_size
        self.pixels = torch.randn(1, 3, vision.image_size, vision.image_size, generator=gen).to(device, dtype)

    def encode(self, for_fusion: bool) -> torch.Tensor:
        tower = self.model.model.vision_tower(self.pixels, output_hidden_states=True)
        features = tower.hidden_states[self.model.config.vision_feature_layer][:, 1:]  # without CLS
        return features[0] if for_fusion else self.model.model.multi_modal_projector(features)[0]


class QwenHost(Host):
    """Qwen2.5-VL: windowed vision tower with its patch merger, Qwen2 LLM with M-RoPE."""

    name = "qwen2_5_vl"

    def __init__(self, size: str, device: str, dtype: torch.dtype, gen: torch.Generator):
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        shape = QWEN2_5_VL[size]
        text = dict(shape["text"])
        head_dim = text["hidden_size"] // text["num_attention_heads"]
        # M-RoPE's (temporal, height, width) split of the rotary pairs: Qwen2.5-VL's [16, 24, 24] at head dim 128.
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": text.pop("rope_theta"),
                                   "mrope_section": [head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16]}
        config = Qwen2_5_VLConfig(vision_config=shape["vision"],
                                  text_config=dict(bos_token_id=1, eos_token_id=2, pad_token_id=0,
                                                   tie_word_embeddings=False, **text),
                                  image_token_id=shape["image_token_id"],
                                  vision_start_token_id=shape["vision_start_token_id"],
                                  vision_end_token_id=shape["vision_end_token_id"], tie_word_embeddings=False)
        super().__init__(_build(Qwen2_5_VLForConditionalGeneration, config, device, dtype), device, dtype, gen)
        vision = self.model.config.vision_config
        t, h, w = shape["grid"]
        self.merge = vision.spatial_merge_size
        self.grid = torch.tensor([[t, h, w]], device=device)
        self.vision_tokens = t * h * w // self.merge**2
        self.feature_dim = vision.out_hidden_size
        patch = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
        self.pixels = torch.randn(t * h * w, patch, generator=gen).to(device, dtype)

    def encode(self, for_fusion: bool) -> torch.Tensor:
        # The plugin reads the merged features too (qfusion's default vision source on this host).
        return self.model.model.visual(self.pixels, grid_thw=self.grid).pooler_output

    def markers(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        config = self.model.config
        return ([torch.tensor([config.vision_start_token_id], device=self.device)],
                [torch.tensor([config.vision_end_token_id], device=self.device)])

    def positions(self, ids: torch.Tensor, count: int, fused: bool) -> torch.Tensor:
        # The host's own rule; a fused run is a grid of 1 x count merged patches (as qfusion.attach does).
        grid = torch.tensor([[1, self.merge, self.merge * count]], device=self.device) if fused else self.grid
        types = (ids == self.model.config.image_token_id).int()
        return self.model.model.get_rope_index(ids, mm_token_type_ids=types, image_grid_thw=grid)[0]


BUILDERS = {"llava": LlavaHost, "qwen2_5_vl": QwenHost}


def build_fusion(host: Host, size: str, attn_impl: str):
    """A paper-sized (or smoke-sized) QuestionFusion reading ``host``'s features, in its dtype and device."""
    from qfusion.config import FusionConfig
    from qfusion.model import QuestionFusion

    largest = max(TOKENS[size])
    config = FusionConfig(vision_dim=host.feature_dim, output_dim=host.model.config.text_config.hidden_size,
                          m=largest, n=max(1, largest // 4), attn_impl=attn_impl, **FUSION[size])
    torch.manual_seed(0)
    with torch.device(host.device):
        return QuestionFusion(config).to(host.dtype).eval()


Call = Callable[[Clock], int]


def host_call(host: Host) -> Call:
    """The host alone: all its vision tokens through its projector into the LLM."""
    ids, start = host.prompt(host.vision_tokens)

    def call(clock: Clock) -> int:
        clock.mark()
        tokens = host.encode(for_fusion=False)
        clock.mark()
        token = host.first_token(ids, start, tokens, host.positions(ids, host.vision_tokens, fused=False))
        clock.mark()
        return token

    return call


def fusion_call(host: Host, fusion, question: torch.Tensor, count: int) -> Call:
    """The host with the plugin: ``count`` fused tokens (m = count, one question) in the vision run."""
    ids, start = host.prompt(count)

    def call(clock: Clock) -> int:
        clock.mark()
        features = host.encode(for_fusion=True)
        clock.mark()
        tokens = fusion(features[None], [[question]], m=count, n=max(1, count // 4)).tokens[0][0]
        clock.mark()
        token = host.first_token(ids, start, tokens, host.positions(ids, count, fused=True))
        clock.mark()
        return token

    return call


Key = tuple[str, int]
"""A case: ("host", vision tokens) or ("qfusion", N)."""


def time_calls(calls: dict[Key, Call], rounds: int, cuda: bool, warmup: int = 2) -> dict[Key, list[dict]]:
    """Per call, one record per round: wall ms, part spans (ms) and the allocator's peak rise (MiB, GPU)."""
    records: dict[Key, list[dict]] = {key: [] for key in calls}
    with torch.inference_mode():
        for call in calls.values():
            for _ in range(warmup):
                call(Clock(cuda))
        for _ in range(rounds):
            # Round-robin over the cases, so that whatever else disturbs the machine disturbs all alike.
            for key, call in calls.items():
                clock = Clock(cuda)
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                started = time.perf_counter()
                call(clock)  # ends on the first token's id on the host: everything before it has run
                wall = (time.perf_counter() - started) * 1e3
                peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else None
                records[key].append(dict(ms=wall, spans=clock.spans_ms(), peak_mib=peak))
    return records


def _params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _host_info(host: Host, fusion, build_s: float) -> dict:
    from qfusion.ops.attention import resolve_impl

    model = host.model
    llm = _params(model.model.language_model) + model.lm_head.weight.numel()
    fusion_embeddings = fusion.text_embed.weight.numel() + fusion.codebook.weight.numel()
    probe = torch.empty(0, device=host.device, dtype=host.dtype)
    return dict(llm_params=llm, vision_params=_params(model) - llm, fusion_params=_params(fusion),
                fusion_params_outside_embeddings=_params(fusion) - fusion_embeddings,
                vision_tokens=host.vision_tokens, fusion_reads=host.feature_dim,
                attn_implementation=dict(llm=model.config.text_config._attn_implementation,
                                         vision=model.config.vision_config._attn_implementation,
                                         fusion=resolve_impl(fusion.config.attn_impl, probe, needs_grad=False)),
                build_s=round(build_s, 1))


PARTS = {"host": ("vision", "llm"), "qfusion": ("vision", "fusion", "llm")}


def rows_of(host: Host, records: dict[Key, list[dict]]) -> list[dict]:
    """One row per case: median and best TTFT, median part spans, peak memory, speed-up over the host."""
    medians = {key: statistics.median(r["ms"] for r in rounds) for key, rounds in records.items()}
    rows = []
    for (case, count), rounds in records.items():
        spans = zip(*(r["spans"] for r in rounds))
        peaks = [r["peak_mib"] for r in rounds if r["peak_mib"] is not None]
        rows.append(dict(host=host.name, case=case, N=count, llm_tokens=host.prompt(count)[0].shape[1],
                         ttft_ms=medians[case, count], ttft_best_ms=min(r["ms"] for r in rounds),
                         parts_ms={part: statistics.median(span) for part, span in zip(PARTS[case], spans)},
                         peak_mib=max(peaks) if peaks else None,
                         speedup=medians["host", host.vision_tokens] / medians[case, count]))
    return rows


def run(size: str, device: str, dtype: torch.dtype, *, rounds: int, fusion_impl: str, left: Callable[[], float],
        host_reserve_s: float, hosts=HOSTS) -> dict:
    """Build each host in turn with its plugin, time its cases, free it.

    size: "7b" or "smoke"; fusion_impl: the plugin's ``attn_impl``; left: seconds left of the
    caller's budget (a host starts only with ``host_reserve_s`` left).
    Returns {"hosts": per-host facts, "rows": per-case results} and the settings.
    """
    import transformers

    result = dict(size=size, dtype=str(dtype).removeprefix("torch."), rounds=rounds, warmup_calls=2,
                  text_tokens=TEXT_TOKENS, budgets=list(TOKENS[size]), transformers=transformers.__version__,
                  hosts={}, rows=[])
    cuda = device == "cuda"
    for name in hosts:
        if left() < host_reserve_s:
            result["hosts"][name] = dict(status="dropped: deadline")
            continue
        started = time.perf_counter()
        gen = torch.Generator().manual_seed(0)
        host = BUILDERS[name](size, device, dtype, gen)
        fusion = build_fusion(host, size, fusion_impl)
        question = _random_ids(TEXT_TOKENS["question"], fusion.config.text_vocab_size, gen, device)
        build_s = time.perf_counter() - started
        calls = {("host", host.vision_tokens): host_call(host)}
        calls |= {("qfusion", count): fusion_call(host, fusion, question, count) for count in TOKENS[size]}
        result["hosts"][name] = dict(_host_info(host, fusion, build_s), status="ok")
        result["rows"] += rows_of(host, time_calls(calls, rounds, cuda))
        del host, fusion, calls
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    return result


def print_table(rows: list[dict]) -> None:
    """The TTFT table: one line per (host, case)."""
    print(f"\n{'host':<11} {'case':<8} {'N':>5} {'LLM tokens':>10} {'vision ms':>9} {'fusion ms':>9} {'LLM ms':>8} "
          f"{'TTFT ms':>8} {'best ms':>8} {'peak MiB':>8} {'speed-up':>8}")
    for row in rows:
        parts = row["parts_ms"]
        fusion = f"{parts['fusion']:9.1f}" if "fusion" in parts else f"{'':9}"
        peak = f"{row['peak_mib']:8.0f}" if row["peak_mib"] is not None else f"{'n/a':>8}"
        print(f"{row['host']:<11} {row['case']:<8} {row['N']:>5} {row['llm_tokens']:>10} {parts['vision']:9.1f} "
              f"{fusion} {parts['llm']:8.1f} {row['ttft_ms']:8.1f} {row['ttft_best_ms']:8.1f} {peak} "
              f"{row['speedup']:7.2f}x")
