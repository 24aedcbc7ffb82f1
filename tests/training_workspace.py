"""Tiny workspaces for the training tests: colour data and a tiny LLaVA that answers it.

The LLaVA of conftest_hosts (a 2-layer, 32-wide CLIP tower and a 2-layer, 64-wide Llama) is first
trained whole on the task with its own 16 image tokens, so the plugin is then trained and evaluated
against a host that answers, like a real checkpoint. Built once per test session.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest_hosts import build_llava
from PIL import Image

COLORS = {"red": (200, 30, 30), "green": (30, 180, 40), "blue": (30, 40, 200)}

FUSION = {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "intermediate_size": 64, "codebook_size": 16, "m": 4,
          "n": 2, "contrastive_dim": 16, "attn_impl": "sdpa"}
"""A 34k-parameter plugin."""


def write_colour_data(root: Path, name: str, count: int, seed: int, text_only: int = 0) -> Path:
    """Noisy one-colour images; "what color is it ?" (type color) or "is it <colour> ?" (type yesno); every
    third record asks both, the second as a follow-up in the m/n layout. ``text_only`` records without an
    image ("how many are there ?") are added at the end."""
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(count):
        colour, asked = list(COLORS)[i % 3], list(COLORS)[rng.integers(3)]
        pixels = np.clip(np.array(COLORS[colour]) + rng.normal(0, 20, (40, 52, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / f"{name}{i}.png")
        what = [{"from": "human", "value": "<image>\nwhat color is it ?"}, {"from": "gpt", "value": f"{colour} ."}]
        yes_no = [{"from": "human", "value": f"is it {asked} ?", "type": "yesno"},
                  {"from": "gpt", "value": "yes ." if asked == colour else "no ."}]
        if i % 3 == 2:
            record = {"type": "color", "conversations": what + yes_no}
        elif i % 2:
            yes_no[0]["value"] = "<image>\n" + yes_no[0]["value"]
            record = {"type": "yesno", "conversations": yes_no}
        else:
            record = {"type": "color", "conversations": what}
        lines.append(json.dumps({"image": f"{name}{i}.png", **record}))
    for _ in range(text_only):
        lines.append(json.dumps({"conversations": [{"from": "human", "value": "how many are there ?"},
                                                   {"from": "gpt", "value": "two ."}]}))
    path = root / f"{name}.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def pretrain_host(directory: Path, data: Path, image_root: Path, steps: int = 120) -> None:
    """Train the whole tiny LLaVA (tower, projector, LLM) on the data's image records with its own 16 image
    tokens."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from qfusion.training import load_conversations

    model = AutoModelForImageTextToText.from_pretrained(directory)
    processor = AutoProcessor.from_pretrained(directory)
    samples = [s for s in load_conversations(str(data), image_root=str(image_root)) if s.is_visual]
    texts = []
    for sample in samples:
        conversation = json.loads(json.dumps(sample.conversation))
        first = conversation[0]["content"]
        first[-1]["text"] = "<image> " + first[-1]["text"]
        conversation[0]["content"] = [first[-1]]
        texts.append(processor.tokenizer.apply_chat_template(conversation, tokenize=False))
    batch = processor(images=[s.images[0] for s in samples], text=texts, return_tensors="pt", padding=True)
    labels = torch.full_like(batch["input_ids"], -100)
    assistant, eos = processor.tokenizer.convert_tokens_to_ids(["ASSISTANT", "</s>"])
    for row, ids in zip(labels, batch["input_ids"]):
        answering = False
        for t, token in enumerate(ids.tolist()):
            if answering:
                row[t] = token
                answering = token != eos
            if token == assistant:
                answering, row[t + 1] = True, -100  # the ":" after ASSISTANT is the prompt's
        row[:1] = -100
    labels[batch["attention_mask"] == 0] = -100
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        model(**batch, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(directory)


def settings(root: Path, **changes) -> dict:
    """The tiny runs' settings (a mapping, as a YAML file holds them), with top-level ``changes``."""
    values = {"model": str(root / "host"), "data": {"train": str(root / "train.jsonl"), "image_root": str(root)},
              "fusion": dict(FUSION),
              "optim": {"lr": 3e-3, "batch_size": 6, "warmup_ratio": 0.0, "mixed_precision": "no"},
              "log": {"progress": False, "save_every": 500},
              "eval": {"data": str(root / "test.jsonl"), "batch_size": 5, "max_new_tokens": 3}}
    values.update(changes)
    return values


@pytest.fixture(scope="session")
def colour_workspace(tmp_path_factory) -> Path:
    """A folder with ``host/`` (the tiny LLaVA, trained on the task), ``train.jsonl`` (24 image records),
    ``mixed.jsonl`` (the same task, and 4 text-only records), ``test.jsonl`` (12 unseen images, 16 questions)
    and ``config.yaml`` (:func:`settings`)."""
    root = tmp_path_factory.mktemp("training")
    build_llava(root / "host")
    train = write_colour_data(root, "train", 24, seed=0)
    write_colour_data(root, "mixed", 24, seed=0, text_only=4)
    write_colour_data(root, "test", 12, seed=1)
    pretrain_host(root / "host", train, root)
    (root / "config.yaml").write_text(yaml.safe_dump(settings(root)))
    return root


def metrics(directory) -> list[dict]:
    """The records of a run's metrics.jsonl."""
    return [json.loads(line) for line in (Path(directory) / "metrics.jsonl").read_text().splitlines()]


def write_mixed_data(root: Path, name: str = "mixed") -> Path:
    """Records of every shape, for the families' end-to-end runs: one image with a follow-up, two images
    before one question, a video (a folder of 4 frames), and a text-only conversation; 56 x 56 pixels."""
    rng = np.random.default_rng(0)
    lines = []
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (56, 56, 3), dtype=np.uint8)).save(root / f"{name}{i}.png")
        frames = root / f"{name}-video{i}"
        frames.mkdir(exist_ok=True)
        for f in range(4):
            Image.fromarray(rng.integers(0, 256, (56, 56, 3), dtype=np.uint8)).save(frames / f"{f:02d}.png")
        qa = [{"from": "human", "value": "what color is it ?"}, {"from": "gpt", "value": list(COLORS)[i % 3] + " ."}]
        shape = i % 4
        if shape == 0:
            record = {"image": f"{name}{i}.png", "type": "image", "conversations": [
                dict(qa[0], value="<image>\n" + qa[0]["value"]), qa[1],
                {"from": "human", "value": "is it big ?"}, {"from": "gpt", "value": "no ."}]}
        elif shape == 1:
            record = {"video": frames.name, "type": "video",
                      "conversations": [dict(qa[0], value="<video>\nhow many are there ?"), qa[1]]}
        elif shape == 2:
            record = {"image": [f"{name}{i}.png", f"{name}{i - 1}.png"], "type": "images",
                      "conversations": [dict(qa[0], value="<image> <image> what is this ?"), qa[1]]}
        else:
            record = {"conversations": [{"from": "human", "value": "how many are there ?"},
                                        {"from": "gpt", "value": "two ."}]}
        lines.append(json.dumps(record))
    path = root / f"{name}.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path
