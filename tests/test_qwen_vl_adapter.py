"""qfusion.adapters.qwen_vl on tiny random Qwen2.5-VL and Qwen3-VL checkpoints (saved and loaded back;
Qwen2-VL runs the cross-family tests of test_adapters_common.py)."""

import os

import pytest
import torch
from conftest_hosts import (IMAGE_TOKEN_ID, QWEN_VIDEO_TOKEN_ID, fusion_config, greedy, hosts, images,  # noqa: F401
                            videos)
from safetensors.torch import load_file

import qfusion
from qfusion import QFusionProcessor
from qfusion.adapters import FusionCache, get_adapter
from qfusion.inputs import decode_questions

KINDS = ["qwen2_5_vl", "qwen3_vl"]
PLACEHOLDERS = (IMAGE_TOKEN_ID, QWEN_VIDEO_TOKEN_ID)
SPECIAL = [IMAGE_TOKEN_ID, QWEN_VIDEO_TOKEN_ID, 6, 7]  # a trained host never writes vision tokens; random ones may

CONVERSATION = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is this ?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "a cat ."}]},
    {"role": "user", "content": [{"type": "text", "text": "what color is it ?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
]
VIDEO_CONVERSATION = [
    {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "what is this ?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "a dog ."}]},
    {"role": "user", "content": [{"type": "text", "text": "how many are there ?"}]},
]
MIXED = [
    {"role": "user", "content": [{"type": "image"}, {"type": "video"}, {"type": "text", "text": "what is this ?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "a cat ."}]},
    {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "what color is it ?"}]},
]


def attached(hosts, kind, seed=0, **options):
    model = hosts.model(kind)
    torch.manual_seed(seed)
    adapter = qfusion.attach(model, fusion_config(), **options)
    return model, adapter, QFusionProcessor(hosts.processor(kind), model)


def llm_calls(model):
    """Record the keyword arguments of every call of the LLM; returns (records, handle)."""
    records = []

    def hook(module, args, kwargs):
        records.append({k: v for k, v in kwargs.items() if k in ("inputs_embeds", "position_ids",
                                                                  "deepstack_visual_embeds", "visual_pos_masks")})

    return records, model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)


def visual_mask(inputs):
    return torch.isin(inputs["input_ids"], torch.tensor(PLACEHOLDERS))


@pytest.mark.parametrize("kind", KINDS)
def test_forward_loss_backward_trains_only_the_plugin(hosts, kind):
    model, _, processor = attached(hosts, kind)
    batch = processor(images=images(1), conversations=[CONVERSATION], return_labels=True)
    out = model(**batch)
    assert out.loss is not None and torch.isfinite(out.loss)
    out.loss.backward()
    with_grad = {name for name, p in model.named_parameters() if p.grad is not None}
    assert with_grad and all(name.startswith("qfusion.") for name in with_grad)
    assert model.qfusion.codebook.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", KINDS)
def test_llm_receives_the_fused_tokens_of_the_merged_features_at_the_placeholders(hosts, kind):
    model, adapter, processor = attached(hosts, kind)
    m, n = adapter.budget
    batch = processor(images=images(2), questions=[["what is this ?", "how many", "red"], ["what color is it ?"]])
    records, handle = llm_calls(model)
    with torch.no_grad():
        model(**batch)
    handle.remove()
    embeds = records[-1]["inputs_embeds"]
    text = model.get_input_embeddings()(batch["input_ids"])
    changed = (embeds != text).any(-1)
    assert changed.sum(-1).tolist() == [m + 2 * n, m]
    assert torch.equal(changed, visual_mask(batch))
    with torch.no_grad():  # the host's own features after the patch merger, fused with each question
        features = model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"],
                                                  return_dict=True).pooler_output
        questions = decode_questions(batch["qfusion_input_ids"], batch["qfusion_attention_mask"], 2)
        tokens = adapter.fusion(list(features), questions).tokens
    assert [f.shape[0] for f in features] == (batch["image_grid_thw"].prod(-1) // 4).tolist()
    for b in range(2):
        torch.testing.assert_close(embeds[b][changed[b]], torch.cat(tokens[b]), rtol=0, atol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_mrope_positions_follow_the_virtual_grid_rule(hosts, kind):
    """A run of k fused tokens starting at position p: temporal and height p, width p..p+k-1; text
    after it continues at p+k (so the width axis counts every real token, padding excluded)."""
    model, adapter, processor = attached(hosts, kind)
    batch = processor(images=[images(1)[0], images(1, seed=3)[0]],
                      conversations=[CONVERSATION[:3], CONVERSATION[:1]])
    records, handle = llm_calls(model)
    with torch.no_grad():
        model(**batch)
    handle.remove()
    positions = records[-1]["position_ids"][-3:]  # (3, B, L): temporal, height, width
    for b in range(2):
        real = batch["attention_mask"][b].bool()
        t, h, w = (axis[b][real] for axis in positions)
        index = torch.arange(int(real.sum()))
        assert torch.equal(w, index)
        visual = visual_mask(batch)[b][real]
        assert torch.equal(t[~visual], index[~visual]) and torch.equal(h, t)
        starts = visual & ~torch.cat([torch.tensor([False]), visual[:-1]])
        run_start = index.masked_fill(~starts, 0).cummax(0).values
        assert torch.equal(t[visual], run_start[visual])
        assert int(starts.sum()) == 2 - b  # one run per question


@pytest.mark.parametrize("kind", KINDS)
def test_generate_equals_hand_written_greedy_loop(hosts, kind):
    model, _, processor = attached(hosts, kind)
    for conversation in (CONVERSATION[:1], CONVERSATION[:3]):
        inputs = processor(images=images(1), conversations=[conversation])
        generated = model.generate(**inputs, max_new_tokens=5, do_sample=False, suppress_tokens=SPECIAL)
        assert torch.equal(generated, greedy(model, inputs, 5, SPECIAL)[:, : generated.shape[1]])


@pytest.mark.parametrize("kind", KINDS)
def test_follow_ups_with_the_fusion_cache_equal_recomputing(hosts, kind):
    model, _, processor = attached(hosts, kind)
    cache = FusionCache()
    picture = images(1)
    turn1 = processor(images=picture, conversations=[CONVERSATION[:1]])
    turn2 = processor(images=picture, conversations=[CONVERSATION[:3]])
    first = model.generate(**turn1, max_new_tokens=3, do_sample=False, qfusion_cache=cache)
    second = model.generate(**turn2, max_new_tokens=3, do_sample=False, qfusion_cache=cache)
    no_pixels = {k: v for k, v in turn2.items() if k not in ("pixel_values", "image_grid_thw")}
    third = model.generate(**no_pixels, max_new_tokens=3, do_sample=False, qfusion_cache=cache)
    assert (cache.misses, cache.hits) == (1, 2)
    assert torch.equal(first, model.generate(**turn1, max_new_tokens=3, do_sample=False))
    uncached = model.generate(**turn2, max_new_tokens=3, do_sample=False)
    assert torch.equal(second, uncached) and torch.equal(third, uncached)


@pytest.mark.parametrize("kind", KINDS)
def test_video_frames_are_the_vision_tokens_and_fused_tokens_replace_the_video_placeholders(hosts, kind):
    model, adapter, processor = attached(hosts, kind)
    m, n = adapter.budget
    clip = videos(1, frames=4)
    batch = processor(videos=[clip], conversations=[VIDEO_CONVERSATION])
    assert "pixel_values" not in batch and batch["video_grid_thw"].tolist() == [[2, 4, 4]]
    assert int((batch["input_ids"] == QWEN_VIDEO_TOKEN_ID).sum()) == m + n
    records, handle = llm_calls(model)
    with torch.no_grad():
        model(**batch)
    handle.remove()
    embeds = records[-1]["inputs_embeds"][0]
    with torch.no_grad():
        features = model.model.get_video_features(batch["pixel_values_videos"], batch["video_grid_thw"],
                                                  return_dict=True).pooler_output
        questions = decode_questions(batch["qfusion_input_ids"], batch["qfusion_attention_mask"], 1)
        tokens = adapter.fusion(list(features), questions).tokens[0]
    assert features[0].shape[0] == 2 * 4 * 4 // 4  # every frame's merged tokens
    torch.testing.assert_close(embeds[batch["input_ids"][0] == QWEN_VIDEO_TOKEN_ID], torch.cat(tokens), rtol=0, atol=0)
    generated = model.generate(**batch, max_new_tokens=4, do_sample=False, suppress_tokens=SPECIAL)
    assert torch.equal(generated, greedy(model, batch, 4, SPECIAL)[:, : generated.shape[1]])


@pytest.mark.parametrize("kind", KINDS)
def test_mixed_image_and_video_prompts_batched_equal_each_alone(hosts, kind):
    model, adapter, processor = attached(hosts, kind)
    m, n = adapter.budget
    picture, clips = images(1, seed=4)[0], videos(2, frames=2, seed=5)
    batch = processor(images=[[picture], None], videos=[clips, clips[:1]],
                      conversations=[MIXED, VIDEO_CONVERSATION[:1]])
    assert batch["qfusion_image_counts"].tolist() == [[2, 1], [1, 0]]
    ids = batch["input_ids"]
    assert int((ids[0] == IMAGE_TOKEN_ID).sum()) == m and int((ids[0] == QWEN_VIDEO_TOKEN_ID).sum()) == 2 * m
    together = model.generate(**batch, max_new_tokens=4, do_sample=False)[:, ids.shape[1]:]
    with torch.no_grad():
        logits = model(**batch).logits[:, -1]
    for b, (pictures, clip, conversation) in enumerate([([picture], clips, MIXED), (None, clips[:1],
                                                                                  VIDEO_CONVERSATION[:1])]):
        alone = processor(images=None if pictures is None else [pictures], videos=[clip], conversations=[conversation])
        generated = model.generate(**alone, max_new_tokens=4, do_sample=False)[0, alone["input_ids"].shape[1]:]
        assert torch.equal(together[b, : generated.numel()], generated)
        with torch.no_grad():
            torch.testing.assert_close(model(**alone).logits[0, -1], logits[b], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match=r"pixel_values_videos: expected 3 \(one per placeholder block.* got 1"):
        model(**dict(batch, pixel_values_videos=batch["pixel_values_videos"][:16],
                     video_grid_thw=batch["video_grid_thw"][:1]))


def test_qwen3_deepstack_features_are_off_for_fused_tokens(hosts):
    model = hosts.model("qwen3_vl")
    host_processor = hosts.processor("qwen3_vl")
    picture = images(1)
    plain = QFusionProcessor(host_processor, model.config, m=6, n=1)  # the image's 6 merged tokens
    records, handle = llm_calls(model)
    with torch.no_grad():
        host_inputs = {k: v for k, v in plain(images=picture, questions="what is this ?").items()
                       if not k.startswith("qfusion_")}
        assert int((host_inputs["input_ids"] == IMAGE_TOKEN_ID).sum()) == int(host_inputs["image_grid_thw"].prod() // 4)
        model(**host_inputs)
    deepstack = records[-1]["deepstack_visual_embeds"]
    assert len(deepstack) == 2 and all(d.shape[0] == 6 for d in deepstack)  # the host alone adds them

    torch.manual_seed(0)
    qfusion.attach(model, fusion_config(m=1, n=1))  # one fused row: a wrong row count would broadcast
    outputs = []
    hook = model.model.language_model.register_forward_hook(lambda mod, a, out: outputs.append(out.last_hidden_state))
    batch = QFusionProcessor(host_processor, model)(images=picture, questions=[["what is this ?", "red"]])
    with torch.no_grad():
        model(**batch)
    handle.remove()
    hook.remove()
    assert records[-1]["deepstack_visual_embeds"] == []
    with torch.no_grad():  # the LLM's output is what it computes from the fused embeddings alone
        alone = model.model.language_model(inputs_embeds=records[-1]["inputs_embeds"],
                                           position_ids=records[-1]["position_ids"]).last_hidden_state
    torch.testing.assert_close(outputs[-1], alone, rtol=0, atol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_detach_restores_the_host_exactly(hosts, kind):
    model = hosts.model(kind)
    plain = QFusionProcessor(hosts.processor(kind), model.config, m=6, n=1)  # the image's 6 merged tokens
    host_inputs = {k: v for k, v in plain(images=images(1), questions="what is this ?").items()
                   if not k.startswith("qfusion_")}
    with torch.no_grad():
        before = model(**host_inputs).logits
    attributes = dict(model.__dict__)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    adapter = qfusion.attach(model, fusion_config())
    inputs = QFusionProcessor(hosts.processor(kind), model)(images=images(1), questions="what is this ?")
    model(**inputs).logits.sum().backward()
    plugin = adapter.fusion
    assert qfusion.detach(model) is plugin
    with torch.no_grad():
        assert torch.equal(model(**host_inputs).logits, before)
    assert model.__dict__.keys() == attributes.keys()
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert type(model).forward is model.forward.__func__


@pytest.mark.parametrize("kind", KINDS)
def test_save_then_attach_round_trip_is_bit_exact(hosts, kind, tmp_path):
    model, adapter, processor = attached(hosts, kind)
    batch = processor(images=images(1), conversations=[CONVERSATION], return_labels=True)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(**batch).loss.backward()
    optimizer.step()
    with torch.no_grad():
        trained = model(**batch).logits
    plugin = adapter.save_pretrained(tmp_path / "plugin")
    processor.save_pretrained(plugin)
    assert {"config.json", "model.safetensors", "qfusion_adapter.json"} <= set(os.listdir(plugin))
    model.save_pretrained(tmp_path / "host")
    assert not [k for k in load_file(tmp_path / "host" / "model.safetensors") if "qfusion" in k]
    fresh = type(model).from_pretrained(tmp_path / "host").eval()
    restored = qfusion.attach(fresh, plugin)
    assert restored.settings == adapter.settings
    again = QFusionProcessor.from_pretrained(plugin, hosts.processor(kind), fresh)(
        images=images(1), conversations=[CONVERSATION], return_labels=True)
    with torch.no_grad():
        assert torch.equal(fresh(**again).logits, trained)


@pytest.mark.parametrize("kind", KINDS)
def test_lora_trains_only_lora_and_the_plugin_copy(hosts, kind):
    from peft import get_peft_model

    model, _, processor = attached(hosts, kind)
    peft_model = get_peft_model(model, qfusion.lora_config(model, r=4))
    trainable = {name for name, p in peft_model.named_parameters() if p.requires_grad}
    for name in trainable:
        assert ("lora_" in name and ".language_model." in name) or ".qfusion.modules_to_save." in name, name
    assert any("lora_" in name for name in trainable) and any("qfusion" in name for name in trainable)
    assert get_adapter(peft_model).fusion is model.qfusion.modules_to_save["default"]
    batch = processor(images=images(1), conversations=[CONVERSATION], return_labels=True)
    frozen = {name: p.clone() for name, p in peft_model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        optimizer.zero_grad()
        peft_model(**batch).loss.backward()
        optimizer.step()
    assert all(torch.equal(p, frozen[name]) for name, p in peft_model.named_parameters() if name in frozen)
    with torch.no_grad():
        enabled = peft_model(**batch).logits
        with peft_model.disable_adapter():
            disabled = peft_model(**batch).logits
    assert not torch.allclose(enabled, disabled)


def test_bf16_host_gets_fused_tokens_in_its_dtype(hosts):
    model = hosts.model("qwen2_5_vl", dtype=torch.bfloat16)
    torch.manual_seed(0)
    adapter = qfusion.attach(model, fusion_config())
    assert adapter.fusion.dtype == torch.bfloat16
    batch = QFusionProcessor(hosts.processor("qwen2_5_vl"), model)(images=images(1), questions="what is this ?")
    records, handle = llm_calls(model)
    generated = model.generate(**batch, max_new_tokens=2, do_sample=False)
    handle.remove()
    assert records[0]["inputs_embeds"].dtype == torch.bfloat16 and generated.shape[1] == batch["input_ids"].shape[1] + 2


def test_bad_inputs_raise_clearly(hosts):
    model, adapter, processor = attached(hosts, "qwen2_5_vl")
    batch = dict(processor(images=images(1), questions=[["what is this ?", "red"]]))
    with pytest.raises(ValueError, match="qfusion_input_ids: required"):
        model(**dict(batch, qfusion_input_ids=None, qfusion_attention_mask=None))
    with pytest.raises(ValueError, match="image_grid_thw: required with pixel_values"):
        model(**dict(batch, image_grid_thw=None))
    with pytest.raises(ValueError, match=r"pixel_values: expected 1 \(one per placeholder block.* got 2"):
        model(**dict(batch, pixel_values=torch.cat([batch["pixel_values"]] * 2),
                     image_grid_thw=torch.cat([batch["image_grid_thw"]] * 2)))
    merged = batch["input_ids"].clone()
    merged[merged == 7] = IMAGE_TOKEN_ID  # a <|vision_end|> turned into a placeholder: runs no longer fit
    with pytest.raises(ValueError, match="placeholder runs"):
        model(**dict(batch, input_ids=merged))
    with pytest.raises(ValueError, match="this host takes no video"):
        QFusionProcessor(hosts.processor("llava"), m=4, n=2)(videos=[videos(1)[0]],
                                                             conversations=[VIDEO_CONVERSATION])


def test_processor_writes_one_marked_run_per_visual_input_and_question(hosts):
    model, adapter, processor = attached(hosts, "qwen2_5_vl")
    m = adapter.budget[0]
    batch = processor(images=[[images(1)[0]]], videos=[videos(2, frames=2)], conversations=[MIXED])
    text = processor.tokenizer.decode(batch["input_ids"][0])
    image, video = "<|image_pad|>", "<|video_pad|>"
    first = f"<|vision_start|>{image * m}<|vision_end|><|vision_start|>{video * m}<|vision_end|>"
    later = f"<|vision_start|>{video * m}<|vision_end|>"  # the rule: turn 2 is about the video it brings
    assert text.replace(" ", "").count((first + "whatisthis?").replace(" ", "")) == 1
    assert text.replace(" ", "").count((later + "whatcolorisit?").replace(" ", "")) == 1
    assert torch.equal(batch["mm_token_type_ids"], (batch["input_ids"] == IMAGE_TOKEN_ID).int()
                       + 2 * (batch["input_ids"] == QWEN_VIDEO_TOKEN_ID).int())
    assert batch["video_grid_thw"].shape == (2, 3) and batch["image_grid_thw"].shape == (1, 3)


@pytest.mark.parametrize("kind", KINDS)
def test_video_follow_ups_with_the_fusion_cache_equal_recomputing(hosts, kind):
    model, _, processor = attached(hosts, kind)
    calls = []
    handle = model.model.visual.register_forward_hook(lambda *args: calls.append(1))
    clip = [videos(1, frames=4, seed=7)[0]]
    cache = FusionCache()
    turn1 = processor(videos=[clip], conversations=[VIDEO_CONVERSATION[:1]])
    turn2 = processor(videos=[clip], conversations=[VIDEO_CONVERSATION])
    first = model.generate(**turn1, max_new_tokens=3, do_sample=False, qfusion_cache=cache)
    second = model.generate(**turn2, max_new_tokens=3, do_sample=False, qfusion_cache=cache)
    handle.remove()
    assert len(calls) == 1 and (cache.misses, cache.hits) == (1, 1)  # the follow-up runs no vision tower
    assert torch.equal(first, model.generate(**turn1, max_new_tokens=3, do_sample=False))
    assert torch.equal(second, model.generate(**turn2, max_new_tokens=3, do_sample=False))


@pytest.mark.parametrize("kind", KINDS)
def test_tower_source_reads_the_states_the_patch_merger_joins(hosts, kind):
    model, adapter, processor = attached(hosts, kind, vision_source="tower")
    assert adapter.fusion.config.vision_dim == model.config.vision_config.hidden_size
    batch = processor(images=images(2), questions=["what is this ?", "red"])
    with torch.no_grad():
        tower = adapter.encode(batch)
        merged = model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"],
                                                return_dict=True).pooler_output
        assert [t.shape[0] for t in tower] == batch["image_grid_thw"].prod(-1).tolist()
        for mine, host in zip(tower, merged):  # in the host's patch order: its own merger gives its features
            torch.testing.assert_close(model.model.visual.merger(mine), host, rtol=1e-5, atol=1e-6)
        assert model(**batch).logits.shape[:2] == batch["input_ids"].shape
