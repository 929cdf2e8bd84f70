"""Progress for every step a user waits for, on stderr so stdout keeps the summary.

On a terminal: rich bars. When stderr is not a terminal (a pipe, a log file, CI): plain lines, one when a stage
starts and when it ends, and for step tasks (layers, evaluation batches) one per step with elapsed time and ETA,
e.g. ``compressing layers: 3/30, elapsed 25s, ETA 3m45s``. TEAL_QUANT_QUIET=1 silences both.

Each task says how it shows in plain mode with ``add_task(..., plain=...)``: "stage" (default: a start and a done
line), "steps" (a line per advance) or None (nothing: inner tasks such as one layer's greedy search).
"""

from __future__ import annotations

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

# Piped output (logs, CI) gets wide tables instead of rich's 80-column default, which wraps the headers.
console = Console(width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True)


def duration(seconds: float) -> str:
    """45s, 3m05s, 1h02m."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def plain_line(text: str) -> None:
    """One line on stderr, flushed (readable in a pipe as it happens)."""
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


class Progress(_RichProgress):
    """rich Progress with the project's columns on a terminal; plain lines when stderr is not one; silent when
    TEAL_QUANT_QUIET=1."""

    def __init__(self) -> None:
        quiet = os.environ.get("TEAL_QUANT_QUIET") == "1"
        self.plain = not quiet and not sys.stderr.isatty()
        self._plain_tasks: dict[TaskID, tuple[str | None, float]] = {}
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

    def add_task(self, description: str, *args, plain: str | None = "stage", **kwargs) -> TaskID:
        task = super().add_task(description, *args, **kwargs)
        if self.plain:
            self._plain_tasks[task] = (plain, time.monotonic())
            if plain == "stage":
                plain_line(f"{description} ...")
            elif plain == "steps" and self._tasks[task].total:
                plain_line(f"{description}: 0/{self._tasks[task].total:g}")
        return task

    def advance(self, task_id: TaskID, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._plain_report(task_id, step=True)

    def update(self, task_id: TaskID, **kwargs) -> None:
        super().update(task_id, **kwargs)
        self._plain_report(task_id, step=False)

    def _plain_report(self, task_id: TaskID, *, step: bool) -> None:
        if not self.plain or task_id not in self._plain_tasks or task_id in self._plain_done:
            return
        kind, start = self._plain_tasks[task_id]
        task = self._tasks[task_id]
        elapsed = time.monotonic() - start
        finished = task.total is not None and task.completed >= task.total
        if kind == "steps" and step:
            line = f"{task.description}: {task.completed:g}/{task.total:g}, elapsed {duration(elapsed)}"
            if not finished and task.completed > 0:
                line += f", ETA {duration(elapsed / task.completed * (task.total - task.completed))}"
            plain_line(line)
        elif kind == "stage" and finished:
            plain_line(f"{task.description}: done in {duration(elapsed)}")
        if finished:
            self._plain_done.add(task_id)
