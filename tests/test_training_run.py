"""qfusion.training.run (and the host set-up, stage model and card it uses): every stage end to end on tiny
hosts of each family, what a run saves, LoRA, elastic budgets, settings checks, and the docs' training code."""

import json
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from readme_blocks import python_blocks
from training_workspace import metrics, settings, write_mixed_data
from transformers import AutoModelForImageTextToText

import qfusion
from qfusion.plugin import read_plugin
from qfusion.training import evaluate, load_config, train
from qfusion.training.card import read_stages
from qfusion.training.host import checkpoint_llm, load_host
from qfusion.training.config import build_config, TrainConfig

ROOT = Path(__file__).resolve().parents[1]
DOC_SECTIONS = (("docs/training.md", "Library use"),)


def config(root: Path, **changes) -> TrainConfig:
    values = settings(root)
    for key, value in changes.items():
        values[key] = {**values[key], **value} if isinstance(value, dict) and key in values else value
    return build_config(TrainConfig, values)


def timed(function, *args, **kwargs):
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - start


def test_llava_trains_align_then_generate_then_evaluates_with_both_baselines(colour_workspace, capsys):
    root = colour_workspace
    align = config(root, stage="align", output_dir=str(root / "e2e-align"), optim={"max_steps": 4},
                   data={"train": str(root / "mixed.jsonl")})
    _, align_time = timed(train, align)
    rows = metrics(root / "e2e-align")
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(np.isfinite(r["loss"]) for r in rows)
    assert all(r["budgets"] == [[4, 2]] for r in rows)

    generate = align.replace(stage="generate", plugin=str(root / "e2e-align"), output_dir=str(root / "e2e-generate"),
                             optim={"max_steps": 6, "batch_size": 28})
    _, generate_time = timed(train, generate)
    losses = [r["loss"] for r in metrics(root / "e2e-generate")]
    assert len(losses) == 6 and losses[-1] < losses[0]  # the whole data every step (4 of it text-only)

    host = AutoModelForImageTextToText.from_pretrained(root / "host")
    adapter = qfusion.attach(host, root / "e2e-generate")
    trained_from = qfusion.QuestionFusion.from_pretrained(root / "e2e-align")
    assert not torch.equal(adapter.fusion.codebook.weight, trained_from.codebook.weight)
    assert read_stages(root / "e2e-generate") == [
        {"stage": "align", "mode": "question", "budgets": [[4, 2]], "steps": 4, "data": str(root / "mixed.jsonl"),
         "lr": 3e-3, "batch_size": 6, "lora": False},
        {"stage": "generate", "mode": "question", "budgets": [[4, 2]], "steps": 6, "data": str(root / "mixed.jsonl"),
         "lr": 3e-3, "batch_size": 28, "lora": False}]

    result, eval_time = timed(evaluate, generate.replace(stage="eval", plugin=str(root / "e2e-generate"),
                                                         output_dir=str(root / "e2e-eval")))
    entry = result["budgets"][0]
    assert (entry["m"], entry["n"], entry["trained"]) == (4, 2, True)
    assert list(entry["scores"]) == ["plugin", "avg_pool", "random"] and entry["skipped"] == {}
    assert all(s["all"]["count"] == 16 and set(s["by_type"]) == {"color", "yesno"} for s in entry["scores"].values())
    saved = json.loads((root / "e2e-eval" / "eval.json").read_text())
    assert saved["table"] == result["table"] and len(saved["predictions"]["m4-n2"]["random"]) == 16
    with capsys.disabled():
        print(f"\nLLaVA tiny: align {align_time:.2f} s, generate {generate_time:.2f} s, eval {eval_time:.2f} s\n"
              f"{result['table']}")


def test_a_run_saves_only_what_it_owns(colour_workspace):
    root = colour_workspace
    out = root / "owned"
    train(config(root, stage="generate", output_dir=str(out), optim={"max_steps": 2}, log={"save_every": 1,
                                                                                          "save_total_limit": 1}))
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md", "checkpoint-2", "config.json", "metrics.jsonl", "model.safetensors", "qfusion_adapter.json",
        "qfusion_processor.json", "train_config.json"]
    checkpoint = sorted(p.name for p in (out / "checkpoint-2").iterdir())
    assert checkpoint == ["README.md", "config.json", "model.safetensors", "optimizer.pt", "qfusion_adapter.json",
                          "qfusion_processor.json", "rng_state.pth", "scheduler.pt", "trainer_state.json"]
    host_bytes = sum(p.stat().st_size for p in (root / "host").glob("*.safetensors"))
    assert (out / "model.safetensors").stat().st_size < host_bytes / 2
    assert read_plugin(out).config.m == 4


