"""train.compile: torch.compile of the student backbone or of a whole training step's forward, and what happens when
the compiler fails (stop with its error named, or train uncompiled when train.compile_fallback allows).

    compile: backbone   the method's student backbone: its forward is replaced by a compiled one on the instance
                        (state dict keys unchanged, so checkpoints and backbone.pt are those of an uncompiled run)
    compile: step       the module a micro-step calls (the method, or DDP around it): heads and loss are compiled
                        too; dynamo breaks the graph at collectives and host syncs

Compilation happens on the first call of each new input shape; a compiler failure there is caught, not a user
error inside the model: with the fallback the eager forward is restored and the same micro-batch runs again
uncompiled (with the random draws of the first step replayed, so such a run equals an uncompiled one), and a real
error in the model still surfaces, from eager code."""
from __future__ import annotations

import sys
from typing import Any, Callable

import torch
from torch import nn

from ..errors import TrainingError


def _compiler_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean 'the compiler failed' (dynamo, the backend, inductor's C++/Triton toolchain)."""
    from torch._dynamo.exc import TorchDynamoException  # deferred: imports the compiler stack

    return (TorchDynamoException,)


class CompiledForward:
    """What a micro-step calls: `model(batch, progress)` through torch.compile per train.compile.

    model: the method or DDP around it (what is called); method: the Method (its student_backbone() is compiled)."""

    def __init__(self, model: nn.Module, method: nn.Module, tc, stage_name: str) -> None:
        self.model, self.method, self.tc, self.stage_name = model, method, tc, stage_name
        self.target = tc.compile
        self._call: Callable[..., Any] = model
        self._first_call = True
        if self.target == "backbone":
            backbone = method.student_backbone()
            backbone.forward = torch.compile(backbone.forward, mode=self._mode(), backend=tc.compile_backend)
        elif self.target == "step":
            self._call = torch.compile(model, mode=self._mode(), backend=tc.compile_backend)

    def _mode(self):
        """compile_mode 'default' is torch.compile's mode=None (other backends than inductor take no mode)."""
        return None if self.tc.compile_mode == "default" else self.tc.compile_mode

    @property
    def active(self) -> bool:
        return self.target != "none"

    def __call__(self, batch, progress):
        if not self.active:
            return self.model(batch, progress)
        rng = self._rng_state() if self._first_call else None
        self._first_call = False
        try:
            return self._call(batch, progress)
        except _compiler_errors() as exc:
            if not self.tc.compile_fallback:
                raise TrainingError(
                    f"stages[{self.stage_name}].train.compile={self.target!r}: torch.compile (backend "
                    f"{self.tc.compile_backend!r}, mode {self.tc.compile_mode!r}) failed on this method's "
                    f"{'backbone' if self.target == 'backbone' else 'training step'}: "
                    f"{type(exc).__name__}: {str(exc).splitlines()[0][:400]}. Set train.compile=none, try "
                    f"train.compile=backbone, or set train.compile_fallback=true to train uncompiled") from exc
            self.disable(exc)
            if rng is not None:  # the first step replays its random draws: the run equals an uncompiled one
                self._set_rng_state(rng)
            return self.model(batch, progress)

    def _rng_state(self) -> tuple:
        """The CPU (and this CUDA device's) generator state, read only before the first compiled call: compilers
        fail there, and reading a CUDA generator's state every step would synchronise the device."""
        cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        return torch.get_rng_state(), cuda

    @staticmethod
    def _set_rng_state(state: tuple) -> None:
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1])

    def disable(self, reason: BaseException) -> None:
        """Back to the eager forward for the rest of the run, with a warning naming the compiler's error."""
        print(f"[ssl-kit] {self.stage_name}: train.compile={self.target!r} failed ({type(reason).__name__}: "
              f"{str(reason).splitlines()[0][:300]}); training continues uncompiled (train.compile_fallback=true)",
              file=sys.stderr, flush=True)
        if self.target == "backbone":
            self.method.student_backbone().__dict__.pop("forward", None)
        self.target, self._call = "none", self.model
