"""Tiny random transformers hosts and processors for the adapter tests, built offline from configs.

Every checkpoint is written with ``save_pretrained`` and read back with ``from_pretrained`` (the real
loading path), once per test session; each test module loads its own fresh copies.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from qfusion import FusionConfig

IMAGE_TOKEN_ID = 4
VOCAB = 256
VIDEO_TOKEN_ID = VOCAB - 1
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


def tokenizer(image_token_attribute: bool = True, video: bool = False):
    """A word-level fast tokenizer over a 256-word vocabulary with <s>, </s>, [PAD] and <image>
    (with ``video``, also <video> at :data:`VIDEO_TOKEN_ID`, in place of the last filler word).

    Without ``image_token_attribute`` the <image> token is left for the host processor to register
    (as Blip2Processor and InstructBlipProcessor do with the hub tokenizers).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(WORDS + FILLER[:-1] + (["<video>"] if video else FILLER[-1:]))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    extra = {"extra_special_tokens": {"image_token": "<image>", **({"video_token": "<video>"} if video else {})}}
    extra = extra if image_token_attribute else {}
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
        from user_family import register

        register()  # the user-registered family's host is attachable like the built-in ones

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

        if kind in QWEN_KINDS:
            return VideoHostProcessor.qwen(self.directory(kind))
        if kind == "llava_onevision":
            return VideoHostProcessor.onevision(self.directory(kind))
        if kind in STAND_IN_PROCESSORS:
            return STAND_IN_PROCESSORS[kind](self.directory(kind))
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


def greedy(model, inputs: dict, steps: int, suppress_tokens=()) -> torch.Tensor:
    """A hand-written greedy decoding loop: the full forward on the growing sequence, argmax each step
    (never one of ``suppress_tokens``, as ``generate(..., suppress_tokens=...)``)."""
    inputs = dict(inputs)
    for _ in range(steps):
        logits = model(**inputs).logits[:, -1]
        logits[:, list(suppress_tokens)] = -float("inf")
        token = logits.argmax(-1, keepdim=True)
        inputs["input_ids"] = torch.cat([inputs["input_ids"], token], dim=1)
        inputs["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(token)], dim=1)
    return inputs["input_ids"]


# ---------------------------------------------------------------------- Qwen-VL hosts

QWEN_SPECIALS = ["<|endoftext|>", "[UNK]", "<|im_start|>", "<|im_end|>", "<|image_pad|>", "<|video_pad|>",
                 "<|vision_start|>", "<|vision_end|>"]
QWEN_VIDEO_TOKEN_ID, QWEN_VISION_START_ID, QWEN_VISION_END_ID = 5, 6, 7
QWEN_WORDS = QWEN_SPECIALS + ["user", "assistant", "system"] + list(WORDS[7:])

QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['content'] is string %}{% set text = message['content'] %}"
    "{% else %}{% set text = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text')"
    " | join(' ') %}"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ text }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def word_tokenizer(words: list[str], chat_template: str, image_token: str, **special):
    """A word-level fast tokenizer over ``words`` (filled up to :data:`VOCAB` with filler words), the
    tokens of ``special`` (its role names, e.g. ``eos_token``, ``image_token``) as special tokens, and
    ``image_token`` at :data:`IMAGE_TOKEN_ID`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = list(words) + [f"w{i}" for i in range(VOCAB - len(words))]
    backend = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    roles = {k: special.pop(k) for k in ("bos_token", "eos_token", "pad_token") if k in special}
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", **roles,
                                  extra_special_tokens={"image_token": image_token, **special})
    tok.chat_template = chat_template
    assert tok.convert_tokens_to_ids(image_token) == IMAGE_TOKEN_ID
    return tok


def qwen_tokenizer():
    """A word-level fast tokenizer with Qwen's chat and vision special tokens (<|image_pad|> at id 4)."""
    tok = word_tokenizer(QWEN_WORDS, QWEN_CHAT_TEMPLATE, "<|image_pad|>", eos_token="<|im_end|>",
                         pad_token="<|endoftext|>", video_token="<|video_pad|>", vision_start_token="<|vision_start|>",
                         vision_end_token="<|vision_end|>", im_start_token="<|im_start|>")
    assert tok.convert_tokens_to_ids("<|vision_end|>") == QWEN_VISION_END_ID
    return tok


