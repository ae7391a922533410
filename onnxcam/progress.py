"""The progress line of long runs (rich's, on stderr): done/total, images per second, time left."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator


@contextlib.contextmanager
def progress_bar(total: int, unit: str = "images") -> Iterator[Callable[[int], None]]:
    """Yields ``advance(count)``; the bar disappears when the block ends.

    rich is imported here, not at module level: its import time would otherwise be paid by every command, bar or
    not (benchmarks/startup.py times one photo's whole process).
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TimeRemainingColumn
    from rich.text import Text

    class Rate(ProgressColumn):
        def render(self, task: Task) -> Text:
            return Text(f"{task.speed:.1f} {unit}/s" if task.speed else "")

    columns = (BarColumn(), MofNCompleteColumn(), Rate(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(unit, total=total)
        yield lambda count: bar.advance(task, count)
