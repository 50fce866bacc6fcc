"""The one error path of every command-line entry point, and the argument checks they share.

Each CLI's `main` is decorated with `@cli.entry_point`, which turns the exceptions that mean
"the user's input or the run's state needs attention" into one `error:` line on stderr and an
exit code, without a traceback:

  research.errors.UserError        exit 2   a mistake in the input (config, flags, paths,
                                            data, tokenizer, checkpoint, workdir); the message
                                            names the culprit and the fix
  research.errors.RunStoppedError  exit 1   the run stopped to protect its work

Anything else keeps its traceback: that is a bug in the framework. `main()` returns the exit
code (`sys.exit(main())` in `__main__`; tests call `main([...])` and check it). Flag mistakes
caught by argparse print the usage and one `error:` line too (`ArgumentParser`).
"""

from __future__ import annotations

import argparse
import functools
import sys
from typing import Callable, NoReturn

from research import storage
from research.errors import EXPECTED, ConfigError

# gin appends where a configurable was called to the message of any error raised inside it.
_GIN_CALL_NOTE = "\n  In call to configurable"


def error_text(err: BaseException) -> str:
    """The message of an expected error as the user should read it (gin's call note dropped)."""
    return str(err).split(_GIN_CALL_NOTE)[0].strip()


def entry_point(main: Callable[..., int | None]) -> Callable[..., int]:
    """Wraps a CLI's `main(argv=None)`: returns its exit code (None counts as 0), or prints
    one `error:` line and returns the error's exit code (2 or 1) for a research.errors one."""

    @functools.wraps(main)
    def wrapped(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs) or 0
        except EXPECTED as err:
            sys.stdout.flush()
            print(f"error: {error_text(err)}", file=sys.stderr, flush=True)
            return err.exit_code

    return wrapped


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage mistakes (unknown flag, missing or malformed value) end like every
    other input mistake: exit code 2 and one line `error: ...` (after the usage)."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(ConfigError.exit_code,
                  f"error: {message} (`{self.prog} --help` lists the flags).\n")


def check_output_dir(path: str, flag: str, given: str | None = None) -> None:
    """ConfigError unless `path` is a directory or can be created as one (its nearest existing
    ancestor is a writable directory). Run before any work, so a bad path costs nothing.

    `flag` names the flag in the message; `given` is its value when `path` is derived from it
    (the directory of an output prefix), else the value is `path`."""
    storage.check_writable(path, flag, given)