@pytest.mark.parametrize("kind", ["qwen2_5_vl", "qwen3_5"])
def test_qwen_vl_hosts_train_on_image_video_and_text_records_end_to_end(hosts, kind, tmp_path, capsys):
    directory = hosts.directory(kind)
    processor = hosts.processor(kind)
    data = write_mixed_data(tmp_path)
    base = config(tmp_path, model=directory, data={"train": str(data), "image_root": str(tmp_path)},
                  optim={"batch_size": 3, "max_steps": 3}, eval={"data": str(data), "budgets": [[4, 2], [2, 1]]})
    times = {}
    for stage, plugin in (("align", None), ("generate", "align")):
        run = base.replace(stage=stage, plugin=plugin and str(tmp_path / plugin), output_dir=str(tmp_path / stage))
        _, times[stage] = timed(train, run, host_processor=processor)
        assert [r["step"] for r in metrics(tmp_path / stage)] == [1, 2, 3]
    result, times["eval"] = timed(evaluate, base.replace(stage="eval", plugin=str(tmp_path / "generate"),
                                                         output_dir=str(tmp_path / "eval")), host_processor=processor)
    assert [(e["m"], e["n"], e["trained"]) for e in result["budgets"]] == [(4, 2, True), (2, 1, False)]
    scores = result["budgets"][0]["scores"]
    assert set(scores) == {"plugin", "avg_pool", "random"}
    assert {kind: s["count"] for kind, s in scores["plugin"]["by_type"].items()} == {"image": 4, "images": 2, "video": 2}
    assert scores["plugin"]["all"]["count"] == 10  # 8 questions about images and videos, 2 text-only
    with capsys.disabled():
        print(f"\n{kind} tiny: " + ", ".join(f"{k} {v:.2f} s" for k, v in times.items()) + f"\n{result['table']}")


def test_the_adapter_settings_wire_a_new_plugin_and_a_host_without_text_only_runs_refuses_those_records(
        colour_workspace, hosts):
    root = colour_workspace
    out = root / "hd"
    train(config(root, stage="generate", output_dir=str(out), adapter={"hd_grid": [2, 2]},
                 optim={"max_steps": 2, "batch_size": 4}, log={"save_every": 1}))
    plugin = read_plugin(out)
    assert plugin.settings.hd_grid == (2, 2) and (out / "hd_front_end.safetensors").is_file()
    assert (out / "checkpoint-1" / "hd_front_end.safetensors").is_file()
    with pytest.raises(ValueError, match=r"hd_grid: the plugin was trained with hd_grid=\(2, 2\), got \(3, 3\)"):
        evaluate(config(root, stage="eval", plugin=str(out), output_dir=str(out / "eval"), adapter={"hd_grid": [3, 3]}))
    result = evaluate(config(root, stage="eval", plugin=str(out), output_dir=str(out / "eval")))
    assert result["budgets"][0]["skipped"] == {
        method: "the plugin reads HD front-end tokens, not the host's own vision tokens" for method in ("avg_pool", "random")}

    blip = config(root, model=hosts.directory("blip-2"), stage="generate", output_dir=str(root / "blip"),
                  data={"train": str(root / "mixed.jsonl")}, optim={"max_steps": 1, "batch_size": 28})
    with pytest.raises(ValueError, match=r"data.train: records \[24, 25, 26, 27\] have no image or video, and the host "
                                         r"of this run cannot run a conversation without one"):
        train(blip, host_processor=hosts.processor("blip-2"))


