"""The mistakes in a user's input that checkpoint code reports.

All are `research.errors.ConfigError`s, so the CLIs end with one `error:` line (exit code 2)
that names the culprit and the fix. Each also subclasses the builtin exception a caller of
the plain-Python API would expect (FileNotFoundError, FileExistsError, KeyError, ValueError):

  ConfigError
    CheckpointNotFoundError   a path (INIT_CHECKPOINT, --from, --from_hf) holds no checkpoint,
                              or lacks a file the checkpoint needs        (+ FileNotFoundError)
    OutputExistsError         a converter's output already holds one       (+ FileExistsError)
    CheckpointMismatchError   a checkpoint does not fit the model: shapes, vocab size
      MissingParameterError   ... a parameter the assignment map names    (+ KeyError)
    UnknownMetricError        train.best_metric is not an eval metric       (+ KeyError)
    ConversionError           a Hugging Face checkpoint or config the converter cannot translate
"""

from __future__ import annotations

from research.errors import ConfigError


class _PlainMessage:
    """KeyError prints its message quoted (repr); these print it as written."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class CheckpointNotFoundError(ConfigError, FileNotFoundError):
    """A path that should hold a checkpoint (ours or Hugging Face) does not, or lacks a file."""


class OutputExistsError(ConfigError, FileExistsError):
    """The output directory already holds a checkpoint and --overwrite was not given."""


class CheckpointMismatchError(ConfigError):
    """The checkpoint does not fit the model being initialised (shapes, vocab size)."""


class MissingParameterError(_PlainMessage, CheckpointMismatchError, KeyError):
    """The assignment map names a parameter the checkpoint does not have."""


class UnknownMetricError(_PlainMessage, ConfigError, KeyError):
    """train.best_metric names a metric the evaluation does not produce."""


class ConversionError(ConfigError):
    """A Hugging Face checkpoint or config this converter cannot translate (the message says
    why and how to proceed)."""
