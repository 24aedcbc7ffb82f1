"""High-resolution front-end: HD-K global–local views, the local merge and the ⟨newline⟩ token.

The data flow for one image, before the fusion module (HD-9 with CLIP ViT-L/14 at 336 px):

    image ─ hd_views ─> (10, 3, 336, 336) ─ host vision tower ─> (10, 576, d)
          ─ HDFrontEnd ─> 10 × (12·12 merged tokens + ⟨newline⟩) = (1450, out_dim)

The views go through the vision tower one by one (batched over views); which layer of the tower is
read and whether its class token is dropped is the host adapter's choice (see :func:`encode_views`).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor, nn

MODES = ("bicubic", "bilinear")


def _as_image(image) -> Tensor:
    """(C, H, W) float tensor from a tensor (returned as is) or a PIL image (RGB, scaled to [0, 1])."""
    if isinstance(image, Tensor):
        if image.dim() != 3 or 0 in image.shape:
            raise ValueError(f"image: expected a non-empty (C, H, W) tensor, got shape {tuple(image.shape)}")
        if not image.is_floating_point():
            raise TypeError(f"image: expected a floating-point tensor, got dtype {image.dtype}")
        return image
    try:
        from PIL import Image
    except ImportError:
        Image = None
    if Image is None or not isinstance(image, Image.Image):
        raise TypeError(f"image: expected a (C, H, W) float tensor or a PIL image, got {type(image).__name__}")
    rgb = image.convert("RGB")
    pixels = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8)
    return rearrange(pixels, "(h w c) -> c h w", h=rgb.height, w=rgb.width).float() / 255


def _positive_int(value, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    return value


def _check_grid(grid) -> tuple[int, int]:
    if (not isinstance(grid, (tuple, list)) or len(grid) != 2
            or not all(isinstance(g, int) and not isinstance(g, bool) and g >= 1 for g in grid)):
        raise ValueError(f"grid: expected (rows, cols), two positive integers, got {grid!r}")
    return tuple(grid)


def _fit(image: Tensor, height: int, width: int, fill: Tensor, mode: str) -> Tensor:
    """Resize image: (C, H, W) to fit (height, width) keeping its aspect ratio, centred on a fill canvas."""
    _, h, w = image.shape
    scale = min(height / h, width / w)
    new_h, new_w = min(height, max(1, round(h * scale))), min(width, max(1, round(w * scale)))
    # Resampled in float32 at least: antialiased kernels do not support half precision on every device.
    work = image if image.dtype == torch.float64 else image.float()
    resized = F.interpolate(work[None], size=(new_h, new_w), mode=mode, antialias=True, align_corners=False)[0]
    canvas = repeat(fill, "c -> c h w", h=height, w=width).clone()
    top, left = (height - new_h) // 2, (width - new_w) // 2
    canvas[:, top:top + new_h, left:left + new_w] = resized.to(image.dtype)
    return canvas


def hd_views(image, grid: tuple[int, int] = (3, 3), size: int = 336, fill: float | Sequence[float] = 0.0,
             mode: str = "bicubic") -> Tensor:
    """HD-K views of one image: a global view and K = rows·cols local tiles, each ``size``×``size``.

    The global view is the image padded to a square and resized to ``size``. The local views cut a
    (rows·size)×(cols·size) canvas, holding the image padded to the canvas's aspect and resized, into
    ``size``×``size`` tiles, row-major. Padding keeps the aspect ratio: the image is resized to fit
    and centred, the rest is ``fill``. Views are returned in the image's value scale; normalise them
    with the vision tower's mean/std afterwards.

    image: (C, H, W) floating-point tensor, or a PIL image (converted to RGB in [0, 1]).
    grid: (rows, cols) of local tiles; (3, 3) is the paper's HD-9.
    size: the vision tower's input resolution.
    fill: padding value, a scalar or one value per channel, in the image's scale: 0 pads black (or
        with the mean, for an already-normalised image); the processor's ``image_mean`` pads a
        [0, 1] image with the mean, as LLaVA does, so the padding normalises to 0.
    mode: "bicubic" or "bilinear" interpolation (antialiased when shrinking).

    Returns (1 + K, C, size, size): the global view, then the tiles; differentiable in ``image``.

    >>> views = hd_views(torch.rand(3, 200, 300), grid=(2, 3), size=28)
    >>> views.shape
    torch.Size([7, 3, 28, 28])
    """
    image = _as_image(image)
    rows, cols = _check_grid(grid)
    size = _positive_int(size, "size")
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    channels = image.shape[0]
    fill_c = torch.as_tensor(fill, dtype=image.dtype, device=image.device).flatten()
    if fill_c.numel() == 1:
        fill_c = fill_c.expand(channels)
    if fill_c.numel() != channels:
        raise ValueError(f"fill: expected a scalar or {channels} values (one per channel), got {fill_c.numel()}")
    global_view = _fit(image, size, size, fill_c, mode)
    canvas = _fit(image, rows * size, cols * size, fill_c, mode)
    tiles = rearrange(canvas, "c (r h) (k w) -> (r k) c h w", h=size, w=size)
    return torch.cat([global_view[None], tiles])


def _grid_side(tokens: int, name: str) -> int:
    """Side s of an s×s token grid of ``tokens`` tokens; a class token must be dropped first."""
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise ValueError(
            f"{name}: expected a square number of tokens per view (an s×s patch grid, class token "
            f"dropped), got {tokens}"
        )
    return side


def _merged_tokens(tokens: int, name: str) -> int:
    """Tokens per view after the local merge: ceil(s/2)² for an s×s grid (576 → 144)."""
    return math.ceil(_grid_side(tokens, name) / 2) ** 2


class LocalMerge(nn.Module):
    """Cut each view's tokens by 4: a Conv2d(3, stride 2, padding 1) over the view's s×s token grid.

    dim: width of the incoming tokens; out_dim: width of the merged ones (default ``dim``).

    >>> merge = LocalMerge(32, out_dim=16)
    >>> merge(torch.randn(10, 24 * 24, 32)).shape
    torch.Size([10, 144, 16])
    """

    def __init__(self, dim: int, out_dim: int | None = None):
        super().__init__()
        dim = _positive_int(dim, "dim")
        out_dim = dim if out_dim is None else _positive_int(out_dim, "out_dim")
        self.conv = nn.Conv2d(dim, out_dim, kernel_size=3, stride=2, padding=1)

    def forward(self, tokens: Tensor) -> Tensor:
        """tokens: (views, S, dim), S = s·s row-major. Returns (views, ceil(s/2)², out_dim)."""
        if not isinstance(tokens, Tensor):
            raise TypeError(f"tokens: expected a (views, S, dim) tensor, got {type(tokens).__name__}")
        if tokens.dim() != 3 or tokens.shape[-1] != self.conv.in_channels:
            raise ValueError(
                f"tokens: expected (views, S, dim={self.conv.in_channels}), got shape {tuple(tokens.shape)}"
            )
        side = _grid_side(tokens.shape[1], "tokens")
        merged = self.conv(rearrange(tokens, "v (h w) d -> v d h w", h=side, w=side))
        return rearrange(merged, "v d h w -> v (h w) d")


class HDFrontEnd(nn.Module):
    """Per-view vision features of HD-K images → one vision-token sequence per image for the fusion.

    Each view's tokens are merged by :class:`LocalMerge` (unless ``merge=False``) and a learned
    ⟨newline⟩ token is appended after every view, marking where a view ends. HD-9 with 576-token
    views gives (144 + 1) × 10 = 1,450 tokens of width ``out_dim``: set the fusion's
    ``FusionConfig.vision_dim`` to ``out_dim``.

    vision_dim: width of the vision tower's features.
    grid: (rows, cols) of local views, as given to :func:`hd_views`.
    merge: apply the local merge; without it views keep their tokens and width.
    out_dim: width of the output tokens (default ``vision_dim``; with ``merge=False`` it must equal it).

    >>> front = HDFrontEnd(vision_dim=32, grid=(3, 3), out_dim=16)
    >>> [t.shape for t in front(torch.randn(10, 576, 32))], front.num_tokens(576)
    ([torch.Size([1450, 16])], 1450)
    """

    def __init__(self, vision_dim: int, grid: tuple[int, int] = (3, 3), merge: bool = True,
                 out_dim: int | None = None):
        super().__init__()
        vision_dim = _positive_int(vision_dim, "vision_dim")
        grid = _check_grid(grid)
        out_dim = vision_dim if out_dim is None else _positive_int(out_dim, "out_dim")
        if not merge and out_dim != vision_dim:
            raise ValueError(f"out_dim: without merge tokens keep vision_dim={vision_dim}, got {out_dim}")
        self.vision_dim, self.out_dim, self.grid = vision_dim, out_dim, grid
        self.num_views = 1 + grid[0] * grid[1]
        self.local_merge = LocalMerge(vision_dim, out_dim) if merge else nn.Identity()
        self.newline = nn.Parameter(torch.empty(out_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Draw the ⟨newline⟩ token at the scale of unit-variance features, as LLaVA-NeXT's image_newline."""
        nn.init.normal_(self.newline, std=self.out_dim ** -0.5)

    @property
    def dtype(self) -> torch.dtype:
        return self.newline.dtype

    @property
    def device(self) -> torch.device:
        return self.newline.device

    def num_tokens(self, tokens_per_view: int) -> int:
        """Vision tokens per image coming out for views of ``tokens_per_view`` tokens (576 → 1,450 for HD-9)."""
        tokens_per_view = _positive_int(tokens_per_view, "tokens_per_view")
        if isinstance(self.local_merge, LocalMerge):
            tokens_per_view = _merged_tokens(tokens_per_view, "tokens_per_view")
        return self.num_views * (tokens_per_view + 1)

    def _check(self, features, name: str) -> Tensor:
        if not isinstance(features, Tensor):
            raise TypeError(f"{name}: expected a (1 + K, S, vision_dim) tensor, got {type(features).__name__}")
        if features.dim() != 3 or features.shape[0] != self.num_views or features.shape[-1] != self.vision_dim:
            raise ValueError(
                f"{name}: expected ({self.num_views}, S, {self.vision_dim}) for grid {self.grid} "
                f"(1 global + {self.num_views - 1} local views), got {tuple(features.shape)}"
            )
        if features.dtype != self.dtype:
            raise TypeError(f"{name}: expected dtype {self.dtype} (the module's), got {features.dtype}")
        if features.device != self.device:
            raise ValueError(f"{name}: expected device {self.device} (the module's), got {features.device}")
        return features

    def forward(self, view_features) -> list[Tensor]:
        """Merge every view, append ⟨newline⟩ after each, and flatten the views of each image.

        view_features: (1 + K, S, vision_dim) for one image, or a list of those for a batch; the
            global view first, then the tiles row-major, as :func:`hd_views` orders them.
        Returns one (num_tokens(S), out_dim) tensor per image: the ``vision_tokens`` list of
        ``QuestionFusion.forward``.
        """
        if isinstance(view_features, Tensor):
            images = [self._check(view_features, "view_features")]
        elif isinstance(view_features, (list, tuple)) and view_features:
            images = [self._check(f, f"view_features[{i}]") for i, f in enumerate(view_features)]
        else:
            raise TypeError(
                "view_features: expected a (1 + K, S, vision_dim) tensor or a non-empty list of them, "
                f"got {view_features!r:.60}"
            )
        return [self._sequence(features) for features in images]

    def _sequence(self, features: Tensor) -> Tensor:
        merged = self.local_merge(features)  # (views, S', out_dim)
        newline = repeat(self.newline, "d -> v 1 d", v=merged.shape[0])
        return rearrange(torch.cat([merged, newline], dim=1), "v t d -> (v t) d")


