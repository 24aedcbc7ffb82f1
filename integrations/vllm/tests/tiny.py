"""Tiny random hosts (LLaVA, Qwen2.5-VL, Qwen3-VL), qfusion plugins for them, and the transformers reference.

Everything is built offline from transformers config classes and written with ``save_pretrained``.
vLLM's CPU attention refuses head_dim 16, so every LLM uses heads of 64 (the Qwen-VL vision towers
run in transformers and keep small heads). Weights are drawn wider than the usual 0.02 so that greedy
decoding has clear margins (no near-ties that float rounding between two implementations could
flip) and the fused tokens change what the LLM says.

A request is a conversation: user turns with their images and text, assistant turns with text.
:func:`prompt` renders it for vLLM (one placeholder per image, where the turn brings it; follow-up
turns have none, the plugin's processor adds them); :func:`reference` runs it through the host
with the plugin attached in transformers (``QFusionProcessor`` builds its inputs).
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import torch

KINDS = ("llava", "qwen2_5_vl", "qwen3_vl")
IMAGE_TOKEN_ID = 4
VOCAB = 256
M, N = 6, 2
LLAVA_IMAGE_SIZE = 56
WORDS = ("what is this a cat dog color red blue green how many are there the and of in on it image picture left "
         "right big small one two three yes no ? . ,").split()

LLAVA_SPECIALS = ["[PAD]", "[UNK]", "<s>", "</s>", "<image>", "USER", "ASSISTANT", ":"]
LLAVA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['content'] is string %}{% set text = message['content'] %}"
    "{% else %}{% set text = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text')"
    " | join(' ') %}{% endif %}"
    "{% if message['role'] == 'user' %}USER : {{ text }} {% else %}ASSISTANT : {{ text }}{{ eos_token }} {% endif %}"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT :{% endif %}"
)
QWEN_SPECIALS = ["<|endoftext|>", "[UNK]", "<|im_start|>", "<|im_end|>", "<|image_pad|>", "<|video_pad|>",
                 "<|vision_start|>", "<|vision_end|>", "user", "assistant", "system"]
QWEN_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nyes<|im_end|>\n{% endif %}"
    "{% if message['content'] is string %}{% set text = message['content'] %}"
    "{% else %}{% set text = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text')"
    " | join(' ') %}{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ text }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SUPPRESS = {"llava": [IMAGE_TOKEN_ID], "qwen2_5_vl": [IMAGE_TOKEN_ID, 5, 6, 7], "qwen3_vl": [IMAGE_TOKEN_ID, 5, 6, 7]}
"""Tokens neither side may generate: a random host writes them, and a placeholder the transformers path
meets in its own output reads as a visual input."""
PLACEHOLDER = {"llava": "<image>", "qwen2_5_vl": "<|vision_start|><|image_pad|><|vision_end|>",
               "qwen3_vl": "<|vision_start|><|image_pad|><|vision_end|>"}


def tokenizer(kind: str):
    """A word-level fast tokenizer with the host's special tokens (the image placeholder at id 4) and a
    chat template (Qwen's writes a system turn first, as Qwen2.5-VL's does)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = LLAVA_SPECIALS if kind == "llava" else QWEN_SPECIALS
    words = specials + WORDS + [f"w{i}" for i in range(VOCAB - len(specials) - len(WORDS))]
    backend = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    if kind == "llava":
        tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="[PAD]",
                                      unk_token="[UNK]", extra_special_tokens={"image_token": "<image>"})
        tok.chat_template = LLAVA_TEMPLATE
    else:
        tok = PreTrainedTokenizerFast(
            tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token="[UNK]",
            extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                                  "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>",
                                  "im_start_token": "<|im_start|>"})
        tok.chat_template = QWEN_TEMPLATE
    assert tok.convert_tokens_to_ids("<image>" if kind == "llava" else "<|image_pad|>") == IMAGE_TOKEN_ID
    return tok


def _text(kind: str, hidden: int) -> dict:
    """The LLM's config: 2 layers, heads of 64, wide initialisation."""
    shared = dict(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                  num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, head_dim=64,
                  max_position_embeddings=1024, initializer_range=0.2)
    if kind == "llava":
        return dict(shared, bos_token_id=2, eos_token_id=3, pad_token_id=0)
    rope = {"rope_type": "default", "mrope_section": [8, 12, 12], "rope_theta": 10000.0}
    if kind == "qwen3_vl":
        rope["mrope_interleaved"] = True
    return dict(shared, bos_token_id=None, eos_token_id=3, pad_token_id=0, rope_parameters=rope)


