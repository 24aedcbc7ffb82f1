"""Tiny random transformers hosts and processors for the adapter tests, built offline from configs.

Every checkpoint is written with ``save_pretrained`` and read back with ``from_pretrained`` (the real
loading path), once per test session; each test module loads its own fresh copies.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from qfusion import FusionConfig

IMAGE_TOKEN_ID = 4
VOCAB = 256
WORDS = ("[PAD] [UNK] <s> </s> <image> USER ASSISTANT : ? . , what is this a cat dog color red blue green how "
         "many are there the and of in on it image picture left right big small one two three yes no").split()
FILLER = [f"w{i}" for i in range(VOCAB - len(WORDS))]

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['content'] is string %}{% set text = message['content'] %}"
    "{% else %}{% set text = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text')"
    " | join(' ') %}"
    "{% endif %}"
    "{% if message['role'] == 'user' %}USER : {{ text }} {% else %}ASSISTANT : {{ text }}{{ eos_token }} {% endif %}"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT :{% endif %}"
)


def tokenizer(image_token_attribute: bool = True):
    """A word-level fast tokenizer over a 256-word vocabulary with <s>, </s>, [PAD] and <image>.

    Without ``image_token_attribute`` the <image> token is left for the host processor to register
    (as Blip2Processor and InstructBlipProcessor do with the hub tokenizers).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(WORDS + FILLER)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    extra = {"extra_special_tokens": {"image_token": "<image>"}} if image_token_attribute else {}
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="[PAD]",
                                  unk_token="[UNK]", **extra)
    tok.chat_template = CHAT_TEMPLATE
    assert tok.convert_tokens_to_ids("<image>") == IMAGE_TOKEN_ID
    return tok


def clip_vision(image_size=56):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(image_size=image_size, patch_size=14, hidden_size=32, intermediate_size=64,
                            num_hidden_layers=2, num_attention_heads=4, projection_dim=32)


def llama(hidden=64):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                       bos_token_id=2, eos_token_id=3, pad_token_id=0)


def build_llava(directory):
    from transformers import (CLIPImageProcessorPil, LlavaConfig, LlavaForConditionalGeneration,
                              LlavaProcessor)

    config = LlavaConfig(vision_config=clip_vision(), text_config=llama(), image_token_id=IMAGE_TOKEN_ID,
                         vision_feature_layer=-2, vision_feature_select_strategy="default")
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(directory)
    images = CLIPImageProcessorPil(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
    LlavaProcessor(image_processor=images, tokenizer=tokenizer(), patch_size=14,
                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                   chat_template=CHAT_TEMPLATE).save_pretrained(directory)


def build_llava_next(directory):
    from transformers import (LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextImageProcessorPil,
                              LlavaNextProcessor)

    pinpoints = [[28, 56], [56, 28], [56, 56]]
    config = LlavaNextConfig(vision_config=clip_vision(28), text_config=llama(), image_token_id=IMAGE_TOKEN_ID,
                             image_grid_pinpoints=pinpoints, vision_feature_layer=-2,
                             vision_feature_select_strategy="default")
    torch.manual_seed(0)
    LlavaNextForConditionalGeneration(config).save_pretrained(directory)
    images = LlavaNextImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28},
                                        image_grid_pinpoints=pinpoints)
    LlavaNextProcessor(image_processor=images, tokenizer=tokenizer(), patch_size=14,
                       vision_feature_select_strategy="default", num_additional_image_tokens=1,
                       chat_template=CHAT_TEMPLATE).save_pretrained(directory)


def _blip_parts(image_size=28):
    from transformers import Blip2QFormerConfig, Blip2VisionConfig

    vision = Blip2VisionConfig(image_size=image_size, patch_size=14, hidden_size=32, intermediate_size=64,
                               num_hidden_layers=2, num_attention_heads=4)
    qformer = Blip2QFormerConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=64, encoder_hidden_size=32, max_position_embeddings=64)
    return vision, qformer


def opt():
    from transformers import OPTConfig

    return OPTConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, ffn_dim=128, num_attention_heads=4,
                     word_embed_proj_dim=64, max_position_embeddings=256, bos_token_id=2, eos_token_id=3,
                     pad_token_id=0)


def build_blip2(directory):
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, BlipImageProcessorPil

    vision, qformer = _blip_parts()
    config = Blip2Config(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(), text_config=opt().to_dict(),
                         num_query_tokens=6, image_token_index=IMAGE_TOKEN_ID)
    torch.manual_seed(0)
    Blip2ForConditionalGeneration(config).save_pretrained(directory)
    images = BlipImageProcessorPil(size={"height": 28, "width": 28})
    Blip2Processor(image_processor=images, tokenizer=tokenizer(False), num_query_tokens=6).save_pretrained(directory)


