"""Helpers of ``run_all``: read the tables benchmarks print, describe the machine, draw charts.

The benchmark modules print fixed-width tables (label, then columns separated by two or
more spaces); :func:`parse_sections` turns that text back into rows, so ``run_all`` needs
no private API of theirs and each module stays runnable on its own.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

_NUM = re.compile(r"^[-+]?[\d,]*\.?\d+(?:e[-+]?\d+)?$", re.I)
_UNITS = (" us", " µs", " ms", " s", "x", "%")
_SPLIT = re.compile(r"\s{2,}")


def number(cell: str) -> float | None:
    """The number in a table cell (``"1,234"``, ``"1.85x"``, ``"232 us"``); None for ``-``."""
    text = cell.strip()
    for unit in _UNITS:
        if text.endswith(unit):
            text = text[: -len(unit)].strip()
            break
    text = text.replace(",", "")
    return float(text) if _NUM.match(text) else None


def _is_value(cell: str) -> bool:
    return cell.strip() == "-" or number(cell) is not None


@dataclass
class Section:
    """One printed table: its title line, column names and rows (label cells + values)."""

    title: str = ""
    header: list[str] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def row(self, *labels: str) -> list[str] | None:
        """The first row whose label cells start with *labels* (case-insensitive)."""
        want = [label.lower() for label in labels]
        for row in self.rows:
            if [c.lower() for c in row[: len(want)]] == want:
                return row
        return None

    def value(self, column: str, *labels: str) -> float | None:
        """The number in *column* of the row labelled *labels*."""
        row = self.row(*labels)
        if row is None or column not in self.header:
            return None
        index = self.header.index(column)
        return number(row[index]) if index < len(row) else None

    @property
    def label_columns(self) -> int:
        """How many leading columns are labels (text), judged from the rows."""
        if not self.rows:
            return 1
        return min(sum(1 for _ in _leading_text(row)) for row in self.rows) or 1


def _leading_text(row: list[str]) -> Any:
    for cell in row:
        if _is_value(cell):
            return
        yield cell


def _split_row(line: str) -> list[str] | None:
    """Cells of a table row: label cell(s) then at least one value cell; else None."""
    cells = [c for c in _SPLIT.split(line.strip()) if c]
    if len(cells) < 2:
        return None
    values = [i for i, c in enumerate(cells) if _is_value(c)]
    if not values or values[0] == 0:
        return None
    first = values[0]
    if not all(_is_value(c) for c in cells[first:]):
        return None
    return cells


def parse_sections(text: str) -> list[Section]:
    """Every table in a benchmark's output, with the text lines around them as notes."""
    sections: list[Section] = []
    current = Section()
    pending_title = ""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            if current.rows:
                sections.append(current)
                current = Section()
            continue
        cells = _split_row(line)
        if cells is not None:
            if not current.rows and not current.title:
                current.title = pending_title
            current.rows.append(cells)
            continue
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        if _split_row(nxt) is not None and not current.rows:
            current.header = [c for c in _SPLIT.split(line.strip()) if c]
            current.title = current.title or pending_title
            continue
        if current.rows:
            sections.append(current)
            current = Section()
        pending_title = line.strip().rstrip(":")
        if sections:
            sections[-1].notes.append(line.strip())
    if current.rows:
        sections.append(current)
    return sections


def find(
    sections: list[Section], *, title: str | None = None, header: str | None = None
) -> Section | None:
    """The first section whose title contains *title* / whose header has *header*."""
    for section in sections:
        if title is not None and title.lower() not in section.title.lower():
            continue
        if header is not None and header not in section.header:
            continue
        return section
    return None


def markdown_table(section: Section) -> str:
    """A GitHub Markdown table of *section* (label columns left, values right-aligned)."""
    width = max([len(section.header), *(len(r) for r in section.rows)])
    labels = section.label_columns
    header = section.header + [""] * (width - len(section.header))
    if len(section.header) < width:  # a header shorter than the rows names the last columns
        header = [""] * (width - len(section.header)) + section.header
    align = ["---" if i < labels else "---:" for i in range(width)]
    out = ["| " + " | ".join(h or " " for h in header) + " |", "|" + "|".join(align) + "|"]
    for row in section.rows:
        cells = row + [""] * (width - len(row))
        out.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(out)


# ---------------------------------------------------------------------- the machine


