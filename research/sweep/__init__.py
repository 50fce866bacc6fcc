"""Hyperparameter sweeps over `research.train`: `python -m research.sweep run|status|collect`.

* `spec`: the gin-syntax sweep file and --grid/--zip/--random flags, expanded into trials.
* `launchers`: how a trial runs: `local` subprocess, every worker of a Cloud TPU VM slice
  (`tpu-vm`), or a SLURM batch job (`slurm`).
* `runner`: runs/resumes trials and keeps ROOT/sweep.json and ROOT/<trial>/trial.json.
* `collect`: gathers the trials' results.
"""

from research.sweep.spec import SweepError, SweepSpec, Trial, apply_cli, expand, load_sweep_file

__all__ = ["SweepError", "SweepSpec", "Trial", "apply_cli", "expand", "load_sweep_file"]
