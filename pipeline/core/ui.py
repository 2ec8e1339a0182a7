"""Terminal output: human text and progress on stderr, one JSON object on stdout with --json.

Stages never print directly; they return a result object with ``summary()``
(JSON-safe dict) and ``table()`` (rows for the closing summary table).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol, TypeVar

from rich.cells import cell_len
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

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


def short_path(value: str) -> str:
    """A value that is one absolute path, shown relative to the working folder (or ~) when under it: the part that
    tells one run's files from another's, and still a path the user can paste from where they ran the command."""
    if not os.path.isabs(value) or any(ch.isspace() for ch in value):
        return value
    for base, shown in ((Path.cwd(), "."), (Path.home(), "~")):
        try:
            rel = Path(value).relative_to(base)
        except ValueError:
            continue
        return str(Path(shown) / rel)
    return value


def render_table(title: str, rows: list[tuple[str, str]]) -> None:
    """Key/value rows without borders, within the terminal's width: a value too long for its column (a long path,
    the `medxfer ui` command) goes after the table, its key on one line and the value unbroken on the next, instead
    of being wrapped mid-path inside a cell (which breaks copying it)."""
    shown = [(k, short_path(v)) for k, v in rows]
    key_width = max((cell_len(k) for k, _ in shown), default=0)
    room = console.width - key_width - 2  # the two columns' padding
    # Text, not markup: values hold [brackets] (CIs, series descriptions) that markup would eat.
    fits = [cell_len(v) <= room and "\n" not in v for _, v in shown]
    table = Table(title=title, show_header=False, title_justify="left", box=None, pad_edge=False, padding=(0, 1))
    table.add_column(style="bold", no_wrap=True)
    table.add_column()
    for (k, v), ok in zip(shown, fits, strict=True):
        if ok:
            table.add_row(k, Text(v))
    console.print(table)
    for (k, v), ok in zip(shown, fits, strict=True):
        if not ok:
            console.print(Text(f"{k}:", style="bold"))
            console.print(Text(f"  {v}"), soft_wrap=True)


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