def _first_match(path: str, pattern: str) -> str | None:
    try:
        text = Path(path).read_text()
    except OSError:
        return None
    match = re.search(pattern, text, flags=re.M)
    return match.group(1).strip() if match else None


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def _command(*argv: str) -> str | None:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    lines = (out.stdout or out.stderr).strip().splitlines()
    return lines[0] if lines else ""


def machine() -> dict[str, str]:
    """What the numbers were measured on: hardware, OS, versions, commit, date."""
    mem_kb = _first_match("/proc/meminfo", r"^MemTotal:\s+(\d+)")
    try:
        from corral.postgres import find_binaries

        postgres = find_binaries().version_string
    except Exception as exc:  # a machine without PostgreSQL still gets a report
        postgres = f"not found ({type(exc).__name__})"
    root = Path(__file__).resolve().parent.parent
    commit = _command("git", "-C", str(root), "rev-parse", "--short", "HEAD") or "unknown"
    dirty = _command("git", "-C", str(root), "status", "--porcelain", "--untracked-files=no")
    return {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "CPU": _first_match("/proc/cpuinfo", r"^model name\s*:\s*(.+)$") or platform.processor(),
        "cores": str(os.cpu_count()),
        "memory": f"{int(mem_kb) / 1024 / 1024:.1f} GiB" if mem_kb else "unknown",
        "OS": platform.platform(),
        "Python": platform.python_version(),
        "PostgreSQL": postgres,
        "Redis": _command("redis-server", "--version") or "not installed",
        "corral": f"{_version('corral')} (commit {commit}{', local changes' if dirty else ''})",
        "drivers": ", ".join(
            f"{name} {_version(name)}"
            for name in ("psycopg", "psycopg-pool", "asyncpg", "SQLAlchemy", "redis")
        ),
        "pytest": f"pytest {_version('pytest')}, pytest-xdist {_version('pytest-xdist')}",
    }


def load_average() -> float:
    return os.getloadavg()[0]


# ---------------------------------------------------------------------- charts


def barh(
    path: Path,
    labels: list[str],
    values: list[float],
    *,
    title: str,
    xlabel: str,
    subtitle: str,
    log: bool = False,
    highlight: str = "corral",
    fmt: str = "{:.3g}",
) -> Path:
    """A horizontal bar chart, one bar per label, values written at the bars' ends."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 0.55 * len(labels) + 1.8), dpi=110)
    colors = ["#d95f02" if highlight.lower() in label.lower() else "#7570b3" for label in labels]
    bars = ax.barh(labels, values, color=colors)
    ax.invert_yaxis()  # first row on top, as in the tables
    if log:
        from matplotlib.ticker import FuncFormatter

        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    for bar, value in zip(bars, values, strict=True):
        ax.annotate(
            fmt.format(value),
            (bar.get_width(), bar.get_y() + bar.get_height() / 2),
            xytext=(4, 0),
            textcoords="offset points",
            va="center",
            fontsize=9,
        )
    ax.set_xlim(right=ax.get_xlim()[1] * (3 if log else 1.15))
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=12, fontweight="bold", loc="left")
    fig.text(0.01, 0.01, subtitle, fontsize=7.5, color="#555555")
    ax.grid(axis="x", alpha=0.3, which="both")
    ax.set_axisbelow(True)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path)
    plt.close(fig)
    return path


def bars(
    path: Path,
    labels: list[str],
    values: list[float],
    *,
    title: str,
    ylabel: str,
    xlabel: str,
    subtitle: str,
    reference: tuple[str, float] | None = None,
    highlight: str = "corral",
) -> Path:
    """A vertical bar chart (categories left to right), optional dashed reference line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.6), dpi=110)
    colors = ["#d95f02" if highlight.lower() in label.lower() else "#7570b3" for label in labels]
    drawn = ax.bar(labels, values, color=colors)
    for bar, value in zip(drawn, values, strict=True):
        ax.annotate(
            f"{value:.1f} s",
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            xytext=(0, 3),
            textcoords="offset points",
            ha="center",
            fontsize=9,
        )
    if reference is not None:
        name, level = reference
        ax.axhline(level, color="#555555", linestyle="--", linewidth=1)
        ax.annotate(name, (len(labels) - 0.5, level), xytext=(0, 4), textcoords="offset points",
                    ha="right", fontsize=8, color="#555555")  # fmt: skip
    ax.set_ylim(top=max(values) * 1.15)
    ax.set_ylabel(ylabel)
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=12, fontweight="bold", loc="left")
    fig.text(0.01, 0.01, subtitle, fontsize=7.5, color="#555555")
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path)
    plt.close(fig)
    return path