def test_elastic_runs_save_the_configured_budget_whatever_was_drawn(colour_workspace):
    root = colour_workspace
    drawn = set()
    for seed in (0, 1):
        out = root / f"elastic-seed{seed}"
        train(config(root, stage="elastic", output_dir=str(out), seed=seed, elastic={"budgets": [1, 2, 4]},
                     optim={"max_steps": 3, "batch_size": 2}))
        drawn |= {tuple(b) for r in metrics(out) for b in r["budgets"]}
        saved = json.loads((out / "config.json").read_text())
        assert (saved["m"], saved["n"]) == (4, 2) and "attn_impl" not in saved
        assert read_stages(out)[-1]["budgets"] == [[1, 1], [2, 1], [2, 2], [4, 1], [4, 2], [4, 4]]
    assert len(drawn) > 1 and drawn <= {(m, n) for m in (1, 2, 4) for n in (1, 2, 4) if n <= m}
    with pytest.raises(ValueError, match=r"elastic.budgets: \[32\] exceed the plugin's codebook_size=16"):
        train(config(root, stage="elastic", output_dir=str(root / "elastic-too-large"), elastic={"budgets": [1, 32]}))


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # peft
def test_a_lora_run_saves_its_lora_with_the_plugin_and_later_stages_load_both(colour_workspace):
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors.torch import load_file

    root = colour_workspace
    out = root / "lora"
    train(config(root, stage="generate", output_dir=str(out), lora={"enabled": True, "r": 2},
                 optim={"max_steps": 3}))
    saved = load_file(out / "lora" / "adapter_model.safetensors")
    assert any("lora_B" in name and weight.abs().sum() > 0 for name, weight in saved.items())  # B starts at 0
    assert read_stages(out)[-1]["lora"] is True
    loaded = load_host(config(root, stage="eval", plugin=str(out)))
    assert isinstance(loaded.model, PeftModel) and not any(p.requires_grad for p in loaded.model.parameters())
    lora = {k: v for k, v in get_peft_model_state_dict(loaded.model).items() if "lora_" in k}
    assert lora and all(torch.equal(v, saved[k]) for k, v in lora.items())
    result = evaluate(config(root, stage="eval", plugin=str(out), output_dir=str(out / "eval"),
                             eval={"baselines": []}))
    assert result["budgets"][0]["scores"]["plugin"]["all"]["count"] == 16


def test_gradient_checkpointing_changes_no_loss(colour_workspace):
    root = colour_workspace
    losses = {}
    for checkpointing in (False, True):
        out = root / f"checkpointing-{checkpointing}"
        train(config(root, stage="generate", output_dir=str(out), optim={"max_steps": 3, "batch_size": 4,
                                                                         "gradient_checkpointing": checkpointing}))
        losses[checkpointing] = [r["loss"] for r in metrics(out)]
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)
    loaded = load_host(config(root, optim={"gradient_checkpointing": True}))
    assert loaded.adapter.fusion.gradient_checkpointing
    checkpoint_llm(loaded.model)
    layers = [m for m in loaded.model.modules() if hasattr(m, "gradient_checkpointing")]
    assert layers and all(m.gradient_checkpointing for m in layers)


def test_report_to_tensorboard_writes_the_logged_losses(colour_workspace):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root = colour_workspace
    out = root / "tensorboard"
    train(config(root, stage="generate", output_dir=str(out), optim={"max_steps": 3},
                 log={"report_to": "tensorboard", "save_every": 3}))
    (run,) = (out / "runs").iterdir()
    events = EventAccumulator(str(run))
    events.Reload()
    logged = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert logged == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in metrics(out)]
    assert [step for step, _ in logged] == [1, 2, 3]


def test_settings_that_contradict_the_plugin_or_an_earlier_run_are_errors(colour_workspace):
    root = colour_workspace
    align = root / "align-for-checks"
    train(config(root, stage="align", output_dir=str(align), optim={"max_steps": 1}))
    with pytest.raises(ValueError, match=r"fusion.num_layers: the plugin .* was built with num_layers=2"):
        train(config(root, stage="generate", plugin=str(align), output_dir=str(root / "x"),
                     fusion={"num_layers": 3}))
    with pytest.raises(ValueError, match=r"output_dir: .* holds an earlier run \(checkpoints\); set resume: true"):
        train(config(root, stage="align", output_dir=str(align), optim={"max_steps": 1}))
    with pytest.raises(ValueError, match=r"resume: the run in .* was started with other settings for \['optim.lr'\]"):
        train(config(root, stage="align", output_dir=str(align), resume=True, optim={"max_steps": 1, "lr": 1e-3}))
    with pytest.raises(ValueError, match=r"fusion.m, n: expected m <= codebook_size=16, got m=32"):
        train(config(root, stage="generate", output_dir=str(root / "y"), fusion={"m": 32}))


