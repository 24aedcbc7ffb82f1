"""The multimodal processors in-process (no engine): placeholders, items, question fields, hashes, bad inputs."""

from __future__ import annotations

import pytest
from PIL import Image

import qfusion_vllm
import tiny
from tiny import chat


def make_processor(host: str, plugin: str | None, kind: str, **overrides):
    from vllm.config import ModelConfig
    from vllm.multimodal import MULTIMODAL_REGISTRY

    qfusion_vllm.register()
    overrides = qfusion_vllm.hf_overrides(plugin, **({} if plugin else {"model_type": kind}), **overrides)
    config = ModelConfig(model=host, hf_overrides=overrides, dtype="float32", max_model_len=512,
                         limit_mm_per_prompt={"image": 2})
    return MULTIMODAL_REGISTRY.create_processor(config)


@pytest.fixture(scope="module", params=["llava", "qwen2_5_vl"])
def kind(request):
    return request.param


@pytest.fixture(scope="module")
def processor(built, kind):
    artifacts = built(kind)
    return make_processor(artifacts.host, artifacts.plugin, kind)


def run(processor, kind: str, request: tiny.Request, text: str | None = None):
    items = processor.info.parse_mm_data({"image": [Image.open(p).convert("RGB") for p in request.images]})
    return processor(text or tiny.prompt(kind, request), items,
                     hf_processor_mm_kwargs=request.mm_processor_kwargs or {})


def questions_of(output) -> list[list[int]]:
    """Per image item, its question ids, one list per question."""
    out = []
    for item in output["mm_kwargs"]["image"]:
        ids, lengths = item["qfusion_question_ids"].data, item["qfusion_question_lengths"].data
        out.append([q.tolist() for q in ids.split(lengths.tolist())])
    return out


def ids(kind: str, text: str) -> list[int]:
    return tiny.tokenizer(kind)(text, add_special_tokens=False)["input_ids"]


def test_image_becomes_m_placeholders_and_carries_its_question(processor, kind, built):
    out = run(processor, kind, chat("c", ("what is this ?", built(kind).images[:1])))
    assert out["prompt_token_ids"].count(tiny.IMAGE_TOKEN_ID) == tiny.M
    assert [p.length for p in out["mm_placeholders"]["image"]] == [tiny.M]
    assert questions_of(out) == [[ids(kind, "what is this ?")]]


def test_follow_ups_are_items_of_their_own_with_n_placeholders_and_the_questions_so_far(processor, kind, built):
    image = built(kind).images[:1]
    out = run(processor, kind, chat("c", ("what is this ?", image), "a dog", "what color is it ?", "red", "how many ?"))
    assert [p.length for p in out["mm_placeholders"]["image"]] == [tiny.M, tiny.N, tiny.N]
    q = [ids(kind, text) for text in ("what is this ?", "what color is it ?", "how many ?")]
    assert questions_of(out) == [q[:1], q[:2], q]
    assert len(set(out["mm_hashes"]["image"])) == 3


def test_items_of_earlier_turns_keep_their_hashes_in_a_later_request(processor, kind, built):
    image = built(kind).images[:1]
    turn2 = run(processor, kind, chat("c", ("what is this ?", image), "a dog", "what color is it ?"))
    turn3 = run(processor, kind, chat("c", ("what is this ?", image), "a dog", "what color is it ?", "red", "how many ?"))
    assert turn3["mm_hashes"]["image"][:2] == turn2["mm_hashes"]["image"]


def test_question_is_part_of_the_multimodal_hash(processor, kind, built):
    image = built(kind).images[:1]
    first = run(processor, kind, chat("c", ("what is this ?", image)))["mm_hashes"]["image"]
    again = run(processor, kind, chat("c", ("what is this ?", image)))["mm_hashes"]["image"]
    other = run(processor, kind, chat("c", ("what color is it ?", image)))["mm_hashes"]["image"]
    assert first == again
    assert first != other


def test_budget_is_part_of_the_hash_and_sets_the_placeholders(processor, kind, built):
    image = built(kind).images[:1]
    default = run(processor, kind, chat("c", ("what is this ?", image), "a dog", "red ?"))
    small = run(processor, kind, chat("c", ("what is this ?", image), "a dog", "red ?",
                                      mm_processor_kwargs={"qfusion_budget": [3, 1]}))
    assert [p.length for p in small["mm_placeholders"]["image"]] == [3, 1]
    assert not set(small["mm_hashes"]["image"]) & set(default["mm_hashes"]["image"])


def test_question_ends_at_the_end_of_its_user_turn(processor, kind, built):
    out = run(processor, kind, chat("c", ("what is this ?", built(kind).images[:1]), "a dog", "red ?"))
    assert questions_of(out)[0] == [ids(kind, "what is this ?")]


def test_question_end_can_be_set_in_the_host_config(built):
    artifacts = built("llava")
    processor = make_processor(artifacts.host, artifacts.plugin, "llava", qfusion_question_end="?")
    out = run(processor, "llava", chat("c", ("what is this ?", artifacts.images[:1])))
    assert questions_of(out) == [[ids("llava", "what is this")]]


@pytest.mark.parametrize("budget", [3, [0, 0], [17, 2], [2, 4], ["4", 2], [4, 2, 1]])
def test_bad_budget_is_refused_naming_the_argument(processor, kind, built, budget):
    request = chat("c", ("what is this ?", built(kind).images[:1]), mm_processor_kwargs={"qfusion_budget": budget})
    with pytest.raises((ValueError, TypeError), match="qfusion_budget"):
        run(processor, kind, request)


def test_image_without_question_is_refused(processor, kind, built):
    with pytest.raises(ValueError, match="has no question text"):
        run(processor, kind, chat("c", ("", built(kind).images[:1])))


def test_more_images_than_placeholders_is_refused(processor, kind, built):
    request = chat("c", ("what is this ?", built(kind).images[:2]))
    with pytest.raises(ValueError, match="prompt: 1 image placeholders for 2 images"):
        run(processor, kind, request, text=tiny.prompt(kind, chat("c", ("what is this ?", built(kind).images[:1]))))


def test_without_plugin_every_vision_token_is_a_placeholder(built, kind):
    artifacts = built(kind)
    host = make_processor(artifacts.host, None, kind)
    out = run(host, kind, chat("c", ("what is this ?", artifacts.images[:1]), "a dog", "red ?"))
    image = Image.open(artifacts.images[0]).convert("RGB")
    if kind == "llava":
        count = (tiny.LLAVA_IMAGE_SIZE // 14) ** 2
    else:
        count = int(tiny.HostProcessor(artifacts.host).image_processor(images=[image])["image_grid_thw"].prod()) // 4
    assert [p.length for p in out["mm_placeholders"]["image"]] == [count]  # no follow-up items
    assert "qfusion_question_ids" not in out["mm_kwargs"]["image"][0]
    with pytest.raises(ValueError, match="'qfusion_budget' needs a qfusion plugin"):
        run(host, kind, chat("c", ("what is this ?", artifacts.images[:1]), mm_processor_kwargs={"qfusion_budget": [3, 1]}))


def test_profiling_inputs_are_the_largest_images_at_the_largest_budget(processor):
    dummy = processor.get_dummy_mm_inputs({"image": 2})  # a raw prompt: one turn, both images fused with it
    assert [p.length for p in dummy["mm_placeholders"]["image"]] == [16, 16]  # codebook_size
