"""Loading a checkpoint runs no code: every ``torch.load`` inside :func:`safe_loading` is weights-only.

DeepSpeed (``torch_checkpoint_engine``, the universal-checkpoint converter, ``zero_to_fp32``) and
accelerate unpickle the files they restore with ``weights_only`` off. Inside
:func:`safe_loading` those calls go through ``weights_only=True`` with :data:`ALLOWED`, the
explicit allow-list of the non-tensor types the two libraries store (found with
``torch.serialization.get_unsafe_globals_in_checkpoint`` on ZeRO 0-3 checkpoints in fp32, bf16 and
fp16 (a ``deepspeed: {fp16: ...}`` pass-through: its dynamic loss scaler), with and without optimizer
offload, and accelerate's RNG files). A pickle naming any other global (``os.system``, ``builtins.exec``, a planted class)
is refused before anything in it runs: :class:`UnsafeCheckpointError` names the file and the global.
"""

from __future__ import annotations

import contextlib
import pickle
import re
import threading
from typing import Any, Iterator

import torch

_LOCK = threading.RLock()


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint file would need an unpickled global outside the allow-list (it could run code)."""

    permanent = True


def allowed_globals() -> list[Any]:
    """The allow-list: the types DeepSpeed's and accelerate's checkpoints hold besides tensors and builtins."""
    import codecs

    import numpy as np
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    np_core = getattr(np, "_core", None) or np.core
    out = [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address,  # DeepSpeed model/optimizer states
           np_core.multiarray._reconstruct, np.ndarray, np.dtype, codecs.encode]  # accelerate's RNG states
    out += [getattr(np.dtypes, n) for n in ("UInt32DType", "Float64DType", "Int64DType") if hasattr(np, "dtypes")]
    return out


@contextlib.contextmanager
def safe_loading() -> Iterator[None]:
    """Within the block, ``torch.load`` is weights-only with :func:`allowed_globals` (whatever a caller passes)."""
    with _LOCK:
        original, allowed = torch.load, allowed_globals()

        def load(f: Any, *args: Any, **kwargs: Any) -> Any:
            kwargs["weights_only"] = True
            with torch.serialization.safe_globals(allowed):
                try:
                    return original(f, *args, **kwargs)
                except pickle.UnpicklingError as exc:
                    found = re.search(r"GLOBAL (\S+)", str(exc))
                    raise UnsafeCheckpointError(
                        f"refused to load checkpoint file {f}: it needs the global "
                        f"{found.group(1) if found else '(see below)'}, which is outside vitforge's allow-list, so "
                        f"unpickling it could run code. Do not resume from a store you do not control; if the file "
                        f"is yours, report the type named. torch: {str(exc)[:300]}") from None

        torch.load = load
        try:
            yield
        finally:
            torch.load = original
