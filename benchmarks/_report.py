"""What the benchmark scripts share: timing repeats and writing their section of a Markdown file."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

HARNESS = Path(__file__).with_name("harness.py")


def timed(fn: Callable[[], object], repeats: int, warmup: int = 0) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``fn``, after ``warmup`` untimed ones.

    :param fn: the work to time.
    :param repeats: timed calls.
    :param warmup: calls made first and not timed.
    """
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def spread(values: list[float]) -> str:
    """``mean (min-max)`` of ``values``, two decimals: how the tables give results over seeds.

    :param values: one figure per run.
    """
    return f"{statistics.mean(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def write_section(path: str | Path, name: str, text: str, title: str | None = None) -> None:
    """Replace the text between ``<!-- name:begin -->`` and ``<!-- name:end -->`` in a file.

    :param path: the Markdown file.
    :param name: the section's marker name.
    :param text: the new content.
    :param title: a heading to append the section under when the file has no markers yet
        (None: the markers must exist).
    """
    doc = Path(path)
    body = doc.read_text()
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    if begin in body and end in body:
        head, rest = body.split(begin, 1)
        body = head + begin + "\n" + text + "\n" + end + rest.split(end, 1)[1]
    elif title is not None:
        body += f"\n## {title}\n\n{begin}\n{text}\n{end}\n"
    else:
        raise ValueError(f"{path} has no {begin} ... {end} section")
    doc.write_text(body)


def publish(text: str, path: str | Path | None, name: str) -> None:
    """Print a script's result and, if ``path`` is given, write it into its section there.

    :param text: the result (Markdown).
    :param path: the Markdown file (``--write``), or None.
    :param name: the section's marker name.
    """
    print(text)
    if path:
        write_section(path, name, text)


def harness_row(args: list[str]) -> dict:
    """Run ``benchmarks/harness.py`` with ``args`` in its own process; its first result row.

    :param args: the harness's command-line arguments (``--out`` is added).
    """
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, str(HARNESS), *args, "--out", out]
        subprocess.run(cmd, check=True, capture_output=True)
        return json.loads((Path(out) / "results.json").read_text())["rows"][0]
