"""Terminal output: human text and progress on stderr, one JSON object on stdout with --json.

Stages never print directly; they return a result object with ``summary()``
(JSON-safe dict) and ``table()`` (rows for the closing summary table).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Iterator
from typing import Any, Protocol, TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

console = Console(stderr=True, highlight=False)
T = TypeVar("T")


class StageResult(Protocol):
    def summary(self) -> dict[str, Any]: ...
    def table(self) -> tuple[str, list[tuple[str, str]]]: ...


def is_tty() -> bool:
    return sys.stderr.isatty()


def progress(items: Iterable[T], total: int | None, description: str, enabled: bool = True) -> Iterator[T]:
    """A progress bar on a TTY; on a pipe or in CI, nothing per item (stages log their own summary lines)."""
    if not enabled or not is_tty():
        yield from items
        return
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task(description, total=total)
        for item in items:
            yield item
            bar.advance(task)


def render_table(title: str, rows: list[tuple[str, str]]) -> None:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for k, v in rows:
        table.add_row(k, v)
    console.print(table)


def finish(result: StageResult, as_json: bool) -> None:
    title, rows = result.table()
    render_table(title, rows)
    if as_json:
        sys.stdout.write(json.dumps(result.summary(), default=str) + "\n")
        sys.stdout.flush()


def info(msg: str) -> None:
    console.print(msg)


def warn(msg: str) -> None:
    console.print(f"[yellow]warning:[/yellow] {msg}")
