"""qfusion.adapters.qwen_vl on tiny random Qwen2.5-VL and Qwen3-VL checkpoints (saved and loaded back;
Qwen2-VL runs the cross-family tests of test_adapters_common.py)."""


import pytest
import torch
from conftest_hosts import IMAGE_TOKEN_ID, QWEN_VIDEO_TOKEN_ID, fusion_config, greedy, images, videos

import qfusion
from qfusion import QFusionProcessor
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
