"""Loading a plugin directory for a vLLM host config and checking it against the host (no engine)."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from transformers import AutoConfig

import qfusion_vllm
from qfusion_vllm.plugin import PLUGIN_FIELD, load_plugin, plugin_directory


def host_config(host: str, plugin=None):
    config = AutoConfig.from_pretrained(host)
    if plugin is not None:
        setattr(config, PLUGIN_FIELD, str(plugin))
    return config


@pytest.mark.parametrize("kind", ["llava", "qwen2_5_vl"])
def test_plugin_fits_the_host_it_was_saved_for(built, kind):
    artifacts = built(kind)
    plugin = load_plugin(host_config(artifacts.host, artifacts.plugin))
    assert (plugin.config.m, plugin.config.n, plugin.settings.model_type) == (6, 2, kind)


def test_without_the_field_the_host_is_served_alone(built):
    assert load_plugin(host_config(built("llava").host)) is None


@pytest.mark.parametrize("kind", ["llava", "qwen2_5_vl"])
def test_width_mismatch_names_the_field_and_both_values(built, kind, tmp_path):
    artifacts = built(kind)
    config = host_config(artifacts.host, shutil.copytree(artifacts.plugin, tmp_path / "plugin"))
    config.get_text_config().hidden_size = 96
    with pytest.raises(ValueError, match=r"has vision_dim=128, this host needs vision_dim=96"):
        load_plugin(config)


def edit_settings(plugin, **changes) -> str:
    path = os.path.join(plugin, "qfusion_adapter.json")
    with open(path) as f:
        settings = json.load(f)
    settings.update(changes)
    with open(path, "w") as f:
        json.dump(settings, f)
    return str(plugin)


def test_plugin_for_another_host_type_is_refused(built, tmp_path):
    artifacts = built("qwen2_5_vl")
    plugin = edit_settings(shutil.copytree(artifacts.plugin, tmp_path / "p"), model_type="qwen3_vl")
    with pytest.raises(ValueError, match="saved for a 'qwen3_vl' host, this host is 'qwen2_5_vl'"):
        load_plugin(host_config(artifacts.host, plugin))


def test_plugin_for_other_placeholder_ids_is_refused(built, tmp_path):
    artifacts = built("qwen2_5_vl")
    plugin = edit_settings(shutil.copytree(artifacts.plugin, tmp_path / "p"),
                           tokens={"image": 9, "video": 5, "start": 6, "end": 7})
    with pytest.raises(ValueError, match="saved for a host with token ids"):
        load_plugin(host_config(artifacts.host, plugin))


def test_plugin_with_hd_views_is_refused(built, tmp_path):
    artifacts = built("llava")
    plugin = shutil.copytree(artifacts.plugin, tmp_path / "p")
    shutil.copy(os.path.join(plugin, "model.safetensors"), os.path.join(plugin, "hd_front_end.safetensors"))
    with pytest.raises(ValueError, match="HD front-end"):
        load_plugin(host_config(artifacts.host, edit_settings(plugin, hd_grid=[3, 3])))


def test_missing_plugin_directory_names_the_field(tmp_path):
    config = AutoConfig.for_model("llava")
    setattr(config, PLUGIN_FIELD, str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=PLUGIN_FIELD):
        plugin_directory(config)


def test_hf_overrides_name_the_architecture_of_the_plugins_host(built):
    artifacts = built("qwen2_5_vl")
    assert qfusion_vllm.hf_overrides(artifacts.plugin) == {
        "architectures": ["QFusionQwen2_5_VLForConditionalGeneration"], PLUGIN_FIELD: artifacts.plugin}
    assert qfusion_vllm.hf_overrides(model_type="llava") == {"architectures": ["QFusionLlavaForConditionalGeneration"]}
    with pytest.raises(ValueError, match="model_type: required without a plugin_dir"):
        qfusion_vllm.hf_overrides()
    with pytest.raises(ValueError, match="was saved for 'qwen2_5_vl', got 'llava'"):
        qfusion_vllm.hf_overrides(artifacts.plugin, model_type="llava")
    with pytest.raises(ValueError, match=r"model_type: the vLLM plugin serves \['llava', 'qwen2_5_vl', 'qwen3_vl'\]"):
        qfusion_vllm.hf_overrides(model_type="blip-2")
