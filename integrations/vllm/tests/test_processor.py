"""The multimodal processor in-process (no engine): placeholders, question fields, hashes, bad inputs."""

from __future__ import annotations

import pytest
from PIL import Image

import qfusion_vllm
import tiny


def make_processor(host: str, plugin: str | None, **overrides):
    from vllm.config import ModelConfig
    from vllm.multimodal import MULTIMODAL_REGISTRY

    qfusion_vllm.register()
    config = ModelConfig(model=host, hf_overrides=qfusion_vllm.hf_overrides(plugin, **overrides), dtype="float32",
                         max_model_len=512, limit_mm_per_prompt={"image": 2})
    return MULTIMODAL_REGISTRY.create_processor(config)


@pytest.fixture(scope="module")
def processor(artifacts):
    return make_processor(artifacts.host, artifacts.plugin)


def run(processor, text: str, *images: str, **mm_kwargs):
    items = processor.info.parse_mm_data({"image": [Image.open(image).convert("RGB") for image in images]})
    return processor(text, items, hf_processor_mm_kwargs=mm_kwargs)


def question_of(output, item: int = 0) -> list[int]:
    return output["mm_kwargs"]["image"][item]["qfusion_question_ids"].data.tolist()


def ids(text: str) -> list[int]:
    return tiny.tokenizer()(text, add_special_tokens=False)["input_ids"]


def test_image_becomes_m_placeholders_and_carries_its_question(processor, artifacts):
    out = run(processor, "USER : <image> what is this ? ASSISTANT :", artifacts.images[0])
    assert out["prompt_token_ids"].count(tiny.IMAGE_TOKEN_ID) == tiny.M
    assert out["mm_placeholders"]["image"][0].length == tiny.M
    assert question_of(out) == ids("what is this ?")


def test_each_image_of_a_prompt_is_fused_with_the_text_after_it(processor, artifacts):
    out = run(processor, "USER : <image> what is this ? <image> how many are there ? ASSISTANT :",
              artifacts.images[0], artifacts.images[1])
    assert [question_of(out, i) for i in range(2)] == [ids("what is this ?"), ids("how many are there ?")]
    assert [p.length for p in out["mm_placeholders"]["image"]] == [tiny.M, tiny.M]


def test_question_end_can_be_set_in_the_host_config(artifacts):
    processor = make_processor(artifacts.host, artifacts.plugin, qfusion_question_end="?")
    out = run(processor, "USER : <image> what is this ? ASSISTANT :", artifacts.images[0])
    assert question_of(out) == ids("what is this")


def test_question_is_part_of_the_multimodal_hash(processor, artifacts):
    image = artifacts.images[0]
    first = run(processor, "USER : <image> what is this ? ASSISTANT :", image)["mm_hashes"]["image"]
    again = run(processor, "USER : <image> what is this ? ASSISTANT :", image)["mm_hashes"]["image"]
    other = run(processor, "USER : <image> what color is it ? ASSISTANT :", image)["mm_hashes"]["image"]
    assert first == again
    assert first != other


def test_budget_is_part_of_the_hash_and_sets_the_placeholders(processor, artifacts):
    image, text = artifacts.images[0], "USER : <image> what is this ? ASSISTANT :"
    default, small = run(processor, text, image), run(processor, text, image, qfusion_budget=[3, 2])
    assert small["prompt_token_ids"].count(tiny.IMAGE_TOKEN_ID) == 3
    assert small["mm_hashes"] != default["mm_hashes"]


def test_question_ends_at_the_end_of_its_user_turn(processor, artifacts):
    out = run(processor, "USER : <image> what is this ? ASSISTANT : a dog </s> USER : what color is it ? ASSISTANT :",
              artifacts.images[0])
    assert question_of(out) == ids("what is this ?")


@pytest.mark.parametrize("budget", [3, [0, 0], [17, 2], [2, 4], ["4", 2], [4, 2, 1]])
def test_bad_budget_is_refused_naming_the_argument(processor, artifacts, budget):
    with pytest.raises(ValueError, match="qfusion_budget"):
        run(processor, "USER : <image> what is this ? ASSISTANT :", artifacts.images[0], qfusion_budget=budget)


def test_image_without_question_is_refused(processor, artifacts):
    with pytest.raises(ValueError, match="has no question"):
        run(processor, "USER : <image> ASSISTANT :", artifacts.images[0])


def test_without_plugin_every_vision_token_is_a_placeholder(artifacts):
    host = make_processor(artifacts.host, None)
    out = run(host, "USER : <image> what is this ? ASSISTANT :", artifacts.images[0])
    assert out["prompt_token_ids"].count(tiny.IMAGE_TOKEN_ID) == (tiny.IMAGE_SIZE // 14) ** 2
    assert "qfusion_question_ids" not in out["mm_kwargs"]["image"][0]
