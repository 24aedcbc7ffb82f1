
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from readme_blocks import python_blocks
from transformers import CLIPVisionConfig, CLIPVisionModel

from qfusion import FusionConfig, QuestionFusion
from qfusion.vision import HDFrontEnd, LocalMerge, encode_views, hd_views

DOC_SECTIONS = (("docs/hosts.md", "High-resolution front-end"),)


def seeded(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.fixture(scope="module")
def clip_tower(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip")
    torch.manual_seed(0)
    config = CLIPVisionConfig(image_size=28, patch_size=14, hidden_size=32, num_hidden_layers=2,
                              num_attention_heads=2, intermediate_size=64)
    CLIPVisionModel(config).save_pretrained(path)
    return CLIPVisionModel.from_pretrained(path).eval()


# ---------------------------------------------------------------- hd_views

def test_hd9_views_at_336_have_ten_encoder_sized_views():
    views = hd_views(torch.rand(3, 480, 640), grid=(3, 3), size=336)
    assert views.shape == (10, 3, 336, 336)


def test_global_view_of_a_square_image_is_a_plain_resize():
    image = torch.rand(3, 90, 90)
    views = hd_views(image, grid=(2, 2), size=28)
    plain = F.interpolate(image[None], size=(28, 28), mode="bicubic", antialias=True, align_corners=False)[0]
    torch.testing.assert_close(views[0], plain)


def test_non_square_image_keeps_its_aspect_with_fill_padding():
    image = torch.rand(3, 20, 40) + 1  # content > 0 > fill
    fill = -1.0
    views = hd_views(image, grid=(2, 2), size=16, fill=fill)
    # global: 20×40 fits 16×16 as 8×16, centred: rows 4..11 are content
    assert (views[0][:, :4] == fill).all() and (views[0][:, 12:] == fill).all()
    assert (views[0][:, 4:12] > 0).all()
    # local canvas 32×32 holds the image as 16×32, centred: rows 8..23, tiles (0, c) top, (1, c) bottom
    top, bottom = views[1:3], views[3:5]
    assert (top[:, :, :8] == fill).all() and (bottom[:, :, 8:] == fill).all()
    assert (top[:, :, 8:] > 0).all() and (bottom[:, :, :8] > 0).all()


def test_per_channel_fill_pads_each_channel_with_its_value():
    views = hd_views(torch.rand(3, 10, 30) + 1, grid=(1, 1), size=12, fill=(0.1, 0.2, 0.3))
    torch.testing.assert_close(views[:, :, 0, 0], torch.tensor([0.1, 0.2, 0.3]).expand(2, 3))


def test_local_tiles_are_row_major_crops_of_the_canvas():
    image = torch.rand(3, 32, 48)  # exactly the (2·16)×(3·16) canvas of grid (2, 3)
    views = hd_views(image, grid=(2, 3), size=16, mode="bilinear")
    assert views.shape == (7, 3, 16, 16)
    for r in range(2):
        for c in range(3):
            torch.testing.assert_close(views[1 + 3 * r + c], image[:, 16 * r:16 * (r + 1), 16 * c:16 * (c + 1)])


def test_pil_image_becomes_rgb_in_unit_range():
    pixels = torch.randint(0, 256, (20, 30, 3), dtype=torch.uint8)
    pil = Image.fromarray(pixels.numpy(), mode="RGB")
    want = hd_views(pixels.permute(2, 0, 1).float() / 255, grid=(1, 2), size=14)
    torch.testing.assert_close(hd_views(pil, grid=(1, 2), size=14), want)
    assert hd_views(pil.convert("L"), grid=(1, 1), size=14).shape == (2, 3, 14, 14)


def test_hd_views_is_differentiable_and_keeps_dtype():
    image = torch.rand(3, 30, 20, dtype=torch.float64, requires_grad=True)
    views = hd_views(image, grid=(2, 1), size=14)
    assert views.dtype == torch.float64
    views.sum().backward()
    assert image.grad is not None and image.grad.abs().sum() > 0


def test_half_precision_image_is_resampled_in_float32():
    image = torch.rand(3, 50, 70)
    views = hd_views(image.bfloat16(), grid=(2, 2), size=14)
    assert views.dtype == torch.bfloat16
    torch.testing.assert_close(views, hd_views(image.bfloat16().float(), grid=(2, 2), size=14).bfloat16())


@pytest.mark.parametrize("kwargs, error, name", [
    (dict(image=torch.rand(30, 20)), ValueError, "image"),
    (dict(image=torch.zeros(3, 0, 20)), ValueError, "image"),
    (dict(image=torch.zeros(3, 8, 8, dtype=torch.uint8)), TypeError, "image"),
    (dict(image=[[0.0]]), TypeError, "image"),
    (dict(grid=(0, 3)), ValueError, "grid"),
    (dict(grid=3), ValueError, "grid"),
    (dict(size=0), ValueError, "size"),
    (dict(fill=(0.0, 0.0)), ValueError, "fill"),
    (dict(mode="nearest"), ValueError, "mode"),
])
def test_hd_views_bad_arguments_raise_naming_the_argument(kwargs, error, name):
    args = dict(image=torch.rand(3, 8, 8), grid=(2, 2), size=14) | kwargs
    with pytest.raises(error, match=f"^{name}"):
        hd_views(**args)


# ---------------------------------------------------------------- LocalMerge

@pytest.mark.parametrize("side, merged_side", [(24, 12), (2, 1), (5, 3), (1, 1)])
def test_local_merge_equals_conv2d_over_the_token_grid(side, merged_side):
    torch.manual_seed(0)
    merge = LocalMerge(8, out_dim=6).double()
    tokens = seeded(3, side * side, 8, dtype=torch.float64)
    grid = tokens.reshape(3, side, side, 8).permute(0, 3, 1, 2)
    want = F.conv2d(grid, merge.conv.weight, merge.conv.bias, stride=2, padding=1)
    want = want.permute(0, 2, 3, 1).reshape(3, merged_side * merged_side, 6)
    torch.testing.assert_close(merge(tokens), want, rtol=1e-12, atol=1e-12)


def test_local_merge_bad_tokens_raise_naming_the_argument():
    merge = LocalMerge(8)
    with pytest.raises(ValueError, match="^tokens: expected a square"):
        merge(torch.randn(2, 577, 8))
    with pytest.raises(ValueError, match="^tokens"):
        merge(torch.randn(2, 16, 4))
    with pytest.raises(ValueError, match="^tokens"):
        merge(torch.randn(16, 8))
    with pytest.raises(TypeError, match="^tokens"):
        merge([[0.0]])
    with pytest.raises(ValueError, match="^out_dim"):
        LocalMerge(8, out_dim=0)


# ---------------------------------------------------------------- HDFrontEnd

def test_hd9_front_end_gives_1450_tokens_for_576_token_views():
    front = HDFrontEnd(vision_dim=16, grid=(3, 3), out_dim=8)
    (tokens,) = front(seeded(10, 576, 16))
    assert tokens.shape == (1450, 8) == (front.num_tokens(576), 8)


def test_small_views_merge_two_by_two_into_one_token():
    front = HDFrontEnd(vision_dim=16, grid=(3, 3))
    out = front([seeded(10, 4, 16, seed=1), seeded(10, 4, 16, seed=2)])
    assert [t.shape for t in out] == [(20, 16), (20, 16)]
    assert front.num_tokens(4) == 20


def test_newline_follows_every_view():
    torch.manual_seed(0)
    front = HDFrontEnd(vision_dim=16, grid=(3, 3), out_dim=8)
    features = seeded(10, 576, 16)
    (tokens,) = front(features)
    torch.testing.assert_close(tokens[144::145], front.newline.expand(10, 8), rtol=0, atol=0)
    merged = front.local_merge(features)
    torch.testing.assert_close(tokens.reshape(10, 145, 8)[:, :144], merged, rtol=0, atol=0)


def test_without_merge_views_keep_their_tokens():
    front = HDFrontEnd(vision_dim=16, grid=(1, 2), merge=False)
    features = seeded(3, 7, 16)
    (tokens,) = front(features)
    assert tokens.shape == (24, 16) and front.num_tokens(7) == 24
    torch.testing.assert_close(tokens.reshape(3, 8, 16)[:, :7], features, rtol=0, atol=0)


def test_gradient_reaches_the_conv_and_the_newline():
    front = HDFrontEnd(vision_dim=16, grid=(2, 2), out_dim=8)
    features = seeded(5, 16, 16).requires_grad_()
    (tokens,) = front(features)
    (tokens * seeded(*tokens.shape, seed=3)).sum().backward()
    for grad in (front.local_merge.conv.weight.grad, front.local_merge.conv.bias.grad, front.newline.grad,
                 features.grad):
        assert grad is not None and grad.abs().sum() > 0


def test_front_end_follows_its_dtype():
    front = HDFrontEnd(vision_dim=16, grid=(1, 1)).to(torch.float64)
    (tokens,) = front(seeded(2, 9, 16, dtype=torch.float64))
    assert tokens.dtype == torch.float64 and tokens.shape == (2 * (4 + 1), 16)
    with pytest.raises(TypeError, match=r"^view_features: expected dtype torch\.float64"):
        front(seeded(2, 9, 16))


def test_front_end_bad_arguments_raise_naming_the_argument():
    front = HDFrontEnd(vision_dim=16, grid=(3, 3))
    with pytest.raises(ValueError, match=r"^view_features: expected \(10, S, 16\)"):
        front(seeded(9, 576, 16))
    with pytest.raises(ValueError, match=r"^view_features\[1\]"):
        front([seeded(10, 4, 16), seeded(10, 4, 8)])
    with pytest.raises(TypeError, match="^view_features"):
        front([])
    with pytest.raises(ValueError, match="^tokens"):
        front(seeded(10, 5, 16))
    with pytest.raises(ValueError, match="^tokens_per_view"):
        front.num_tokens(577)
    with pytest.raises(ValueError, match="^tokens_per_view"):
        front.num_tokens(0)
    with pytest.raises(ValueError, match="^out_dim"):
        HDFrontEnd(16, merge=False, out_dim=8)
    with pytest.raises(ValueError, match="^grid"):
        HDFrontEnd(16, grid=(3,))
    with pytest.raises(ValueError, match="^vision_dim"):
        HDFrontEnd(0)


# ---------------------------------------------------------------- encode_views

def test_encode_views_batches_views_and_splits_per_image():
    calls = []

    def tower(pixels):
        calls.append(pixels.shape[0])
        return pixels.flatten(2).transpose(1, 2)

    views = [torch.rand(5, 3, 4, 4), torch.rand(5, 3, 4, 4)]
    out = encode_views(tower, views, chunk_size=4)
    assert calls == [4, 4, 2]
    for got, v in zip(out, views):
        torch.testing.assert_close(got, v.flatten(2).transpose(1, 2), rtol=0, atol=0)
    assert encode_views(tower, views[0]).shape == (5, 16, 3)


def test_encode_views_bad_arguments_raise_naming_the_argument():
    with pytest.raises(ValueError, match="^vision_tower_fn"):
        encode_views(lambda px: px.flatten(1), torch.rand(5, 3, 4, 4))
    with pytest.raises(ValueError, match=r"^views\[1\]"):
        encode_views(lambda px: px.flatten(2), [torch.rand(5, 3, 4, 4), torch.rand(3, 4, 4)])
    with pytest.raises(TypeError, match="^views"):
        encode_views(lambda px: px.flatten(2), [])
    with pytest.raises(ValueError, match="^chunk_size"):
        encode_views(lambda px: px.flatten(2), torch.rand(5, 3, 4, 4), chunk_size=0)


# ---------------------------------------------------------------- end to end

def test_clip_tower_front_end_and_fusion_end_to_end(clip_tower):
    images = [torch.rand(3, 60, 90), torch.rand(3, 50, 40)]
    views = [hd_views(image, grid=(3, 3), size=28, fill=0.5) for image in images]
    features = encode_views(lambda px: clip_tower(pixel_values=px).last_hidden_state[:, 1:], views)
    assert [f.shape for f in features] == [(10, 4, 32), (10, 4, 32)]

    torch.manual_seed(0)
    front = HDFrontEnd(vision_dim=32, grid=(3, 3), out_dim=24)
    fusion = QuestionFusion(FusionConfig(vision_dim=24, hidden_size=32, num_layers=1, num_heads=2,
                                         intermediate_size=64, codebook_size=8, m=4, n=2, output_dim=16,
                                         text_vocab_size=50, attn_impl="eager"))
    vision = front(features)
    assert [v.shape for v in vision] == [(front.num_tokens(4), 24)] * 2 == [(20, 24)] * 2
    out = fusion(vision, [[torch.tensor([1, 2, 3]), torch.tensor([4])], [torch.tensor([5, 6])]])
    assert [[t.shape for t in sample] for sample in out.tokens] == [[(4, 16), (2, 16)], [(4, 16)]]
    out.packed_tokens.square().sum().backward()
    assert front.local_merge.conv.weight.grad.abs().sum() > 0 and front.newline.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in clip_tower.parameters())
    clip_tower.zero_grad(set_to_none=True)


# ---------------------------------------------------------------- documentation

def test_high_resolution_section_runs_and_prints_what_it_says(capsys):
    ((page, section),) = DOC_SECTIONS
    blocks = python_blocks(section, page)
    assert blocks, f"{page}: section {section!r} has no python code"
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, f"{page} ({section})", "exec"), namespace)
    assert capsys.readouterr().out.splitlines() == ["(10, 3, 56, 56) (10, 16, 64)", "(50, 64) (16, 96)", "1450"]
