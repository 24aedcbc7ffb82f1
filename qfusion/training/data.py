"""Training data: LLaVA-style conversation records from JSONL or Hugging Face ``datasets``.

A record::

    {"image": "a.jpg" | ["a.jpg", "b.jpg"], "video": "clip.mp4" | "frames/" | [["f0.jpg", "f1.jpg", ...]],
     "type": "color",
     "conversations": [{"from": "human", "value": "<image>\\nWhat color is it?"},
                       {"from": "gpt", "value": "Red."},
                       {"from": "human", "value": "Is it big?", "type": "yesno"}, {"from": "gpt", "value": "No."}]}

``image`` and ``video`` are optional (a record without either is a text-only conversation), as is
``type`` (the eval stage scores each type apart; a human turn's own ``type`` wins). Turns alternate,
a human turn first, every question answered. Each ``<image>`` / ``<video>`` marker in a human turn
brings the next image / video of the record into that turn; a record without markers brings all its
visual inputs with its first question. Paths are relative to ``data.image_root``; ``datasets``
sources may hold decoded images (an ``Image`` feature) instead. A video is a file (read by
transformers' ``load_video``), a folder of frame images, or a list of frames; ``video`` holds one
video or a list of them.
"""

from __future__ import annotations

import logging
import os
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from qfusion.files import read_json_lines

logger = logging.getLogger(__name__)

ROLES = {"human": "user", "gpt": "assistant"}
"""LLaVA turn roles and their chat-template names."""

MARKER = re.compile(r"<(image|video)>")
"""Where a human turn brings an image or a video."""

FRAME_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
"""Image files read as the frames of a video folder."""


@dataclass
class Sample:
    """One record, ready for the processor.

    index: its position in the data (seeds the elastic budget draw of the micro-batch it is in).
    conversation: the chat messages; user turns carry ``{"type": "image"}`` / ``{"type": "video"}``
        items for the visual inputs they bring.
    images, videos: the visual inputs in prompt order (PIL images; (frames, H, W, 3) uint8 arrays).
    answers, types: per question, its reference answer and its type (or None).
    """

    index: int
    conversation: list[dict]
    images: list = field(default_factory=list)
    videos: list = field(default_factory=list)
    answers: list[str] = field(default_factory=list)
    types: list[str | None] = field(default_factory=list)

    @property
    def is_visual(self) -> bool:
        """Whether the record has an image or a video (else it is a text-only conversation)."""
        return bool(self.images or self.videos)


@dataclass(frozen=True)
class _Layout:
    """A record's structure, checked without loading anything: per turn its role and text, per human
    turn the visual items it brings, and the record's visual inputs."""

    turns: list[tuple[str, str, list[str], str | None]]  # (role, text, visual kinds, type)
    images: list
    videos: list


def _as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def check_record(record, where: str) -> _Layout:
    """The structure of one record; a malformed record is an error naming ``where`` (file:line or index)."""
    if not isinstance(record, Mapping):
        raise ValueError(f"{where}: expected a record (a JSON object), got {type(record).__name__}")
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"{where}: expected 'conversations', a non-empty list of turns")
    images, videos = _as_list(record.get("image")), _as_list(record.get("video"))
    laid, markers = [], {"image": 0, "video": 0}
    for t, turn in enumerate(turns):
        if not isinstance(turn, Mapping) or not isinstance(turn.get("value"), str) or turn.get("from") not in ROLES:
            raise ValueError(f"{where}: turn {t}: expected {{'from': 'human' or 'gpt', 'value': text}}, got {turn!r:.120}")
        expected = "human" if t % 2 == 0 else "gpt"
        if turn["from"] != expected:
            raise ValueError(f"{where}: turn {t} is from {turn['from']!r}, expected {expected!r} (turns alternate, a "
                             "human turn first)")
        kinds = MARKER.findall(turn["value"]) if expected == "human" else []
        if expected == "gpt" and MARKER.search(turn["value"]):
            raise ValueError(f"{where}: turn {t}: an answer holds an <image> or <video> marker")
        for kind in kinds:
            markers[kind] += 1
        text = MARKER.sub("", turn["value"]).strip()
        laid.append((ROLES[turn["from"]], text, kinds, turn.get("type", record.get("type"))))
    if len(turns) % 2:
        raise ValueError(f"{where}: the last question (turn {len(turns) - 1}) has no answer turn after it")
    if any(markers.values()):
        for kind, given in (("image", images), ("video", videos)):
            if markers[kind] != len(given):
                raise ValueError(f"{where}: {markers[kind]} <{kind}> marker(s), but the record has {len(given)} "
                                 f"{kind}(s); with markers, every visual input is marked")
    elif images or videos:  # no markers: every visual input comes with the first question
        role, text, _, kind = laid[0]
        laid[0] = (role, text, ["image"] * len(images) + ["video"] * len(videos), kind)
    return _Layout(laid, images, videos)