def qwen_text(head_dim=16, **extra):
    return dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=1024, bos_token_id=2, eos_token_id=3, pad_token_id=0,
                rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0, **extra})


QWEN_IDS = dict(image_token_id=IMAGE_TOKEN_ID, video_token_id=QWEN_VIDEO_TOKEN_ID,
                vision_start_token_id=QWEN_VISION_START_ID, vision_end_token_id=QWEN_VISION_END_ID)


class FramesVideoProcessor:
    """Stands in for the host's video processor (whose transformers class needs torchvision): each
    video's frames, in pairs, through the host's image processor, laid out as the host's video patches
    ((t, h, w) grids, t = frames / temporal_patch_size; within a pair the first frame is used twice)."""

    def __init__(self, image_processor):
        self.image_processor = image_processor
        self.temporal_patch_size = image_processor.temporal_patch_size
        self.merge_size = image_processor.merge_size

    def __call__(self, videos, return_tensors="pt", **kwargs):
        pixels, grids = [], []
        for video in videos:
            frames = list(video)[:: self.temporal_patch_size]
            out = self.image_processor(frames, return_tensors="pt")
            grid = out["image_grid_thw"]
            assert bool((grid == grid[0]).all()), "frames of one video must have one size"
            pixels.append(out["pixel_values"])
            grids.append([len(frames), int(grid[0, 1]), int(grid[0, 2])])
        return {"pixel_values_videos": torch.cat(pixels), "video_grid_thw": torch.tensor(grids)}


class VideoHostProcessor:
    """Stands in for the processors of hosts with video (``Qwen2_5_VLProcessor``, ``Qwen3VLProcessor``,
    ``LlavaOnevisionProcessor``), which cannot be built without torchvision (for their video
    processors): the host's tokenizer, image processor and chat template, a stand-in video processor,
    and the image / video tokens, as the host processor has them."""

    def __init__(self, tokenizer, image_processor, video_processor, image_token, video_token):
        self.tokenizer, self.image_processor, self.video_processor = tokenizer, image_processor, video_processor
        self.image_token, self.video_token = image_token, video_token
        self.chat_template = tokenizer.chat_template

    @classmethod
    def qwen(cls, directory):
        from transformers import AutoImageProcessor, PreTrainedTokenizerFast

        images = AutoImageProcessor.from_pretrained(directory)
        # the word-level test tokenizer as saved (AutoTokenizer would map a qwen3_5 checkpoint to its own
        # tokenizer class, which re-splits the words with Qwen's byte-level rules)
        return cls(PreTrainedTokenizerFast.from_pretrained(directory), images, FramesVideoProcessor(images),
                   "<|image_pad|>", "<|video_pad|>")

    @classmethod
    def onevision(cls, directory):
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPImageProcessorPil

        images = AutoImageProcessor.from_pretrained(directory)
        frames = CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28},
                                       image_mean=images.image_mean, image_std=images.image_std)
        return cls(AutoTokenizer.from_pretrained(directory), images, StackedFramesProcessor(frames),
                   "<image>", "<video>")


class StackedFramesProcessor:
    """Stands in for LLaVA-OneVision's video processor: every frame resized to the tower's size,
    ``pixel_values_videos`` (videos, frames, C, H, W)."""

    def __init__(self, frames_processor):
        self.frames_processor = frames_processor

    def __call__(self, videos, return_tensors="pt", **kwargs):
        clips = [self.frames_processor(list(video), return_tensors="pt")["pixel_values"] for video in videos]
        return {"pixel_values_videos": torch.stack(clips)}


def _qwen_processor(directory, temporal_patch_size=2):
    from transformers import Qwen2VLImageProcessorPil

    Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=56 * 56 * 4, patch_size=14, merge_size=2,
                             temporal_patch_size=temporal_patch_size).save_pretrained(directory)
    qwen_tokenizer().save_pretrained(directory)


