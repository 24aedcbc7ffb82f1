"""qfusion.processor.QFusionProcessor with the tiny hosts' processors (saved and loaded back)."""

import os

import pytest
import torch
from conftest_hosts import IMAGE_TOKEN_ID, fusion_config, images, tokenizer

import qfusion
from qfusion import QFusionProcessor
from qfusion.inputs import placeholder_runs
from qfusion.vision import hd_views

CONVERSATION = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is this ?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "a cat ."}]},
    {"role": "user", "content": "what color is it ?"},
    {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
]


@pytest.fixture(scope="module")
def llava_processor(hosts):
    return hosts.processor("llava")


def test_conversation_puts_m_then_n_placeholders_before_each_user_turn(llava_processor):
    processor = QFusionProcessor(llava_processor, m=5, n=3)
    batch = processor(images=images(1), conversations=CONVERSATION, return_labels=True)
    ids = batch["input_ids"][0]
    assert placeholder_runs(ids, IMAGE_TOKEN_ID) == [5, 3]
    tok = llava_processor.tokenizer
    text = tok.decode(ids)
    assert text.index("<image>") < text.index("what is this") < text.index("a cat") < text.rindex("<image>")
    assert text.rindex("<image>") < text.index("what color")
    after = [int(i) for i in ids[(ids == IMAGE_TOKEN_ID).nonzero()[-1] + 1:][:5]]
    assert after == tok("what color is it ?", add_special_tokens=False)["input_ids"]

    # the questions are the user turns, tokenized with the host tokenizer, right-padded (B, G, L)
    expected = [tok(q, add_special_tokens=False)["input_ids"] for q in ("what is this ?", "what color is it ?")]
    assert batch["qfusion_input_ids"].shape == (1, 2, 5)
    for g, want in enumerate(expected):
        row = batch["qfusion_input_ids"][0, g][batch["qfusion_attention_mask"][0, g].bool()]
        assert row.tolist() == want

    # labels: the assistant answers and the eos closing each, nothing else
    labels = batch["labels"][0]
    scored = ids[labels != -100].tolist()
    assert scored == tok("a cat .", add_special_tokens=False)["input_ids"] + [tok.eos_token_id] + \
        tok("red", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert not text.rstrip().endswith("ASSISTANT :")  # last turn is the assistant's: no generation prompt


def test_labels_find_each_answer_after_its_own_question(llava_processor):
    processor = QFusionProcessor(llava_processor, m=2, n=1)
    conversation = [{"role": "user", "content": "is it red ?"}, {"role": "assistant", "content": "red"}]
    batch = processor(images=images(1), conversations=conversation, return_labels=True)
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    red = llava_processor.tokenizer.convert_tokens_to_ids("red")
    positions = (ids == red).nonzero().flatten().tolist()
    assert len(positions) == 2 and labels[positions[0]] == -100 and labels[positions[1]] == red


def test_text_only_conversations_get_the_chat_template_and_answer_labels_without_placeholders(llava_processor):
    processor = QFusionProcessor(llava_processor, m=5, n=3)
    text_only = [{"role": "user", "content": "how many are there ?"},
                 {"role": "assistant", "content": [{"type": "text", "text": "two ."}]}]
    batch = processor.text_inputs([text_only, text_only[:1]], return_labels=True, padding_side="right")
    tok = llava_processor.tokenizer
    assert set(batch) == {"input_ids", "attention_mask", "labels"} and (batch["input_ids"] != IMAGE_TOKEN_ID).all()
    rendered = tok(tok.apply_chat_template(text_only, tokenize=False), add_special_tokens=False)["input_ids"]
    assert batch["input_ids"][0][batch["attention_mask"][0].bool()].tolist() == rendered
    labels = batch["labels"][0]
    assert tok.decode(labels[labels != -100]) == "two . </s>" and (batch["labels"][1] == -100).all()
    generation = processor.text_inputs([text_only[:1]])
    assert tok.decode(generation["input_ids"][0]).endswith("ASSISTANT :")  # the last turn is the user's
    with pytest.raises(ValueError, match=r"conversations\[0\]: has an image or video item; text_inputs takes"):
        processor.text_inputs([CONVERSATION])


def test_plain_questions_in_every_form(llava_processor):
    processor = QFusionProcessor(llava_processor, m=4, n=2)
    one = processor(images=images(1), questions="what is this ?")
    assert one["qfusion_input_ids"].shape[:2] == (1, 1)
    assert placeholder_runs(one["input_ids"][0], IMAGE_TOKEN_ID) == [4]
    per_image = processor(images=images(2), questions=["what is this ?", "red"])
    assert per_image["qfusion_attention_mask"].any(-1).tolist() == [[True], [True]]
    nested = processor(images=images(3), questions=[["what is this ?", "how many", "red"], "blue", ["left", "big"]],
                       padding_side="left", prompt_format="{question} ASSISTANT :")
    assert nested["qfusion_input_ids"].shape[:2] == (3, 3)
    assert nested["qfusion_attention_mask"].any(-1).tolist() == [[True] * 3, [True, False, False], [True, True, False]]
    assert (nested["input_ids"] == IMAGE_TOKEN_ID).sum(-1).tolist() == [4 + 2 * 2, 4, 4 + 2]
    assert nested["attention_mask"][1, 0] == 0 and nested["attention_mask"][:, -1].all()  # left padding
    assert nested["pixel_values"].shape == (3, 3, 56, 56)
    assert "ASSISTANT" in llava_processor.tokenizer.decode(nested["input_ids"][1])


def test_count_mismatch_names_expected_found_and_number_of_images(llava_processor):
    processor = QFusionProcessor(llava_processor, m=4, n=2)
    with pytest.raises(ValueError, match=r"expected \[6, 4\], found \[7, 4\] \(2 images; m=4, n=2"):
        processor(images=images(2), questions=[["<image> what", "red"], "blue"])


def test_model_settings_augment_prefix_and_qformer_inputs(hosts):
    model = hosts.model("instructblip")
    qfusion.attach(model, fusion_config(), mode="augment")
    processor = QFusionProcessor(hosts.processor("instructblip"), model)
    assert (processor.m, processor.n, processor.image_prefix) == (4, 2, model.config.num_query_tokens)
    batch = processor(images=images(2), conversations=[CONVERSATION[:3], CONVERSATION[:1]], padding_side="left")
    assert [placeholder_runs(row, IMAGE_TOKEN_ID) for row in batch["input_ids"]] == [[10, 2], [10]]
    assert batch["qformer_input_ids"].shape[0] == 2
    qtok = hosts.processor("instructblip").qformer_tokenizer
    first = batch["qformer_input_ids"][1][batch["qformer_attention_mask"][1].bool()]
    assert first.tolist() == qtok("what is this ?")["input_ids"]
    smaller = QFusionProcessor(hosts.processor("instructblip"), model, m=3)  # a per-processor budget
    assert smaller.budget == (3, 2)
    batch = smaller(images=images(1), questions=[["what is this ?", "red"]])
    assert placeholder_runs(batch["input_ids"][0], IMAGE_TOKEN_ID) == [model.config.num_query_tokens + 3, 2]
    assert batch["qfusion_budget"] == (3, 2)
    with pytest.raises(ValueError, match="m <= codebook_size=16"):
        QFusionProcessor(hosts.processor("instructblip"), model, m=17)
    with pytest.raises(ValueError, match="1 <= n <= m"):
        QFusionProcessor(hosts.processor("instructblip"), model, m=2, n=3)


def test_separate_question_tokenizer_is_saved_with_the_plugin(llava_processor, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"<unk>": 0, "<bos>": 1, "<eos>": 2, "what": 3, "is": 4, "this": 5, "?": 6},
                                         unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    clip_like = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>",
                                        unk_token="<unk>")
    processor = QFusionProcessor(llava_processor, m=4, n=2, question_tokenizer=clip_like, max_question_length=3)
    batch = processor(images=images(1), questions="what is this ?")
    assert batch["qfusion_input_ids"][0, 0].tolist() == [3, 4, 5]  # its own ids, truncated to 3
    processor.save_pretrained(tmp_path)
    assert os.path.isdir(tmp_path / "question_tokenizer")
    with pytest.raises(ValueError, match="m, n: required"):  # no plugin config beside it, no model
        QFusionProcessor.from_pretrained(tmp_path, llava_processor)
    again = QFusionProcessor.from_pretrained(tmp_path, llava_processor, m=4, n=2)
    reloaded = again(images=images(1), questions="what is this ?")
    assert torch.equal(reloaded["qfusion_input_ids"], batch["qfusion_input_ids"])
    assert (again.m, again.n, again.max_question_length) == (4, 2, 3)