def load_image(value, root: str, where: str):
    """An RGB PIL image from a path (relative to ``root``), a PIL image, or a ``datasets`` image dict."""
    from PIL import Image

    if isinstance(value, Mapping) and ("bytes" in value or "path" in value):  # an undecoded datasets Image
        if value.get("bytes") is not None:
            import io

            return Image.open(io.BytesIO(value["bytes"])).convert("RGB")
        value = value["path"]
    if isinstance(value, (str, os.PathLike)):
        path = Path(root) / value
        if not path.is_file():
            raise FileNotFoundError(f"{where}: image {str(value)!r} not found (looked for {str(path)!r})")
        with Image.open(path) as image:
            return image.convert("RGB")
    if hasattr(value, "convert"):
        return value.convert("RGB")
    raise TypeError(f"{where}: expected an image path or a PIL image, got {type(value).__name__}")


def _uniform(count: int, wanted: int | None) -> list[int]:
    if wanted is None or wanted >= count:
        return list(range(count))
    return np.linspace(0, count - 1, wanted).round().astype(int).tolist()


def load_video(value, root: str, num_frames: int | None, where: str) -> np.ndarray:
    """(frames, H, W, 3) uint8 frames of a video file (transformers' ``load_video``), a folder of frame
    images (in name order) or a list of frames; ``num_frames`` sampled uniformly (None: all)."""
    if isinstance(value, (list, tuple)):
        frames = [value[i] for i in _uniform(len(value), num_frames)]
        return np.stack([np.asarray(load_image(frame, root, where)) for frame in frames])
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{where}: expected a video path, a folder of frames or a list of frames, got "
                        f"{type(value).__name__}")
    path = Path(root) / value
    if path.is_dir():
        names = sorted(p.name for p in path.iterdir() if p.suffix.lower() in FRAME_SUFFIXES)
        if not names:
            raise FileNotFoundError(f"{where}: video folder {str(path)!r} holds no frame images {FRAME_SUFFIXES}")
        return load_video([str(path / name) for name in names], root, num_frames, where)
    if not path.is_file():
        raise FileNotFoundError(f"{where}: video {str(value)!r} not found (looked for {str(path)!r})")
    from transformers.video_utils import load_video as read_video

    frames, _ = read_video(str(path), num_frames=num_frames)
    return np.asarray(frames)


def make_sample(index: int, record, where: str, image_root: str, num_frames: int | None) -> Sample:
    """The :class:`Sample` of one record: its structure checked, its images and videos loaded."""
    layout = check_record(record, where)
    conversation, answers, types = [], [], []
    for role, text, kinds, kind in layout.turns:
        if role == "user":
            conversation.append({"role": role, "content": [{"type": k} for k in kinds] + [{"type": "text", "text": text}]})
            types.append(kind)
        else:
            conversation.append({"role": role, "content": [{"type": "text", "text": text}]})
            answers.append(text)
    images = [load_image(image, image_root, where) for image in layout.images]
    videos = [load_video(video, image_root, num_frames, where) for video in layout.videos]
    return Sample(index, conversation, images, videos, answers, types)


