"""qfusion.training.evaluation: answers scored exactly per budget and type, the two training-free baselines run
through the same host (at the host's own token count they answer as the host itself), untrained budgets
flagged, baselines left out with the reason where they cannot run."""

import json
import logging

import pytest
import torch
from conftest_hosts import fusion_config
from training_workspace import settings
from transformers import AutoModelForImageTextToText, AutoProcessor

import qfusion
from qfusion.scaling import load_points_csv
from qfusion.training import evaluate, load_conversations, train
from qfusion.training.config import TrainConfig, build_config
from qfusion.training.evaluation import TokenBaseline, baseline_reason, eval_items, normalize_answer, prompt_of, score


def config(root, **changes) -> TrainConfig:
    values = settings(root)
    for key, value in changes.items():
        values[key] = {**values[key], **value} if isinstance(value, dict) and key in values else value
    return build_config(TrainConfig, values)


@pytest.fixture(scope="module")
def plugin(colour_workspace):
    """A plugin trained 30 steps (m = 4, n = 2, codebook 16)."""
    out = colour_workspace / "eval-plugin"
    train(config(colour_workspace, stage="generate", output_dir=str(out), optim={"max_steps": 30, "lr": 1e-3}))
    return out


def test_answers_are_normalised_as_the_vqa_evaluation_does():
    cases = {"Two.": "2", "the cat": "cat", "A Red Car!": "red car", "yes, it is": "yes it is", "none": "0",
             "1,000": "1000", "3.5": "3.5", "black/white": "black white", "it's ten": "it's 10", "an apple?": "apple"}
    assert {text: normalize_answer(text) for text in cases} == cases
    assert score(["Two.", "a cat", "dog"], ["2", "cat", "dog"]) == {
        "exact_match": pytest.approx(100 / 3), "vqa_match": 100.0, "count": 3}


def greedy_answer(model, processor, sample, question, budget):
    conversation, images, _ = prompt_of(sample, question)
    inputs = processor(images=[images], conversations=[conversation], add_generation_prompt=True, budget=budget)
    output = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    return processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def test_eval_scores_the_known_answers_of_a_plugin_exactly(colour_workspace, plugin, tmp_path):
    root = colour_workspace
    host = AutoModelForImageTextToText.from_pretrained(root / "host").eval()
    qfusion.attach(host, plugin)
    processor = qfusion.QFusionProcessor(AutoProcessor.from_pretrained(root / "host"), host)
    test = load_conversations(str(root / "test.jsonl"), image_root=str(root))
    items = eval_items(test)
    assert len(items) == 16  # 12 records, 4 of them with a follow-up question
    assert [m["role"] for m in prompt_of(test[items[3].record], items[3].question)[0]] == ["user", "assistant", "user"]
    assert items[3].type == "yesno" and items[2].type == "color"  # a turn's type over its record's
    answers = {budget: [greedy_answer(host, processor, test[item.record], item.question, budget) for item in items]
               for budget in ((4, 2), (2, 2))}  # one question at a time
    assert all(answers[(4, 2)])
    # references: the plugin's own answer (exact), a VQA-normalised variant of it, or a wrong one
    references = [answers[(4, 2)][i] if i % 3 == 0 else
                  "The " + answers[(4, 2)][i].upper() + "!" if i % 3 == 1 else "purple ." for i in range(16)]
    records = [json.loads(line) for line in (root / "test.jsonl").read_text().splitlines()]
    lines = iter(references)
    for record in records:
        for turn in record["conversations"][1::2]:
            turn["value"] = next(lines)
    held_out = tmp_path / "held-out.jsonl"
    held_out.write_text("".join(json.dumps(r) + "\n" for r in records))

    out = tmp_path / "eval"
    result = evaluate(config(root, stage="eval", plugin=str(plugin), output_dir=str(out),
                             eval={"data": str(held_out), "budgets": [[4, 2], 2], "baselines": []}))
    first, second = result["budgets"]
    assert [(e["m"], e["n"]) for e in result["budgets"]] == [(4, 2), (2, 2)]  # 2 alone: n = min(2, 2)
    for budget in ((4, 2), (2, 2)):  # batched, left-padded generate = one question at a time
        assert result["predictions"]["m{}-n{}".format(*budget)]["plugin"] == answers[budget]
    kinds = [item.type for item in items]
    assert first["scores"]["plugin"]["all"] == {"exact_match": pytest.approx(100 * 6 / 16),
                                                "vqa_match": pytest.approx(100 * 11 / 16), "count": 16}
    for kind in ("color", "yesno"):
        chosen = [i for i in range(16) if kinds[i] == kind]
        assert first["scores"]["plugin"]["by_type"][kind] == {
            "exact_match": pytest.approx(100 * sum(i % 3 == 0 for i in chosen) / len(chosen)),
            "vqa_match": pytest.approx(100 * sum(i % 3 != 2 for i in chosen) / len(chosen)), "count": len(chosen)}
    points = load_points_csv(out / "scores.csv", y="vqa_match", group="series")  # what `qfusion fit` reads
    assert list(points) == ["question", "question:color", "question:yesno"]
    assert points["question"][0].tolist() == [4.0, 2.0]
    assert points["question"][1].tolist() == pytest.approx([first["scores"]["plugin"]["all"]["vqa_match"],
                                                            second["scores"]["plugin"]["all"]["vqa_match"]])


