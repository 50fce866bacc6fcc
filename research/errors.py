"""The exceptions that end a command with one `error:` line instead of a traceback.

A traceback means a bug in the framework. These mean the user's input or the run's state needs
attention, and their message names the culprit and the fix:

  UserError (exit 2)          a mistake in the user's input: config, flags, paths, data,
    ConfigError                 tokenizer, checkpoint or workdir
    InvalidConfigError        a run-config field (train.*, e.g. a macro) of the wrong type or range
    WorkdirLockedError        the --workdir is in use by another run
    ConfigMismatchError       the --workdir holds a different run
  RunStoppedError (exit 1)    a run stopped to protect its work
    NonFiniteError            NaN/Inf loss or gradient (train.on_nonfinite='stop')
    CheckpointSaveError       a checkpoint could not be written; earlier ones are intact
    HangError (exit 75)       a step, eval or checkpoint save/restore ran past
                              train.hang_timeout_s (research/training/watchdog.py); a scheduler
                              or research.sweep (reason `hang`) reruns it and it resumes
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input; the message says what is wrong and how to fix it."""

    exit_code = 2


class ConfigError(UserError, ValueError):
    """A config value, flag, path or file the run cannot use."""


class InvalidConfigError(ConfigError, TypeError):
    """A run-config field (train.*, e.g. a macro) has the wrong type or range."""


class WorkdirLockedError(UserError):
    """--workdir is in use by another training run."""


class ConfigMismatchError(UserError):
    """--workdir already holds a run with a different config or tokenizer."""


class RunStoppedError(RuntimeError):
    """A run stopped to protect its work; the message says how to continue."""

    exit_code = 1


class NonFiniteError(RunStoppedError):
    """A NaN/Inf loss or gradient with train.on_nonfinite='stop'."""


class CheckpointSaveError(RunStoppedError):
    """A checkpoint could not be written (disk full, I/O error); earlier ones are intact."""


class HangError(RunStoppedError):
    """A phase of training ran past train.hang_timeout_s. The watchdog thread prints it and
    exits with `exit_code` itself (os._exit: the stuck main thread cannot raise); 75 is
    EX_TEMPFAIL, "try again", and research.sweep records such a trial as failed, reason hang."""

    exit_code = 75


# The errors the CLIs turn into one `error:` line (everything else is a bug: traceback).
EXPECTED = (UserError, RunStoppedError)
