"""Reading a plugin directory and checking it against a host config (no engine)."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from transformers import AutoConfig

from qfusion_vllm.plugin import PLUGIN_FIELD, check_fit, plugin_directory, read_plugin


def test_plugin_fits_the_host_it_was_saved_for(artifacts):
    spec = read_plugin(artifacts.plugin)
    check_fit(spec, AutoConfig.from_pretrained(artifacts.host))
    assert (spec.config.m, spec.vision_source, spec.question_tokenizer_dir) == (6, "projector", None)


def test_output_dim_mismatch_names_field_and_both_values(artifacts, tmp_path):
    plugin = shutil.copytree(artifacts.plugin, tmp_path / "plugin")
    config = AutoConfig.from_pretrained(artifacts.host)
    config.text_config.hidden_size = 96
    with pytest.raises(ValueError, match=r"vision_dim=128, this host needs vision_dim=96"):
        check_fit(read_plugin(str(plugin)), config)


def edit_settings(plugin, **changes) -> str:
    path = os.path.join(plugin, "qfusion_adapter.json")
    with open(path) as f:
        settings = json.load(f)
    settings.update(changes)
    with open(path, "w") as f:
        json.dump(settings, f)
    return str(plugin)


def test_plugin_for_another_family_is_refused(artifacts, tmp_path):
    plugin = edit_settings(shutil.copytree(artifacts.plugin, tmp_path / "p"), family="blip2", model_type="blip-2",
                           vision_source="tower")
    with pytest.raises(ValueError, match="saved for a 'blip-2' host"):
        read_plugin(plugin)


def test_plugin_with_hd_views_is_refused(artifacts, tmp_path):
    plugin = edit_settings(shutil.copytree(artifacts.plugin, tmp_path / "p"), hd_grid=[3, 3])
    with pytest.raises(ValueError, match="HD front-end"):
        read_plugin(plugin)


def test_missing_plugin_directory_names_the_field(tmp_path):
    config = AutoConfig.for_model("llava")
    setattr(config, PLUGIN_FIELD, str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=PLUGIN_FIELD):
        plugin_directory(config)
