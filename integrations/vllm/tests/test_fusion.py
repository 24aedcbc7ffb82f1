"""qfusion_vllm.fusion without an engine: the vision cache that spares follow-up items the vision tower."""

from __future__ import annotations

import pytest
import torch

from qfusion_vllm.fusion import VisionCache, as_list


class Tower:
    """Counts the items it encodes; an image's features are its key's first byte, repeated."""

    def __init__(self, keys: list[bytes]):
        self.keys = keys
        self.encoded: list[int] = []

    def __call__(self, chosen: list[int]) -> list[torch.Tensor]:
        self.encoded += chosen
        return [torch.full((2, 3), float(self.keys[i][0])) for i in chosen]


def test_each_image_is_encoded_once_and_every_item_gets_its_features():
    keys = [b"a", b"b", b"a", b"a"]  # the items of two images' question groups
    tower = Tower(keys)
    features = VisionCache(8).features(keys, tower)
    assert tower.encoded == [0, 1]
    assert [int(f[0, 0]) for f in features] == [ord(k) for k in keys]


def test_a_later_batch_reuses_cached_images_and_encodes_only_new_ones():
    cache = VisionCache(8)
    cache.features([b"a"], Tower([b"a"]))
    tower = Tower([b"a", b"c"])
    features = cache.features([b"a", b"c"], tower)
    assert tower.encoded == [1]
    assert [int(f[0, 0]) for f in features] == [ord("a"), ord("c")]


def test_the_least_recently_used_image_leaves_first():
    cache = VisionCache(2)
    for key in (b"a", b"b", b"a", b"c"):  # "a" used again after "b": "b" is the oldest when "c" comes
        cache.features([key], Tower([key]))
    assert list(cache.entries) == [b"a", b"c"]


def test_capacity_zero_keeps_nothing_between_batches():
    cache = VisionCache(0)
    cache.features([b"a"], Tower([b"a"]))
    tower = Tower([b"a"])
    cache.features([b"a"], tower)
    assert tower.encoded == [0] and not cache.entries


@pytest.mark.parametrize("capacity", [-1, 2.5, True, "8"])
def test_bad_capacity_names_the_host_config_field(capacity):
    with pytest.raises(ValueError, match=r"qfusion_vision_cache: expected a number of images >= 0"):
        VisionCache(capacity)


def test_as_list_reads_stacked_and_listed_fields_alike():
    stacked = torch.arange(6).reshape(3, 2)
    assert [t.tolist() for t in as_list(stacked)] == [[0, 1], [2, 3], [4, 5]]
    assert [t.tolist() for t in as_list([torch.tensor([1]), torch.tensor([2, 3])])] == [[1], [2, 3]]
