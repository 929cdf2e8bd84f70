"""Progress bars for every step a user waits for (rich, on stderr so stdout keeps the summary)."""

from __future__ import annotations

import os
import sys

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.progress import Progress as _RichProgress

# Piped output (logs, CI) gets wide tables instead of rich's 80-column default, which wraps the headers.
console = Console(width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True)


class Progress(_RichProgress):
    """rich Progress with the project's columns; silent when TEAL_QUANT_QUIET=1 or stderr is not a terminal
    and CI is set (progress redraws would flood CI logs)."""

    def __init__(self) -> None:
        quiet = os.environ.get("TEAL_QUANT_QUIET") == "1" or (os.environ.get("CI") and not sys.stderr.isatty())
        super().__init__(
            SpinnerColumn(),
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=err_console,
            transient=False,
            disable=bool(quiet),
        )

    def __exit__(self, exc_type, exc_val, exc_tb) -> None:
        # On a failure with stderr not a terminal (a log, CI, a pipe), leave no bar behind: the error is then the
        # only line on stderr. A terminal keeps the bar (it is redrawn in place, not appended).
        if exc_type is not None and not err_console.is_terminal:
            self.live.transient = True
        super().__exit__(exc_type, exc_val, exc_tb)

    def stop(self) -> None:
        # rich's Progress.stop() ends a non-interactive console's output with a blank line; a log needs none.
        self.live.stop()
