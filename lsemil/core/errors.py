"""User-facing errors: one base class that every `lsemil` command prints as one line.

`lsemil.commands.cli` catches `UserError` (and only it) and prints `lsemil <command>: <message>`
with exit status `EXIT_USER_ERROR`; anything else is a bug and propagates with its traceback.
Every message names the file, folder or config field at fault.
"""

from __future__ import annotations

EXIT_USER_ERROR = 1  # bad data, image, config, checkpoint or output
EXIT_USAGE = 2  # bad command-line arguments (argparse's own code)
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped by SIGTERM / SIGINT after saving; rerun to resume


class UserError(Exception):
  """A problem with what the user gave us (not a bug); the message names what is wrong."""


class DataError(UserError, ValueError):
  """Bad dataset input; the message names the file and line (or field)."""


class ImageError(DataError):
  """An image file that is missing, truncated, corrupt or of an unsupported kind."""


class PrepareError(DataError):
  """A bad input image (the message names the file) or an inconsistent output folder."""


class DataWarning(UserWarning):
  """An anomaly in a dataset that leaves it usable (counted, not fatal)."""


class ConfigError(UserError, ValueError):
  """A config the model or trainer cannot use; the message names the field."""


class CheckpointError(UserError):
  """A missing or unreadable checkpoint or workdir; the message names the path."""


class NonFiniteLossError(UserError, FloatingPointError):
  """Training produced a NaN/inf loss; the message names the step and the last checkpoint."""


class WorkdirBusyError(UserError):
  """Another `lsemil train` holds the workdir; the message names the workdir and holder."""


class OutputError(UserError):
  """An output that cannot be written, or an input result file that cannot be read."""


class Interrupted(UserError):
  """Training stopped by SIGTERM / SIGINT after saving a checkpoint; rerun to resume."""

  exit_code = EXIT_PREEMPTED
