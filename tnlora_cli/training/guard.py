"""The divergence guard: a non-finite loss, gradient or adapter stops the run.

Every optimizer step checks the step's loss and the total gradient norm before the update.
The norm is the one the engine computes anyway (`Engine.gradient_norm`: the norm clipping
uses, computed once per step even when clipping is off; DeepSpeed's global norm), so the
gradients are walked once per step, and the check costs one host synchronisation per
optimizer step and none per micro-batch. Flags every process must agree on (a stop
requested by a signal, a checkpoint due by the clock) ride along in the same reduction.
Under fp16 the gradient scaler skips steps with overflowing gradients by design, so
gradients are not checked there. A checkpoint or final adapter is checked again before it
is written: nothing non-finite is ever published. The error names the step, the last finite
loss and the newest checkpoint.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..errors import DivergenceError
from ..run.layout import checkpoint_dirs


class DivergenceGuard:
    def __init__(self, run_dir: Path, accelerator, check_gradients: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.accelerator = accelerator
        self.check_gradients = check_gradients
        self.last_finite: tuple[int, float] | None = None
        self._loss = torch.zeros((), dtype=torch.float64)

    def add(self, loss: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        """A micro-batch's loss (accumulated until `check`, on the device: no host sync). A
        language-model batch whose labels are all masked (-100) has no loss at all (0/0), not
        a diverged one: skipped."""
        value = loss.detach().double()
        if labels is not None and labels.dim() > 1:
            value = torch.where((labels != -100).any(), value, torch.zeros_like(value))
        self._loss = self._loss.to(loss.device) + value

    def check(self, step: int, grad_norm: torch.Tensor | None, requests: tuple[bool, ...] = ()) -> tuple[bool, ...]:
        """Before optimizer step `step`: the loss and the gradient norm are finite, on all ranks.

        `grad_norm` is the engine's total gradient norm for this step (None: not checked).
        `requests` are this process's yes/no flags that every process must agree on; the
        result says, for each, whether any process raised it."""
        device = self._loss.device
        bad_loss = ~torch.isfinite(self._loss)
        if self.check_gradients and grad_norm is not None:
            bad_grad = ~torch.isfinite(grad_norm.detach().to(device, torch.float64))
        else:
            bad_grad = torch.zeros((), dtype=torch.bool, device=device)
        flags = torch.stack([bad_loss.double(), bad_grad.double(), *(torch.tensor(float(r), dtype=torch.float64, device=device) for r in requests)])
        if self.accelerator is not None and self.accelerator.num_processes > 1:
            flags = self.accelerator.reduce(flags.to(self.accelerator.device), reduction="sum")
        # The step's one host synchronisation: the reduced flags and this process's loss together.
        values = torch.cat([flags.to(device), self._loss.reshape(1)]).tolist()
        bad_loss_any, bad_grad_any, loss = bool(values[0]), bool(values[1]), values[-1]
        self._loss = torch.zeros((), dtype=torch.float64, device=device)
        if bad_loss_any:
            self._fail(step, f"the loss is {loss if not math.isfinite(loss) else 'non-finite on another process'}")
        if bad_grad_any:
            self._fail(step, "a gradient is not finite")
        self.last_finite = (step, loss)
        return tuple(bool(v) for v in values[2:-1])

    def optimizer_step(self, optimizer, step: int) -> None:
        """`optimizer.step()`; an update too large for fp32 (lr 1e38: AdamW's step size
        lr / (1 - beta1) overflows) is divergence, not a crash."""
        try:
            optimizer.step()
        except RuntimeError as exc:
            if "overflow" not in str(exc):
                raise
            self._fail(step, "the optimizer's update overflows float32 (the learning rate is far too large)")

    def check_state(self, step: int, state: dict[str, torch.Tensor], what: str) -> None:
        """Before writing `what`: every trained tensor is finite."""
        bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            self._fail(step, f"the {what} would hold non-finite values ({len(bad)} tensors, e.g. {bad[0]}); it was not written")

    def _fail(self, step: int, what: str) -> None:
        last = f"last finite loss {self.last_finite[1]:.4g} at step {self.last_finite[0]}" if self.last_finite else "no finite loss before it"
        checkpoints = checkpoint_dirs(self.run_dir)
        saved = f"last checkpoint: {checkpoints[-1]}" if checkpoints else "no checkpoint was saved"
        error = DivergenceError(
            f"training diverged at step {step}: {what} ({last}; {saved}); no adapter was published",
            hint="lower training.learning_rate (or set training.max_grad_norm), then start again with --overwrite"
            + (" or continue from the checkpoint with --resume auto" if checkpoints else ""),
        )
        error.summary = f"training diverged at step {step}: {what} ({last})"  # without the checkpoint, for `train` to complete
        raise error
