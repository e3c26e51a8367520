"""Benchmark framework: metrics, section discovery, JSON results and report.md.

A section is a module ``bench.sections.<name>`` exposing ``run(ctx) -> list[Metric]``;
its module docstring is the section description in the report. Results go to
``bench/results`` (override with the ``BRAID_BENCH_RESULTS`` env var or the
``results`` parameter): ``<section>.json`` per section, ``<section>.error.json``
for a failed one, and ``report.md`` rebuilt from every file there.
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import math
import os
import pkgutil
import platform
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

RESULTS_ENV = "BRAID_BENCH_RESULTS"
SECTIONS_PACKAGE = "bench.sections"
ERROR_SUFFIX = ".error.json"
_registered: dict[str, ModuleType] = {}  # sections added by register_section()


@dataclass
class Metric:
    """One measured value; ``ratio`` = value / baseline_value (None without baseline)."""

    name: str
    value: float
    unit: str
    baseline_name: str | None = None
    baseline_value: float | None = None
    ratio: float | None = field(init=False, default=None)
    higher_is_better: bool = True
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.baseline_value is not None and self.baseline_value != 0:
            self.ratio = self.value / self.baseline_value


@dataclass(frozen=True)
class Timing:
    """Per-call wall times in seconds over ``samples`` samples."""

    median: float
    p95: float
    samples: int


class SectionContext:
    """What a section gets: the quick flag, a private tmp dir and a timer."""

    def __init__(self, quick: bool, tmp_dir: Path) -> None:
        self.quick = quick
        self.tmp_dir = tmp_dir

    def measure(self, fn: Callable[[], Any], repeat: int, number: int = 1) -> Timing:
        """Time ``fn`` (after one warm-up call): ``repeat`` samples of ``number``
        calls each, timed with time.perf_counter; returns per-call median and p95
        (nearest rank)."""
        if repeat < 1 or number < 1:
            raise ValueError("repeat and number must be >= 1")
        fn()
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            for _ in range(number):
                fn()
            times.append((time.perf_counter() - start) / number)
        times.sort()
        p95 = times[max(0, math.ceil(0.95 * len(times)) - 1)]
        return Timing(statistics.median(times), p95, repeat)


def results_dir(results: Path | str | None = None) -> Path:
    """``results`` if given, else $BRAID_BENCH_RESULTS, else bench/results."""
    if results is None:
        results = os.environ.get(RESULTS_ENV) or Path(__file__).resolve().parent / "results"
    return Path(results)


def register_section(module: ModuleType, name: str | None = None) -> None:
    """Add a section that is not a module of bench.sections (tests, plugins)."""
    _registered[name or module.__name__.rpartition(".")[2]] = module


def unregister_section(name: str) -> None:
    _registered.pop(name, None)


def section_names() -> list[str]:
    """Every section of bench.sections (found with pkgutil) plus registered ones."""
    pkg = importlib.import_module(SECTIONS_PACKAGE)
    found = {m.name for m in pkgutil.iter_modules(pkg.__path__) if not m.name.startswith("_")}
    return sorted(found | _registered.keys())


def load_section(name: str) -> ModuleType:
    if name in _registered:
        return _registered[name]
    return importlib.import_module(f"{SECTIONS_PACKAGE}.{name}")


def describe(name: str) -> str:
    """The section's module docstring ("" if it cannot be imported)."""
    try:
        return inspect.cleandoc(load_section(name).__doc__ or "")
    except Exception:
        return ""


def write_section(name: str, metrics: list[Metric], results: Path | str | None = None) -> Path:
    """Write ``<results>/<name>.json`` and drop a stale error record of ``name``."""
    out = results_dir(results)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    data = [dataclasses.asdict(m) for m in metrics]
    path.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n")
    (out / f"{name}{ERROR_SUFFIX}").unlink(missing_ok=True)
    return path


