"""Benchmark harness: timed trials, figures with same-run references, and their reports.

A benchmark describes each figure as a `Comparison`: the operation under test (a `Trial`) and
the references it is divided by, measured in the same run. `measure` runs them back to back,
rotating their order, for a number of repeats; every figure is the median over the repeats and
its ratio the median of the per-repeat ratios, so drift on a shared, noisy machine hits both
sides of a ratio alike. `run_comparisons` adds progress on stderr; the rest formats what came
out (markdown tables, a marked section of a docs page, JSON) and describes the machine.

Used by tools/bench/store.py; nothing here knows about the store.
"""

from __future__ import annotations

import contextlib
import gc
import json
import mmap
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path

import numpy as np
import numpy.typing as npt
from tqdm import tqdm


class Unit(StrEnum):
    """A figure's unit; it also says how one repeat's calls are summarised."""

    GBPS = "GB/s"  # total bytes / total time of the repeat's calls (higher is better)
    US = "us"  # the repeat's median call (lower is better)
    MS = "ms"  # the repeat's median call (lower is better)
    BYTES_PER_BLOCK = "B/block"  # not timed (lower is better)


_NS_PER_UNIT = {Unit.US: 1e3, Unit.MS: 1e6}
_DIGITS = {Unit.GBPS: 2, Unit.US: 1, Unit.MS: 3, Unit.BYTES_PER_BLOCK: 0}


@dataclass(frozen=True, slots=True)
class Target:
    """A goal a figure must meet: its value, or its ratio to the first reference, >= or <= `limit`."""

    on_ratio: bool
    at_least: bool
    limit: float

    @classmethod
    def ratio_at_least(cls, limit: float) -> Target:
        return cls(on_ratio=True, at_least=True, limit=limit)

    @classmethod
    def value_at_most(cls, limit: float) -> Target:
        return cls(on_ratio=False, at_least=False, limit=limit)

    def describe(self, unit: Unit) -> str:
        sign = ">=" if self.at_least else "<="
        return f"{sign} {self.limit:g}x" if self.on_ratio else f"{sign} {self.limit:g} {unit}"

    def status(self, value: float, ratio: float) -> str:
        measured = ratio if self.on_ratio else value
        passes = measured >= self.limit if self.at_least else measured <= self.limit
        return "PASS" if passes else "FAIL"


@dataclass(frozen=True, slots=True)
class Trial:
    """One operation, timed alone: `run(i)` is timed; `before(i)` and `after(i)` are not."""

    run: Callable[[int], None]
    before: Callable[[int], None] | None = None
    after: Callable[[int], None] | None = None


@dataclass(frozen=True, slots=True)
class Comparison:
    """A figure and the references it is divided by; each reference gives one table row."""

    group: str
    name: str
    unit: Unit
    subject: Trial
    references: dict[str, Trial]
    iterations: int  # calls of each trial per repeat
    bytes_per_call: int = 0  # for GB/s
    target: Target | None = None  # applies to the first reference's row
    note: str = ""  # shown on the first reference's row


@dataclass(frozen=True, slots=True)
class Figure:
    """One table row: a median, its reference's median and their ratio (figure / reference)."""

    group: str
    name: str
    unit: Unit
    value: float
    reference: str
    reference_value: float
    ratio: float
    target: str = ""
    status: str = ""  # "PASS", "FAIL", or "" without a target
    note: str = ""
    samples: list[float] = field(default_factory=list)  # the figure's value in each repeat


# -- timing ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """As timeit does: a collection in the middle of a timed call is noise, not the code's cost."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def time_calls(trial: Trial, iterations: int) -> list[int]:
    """Nanoseconds of each `trial.run(i)`, for i in range(iterations)."""
    elapsed = []
    for i in range(iterations):
        if trial.before:
            trial.before(i)
        start = time.perf_counter_ns()
        trial.run(i)
        elapsed.append(time.perf_counter_ns() - start)
        if trial.after:
            trial.after(i)
    return elapsed