def build_instructblip(directory):
    from transformers import (BlipImageProcessorPil, InstructBlipConfig, InstructBlipForConditionalGeneration,
                              InstructBlipProcessor, InstructBlipQFormerConfig, InstructBlipVisionConfig)

    vision, qformer = _blip_parts()
    config = InstructBlipConfig(
        vision_config=InstructBlipVisionConfig(**vision.to_dict()).to_dict(),
        qformer_config=InstructBlipQFormerConfig(**qformer.to_dict()).to_dict(),
        text_config=llama().to_dict(), num_query_tokens=6, image_token_index=IMAGE_TOKEN_ID,
    )
    torch.manual_seed(0)
    InstructBlipForConditionalGeneration(config).save_pretrained(directory)
    images = BlipImageProcessorPil(size={"height": 28, "width": 28})
    InstructBlipProcessor(image_processor=images, tokenizer=tokenizer(False), qformer_tokenizer=tokenizer(False),
                          num_query_tokens=6).save_pretrained(directory)


def build_blip2_t5(directory):
    from transformers import Blip2Config, Blip2ForConditionalGeneration, T5Config

    vision, qformer = _blip_parts()
    text = T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                    decoder_start_token_id=0, pad_token_id=0, eos_token_id=3)
    config = Blip2Config(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(), text_config=text.to_dict(),
                         num_query_tokens=6, image_token_index=IMAGE_TOKEN_ID)
    torch.manual_seed(0)
    Blip2ForConditionalGeneration(config).save_pretrained(directory)


BUILDERS = {"llava": build_llava, "llava_next": build_llava_next, "blip-2": build_blip2,
            "instructblip": build_instructblip, "blip-2-t5": build_blip2_t5}


class Hosts:
    """Builds each kind of tiny checkpoint once (in a session temp dir) and loads fresh copies."""

    def __init__(self, root):
        self.root = root
        self.dirs: dict[str, str] = {}

    def directory(self, kind: str) -> str:
        if kind not in self.dirs:
            path = os.path.join(self.root, kind)
            BUILDERS[kind](path)
            self.dirs[kind] = path
        return self.dirs[kind]

    def model(self, kind: str, **kwargs):
        from transformers import AutoConfig, AutoModelForImageTextToText

        directory = self.directory(kind)
        config = AutoConfig.from_pretrained(directory)
        if config.model_type in ("blip-2", "instructblip"):
            from transformers import Blip2ForConditionalGeneration, InstructBlipForConditionalGeneration

            cls = (Blip2ForConditionalGeneration if config.model_type == "blip-2"
                   else InstructBlipForConditionalGeneration)
            return cls.from_pretrained(directory, **kwargs).eval()
        return AutoModelForImageTextToText.from_pretrained(directory, **kwargs).eval()

    def processor(self, kind: str):
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(self.directory(kind))


@pytest.fixture(scope="session")
def hosts(tmp_path_factory) -> Hosts:
    return Hosts(str(tmp_path_factory.mktemp("hosts")))


def fusion_config(**overrides) -> FusionConfig:
    """A tiny fusion; vision_dim / output_dim stay at their defaults so attach fills them from the host."""
    settings = dict(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, codebook_size=16, m=4, n=2,
                    text_vocab_size=VOCAB, contrastive_dim=16, attn_impl="eager")
    settings.update(overrides)
    return FusionConfig(**settings)


def images(count: int, seed: int = 0, size=(40, 52)) -> list[np.ndarray]:
    """Random RGB uint8 images (H, W, 3)."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (*size, 3), dtype=np.uint8) for _ in range(count)]


def capture_llm_inputs(language_model):
    """Register a hook recording the inputs_embeds each call of the LLM receives; returns (records, handle)."""
    records: list[torch.Tensor] = []

    def hook(module, args, kwargs):
        embeds = kwargs.get("inputs_embeds")
        if embeds is not None:
            records.append(embeds.detach().clone())

    return records, language_model.register_forward_pre_hook(hook, with_kwargs=True)


def greedy(model, inputs: dict, steps: int) -> torch.Tensor:
    """A hand-written greedy decoding loop: the full forward on the growing sequence, argmax each step."""
    inputs = dict(inputs)
    for _ in range(steps):
        logits = model(**inputs).logits
        token = logits[:, -1].argmax(-1, keepdim=True)
        inputs["input_ids"] = torch.cat([inputs["input_ids"], token], dim=1)
        inputs["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(token)], dim=1)
    return inputs["input_ids"]