def build_qwen2_5_vl(directory):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1])
    config = Qwen2_5_VLConfig(vision_config=vision, text_config=qwen_text(), **QWEN_IDS)
    torch.manual_seed(0)
    Qwen2_5_VLForConditionalGeneration(config).save_pretrained(directory)
    _qwen_processor(directory)


def build_qwen2_vl(directory):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    vision = dict(depth=2, embed_dim=32, hidden_size=64, mlp_ratio=2, num_heads=4, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2)
    config = Qwen2VLConfig(vision_config=vision, text_config=qwen_text(), **QWEN_IDS)
    torch.manual_seed(0)
    Qwen2VLForConditionalGeneration(config).save_pretrained(directory)
    _qwen_processor(directory)


def build_qwen3_vl(directory):
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                  deepstack_visual_indexes=[0, 1])
    config = Qwen3VLConfig(vision_config=vision, text_config=dict(qwen_text(mrope_interleaved=True), head_dim=16),
                           **QWEN_IDS)
    torch.manual_seed(0)
    Qwen3VLForConditionalGeneration(config).save_pretrained(directory)
    _qwen_processor(directory)


def build_llava_onevision(directory):
    from transformers import (LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration,
                              LlavaOnevisionImageProcessorPil)

    pinpoints = [[28, 28], [28, 56], [56, 28], [56, 56]]
    config = LlavaOnevisionConfig(vision_config=clip_vision(28), text_config=llama(), image_token_index=IMAGE_TOKEN_ID,
                                  video_token_index=VIDEO_TOKEN_ID, image_grid_pinpoints=pinpoints,
                                  vision_feature_layer=-2, vision_feature_select_strategy="default")
    torch.manual_seed(0)
    LlavaOnevisionForConditionalGeneration(config).save_pretrained(directory)
    LlavaOnevisionImageProcessorPil(size={"height": 28, "width": 28}, crop_size={"height": 28, "width": 28},
                                    image_grid_pinpoints=pinpoints).save_pretrained(directory)
    tokenizer(video=True).save_pretrained(directory)


BUILDERS.update({"qwen2_vl": build_qwen2_vl, "qwen2_5_vl": build_qwen2_5_vl, "qwen3_vl": build_qwen3_vl,
                 "llava_onevision": build_llava_onevision})
QWEN_KINDS: tuple[str, ...] = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


