"""Hyperparameter sweeps over `research.train`: `python -m research.sweep run|status|collect`.

Defining a sweep:
* `spec`: SweepSpec (a sweep before expansion), Trial, SweepError.
* `sweep_file`: the gin-syntax sweep file; `cli_axes`: --grid/--zip/--random/--gin flags;
  `gin_values`: gin literals; `validate`: the checks both share; `expansion`: spec -> trials.
Running it:
* `launchers`: how a trial runs: `local` subprocess, every worker of a Cloud TPU VM slice
  (`tpu-vm`), or a SLURM batch job (`slurm`).
* `runner`: runs/resumes trials and keeps ROOT/sweep.json; `trial_state`: ROOT/<trial>/trial.json
  and what a trial's files say about its status; `trial_log`: train.log (staged locally and
  copied up when ROOT is on object storage); `status`: the `status` subcommand.
ROOT may be local or `gs://...`: every file goes through research/storage.py.
Reading the results (`collect`):
* `results`: reads the trials' files; `tables`: per-trial and seed-mean tables (pandas);
  `report`: Markdown/CSV text; `plots`: loss curves and the two-axis heatmap.
"""

from research.sweep.cli_axes import apply_cli
from research.sweep.expansion import expand
from research.sweep.spec import SweepError, SweepSpec, Trial
from research.sweep.sweep_file import load_sweep_file

__all__ = ["SweepError", "SweepSpec", "Trial", "apply_cli", "expand", "load_sweep_file"]
