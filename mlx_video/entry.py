"""The `mlxvid` executable: imports the command line inside the Ctrl-C handling, so that an interruption while
the modules load (the first fraction of a second) is "interrupted", exit status 130, not a traceback. Without a
terminal (a log file), progress bars print a line every few seconds, not one per tensor or step: tqdm reads its
defaults from TQDM_* variables when it is first imported, which is after this."""

from __future__ import annotations

import os
import sys

LOG_PROGRESS_SECONDS = 5


def main(argv=None) -> None:
    if not sys.stderr.isatty():
        os.environ.setdefault("TQDM_MININTERVAL", str(LOG_PROGRESS_SECONDS))
    try:
        from .cli import main as run
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.exit(130)
    run(argv)


if __name__ == "__main__":
    main()