def build_host(kind: str, directory: str, text_hidden: int = 128) -> str:
    """Write a tiny host checkpoint of ``kind`` and its processor files into ``directory``."""
    import transformers

    tok = tokenizer(kind)
    if kind == "llava":
        vision = transformers.CLIPVisionConfig(image_size=LLAVA_IMAGE_SIZE, patch_size=14, hidden_size=128,
                                               intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                                               projection_dim=64, initializer_range=0.2)
        text = transformers.LlamaConfig(**_text(kind, text_hidden))
        config = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN_ID,
                                          vision_feature_layer=-2, vision_feature_select_strategy="default")
        model_class = transformers.LlavaForConditionalGeneration
    else:
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=text_hidden,
                      patch_size=14, spatial_merge_size=2, temporal_patch_size=2, initializer_range=0.2)
        ids = dict(image_token_id=IMAGE_TOKEN_ID, video_token_id=5, vision_start_token_id=6, vision_end_token_id=7)
        if kind == "qwen2_5_vl":
            config = transformers.Qwen2_5_VLConfig(vision_config=dict(vision, window_size=56, fullatt_block_indexes=[1]),
                                                   text_config=_text(kind, text_hidden), **ids)
            model_class = transformers.Qwen2_5_VLForConditionalGeneration
        else:
            config = transformers.Qwen3VLConfig(vision_config=dict(vision, num_position_embeddings=64,
                                                                   deepstack_visual_indexes=[0]),
                                                text_config=_text(kind, text_hidden), **ids)
            model_class = transformers.Qwen3VLForConditionalGeneration
    torch.manual_seed(0)
    model_class(config).save_pretrained(directory)
    if kind == "llava":
        images = transformers.CLIPImageProcessorPil(size={"shortest_edge": LLAVA_IMAGE_SIZE},
                                                    crop_size={"height": LLAVA_IMAGE_SIZE, "width": LLAVA_IMAGE_SIZE})
        transformers.LlavaProcessor(image_processor=images, tokenizer=tok, patch_size=14,
                                    vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                    chat_template=LLAVA_TEMPLATE).save_pretrained(directory)
    else:
        transformers.Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=56 * 56 * 4, patch_size=14, merge_size=2,
                                              temporal_patch_size=2).save_pretrained(directory)
        tok.save_pretrained(directory)
    return directory


def load_host(directory: str):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(directory, dtype=torch.float32).eval()


class HostProcessor:
    """The host's tokenizer, image processor and chat template: what ``QFusionProcessor`` reads of a host
    processor (Qwen-VL's own processor cannot be built without torchvision, for its video processor)."""

    def __init__(self, directory: str):
        from transformers import AutoImageProcessor, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(directory)
        self.image_processor = AutoImageProcessor.from_pretrained(directory)
        self.chat_template = self.tokenizer.chat_template


def build_plugin(host_dir: str, directory: str, **overrides) -> str:
    """Attach a fresh random fusion (m=6, n=2) to the host and save the plugin only."""
    import qfusion
    from qfusion import FusionConfig

    settings = dict(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128, codebook_size=16, m=M, n=N,
                    contrastive_dim=16, initializer_range=0.2)
    settings.update(overrides)
    torch.manual_seed(1)
    adapter = qfusion.attach(load_host(host_dir), FusionConfig(**settings))
    adapter.save_pretrained(directory)
    return directory


