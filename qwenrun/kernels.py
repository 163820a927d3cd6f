"""The C++ decode kernels (`qwenrun/csrc/cpu_kernels.cpp`), compiled for this CPU once, when a model loads.

Built with torch's extension builder into a per-user cache (about 30 s once; later processes import
the cached library). They need a C++ compiler and an x86 CPU with either AVX512-BF16 and AVX512-VNNI
(Zen 4, Sapphire Rapids and newer) or AVX2, FMA and F16C (Haswell, Zen 1-3 and later: most servers
and laptops, on which torch's own decode ops stream far below memory bandwidth); -march=native picks
the instruction set when the library compiles. Without either, every caller falls back to torch
kernels and this module logs why, once. `QWENRUN_CPU_KERNELS=0` turns them off (for comparisons).

The loader calls `prepare` so the build happens while a model loads (before `qwenrun serve` reports
healthy), never inside a request. The cache directory is named by a hash of everything the library
depends on (the source, the torch install, the Python executable, the compiler, its flags and the CPU's
features), so two virtualenvs or checkouts keep two libraries instead of rebuilding one in turn. A build
runs under an flock, which the OS releases when its holder dies, and ends by writing `built`: a process
that finds `built` imports the library without locking; one that takes the lock without it clears what a
killed build left (torch's own `lock` file would otherwise make every later build wait forever).
`QWENRUN_CACHE_DIR` moves the cache (default `~/.cache/qwenrun`); `QWENRUN_KERNEL_BUILD_WAIT` bounds the
wait for another process's build (600 s), after which this process runs on torch kernels.

Model and layer code never names a kernel: it calls operations (`rms_norm`, `qk_norm_rope_store`,
`decode_attention`, `argmax`, the bf16 and quantized linears, `dequantize`, `routed_experts`,
`gdn_decode`, `gdn_prefill`), each a torch reference wrapped by `op`. `KERNELS` is the one table that
says, per operation, on which arguments (device, dtype, shape) the C++ kernel computes it instead;
everything else runs the reference, as does an operation whose kernel this CPU's build lacks (the
AVX2 build has no Gated DeltaNet kernels).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache, update_wrapper
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "cpu_kernels.cpp"
NAME = "qwenrun_cpu_kernels"
CFLAGS = ("-O3", "-march=native", "-fopenmp")
LDFLAGS = ("-fopenmp",)
# either set of /proc/cpuinfo flags runs the kernels (cpu_kernels.cpp compiles the first one present)
REQUIRED_FLAGS = {"avx512": ("avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_vnni"),
                  "avx2": ("avx2", "fma", "f16c")}
KERNEL_DTYPES = (torch.bfloat16, torch.float32)
KERNEL_HEAD_DIMS = (16, 32, 64, 128, 256)  # decode attention
# Up to this many activation rows, streaming the weight beats a oneDNN GEMM (for int8/int4, a GEMM over
# the weight expanded to bf16); measured crossovers on a Zen 4 core pair (AVX-512): ~40 (bf16, since
# the kernels take tiles of rows: 0.6B-shaped layer linears at 32 rows 0.92x F.linear's time, at 48
# 1.08x), ~40 and ~56 rows. On a Zen 3 core pair (AVX2) torch's bf16 GEMM has no bf16 instructions
# to use and the kernels were 2-5x faster at every size measured (1-192 rows, a 6144 x 1024 weight, on a loaded host), so bf16
# streams up to 64 rows; int8/int4 keep the AVX-512 bounds, because the kernels quantize activations
# and prompts past them should meet the unquantized GEMM's accuracy (tests/parity/test_hybrid_loading.py).
_MAX_ROWS = {"avx512": {"bf16": 32, "int8": 32, "int4": 48, "int8_x16": 32, "int4_x16": 48},
             "avx2": {"bf16": 64, "int8": 32, "int4": 48}}
BUILD_WAIT_S = 600.0  # for another process's build; QWENRUN_KERNEL_BUILD_WAIT overrides
_DONE, _LOCK, _TORCH_BATON = "built", "qwenrun.lock", "lock"


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def _isa() -> str | None:
    """The instruction set the kernels build for on this CPU (cpu_kernels.cpp's choice), or None."""
    flags = _cpu_flags()
    if platform.machine() not in ("x86_64", "AMD64"):
        return None
    return next((isa for isa, needed in REQUIRED_FLAGS.items() if flags.issuperset(needed)), None)


def _unsupported() -> str | None:
    """Why this machine cannot run the kernels, or None."""
    if _isa() is not None:
        return None
    flags = _cpu_flags()
    missing = [f for f in REQUIRED_FLAGS["avx2"] if f not in flags]
    return f"missing: {', '.join(missing) or platform.machine()}"


GEMV_MAX_ROWS = _MAX_ROWS[_isa() or "avx512"]


def build_identity() -> dict[str, str]:
    """Everything the compiled library depends on; its hash names the cache directory."""
    cxx = os.environ.get("CXX", "c++")  # the compiler torch's builder runs
    return {
        "source": hashlib.sha256(SOURCE.read_bytes()).hexdigest(),
        "torch": f"{torch.__version__} {Path(torch.__file__).resolve().parent}",
        "python": f"{sys.executable} {sys.version}",
        "compiler": f"{cxx} {os.path.realpath(shutil.which(cxx) or cxx)}",
        "flags": " ".join(CFLAGS + LDFLAGS),
        "cpu": " ".join(sorted(_cpu_flags())),  # -march=native: a home directory shared by two CPU models
    }


def build_dir() -> Path:
    root = Path(os.environ.get("QWENRUN_CACHE_DIR", Path.home() / ".cache" / "qwenrun"))
    digest = hashlib.sha256(json.dumps(build_identity(), sort_keys=True).encode()).hexdigest()[:16]
    return root / "kernels" / f"torch{torch.__version__.replace('+', '_')}-py{platform.python_version()}-{digest}"


@cache
def cpu_ops() -> ModuleType | None:
    """The compiled kernels, or None (with the reason logged) where they cannot run."""
    if os.environ.get("QWENRUN_CPU_KERNELS", "1") == "0":
        logger.info("C++ decode kernels disabled by QWENRUN_CPU_KERNELS=0")
        return None
    reason = _unsupported()
    if reason is not None:
        logger.warning("C++ decode kernels need x86 AVX2 with FMA and F16C, or AVX-512 with BF16 and VNNI (%s); "
                       "using torch kernels", reason)
        return None
    try:
        return load_or_build(build_dir(), float(os.environ.get("QWENRUN_KERNEL_BUILD_WAIT", BUILD_WAIT_S)))
    except Exception as exc:  # no compiler or ninja, a failed build, another's build too slow: run slower, say so
        logger.warning("could not build the C++ decode kernels (%s); using torch kernels", exc)
        return None


def prepare(device: torch.device, dtype: torch.dtype) -> None:
    """Find or build the kernels now if a model of `dtype` on `device` will use them (called at load)."""
    if device.type == "cpu" and dtype in KERNEL_DTYPES:
        cpu_ops()


def _inference(x: torch.Tensor) -> bool:
    """An inference-time op on CPU in a kernel dtype (the kernels record no autograd graph)."""
    return x.device.type == "cpu" and not torch.is_grad_enabled() and x.dtype in KERNEL_DTYPES


def _streams(x: torch.Tensor, weight_format: str) -> bool:
    """A CPU activation `x` [..., K] with few enough rows that streaming the weight beats a GEMM."""
    return x.device.type == "cpu" and x.numel() <= GEMV_MAX_ROWS[weight_format] * x.shape[-1]


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])  # [N, K]