def test_hd_views_are_normalised_like_the_host(llava_processor):
    processor = QFusionProcessor(llava_processor, m=4, n=2, hd_grid=(1, 2))
    image = images(1)[0]
    pixels = processor(images=[image], questions="red")["pixel_values"]
    assert pixels.shape == (1, 3, 3, 56, 56)
    ip = llava_processor.image_processor
    views = hd_views(torch.as_tensor(image).permute(2, 0, 1).float() / 255, grid=(1, 2), size=56, fill=ip.image_mean)
    mean, std = torch.tensor(ip.image_mean)[:, None, None], torch.tensor(ip.image_std)[:, None, None]
    torch.testing.assert_close(pixels[0], (views - mean) / std)


def test_question_tokenizer_must_fit_the_fusion_vocabulary(hosts):
    model = hosts.model("llava")
    adapter = qfusion.attach(model, fusion_config())
    assert adapter.fusion.config.text_vocab_size == model.config.text_config.vocab_size  # filled from the host
    qfusion.detach(model)
    qfusion.attach(model, fusion_config(text_vocab_size=100))
    with pytest.raises(ValueError, match="has 256 tokens, more than the fusion's text_vocab_size=100"):
        QFusionProcessor(hosts.processor("llava"), model)


def test_bad_inputs_raise_clearly(llava_processor):
    with pytest.raises(ValueError, match="m, n: required"):
        QFusionProcessor(llava_processor)
    with pytest.raises(ValueError, match="m, n: expected 1 <= n <= m"):
        QFusionProcessor(llava_processor, m=2, n=3)
    with pytest.raises(TypeError, match=r"m, n: m: expected an integer, got '4' \(str\)"):
        QFusionProcessor(llava_processor, m="4", n=2)
    with pytest.raises(TypeError, match="model: expected a host with a qfusion plugin attached or the host's"):
        QFusionProcessor(llava_processor, object(), m=4, n=2)
    with pytest.raises(ValueError, match="padding_side"):
        QFusionProcessor(llava_processor, m=2, n=1)(images=images(1), questions="red", padding_side="middle")
    with pytest.raises(TypeError, match="host_processor"):
        QFusionProcessor(tokenizer(), m=2, n=1)
    processor = QFusionProcessor(llava_processor, m=4, n=2)
    with pytest.raises(ValueError, match="exactly one"):
        processor(images=images(1), questions="red", conversations=CONVERSATION)
    with pytest.raises(ValueError, match=r"budget: m, n: expected 1 <= n <= m, got m=1, n=2"):
        processor(images=images(1), questions="red", budget=(1, 2))
    with pytest.raises(ValueError, match="one image per sample"):
        processor(images=images(2), questions="red")
    with pytest.raises(ValueError, match="images: required"):
        processor(questions="red")
    with pytest.raises(ValueError, match="return_labels: needs conversations"):
        processor(images=images(1), questions="red", return_labels=True)
    with pytest.raises(ValueError, match="has no user turn"):
        processor(images=images(1), conversations=[{"role": "assistant", "content": "red"}])
    with pytest.raises(TypeError, match=r"questions\[0\]"):
        processor(images=images(1), questions=[[]])
    with pytest.raises(ValueError, match="empty after tokenization"):
        processor(images=images(1), questions=[""])
    llava_processor_without_template = type(llava_processor)(
        image_processor=llava_processor.image_processor, tokenizer=tokenizer(), patch_size=14)
    llava_processor_without_template.tokenizer.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        QFusionProcessor(llava_processor_without_template, m=4, n=2)(images=images(1), conversations=CONVERSATION)
