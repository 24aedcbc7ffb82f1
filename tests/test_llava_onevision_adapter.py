"""qfusion.adapters.llava on a tiny random LLaVA-OneVision checkpoint: images, several images, video, mixed."""


import pytest
import torch
from conftest_hosts import IMAGE_TOKEN_ID, VIDEO_TOKEN_ID, capture_llm_inputs, fusion_config, greedy, images, videos

import qfusion
from qfusion import Budget, QFusionProcessor
from qfusion.inputs import decode_questions, visual_blocks, visual_kinds

KIND = "llava_onevision"
SPECIAL = [IMAGE_TOKEN_ID, VIDEO_TOKEN_ID]  # a trained host never writes placeholders; a random one may

CONVERSATION = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is this ?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "a cat ."}]},
    {"role": "user", "content": [{"type": "text", "text": "what color is it ?"}]},
]
VIDEO_CONVERSATION = [
    {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "what is this ?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "a dog ."}]},
    {"role": "user", "content": [{"type": "text", "text": "how many are there ?"}]},
]
MIXED = [
    {"role": "user", "content": [{"type": "image"}, {"type": "video"}, {"type": "text", "text": "what is this ?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "a cat ."}]},
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color is it ?"}]},
]


def attached(hosts, seed=0, **options):
    model = hosts.model(KIND)
    torch.manual_seed(seed)
    adapter = qfusion.attach(model, fusion_config(), **options)
    return model, adapter, QFusionProcessor(hosts.processor(KIND), model)


def spliced(model, batch):
    records, handle = capture_llm_inputs(model.model.language_model)
    with torch.no_grad():
        model(**batch)
    handle.remove()
    return records[-1]


def test_images_are_fused_from_the_hosts_packed_projector_features(hosts):
    model, adapter, processor = attached(hosts)
    m, n = adapter.budget
    batch = processor(images=images(2), questions=[["what is this ?", "red"], ["what color is it ?"]])
    embeds = spliced(model, batch)
    text = model.get_input_embeddings()(batch["input_ids"])
    changed = (embeds != text).any(-1)
    assert changed.sum(-1).tolist() == [m + n, m] and torch.equal(changed, batch["input_ids"] == IMAGE_TOKEN_ID)
    with torch.no_grad():
        features = model.model.get_image_features(batch["pixel_values"], batch["image_sizes"],
                                                  batch_num_images=batch["batch_num_images"],
                                                  return_dict=True).pooler_output
        questions = decode_questions(batch["qfusion_input_ids"], batch["qfusion_attention_mask"], 2)
        tokens = adapter.fusion(list(features), questions).tokens
    for b in range(2):
        torch.testing.assert_close(embeds[b][changed[b]], torch.cat(tokens[b]), rtol=0, atol=0)


def test_video_frames_after_projector_and_pooling_are_the_vision_tokens(hosts):
    model, adapter, processor = attached(hosts)
    m, n = adapter.budget
    clip = videos(1, frames=6, size=(40, 52))
    batch = processor(videos=[clip], conversations=[VIDEO_CONVERSATION])
    assert batch["pixel_values_videos"].shape == (1, 6, 3, 28, 28) and "pixel_values" not in batch
    embeds = spliced(model, batch)[0]
    placeholders = batch["input_ids"][0] == VIDEO_TOKEN_ID
    assert int(placeholders.sum()) == m + n
    with torch.no_grad():
        features = model.model.get_video_features(batch["pixel_values_videos"], return_dict=True).pooler_output
        questions = decode_questions(batch["qfusion_input_ids"], batch["qfusion_attention_mask"], 1)
        tokens = adapter.fusion(list(features), questions).tokens[0]
    assert features.shape[1] == 6 * 1 + 1  # every frame pooled 2x2 -> 1x1, plus the newline
    torch.testing.assert_close(embeds[placeholders], torch.cat(tokens), rtol=0, atol=0)
    generated = model.generate(**batch, max_new_tokens=4, do_sample=False, suppress_tokens=SPECIAL)
    assert torch.equal(generated, greedy(model, batch, 4, SPECIAL)[:, : generated.shape[1]])


def test_mixed_images_and_video_each_fused_with_the_questions_about_it(hosts):
    model, adapter, processor = attached(hosts)
    m, n = adapter.budget
    pictures, clip = images(2, seed=3), videos(1, frames=4, seed=4)[0]
    batch = processor(images=[pictures], videos=[[clip]], conversations=[MIXED])
    assert batch["qfusion_image_counts"].tolist() == [[2, 1]] and batch["batch_num_images"].tolist() == [2]
    ids = batch["input_ids"][0]
    blocks = visual_blocks(ids, (IMAGE_TOKEN_ID, VIDEO_TOKEN_ID), 2, Budget(m, n), 0, [2, 1])
    assert blocks == [(0, IMAGE_TOKEN_ID, m), (1, VIDEO_TOKEN_ID, m), (2, IMAGE_TOKEN_ID, m)]
    assert visual_kinds(blocks) == [IMAGE_TOKEN_ID, VIDEO_TOKEN_ID, IMAGE_TOKEN_ID]
    embeds = spliced(model, batch)[0]
    with torch.no_grad():
        image_features = model.model.get_image_features(batch["pixel_values"], batch["image_sizes"],
                                                        batch_num_images=batch["batch_num_images"],
                                                        return_dict=True).pooler_output
        video_features = model.model.get_video_features(batch["pixel_values_videos"], return_dict=True).pooler_output
        q = decode_questions(batch["qfusion_input_ids"], batch["qfusion_attention_mask"], 1)[0]
        # the rule: the image and the video of turn 1 are about question 1, the image of turn 2 about question 2
        per_visual = adapter.fusion([image_features[0], video_features[0], image_features[1]],
                                    [[q[0]], [q[0]], [q[1]]]).tokens
    torch.testing.assert_close(embeds[ids == IMAGE_TOKEN_ID], torch.cat([per_visual[0][0], per_visual[2][0]]),
                               rtol=0, atol=0)
    torch.testing.assert_close(embeds[ids == VIDEO_TOKEN_ID], per_visual[1][0], rtol=0, atol=0)

    # batched with an image conversation: each sample as alone
    other = images(1, seed=9)[0]
    together = processor(images=[pictures, [other]], videos=[[clip], None], conversations=[MIXED, CONVERSATION])
    out = model.generate(**together, max_new_tokens=4, do_sample=False)[:, together["input_ids"].shape[1]:]
    for b, (imgs, vids, conversation) in enumerate([(pictures, [[clip]], MIXED), ([other], None, CONVERSATION)]):
        alone = processor(images=[imgs], videos=vids, conversations=[conversation])
        generated = model.generate(**alone, max_new_tokens=4, do_sample=False)[0, alone["input_ids"].shape[1]:]
        assert torch.equal(out[b, : generated.numel()], generated)


def test_bf16_host_and_refused_tower_source(hosts):
    model = hosts.model(KIND, dtype=torch.bfloat16)
    torch.manual_seed(0)
    qfusion.attach(model, fusion_config())
    batch = QFusionProcessor(hosts.processor(KIND), model)(videos=[videos(1)[0]], conversations=[VIDEO_CONVERSATION])
    assert spliced(model, batch).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="vision_source: 'tower' is not offered for llava_onevision"):
        qfusion.attach(hosts.model(KIND), fusion_config(), vision_source="tower")
    qfusion.detach(model)
    model, _, processor = attached(hosts)
    batch = processor(videos=[videos(1)[0]], conversations=[VIDEO_CONVERSATION])
    with pytest.raises(ValueError, match=r"pixel_values: expected 0 \(one per placeholder block"):
        model(**dict(batch, pixel_values_videos=None, pixel_values=torch.zeros(1, 5, 3, 28, 28),
                     image_sizes=torch.tensor([[28, 28]])))


def test_a_placeholder_block_mixing_image_and_video_ids_is_refused(hosts):
    model, adapter, processor = attached(hosts)
    batch = dict(processor(images=[[images(1)[0]]], videos=[[videos(1)[0]]], conversations=[MIXED[:1]]))
    ids = batch["input_ids"].clone()
    ids[0, (ids[0] == VIDEO_TOKEN_ID).nonzero()[0]] = IMAGE_TOKEN_ID  # the video's first placeholder turned image
    with pytest.raises(ValueError, match="placeholders of visual input 1 mix the ids"):
        model(**dict(batch, input_ids=ids))
