"""What every command line does before its work (imported by absl programs only, never by the
library)."""
from absl import app
from absl import flags
from absl import logging


def quiet_library_logs() -> None:
  """Library INFO records (orbax's per checkpoint, pylibjpeg's per tile) would bury the progress
  and the tables: WARNING and above only, unless ``--verbosity`` was given."""
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)


def begin(argv) -> None:
  """A command without positional arguments: refuses any, then quiets the libraries' logs."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  quiet_library_logs()
