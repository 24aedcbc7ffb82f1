"""qfusion.adapters (dispatch, the shared base, FusionCache) and the attach examples of the README and docs/hosts.md."""

from pathlib import Path

import pytest
import torch
from conftest_hosts import VideoHostProcessor, fusion_config, images
from PIL import Image
from readme_blocks import checked, python_blocks
from torch import nn

import qfusion
from qfusion import QFusionProcessor, QuestionFusion
from qfusion.adapters import BUILT_IN_FAMILIES, FAMILIES, MODEL_TYPES, get_adapter, hosts_table
from qfusion.adapters.patching import active_module

DOC_SECTIONS = (("README.md", "Attach to a host"), ("docs/hosts.md", "Wrap a LLaVA checkpoint"),
                ("docs/hosts.md", "Wrap a Qwen2.5-VL / Qwen3-VL checkpoint"),
                ("docs/hosts.md", "Wrap a LLaVA-OneVision checkpoint"), ("docs/hosts.md", "Wrap BLIP-2 / InstructBLIP"),
                ("docs/hosts.md", "Adding a host family"))
CHECKPOINTS = {"llava-hf/llava-1.5-7b-hf": "llava", "Salesforce/blip2-opt-2.7b": "blip-2",
               "Salesforce/instructblip-vicuna-7b": "instructblip", "Qwen/Qwen2.5-VL-7B-Instruct": "qwen2_5_vl",
               "llava-hf/llava-onevision-qwen2-7b-ov-hf": "llava_onevision", "llava-hf/vip-llava-7b-hf": "vipllava"}
STAND_IN_PROCESSORS = {"Wrap a Qwen2.5-VL / Qwen3-VL checkpoint": VideoHostProcessor.qwen,
                       "Wrap a LLaVA-OneVision checkpoint": VideoHostProcessor.onevision}
"""Sections whose hub processor needs torchvision (for its video processor): AutoProcessor gives the stand-in."""


@pytest.mark.parametrize(("page", "title"), DOC_SECTIONS)
def test_docs_adapter_sections_run_as_written(hosts, page, title, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if title in STAND_IN_PROCESSORS:
        import transformers

        monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", staticmethod(STAND_IN_PROCESSORS[title]))
    Image.fromarray(images(1, size=(60, 80))[0]).save("photo.jpg")
    hosts.directory("vipllava")  # built (and its tests' family registered) before the page registers its own
    monkeypatch.delitem(FAMILIES, "vipllava", raising=False)  # the page registers the family as a user would
    monkeypatch.delitem(MODEL_TYPES, "vipllava", raising=False)
    blocks = python_blocks(title, page)
    assert blocks
    namespace: dict = {}
    torch.manual_seed(0)
    for block in blocks:
        for checkpoint, kind in CHECKPOINTS.items():  # the hub checkpoints, as tiny random ones
            block = block.replace(repr(checkpoint).replace("'", '"'), repr(hosts.directory(kind)))
        exec(compile(checked(block), f"{page} ({title})", "exec"), namespace)


@pytest.mark.parametrize("page", ["README.md", "docs/hosts.md"])
def test_the_supported_hosts_table_is_the_registrys(page):
    text = (Path(__file__).resolve().parents[1] / page).read_text()
    assert hosts_table(list(BUILT_IN_FAMILIES)) in text
    assert {t for family in BUILT_IN_FAMILIES for t in family.model_types} <= set(MODEL_TYPES)


def test_attach_rejects_unsupported_models_and_inputs(hosts):
    from transformers import LlamaConfig, LlamaForCausalLM

    llm = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=1))
    with pytest.raises(ValueError, match="no host family for model_type 'llama'"):
        qfusion.attach(llm, fusion_config())
    with pytest.raises(TypeError, match="expected a FusionConfig, a QuestionFusion or a plugin directory"):
        qfusion.attach(hosts.model("llava"), {"m": 4})
    with pytest.raises(ValueError, match="no qfusion plugin attached"):
        get_adapter(hosts.model("llava"))