def videos(count: int, frames: int = 4, seed: int = 0, size=(56, 56)) -> list[np.ndarray]:
    """Random RGB uint8 videos (frames, H, W, 3)."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (frames, *size, 3), dtype=np.uint8) for _ in range(count)]


# ---------------------------------------------------------------------- the 2026 Qwen-VL variants


def _qwen3_vision(**extra):
    return dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64, patch_size=14,
                spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64, **extra)


def _qwen3_5_text(**extra):
    """A tiny hybrid Qwen3.5 LLM: one gated linear-attention layer, one full-attention layer."""
    return dict(qwen_text(mrope_interleaved=True), head_dim=16, layer_types=["linear_attention", "full_attention"],
                linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=16, linear_value_head_dim=16,
                linear_conv_kernel_dim=4, **extra)


def build_qwen3_vl_moe(directory):
    from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration

    text = dict(qwen_text(mrope_interleaved=True), head_dim=16, moe_intermediate_size=32, num_experts=4,
                num_experts_per_tok=2, decoder_sparse_step=1)
    config = Qwen3VLMoeConfig(vision_config=_qwen3_vision(deepstack_visual_indexes=[0, 1]), text_config=text,
                              **QWEN_IDS)
    torch.manual_seed(0)
    Qwen3VLMoeForConditionalGeneration(config).save_pretrained(directory)
    _qwen_processor(directory)


def build_qwen3_5(directory):
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

    config = Qwen3_5Config(vision_config=_qwen3_vision(), text_config=_qwen3_5_text(), **QWEN_IDS)
    torch.manual_seed(0)
    Qwen3_5ForConditionalGeneration(config).save_pretrained(directory)
    _qwen_processor(directory)


def build_qwen3_5_moe(directory):
    from transformers import Qwen3_5MoeConfig, Qwen3_5MoeForConditionalGeneration

    text = _qwen3_5_text(moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                         shared_expert_intermediate_size=32)
    config = Qwen3_5MoeConfig(vision_config=_qwen3_vision(), text_config=text, **QWEN_IDS)
    torch.manual_seed(0)
    Qwen3_5MoeForConditionalGeneration(config).save_pretrained(directory)
    _qwen_processor(directory)


BUILDERS.update({"qwen3_vl_moe": build_qwen3_vl_moe, "qwen3_5": build_qwen3_5, "qwen3_5_moe": build_qwen3_5_moe})
QWEN_KINDS += ("qwen3_vl_moe", "qwen3_5", "qwen3_5_moe")


# ---------------------------------------------------------------------- one case per host for the contract tests


@dataclass(frozen=True)
class HostCase:
    """A tiny host the contract tests run (tests/test_host_contract.py): every registered model type has one.

    kind: the builder (:data:`BUILDERS`); mode: the BLIP mode, or None for the default.
    video / multi_image: what the family's host takes. positions: "1d" (the LLM's own consecutive
    positions) or "mrope" (3-D rope positions by the virtual-grid rule). min_transformers: the
    family's floor, where above qfusion's (its cases are skipped below it). user_family: the family
    is not qfusion's own: tests/user_family.py registers it, as a user would.
    """

    kind: str
    mode: str | None = None
    video: bool = False
    multi_image: bool = True
    positions: str = "1d"
    min_transformers: str | None = None
    user_family: bool = False

    @property
    def available(self) -> bool:
        """Whether the installed transformers has this host's classes."""
        import transformers
        from packaging.version import Version

        return self.min_transformers is None or Version(transformers.__version__) >= Version(self.min_transformers)

    @property
    def name(self) -> str:
        return self.kind if self.mode is None else f"{self.kind}-{self.mode}"


HOST_CASES = [
    HostCase("llava"), HostCase("llava_next"), HostCase("llava_onevision", video=True),
    *(HostCase(kind, video=True, positions="mrope") for kind in QWEN_KINDS),
    HostCase("blip-2", multi_image=False), HostCase("instructblip", mode="augment", multi_image=False),
]
"""The hosts of the contract tests, one (at least) per registered model type."""


# ---------------------------------------------------------------------- Gemma 3

GEMMA_SPECIALS = ["<pad>", "<eos>", "<bos>", "[UNK]", "<image_soft_token>", "<start_of_image>", "<end_of_image>",
                  "<start_of_turn>", "<end_of_turn>", "user", "model"]
GEMMA_BOI_ID, GEMMA_EOI_ID = 5, 6
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['content'] is string %}{% set text = message['content'] %}"
    "{% else %}{% set text = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text')"
    " | join(' ') %}{% endif %}"
    "<start_of_turn>{{ 'model' if message['role'] == 'assistant' else 'user' }}\n{{ text }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def gemma_tokenizer():
    """A word-level fast tokenizer with Gemma's image and turn tokens (<image_soft_token> at id 4)."""
    return word_tokenizer(GEMMA_SPECIALS + list(WORDS[7:]), GEMMA_CHAT_TEMPLATE, "<image_soft_token>",
                          bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", boi_token="<start_of_image>",
                          eoi_token="<end_of_image>")


def build_gemma3(directory):
    from transformers import (Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessorPil, Gemma3Processor,
                              SiglipVisionConfig)

    vision = SiglipVisionConfig(image_size=56, patch_size=14, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4)
    text = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, max_position_embeddings=256, bos_token_id=2, eos_token_id=1,
                pad_token_id=0, sliding_window=8, layer_types=["sliding_attention", "full_attention"])
    config = Gemma3Config(vision_config=vision.to_dict(), text_config=text, mm_tokens_per_image=4,
                          image_token_index=IMAGE_TOKEN_ID, boi_token_index=GEMMA_BOI_ID, eoi_token_index=GEMMA_EOI_ID)
    torch.manual_seed(0)
    Gemma3ForConditionalGeneration(config).save_pretrained(directory)
    Gemma3Processor(image_processor=Gemma3ImageProcessorPil(size={"height": 56, "width": 56}),
                    tokenizer=gemma_tokenizer(), chat_template=GEMMA_CHAT_TEMPLATE,
                    image_seq_length=4).save_pretrained(directory)