def summarize(elapsed_ns: Sequence[int], unit: Unit, bytes_per_call: int) -> float:
    """One repeat's value in `unit`."""
    if unit is Unit.GBPS:
        return bytes_per_call * len(elapsed_ns) / sum(elapsed_ns)  # bytes per ns is GB/s
    return statistics.median(elapsed_ns) / _NS_PER_UNIT[unit]


def measure(comparison: Comparison, repeats: int) -> list[Figure]:
    """Run the subject and its references back to back `repeats` times (after one warm-up call
    of each), rotating their order, and return one figure per reference."""
    trials = {"": comparison.subject, **comparison.references}
    names = list(trials)
    values: dict[str, list[float]] = {name: [] for name in names}
    with gc_paused():
        for trial in trials.values():
            time_calls(trial, 1)
        for repeat in range(repeats):
            shift = repeat % len(names)
            for name in names[shift:] + names[:shift]:
                elapsed = time_calls(trials[name], comparison.iterations)
                values[name].append(summarize(elapsed, comparison.unit, comparison.bytes_per_call))
    return [
        make_figure(comparison, reference, values[""], values[reference], first=index == 0)
        for index, reference in enumerate(comparison.references)
    ]


def make_figure(
    comparison: Comparison, reference: str, subject: list[float], baseline: list[float], *, first: bool
) -> Figure:
    value, reference_value = statistics.median(subject), statistics.median(baseline)
    ratio = statistics.median(s / b for s, b in zip(subject, baseline, strict=True))
    target = comparison.target if first else None
    return Figure(
        group=comparison.group,
        name=comparison.name,
        unit=comparison.unit,
        value=value,
        reference=reference,
        reference_value=reference_value,
        ratio=ratio,
        target=target.describe(comparison.unit) if target else "",
        status=target.status(value, ratio) if target else "",
        note=comparison.note if first else "",
        samples=subject,
    )


def run_comparisons(comparisons: Iterable[Comparison], repeats: int, progress: tqdm) -> list[Figure]:
    """Measure each comparison and report it. `comparisons` may be a generator that sets up the
    state a comparison needs just before yielding it (and tears it down after)."""
    figures: list[Figure] = []
    for comparison in comparisons:
        progress.set_description(comparison.name)
        measured = measure(comparison, repeats)
        report(measured, progress)
        figures += measured
    return figures


def report(figures: Sequence[Figure], progress: tqdm) -> None:
    """One line per figure on stderr, and one step of the progress bar."""
    for figure in figures:
        progress.write(describe(figure), file=sys.stderr)
    progress.update(1)


def aligned_bytes(size_bytes: int) -> npt.NDArray[np.uint8]:
    """Page-aligned memory (O_DIRECT needs 4 KiB alignment) with every page already faulted in:
    a first touch costs 2-3 us per 4 KiB page, which would swamp the copies being timed."""
    array = np.frombuffer(mmap.mmap(-1, size_bytes), dtype=np.uint8)
    array.fill(0)
    return array


# -- the machine -----------------------------------------------------------------------------------


def machine_info() -> dict[str, str]:
    meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    ram_gib = int(meminfo["MemTotal"].split()[0]) / (1 << 20)
    return {
        "CPU": cpu_model(),
        "cores": f"{os.cpu_count()} ({len(os.sched_getaffinity(0))} usable by this process)",
        "load average (1, 5, 15 min) at the end": ", ".join(f"{load:.2f}" for load in os.getloadavg()),
        "RAM": f"{ram_gib:.1f} GiB",
        # Huge pages change copy speed: anonymous memory may get them while shared memory does not.
        "transparent huge pages": f"anonymous {thp_mode('enabled')}, shmem {thp_mode('shmem_enabled')}",
        "kernel": platform.release(),
        "Python": platform.python_version(),
    }


