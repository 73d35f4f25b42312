"""Runs `ssl-kit` with a fault injected (used by the reliability tests as a subprocess, never by users).

    python tests/reliability/fault_worker.py MODE MARKER -- <ssl-kit arguments>

MODE:
  none        no fault
  checkpoint  the second checkpoint write stops half-way through the temp file: MARKER is created, then it sleeps
              (the test SIGKILLs it there: mid-checkpoint-write)
  eval        an evaluation stage starts, MARKER is created, then it sleeps (killed mid-eval)
  rank1       rank 1 of a torchrun job raises at its 3rd training step (distributed fault propagation)
"""
from __future__ import annotations

import io
import os
import sys
import time
from pathlib import Path


def _install(mode: str, marker: Path) -> None:
    if mode == "checkpoint":
        import torch

        from ssl_kit.engine import checkpoint

        real_save, calls = torch.save, []

        def half_written_save(obj, handle, *args, **kwargs):
            calls.append(1)
            if len(calls) < 2 or not hasattr(handle, "write"):
                return real_save(obj, handle, *args, **kwargs)
            buffer = io.BytesIO()
            real_save(obj, buffer)
            handle.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            handle.flush()
            marker.touch()
            time.sleep(600)

        checkpoint.torch.save = half_written_save
    elif mode == "eval":
        from ssl_kit.eval import stages

        def slow_eval(*args, **kwargs):
            marker.touch()
            time.sleep(600)

        stages.run_eval_stage = slow_eval
    elif mode == "rank1":
        from ssl_kit.engine.trainer import Trainer

        real_step = Trainer._train_step

        def faulty_step(self):
            if os.environ.get("RANK") == "1" and self.step == 3:
                raise RuntimeError("injected fault on rank 1 at step 3")
            return real_step(self)

        Trainer._train_step = faulty_step


if __name__ == "__main__":
    mode, marker, separator, *rest = sys.argv[1:]
    assert separator == "--"
    _install(mode, Path(marker))
    from ssl_kit.cli import main

    sys.exit(main(rest))
