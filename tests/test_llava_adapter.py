"""qfusion.adapters.llava on tiny random LLaVA and LLaVA-NeXT checkpoints (saved and loaded back)."""

import os

import pytest
import torch
from conftest_hosts import fusion_config, images
from safetensors.torch import load_file

import qfusion
from qfusion import QFusionProcessor, QuestionFusion
from qfusion.adapters import FusionCache, get_adapter

KINDS = ["llava", "llava_next"]

CONVERSATION = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is this ?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "a cat ."}]},
    {"role": "user", "content": [{"type": "text", "text": "what color is it ?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
]


def attached(hosts, kind="llava", seed=0, **options):
    model = hosts.model(kind)
    torch.manual_seed(seed)
    adapter = qfusion.attach(model, fusion_config(), **options)
    return model, adapter, QFusionProcessor(hosts.processor(kind), model)


def image_positions(model, inputs, records):
    """Per sample, the positions where the LLM input differs from the plain token embeddings."""
    text = model.get_input_embeddings()(inputs["input_ids"])
    return (records[-1] != text).any(-1)


def test_save_then_attach_round_trip_is_bit_exact(hosts, tmp_path):
    model, adapter, processor = attached(hosts)
    batch = processor(images=images(1), conversations=[CONVERSATION], return_labels=True)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(**batch).loss.backward()
    optimizer.step()
    with torch.no_grad():
        trained = model(**batch).logits
    plugin = adapter.save_pretrained(tmp_path / "plugin")
    processor.save_pretrained(plugin)
    saved = set(os.listdir(plugin))
    assert {"config.json", "model.safetensors", "qfusion_adapter.json", "qfusion_processor.json"} <= saved

    model.save_pretrained(tmp_path / "host")
    assert not [k for k in load_file(tmp_path / "host" / "model.safetensors") if "qfusion" in k]

    fresh = type(model).from_pretrained(tmp_path / "host").eval()
    restored = qfusion.attach(fresh, plugin)
    assert restored.settings == adapter.settings
    fresh_processor = QFusionProcessor.from_pretrained(plugin, hosts.processor("llava"), fresh)
    again = fresh_processor(images=images(1), conversations=[CONVERSATION], return_labels=True)
    with torch.no_grad():
        assert torch.equal(fresh(**again).logits, trained)


def test_lora_with_the_plugin_trains_only_lora_and_the_plugin_copy(hosts, tmp_path):
    from peft import get_peft_model

    model, adapter, processor = attached(hosts)
    peft_model = get_peft_model(model, qfusion.lora_config(model, r=4))
    trainable = {name for name, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable
    for name in trainable:
        assert ("lora_" in name and ".language_model." in name) or ".qfusion.modules_to_save." in name, name
    assert not any("vision_tower" in name and "lora_" in name for name, _ in peft_model.named_parameters())
    assert any("lora_" in name for name in trainable) and any("qfusion" in name for name in trainable)

    copy = model.qfusion.modules_to_save["default"]
    assert get_adapter(peft_model).fusion is copy  # the patched code runs peft's trainable copy
    original = {k: v.clone() for k, v in model.qfusion.original_module.state_dict().items()}
    frozen = {name: p.clone() for name, p in peft_model.named_parameters() if not p.requires_grad}
    batch = processor(images=images(1), conversations=[CONVERSATION], return_labels=True)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        optimizer.zero_grad()
        peft_model(**batch).loss.backward()
        optimizer.step()
    assert all(torch.equal(v, model.qfusion.original_module.state_dict()[k]) for k, v in original.items())
    assert all(torch.equal(p, frozen[name]) for name, p in peft_model.named_parameters() if name in frozen)
    assert not torch.equal(copy.codebook.weight, model.qfusion.original_module.codebook.weight)
    with torch.no_grad():
        enabled = peft_model(**batch).logits
        with peft_model.disable_adapter():
            disabled = peft_model(**batch).logits
    assert not torch.allclose(enabled, disabled)
    generated = peft_model.generate(**processor(images=images(1), conversations=[CONVERSATION[:1]]),
                                    max_new_tokens=3, do_sample=False)
    assert generated.shape[1] > 0
    get_adapter(peft_model).save_pretrained(tmp_path / "plugin")
    saved = load_file(tmp_path / "plugin" / "model.safetensors")
    assert torch.equal(saved["codebook.weight"], copy.codebook.weight)
    with pytest.raises(RuntimeError, match="wrapped by peft"):
        qfusion.detach(peft_model)


@pytest.mark.parametrize("kind", KINDS)
def test_tower_source_reads_the_hosts_selected_features(hosts, kind):
    model, adapter, processor = attached(hosts, kind, vision_source="tower")
    assert adapter.fusion.config.vision_dim == model.config.vision_config.hidden_size
    batch = processor(images=images(2), questions=["what is this ?", "red"])
    kwargs = {"image_sizes": batch["image_sizes"]} if kind == "llava_next" else {}
    with torch.no_grad():
        tower = adapter.encode(batch)
        projected = model.model.get_image_features(pixel_values=batch["pixel_values"], return_dict=True,
                                                   **kwargs).pooler_output
        if kind == "llava":
            for mine, host in zip(tower, projected):
                torch.testing.assert_close(model.model.multi_modal_projector(mine), host, rtol=0, atol=0)
        out = model(**batch)
    assert out.logits.shape[:2] == batch["input_ids"].shape


def test_follow_up_reuses_the_cached_vision_prefix(hosts):
    model, _, processor = attached(hosts)
    calls = []
    handle = model.model.vision_tower.register_forward_hook(lambda *args: calls.append(1))
    cache = FusionCache()
    image = images(1)
    turn1 = processor(images=image, conversations=[CONVERSATION[:1]])
    first = model.generate(**turn1, max_new_tokens=3, do_sample=False, qfusion_cache=cache)
    turn2 = processor(images=image, conversations=[CONVERSATION[:3]])
    second = model.generate(**turn2, max_new_tokens=3, do_sample=False, qfusion_cache=cache)
    without_images = {k: v for k, v in turn2.items() if k != "pixel_values"}
    third = model.generate(**without_images, max_new_tokens=3, do_sample=False, qfusion_cache=cache)
    assert len(calls) == 1 and (cache.misses, cache.hits) == (1, 2)
    handle.remove()
    assert torch.equal(first, model.generate(**turn1, max_new_tokens=3, do_sample=False))
    uncached = model.generate(**turn2, max_new_tokens=3, do_sample=False)
    assert torch.equal(second, uncached) and torch.equal(third, uncached)
    with torch.no_grad():
        torch.testing.assert_close(model(**turn2, qfusion_cache=cache).logits, model(**turn2).logits,
                                   rtol=1e-5, atol=1e-5)
    other = processor(images=images(1, seed=9), conversations=[CONVERSATION[:3]])
    model.generate(**other, max_new_tokens=1, do_sample=False, qfusion_cache=cache)
    assert cache.misses == 2


def test_device_map_auto_host(hosts):
    model = hosts.model("llava", device_map="auto")
    torch.manual_seed(0)
    qfusion.attach(model, fusion_config())
    processor = QFusionProcessor(hosts.processor("llava"), model)
    out = model.generate(**processor(images=images(1), questions="what is this ?"), max_new_tokens=2, do_sample=False)
    assert out.shape[1] > 0


def test_hd_front_end_option(hosts, tmp_path):
    model, adapter, processor = attached(hosts, hd=(2, 2))
    assert adapter.hd is model.qfusion_hd and adapter.hd.grid == (2, 2)
    batch = processor(images=images(2), questions=["what is this ?", ["how many", "red"]], padding_side="left")
    assert batch["pixel_values"].shape == (2, 5, 3, 56, 56)
    out = model(**batch, labels=batch["input_ids"])
    out.loss.backward()
    assert model.qfusion_hd.newline.grad is not None and model.qfusion_hd.local_merge.conv.weight.grad is not None
    with torch.no_grad():
        logits = model(**batch).logits
    plugin = adapter.save_pretrained(tmp_path / "plugin")
    assert "hd_front_end.safetensors" in os.listdir(plugin)
    assert "qfusion_hd" in qfusion.lora_config(model).modules_to_save
    fresh = hosts.model("llava")
    qfusion.attach(fresh, plugin)
    with torch.no_grad():
        assert torch.equal(fresh(**batch).logits, logits)
    with pytest.raises(ValueError, match="HD views"):
        model(**QFusionProcessor(hosts.processor("llava"), m=4, n=2)(images=images(1), questions="red"))
    with pytest.raises(ValueError, match="plain LLaVA"):
        qfusion.attach(hosts.model("llava_next"), fusion_config(), hd=(2, 2))


def test_bad_inputs_raise_clearly(hosts):
    model, adapter, processor = attached(hosts)
    batch = dict(processor(images=images(2), questions=[["what is this ?", "red"], "how many"], padding_side="left"))

    def call(**changes):
        model(**{**batch, **changes})

    with pytest.raises(ValueError, match="qfusion_input_ids: required"):
        call(qfusion_input_ids=None, qfusion_attention_mask=None)
    with pytest.raises(ValueError, match=r"pixel_values_videos: this 'llava' host takes no video \(it takes \['image'\]\)"):
        call(pixel_values_videos=torch.zeros(1, 2, 3, 56, 56))
    with pytest.raises(ValueError, match=r"sample 0 has image placeholder runs \[4, 2\] \(total 6\), expected \[4\]"):
        call(qfusion_input_ids=batch["qfusion_input_ids"].flip(0),
             qfusion_attention_mask=batch["qfusion_attention_mask"].flip(0))
    with pytest.raises(ValueError, match=r"expected a \(batch, max_questions, max_question_length\)"):
        call(qfusion_input_ids=batch["qfusion_input_ids"][:, 0])
    with pytest.raises(ValueError, match="one row per sample"):
        call(qfusion_input_ids=batch["qfusion_input_ids"][:1],
             qfusion_attention_mask=batch["qfusion_attention_mask"][:1])
    gap = batch["qfusion_attention_mask"].clone()
    gap[0, 0] = 0
    with pytest.raises(ValueError, match="empty question slot before a filled one"):
        call(qfusion_attention_mask=gap)
    with pytest.raises(ValueError, match=r"pixel_values: expected 2 \(one per placeholder block.*got 1"):
        call(pixel_values=batch["pixel_values"][:1])
    with pytest.raises(ValueError, match="inputs_embeds"):
        call(input_ids=None, inputs_embeds=torch.zeros(2, 3, 64))
    with pytest.raises(ValueError, match="mm_encoder_outputs"):
        call(mm_encoder_outputs={"image": None})
    with pytest.raises(ValueError, match="pixel_values: required"):
        call(pixel_values=None)
    with pytest.raises(TypeError, match="qfusion_cache"):
        call(qfusion_cache={})
    with pytest.raises(ValueError, match="already has a qfusion plugin attached"):
        qfusion.attach(model, fusion_config())
    with pytest.raises(ValueError, match="mode"):
        qfusion.attach(hosts.model("llava"), fusion_config(), mode="augment")


def test_plugins_that_do_not_fit_the_host_fail_naming_the_mismatch(hosts, tmp_path):
    QuestionFusion(fusion_config(vision_dim=48, output_dim=64)).save_pretrained(tmp_path / "wrong")
    with pytest.raises(FileNotFoundError, match="lacks qfusion_adapter.json"):  # a bare fusion is not a plugin
        qfusion.attach(hosts.model("llava"), tmp_path / "wrong")
    with pytest.raises(ValueError, match="vision_dim=48, this host needs vision_dim=64"):
        qfusion.attach(hosts.model("llava"), QuestionFusion.from_pretrained(tmp_path / "wrong"))
    with pytest.raises(ValueError, match="output_dim=32, this host needs output_dim=64"):
        qfusion.attach(hosts.model("llava"), QuestionFusion(fusion_config(vision_dim=64, output_dim=32)))
    with pytest.raises(ValueError, match="output_dim=100, this host needs output_dim=64"):
        qfusion.attach(hosts.model("llava"), fusion_config(output_dim=100))
    with pytest.raises(ValueError, match="vision_dim=1024, this host needs vision_dim=64"):  # never rewritten
        qfusion.attach(hosts.model("llava"), fusion_config(vision_dim=1024))
    _, adapter, _ = attached(hosts, vision_source="tower")
    adapter.save_pretrained(tmp_path / "tower")
    with pytest.raises(ValueError, match="trained with vision_source='tower'"):
        qfusion.attach(hosts.model("llava"), tmp_path / "tower", vision_source="projector")
    with pytest.raises(ValueError, match="saved for a 'llava' host"):
        qfusion.attach(hosts.model("blip-2"), tmp_path / "tower")
    with pytest.raises(FileNotFoundError, match="not a directory"):
        qfusion.attach(hosts.model("llava"), tmp_path / "missing")


MULTI_IMAGE = [
    {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "what is this ?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "a cat ."}]},
    {"role": "user", "content": [{"type": "text", "text": "how many are there ?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "two ."}]},
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color is it ?"}]},
]
