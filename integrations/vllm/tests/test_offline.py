"""vLLM (CPU build, fp32, greedy) against the same host with the plugin attached in transformers.

For each served host type one engine serves every case, round after round (each round is one
continuous batch), so later rounds meet the processor, encoder and prefix caches earlier rounds
filled. The prompts vLLM ends up with (placeholders expanded, follow-up runs inserted) must equal
the transformers path's input ids, and the greedy tokens its tokens.
"""

from __future__ import annotations

import os

import pytest

import qfusion
import qfusion_vllm
import tiny
from conftest import engine_outputs, run_engine
from engine_cases import BLOCK_SIZE
from tiny import chat

STEPS = 6


def rounds(images: list[str]) -> dict[str, list[tiny.Request]]:
    """The rounds, by name, in the order the engine runs them."""
    def ask(name, image, question, **kwargs):
        return chat(name, (question, [images[image]]), **kwargs)

    return {
        "single": [ask("single", 0, "what is this ?")],
        "batch": [ask("batch0", 1, "how many are there ?"), ask("batch1", 2, "what color is the dog ?"),
                  ask("batch2", 3, "is it a cat ?"), ask("batch3", 0, "what color is it ?")],
        "images": [chat("two_images", ("what is in the picture ?", images[:2])),
                   chat("images_in_two_turns", ("what is this ?", images[2:3]), "a cat", ("and this ?", images[3:4]),
                        "a dog", "are there two ?")],
        "first_question": [ask("first_question", 1, "what is this ?")],
        "second_question": [ask("second_question", 1, "is this a big picture ?")],
        "turn2": [chat("turn2", ("what is in the picture on the left ?", images[2:3]), "a dog and a cat",
                       "what color is it ?")],
        "turn3": [chat("turn3", ("what is in the picture on the left ?", images[2:3]), "a dog and a cat",
                       "what color is it ?", "red", "how many are there ?")],
        "budget": [chat("budget3", ("what is this ?", images[3:4]), "a dog", "is it red ?",
                        mm_processor_kwargs={"qfusion_budget": [3, 1]}),
                   ask("budget_default", 3, "what is this ?"),
                   ask("budget12", 3, "what is this ?", mm_processor_kwargs={"qfusion_budget": [12, 2]})],
        "again": [ask("single_again", 0, "what is this ?")],
    }


@pytest.fixture(scope="module", params=tiny.KINDS)
def served(request, built):
    artifacts = built(request.param)
    cases = rounds(artifacts.images)
    outputs = engine_outputs(artifacts.kind, artifacts.root, "offline", artifacts.host,
                             qfusion_vllm.hf_overrides(artifacts.plugin), list(cases.values()), STEPS)
    by_name = {r.name: r for round_ in cases.values() for r in round_}
    rounds_by_name = dict(zip(cases, outputs.pop("_rounds")))
    return artifacts, by_name, outputs, rounds_by_name


def check(served, name: str) -> dict:
    """Assert that vLLM's prompt ids and greedy tokens for ``name`` equal the transformers path's."""
    artifacts, by_name, outputs, _ = served
    want = tiny.reference(artifacts.host, artifacts.plugin, by_name[name], STEPS)
    got = outputs[name]
    assert got["prompt"] == want["prompt"], f"{artifacts.kind} {name}: prompt ids differ"
    assert got["tokens"] == want["tokens"], f"{artifacts.kind} {name}: vLLM {got['tokens']} != transformers {want['tokens']}"
    return want


def placeholders(served, name: str) -> int:
    return served[2][name]["prompt"].count(tiny.IMAGE_TOKEN_ID)


def test_single_request_greedy_tokens_equal_transformers(served):
    check(served, "single")
    assert placeholders(served, "single") == tiny.M  # the image became m placeholders


def test_batch_of_different_images_and_questions_equals_transformers(served):
    for name in ("batch0", "batch1", "batch2", "batch3"):
        check(served, name)


def test_several_images_each_fused_with_its_turns_questions_equal_transformers(served):
    check(served, "two_images")
    assert placeholders(served, "two_images") == 2 * tiny.M
    check(served, "images_in_two_turns")  # the follow-up is about the second image only
    assert placeholders(served, "images_in_two_turns") == 2 * tiny.M + tiny.N


