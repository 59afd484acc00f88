"""The bench suite's one result schema, and its three renderings: CSV, a markdown table, PNG plots.

Every subject writes rows of the same columns (`COLUMNS`): what was measured (subject, provider,
shape, metric, unit), the median with the 20 % and 80 % quantiles over repetitions (p50, p20, p80;
a count repeats its value in all three; "n/a" where the machine cannot measure it, e.g. GPU
telemetry without an NVIDIA GPU), and where (device, version, timestamp).
"""

from __future__ import annotations

import csv
import datetime
import platform
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import List, Optional

import torch

import tempflow_fast
from tempflow_fast.bench.telemetry import QUANTITIES, GpuTelemetry

COLUMNS = ("subject", "provider", "shape", "metric", "unit", "p50", "p20", "p80", "device", "version", "timestamp")
NA = "n/a"
TIME_UNITS = ("s", "ms")


@dataclass
class Row:
    subject: str
    provider: str
    shape: str
    metric: str
    unit: str
    p50: str
    p20: str
    p80: str
    device: str
    version: str
    timestamp: str


def _fmt(v: Optional[float]) -> str:
    return NA if v is None else f"{v:.6g}"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model} ({torch.get_num_threads()} threads)"


def version() -> str:
    """Package version, git revision of the checkout when there is one, torch version."""
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                             cwd=Path(tempflow_fast.__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        rev = "nogit"
    return f"{tempflow_fast.__version__}+{rev} torch {torch.__version__}"


class Results:
    """Rows of one bench run; device, version and timestamp are the run's."""

    def __init__(self, device: torch.device):
        self.device = device_name(device)
        self.version = version()
        self.timestamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        self.rows: List[Row] = []
        self.telemetry_unavailable: Optional[str] = None  # why GPU telemetry reads "n/a", when it does
        self.notes: List[str] = []     # one-line summaries printed under the table ("iteration vs official ...")
        self.sections: List[str] = []  # markdown sections of the report after the table (extrapolations)

    def add(self, subject: str, provider: str, shape: str, metric: str, unit: str,
            p50: Optional[float], p20: Optional[float] = None, p80: Optional[float] = None) -> None:
        """One measurement. A single value (a count) passes p50 only; None means "n/a"."""
        if p50 is not None and (p20 is None) != (p80 is None):
            raise ValueError(f"{subject}/{metric}: give both p20 and p80 or neither")
        if p20 is None and p80 is None:
            p20 = p80 = p50
        self.rows.append(Row(subject, provider, shape, metric, unit, _fmt(p50), _fmt(p20), _fmt(p80),
                             self.device, self.version, self.timestamp))

    def add_telemetry(self, subject: str, provider: str, shape: str, telemetry: GpuTelemetry) -> None:
        """One row per NVML quantity sampled during a benchmark ("n/a" where none could be)."""
        summary = telemetry.summary()
        for metric, unit in QUANTITIES.items():
            q = summary[metric]
            self.add(subject, provider, shape, metric, unit, *(q if q is not None else (None, None, None)))
        if telemetry.unavailable:
            self.telemetry_unavailable = telemetry.unavailable

    # --- renderings -------------------------------------------------------------------------------

    def write_csv(self, path: Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(COLUMNS))
            w.writeheader()
            w.writerows(asdict(r) for r in self.rows)
        return path

    def markdown(self) -> str:
        lines = [f"device: {self.device} — version: {self.version} — {self.timestamp}", "",
                 "| subject | provider | shape | metric | unit | p50 | p20 | p80 |",
                 "|---|---|---|---|---|---:|---:|---:|"]
        # telemetry that could not be measured is in the CSV; the table says it once, with the reason
        quiet = [r for r in self.rows if not (r.metric in QUANTITIES and r.p50 == NA)]
        lines += [f"| {r.subject} | {r.provider} | {r.shape} | {r.metric} | {r.unit} | {r.p50} | {r.p20} | {r.p80} |"
                  for r in quiet]
        if len(quiet) < len(self.rows):
            lines += ["", f"GPU telemetry ({', '.join(QUANTITIES)}): n/a — {self.telemetry_unavailable}"]
        if self.notes:
            lines += [""] + self.notes
        for section in self.sections:
            lines += ["", section]
        return "\n".join(lines)

    def write_markdown(self, path: Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.markdown() + "\n")
        return path

    def subjects(self) -> List[str]:
        return list(dict.fromkeys(r.subject for r in self.rows))

    def plot(self, subject: str, path: Path) -> Optional[Path]:
        """Horizontal bars of the subject's timings (p50, whiskers p20–p80), one bar per
        (shape, provider, metric); None when the subject has no timing rows."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = [r for r in self.rows if r.subject == subject and r.unit in TIME_UNITS and r.p50 != NA]
        if not rows:
            return None
        labels = [f"{r.shape} | {r.provider} | {r.metric}" for r in rows]
        ms = [1e3 if r.unit == "s" else 1.0 for r in rows]  # one axis: every timing in ms
        p50 = [float(r.p50) * m for r, m in zip(rows, ms)]
        lo = [p - float(r.p20) * m for p, r, m in zip(p50, rows, ms)]
        hi = [float(r.p80) * m - p for p, r, m in zip(p50, rows, ms)]
        fig, ax = plt.subplots(figsize=(10, 0.45 * len(rows) + 1.5))
        ax.barh(range(len(rows)), p50, xerr=[lo, hi], color="tab:blue", ecolor="black", capsize=3)
        ax.set_yticks(range(len(rows)), labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_xlabel("time (ms, log scale); bar = p50, whiskers = p20–p80")
        ax.set_title(f"{subject} — {self.device}", fontsize=10)
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path