def read_jsonl(path: str) -> list[dict]:
    """The records of a conversation JSONL file, each checked; errors name the file and line."""
    records = []
    for number, record in read_json_lines(path, lambda number: f"{path}:{number}"):
        check_record(record, f"{path}:{number}")
        records.append(record)
    if not records:
        raise ValueError(f"{path}: no records")
    return records


class ConversationDataset(torch.utils.data.Dataset):
    """A map-style dataset of :class:`Sample` over records (a list, or a ``datasets.Dataset``).

    source: the records' origin, for error messages. image_root: folder of relative image and video
    paths. num_frames: frames sampled from each video (None: all).
    """

    def __init__(self, records: Sequence, source: str, image_root: str = ".", num_frames: int | None = None):
        self.records = records
        self.source = source
        self.image_root = image_root
        self.num_frames = num_frames

    def __len__(self) -> int:
        return len(self.records)

    def where(self, index: int) -> str:
        """How errors name record ``index``."""
        return f"{self.source}[{index}]"

    def __getitem__(self, index: int) -> Sample:
        return make_sample(index, self.records[index], self.where(index), self.image_root, self.num_frames)

    def subset(self, fraction: float, seed: int) -> "ConversationDataset":
        """A random ``fraction`` of the records (at least one), the same for the same seed."""
        count = max(1, int(len(self) * fraction))
        chosen = sorted(random.Random(seed).sample(range(len(self)), count))
        records = (self.records.select(chosen) if hasattr(self.records, "select")
                   else [self.records[i] for i in chosen])
        return ConversationDataset(records, f"{self.source} (a {fraction:g} subset)", self.image_root,
                                   self.num_frames)


class StreamingConversations(torch.utils.data.IterableDataset):
    """An iterable dataset of :class:`Sample` over a streaming ``datasets.IterableDataset``."""

    def __init__(self, records, source: str, image_root: str = ".", num_frames: int | None = None):
        self.records = records
        self.source = source
        self.image_root = image_root
        self.num_frames = num_frames

    def set_epoch(self, epoch: int) -> None:
        """Passed on to the stream (its shuffle depends on the epoch)."""
        if hasattr(self.records, "set_epoch"):
            self.records.set_epoch(epoch)

    def __iter__(self):
        worker = torch.utils.data.get_worker_info()
        workers, offset = (1, 0) if worker is None else (worker.num_workers, worker.id)
        for position, record in enumerate(self.records):
            index = position * workers + offset  # the stream is split between workers by datasets
            yield make_sample(index, record, f"{self.source}[{index}]", self.image_root, self.num_frames)


def load_conversations(path: str, *, image_root: str = ".", split: str = "train", streaming: bool = False,
                       num_frames: int | None = None, name: str = "data.train"):
    """The conversations at ``path`` as a dataset of :class:`Sample`.

    A ``.jsonl`` file (not streamed) is read here, every record checked up front; anything else goes
    through ``datasets.load_dataset``: a ``.json`` / ``.jsonl`` / ``.parquet`` file, a folder or a
    hub dataset id, ``split`` of it, streamed with ``streaming`` (then an iterable dataset).
    name: the setting ``path`` came from, for errors.
    """
    if path.endswith(".jsonl") and not streaming and os.path.isfile(path):
        return ConversationDataset(read_jsonl(path), path, image_root, num_frames)
    try:
        import datasets
    except ImportError:
        raise ImportError(f"{name}: reading {path!r} needs the datasets package (pip install 'qfusion[train]'); "
                          "a conversation .jsonl file is read without it") from None
    builders = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
    suffix = Path(path).suffix.lower()
    if os.path.isfile(path):
        if suffix not in builders:
            raise ValueError(f"{name}: expected a .jsonl, .json or .parquet file, a folder or a hub dataset id, "
                             f"got {path!r}")
        records = datasets.load_dataset(builders[suffix], data_files=path, split=split, streaming=streaming)
    else:
        records = datasets.load_dataset(path, split=split, streaming=streaming)
    if streaming:
        return StreamingConversations(records, path, image_root, num_frames)
    if len(records) == 0:
        raise ValueError(f"{name}: {path!r} split {split!r} holds no records")
    return ConversationDataset(records, path, image_root, num_frames)