def test_baselines_at_the_hosts_own_token_count_answer_as_the_host_itself(colour_workspace, plugin, tmp_path):
    root = colour_workspace
    result = evaluate(config(root, stage="eval", plugin=str(plugin), output_dir=str(tmp_path),
                             eval={"budgets": [[16, 16]]}))
    host = AutoModelForImageTextToText.from_pretrained(root / "host").eval()  # no plugin: its own 16 tokens
    processor = qfusion.QFusionProcessor(AutoProcessor.from_pretrained(root / "host"), m=16, n=16)
    test = load_conversations(str(root / "test.jsonl"), image_root=str(root))
    items = eval_items(test)
    firsts = [i for i, item in enumerate(items) if item.question == 0]
    own = []
    for i in firsts:
        conversation, images, _ = prompt_of(test[items[i].record], 0)
        inputs = processor(images=[images], conversations=[conversation], add_generation_prompt=True)
        output = host.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                               pixel_values=inputs["pixel_values"], max_new_tokens=3, do_sample=False)
        own.append(processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    predictions = result["predictions"]["m16-n16"]
    for method in ("avg_pool", "random"):  # N = V: pooling and choosing all keep every token, in order
        assert [predictions[method][i] for i in firsts] == own


def test_a_budget_the_plugin_was_not_trained_at_is_flagged(colour_workspace, plugin, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="qfusion.training.evaluation"):
        result = evaluate(config(colour_workspace, stage="eval", plugin=str(plugin), output_dir=str(tmp_path),
                                 eval={"budgets": [[4, 2], [8, 2]], "baselines": ["avg_pool"]}))
    assert result["trained_budgets"] == [[4, 2]]
    assert [e["trained"] for e in result["budgets"]] == [True, False]
    assert "the plugin was not trained at budget (m=8, n=2) (trained: [[4, 2]])" in caplog.text
    assert "m=4, n=2" not in caplog.text
    table = result["table"].splitlines()
    assert [line.split()[:3] for line in table[2:6]] == [["4", "2", "question"], ["4", "2", "avg_pool"],
                                                          ["8", "2", "*"], ["8", "2", "*"]]
    assert table[-1] == "* a budget the plugin was not trained at"


def test_baselines_are_left_out_with_the_reason_where_they_cannot_run(hosts, colour_workspace, tmp_path):
    bigger = tmp_path / "codebook-32"
    train(config(colour_workspace, stage="generate", output_dir=str(bigger), optim={"max_steps": 1},
                 fusion={"codebook_size": 32}))
    result = evaluate(config(colour_workspace, stage="eval", plugin=str(bigger), output_dir=str(tmp_path / "eval"),
                             eval={"budgets": [[32, 2]]}, fusion={"codebook_size": 32}))
    reason = "N=32 exceeds an input's own 16 vision tokens"
    assert result["budgets"][0]["skipped"] == {"avg_pool": reason, "random": reason}
    assert list(result["budgets"][0]["scores"]) == ["plugin"]
    assert f"avg_pool at m=32: not run ({reason})" in result["table"]
    tower = qfusion.attach(hosts.model("llava"), fusion_config(), vision_source="tower")
    assert "reads the host's 'tower' features, not the vision tokens its LLM reads ('projector')" in baseline_reason(tower)
    assert baseline_reason(qfusion.attach(hosts.model("llava"), fusion_config())) is None
    augment = qfusion.attach(hosts.model("instructblip"), fusion_config(), mode="augment")
    assert baseline_reason(augment) == "in 'augment' mode the host keeps its own vision tokens; N more of them is no comparison"
    pooled = TokenBaseline("avg_pool", fusion_config(), 0, "cpu", torch.float32)
    tokens = torch.arange(12.0).reshape(6, 2)
    assert pooled.reduce(tokens, 3).tolist() == [[1, 2], [5, 6], [9, 10]]
    chosen = TokenBaseline("random", fusion_config(), 0, "cpu", torch.float32).reduce(tokens, 3)
    rows = [tokens.tolist().index(row) for row in chosen.tolist()]
    assert rows == sorted(rows) and len(set(rows)) == 3
    assert torch.equal(chosen, TokenBaseline("random", fusion_config(), 0, "cpu", torch.float32).reduce(tokens, 3))
