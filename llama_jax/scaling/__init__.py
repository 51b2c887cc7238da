"""Scaling laws as in Llama 3: IsoFLOP sweeps, compute-optimal fits and downstream prediction.

    python -m llama_jax.scaling {plan,run,fit,predict} --help

- `plan.py`: the FLOPs model (6N + 12 L H Q T per token) and the IsoFLOP planner.
- `sweep.py`: run a plan (resumable) and read each run's final validation loss.
- `fit.py`: per-budget parabolas in log tokens, the power law D*(C) = A C^alpha, bootstrap.
- `downstream.py`: task NLL against log FLOPs (linear), accuracy against NLL (sigmoid).
- `plots.py`, `report.py`: figures and tables; `cli.py`: the command line.

The submodules are not imported here, so that `predict` starts without loading JAX.
"""


class ScalingError(ValueError):
    """Input a scaling-law computation cannot use; the message is one sentence for the user."""
