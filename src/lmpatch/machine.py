"""What machine a number was measured on: the CPU model and the instruction sets torch can use.

Speed differs by ~2.5x between the machines lmpatch runs on (AMX bfloat16 against AVX2
float32), so every timing - benchmarks, and the training time in a trained editor's
manifest - is printed or stored next to this.
"""
from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

__all__ = ["AVX2_ONLY", "ISA_FLAGS", "cpu_info", "cpu_line", "peak_rss_mb"]

ISA_FLAGS = (
    "sse4_2", "avx", "avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
    "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8", "asimd", "sve",
)


#: Environment that holds torch's own (ATen) kernels and oneDNN's to AVX2. Set before
#: torch is imported, it makes an AVX-512/AMX machine time what an AVX2-only one (an older
#: AMD EPYC) runs: float32 throughout, as there. oneDNN computes the packed float32
#: products of an edit's passes (lmpatch.model.packed), so its limit belongs here too.
#: MKL's too: on an AMD EPYC MKL never runs AVX-512 code, so the limit changed nothing
#: there, but on an Intel Xeon without it MKL's float32 products ran AVX-512 under the
#: hold (25 blocks' products at 18 tokens: 37 ms, against 43 ms held to AVX2).
AVX2_ONLY = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


def cpu_info() -> dict[str, Any]:
    """The CPU model and the instruction sets torch can use, so timings are not compared blindly."""
    name, flags = None, set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and name is None:
                name = value.strip()
            elif key.strip() in ("flags", "Features") and not flags:
                flags = set(value.split())
    except OSError:
        pass
    name = name or platform.processor() or platform.machine()
    capability = version = None
    try:
        import torch

        version = torch.__version__
        capability = torch.backends.cpu.get_cpu_capability()
        threads = torch.get_num_threads()
    except (ImportError, AttributeError):
        threads = None
    limits = {k: os.environ[k] for k in AVX2_ONLY if k in os.environ}
    return {"model": name, "isa": [f for f in ISA_FLAGS if f in flags], "torch_capability": capability,
            "cores": os.cpu_count(), "torch_threads": threads, "torch": version, "isa_limits": limits}


def cpu_line(cpu: dict[str, Any]) -> str:
    isa = " ".join(cpu.get("isa") or []) or "unknown"
    return (f"{cpu.get('model')} ({cpu.get('cores')} cores; ISA: {isa}; torch kernels: "
            f"{cpu.get('torch_capability') or '?'}; torch threads: {cpu.get('torch_threads')}; "
            f"torch {cpu.get('torch') or '?'}{_limits(cpu)})")


def _limits(cpu: dict[str, Any]) -> str:
    limits = cpu.get("isa_limits") or {}
    return "; limited by " + " ".join(f"{k}={v}" for k, v in sorted(limits.items())) if limits else ""


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (what a user must provision)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024
