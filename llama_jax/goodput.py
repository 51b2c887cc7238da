"""Where a training run's wall time goes, and profiler traces of chosen steps.

Goodput is the share of wall time spent in training steps. The rest is counted by cause, as the
loop sees it: start-up (data, the model's state, restoring a checkpoint), compilation (the first
step, which compiles), data (fetching batches), checkpoints (the time the loop waits on a save)
and evaluation. What remains of the wall time is the steps'.
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path

import jax

LOSSES = ("startup", "compile", "data", "checkpoint", "eval")


class Goodput:
    """Seconds lost to each cause since the clock started (at the run's start)."""

    def __init__(self):
        self.started = time.perf_counter()
        self.lost = dict.fromkeys(LOSSES, 0.0)

    @contextlib.contextmanager
    def losing(self, cause: str):
        """Counts the time inside the block as lost to `cause`."""
        began = time.perf_counter()
        try:
            yield
        finally:
            self.lost[cause] += time.perf_counter() - began

    def add(self, cause: str, seconds: float) -> None:
        self.lost[cause] += seconds

    def report(self) -> dict[str, float]:
        """goodput, wall_s and lost_CAUSE_s for each cause (all since the clock started)."""
        wall = max(time.perf_counter() - self.started, 1e-9)
        stepping = max(wall - sum(self.lost.values()), 0.0)
        return {
            "goodput": stepping / wall,
            "wall_s": wall,
            **{f"lost_{cause}_s": seconds for cause, seconds in self.lost.items()},
        }


class StepTrace:
    """A JAX profiler trace of the steps after `a` up to `b` (`train.profile_steps="a:b"`), written
    under WORKDIR/plugins/profile/ where TensorBoard's profile plugin finds it, with a Perfetto
    trace (*.trace.json.gz) beside it."""

    def __init__(self, steps: tuple[int, int] | None, workdir: Path, say=None):
        self.steps, self.workdir = steps, Path(workdir)
        self.say = say or (lambda message: print(message, file=sys.stderr))
        self.active, self.first, self.done = False, 0, 0

    def before(self, step: int) -> None:
        """Called before step index `step` (0-based: it ends at step + 1) runs."""
        if self.steps is None or self.active:
            return
        a, b = self.steps
        if a <= step < b:
            jax.profiler.start_trace(str(self.workdir), create_perfetto_trace=True)
            self.active, self.first = True, step

    def after(self, done: int, state) -> None:
        """Called after the step that ends at `done`; stops the trace at step b."""
        self.done = done
        if self.active and done >= self.steps[1]:
            self.stop(state)

    def stop(self, state=None) -> None:
        """Ends the trace (if one is on), first waiting for `state`'s device work."""
        if not self.active:
            return
        if state is not None:
            jax.block_until_ready(state)  # the traced steps' device work, not only their dispatch
        jax.profiler.stop_trace()
        self.active = False
        self.say(
            f"profile of steps {self.first + 1} to {self.done}: {self.workdir / 'plugins' / 'profile'} "
            f"(tensorboard --logdir {self.workdir}, or the .trace.json.gz in ui.perfetto.dev)"
        )