BUILDERS["gemma3"] = build_gemma3
HOST_CASES.append(HostCase("gemma3"))


# ---------------------------------------------------------------------- LLaVA-OneVision-1.5


def build_llava_onevision1_5(directory):
    from transformers import LlavaOnevision15Config, LlavaOnevision15ForConditionalGeneration

    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64, patch_size=14,
                  spatial_merge_size=2)
    text = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, max_position_embeddings=1024, bos_token_id=2, eos_token_id=3,
                pad_token_id=0)
    config = LlavaOnevision15Config(vision_config=vision, text_config=text, **QWEN_IDS)
    torch.manual_seed(0)
    LlavaOnevision15ForConditionalGeneration(config).save_pretrained(directory)
    _qwen_processor(directory, temporal_patch_size=1)  # its tower patches one frame at a time


BUILDERS["llava_onevision1_5"] = build_llava_onevision1_5
QWEN_KINDS += ("llava_onevision1_5",)  # the Qwen processor (tokenizer, image processor, frames)
HOST_CASES.append(HostCase("llava_onevision1_5", video=True, min_transformers="5.25"))


# ---------------------------------------------------------------------- InternVL

INTERNVL_SPECIALS = ["<|endoftext|>", "[UNK]", "<|im_start|>", "<|im_end|>", "<IMG_CONTEXT>", "<img>", "</img>",
                     "<video>", "user", "assistant", "system"]


def internvl_tokenizer():
    """A word-level fast tokenizer with InternVL's image tokens (<IMG_CONTEXT> at id 4, <img>, </img>)."""
    return word_tokenizer(INTERNVL_SPECIALS + list(WORDS[7:]), QWEN_CHAT_TEMPLATE, "<IMG_CONTEXT>",
                          eos_token="<|im_end|>", pad_token="<|endoftext|>", context_image_token="<IMG_CONTEXT>",
                          start_image_token="<img>", end_image_token="</img>", video_token="<video>")


def build_internvl(directory):
    from transformers import GotOcr2ImageProcessorPil, InternVLConfig, InternVLForConditionalGeneration

    vision = dict(image_size=56, patch_size=14, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4)
    text = dict(model_type="qwen2", vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, bos_token_id=2,
                eos_token_id=3, pad_token_id=0)
    config = InternVLConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN_ID)
    torch.manual_seed(0)
    InternVLForConditionalGeneration(config).save_pretrained(directory)
    GotOcr2ImageProcessorPil(size={"height": 56, "width": 56}, crop_to_patches=True, min_patches=1,
                             max_patches=2).save_pretrained(directory)  # an image: up to 2 tiles + a thumbnail
    internvl_tokenizer().save_pretrained(directory)


def internvl_processor(directory):
    """Stands in for ``InternVLProcessor`` (whose video processor needs torchvision): its tokenizer, image
    processor, chat template and image tokens (``<IMG_CONTEXT>``, with ``<img>`` / ``</img>`` around)."""
    from transformers import AutoImageProcessor, PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(directory)
    processor = VideoHostProcessor(tokenizer, AutoImageProcessor.from_pretrained(directory), None, "<IMG_CONTEXT>",
                                   None)
    processor.start_image_token, processor.end_image_token = "<img>", "</img>"
    return processor


BUILDERS["internvl"] = build_internvl
STAND_IN_PROCESSORS = {"internvl": internvl_processor}
HOST_CASES.append(HostCase("internvl"))


# ---------------------------------------------------------------------- Idefics3 / SmolVLM

IDEFICS_SPECIALS = ["[PAD]", "[UNK]", "<s>", "</s>", "<image>", "<fake_token_around_image>", "<global-img>",
                    "<end_of_utterance>"] + [f"<row_{r}_col_{c}>" for r in (1, 2) for c in (1, 2)]