def _quantized(cache: Any) -> bool:
    """An int8 cache's K or V (`layers.attention.QuantizedKV`, a NamedTuple: attention imports this module)."""
    return isinstance(cache, tuple)


def _kv_values(cache: Any) -> torch.Tensor:
    return cache.data if _quantized(cache) else cache


def _gemv_quantized(lib: ModuleType, x: torch.Tensor, fmt: str, parts: list[torch.Tensor], group_size: int,
                    bias: torch.Tensor | None, act: str = "none") -> torch.Tensor:
    # the _x16 formats exist only where the library runs them (`quant.linear.interleavable`)
    if fmt.startswith("int8"):
        y = lib.gemv_int8(_rows(x), *parts, bias, act, fmt == "int8_x16")
    else:
        y = lib.gemv_int4(_rows(x), *parts, group_size, bias, act, fmt == "int4_x16")
    return y.view(*x.shape[:-1], -1)


def _dequantize(lib: ModuleType, fmt: str, parts: list[torch.Tensor], group_size: int,
                dtype: torch.dtype) -> torch.Tensor:
    if fmt.startswith("int8"):
        return lib.dequantize_int8(*parts, dtype, fmt == "int8_x16")
    return lib.dequantize_int4(*parts, group_size, dtype, fmt == "int4_x16")


