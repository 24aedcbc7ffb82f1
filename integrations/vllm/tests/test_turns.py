"""qfusion_vllm.turns on the tiny hosts' tokenizers: user turns found from the chat template, and the
items and placeholder runs a conversation needs (no engine)."""

from __future__ import annotations

import pytest

import tiny
from qfusion_vllm.turns import Item, TurnMarkers, find, plan


def markers(kind: str) -> TurnMarkers:
    tok = tiny.tokenizer(kind)
    return TurnMarkers.from_chat_template(tok, tok.chat_template, "<image>" if kind == "llava" else "<|image_pad|>")


def ids(kind: str, text: str) -> list[int]:
    return tiny.tokenizer(kind)(text, add_special_tokens=False)["input_ids"]


def layout(kind: str, request: tiny.Request, marks: TurnMarkers | None = None):
    tok = tiny.tokenizer(kind)
    image = tiny.IMAGE_TOKEN_ID
    skip = {image} if kind == "llava" else {image, 6, 7}
    run = [image] if kind == "llava" else [6, image, 7]
    return plan(ids(kind, tiny.prompt(kind, request)), marks or markers(kind), {image: "image"}, lambda _: run, skip,
                lambda pieces: [t for p in pieces for t in p], lambda t: not tok.decode([t]).strip())


def test_markers_are_read_from_the_chat_template():
    assert markers("llava") == TurnMarkers(tuple(ids("llava", "USER :")), tuple(ids("llava", "ASSISTANT :")))
    qwen = markers("qwen2_5_vl")  # the first user turn follows a system turn: the opening includes its end
    assert qwen == TurnMarkers(tuple(ids("qwen2_5_vl", "<|im_end|> <|im_start|> user")),
                               tuple(ids("qwen2_5_vl", "<|im_end|> <|im_start|> assistant")))


def test_user_turns_span_the_user_texts_only():
    kind = "llava"
    prompt = ids(kind, "<s> USER : what is this ? ASSISTANT : a dog </s> USER : red ? ASSISTANT :")
    turns = markers(kind).user_turns(prompt)
    assert [prompt[a:b] for a, b in turns] == [ids(kind, "what is this ?"), ids(kind, "red ?")]


def test_a_raw_prompt_without_the_templates_turns_is_one_turn():
    kind = "qwen2_5_vl"
    prompt = ids(kind, "<|vision_start|> <|image_pad|> <|vision_end|> what is this ? <|image_pad|> how many ?")
    assert markers(kind).user_turns(prompt) == [(0, len(prompt))]


def test_without_a_template_the_prompt_is_one_turn_up_to_the_given_end():
    tok = tiny.tokenizer("llava")
    marks = TurnMarkers.from_chat_template(tok, None, "<image>", end_text="?")
    assert marks == TurnMarkers(None, tuple(ids("llava", "?")))
    prompt = ids("llava", "<image> what is this ? a dog")
    assert marks.user_turns(prompt) == [(0, prompt.index(ids("llava", "?")[0]))]


def test_a_template_that_merges_turns_is_refused():
    tok = tiny.tokenizer("llava")
    with pytest.raises(ValueError, match="cannot find the user turns"):
        TurnMarkers.from_chat_template(tok, "{% for m in messages %}{{ m['content'] }}{% endfor %}", "<image>")


@pytest.mark.parametrize("kind", ["llava", "qwen2_5_vl"])
def test_each_follow_up_question_gets_a_run_and_an_item_with_the_questions_so_far(kind):
    request = tiny.chat("c", ("what is this ?", ["a.png"]), "a dog", "what color is it ?", "red", "how many ?")
    out = layout(kind, request)
    q1, q2, q3 = (tuple(ids(kind, q)) for q in ("what is this ?", "what color is it ?", "how many ?"))
    assert out.items == {"image": [Item(0, (q1,)), Item(0, (q1, q2)), Item(0, (q1, q2, q3))]}
    follow_up = tiny.chat("c", ("what is this ?", ["a.png"]), "a dog", ("what color is it ?", ["a.png"]), "red",
                          ("how many ?", ["a.png"]))
    assert out.prompt == ids(kind, tiny.prompt(kind, follow_up))  # a run right before each later question


def test_a_turn_with_new_images_is_about_them_and_later_turns_about_the_latest():
    kind = "qwen2_5_vl"
    request = tiny.chat("c", ("one", ["a.png", "b.png"]), "x", ("two", ["c.png"]), "y", "three")
    items = layout(kind, request).items["image"]
    one, two, three = (tuple(ids(kind, q)) for q in ("one", "two", "three"))
    assert items == [Item(0, (one,)), Item(1, (one,)), Item(2, (two,)), Item(2, (two, three))]


def test_question_pieces_around_the_placeholders_are_joined():
    kind = "llava"
    prompt = ids(kind, "USER : what <image> is this ? ASSISTANT :")
    tok = tiny.tokenizer(kind)
    out = plan(prompt, markers(kind), {tiny.IMAGE_TOKEN_ID: "image"}, lambda _: [tiny.IMAGE_TOKEN_ID],
               {tiny.IMAGE_TOKEN_ID}, lambda pieces: [t for p in pieces for t in p] + [-len(pieces)],
               lambda t: not tok.decode([t]).strip())
    assert out.items["image"] == [Item(0, (tuple(ids(kind, "what is this ?")) + (-2,),))]


def test_image_outside_the_user_turns_is_refused():
    kind = "llava"
    prompt = ids(kind, "<image> USER : what is this ? ASSISTANT :")
    with pytest.raises(ValueError, match="outside the user turns"):
        plan(prompt, markers(kind), {tiny.IMAGE_TOKEN_ID: "image"}, lambda _: [], {tiny.IMAGE_TOKEN_ID},
             lambda pieces: [1], lambda t: False)


def test_turn_without_question_text_is_refused():
    with pytest.raises(ValueError, match="user turn 1 about an image has no question text"):
        layout("llava", tiny.chat("c", ("what is this ?", ["a.png"]), "a dog", ""))


def test_find_returns_the_first_occurrence_at_or_after_start():
    assert [find([1, 2, 1, 2], [1, 2], start) for start in (0, 1, 3)] == [0, 2, -1]