def thp_mode(name: str) -> str:
    """The selected [mode] in /sys/kernel/mm/transparent_hugepage/<name>."""
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage", name).read_text()
    except OSError:
        return "unknown"
    return text[text.find("[") + 1 : text.find("]")] if "[" in text else text.strip()


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def filesystem_of(path: Path) -> str:
    """The filesystem type and device of the mount that holds `path` (longest mount-point prefix)."""
    real = os.path.realpath(path)
    best = ("", "unknown", "unknown")
    for line in Path("/proc/self/mounts").read_text().splitlines():
        device, mount, fstype = line.split()[:3]
        mount = mount.replace("\\040", " ")
        inside = real == mount or real.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) > len(best[0]):
            best = (mount, fstype, device)
    return f"{best[1]} on {best[2]} (mounted at {best[0]})"


# -- reports ---------------------------------------------------------------------------------------


def format_value(value: float, unit: Unit) -> str:
    return f"{value:.{_DIGITS[unit]}f} {unit}"


def describe(figure: Figure) -> str:
    status = f"  [{figure.target}: {figure.status}]" if figure.status else ""
    return (
        f"{figure.name}: {format_value(figure.value, figure.unit)} | {figure.reference}: "
        f"{format_value(figure.reference_value, figure.unit)} | ratio {figure.ratio:.2f}x{status}"
    )


def target_summary(figures: Sequence[Figure]) -> str:
    checked = [f for f in figures if f.status]
    failing = [f"{f.name} ({f.target})" for f in checked if f.status == "FAIL"]
    summary = f"Targets: {len(checked) - len(failing)} of {len(checked)} pass."
    return summary + (f" Failing: {'; '.join(failing)}." if failing else "")


def markdown_tables(figures: Sequence[Figure]) -> list[str]:
    """One table per group, in the order the groups first appear."""
    lines: list[str] = []
    for group in dict.fromkeys(f.group for f in figures):
        lines += ["", f"### {group}", ""]
        lines.append("| Figure | Median | Reference | Reference median | Ratio | Target | Status | Notes |")
        lines.append("|---|--:|---|--:|--:|---|---|---|")
        lines += [table_row(f) for f in figures if f.group == group]
    return lines


def table_row(figure: Figure) -> str:
    cells = [
        figure.name,
        format_value(figure.value, figure.unit),
        figure.reference,
        format_value(figure.reference_value, figure.unit),
        f"{figure.ratio:.2f}x",
        figure.target,
        f"**{figure.status}**" if figure.status == "FAIL" else figure.status,
        figure.note,
    ]
    return "| " + " | ".join(cells) + " |"


def write_doc_section(path: Path, section: str, begin_marker: str, end_marker: str, header: str) -> None:
    """Replace the text between the markers, or append the section (creating the file with
    `header`); the rest of the page is left as it was."""
    text = path.read_text() if path.exists() else header
    block = f"{begin_marker}\n{section}\n{end_marker}"
    begin, end = text.find(begin_marker), text.find(end_marker)
    if 0 <= begin < end:
        text = text[:begin] + block + text[end + len(end_marker) :]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def write_json(path: Path, payload: dict[str, object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")


def median_figures(runs: Sequence[Sequence[Figure]]) -> list[Figure]:
    """Per measurement, the run whose ratio to the first reference is the median of the runs
    (whole runs differ more than repeats within one: the machine's speed drifts over minutes);
    every row of that measurement comes from that run, and its first row notes the runs' range."""
    if len(runs) == 1:
        return list(runs[0])
    firsts: dict[str, list[Figure]] = {}
    for figures in runs:
        seen: set[str] = set()
        for figure in figures:
            if figure.name not in seen:
                seen.add(figure.name)
                firsts.setdefault(figure.name, []).append(figure)
    merged: list[Figure] = []
    for name, rows in firsts.items():
        chosen = sorted(range(len(rows)), key=lambda i: rows[i].ratio)[len(rows) // 2]
        ratios = sorted(row.ratio for row in rows)
        spread = f"ratio over {len(rows)} runs: {ratios[0]:.2f}-{ratios[-1]:.2f}x"
        for figure in runs[chosen]:
            if figure.name == name:
                note = spread if figure is rows[chosen] else ""
                merged.append(replace(figure, note="; ".join(n for n in (figure.note, note) if n)))
    return merged
