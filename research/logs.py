"""Console output of the command-line entry points: what the user needs (the progress bar,
where things are written, results, real warnings), not the libraries' chatter.

`setup()` is the first call of every CLI's `main()`, before TensorFlow or TFDS do any work:

  TF_CPP_MIN_LOG_LEVEL=2   (unless set) hides the C++ INFO/WARNING lines of TensorFlow and
                           XLA (CPU instruction-set notes, oneDNN); their errors stay. It has to
                           be set before TensorFlow is imported (the data readers and the
                           TensorBoard writer import it later). TF_ENABLE_ONEDNN_OPTS is left
                           alone: its note is an INFO line, and the flag would change TF's math.
  python logging           one stderr handler: `HH:MM:SS message`, `HH:MM:SS WARNING: message`
                           for warnings and errors, written through tqdm so that a line never
                           tears the progress bar. Python `warnings` go through it too.
  library loggers          absl (TFDS, Orbax), jax, orbax, tensorflow, etils: WARNING and up.

TFDS's own chatter (its progress bars, the "Downloading and preparing dataset" banner, absl's
"Using custom data configuration") is silenced where the datasets are built:
research/data/local_builder.quiet_tfds. The run's `train:` bar is the one progress line.
"""

from __future__ import annotations

import logging
import os
import sys

from tqdm.auto import tqdm

TIME_FORMAT = "%H:%M:%S"
# Loggers whose INFO lines are the libraries' bookkeeping (checkpoint internals, dataset
# builders, compilation cache): only their warnings and errors are shown.
QUIET_LOGGERS = ("absl", "jax", "orbax", "tensorflow", "etils", "fsspec", "urllib3")


class _ConsoleFormatter(logging.Formatter):
    """`12:03:04 message` for INFO, `12:03:04 WARNING: message` from WARNING up."""

    def __init__(self) -> None:
        super().__init__(datefmt=TIME_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:
        level = f"{record.levelname}: " if record.levelno >= logging.WARNING else ""
        return f"{self.formatTime(record, self.datefmt)} {level}{record.message.rstrip()}"


class _TqdmHandler(logging.Handler):
    """Writes each record to the current `sys.stderr` (not the one of when it was made: a
    replaced stream, as test captures replace it, may be closed) with `tqdm.write`, which clears
    the progress bars on the stream, prints the line and redraws them."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging's contract: report, never raise
            self.handleError(record)


def setup(level: int = logging.INFO) -> None:
    """Quiets the libraries and installs the console log format (see the module docstring).
    Idempotent: a second call replaces the handler the first one installed."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    _install_console_handler(level)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    # off and on again: if something replaced `warnings.showwarning` since an earlier setup(),
    # logging would believe it still captures warnings and leave them alone
    logging.captureWarnings(False)
    logging.captureWarnings(True)


def _is_basic_config_handler(handler: logging.Handler) -> bool:
    """The stderr handler `logging.basicConfig()` installs, which absl's logging calls when it
    logs before anything configured logging (Orbax does at import): with ours every line would
    print twice, once as `INFO:root:...`."""
    return (type(handler) is logging.StreamHandler and handler.formatter is not None
            and handler.formatter._fmt == logging.BASIC_FORMAT)


def _install_console_handler(level: int) -> None:
    """Puts one _TqdmHandler on the root logger (replacing an earlier one of ours and a
    `basicConfig` one; handlers others installed, such as pytest's, stay)."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers
                    if isinstance(h, _TqdmHandler) or _is_basic_config_handler(h)]:
        root.removeHandler(handler)
    handler = _TqdmHandler()
    handler.setFormatter(_ConsoleFormatter())
    root.addHandler(handler)
    root.setLevel(level)

