"""Progress for every step a user waits for.

Library calls show nothing unless asked: progress appears only inside `show_progress()` (the CLI turns it on unless
--quiet; `teal_quant.compress(..., progress=True)` for one call); TEAL_QUANT_QUIET=1 silences it everywhere.
On a terminal: rich bars on stderr. When stdout is not a terminal (a pipe, a log file, CI): plain lines on stdout,
one when a stage starts and when it ends, and for step tasks (layers, evaluation batches) one per step with elapsed
time and ETA, e.g. ``compressing layers: 3/30, elapsed 25s, ETA 3m45s``; stderr then carries nothing but errors, so
a failing run's stderr is exactly its one error line.

Each task says how it shows in plain mode with ``add_task(..., plain=...)``: "stage" (default: a start and a done
line), "steps" (a line per advance) or None (nothing: inner tasks such as one layer's greedy search).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import sys
import time

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.progress import Progress as _RichProgress

from teal_quant.distributed import env_rank

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


def duration(seconds: float) -> str:
    """45s, 3m05s, 1h02m."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def plain_line(text: str) -> None:
    """One line on stdout, flushed (readable in a pipe as it happens)."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


class Progress(_RichProgress):
    """rich Progress with the project's columns on a terminal; plain lines on stdout when it is not one; silent
    outside `show_progress()` or when TEAL_QUANT_QUIET=1."""

    def __init__(self) -> None:
        # torchrun: only rank 0 of a job shows progress (the other ranks run the same steps)
        quiet = not _enabled.get() or os.environ.get("TEAL_QUANT_QUIET") == "1" or env_rank() != 0
        self.plain = not quiet and not (sys.stdout.isatty() and sys.stderr.isatty())
        self._plain_tasks: dict[TaskID, tuple[str | None, float, float]] = {}
        self._plain_done: set[TaskID] = set()
        super().__init__(
            SpinnerColumn(),
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=err_console,
            transient=False,
            disable=quiet or self.plain,
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

    def add_task(self, description: str, *args, plain: str | None = "stage", **kwargs) -> TaskID:
        task = super().add_task(description, *args, **kwargs)
        if self.plain:
            done = self._tasks[task].completed
            self._plain_tasks[task] = (plain, time.monotonic(), done)
            if plain == "stage":
                plain_line(f"{description} ...")
            elif plain == "steps" and self._tasks[task].total:
                plain_line(f"{description}: {done:g}/{self._tasks[task].total:g}")
        return task

    def advance(self, task_id: TaskID, advance: float = 1, note: str | None = None) -> None:
        """Advance a task; `note` (e.g. one layer's time and error) ends its plain line, or is printed above the bars
        on a terminal."""
        super().advance(task_id, advance)
        self._plain_report(task_id, step=True, note=note)
        if note and not self.plain and not self.disable:
            self.console.print(f"[dim]{self._tasks[task_id].description}: {note}[/dim]")

    def update(self, task_id: TaskID, **kwargs) -> None:
        super().update(task_id, **kwargs)
        self._plain_report(task_id, step=False)

    def _plain_report(self, task_id: TaskID, *, step: bool, note: str | None = None) -> None:
        if not self.plain or task_id not in self._plain_tasks or task_id in self._plain_done:
            return
        kind, start, done_before = self._plain_tasks[task_id]
        task = self._tasks[task_id]
        elapsed = time.monotonic() - start
        finished = task.total is not None and task.completed >= task.total
        if kind == "steps" and step:
            line = f"{task.description}: {task.completed:g}/{task.total:g}, elapsed {duration(elapsed)}"
            if not finished and task.completed > done_before:  # the rate of this run (a resumed run starts later)
                line += f", ETA {duration(elapsed / (task.completed - done_before) * (task.total - task.completed))}"
            if note:
                line += f", {note}"
            plain_line(line)
        elif kind == "stage" and finished:
            plain_line(f"{task.description}: done in {duration(elapsed)}")
        if finished:
            self._plain_done.add(task_id)
