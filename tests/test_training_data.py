"""qfusion.training.data and .collator: records with no image, one, several or a video, from JSONL and from
datasets (JSON, parquet, streaming); malformed records named; micro-batches split into visual and text-only
parts with answer-only labels; the budget draw is a function of the samples and the seed."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from qfusion import QFusionProcessor
from qfusion.training import Collator, ConversationDataset, StreamingConversations, load_conversations
from qfusion.training.collator import draw_budget, scored_tokens

QA = [{"from": "human", "value": "what is this ?"}, {"from": "gpt", "value": "a cat ."}]


def turns(*pairs):
    out = []
    for question, answer in pairs:
        out += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    return out


@pytest.fixture
def records(tmp_path):
    rng = np.random.default_rng(0)
    for name in ("a", "b", "c"):
        Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(tmp_path / f"{name}.png")
    (tmp_path / "clip").mkdir()
    for f in range(4):
        Image.fromarray(rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)).save(tmp_path / "clip" / f"{f:02d}.png")
    return [
        {"conversations": turns(("how many are there ?", "two ."))},  # text only
        {"image": "a.png", "type": "color", "conversations": turns(("<image>\nwhat color is it ?", "red ."),
                                                                   ("is it big ?", "no ."))},
        {"image": ["a.png", "b.png"], "conversations": turns(("<image> left , <image> right : what is this ?", "a cat ."))},
        {"image": ["a.png", "c.png"], "conversations": turns(("<image> what is this ?", "a dog ."),
                                                             ("<image> and this ?", "a cat ."))},
        {"video": "clip", "type": "video", "conversations": turns(("<video>\nhow many are there ?", "one ."))},
        {"image": "b.png", "conversations": turns(("what is this ?", "a dog ."))},  # no marker: with the first question
    ]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_records_with_no_image_one_image_several_images_or_a_video_become_samples(tmp_path, records):
    data = load_conversations(write_jsonl(tmp_path / "d.jsonl", records), image_root=str(tmp_path))
    assert isinstance(data, ConversationDataset) and len(data) == 6
    text, one, two, across, video, unmarked = (data[i] for i in range(6))
    assert not text.is_visual and text.answers == ["two ."] and text.conversation[0]["content"] == [
        {"type": "text", "text": "how many are there ?"}]
    assert [len(one.images), one.types, one.answers] == [1, ["color", "color"], ["red .", "no ."]]
    assert [item["type"] for item in one.conversation[0]["content"]] == ["image", "text"]
    assert [item["type"] for item in one.conversation[2]["content"]] == ["text"]  # the follow-up brings nothing
    assert [item["type"] for item in two.conversation[0]["content"]] == ["image", "image", "text"]
    assert two.conversation[0]["content"][-1]["text"] == "left ,  right : what is this ?"
    assert [[item["type"] for item in m["content"]] for m in across.conversation if m["role"] == "user"] == [
        ["image", "text"], ["image", "text"]]
    assert np.array_equal(np.asarray(across.images[1]), np.asarray(Image.open(tmp_path / "c.png").convert("RGB")))
    assert video.videos[0].shape == (4, 28, 28, 3) and video.videos[0].dtype == np.uint8 and not video.images
    assert [item["type"] for item in unmarked.conversation[0]["content"]] == ["image", "text"]
    frames = load_conversations(write_jsonl(tmp_path / "f.jsonl", [
        {"video": [[f"clip/0{f}.png" for f in range(4)]], "conversations": QA}]), image_root=str(tmp_path),
        num_frames=2)[0].videos[0]
    assert np.array_equal(frames, video.videos[0][[0, 3]])  # a list of frames, sampled uniformly


@pytest.mark.parametrize(("record", "message"), [
    ({"conversations": []}, "expected 'conversations', a non-empty list"),
    ({"conversations": [QA[1], QA[0]]}, "turn 0 is from 'gpt', expected 'human'"),
    ({"conversations": QA[:1]}, r"the last question \(turn 0\) has no answer turn"),
    ({"image": ["a.png"], "conversations": turns(("<image> <image> what ?", "x ."))},
     r"2 <image> marker\(s\), but the record has 1 image"),
    ({"image": "a.png", "video": "clip", "conversations": turns(("<image> what ?", "x ."))},
     r"0 <video> marker\(s\), but the record has 1 video"),
    ({"conversations": [QA[0], {"from": "gpt", "value": "<image> x"}]}, "turn 1: an answer holds an <image> or <video> marker"),
    ({"conversations": [{"from": "user", "value": "x"}, QA[1]]}, r"turn 0: expected \{'from': 'human' or 'gpt'"),
])
def test_a_malformed_record_is_an_error_naming_its_file_and_line(tmp_path, record, message):
    path = write_jsonl(tmp_path / "d.jsonl", [{"conversations": QA}, record])
    with pytest.raises(ValueError, match=rf"d.jsonl:2: {message}"):
        load_conversations(path)


def test_unreadable_lines_and_missing_files_are_named(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"conversations": QA}) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"d.jsonl:2: not JSON"):
        load_conversations(str(path))
    data = load_conversations(write_jsonl(path, [{"image": "gone.png", "conversations": QA}]), image_root=str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"d.jsonl\[0\]: image 'gone.png' not found \(looked for"):
        data[0]


def same_samples(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert (x.conversation, x.answers, x.types) == (y.conversation, y.answers, y.types)
        assert [np.asarray(i).tolist() for i in x.images] == [np.asarray(i).tolist() for i in y.images]
        assert [v.tolist() for v in x.videos] == [v.tolist() for v in y.videos]


def test_datasets_json_parquet_and_streaming_sources_give_the_jsonl_samples(tmp_path, records):
    datasets = pytest.importorskip("datasets")
    records = [r for r in records if not isinstance(r.get("image"), list)]  # a datasets column holds one type
    jsonl = write_jsonl(tmp_path / "d.jsonl", records)
    expected = list(load_conversations(jsonl, image_root=str(tmp_path)))
    as_json = tmp_path / "d.json"
    as_json.write_text(json.dumps(records))
    parquet = tmp_path / "d.parquet"
    keys = sorted({key for record in records for key in record})  # from_list takes its columns from the first record
    datasets.Dataset.from_list([{key: r.get(key) for key in keys} for r in records]).to_parquet(str(parquet))
    for path in (str(as_json), str(parquet)):
        data = load_conversations(path, image_root=str(tmp_path))
        assert isinstance(data, ConversationDataset)
        same_samples(list(data), expected)
    stream = load_conversations(str(parquet), image_root=str(tmp_path), streaming=True)
    assert isinstance(stream, StreamingConversations)
    same_samples(list(stream), expected)
    assert [s.index for s in stream] == list(range(len(records)))
    with pytest.raises(ValueError, match=r"data.train: expected a .jsonl, .json or .parquet file"):
        load_conversations(write_jsonl(tmp_path / "d.txt", records))


def test_a_subset_is_a_seeded_fraction_of_the_records(tmp_path, records):
    data = load_conversations(write_jsonl(tmp_path / "d.jsonl", records), image_root=str(tmp_path))
    half = data.subset(0.5, seed=3)
    assert len(half) == 3 and half.records == data.subset(0.5, seed=3).records
    assert all(r in data.records for r in half.records)


@pytest.fixture
def processor(hosts):
    return QFusionProcessor(hosts.processor("llava"), m=4, n=2)


def test_a_mixed_micro_batch_splits_into_visual_and_text_only_parts_with_answer_labels(tmp_path, records, processor):
    data = load_conversations(write_jsonl(tmp_path / "d.jsonl", records[:2] + records[5:]), image_root=str(tmp_path))
    batch = Collator(processor, [(4, 2)], seed=0)([data[0], data[1], data[2]])
    assert batch["budget"] == (4, 2) and batch["answers"] is None
    visual, text = batch["visual"], batch["text"]
    assert visual["input_ids"].shape[0] == 2 and text["input_ids"].shape[0] == 1
    assert (visual["input_ids"] == 4).sum(-1).tolist() == [4 + 2, 4]  # m before a first question, n after
    tokenizer = processor.tokenizer
    labelled = [tokenizer.decode(row[row != -100]) for row in visual["labels"]]
    assert labelled == ["red . </s> no . </s>", "a dog . </s>"]
    assert tokenizer.decode(text["labels"][0][text["labels"][0] != -100]) == "two . </s>"
    assert int(scored_tokens(batch)) == sum(int((part["labels"][:, 1:] != -100).sum()) for part in (visual, text))
    align = Collator(processor, [(4, 2)], seed=0, answer_tokenizer=tokenizer, answer_special_tokens=False,
                     text_only="leave out")([data[0], data[1], data[2]])
    assert align["text"] is None and align["visual"]["input_ids"].shape[0] == 2
    answers = align["answers"]
    assert [tokenizer.decode(ids[mask.bool()]) for ids, mask in zip(answers["input_ids"], answers["attention_mask"])] == [
        "red .", "no .", "a dog ."]  # one answer per question, in batch order
    with pytest.raises(ValueError, match=r"data.train: records \[0\] have no image or video, and the host of this run cannot"):
        Collator(processor, [(4, 2)], seed=0, text_only="refuse")([data[0], data[1]])
    assert Collator(processor, [(4, 2)], seed=0, text_only="refuse")([data[1]])["text"] is None


def test_the_budget_draw_depends_on_the_samples_and_seed_only(tmp_path, records):
    data = load_conversations(write_jsonl(tmp_path / "d.jsonl", records[:1] * 40))
    budgets = [(1, 1), (2, 1), (2, 2), (4, 1), (4, 2), (4, 4)]
    batches = [[data[i], data[i + 1]] for i in range(0, 40, 2)]
    draws = [draw_budget(budgets, batch, seed=0) for batch in batches]
    assert draws == [draw_budget(budgets, batch, seed=0) for batch in batches]  # another process, worker or run
    assert len(set(draws)) > 2 and set(draws) <= set(budgets)
    assert draws != [draw_budget(budgets, batch, seed=1) for batch in batches]
    assert draw_budget([(4, 2)], batches[0], seed=5) == (4, 2)
    assert torch.is_tensor(scored_tokens({"visual": None, "text": {"labels": torch.tensor([[-100, 5, 6]])}}))