def test_small_plugin_settings_train_a_fresh_plugin_where_the_7b_learning_rate_does_not(colour_workspace):
    root = colour_workspace
    small = yaml.safe_load((ROOT / "examples" / "configs" / "small-plugin.yaml").read_text())
    results = {}
    for name, lr in (("small", small["optim"]["lr"]), ("7b-lr", 2e-5)):
        out = root / f"settings-{name}"
        run = config(root, stage="generate", output_dir=str(out),
                     optim={**small["optim"], "lr": lr, "max_steps": 60, "mixed_precision": "no"})
        train(run)
        scores = evaluate(run.replace(stage="eval", plugin=str(out), output_dir=str(out / "eval"),
                                      eval={"baselines": []}))["budgets"][0]["scores"]["plugin"]
        results[name] = (np.mean([r["loss"] for r in metrics(out)][-10:]), scores["all"]["vqa_match"])
    (small_loss, small_score), (slow_loss, slow_score) = results["small"], results["7b-lr"]
    # the table in docs/training.md; the host itself answers 93.75 % of these questions
    assert small_loss < 0.3 < slow_loss
    assert small_score >= 75 and slow_score <= 50


def test_docs_library_use_runs_as_written(colour_workspace, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.jsonl").write_text((colour_workspace / "train.jsonl").read_text())
    (tmp_path / "test.jsonl").write_text((colour_workspace / "test.jsonl").read_text())
    for image in colour_workspace.glob("*.png"):
        (tmp_path / image.name).write_bytes(image.read_bytes())
    for page, section in DOC_SECTIONS:
        for block in python_blocks(section, page):
            block = block.replace('"llava-hf/llava-1.5-7b-hf"', repr(str(colour_workspace / "host")))
            block = block.replace('"max_steps": 1000', '"max_steps": 2')
            exec(compile(block, f"{page} ({section})", "exec"), {})
    assert (tmp_path / "runs" / "eval" / "eval.json").is_file()


def test_readme_training_commands_run_as_written(colour_workspace, tmp_path, monkeypatch):
    from qfusion import cli

    monkeypatch.chdir(tmp_path)
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### Train"):]
    (block,) = re.findall(r"```bash\n(.*?)```", section[: section.index("\n### ", 4)], flags=re.S)
    tiny = colour_workspace / "config.yaml"
    commands = [line for line in block.replace("\\\n", " ").splitlines() if line.startswith("qfusion train")]
    assert [c.split("--stage ")[1].split()[0] for c in commands] == ["align", "generate", "eval"]
    for command in commands:
        arguments = command.split()[1:] + ["--set", "optim.max_steps=2"]
        arguments[arguments.index("examples/configs/llava-1.5-7b.yaml")] = str(tiny)
        assert cli.main([a.strip('"') for a in arguments]) == 0
    assert json.loads((tmp_path / "runs" / "eval" / "eval.json").read_text())["questions"] == 16


def test_load_config_reads_the_example_files():
    cfg = load_config([str(ROOT / "examples" / "configs" / "llava-1.5-7b.yaml"),
                       str(ROOT / "examples" / "configs" / "small-plugin.yaml")], ["stage=align"])
    assert cfg.model == "llava-hf/llava-1.5-7b-hf" and cfg.optim.lr == 1e-3 and cfg.align.text_encoder


@pytest.mark.parametrize(("name", "engine"), [("ddp", "MULTI_GPU"), ("fsdp2", "FSDP"), ("deepspeed-zero2", "DEEPSPEED")])
def test_the_engine_configs_load_as_accelerate_configs(name, engine):
    from accelerate.commands.config.config_args import ClusterConfig

    loaded = ClusterConfig.from_yaml_file(str(ROOT / "examples" / "configs" / f"{name}.yaml"))
    assert loaded.distributed_type.name == engine
    if engine == "FSDP":
        assert loaded.fsdp_config["fsdp_version"] == 2
    if engine == "DEEPSPEED":
        settings_file = ROOT / loaded.deepspeed_config["deepspeed_config_file"]
        assert json.loads(settings_file.read_text())["zero_optimization"]["stage"] == 2