def test_follow_up_chat_gets_n_fused_tokens_per_later_question_equal_transformers(served):
    check(served, "turn2")
    check(served, "turn3")
    assert placeholders(served, "turn3") == tiny.M + 2 * tiny.N


def test_follow_up_request_reuses_the_caches_of_the_conversation_so_far(served):
    *_, outputs, by_round = served
    # the turn-2 request's prompt is a prefix of the turn-3 one: its full blocks come from the prefix cache
    assert outputs["turn3"]["prompt"][: len(outputs["turn2"]["prompt"])] == outputs["turn2"]["prompt"]
    assert outputs["turn3"]["cached_tokens"] >= len(outputs["turn2"]["prompt"]) // BLOCK_SIZE * BLOCK_SIZE > 0
    # its items of the first two questions have the hashes of the turn-2 request's: only the third is new
    assert by_round["turn3"] == {"vllm:mm_cache_queries": 3, "vllm:mm_cache_hits": 2}


def test_two_questions_about_one_image_never_share_fused_tokens(served):
    artifacts, by_name, *_ = served
    check(served, "first_question")
    right = check(served, "second_question")["tokens"]
    # what the second request would say with the first question's fused tokens (a shared cache entry)
    model = tiny.load_host(artifacts.host)
    qfusion.attach(model, artifacts.plugin)
    second = tiny.reference_inputs(artifacts.host, model, by_name["second_question"])
    first = tiny.reference_inputs(artifacts.host, model, by_name["first_question"])
    swapped = dict(second, qfusion_input_ids=first["qfusion_input_ids"],
                   qfusion_attention_mask=first["qfusion_attention_mask"])
    wrong = tiny.greedy(model, swapped, STEPS, tiny.SUPPRESS[artifacts.kind])
    assert wrong != right, "the test cannot tell shared fused tokens apart"


def test_repeated_request_reuses_cache_with_the_same_tokens(served):
    *_, outputs, by_round = served
    assert outputs["single_again"]["tokens"] == outputs["single"]["tokens"]
    assert by_round["again"] == {"vllm:mm_cache_queries": 1, "vllm:mm_cache_hits": 1}


def test_per_request_budget_equals_the_host_call_with_that_budget(served):
    check(served, "budget3")  # m = 3, and its follow-up n = 1
    assert placeholders(served, "budget3") == 3 + 1
    check(served, "budget12")  # above the plugin's m: the encoder budget allows up to codebook_size
    check(served, "budget_default")
    assert placeholders(served, "budget12") == 12


@pytest.mark.parametrize("kind", ["llava", "qwen2_5_vl"])
def test_host_without_plugin_equals_transformers_host(built, kind):
    artifacts = built(kind)
    cases = [[chat("host0", ("what is this ?", artifacts.images[:1]))],
             [chat("host1", ("how many are there ?", artifacts.images[1:2])),
              chat("host2", ("what color is it ?", artifacts.images[2:3]))]]
    outputs = engine_outputs(kind, artifacts.root, "host", artifacts.host, qfusion_vllm.hf_overrides(model_type=kind),
                             cases, STEPS)
    for request in (r for round_ in cases for r in round_):
        assert outputs[request.name]["tokens"] == tiny.host_reference(kind, artifacts.host, request, STEPS), request.name


def test_plugin_that_does_not_fit_the_host_is_refused_at_load(built):
    artifacts = built("llava")
    wide = tiny.build_host("llava", os.path.join(artifacts.root, "host-wide"), text_hidden=192)
    plugin = tiny.build_plugin(wide, os.path.join(artifacts.root, "plugin-wide"))
    done = run_engine("llava", artifacts.root, "bad", artifacts.host, qfusion_vllm.hf_overrides(plugin),
                      [[chat("x", ("what is this ?", artifacts.images[:1]))]], 1)
    assert done.returncode != 0
    assert "has vision_dim=192, this host needs vision_dim=128" in done.stdout + done.stderr



def test_qwen3_vl_host_without_plugin_is_refused_at_load(built):
    artifacts = built("qwen3_vl")
    done = run_engine("qwen3_vl", artifacts.root, "alone", artifacts.host, qfusion_vllm.hf_overrides(model_type="qwen3_vl"),
                      [[chat("x", ("what is this ?", artifacts.images[:1]))]], 1)
    assert done.returncode != 0
    assert "qfusion_plugin: required for a 'qwen3_vl' host" in done.stdout + done.stderr
