"""Meters: the memory of this process (RSS, its peak, CUDA's allocator), the machine's
streamed memory bandwidth, and what the machine is (CPU, GPU, versions)."""

import functools
import os
import platform
import resource
import statistics
import sys
import time
from typing import Any, Callable, Tuple

import torch
import torch.nn.functional as F

# --------------------------------------------------------------------------- memory


def rss_bytes() -> int:
    """Resident set size of this process now."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return _max_rss_bytes()


def _max_rss_bytes() -> int:
    """Peak RSS over the process's life (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


class MemoryMeter:
    """Peak memory of a stretch of work: on CUDA the allocator's peak, on the CPU the
    RSS high-water mark, which Linux lets a process reset (/proc/self/clear_refs)."""

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cuda":
            self.kind = "CUDA max allocated"
        else:
            self.kind = "peak RSS" if self._reset_rss_peak() else "peak RSS since process start"

    @staticmethod
    def _reset_rss_peak() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # 5: reset the peak RSS to the current RSS (Linux >= 4.0)
            return True
        except OSError:
            return False

    def reset(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._reset_rss_peak()

    def peak(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        return peak_rss_bytes()


def peak_rss_bytes() -> int:
    """RSS high-water mark since the last reset (VmHWM), else since process start."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return _max_rss_bytes()


def measure_load(device: torch.device, load: Callable[[], Any]) -> Tuple[Any, dict]:
    """Runs `load()`; returns its result and the load figures: seconds, RSS just before,
    the RSS high-water mark during it, RSS after (and CUDA's allocator peak on GPUs)."""
    meter = MemoryMeter(device)
    baseline = rss_bytes()
    meter.reset()
    t0 = time.perf_counter()
    result = load()
    synchronizer(device)()
    info = {"load_s": time.perf_counter() - t0, "baseline_rss": baseline, "peak_rss": peak_rss_bytes(),
            "rss_after": rss_bytes()}
    if device.type == "cuda":
        info["cuda_peak_allocated"] = meter.peak()
    return result, info


# --------------------------------------------------------------------------- machine


def synchronizer(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def measure_bandwidth(device: torch.device, runs: int = 15) -> dict:
    """The machine's streamed read bandwidth: what batch-1 decoding is bound by.

    On CPU the faster of two reads of a 256 MiB fp32 weight (far larger than any cache): an
    fp32 matrix-vector product `F.linear` (1xK @ KxN, what a decode step does) and a plain
    sum over the weight. The BLAS matrix-vector kernel alone can stream well below the
    memory's bandwidth (MKL on AMD CPUs), which would set the bound too low.
    On CUDA a device-to-device copy of 1 GiB (read + write bytes)."""
    sync = synchronizer(device)
    k = n = 8192
    weight = torch.full((n, k), 0.5, device=device)  # (N, K) fp32: 256 MiB
    x = torch.randn(1, k, device=device)

    def median_seconds(fn) -> float:
        times = []
        for i in range(3 + runs):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            if i >= 3:  # the first 3 are warm-up
                times.append(time.perf_counter() - t0)
        return statistics.median(times)

    result = {
        "method": f"fastest read of a {weight.nbytes / 2**20:.0f} MiB fp32 weight: fp32 F.linear 1x{k} @ {k}x{n}"
        f" or a sum over it, median of {runs}",
        "matvec_bytes_per_s": weight.nbytes / median_seconds(functools.partial(F.linear, x, weight)),
        "sum_bytes_per_s": weight.nbytes / median_seconds(weight.sum),
    }
    result["bytes_per_s"] = max(result["matvec_bytes_per_s"], result["sum_bytes_per_s"])
    del weight
    if device.type == "cuda":
        src = torch.empty(2**28, device=device)  # 1 GiB fp32
        dst = torch.empty_like(src)
        copy_times = []
        for i in range(3 + runs):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            torch.cuda.synchronize(device)
            if i >= 3:
                copy_times.append(start.elapsed_time(end) / 1e3)
        result["copy_bytes_per_s"] = 2 * src.nbytes / statistics.median(copy_times)
        result["bytes_per_s"] = result["copy_bytes_per_s"]
        result["method"] = f"1 GiB device-to-device copy (read + write), median of {runs}"
        del src, dst
    return result


def machine_info(device: torch.device, threads: int) -> dict:
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": threads,
        "cpus_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        info["cpu"] = platform.processor()
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    for package in ("transformers", "llama_cpp", "llama_models"):
        try:
            module = __import__(package)
            info[package] = getattr(module, "__version__", "installed")
        except Exception:  # not installed, or broken: the peer reports why
            info[package] = None
    return info
