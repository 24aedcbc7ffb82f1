"""qfusion.training.card and the push of a plugin (qfusion.plugin.push_plugin), offline: the card names the host as
base_model with the budgets, stages and data; the push uploads the plugin's files and its LoRA, nothing else."""

import pytest
from training_workspace import settings

from qfusion.budget import Budget
from qfusion.plugin import push_plugin
from qfusion.training import train
from qfusion.training.card import plugin_card, read_stages, stage_record, trained_budgets
from qfusion.training.config import TrainConfig, build_config


def test_the_card_metadata_holds_base_model_budgets_stages_and_data(tmp_path):
    from huggingface_hub import ModelCard

    stages = [stage_record("align", mode="question", budgets=[Budget(4, 2)], steps=10, data="train.jsonl", lr=1e-3,
                           batch_size=8, lora=False),
              stage_record("elastic", mode="question", budgets=[Budget(1, 1), Budget(4, 2)], steps=20,
                           data="train.jsonl", lr=1e-3, batch_size=8, lora=True)]
    text = plugin_card(base_model="llava-hf/llava-1.5-7b-hf", family="llava", budget=Budget(4, 2), stages=stages)
    (tmp_path / "README.md").write_text(text)
    data = ModelCard.load(tmp_path / "README.md").data.to_dict()
    assert data["base_model"] == "llava-hf/llava-1.5-7b-hf" and data["library_name"] == "qfusion"
    assert data["tags"] == ["qfusion", "vision-token-compression", "llava"]
    assert data["qfusion"] == {"family": "llava", "budget": [4, 2], "stages": stages}
    assert read_stages(tmp_path) == stages
    assert trained_budgets(stages) == {Budget(1, 1), Budget(4, 2)}  # align trains no generation
    assert "| elastic | question | (1, 1), (4, 2) | 20 | 8 | 0.001 | yes | `train.jsonl` |" in text
    assert "peft.PeftModel.from_pretrained" in text
    assert read_stages(tmp_path / "elsewhere") is None


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # peft
def test_a_trained_plugin_is_pushed_with_its_card_and_lora_but_not_its_checkpoints(colour_workspace, monkeypatch):
    from huggingface_hub import HfApi

    calls = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kwargs: calls.append(("create", repo_id, kwargs)))
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kwargs: calls.append(("upload", kwargs)) or "url")
    out = colour_workspace / "pushed"
    values = settings(colour_workspace, stage="generate", output_dir=str(out), hub={"repo_id": "me/plugin",
                                                                                    "private": True},
                      lora={"enabled": True, "r": 2})
    values["optim"]["max_steps"] = 1
    train(build_config(TrainConfig, values))
    (create, repo_id, options), (upload, upload_options) = calls
    assert (create, repo_id, options) == ("create", "me/plugin", {"private": True, "exist_ok": True})
    assert upload_options["repo_id"] == "me/plugin" and upload_options["folder_path"] == str(out)
    patterns = upload_options["allow_patterns"]
    assert {"config.json", "model.safetensors", "qfusion_adapter.json", "README.md", "lora/**"} <= set(patterns)
    assert not any("checkpoint" in p or "metrics" in p or p == "*" for p in patterns)
    assert (out / "checkpoint-1").is_dir() and (out / "lora" / "adapter_model.safetensors").is_file()
    with pytest.raises(FileNotFoundError, match="lacks config.json"):
        push_plugin(colour_workspace, "me/plugin")