def idefics_tokenizer():
    """A word-level fast tokenizer with Idefics3's image tokens (<image> at id 4, the markers, row/column tags)."""
    return word_tokenizer(IDEFICS_SPECIALS + list(WORDS[5:]), CHAT_TEMPLATE, "<image>", bos_token="<s>",
                          eos_token="</s>", pad_token="[PAD]", fake_image_token="<fake_token_around_image>",
                          global_image_token="<global-img>", end_of_utterance_token="<end_of_utterance>")


def _build_idefics(directory, kind):
    import transformers

    vision = dict(image_size=56, patch_size=14, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4)
    text = dict(model_type="llama", vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, bos_token_id=2,
                eos_token_id=3, pad_token_id=0)
    prefix = "SmolVLM" if kind == "smolvlm" else "Idefics3"
    config = getattr(transformers, f"{prefix}Config")(vision_config=vision, text_config=text,
                                                      image_token_id=IMAGE_TOKEN_ID, scale_factor=2)
    # an image: split into up to 2 x 2 crops of 56 px plus the whole image (4 tokens each)
    images = getattr(transformers, f"{prefix}ImageProcessorPil")(size={"longest_edge": 112},
                                                                   max_image_size={"longest_edge": 56})
    torch.manual_seed(0)
    getattr(transformers, f"{prefix}ForConditionalGeneration")(config).save_pretrained(directory)
    images.save_pretrained(directory)
    idefics_tokenizer().save_pretrained(directory)
    if kind == "idefics3":
        transformers.Idefics3Processor(image_processor=images, tokenizer=idefics_tokenizer(), image_seq_len=4,
                                       chat_template=CHAT_TEMPLATE).save_pretrained(directory)


def smolvlm_processor(directory):
    """Stands in for ``SmolVLMProcessor`` (whose video processor needs torchvision): tokenizer, image
    processor, chat template and image tokens (``<image>``, with ``<fake_token_around_image>`` around)."""
    from transformers import AutoImageProcessor, PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(directory)
    processor = VideoHostProcessor(tokenizer, AutoImageProcessor.from_pretrained(directory), None, "<image>", None)
    processor.fake_image_token = "<fake_token_around_image>"
    return processor


BUILDERS.update({"idefics3": lambda directory: _build_idefics(directory, "idefics3"),
                 "smolvlm": lambda directory: _build_idefics(directory, "smolvlm")})
STAND_IN_PROCESSORS["smolvlm"] = smolvlm_processor
HOST_CASES += [HostCase("idefics3"), HostCase("smolvlm", min_transformers="5.21")]


# ---------------------------------------------------------------------- Mistral 3

MISTRAL_SPECIALS = ["<pad>", "[UNK]", "<s>", "</s>", "[IMG]", "[IMG_BREAK]", "[IMG_END]", "[INST]", "[/INST]"]
MISTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['content'] is string %}{% set text = message['content'] %}"
    "{% else %}{% set text = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text')"
    " | join(' ') %}{% endif %}"
    "{% if message['role'] == 'user' %}[INST] {{ text }} [/INST]{% else %}{{ text }}{{ eos_token }}{% endif %}"
    "{% endfor %}"
)


def mistral_tokenizer():
    """A word-level fast tokenizer with Pixtral's image tokens ([IMG] at id 4, [IMG_BREAK], [IMG_END])."""
    return word_tokenizer(MISTRAL_SPECIALS + list(WORDS[7:]), MISTRAL_CHAT_TEMPLATE, "[IMG]", bos_token="<s>",
                          eos_token="</s>", pad_token="<pad>", image_break_token="[IMG_BREAK]",
                          image_end_token="[IMG_END]", inst_token="[INST]", end_inst_token="[/INST]")


