"""vLLM (CPU build, fp32, greedy) against the same host with the plugin attached in transformers.

One engine serves every case, round after round (each round is one continuous batch), so later
rounds meet the processor and encoder caches that earlier rounds filled.
"""

from __future__ import annotations

import os

import pytest

import qfusion_vllm
import tiny
from conftest import engine_outputs
from tiny import Request

STEPS = 8


def prompt(question: str) -> str:
    return f"USER : <image> {question} ASSISTANT :"


def requests(images: list[str]) -> dict[str, list[Request]]:
    """The rounds, by name, in the order the engine runs them."""
    def ask(name, image, question, **kwargs):
        return Request(name, prompt(question), images[image], question, **kwargs)

    follow_up = Request("follow_up", "USER : <image> what is this ? ASSISTANT : a dog </s> USER : what color is it ? "
                        "ASSISTANT :", images[2], "what is this ?")
    return {
        "single": [ask("single", 0, "what is this ?")],
        "batch": [ask("batch0", 1, "how many are there ?"), ask("batch1", 2, "what color is the dog ?"),
                  ask("batch2", 3, "is it a cat ?"), ask("batch3", 0, "what color is it ?")],
        "first_question": [ask("first_question", 1, "what is this ?")],
        "second_question": [ask("second_question", 1, "is this a big picture ?")],
        "follow_up": [follow_up],
        "budget": [ask("budget3", 3, "what is this ?", mm_processor_kwargs={"qfusion_budget": [3, 2]}),
                   ask("budget_default", 3, "what is this ?"),
                   ask("budget12", 3, "what is this ?", mm_processor_kwargs={"qfusion_budget": [12, 2]})],
        "again": [ask("single_again", 0, "what is this ?")],
    }


@pytest.fixture(scope="module")
def served(artifacts):
    rounds = requests(artifacts.images)
    outputs = engine_outputs(artifacts.root, "offline", artifacts.host, qfusion_vllm.hf_overrides(artifacts.plugin),
                             list(rounds.values()), STEPS)
    by_name = {r.name: r for round_ in rounds.values() for r in round_}
    return by_name, outputs


def check(artifacts, served, name: str, budget: tuple[int, int] | None = None) -> list[int]:
    by_name, outputs = served
    request = by_name[name]
    want = tiny.reference(artifacts.host, artifacts.plugin, request, STEPS, budget=budget)
    assert outputs[name]["tokens"] == want, f"{name}: vLLM {outputs[name]['tokens']} != transformers {want}"
    return want


def test_single_request_greedy_tokens_equal_transformers(artifacts, served):
    check(artifacts, served, "single")
    text_tokens = len(prompt("what is this ?").split()) - 1
    assert served[1]["single"]["prompt_tokens"] == text_tokens + tiny.M  # <image> became m placeholders


def test_batch_of_different_images_and_questions_equals_transformers(artifacts, served):
    for name in ("batch0", "batch1", "batch2", "batch3"):
        check(artifacts, served, name)


def test_two_questions_about_one_image_never_share_fused_tokens(artifacts, served):
    check(artifacts, served, "first_question")
    right = check(artifacts, served, "second_question")
    by_name, _ = served
    # what the second request would say with the first question's fused tokens (a shared cache entry)
    wrong = tiny.reference(artifacts.host, artifacts.plugin, by_name["second_question"], STEPS,
                           question=by_name["first_question"].question)
    assert wrong != right, "the test cannot tell shared fused tokens apart; pick other questions"


def test_repeated_request_reuses_cache_with_the_same_tokens(artifacts, served):
    assert served[1]["single_again"]["tokens"] == served[1]["single"]["tokens"]


def test_follow_up_turn_sees_the_image_fused_with_its_own_turn(artifacts, served):
    check(artifacts, served, "follow_up")


def test_per_request_budget_equals_the_host_call_with_that_budget(artifacts, served):
    check(artifacts, served, "budget3", budget=(3, 2))
    check(artifacts, served, "budget12", budget=(12, 2))  # above the plugin's m: the encoder budget allows it
    check(artifacts, served, "budget_default")
    assert served[1]["budget_default"]["prompt_tokens"] - served[1]["budget3"]["prompt_tokens"] == tiny.M - 3


def test_host_without_plugin_equals_transformers_host(artifacts):
    rounds = [[Request("host0", prompt("what is this ?"), artifacts.images[0], "")],
              [Request("host1", prompt("how many are there ?"), artifacts.images[1], ""),
               Request("host2", prompt("what color is it ?"), artifacts.images[2], "")]]
    outputs = engine_outputs(artifacts.root, "host", artifacts.host, qfusion_vllm.hf_overrides(), rounds, STEPS)
    for request in (r for round_ in rounds for r in round_):
        assert outputs[request.name]["tokens"] == tiny.host_reference(artifacts.host, request, STEPS), request.name


def test_plugin_that_does_not_fit_the_host_is_refused_at_load(artifacts):
    wide = tiny.build_host(os.path.join(artifacts.root, "host-wide"), text_hidden=192)
    plugin = tiny.build_plugin(wide, os.path.join(artifacts.root, "plugin-wide"))
    from conftest import run_engine

    done = run_engine(artifacts.root, "bad", artifacts.host, qfusion_vllm.hf_overrides(plugin),
                      [[Request("x", prompt("what is this ?"), artifacts.images[0], "what is this ?")]], 1)
    assert done.returncode != 0
    assert "has vision_dim=192, this host needs vision_dim=128" in done.stdout + done.stderr
