"""examples/train.py: every stage runs on a tiny LLaVA checkpoint, resumes, and saves a plugin that reloads."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest_hosts import VOCAB, build_llava, tokenizer
from PIL import Image
from transformers import AutoModelForImageTextToText, BertConfig, BertModel

import qfusion

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("qfusion_train_recipe", ROOT / "examples" / "train.py")
recipe = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = recipe  # dataclasses look their module up
spec.loader.exec_module(recipe)

QA = [("what is this ?", "a cat ."), ("what color is it ?", "red ."), ("how many are there ?", "two ."),
      ("is it big ?", "yes ."), ("what is in the picture ?", "a dog ."), ("is it small ?", "no .")]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipe")
    build_llava(root / "host")
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(root / "text")
    tokenizer().save_pretrained(root / "text")
    rng = np.random.default_rng(0)
    lines = []
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (40, 52, 3), dtype=np.uint8)).save(root / f"img{i}.png")
        (q1, a1), (q2, a2) = QA[i], QA[(i + 1) % 6]
        turns = [{"from": "human", "value": f"<image>\n{q1}"}, {"from": "gpt", "value": a1}]
        if i % 2:
            turns += [{"from": "human", "value": q2}, {"from": "gpt", "value": a2}]
        lines.append(json.dumps({"image": f"img{i}.png", "conversations": turns}))
    (root / "data.jsonl").write_text("\n".join(lines) + "\n")
    config = {"model": str(root / "host"), "data": str(root / "data.jsonl"), "image_root": str(root),
              "fusion": {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "intermediate_size": 64,
                         "codebook_size": 16, "m": 4, "n": 2, "text_vocab_size": VOCAB, "contrastive_dim": 16,
                         "attn_impl": "sdpa"},
              "text_encoder": str(root / "text"), "text_pooling": "mean", "lr": 3e-3, "batch_size": 6,
              "mixed_precision": "no", "warmup_ratio": 0.0}
    import yaml

    (root / "config.yaml").write_text(yaml.safe_dump(config))
    return root


def run(workspace, *args):
    recipe.main(["--config", str(workspace / "config.yaml"), *args])


def metrics(directory):
    return [json.loads(line) for line in (Path(directory) / "metrics.jsonl").read_text().splitlines()]


def test_align_then_generate_then_resume_and_reload(workspace):
    align = workspace / "align"
    run(workspace, "--stage", "align", "--output-dir", str(align), "--set", "max_steps=4")
    rows = metrics(align)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(np.isfinite(r["loss"]) for r in rows)
    assert (align / "model.safetensors").exists() and (align / "config.json").exists()

    generate = workspace / "generate"
    run(workspace, "--stage", "generate", "--plugin", str(align), "--output-dir", str(generate),
        "--set", "max_steps=6", "--set", "save_every=1")
    losses = [r["loss"] for r in metrics(generate)]
    assert len(losses) == 6 and all(np.isfinite(losses))
    assert losses[-1] < losses[0]  # the whole (tiny) data set every step: the loss must fall

    run(workspace, "--stage", "generate", "--plugin", str(align), "--output-dir", str(generate),
        "--set", "max_steps=8", "--set", "resume=true")
    assert [r["step"] for r in metrics(generate)] == [1, 2, 3, 4, 5, 6, 7, 8]

    host = AutoModelForImageTextToText.from_pretrained(workspace / "host")
    adapter = qfusion.attach(host, generate)
    saved = qfusion.QuestionFusion.from_pretrained(generate)
    for (name, a), (_, b) in zip(adapter.fusion.state_dict().items(), saved.state_dict().items()):
        assert torch.equal(a, b), name
    trained_from = qfusion.QuestionFusion.from_pretrained(align)
    assert not torch.equal(saved.codebook.weight, trained_from.codebook.weight)


def test_elastic_and_sweep_stages(workspace):
    elastic = workspace / "elastic"
    run(workspace, "--stage", "elastic", "--output-dir", str(elastic), "--set", "max_steps=4",
        "--set", "budgets=[1, 2, 4]")
    rows = metrics(elastic)
    assert len(rows) == 4 and {r["m"] for r in rows} <= {1, 2, 4}
    assert json.loads((elastic / "config.json").read_text())["m"] == 4  # the configured budget, not the last drawn
    sweep = workspace / "sweep"
    run(workspace, "--stage", "sweep", "--output-dir", str(sweep), "--set", "max_steps=2",
        "--set", "sweep=[[2, 1]]", "--set", "sweep_no_question=true", "--set", "sweep_fraction=0.5")
    assert json.loads((sweep / "m2-n1" / "config.json").read_text())["m"] == 2
    assert json.loads((sweep / "m4-n2-no-question" / "config.json").read_text())["use_question"] is False


def test_elastic_runs_save_the_configured_budget_whatever_was_drawn(workspace):
    for seed in (0, 1, 2):
        out = workspace / f"elastic-seed{seed}"
        run(workspace, "--stage", "elastic", "--output-dir", str(out), "--set", "max_steps=3",
            "--set", "budgets=[1, 2, 4]", "--set", f"seed={seed}", "--set", "batch_size=2")
        drawn = {(r["m"], r["n"]) for r in metrics(out)}
        assert drawn <= {(m, n) for m in (1, 2, 4) for n in (1, 2, 4) if n <= m}
        saved = json.loads((out / "config.json").read_text())
        assert (saved["m"], saved["n"]) == (4, 2), (seed, drawn)
        assert "attn_impl" not in saved


def test_a_plugin_setting_that_contradicts_the_loaded_plugin_is_an_error(workspace):
    align = workspace / "align-for-contradiction"
    run(workspace, "--stage", "align", "--output-dir", str(align), "--set", "max_steps=1")
    with pytest.raises(ValueError, match=r"fusion.num_layers: the plugin .* was built with num_layers=2"):
        run(workspace, "--stage", "generate", "--plugin", str(align), "--output-dir", str(workspace / "x"),
            "--set", "max_steps=1", "--set", "fusion={num_layers: 3, mask: grouped}")
    with pytest.raises(ValueError, match="budgets: \\[32\\] exceed the plugin's codebook_size=16"):
        run(workspace, "--stage", "elastic", "--output-dir", str(workspace / "y"), "--set", "max_steps=1",
            "--set", "budgets=[1, 32]")


def test_bad_config_is_rejected(workspace):
    with pytest.raises(ValueError, match="unknown keys"):
        run(workspace, "--set", "learning_rate=1")
    with pytest.raises(ValueError, match="text_encoder"):
        run(workspace, "--stage", "align", "--set", "text_encoder=null")
    with pytest.raises(ValueError, match="stage"):
        recipe.TrainConfig(model="x", data="y", stage="pretrain")


def test_two_process_accelerate_launch(workspace):
    out = workspace / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--cpu",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
         str(ROOT / "examples" / "train.py"), "--config", str(workspace / "config.yaml"), "--stage", "generate",
         "--output-dir", str(out), "--set", "max_steps=2", "--set", "batch_size=3"],
        capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [r["step"] for r in metrics(out)] == [1, 2]
    assert (out / "model.safetensors").exists()
