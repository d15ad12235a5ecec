"""Devices an estimate can be made for: the present one (measured) and named ones (public specs).

A device is what the time and memory model needs: memory, dense matmul FLOP/s in fp32 and bf16,
memory bandwidth (decoding reads every weight once per token), and two fixed costs the FLOP
count misses — the runtime's resident memory (CUDA context, or the Python process with torch
and transformers imported) and a per-layer launch/dispatch overhead per forward or backward.

Specs are the vendors' dense (not sparse) tensor-core figures; "fp32" on the GPUs is plain FP32
(lmforge trains with fp32 master weights under bf16 autocast there, so the bf16 figure applies).
lmforge runs on Apple silicon's CPU cores (accelerate is set up with cpu=True when CUDA is
absent), so the M-series entries give the CPU's matmul rate (Accelerate/AMX) and unified memory.
"""

from __future__ import annotations

import functools
import os
import time
from dataclasses import asdict, dataclass, replace

from lmforge.errors import LmforgeError

GB = 1e9


@dataclass(frozen=True)
class Device:
    name: str
    kind: str  # "cuda" or "cpu"
    memory_bytes: float
    fp32_flops: float
    bf16_flops: float
    bandwidth: float  # bytes/s
    runtime_bytes: float  # resident before any tensor: CUDA context / the Python process
    layer_overhead_s: float  # launch/dispatch cost per layer per forward (a backward costs two)
    startup_s: float = 4.0  # a stage process's start: imports, accelerator set-up
    description: str = ""
    measured: bool = False

    def flops(self, precision: str) -> float:
        return self.bf16_flops if precision == "bf16" else self.fp32_flops

    def as_dict(self) -> dict:
        return asdict(self)


def _gpu(name, mem_gb, fp32_tf, bf16_tf, bw_tbs, desc) -> Device:
    # 250 us per layer forward: HF eager launches ~25 kernels per block
    return Device(name, "cuda", mem_gb * GB, fp32_tf * 1e12, bf16_tf * 1e12, bw_tbs * 1e12, 0.6 * GB, 250e-6, 8.0, desc)


TABLE: dict[str, Device] = {d.name: d for d in (
    _gpu("h200", 141, 67, 989, 4.8, "NVIDIA H200 SXM, 141 GB HBM3e"),
    _gpu("h100-80gb", 80, 67, 989, 3.35, "NVIDIA H100 SXM, 80 GB HBM3"),
    _gpu("a100-80gb", 80, 19.5, 312, 2.04, "NVIDIA A100 SXM, 80 GB HBM2e"),
    _gpu("a100-40gb", 40, 19.5, 312, 1.56, "NVIDIA A100, 40 GB HBM2"),
    _gpu("l4", 24, 30.3, 121, 0.3, "NVIDIA L4, 24 GB GDDR6"),
    _gpu("rtx-4090", 24, 82.6, 165, 1.01, "NVIDIA GeForce RTX 4090, 24 GB GDDR6X"),
    Device("apple-m3-max", "cpu", 128 * GB * 0.75, 2.0e12, 2.0e12, 0.4e12, 0.5 * GB, 60e-6, 4.0,
           "Apple M3 Max, 128 GB unified memory (about 3/4 usable by one process), CPU cores via Accelerate"),
    Device("apple-m2", "cpu", 24 * GB * 0.75, 0.8e12, 0.8e12, 0.1e12, 0.5 * GB, 80e-6, 5.0,
           "Apple M2, 24 GB unified memory (about 3/4 usable by one process), CPU cores via Accelerate"),
    Device("cpu-2core", "cpu", 16 * GB, 100e9, 25e9, 20e9, 0.5 * GB, 150e-6, 8.0,
           "a 2-core x86 CPU with AVX2 (no AMX), 16 GB"),
)}


def lookup(name: str | None) -> Device:
    """A named device, or the present one (measured) for None / "present"."""
    if name is None or name in ("present", "here", "this"):
        return present()
    key = name.strip().lower().replace("_", "-").replace(" ", "-")
    aliases = {"h100": "h100-80gb", "a100": "a100-80gb", "4090": "rtx-4090", "cpu": "cpu-2core", "m3-max": "apple-m3-max"}
    key = aliases.get(key, key)
    if key not in TABLE:
        raise LmforgeError(f"Unknown device {name!r}; known devices: present (this machine, measured), "
                           f"{', '.join(TABLE)}.")
    return TABLE[key]


