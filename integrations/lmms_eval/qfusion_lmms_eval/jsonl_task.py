"""Task functions for lmms-eval over a local conversation JSONL, the training recipe's data format.

Each record is one image and one question (a human turn, then the reference answer):
``{"image": "/data/0.png", "type": "color", "conversations": [{"from": "human", "value": "<image>\\nwhat color
is it ?"}, {"from": "gpt", "value": "red ."}]}``. The image path is opened as written (absolute, or
relative to the directory lmms-eval runs in). Answers are scored by exact match (after stripping
spaces at either end) and by lmms-eval's VQA answer normalisation, each in percent per record, so
lmms-eval's ``mean`` aggregation gives the percentage of the whole set. A task YAML names them::

    task: my_local_task
    dataset_path: json
    dataset_kwargs:
      data_files: {test: /data/eval.jsonl}
    test_split: test
    output_type: generate_until
    doc_to_visual: !function qfusion_lmms_eval.jsonl_task.doc_to_visual
    doc_to_text: !function qfusion_lmms_eval.jsonl_task.doc_to_text
    doc_to_target: !function qfusion_lmms_eval.jsonl_task.doc_to_target
    process_results: !function qfusion_lmms_eval.jsonl_task.process_results
    generation_kwargs: {max_new_tokens: 16}
    metric_list:
      - {metric: exact_match, aggregation: mean, higher_is_better: true}
      - {metric: vqa_match, aggregation: mean, higher_is_better: true}
"""

from __future__ import annotations

from lmms_eval.tasks._task_utils.vqa_eval_metric import EvalAIAnswerProcessor
from PIL import Image

_normalise = EvalAIAnswerProcessor()


def _turns(doc: dict) -> tuple[str, str]:
    """(question, answer) of a record; a record with follow-up questions is refused (lmms-eval's
    generate_until asks one question per document)."""
    turns = doc.get("conversations") or []
    if len(turns) != 2 or turns[0].get("from") != "human" or turns[1].get("from") == "human":
        raise ValueError(f"conversations: expected one human question and its answer, got {len(turns)} turn(s) "
                         f"in the record of image {doc.get('image')!r}")
    return turns[0]["value"], turns[1]["value"]


def doc_to_visual(doc: dict) -> list[Image.Image]:
    """The record's image, as RGB."""
    return [Image.open(doc["image"]).convert("RGB")]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    """The question, without the ``<image>`` marker (the model places the image before it)."""
    return _turns(doc)[0].replace("<image>", "").strip()


def doc_to_target(doc: dict) -> str:
    """The reference answer."""
    return _turns(doc)[1]


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """Exact match and VQA-normalised match of the model's answer, in percent (0 or 100)."""
    prediction, answer = results[0].strip(), doc_to_target(doc).strip()
    return {"exact_match": 100.0 * (prediction == answer),
            "vqa_match": 100.0 * (_normalise(prediction) == _normalise(answer))}