def build_mistral3(directory):
    from transformers import (Mistral3Config, Mistral3ForConditionalGeneration, PixtralImageProcessorPil,
                              PixtralVisionConfig)

    vision = PixtralVisionConfig(image_size=56, patch_size=14, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, head_dim=8)
    text = dict(model_type="mistral", vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
                bos_token_id=2, eos_token_id=3, pad_token_id=0)
    config = Mistral3Config(vision_config=vision.to_dict(), text_config=text, image_token_index=IMAGE_TOKEN_ID,
                            spatial_merge_size=2, vision_feature_layer=-1)
    torch.manual_seed(0)
    Mistral3ForConditionalGeneration(config).save_pretrained(directory)
    PixtralImageProcessorPil(size={"longest_edge": 56}, patch_size=14).save_pretrained(directory)
    mistral_tokenizer().save_pretrained(directory)


def mistral3_processor(directory):
    """Stands in for ``PixtralProcessor`` (which needs torchvision): tokenizer, image processor, chat template
    and Pixtral's image tokens ([IMG], [IMG_BREAK], [IMG_END])."""
    from transformers import AutoImageProcessor, PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(directory)
    processor = VideoHostProcessor(tokenizer, AutoImageProcessor.from_pretrained(directory), None, "[IMG]", None)
    processor.image_break_token, processor.image_end_token = "[IMG_BREAK]", "[IMG_END]"
    return processor


BUILDERS["mistral3"] = build_mistral3
STAND_IN_PROCESSORS["mistral3"] = mistral3_processor
HOST_CASES.append(HostCase("mistral3"))


# ---------------------------------------------------------------------- a family registered from user code


def build_vipllava(directory):
    from transformers import CLIPImageProcessorPil, LlavaProcessor, VipLlavaConfig, VipLlavaForConditionalGeneration

    config = VipLlavaConfig(vision_config=clip_vision(), text_config=llama(), image_token_id=IMAGE_TOKEN_ID,
                            vision_feature_layers=[-2, -1])
    torch.manual_seed(0)
    VipLlavaForConditionalGeneration(config).save_pretrained(directory)
    images = CLIPImageProcessorPil(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
    LlavaProcessor(image_processor=images, tokenizer=tokenizer(), patch_size=14, vision_feature_select_strategy="default",
                   num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE).save_pretrained(directory)


BUILDERS["vipllava"] = build_vipllava
HOST_CASES.append(HostCase("vipllava", user_family=True))


# ---------------------------------------------------------------------- Gemma 4


def build_gemma4(directory):
    from transformers import (Gemma4Config, Gemma4ForConditionalGeneration, Gemma4ImageProcessorPil,
                              Gemma4VisionConfig)

    vision = Gemma4VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=4, head_dim=8, patch_size=14, pooling_kernel_size=2,
                                position_embedding_size=64)
    text = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, global_head_dim=16, max_position_embeddings=256, bos_token_id=2,
                eos_token_id=1, pad_token_id=0, sliding_window=8, layer_types=["sliding_attention", "full_attention"],
                vocab_size_per_layer_input=VOCAB, hidden_size_per_layer_input=8, use_bidirectional_attention="vision")
    config = Gemma4Config(text_config=text, vision_config=vision.to_dict(), image_token_id=IMAGE_TOKEN_ID,
                          boi_token_id=GEMMA_BOI_ID, eoi_token_id=GEMMA_EOI_ID, video_token_id=VOCAB - 1)
    torch.manual_seed(0)
    Gemma4ForConditionalGeneration(config).save_pretrained(directory)
    Gemma4ImageProcessorPil(patch_size=14, max_soft_tokens=70, pooling_kernel_size=2).save_pretrained(directory)
    gemma_tokenizer().save_pretrained(directory)


def gemma4_processor(directory):
    """Stands in for ``Gemma4Processor`` (whose video processor needs torchvision): tokenizer, image
    processor, chat template and image token (``<image_soft_token>``; the markers are the config's)."""
    from transformers import AutoImageProcessor, PreTrainedTokenizerFast

    return VideoHostProcessor(PreTrainedTokenizerFast.from_pretrained(directory),
                              AutoImageProcessor.from_pretrained(directory), None, "<image_soft_token>", None)


BUILDERS["gemma4"] = build_gemma4
STAND_IN_PROCESSORS["gemma4"] = gemma4_processor
HOST_CASES.append(HostCase("gemma4"))