def _cpu_memory() -> float:
    """Physical memory, or the cgroup's limit when it is lower (containers)."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for p in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            raw = open(p).read().strip()
        except OSError:
            continue
        if raw.isdigit():
            total = min(total, int(raw))
    return float(total)


def current_rss() -> float:
    """This process's resident memory now (bytes)."""
    try:
        with open("/proc/self/statm") as f:
            return float(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource

        return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _median_time(fn, repeats: int) -> float:
    """Median wall time of `fn`: on a shared machine the median tracks what a run will get, where
    the best of several would time the one quiet moment."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def layer_overhead(device=None) -> float:
    """Seconds of dispatch per transformer block per forward, measured: forward + backward of one
    tiny Llama block (8 wide, 4 tokens: no arithmetic to speak of), divided by three."""
    import torch
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    cfg = LlamaConfig(hidden_size=8, intermediate_size=16, num_attention_heads=2, num_key_value_heads=1,
                      num_hidden_layers=1, max_position_embeddings=8, attn_implementation="sdpa")
    layer, rope = LlamaDecoderLayer(cfg, 0).to(device), LlamaRotaryEmbedding(cfg).to(device)
    x = torch.randn(1, 4, 8, device=device, requires_grad=True)
    pos = torch.arange(4, device=device)[None]

    def step():
        out = layer(x, position_embeddings=rope(x, pos), position_ids=pos)
        (out[0] if isinstance(out, tuple) else out).sum().backward()
        if device is not None and torch.device(device).type == "cuda":
            torch.cuda.synchronize()

    step()
    return _median_time(step, 7) / 3


@functools.lru_cache(maxsize=1)
def present() -> Device:
    """This machine, measured: a short matmul probe for FLOP/s and a copy for bandwidth (medians of a
    few), one tiny block's forward + backward for the dispatch overhead, the memory from torch.cuda
    or the system (about half a second)."""
    import torch

    if torch.cuda.is_available():
        dev = torch.device("cuda")
        n = 4096
        a32, b32 = torch.randn(n, n, device=dev), torch.randn(n, n, device=dev)
        a16, b16 = a32.bfloat16(), b32.bfloat16()
        x = torch.empty(256 * 2**20 // 4, device=dev)

        def sync(f):
            return lambda: (f(), torch.cuda.synchronize())

        sync(lambda: a16 @ b16)()
        f32 = 2 * n**3 / _median_time(sync(lambda: a32 @ b32), 5)
        f16 = 2 * n**3 / _median_time(sync(lambda: a16 @ b16), 5)
        bw = 2 * x.numel() * 4 / _median_time(sync(lambda: x.clone()), 5)
        free, total = torch.cuda.mem_get_info()
        del a32, b32, a16, b16, x
        return Device(f"present ({torch.cuda.get_device_name()})", "cuda", float(total), f32, f16, bw,
                      float(total - free) + 0.1 * GB, _overhead_or(dev, 250e-6), process_age(),
                      "this machine's GPU, measured", measured=True)
    n = 512
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    f32 = 2 * n**3 / _median_time(lambda: a @ b, 5)
    ab, bb = a.bfloat16(), b.bfloat16()
    f16 = 2 * n**3 / _median_time(lambda: ab @ bb, 3)
    x = torch.empty(32 * 2**20 // 4)
    bw = 2 * x.numel() * 4 / _median_time(lambda: x.clone(), 5)
    threads = torch.get_num_threads()
    # This process has imported what a stage imports (planning a stage imports its module), so its
    # resident memory and its age stand for a stage process's runtime memory and start-up time.
    return Device(f"present (cpu, {threads} threads)", "cpu", _cpu_memory(), f32, f16, bw, current_rss(),
                  _overhead_or(None, TABLE["cpu-2core"].layer_overhead_s), process_age(),
                  "this machine's CPU, measured", measured=True)


def _overhead_or(device, default: float) -> float:
    try:
        return layer_overhead(device)
    except (ImportError, TypeError, ValueError, RuntimeError):  # another transformers layout: the table's figure
        return default


def process_age() -> float:
    """Seconds since this process started (Linux /proc; elsewhere a typical 4 s)."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = float(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 4.0


def with_runtime(dev: Device, runtime_bytes: float) -> Device:
    return replace(dev, runtime_bytes=runtime_bytes)


def reset_peak() -> None:
    """Start measuring a peak: torch's CUDA peak counter, or Linux's resident high-water mark
    (writing 5 to /proc/self/clear_refs resets VmHWM), so a stage's peak is its own even when
    earlier stages ran in the same process."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:  # not Linux, or not permitted: the peak then covers the whole process so far
        pass


def read_peak() -> float:
    """Peak memory since `reset_peak` (bytes): CUDA allocated + the context's resident share, or
    the process's resident high-water mark."""
    import torch

    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        return float(torch.cuda.max_memory_allocated() + max(0, total - free - torch.cuda.memory_reserved()))
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
