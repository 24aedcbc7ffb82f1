"""integrations/lmms_eval end to end: lmms-eval's own command line evaluates a tiny LLaVA with a trained plugin on a
local task at two budgets, and its scores and answers equal the eval stage of qfusion.training on the same items
(skipped without lmms_eval)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest_hosts import build_llava
from PIL import Image
from training_workspace import COLORS, pretrain_host

from qfusion.training import TrainConfig, evaluate, train

pytest.importorskip("lmms_eval.api.model", reason="lmms-eval is not installed")

ROOT = Path(__file__).resolve().parents[1]
BUDGETS = ((1, 1), (4, 4))
TASK = "qfusion_colours"


def write_questions(root: Path, name: str, count: int, seed: int) -> Path:
    """Noisy one-colour images, one question each: "what color is it ?" (type color) or "is it <colour> ?"
    (type yesno); image paths absolute, so lmms-eval and the eval stage open the same files."""
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(count):
        colour, asked = list(COLORS)[i % 3], list(COLORS)[rng.integers(3)]
        pixels = np.clip(np.array(COLORS[colour]) + rng.normal(0, 20, (40, 52, 3)), 0, 255).astype(np.uint8)
        image = root / f"{name}{i}.png"
        Image.fromarray(pixels).save(image)
        if i % 2:
            kind, question, answer = "yesno", f"is it {asked} ?", "yes ." if asked == colour else "no ."
        else:
            kind, question, answer = "color", "what color is it ?", f"{colour} ."
        lines.append(json.dumps({"image": str(image), "type": kind, "conversations": [
            {"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]}))
    path = root / f"{name}.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def write_task(directory: Path, data: Path, max_new_tokens: int) -> Path:
    """A local lmms-eval task over the JSONL, with the integration's task functions."""
    functions = "!function qfusion_lmms_eval.jsonl_task."
    directory.mkdir()
    (directory / f"{TASK}.yaml").write_text(f"""task: {TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: {functions}doc_to_visual
doc_to_text: {functions}doc_to_text
doc_to_target: {functions}doc_to_target
process_results: {functions}process_results
generation_kwargs:
  max_new_tokens: {max_new_tokens}
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
  - metric: vqa_match
    aggregation: mean
    higher_is_better: true
""")
    return directory


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny LLaVA trained on the colour questions, an elastic plugin trained for it by qfusion.training, the
    held-out questions and the eval stage's scores and answers at both budgets."""
    root = tmp_path_factory.mktemp("lmms-task")
    build_llava(root / "host")
    train_data = write_questions(root, "train", 24, seed=0)
    test = write_questions(root, "test", 16, seed=1)
    pretrain_host(root / "host", train_data, root)
    settings = {"model": str(root / "host"), "data": {"train": str(train_data), "image_root": str(root)},
                "fusion": {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "intermediate_size": 64,
                           "codebook_size": 16, "m": 4, "n": 4, "contrastive_dim": 16, "attn_impl": "sdpa"},
                "elastic": {"budgets": sorted({m for m, _ in BUDGETS})},
                "optim": {"lr": 1e-3, "batch_size": 6, "warmup_ratio": 0.03, "max_steps": 60, "mixed_precision": "no"},
                "log": {"progress": False},
                "eval": {"data": str(test), "batch_size": 4, "max_new_tokens": 3, "baselines": [],
                         "budgets": [list(b) for b in BUDGETS]}}
    config = TrainConfig.from_dict({**settings, "stage": "elastic", "output_dir": str(root / "plugin")})
    train(config)
    evaluate(config.replace(stage="eval", plugin=str(root / "plugin"), output_dir=str(root / "training-eval")))
    write_task(root / "tasks", test, max_new_tokens=3)
    return root


def lmms_eval(workspace: Path, m: int, n: int) -> tuple[dict, list[str]]:
    """lmms-eval's command line on the local task: (its metrics, its answers in record order)."""
    out = workspace / f"lmms-m{m}-n{n}"
    model_args = f"pretrained={workspace / 'host'},plugin={workspace / 'plugin'},device=cpu,dtype=float32,m={m},n={n}"
    command = [str(Path(sys.executable).parent / "lmms-eval"), "--model", "qfusion", "--model_args", model_args,
               "--tasks", TASK, "--include_path", str(workspace / "tasks"), "--batch_size", "4",
               "--output_path", str(out), "--log_samples"]
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(workspace / "hf")}
    done = subprocess.run(command, env=env, cwd=workspace, capture_output=True, text=True, timeout=600)
    results, samples = list(out.rglob("*_results.json")), list(out.rglob(f"*_samples_{TASK}.jsonl"))
    # lmms-eval reports an error in its log and still exits 0, so the files it writes are the check
    assert done.returncode == 0 and len(results) == len(samples) == 1, done.stdout[-3000:] + done.stderr[-6000:]
    results, samples = results[0], samples[0]
    metrics = json.loads(results.read_text())["results"][TASK]
    answers = sorted((json.loads(line) for line in samples.read_text().splitlines()), key=lambda s: s["doc_id"])
    return metrics, [s["filtered_resps"] for s in answers]


@pytest.mark.parametrize("budget", BUDGETS, ids=lambda b: f"m{b[0]}-n{b[1]}")
def test_lmms_eval_scores_equal_the_eval_stage(workspace, budget):
    m, n = budget
    evaluation = json.loads((workspace / "training-eval" / "eval.json").read_text())
    (entry,) = [b for b in evaluation["budgets"] if (b["m"], b["n"]) == budget]
    scores = entry["scores"]["plugin"]["all"]
    metrics, answers = lmms_eval(workspace, m, n)
    assert answers == evaluation["predictions"][f"m{m}-n{n}"]["plugin"]
    assert metrics["exact_match,none"] == pytest.approx(scores["exact_match"])
    assert metrics["vqa_match,none"] == pytest.approx(scores["vqa_match"])
    assert 0 < scores["vqa_match"]  # the plugin answers some questions right: a score to compare