@pytest.mark.parametrize("model_type, config, reason", [
    ("mllama", {}, "cross-attention layers, not as placeholder tokens"),
    ("florence2", {"is_encoder_decoder": True}, "an encoder-decoder model"),
])
def test_hosts_without_the_placeholder_seam_are_refused_naming_why(model_type, config, reason):
    from types import SimpleNamespace

    host = nn.Module()
    host.config = SimpleNamespace(model_type=model_type, **config)
    with pytest.raises(NotImplementedError, match=f"cannot attach to '{model_type}'.*{reason}"):
        qfusion.attach(host, fusion_config())


def test_attach_before_peft_and_detach_after_unloading(hosts):
    from peft import get_peft_model

    model = hosts.model("llava")
    qfusion.attach(model, fusion_config())
    peft_model = get_peft_model(model, qfusion.lora_config(model))
    with pytest.raises(TypeError, match="before wrapping it with peft"):
        qfusion.attach(peft_model, fusion_config())
    host = peft_model.merge_and_unload()
    assert host is model and isinstance(host.qfusion, QuestionFusion)
    assert isinstance(qfusion.detach(host), QuestionFusion)


def test_detach_refuses_when_someone_patched_after_attach(hosts):
    model = hosts.model("llava")
    qfusion.attach(model, fusion_config())
    ours = model.forward
    model.forward = lambda *args, **kwargs: ours(*args, **kwargs)
    with pytest.raises(RuntimeError, match="was replaced after qfusion.attach"):
        qfusion.detach(model)
    model.forward = ours
    qfusion.detach(model)


def test_a_deep_copy_of_an_attached_host_runs_and_detaches_on_its_own(hosts):
    import copy

    model = hosts.model("blip-2")
    qfusion.attach(model, fusion_config(), mode="augment")
    processor = QFusionProcessor(hosts.processor("blip-2"), model)
    batch = processor(images=images(1), questions=[["what is this ?", "red"]])
    twin = copy.deepcopy(model)
    assert get_adapter(twin).model is twin and get_adapter(twin).fusion is twin.qfusion
    with torch.no_grad():
        assert torch.equal(twin(**batch).logits, model(**batch).logits)
        twin.qfusion.codebook.weight.zero_()
        assert not torch.equal(twin(**batch).logits, model(**batch).logits)  # the copy runs its own plugin
    qfusion.detach(twin)
    assert "forward" not in twin.__dict__ and "forward" in model.__dict__
    assert not any("qfusion" in k for k in twin._keys_to_ignore_on_save)


def test_host_save_leaves_the_plugin_out_even_when_it_changes(hosts, tmp_path):
    model = hosts.model("llava")
    qfusion.attach(model, fusion_config())
    assert all(k.startswith("qfusion.") for k in model._keys_to_ignore_on_save)
    model.qfusion = nn.Sequential(model.qfusion)  # the plugin module is swapped (as wrappers do)
    assert "qfusion.0.codebook.weight" in set(model._keys_to_ignore_on_save)
    model.qfusion = model.qfusion[0]
    model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path)
    assert set(reloaded.state_dict()) == {k for k in model.state_dict() if not k.startswith("qfusion.")}


def test_active_module_follows_peft_modules_to_save(hosts):
    from peft import get_peft_model

    model = hosts.model("blip-2")
    adapter = qfusion.attach(model, fusion_config())
    peft_model = get_peft_model(model, qfusion.lora_config(model))
    wrapper = model.qfusion
    assert active_module(wrapper) is wrapper.modules_to_save["default"] is adapter.fusion
    with peft_model.disable_adapter():
        assert adapter.fusion is wrapper.original_module
    assert active_module(adapter.fusion) is adapter.fusion


def test_a_host_whose_forward_lacks_the_embedding_seam_is_refused_at_attach(hosts):
    model = hosts.model("llava")

    class WithoutSeam(type(model)):
        def forward(self, input_ids=None, pixel_values=None, attention_mask=None, **kwargs):
            return super().forward(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                                   **kwargs)

    model.__class__ = WithoutSeam
    with pytest.raises(TypeError, match="has no 'mm_encoder_outputs' parameter in transformers"):
        qfusion.attach(model, fusion_config())
    assert "qfusion" not in model._modules and "forward" not in model.__dict__
