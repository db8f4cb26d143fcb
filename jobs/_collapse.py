"""Telling a self-distillation run that it has collapsed, while it runs.

DINO-style losses have two ways to stop teaching anything and still look like training (Caron et al.
2021, section 5.3): **uniform** collapse, where the centred, sharpened teacher gives every sample
the same flat target (its entropy is ``ln K``, the loss sits at ``ln K``: every image gets the same
output, and centering turns it into uniform targets), and **one-prototype** collapse, where every
sample's target is the same peak (the entropy of the batch's mean target is ~0). Both are stable:
once in, a run does not come out, and the official code says nothing.

:class:`CollapseWatch` reads the two entropies the loss measured on the step's targets
(:func:`jobs._dino_loss.target_entropies`) and, when one of the two conditions has held for
``patience`` consecutive steps, returns a warning once per condition, saying what it means and what to
change. On small or homogeneous data (a few thousand similar low-resolution images) the default
multi-crop views leave a random encoder nothing to match from one view to another, and the student's
CLS output becomes the same for every image within the first few dozen steps (Sinkhorn-Knopp
centering included); on the generated shapes set weaker views let the loss leave ``ln K``. A run that
collapses may have learnt first: on the 16 px digits, DINO with a one-layer head gains 7-15 teacher CLS kNN
points over its initialisation (``tests/test_learning_signal.py``) although its targets turn uniform
after about 110 of its 220 steps (the warning comes at step 112-113): the warning says the loss has
stopped carrying signal, not that nothing was learnt before.
"""

from __future__ import annotations

import math

UNIFORM = 0.99  # per-sample target entropy >= this fraction of ln K: uniform collapse
ONE_PROTOTYPE = 0.02  # entropy of the batch's mean target <= this fraction of ln K: one-prototype collapse
PATIENCE = 50  # consecutive steps before a warning


class CollapseWatch:
    """``observe(step, stats)`` per step -> a warning text the first time a collapse has lasted
    ``patience`` steps (None otherwise). ``what`` names the targets ("CLS", "patch")."""

    def __init__(self, stage: str, what: str, prototypes: int, patience: int = PATIENCE) -> None:
        self.stage, self.what, self.k, self.patience = stage, what, prototypes, patience
        self.log_k = math.log(prototypes)
        self.state: str | None = None
        self.run = 0
        self.warned: set[str] = set()

    def observe(self, step: int, stats: tuple[float, float] | None) -> str | None:
        if stats is None:  # no targets this step (e.g. no masked token): neither in nor out of a collapse
            return None
        entropy, batch_entropy = stats
        state = ("uniform" if entropy >= UNIFORM * self.log_k else
                 "one-prototype" if batch_entropy <= ONE_PROTOTYPE * self.log_k else None)
        self.run = self.run + 1 if state == self.state else 1
        self.state = state
        if state is None or self.run < self.patience or state in self.warned:
            return None
        self.warned.add(state)
        return self._message(state, step + 1, entropy, batch_entropy)

    def _message(self, state: str, steps: int, entropy: float, batch_entropy: float) -> str:
        head = (f"stage {self.stage}: {state} collapse of the {self.what} loss at step {steps}: for "
                f"{self.patience} steps ")
        if state == "uniform":
            return head + (
                f"the teacher's {self.what} targets have been uniform over the {self.k} prototypes (entropy "
                f"{entropy:.4f} of ln K = {self.log_k:.4f}): the teacher gives every sample (almost) the same output, "
                f"the loss sits at ln K and carries almost no signal. On small or homogeneous data the default views "
                f"leave a random encoder nothing to match between crops: weaken them (global_scale: [0.8, 1.0], "
                f"local_crops: 0, views: {{color_jitter_p: 0, grayscale_p: 0, blur_p: [0, 0, 0], solarize_p: 0}}); "
                f"training goes on.")
        return head + (
            f"every sample's {self.what} target has pointed at the same prototype (entropy of the batch's mean "
            f"target {batch_entropy:.4f} nats, of at most ln K = {self.log_k:.4f}), so the loss teaches nothing. "
            f"Try centering: sinkhorn (DINOv2), a higher teacher_temp, or faster centering (a lower "
            f"center_momentum, e.g. 0.8); training goes on.")
