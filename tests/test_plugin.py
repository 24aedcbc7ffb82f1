"""qfusion.plugin: the plugin directory's one reader and writer; saves are atomic, incomplete directories refused."""

import json
import os

import pytest
import torch
from conftest_hosts import fusion_config, images

import qfusion
from qfusion import QFusionProcessor
from qfusion.plugin import ADAPTER_CONFIG_NAME, read_plugin


def saved_plugin(hosts, directory, seed=0, **options):
    model = hosts.model("llava")
    torch.manual_seed(seed)
    adapter = qfusion.attach(model, fusion_config(), **options)
    processor = QFusionProcessor(hosts.processor("llava"), model)
    adapter.save_pretrained(directory, processor=processor, card="# a plugin\n")
    return adapter


def test_a_save_writes_every_file_and_reads_back(hosts, tmp_path):
    adapter = saved_plugin(hosts, tmp_path / "plugin", hd=(1, 2))
    names = set(os.listdir(tmp_path / "plugin"))
    assert {"config.json", "model.safetensors", ADAPTER_CONFIG_NAME, "hd_front_end.safetensors",
            "qfusion_processor.json", "README.md"} <= names
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # no staging folder left behind
    plugin = read_plugin(tmp_path / "plugin")
    assert plugin.settings == adapter.settings and plugin.settings.tokens == {"image": 4}
    assert plugin.config == adapter.fusion.config.replace(attn_impl="auto")
    assert (tmp_path / "plugin" / "README.md").read_text() == "# a plugin\n"


@pytest.mark.parametrize("crash_at", [0, 1, 2])  # renaming config.json, the weights, the settings
def test_an_interrupted_save_leaves_a_directory_that_is_refused_not_a_mix(hosts, tmp_path, monkeypatch, crash_at):
    directory = tmp_path / "plugin"
    saved_plugin(hosts, directory)  # a complete plugin (vision_source "projector")
    model = hosts.model("llava")
    adapter = qfusion.attach(model, fusion_config(), vision_source="tower")
    calls = []
    real_replace = os.replace

    def crashing_replace(source, target):
        if str(target).startswith(str(directory)):
            calls.append(target)
            if len(calls) > crash_at:
                raise KeyboardInterrupt("killed during the save")
        return real_replace(source, target)

    monkeypatch.setattr(os, "replace", crashing_replace)
    with pytest.raises(KeyboardInterrupt):
        adapter.save_pretrained(directory)
    monkeypatch.setattr(os, "replace", real_replace)
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # the staging folder is cleaned up
    assert not os.path.exists(directory / ADAPTER_CONFIG_NAME)  # removed first, renamed in last
    with pytest.raises(FileNotFoundError, match="lacks .*; not a complete qfusion plugin"):
        qfusion.attach(hosts.model("llava"), directory)
    adapter.save_pretrained(directory)  # saving again completes it
    assert read_plugin(directory).settings.vision_source == "tower"


def test_a_save_keeps_other_files_of_the_folder_and_the_processor_settings(hosts, tmp_path):
    directory = tmp_path / "run"
    directory.mkdir()
    (directory / "metrics.jsonl").write_text("{}\n")
    adapter = saved_plugin(hosts, directory)
    adapter.save_pretrained(directory)  # without a processor: its saved settings stay
    assert (directory / "metrics.jsonl").read_text() == "{}\n"
    assert read_plugin(directory).processor is not None


@pytest.mark.parametrize("missing", ["config.json", "model.safetensors", ADAPTER_CONFIG_NAME,
                                     "hd_front_end.safetensors"])
def test_a_directory_missing_a_needed_file_is_refused_naming_it(hosts, tmp_path, missing):
    saved_plugin(hosts, tmp_path / "plugin", hd=(1, 2))
    os.remove(tmp_path / "plugin" / missing)
    with pytest.raises(FileNotFoundError, match=f"lacks {missing}"):
        qfusion.attach(hosts.model("llava"), tmp_path / "plugin")


def test_damaged_or_unknown_settings_are_refused_naming_the_file(hosts, tmp_path):
    saved_plugin(hosts, tmp_path / "plugin")
    path = tmp_path / "plugin" / ADAPTER_CONFIG_NAME
    settings = json.loads(path.read_text())
    path.write_text(json.dumps(dict(settings, colour="red")))
    with pytest.raises(ValueError, match=rf"{ADAPTER_CONFIG_NAME}: unknown adapter settings \['colour'\]"):
        read_plugin(tmp_path / "plugin")
    path.write_text(json.dumps({k: v for k, v in settings.items() if k != "vision_source"}))
    with pytest.raises(ValueError, match=r"missing adapter settings \['vision_source'\]"):
        read_plugin(tmp_path / "plugin")
    path.write_text("{ not json")
    with pytest.raises(ValueError, match=f"{ADAPTER_CONFIG_NAME}: not valid JSON"):
        read_plugin(tmp_path / "plugin")


def test_a_plugin_saved_for_other_token_ids_is_refused_naming_both(hosts, tmp_path):
    saved_plugin(hosts, tmp_path / "plugin")
    path = tmp_path / "plugin" / ADAPTER_CONFIG_NAME
    path.write_text(json.dumps(dict(json.loads(path.read_text()), tokens={"image": 5})))
    model = hosts.model("llava")
    with pytest.raises(ValueError, match=r"^fusion: the plugin was saved for a host with token ids \{'image': 5\}, "
                                         r"this host has \{'image': 4\}$"):
        qfusion.attach(model, tmp_path / "plugin")
    assert not hasattr(model, "qfusion")


def test_a_format_1_plugin_attaches_and_its_processor_needs_the_model(hosts, tmp_path):
    adapter = saved_plugin(hosts, tmp_path / "plugin")
    path = tmp_path / "plugin" / ADAPTER_CONFIG_NAME
    settings = json.loads(path.read_text())
    del settings["tokens"]
    path.write_text(json.dumps(dict(settings, format_version=1)))
    model = hosts.model("llava")
    qfusion.attach(model, tmp_path / "plugin")
    with pytest.raises(ValueError, match="a plugin saved without the host's token ids"):
        QFusionProcessor.from_pretrained(tmp_path / "plugin", hosts.processor("llava"))
    processor = QFusionProcessor.from_pretrained(tmp_path / "plugin", hosts.processor("llava"), model)
    assert processor.budget == adapter.budget
    with torch.no_grad():
        assert model(**processor(images=images(1), questions="what is this ?")).logits.ndim == 3
