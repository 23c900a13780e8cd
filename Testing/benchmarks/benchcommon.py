"""Shared helpers of the benchmark scripts: isolated worker processes, peak memory, machine facts, tables, JSON.

Every measured variant runs in a fresh Python process (``run_worker``) so its peak resident memory
(``VmHWM``) is its own and nothing cached by an earlier variant (allocator pools, oneDNN primitives, imports)
flatters a later one. A worker is the benchmark script itself started with ``--worker JSON``; it prints one line
``RESULT {json}`` that the parent collects.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence

REPO_ROOT = Path(__file__).resolve().parents[2]
RESULT_PREFIX = "RESULT "


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB.

    Linux: ``VmHWM`` of ``/proc/self/status`` (the high-water mark of this program's own address space).
    ``ru_maxrss`` is not used there because it keeps the parent's peak across ``fork``+``exec``, so a worker
    started by a big parent would report the parent's figure.
    """
    try:
        with open("/proc/self/status") as stream:
            for line in stream:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    scale = 1024.0 if sys.platform != "darwin" else 1024.0 * 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


def current_rss_mb() -> float:
    """Resident set size of this process now, in MiB."""
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:  # psutil is optional: /proc works on Linux
        with open("/proc/self/statm") as stream:
            return int(stream.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def machine_info() -> Dict[str, Any]:
    """Facts that make a timing interpretable: CPU, cores, threads, load, library versions, GPU."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as stream:
            for line in stream:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info: Dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onednn": torch.backends.mkldnn.is_available(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        import monai

        info["monai"] = monai.__version__
    except ImportError:
        info["monai"] = None
    return info


def run_worker(script: Path, spec: Mapping[str, Any], timeout: float = 3600.0) -> Dict[str, Any]:
    """Run ``script --worker <spec as JSON>`` in a fresh interpreter and return the dict it reports.

    A failing worker yields ``{"error": "..."}`` (its last stderr lines) instead of raising, so one broken variant
    does not lose a whole table.
    """
    command = [sys.executable, str(script), "--worker", json.dumps(dict(spec))]
    started = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=str(REPO_ROOT))
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            result = json.loads(line[len(RESULT_PREFIX) :])
            result["process_wall_s"] = round(time.perf_counter() - started, 3)
            return result
    tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-4:])
    return {"error": f"exit status {done.returncode}: {tail}"}


def report_result(result: Mapping[str, Any]) -> None:
    """Worker side: print the result line the parent looks for (peak memory added)."""
    payload = dict(result)
    payload.setdefault("peak_rss_mb", round(peak_rss_mb(), 1))
    print(RESULT_PREFIX + json.dumps(payload), flush=True)


def worker_main(argv: Sequence[str], work: Callable[[Dict[str, Any]], Dict[str, Any]]) -> bool:
    """If ``argv`` is ``[--worker, JSON]``, run ``work(spec)``, report its result and return True."""
    if len(argv) >= 2 and argv[0] == "--worker":
        report_result(work(json.loads(argv[1])))
        return True
    return False


def timed(function: Callable[[], Any], repeats: int, warmup: int = 1) -> List[float]:
    """Wall-clock seconds of ``repeats`` calls of ``function`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        function()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return times


def median(values: Iterable[float]) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], title: str = "") -> str:
    """A markdown table of ``rows`` restricted to ``columns`` (missing cells are blank, floats get 3 digits)."""

    def cell(value: Any) -> str:
        if value is None:
            return ""
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
        return str(value)

    lines = [f"### {title}", ""] if title else []
    lines.append("| " + " | ".join(columns) + " |")
    lines.append("|" + "|".join("---" for _ in columns) + "|")
    for row in rows:
        lines.append("| " + " | ".join(cell(row.get(column)) for column in columns) + " |")
    return "\n".join(lines)


def write_json(path: Optional[str], payload: Mapping[str, Any]) -> None:
    """Write ``payload`` (plus machine facts) to ``path`` when one was given."""
    if not path:
        return
    data = {"machine": machine_info(), **payload}
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {target}")