@dataclass(frozen=True)
class Kernel:
    """Where the C++ kernel computes an operation. Both callables take the operation's own arguments.

    `applies(*args)`: whether the kernel takes these arguments (device, dtype, shape); `call(library,
    *args)`: runs it and returns what the operation's torch reference returns; `functions`: the library
    functions it calls, all of which this CPU's build must have."""

    applies: Callable[..., bool]
    call: Callable[..., Any]
    functions: tuple[str, ...]


# operation -> when and how its C++ kernel runs; the arguments are those of the reference (see each op)
KERNELS: dict[str, Kernel] = {
    # (x, residual, weight, eps) -> (normed, new residual)
    "rms_norm": Kernel(lambda x, residual, weight, eps: _inference(x),
                       lambda lib, x, residual, weight, eps: lib.rms_norm(x, residual, weight, eps), ("rms_norm",)),
    # (qkv, q_weight, k_weight, cos, sin, eps, nh, nkv, k_cache, v_cache, slots) -> (q, k_cache, v_cache):
    # the kernel needs a cache to write to and rotates whole heads (no partial rotary)
    "qk_norm_rope_store": Kernel(
        lambda qkv, qw, kw, cos, sin, eps, nh, nkv, kc, vc, slots: kc is not None
        and cos.shape[-1] == _kv_values(kc).shape[-1] and _inference(qkv),
        lambda lib, qkv, qw, kw, cos, sin, eps, nh, nkv, kc, vc, slots: (
            lib.qk_norm_rope_int8(qkv, qw, kw, cos, sin, eps, nh, nkv, kc.data, vc.data, kc.scale, vc.scale, slots)
            if _quantized(kc) else lib.qk_norm_rope(qkv, qw, kw, cos, sin, eps, nh, nkv, kc, vc, slots), kc, vc),
        ("qk_norm_rope", "qk_norm_rope_int8"),
    ),
    # (q [B, nh, d], k_cache, v_cache, group: DecodeGroup, scale) -> [B, nh*d]; int8 caches read as stored
    "decode_attention": Kernel(
        lambda q, kc, vc, g, scale: q.device.type == "cpu" and q.shape[-1] in KERNEL_HEAD_DIMS
        and q.dtype in KERNEL_DTYPES,
        lambda lib, q, kc, vc, g, scale: (
            lib.decode_attention_int8(q, kc.data, vc.data, kc.scale, vc.scale, g.key_slots, g.context_lens, scale)
            if _quantized(kc) else lib.decode_attention(q, kc, vc, g.key_slots, g.context_lens, scale)),
        ("decode_attention", "decode_attention_int8"),
    ),
    # (x [B, V],) -> [B]; torch's CPU argmax over a 152k vocabulary costs ~0.5 ms a step
    "argmax": Kernel(lambda x: _inference(x), lambda lib, x: lib.argmax(x), ("argmax",)),
    # (logits [B, V] fp32, bitmask [B, W] int32, rows) -> None, in place: a grammar row in microseconds
    "apply_token_bitmask": Kernel(
        lambda logits, bitmask, rows: logits.device.type == "cpu" and logits.dtype == torch.float32
        and logits.is_contiguous() and bitmask.is_contiguous() and bitmask.dtype == torch.int32,
        lambda lib, logits, bitmask, rows: lib.apply_token_bitmask(logits, bitmask,
                                                                   torch.as_tensor(rows, dtype=torch.long)),
        ("apply_token_bitmask",),
    ),
    # (x [..., K], weight [N, K] bf16, bias, act) -> [..., N] (act "silu_mul": [..., N/2])
    "bf16_linear": Kernel(
        lambda x, w, bias, act="none": _streams(x, "bf16"),
        lambda lib, x, w, bias, act="none": lib.gemv_bf16(_rows(x), w, bias, act).view(*x.shape[:-1], -1),
        ("gemv_bf16",),
    ),
    # (x [..., K], fmt, parts, group_size, bias, act) -> [..., N]; the int8 kernel reads 32-input blocks
    "quantized_linear": Kernel(
        lambda x, fmt, parts, group_size, bias, act="none": (fmt != "int8" or x.shape[-1] % 32 == 0)
        and _streams(x, fmt),
        _gemv_quantized,
        ("gemv_int8", "gemv_int4"),
    ),
    # (fmt, parts, group_size, dtype) -> the dense weight [N, K]
    "dequantize": Kernel(lambda fmt, parts, group_size, dtype: parts[0].device.type == "cpu", _dequantize,
                         ("dequantize_int8", "dequantize_int4")),
    # (x [T, H], weights [T, k], experts [T, k], module: layers.moe.Experts) -> [T, H]: one call runs every
    # chosen expert once for all the tokens that chose it, for modules whose stacked weights it reads and
    # decode-sized T (past the streaming bound, grouped_experts' GEMMs per expert win)
    "routed_experts": Kernel(
        lambda x, weights, experts, m: m.fused_format is not None and _streams(x, m.fused_format)
        and (m.fused_format != "int8" or (x.shape[-1] % 32 == 0 and m.fused_weights()[1][0].shape[-1] % 32 == 0)),
        lambda lib, x, weights, experts, m: lib.moe_gemv(x, experts, weights, m.fused_format, *m.fused_weights()),
        ("moe_gemv",),
    ),
    # (mixed_qkv [B, conv_dim], conv_states [S, conv_dim, K-1], conv_weight [conv_dim, K], slots [B] (read),
    #  out_slots [B] (written), a [B, Hv], b [B, Hv], A_log [Hv], dt_bias [Hv], states [S, Hv, dk, dv] fp32,
    #  z [B, Hv, dv], norm_weight [dv], eps, num_k_heads) -> [B, Hv, dv]: one Gated DeltaNet decode step.
    #  The kernel takes head dims in whole vectors and everything but the fp32 state in the model dtype;
    #  it raises if a sequence writes a slot another sequence of the batch reads or writes
    "gdn_decode": Kernel(
        lambda x, cs, cw, slots, out_slots, a, b, A_log, dt_bias, states, z, nw, eps, hk: _inference(x)
        and states.dtype == torch.float32 and states.shape[-1] % 16 == 0 and states.shape[-2] % 16 == 0
        and cs.is_contiguous() and states.is_contiguous()
        and cs.dtype == cw.dtype == a.dtype == b.dtype == z.dtype == nw.dtype == x.dtype,
        lambda lib, *args: lib.gdn_decode(*args),
        ("gdn_decode",),
    ),
    # (mixed [n, conv_dim], window [conv_dim, K-1] | None, conv_weight [conv_dim, K], a [n, Hv], b [n, Hv],
    #  A_log [Hv], dt_bias [Hv], state [Hv, dk, dv] fp32 | None, num_v_heads, k_head_dim, num_k_heads)
    #  -> (o [n, Hv, dv] before the gated norm, window, state after the n tokens): one sequence's prefill
    #  chunk as a token loop, ~6x faster than the torch chunked form on CPU (benchmarks/RESULTS.md)
    "gdn_prefill": Kernel(
        lambda x, window, cw, a, b, A_log, dt_bias, state, hv, dk, hk: _inference(x) and dk % 16 == 0
        and ((x.shape[-1] - 2 * hk * dk) // hv) % 16 == 0 and cw.dtype == a.dtype == b.dtype == x.dtype
        and (window is None or window.dtype == x.dtype) and (state is None or state.dtype == torch.float32),
        lambda lib, *args: tuple(lib.gdn_prefill(*args)),
        ("gdn_prefill",),
    ),
}

Reference = TypeVar("Reference", bound=Callable[..., Any])


def op(name: str) -> Callable[[Reference], Reference]:
    """Decorator: the torch reference of operation `name` becomes the operation, which runs the C++
    kernel where `KERNELS[name]` applies to the call's (positional) arguments and the kernels are
    available, else the reference itself (kept as `.reference`, the oracle tests compare against).

    The decision is three Python calls per op (the predicate, the cached `cpu_ops`, the library's
    functions check), as cheap as the inline checks it replaces."""
    kernel = KERNELS[name]
    applies, call, functions = kernel.applies, kernel.call, kernel.functions

    def register(reference: Reference) -> Reference:
        def dispatch(*args: Any) -> Any:
            if applies(*args):
                lib = _library(functions)
                if lib is not None:
                    return call(lib, *args)
            return reference(*args)

        update_wrapper(dispatch, reference)
        dispatch.reference = reference  # type: ignore[attr-defined]
        return dispatch  # type: ignore[return-value]

    return register


def _library(functions: tuple[str, ...]) -> ModuleType | None:
    """The kernels library if it has all of `functions` (this CPU's build may lack some), else None."""
    lib = cpu_ops()
    return lib if lib is not None and all(hasattr(lib, f) for f in functions) else None


def uses_kernel(name: str, *args: Any) -> bool:
    """Whether operation `name` on these arguments runs its C++ kernel (the choice `op` makes)."""
    kernel = KERNELS[name]
    return kernel.applies(*args) and _library(kernel.functions) is not None


def load_or_build(directory: Path, wait_s: float) -> ModuleType:
    """The library in `directory`: imported if a finished build is there, else built under the lock.

    Raises:
        TimeoutError: another live process has held the build lock for more than `wait_s` seconds.
    """
    module = _load_finished(directory)
    if module is not None:
        return module
    directory.mkdir(parents=True, exist_ok=True)
    with _exclusive(directory / _LOCK, wait_s):
        module = _load_finished(directory)  # built by the process we waited for
        if module is not None:
            return module
        _clear_unfinished(directory)
        logger.warning("compiling qwenrun's CPU kernels (once, ~30 s) into %s", directory)
        module = _compile(directory)
        done = directory / f"{_DONE}.tmp"
        done.write_text(Path(module.__file__ or "").name)
        done.replace(directory / _DONE)  # atomic: readers see no marker or a whole one
        return module


def _load_finished(directory: Path) -> ModuleType | None:
    try:
        library = (directory / _DONE).read_text().strip()
    except FileNotFoundError:
        return None
    try:
        return _import(directory / library)
    except (ImportError, OSError) as exc:
        logger.warning("the cached CPU kernels in %s do not load (%s); building them again", directory, exc)
        return None


def _clear_unfinished(directory: Path) -> None:
    """With the lock held and no `built` marker, everything here is a killed or failed build's."""
    if (directory / _TORCH_BATON).exists():
        logger.warning("removing %s, the lock of a kernel build that was killed before it finished",
                       directory / _TORCH_BATON)
    for path in directory.iterdir():
        if path.name != _LOCK:
            shutil.rmtree(path) if path.is_dir() else path.unlink()


@contextmanager
def _exclusive(path: Path, wait_s: float) -> Iterator[None]:
    """An flock on `path`, waited for up to `wait_s`; it cannot go stale: the OS drops it with its holder."""
    import fcntl  # POSIX only, as the kernels are (they need /proc/cpuinfo)

    with open(path, "a+") as f:
        deadline, told = time.monotonic() + wait_s, False
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                f.seek(0)
                holder = f.read().strip() or "?"
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"process {holder} has been compiling them in {path.parent} "
                                       f"for over {wait_s:g} s") from None
                if not told:
                    logger.warning("waiting for process %s, which is compiling qwenrun's CPU kernels", holder)
                    told = True
                time.sleep(0.1)
        f.truncate(0)
        f.write(str(os.getpid()))  # for the message of whoever waits
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _compile(directory: Path) -> ModuleType:
    from torch.utils.cpp_extension import load

    source = directory / SOURCE.name
    shutil.copyfile(SOURCE, source)  # the build files then name no checkout's path
    return load(name=NAME, sources=[str(source)], extra_cflags=list(CFLAGS), extra_ldflags=list(LDFLAGS),
                build_directory=str(directory), verbose=False)


def _import(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"{path} is not a loadable module")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
