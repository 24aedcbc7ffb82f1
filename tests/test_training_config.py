"""qfusion.training.config and the command line: settings from files and --set, errors naming the key,
every setting listed by --help and the docs page."""

import re
import runpy
import sys
from pathlib import Path

import pytest
import yaml

from qfusion import cli
from qfusion.training import load_config, parse_args, settings_markdown
from qfusion.training.config import parse_override, settings_help, settings_rows

ROOT = Path(__file__).resolve().parents[1]
BASE = {"model": "host", "data": {"train": "train.jsonl"}, "fusion": {"m": 4, "n": 2, "codebook_size": 16,
                                                                       "hidden_size": 32},
        "optim": {"batch_size": 6}, "eval": {"max_new_tokens": 3}}


@pytest.fixture
def base(tmp_path):
    path = tmp_path / "base.yaml"
    path.write_text(yaml.safe_dump(BASE))
    return str(path)


def test_nested_overrides_merge_into_their_section(base, tmp_path):
    cfg = load_config([base], ["fusion.m=8", "optim.lr=1e-3"])
    assert cfg.fusion == {"m": 8, "n": 2, "codebook_size": 16, "hidden_size": 32}
    assert cfg.optim.lr == 1e-3 and isinstance(cfg.optim.lr, float)  # YAML 1.1 alone reads 1e-3 as a string
    assert cfg.optim.batch_size == 6 and cfg.eval.max_new_tokens == 3  # the rest of each section stays
    cfg = load_config([base], ["fusion={m: 4, n: 4}"])
    assert (cfg.fusion["m"], cfg.fusion["n"], cfg.fusion["hidden_size"]) == (4, 4, 32)  # merged, not replaced
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text("optim: {lr: 0.01}\nfusion: {num_layers: 1}\n")
    cfg = load_config([base, str(overlay)], ["optim.max_steps=null"])
    assert (cfg.optim.lr, cfg.optim.batch_size, cfg.optim.max_steps) == (0.01, 6, None)
    assert (cfg.fusion["num_layers"], cfg.fusion["hidden_size"]) == (1, 32)
    assert load_config([base], ["seed=3"], stage="align").stage == "align"


def test_replace_merges_a_section_mapping_and_validates():
    cfg = load_config([], ["model=host", "data.train=t.jsonl"])
    changed = cfg.replace(eval={"budgets": [4]}, stage="align")
    assert changed.eval.budgets == [4] and changed.eval.batch_size == cfg.eval.batch_size
    assert changed.stage == "align" and cfg.stage == "generate"
    with pytest.raises(ValueError, match=r"eval.batch_size: expected >= 1, got 0"):
        cfg.replace(eval={"batch_size": 0})
    with pytest.raises(ValueError, match=r"unknown keys \['eval.size'\]"):
        cfg.replace(eval={"size": 1})


def test_unknown_and_mistyped_settings_are_errors_naming_the_key(base, tmp_path):
    with pytest.raises(ValueError, match=r"unknown keys \['lr'\] \(did you mean \['optim.lr'\]\?\)"):
        load_config([base], ["lr=1e-3"])
    with pytest.raises(ValueError, match=r"unknown keys \['optim.learning_rate'\]"):
        load_config([base], ["optim.learning_rate=1"])
    with pytest.raises(ValueError, match=r"fusion: unknown FusionConfig fields \['layers'\]"):
        load_config([base], ["fusion.layers=2"])
    with pytest.raises(TypeError, match=r"optim.batch_size: expected int, got 'four'"):
        load_config([base], ["optim.batch_size=four"])
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text("optim: {lr: 1e-3}\n")
    with pytest.raises(TypeError, match=r"optim.lr: expected float, got '1e-3' \(str\) \(YAML reads 1e-3 as text"):
        load_config([base, str(overlay)])
    with pytest.raises(TypeError, match=r"optim: expected a mapping"):
        load_config([base], ["optim=3"])
    with pytest.raises(ValueError, match=r"--set: expected KEY=VALUE"):
        load_config([base], ["optim..lr=1"])
    with pytest.raises(ValueError, match=r"identity_weight.*did you mean \['align.identity_weight'\]"):
        load_config([base], ["identity_weight=0.5"])  # the loss weights live in the training config's align section


def test_a_value_that_is_not_yaml_names_set_and_the_key(capsys):
    with pytest.raises(ValueError, match=r"--set fusion: the value '\{m: \[\}' is not valid YAML") as error:
        parse_override("fusion={m: [}")
    assert "ParserError" not in str(error.value)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["train", "--set", "model=x", "--set", "fusion={m: [}"])
    assert exit_.value.code == 2
    assert "qfusion train: error: --set fusion: the value '{m: [}' is not valid YAML" in capsys.readouterr().err


def test_stage_requirements_are_checked_when_the_config_is_built(base):
    with pytest.raises(ValueError, match="eval.data: the sweep stage scores answers"):
        load_config([base], ["stage=sweep"])
    with pytest.raises(ValueError, match="plugin: the eval stage needs"):
        load_config([base], ["stage=eval", "eval.data=test.jsonl"])
    with pytest.raises(ValueError, match=r"sweep.modes: expected a non-empty subset"):
        load_config([base], ["sweep.modes=[blind]"])
    with pytest.raises(ValueError, match=r"stage: expected one of \['align'"):
        load_config([base], ["stage=pretrain"])
    with pytest.raises(ValueError, match=r"data.train: the generate stage trains on conversations"):
        load_config([], ["model=host"])
    with pytest.raises(ValueError, match=r"eval.baselines: expected a subset of \['avg_pool', 'random'\]"):
        load_config([base], ["eval.baselines=[pooled]"])
    with pytest.raises(FileNotFoundError, match=r"--config: no such file 'missing.yaml'"):
        load_config(["missing.yaml"])


def test_help_lists_every_setting_with_its_section_type_default_and_help(capsys, monkeypatch):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = capsys.readouterr().out
    rows = settings_rows()
    assert len(rows) > 60
    for section, key, kind, default, help_text in rows:
        line = f"  {key} ({kind}, default {default}): {help_text}"
        assert line in text, line
    assert "Stage 1 (section align): the answer encoder and the loss weights." in text
    assert "optim.lr (float, default 2e-05): peak learning rate" in text
    monkeypatch.setattr(sys, "argv", ["train.py", "--help"])
    with pytest.raises(SystemExit):
        runpy.run_path(str(ROOT / "examples" / "train.py"), run_name="__main__")
    script = capsys.readouterr().out
    assert script.startswith("usage: train.py") and settings_help() in script and settings_help() in text


def test_docs_settings_table_is_the_generated_one():
    table = settings_markdown()
    assert table in (ROOT / "docs" / "training.md").read_text()
    keys = re.findall(r"^\| `([\w.]+)` \|", table, flags=re.M)
    assert "align.identity_weight" in keys and "fusion.m" in keys and "lora.enabled" in keys
    assert len(keys) == len(settings_rows())


def test_command_line_flags_override_the_files(base):
    cfg = parse_args(["--config", base, "--stage", "align", "--output-dir", "runs/a", "--set", "optim.lr=1e-3"])
    assert (cfg.stage, cfg.output_dir, cfg.optim.lr, cfg.plugin) == ("align", "runs/a", 1e-3, None)
    with pytest.raises(SystemExit):
        parse_args(["--config", base, "--set", "optim.batch_size=0"])
