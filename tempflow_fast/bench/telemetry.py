"""GPU telemetry through NVML (`nvidia-ml-py`), sampled in a background thread while a benchmark runs.

    with GpuTelemetry(device_index=0) as tel:
        run_the_benchmark()
    tel.summary()   # {"gpu_util": (p50, p20, p80) or None, ...}; None = not measurable here

Quantities (NVML's own units converted to the labels below):
- gpu_util (%): share of the sample period a kernel was running (nvmlDeviceGetUtilizationRates.gpu)
- gpu_memory_used (MB): device memory in use by every process (nvmlDeviceGetMemoryInfo.used)
- gpu_power (W): board power draw (nvmlDeviceGetPowerUsage, mW)
- gpu_sm_clock (MHz): current SM clock (nvmlDeviceGetClockInfo, NVML_CLOCK_SM)

Without NVML (no package, no driver, no NVIDIA GPU, no CUDA device in use) every quantity is None
and `unavailable` says why; the benchmark runs on regardless.
"""

from __future__ import annotations

import threading
from typing import Dict, List, Optional, Tuple

import torch

QUANTITIES = {"gpu_util": "%", "gpu_memory_used": "MB", "gpu_power": "W", "gpu_sm_clock": "MHz"}


def quantiles(values: List[float]) -> Tuple[float, float, float]:
    """(p50, p20, p80) of a non-empty list."""
    if not values:
        raise ValueError("quantiles of an empty list")
    q = torch.tensor(values, dtype=torch.float64).quantile(torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64))
    return float(q[0]), float(q[1]), float(q[2])


def _nvml():
    """(pynvml module, None) once NVML is initialised, else (None, reason)."""
    try:
        import pynvml
    except ImportError:
        return None, "nvidia-ml-py is not installed"
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as err:
        return None, f"NVML could not start ({err})"
    return pynvml, None


class GpuTelemetry:
    """Samples the NVML quantities of one GPU every `interval_s` between __enter__ and __exit__.

    `device_index` is the CUDA device (as torch numbers it); None means no GPU is in use, so
    nothing is sampled. The NVML handle is found by the device's UUID, so CUDA_VISIBLE_DEVICES
    remapping cannot point it at another board."""

    def __init__(self, device_index: Optional[int], interval_s: float = 0.02):
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self.interval_s = interval_s
        self.samples: Dict[str, List[float]] = {k: [] for k in QUANTITIES}
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._nvml, self._handle = None, None
        if device_index is None:
            self.unavailable = "no CUDA device in use"
            return
        self._nvml, self.unavailable = _nvml()
        if self._nvml is not None:
            self._handle = self._find_handle(device_index)

    def _find_handle(self, device_index: int):
        nv = self._nvml
        uuid = getattr(torch.cuda.get_device_properties(device_index), "uuid", None)
        if uuid is not None:
            text = str(uuid)
            try:
                return nv.nvmlDeviceGetHandleByUUID(text if text.startswith("GPU-") else f"GPU-{text}")
            except nv.NVMLError:
                pass
        return nv.nvmlDeviceGetHandleByIndex(device_index)

    def _sample(self) -> None:
        nv, h = self._nvml, self._handle
        self.samples["gpu_util"].append(float(nv.nvmlDeviceGetUtilizationRates(h).gpu))
        self.samples["gpu_memory_used"].append(nv.nvmlDeviceGetMemoryInfo(h).used / 2**20)
        self.samples["gpu_power"].append(nv.nvmlDeviceGetPowerUsage(h) / 1000.0)
        self.samples["gpu_sm_clock"].append(float(nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM)))

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self) -> "GpuTelemetry":
        if self._handle is not None:
            self._sample()  # a run shorter than one interval still gets a reading
            self._thread = threading.Thread(target=self._loop, name="nvml-telemetry", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._sample()
            self._thread = None

    def summary(self) -> Dict[str, Optional[Tuple[float, float, float]]]:
        """{quantity: (p50, p20, p80)}, or None for every quantity when nothing could be sampled."""
        return {k: (quantiles(v) if v else None) for k, v in self.samples.items()}
