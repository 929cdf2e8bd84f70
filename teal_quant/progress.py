"""Progress bars for every step a user waits for (rich, on stderr so stdout keeps the summary).

Library calls draw nothing unless asked: bars are shown only inside `show_progress()` (the CLI turns it on unless
--quiet; `teal_quant.compress(..., progress=True)` turns it on for one call).
"""

from __future__ import annotations

import contextlib
import contextvars
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

_enabled: contextvars.ContextVar[bool] = contextvars.ContextVar("teal_quant_progress", default=False)


def progress_enabled() -> bool:
    return _enabled.get()


@contextlib.contextmanager
def show_progress(enabled: bool = True):
    """Draw progress bars for the library calls made inside this block (nested blocks may turn them off again)."""
    token = _enabled.set(enabled)
    try:
        yield
    finally:
        _enabled.reset(token)


class Progress(_RichProgress):
    """rich Progress with the project's columns; silent outside `show_progress()`, when TEAL_QUANT_QUIET=1, or when
    stderr is not a terminal and CI is set (progress redraws would flood CI logs)."""

    def __init__(self) -> None:
        quiet = (not _enabled.get() or os.environ.get("TEAL_QUANT_QUIET") == "1"
                 or (os.environ.get("CI") and not sys.stderr.isatty()))
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
