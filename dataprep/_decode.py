"""Image bytes -> ``uint8 [3, H, W]`` tensor (or PIL image). libjpeg-turbo / libpng via torchvision
first (about 2x PIL's decode + conversion), PIL for anything else, numpy for ``.npy`` (any C and
dtype: ``[C, H, W]`` exactly as prep wrote it)."""

from __future__ import annotations

import io
import warnings

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_image

_TORCHVISION_EXTS = {"jpg", "jpeg", "png", "webp", "gif"}

# torchvision 0.29 warns on every decode call that its codecs will move to TorchCodec; the
# warning machinery alone costs ~50 us per image. Silence that one message (pinned version).
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)


def decode(data: bytes, ext: str, image_type: str = "tensor"):
    """Decode one image. Raises ValueError (or the codec's error) on corrupt bytes."""
    if ext == "npy":  # prep's ``format: npy``: [C, H, W] (or [H, W]) at the source dtype, no PIL round trip
        arr = np.load(io.BytesIO(data), allow_pickle=False)
        t = torch.from_numpy(np.ascontiguousarray(arr))
        t = t.unsqueeze(0) if t.ndim == 2 else t
        if t.ndim != 3:
            raise ValueError(f".npy member of shape {list(arr.shape)}: expected [C, H, W]")
        return _to_pil(t) if image_type == "pil" else t
    if image_type == "pil":
        from PIL import Image

        with Image.open(io.BytesIO(data)) as img:
            return img.convert("RGB")
    if ext in _TORCHVISION_EXTS:
        return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        arr = np.asarray(img.convert("RGB"))
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def _to_pil(t: torch.Tensor):
    from torchvision.transforms.v2.functional import to_pil_image

    return to_pil_image(t)
