"""The C++ decode kernels (`qwenrun/csrc/cpu_kernels.cpp`), compiled for this CPU on first use.

Built with torch's extension builder into a per-user cache (about 30 s once; later processes load
the cached library). They need an x86 CPU with AVX512-BF16 and AVX512-VNNI (Zen 4, Sapphire Rapids
and newer) and a C++ compiler; without either, every caller falls back to torch kernels and this
module logs why, once. `QWENRUN_CPU_KERNELS=0` turns them off (for comparisons).
"""

from __future__ import annotations

import logging
import os
import platform
from functools import cache
from pathlib import Path
from types import ModuleType

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "cpu_kernels.cpp"
REQUIRED_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_vnni")
# Up to this many activation rows, streaming the weight beats a oneDNN GEMM (for int8/int4, a GEMM over
# the weight expanded to bf16); measured crossovers on a Zen 4 core pair: ~10, ~40 and ~56 rows.
GEMV_MAX_ROWS = {"bf16": 8, "int8": 32, "int4": 48}


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def _build_dir() -> Path:
    root = Path(os.environ.get("QWENRUN_CACHE_DIR", Path.home() / ".cache" / "qwenrun"))
    tag = f"torch{torch.__version__.replace('+', '_')}-py{platform.python_version()}"
    path = root / "kernels" / tag
    path.mkdir(parents=True, exist_ok=True)
    return path


@cache
def cpu_ops() -> ModuleType | None:
    """The compiled kernels, or None (with the reason logged) where they cannot run."""
    if os.environ.get("QWENRUN_CPU_KERNELS", "1") == "0":
        logger.info("C++ decode kernels disabled by QWENRUN_CPU_KERNELS=0")
        return None
    missing = [f for f in REQUIRED_FLAGS if f not in _cpu_flags()]
    if platform.machine() not in ("x86_64", "AMD64") or missing:
        logger.warning("C++ decode kernels need x86 AVX-512 with BF16 and VNNI (missing: %s); using torch kernels",
                       ", ".join(missing) or platform.machine())
        return None
    try:
        from torch.utils.cpp_extension import load

        return load(
            name="qwenrun_cpu_kernels",
            sources=[str(SOURCE)],
            extra_cflags=["-O3", "-march=native", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            build_directory=str(_build_dir()),
            verbose=False,
        )
    except Exception as exc:  # no compiler, no ninja, a failed build: run, slower, and say so
        logger.warning("could not build the C++ decode kernels (%s); using torch kernels", exc)
        return None


def gemv_ops(x: torch.Tensor, weight_format: str = "bf16") -> ModuleType | None:
    """The kernels when `x` (a CPU activation, [..., K]) has few enough rows to stream weights."""
    if x.device.type != "cpu" or x.numel() > GEMV_MAX_ROWS[weight_format] * x.shape[-1]:
        return None
    return cpu_ops()


def fused_ops(x: torch.Tensor) -> ModuleType | None:
    """The kernels for an inference-time element-wise op on `x` (they record no autograd graph)."""
    if x.device.type != "cpu" or torch.is_grad_enabled() or x.dtype not in (torch.bfloat16, torch.float32):
        return None
    return cpu_ops()