def encode_views(vision_tower_fn: Callable[[Tensor], Tensor], views, chunk_size: int | None = None):
    """Run the host's vision function over the views of one or more images, batched over views.

    vision_tower_fn: maps pixel values (n, C, size, size) to per-view features (n, S, d); the host
        adapter chooses the tower layer and drops the class token there, e.g.
        ``lambda px: tower(px, output_hidden_states=True).hidden_states[-2][:, 1:]``.
    views: (1 + K, C, size, size) from :func:`hd_views`, or a list of those (one per image); every
        view is an independent image to the tower.
    chunk_size: at most this many views per call (default: all views of all images in one call).

    Returns (1 + K, S, d), or a list of those matching ``views``.

    >>> encode_views(lambda px: px.flatten(2).transpose(1, 2), torch.rand(10, 3, 28, 28)).shape
    torch.Size([10, 784, 3])
    """
    if isinstance(views, Tensor):
        batch = [views]
    elif isinstance(views, (list, tuple)) and views and all(isinstance(v, Tensor) for v in views):
        batch = list(views)
    else:
        raise TypeError(f"views: expected a (1 + K, C, H, W) tensor or a non-empty list of them, got {views!r:.60}")
    for i, v in enumerate(batch):
        if v.dim() != 4:
            name = "views" if isinstance(views, Tensor) else f"views[{i}]"
            raise ValueError(f"{name}: expected a (1 + K, C, H, W) tensor, got shape {tuple(v.shape)}")
    pixels = torch.cat(batch)
    if chunk_size is not None:
        chunk_size = _positive_int(chunk_size, "chunk_size")
    features = []
    for chunk in pixels.split(chunk_size or pixels.shape[0]):
        out = vision_tower_fn(chunk)
        if not isinstance(out, Tensor) or out.dim() != 3 or out.shape[0] != chunk.shape[0]:
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(
                f"vision_tower_fn: expected a (n, S, d) tensor for n={chunk.shape[0]} views, got {shape}"
            )
        features.append(out)
    per_image = list(torch.cat(features).split([v.shape[0] for v in batch]))
    return per_image[0] if isinstance(views, Tensor) else per_image
