"""A small real dataset that ships with scikit-learn: 1,797 handwritten digit scans (8x8, 10 classes).

Written out as an ImageFolder (``<root>/<class>/<name>.png``) so every source path of the
pipeline is exercised on real images, with no download.
"""

from __future__ import annotations

import os


def write_digits_imagefolder(root: str, size: int = 32, classes: int = 10, per_class: int | None = None) -> str:
    """Write the digits as ``size``x``size`` RGB PNGs under ``root``; returns ``root``.

    ``classes`` keeps digits ``0..classes-1``; ``per_class`` caps the images per class.
    Idempotent: an existing file is left as it is.
    """
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for c in range(classes):
        os.makedirs(os.path.join(root, str(c)), exist_ok=True)
        idx = np.flatnonzero(digits.target == c)
        for i in idx[:per_class] if per_class else idx:
            path = os.path.join(root, str(c), f"digit_{i:04d}.png")
            if os.path.exists(path):
                continue
            pixels = (digits.images[i] * (255.0 / 16.0)).astype("uint8")
            img = Image.fromarray(pixels, "L").resize((size, size), Image.BICUBIC).convert("RGB")
            img.save(path)
    return root