def images(directory: str, count: int, seed: int = 0) -> list[str]:
    """Random RGB PNG files of different sizes; returns their paths."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        height, width = int(rng.integers(40, 80)), int(rng.integers(40, 80))
        path = os.path.join(directory, f"image{seed}-{i}.png")
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


@dataclasses.dataclass
class Request:
    """One request: a conversation of {"role", "text", "images" (user turns: image paths)} turns, ending
    with a user turn, and optional per-request processor kwargs."""

    name: str
    turns: list[dict]
    mm_processor_kwargs: dict | None = None

    @property
    def images(self) -> list[str]:
        return [path for turn in self.turns for path in turn.get("images", [])]

    @property
    def budget(self) -> tuple[int, int] | None:
        budget = (self.mm_processor_kwargs or {}).get("qfusion_budget")
        return None if budget is None else tuple(budget)


def chat(name: str, *turns: str | tuple[str, list[str]], **kwargs) -> Request:
    """A request from alternating user / assistant texts; a user turn with images is (text, [paths])."""
    out = []
    for i, turn in enumerate(turns):
        text, paths = turn if isinstance(turn, tuple) else (turn, [])
        out.append({"role": "user" if i % 2 == 0 else "assistant", "text": text, "images": paths})
    return Request(name, out, **kwargs)


def prompt(kind: str, request: Request) -> str:
    """The prompt vLLM gets: the chat template over the turns, a placeholder per image of a turn."""
    messages = [{"role": t["role"], "content": PLACEHOLDER[kind] * len(t.get("images", [])) + t["text"]}
                for t in request.turns]
    return tokenizer(kind).apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def reference_inputs(host_dir: str, model, request: Request) -> dict:
    """The transformers path's inputs: ``QFusionProcessor`` over the conversation, its images and budget."""
    from PIL import Image

    from qfusion import QFusionProcessor

    conversation = [{"role": t["role"], "content": [{"type": "image"} for _ in t.get("images", [])]
                     + [{"type": "text", "text": t["text"]}]} for t in request.turns]
    pictures = [Image.open(path).convert("RGB") for path in request.images]
    return dict(QFusionProcessor(HostProcessor(host_dir), model)(images=[pictures], conversations=[conversation],
                                                                  budget=request.budget))


def greedy(model, inputs: dict, steps: int, suppress: list[int]) -> list[int]:
    """Greedy tokens of a full forward per step (the patched forward of an attached host, or the host's),
    never one of ``suppress``."""
    inputs = dict(inputs)
    generated = []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(**inputs).logits[0, -1]
            logits[suppress] = -float("inf")
            token = int(logits.argmax())
            generated.append(token)
            inputs["input_ids"] = torch.cat([inputs["input_ids"], torch.tensor([[token]])], dim=1)
            inputs["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones(1, 1, dtype=torch.long)], dim=1)
            if "mm_token_type_ids" in inputs:  # the plain host reads it; an attached one derives its own
                types = inputs["mm_token_type_ids"]
                inputs["mm_token_type_ids"] = torch.cat([types, types.new_zeros(1, 1)], dim=1)
    return generated


def reference(host_dir: str, plugin_dir: str, request: Request, steps: int) -> dict:
    """{"tokens": greedy tokens, "prompt": input ids} of the host with the plugin attached in transformers."""
    import qfusion

    model = load_host(host_dir)
    qfusion.attach(model, plugin_dir)
    inputs = reference_inputs(host_dir, model, request)
    kind = model.config.model_type
    return {"tokens": greedy(model, inputs, steps, SUPPRESS[kind]), "prompt": inputs["input_ids"][0].tolist()}


def host_reference(kind: str, host_dir: str, request: Request, steps: int) -> list[int]:
    """Greedy tokens of the plain host in transformers (all vision tokens; one image, one user turn)."""
    from PIL import Image

    model = load_host(host_dir)
    (path,) = request.images
    picture = Image.open(path).convert("RGB")
    if kind == "llava":
        from transformers import AutoProcessor

        inputs = AutoProcessor.from_pretrained(host_dir)(images=[picture], text=[prompt(kind, request)],
                                                         return_tensors="pt")
    else:  # the image's merged tokens as the budget of a processor for the host's config: its own layout
        from qfusion import QFusionProcessor

        processor = HostProcessor(host_dir)
        grid = processor.image_processor(images=[picture], return_tensors="pt")["image_grid_thw"][0]
        count = int(grid.prod()) // 4
        built = QFusionProcessor(processor, model.config, m=count, n=1)(
            images=[picture], conversations=[[{"role": "user", "content": [{"type": "image"},
                                                                          {"type": "text", "text": request.turns[0]["text"]}]}]])
        inputs = {k: v for k, v in built.items() if not k.startswith("qfusion_")}
    return greedy(model, dict(inputs), steps, SUPPRESS[kind])
