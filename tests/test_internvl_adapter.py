"""qfusion.adapters.internvl on a tiny random InternVL checkpoint: what is specific to the family (its
tiles; the contract every host keeps is in test_host_contract.py)."""

import pytest
import torch
from conftest_hosts import IMAGE_TOKEN_ID, fusion_config, images

import qfusion
from qfusion import QFusionProcessor
from qfusion.inputs import placeholder_runs


def test_an_images_vision_tokens_are_those_of_all_its_tiles_in_order(hosts):
    model = hosts.model("internvl")
    torch.manual_seed(0)
    adapter = qfusion.attach(model, fusion_config())
    processor = QFusionProcessor(hosts.processor("internvl"), model)
    wide, square = images(1, size=(40, 110), seed=1)[0], images(1, size=(50, 50), seed=2)[0]
    batch = processor(images=[wide, square], questions=["what is this ?", "red"])
    assert batch["num_patches"].tolist() == [3, 1]  # two tiles and a thumbnail; a square image: one tile
    with torch.no_grad():
        tiles = model.model.get_image_features(pixel_values=batch["pixel_values"], return_dict=True).pooler_output
        features = adapter.encode(batch)
    assert [f.shape[0] for f in features] == [3 * tiles.shape[1], tiles.shape[1]]
    torch.testing.assert_close(features[0], tiles[:3].flatten(0, 1), rtol=0, atol=0)
    torch.testing.assert_close(features[1], tiles[3], rtol=0, atol=0)
    ids = batch["input_ids"][0]
    assert placeholder_runs(ids, IMAGE_TOKEN_ID) == [4]  # m fused tokens, whatever the tile count
    start, end = processor.tokens.start, processor.tokens.end
    run = (ids == IMAGE_TOKEN_ID).nonzero().flatten()
    assert ids[run[0] - 1] == start and ids[run[-1] + 1] == end
    with pytest.raises(ValueError, match="num_patches: says 5 tiles in all, pixel_values holds 4"):
        model(**dict(batch, num_patches=torch.tensor([4, 1])))
