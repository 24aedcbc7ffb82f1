"""qfusion.adapters.idefics on tiny random Idefics3 and SmolVLM checkpoints: what is specific to the
family (sub-images; the contract every host keeps is in test_host_contract.py)."""

import pytest
import torch
from conftest_hosts import HOST_CASES, IMAGE_TOKEN_ID, fusion_config, images

import qfusion
from qfusion import QFusionProcessor
from qfusion.inputs import placeholder_runs


@pytest.mark.parametrize("kind", [pytest.param(case.kind, marks=pytest.mark.skipif(
    not case.available, reason=f"needs transformers>={case.min_transformers}"))
    for case in HOST_CASES if case.kind in ("idefics3", "smolvlm")])
def test_an_images_vision_tokens_are_those_of_all_its_sub_images(hosts, kind):
    model = hosts.model(kind)
    torch.manual_seed(0)
    adapter = qfusion.attach(model, fusion_config())
    processor = QFusionProcessor(hosts.processor(kind), model)
    large, wide = images(1, size=(100, 110), seed=1)[0], images(1, size=(30, 110), seed=2)[0]
    batch = processor(images=[[large, wide]], conversations=[[{"role": "user", "content": [
        {"type": "image"}, {"type": "image"}, {"type": "text", "text": "what is this ?"}]}]])
    assert batch["pixel_values"].shape[:2] == (2, 5)  # one entry per image (the large: 2 x 2 crops + the whole)
    with torch.no_grad():
        features = adapter.encode(batch)
        alone = [torch.cat(list(model.model.get_image_features(  # per sub-image or per entry, by release
            pixel_values=batch["pixel_values"][i:i + 1], pixel_attention_mask=batch["pixel_attention_mask"][i:i + 1],
            return_dict=True).pooler_output)).flatten(0, -2) for i in range(2)]
    assert [f.shape[0] for f in features] == [5 * 4, 3 * 4]  # the wide one: 1 x 2 crops + the whole
    for mine, host in zip(features, alone):
        torch.testing.assert_close(mine, host, rtol=0, atol=0)
    ids = batch["input_ids"][0]
    assert placeholder_runs(ids, IMAGE_TOKEN_ID) == [4, 4]  # one run of m fused tokens per image
    fake = processor.tokens.start
    assert processor.tokens.end == fake and int((ids == fake).sum()) == 4
