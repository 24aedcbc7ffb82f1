"""A tiny random LLaVA checkpoint, a qfusion plugin for it, and the transformers reference outputs.

Everything is built offline from transformers config classes and written with ``save_pretrained``.
vLLM's CPU attention needs head_dim 64, so the tower and the LLM use 2 heads of 64. Weights are
drawn wider than the usual 0.02 so that greedy decoding has clear margins (no near-ties that float
rounding between two implementations could flip) and the fused tokens change what the LLM says.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import torch

IMAGE_TOKEN_ID = 4
VOCAB = 256
WORDS = ("[PAD] [UNK] <s> </s> <image> USER ASSISTANT : ? . , what is this a cat dog color red blue green how "
         "many are there the and of in on it image picture left right big small one two three yes no").split()
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['content'] is string %}{% set text = message['content'] %}"
    "{% else %}{% set text = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text')"
    " | join(' ') %}{% endif %}"
    "{% if message['role'] == 'user' %}USER : {{ text }} {% else %}ASSISTANT : {{ text }}{{ eos_token }} {% endif %}"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT :{% endif %}"
)
M, N = 6, 2
IMAGE_SIZE = 56


def tokenizer():
    """A word-level fast tokenizer with <s>, </s>, [PAD] and the <image> token (id 4)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = WORDS + [f"w{i}" for i in range(VOCAB - len(WORDS))]
    backend = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="[PAD]",
                                  unk_token="[UNK]", extra_special_tokens={"image_token": "<image>"})
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_host(directory: str, text_hidden: int = 128) -> str:
    """Write a tiny LLaVA checkpoint (CLIP tower + Llama LLM) and its processor into ``directory``."""
    from transformers import (CLIPImageProcessorPil, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    vision = CLIPVisionConfig(image_size=IMAGE_SIZE, patch_size=14, hidden_size=128, intermediate_size=256,
                              num_hidden_layers=2, num_attention_heads=2, projection_dim=64, initializer_range=0.2)
    text = LlamaConfig(vocab_size=VOCAB, hidden_size=text_hidden, intermediate_size=2 * text_hidden,
                       num_hidden_layers=2, num_attention_heads=text_hidden // 64, num_key_value_heads=text_hidden // 64,
                       head_dim=64, max_position_embeddings=512, bos_token_id=2, eos_token_id=3, pad_token_id=0,
                       initializer_range=0.2)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN_ID,
                         vision_feature_layer=-2, vision_feature_select_strategy="default")
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(directory)
    images = CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE},
                                   crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    LlavaProcessor(image_processor=images, tokenizer=tokenizer(), patch_size=14,
                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                   chat_template=CHAT_TEMPLATE).save_pretrained(directory)
    return directory


def load_host(directory: str):
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(directory, dtype=torch.float32).eval()


def build_plugin(host_dir: str, directory: str, **overrides) -> str:
    """Attach a fresh random fusion (m=6, n=2) to the host and save the plugin only."""
    import qfusion
    from qfusion import FusionConfig

    settings = dict(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128, codebook_size=16, m=M, n=N,
                    contrastive_dim=16, attn_impl="eager", initializer_range=0.2)
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
        path = os.path.join(directory, f"image{i}.png")
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


@dataclasses.dataclass
class Request:
    """One vLLM request: a prompt with one ``<image>``, the image file, the question the image is fused
    with (the user text of that turn) and optional per-request processor kwargs."""

    name: str
    prompt: str
    image: str
    question: str
    mm_processor_kwargs: dict | None = None


def reference(host_dir: str, plugin_dir: str, request: Request, steps: int, budget: tuple[int, int] | None = None,
              question: str | None = None) -> list[int]:
    """Greedy tokens of the host with the plugin attached in transformers (full forward every step).

    budget: the call's ``qfusion_budget`` (default: the plugin's).
    question: fuse the image with this question instead of the request's own (for the cache test).
    """
    import qfusion
    from PIL import Image
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(host_dir)
    model = load_host(host_dir)
    qfusion.attach(model, plugin_dir)
    tok = processor.tokenizer
    m = M if budget is None else budget[0]
    ids = tok(request.prompt.replace("<image>", "<image>" * m), return_tensors="pt")["input_ids"]
    pixel_values = processor.image_processor(images=[Image.open(request.image).convert("RGB")],
                                             return_tensors="pt")["pixel_values"]
    q = tok(question or request.question, add_special_tokens=False)["input_ids"]
    q_ids = torch.tensor(q)[None, None]
    generated = []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixel_values,
                           qfusion_input_ids=q_ids, qfusion_attention_mask=torch.ones_like(q_ids),
                           qfusion_budget=budget).logits
            token = int(logits[0, -1].argmax())
            generated.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return generated


def host_reference(host_dir: str, request: Request, steps: int) -> list[int]:
    """Greedy tokens of the plain host in transformers (all vision tokens)."""
    from PIL import Image
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(host_dir)
    model = load_host(host_dir)
    inputs = processor(images=[Image.open(request.image).convert("RGB")], text=[request.prompt], return_tensors="pt")
    ids = inputs["input_ids"]
    generated = []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids),
                           pixel_values=inputs["pixel_values"]).logits
            token = int(logits[0, -1].argmax())
            generated.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return generated