def write_error(name: str, error: str, results: Path | str | None = None) -> Path:
    """Record a failed section (its stale ``<name>.json`` is removed)."""
    out = results_dir(results)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").unlink(missing_ok=True)
    path = out / f"{name}{ERROR_SUFFIX}"
    path.write_text(json.dumps({"section": name, "error": error}, indent=2) + "\n")
    return path


def run_sections(names: list[str], quick: bool = False,
                 results: Path | str | None = None) -> int:
    """Run ``names`` in order, write their results and the report; 1 if any failed."""
    failed = []
    for name in names:
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        try:
            module = load_section(name)
            with tempfile.TemporaryDirectory(prefix=f"braid-bench-{name}-") as tmp:
                metrics = module.run(SectionContext(quick, Path(tmp)))
            if not isinstance(metrics, list) or not all(isinstance(m, Metric) for m in metrics):
                raise TypeError(f"run() must return list[Metric], got {metrics!r:.200}")
            write_section(name, metrics, results)
        except Exception as exc:
            failed.append(name)
            print(f"[bench] {name} FAILED:\n{traceback.format_exc()}", file=sys.stderr)
            write_error(name, f"{type(exc).__name__}: {exc}", results)
            continue
        print(f"[bench] {name}: {len(metrics)} metrics in {time.perf_counter() - start:.2f}s",
              file=sys.stderr)
    report = write_report(results)
    print(f"[bench] report: {report}", file=sys.stderr)
    if failed:
        print(f"[bench] failed sections: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def machine_info() -> dict[str, str]:
    cpu = platform.processor() or platform.machine()
    mem = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        mem = f"{pages * page_size / 2**30:.1f} GiB"
    except (OSError, ValueError, AttributeError):
        pass
    return {"CPU": cpu, "cores": str(os.cpu_count()), "memory": mem,
            "python": f"{platform.python_implementation()} {platform.python_version()}",
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")}


def _num(v: Any) -> str:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if float(v).is_integer() or abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.4g}"


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _row(m: dict[str, Any]) -> str:
    unit = f" {m['unit']}" if m.get("unit") else ""
    base = m.get("baseline_value")
    ratio = m.get("ratio")
    params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                       for k, v in (m.get("params") or {}).items())
    cells = [m["name"], _num(m["value"]) + unit, m.get("baseline_name") or "—",
             "—" if base is None else _num(base) + unit,
             "—" if ratio is None else f"{ratio:.3f}",
             "higher" if m.get("higher_is_better", True) else "lower", params or "—"]
    return "| " + " | ".join(_cell(c) for c in cells) + " |"


def write_report(results: Path | str | None = None) -> Path:
    """Rebuild ``report.md`` from every ``*.json`` in the results dir."""
    out = results_dir(results)
    out.mkdir(parents=True, exist_ok=True)
    lines = ["# Braid benchmark report", "", "| machine | |", "|---|---|"]
    lines += [f"| {k} | {_cell(v)} |" for k, v in machine_info().items()]
    lines += ["", "Ratio = value / baseline value, both measured in the same run.", ""]
    for path in sorted(out.glob("*.json")):
        is_error = path.name.endswith(ERROR_SUFFIX)
        name = path.name[: -len(ERROR_SUFFIX)] if is_error else path.stem
        when = datetime.fromtimestamp(path.stat().st_mtime, timezone.utc)
        lines += [f"## {name}" + (" — FAILED" if is_error else ""), ""]
        if desc := describe(name):
            lines += [desc, ""]
        try:
            data = json.loads(path.read_text())
        except ValueError as exc:
            lines += [f"Unreadable results file {path.name}: {exc}", ""]
            continue
        lines += [f"Run at {when:%Y-%m-%d %H:%M:%S} UTC.", ""]
        if is_error:
            lines += ["```", str(data.get("error")), "```", ""]
            continue
        lines += ["| metric | value | baseline | baseline value | ratio | better is | params |",
                  "|---|---|---|---|---|---|---|"]
        lines += [_row(m) for m in data]
        lines.append("")
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
