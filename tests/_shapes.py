"""A generated "shapes" segmentation set: textured shapes on noisy backgrounds, with pixel masks.

Each ``size`` x ``size`` RGB image holds 1-3 shapes (square, disc, triangle: classes 1-3; the
background is class 0). A shape's class is told by its *texture* (horizontal stripes, a
checkerboard, vertical stripes) in a random colour, never by its colour alone, so a model has to
look at local structure; the background is grey noise. Written as an ImageFolder
(``<root>/images/<label>/shape-XXXX.png``, the label being the class covering most pixels) with
the masks in a paired folder (``<root>/masks/<label>/shape-XXXX.png``), as ``prep``'s ``masks:``
option reads them.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

CLASSES = ["background", "square", "disc", "triangle"]


def _texture(cls: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """[S, S] in {0, 1}: the class's pattern at a random phase (period 4 px)."""
    yy, xx = np.mgrid[:size, :size]
    phase = int(rng.integers(0, 4))
    if cls == 1:
        return ((yy + phase) // 2 % 2).astype(np.float64)
    if cls == 2:
        return (((yy + phase) // 2 + (xx + phase) // 2) % 2).astype(np.float64)
    return ((xx + phase) // 2 % 2).astype(np.float64)


def _shape_mask(cls: int, size: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    r = int(rng.integers(size // 8, size // 4 + 1))
    cy, cx = (int(v) for v in rng.integers(r, size - r, 2))
    if cls == 1:
        return (abs(yy - cy) <= r) & (abs(xx - cx) <= r)
    if cls == 2:
        return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    return (yy >= cy - r) & (yy <= cy + r) & (abs(xx - cx) <= (yy - (cy - r)) / 2)


def shape_sample(size: int, rng: np.random.Generator,
                 colour_cell: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 [S, S, 3] image, uint8 [S, S] mask). ``colour_cell``: every ``cell x cell`` block of a shape
    gets its own colour and every block of the background its own grey level, so a block's colour says
    nothing of its neighbours' (only the texture does); None: one colour per shape, per-pixel grey."""
    if colour_cell is None:
        cells, up = (size, size), (lambda a: a)
    else:
        cells = (size // colour_cell, size // colour_cell)
        up = lambda a: np.repeat(np.repeat(a, colour_cell, 0), colour_cell, 1)  # noqa: E731
    img = np.clip(up(rng.normal(128, 30, (*cells, 1))) + rng.normal(0, 12, (size, size, 3)), 0, 255)
    mask = np.zeros((size, size), np.uint8)
    for _ in range(int(rng.integers(1, 4))):
        cls = int(rng.integers(1, 4))
        where = _shape_mask(cls, size, rng)
        colour = rng.uniform(40, 215, 3) if colour_cell is None else up(rng.uniform(40, 215, (*cells, 3)))
        tex = _texture(cls, size, rng)[..., None]
        pattern = colour * (0.45 + 0.9 * tex)  # the texture's two levels, in the shape's colour
        img = np.where(where[..., None], pattern + rng.normal(0, 8, (size, size, 3)), img)
        mask[where] = cls
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), mask


def write_shapes(root: str, count: int = 200, size: int = 32, seed: int = 0,
                 colour_cell: int | None = None) -> tuple[str, str]:
    """Write ``count`` samples (``colour_cell``: as :func:`shape_sample`); returns (image folder, mask folder)."""
    rng = np.random.default_rng(seed)
    images, masks = os.path.join(root, "images"), os.path.join(root, "masks")
    for i in range(count):
        img, mask = shape_sample(size, rng, colour_cell)
        label = int(np.bincount(mask[mask > 0], minlength=4)[1:].argmax()) + 1 if mask.any() else 1
        rel = f"{CLASSES[label]}/shape-{i:04d}.png"
        for folder, arr in ((images, img), (masks, mask)):
            os.makedirs(os.path.join(folder, CLASSES[label]), exist_ok=True)
            Image.fromarray(arr).save(os.path.join(folder, rel))
    return images, masks
