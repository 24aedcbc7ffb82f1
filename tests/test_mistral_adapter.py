"""qfusion.adapters.mistral on a tiny random Mistral 3 checkpoint: what is specific to the family (images
of any size; the contract every host keeps is in test_host_contract.py)."""

import torch
from conftest_hosts import IMAGE_TOKEN_ID, fusion_config, images

import qfusion
from qfusion import QFusionProcessor
from qfusion.inputs import placeholder_runs


def test_images_of_different_sizes_each_give_their_own_vision_tokens_and_m_fused_tokens(hosts):
    model = hosts.model("mistral3")
    torch.manual_seed(0)
    adapter = qfusion.attach(model, fusion_config())
    processor = QFusionProcessor(hosts.processor("mistral3"), model)
    batch = processor(images=[images(1, size=(56, 56))[0], images(1, size=(28, 56), seed=1)[0]],
                      questions=["what is this ?", "red"])
    with torch.no_grad():
        features = adapter.encode(batch)
        host = model.model.get_image_features(pixel_values=batch["pixel_values"], image_sizes=batch["image_sizes"],
                                              return_dict=True).pooler_output
    assert [f.shape[0] for f in features] == [4, 2]  # (56 / 28)² and (28 / 28)·(56 / 28) merged patches
    for mine, theirs in zip(features, host):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0)
    for ids in batch["input_ids"]:
        assert placeholder_runs(ids, IMAGE_TOKEN_ID) == [4]  # m fused tokens, whatever the image size
        last = (ids == IMAGE_TOKEN_ID).nonzero().flatten()[-1]
        assert ids[last + 1] == processor.tokens.end  # the run closed by [IMG_END]
    with torch.no_grad():
        assert model(**batch).logits.shape[:2] == batch["input_ids"].shape
