"""llama.cpp's files for the same weights as a qwenrun benchmark's checkpoint, made with llama.cpp's own tools.

`q4_0_from_checkpoint`: convert_hf_to_gguf.py (from a llama.cpp source tree: llama-cpp-python's sdist
has one under vendor/llama.cpp) writes bf16, llama.cpp's `llama_model_quantize` with its default mix
makes Q4_0 (the output projection Q6_K, as `llama-quantize` does), and the bf16 file is deleted.

`GgufStream`: a GGUF written one tensor at a time from a generator, for a checkpoint too large to
exist in bf16 on this disk. Its metadata is copied from a GGUF of the same model family made by the
tools above (so tokenizer and hyperparameters are what convert_hf_to_gguf writes) with the block
count replaced; tensors are quantized by ggml's own `ggml_quantize_chunk` (what llama_model_quantize
calls; gguf-py has no Q6_K quantizer), two row ranges at a time.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

DEFAULT_SRC = os.environ.get("LLAMA_CPP_SRC", "/tmp/pkgs/llama_cpp_python-0.3.36/vendor/llama.cpp")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def tokenizer_dir() -> Path:
    return Path(os.environ.get("QWENRUN_TOKENIZER_DIR",
                               Path(__file__).resolve().parents[2] / "shared/assets/qwen3-tokenizer"))


def gguf_module(src: str = DEFAULT_SRC):
    """gguf-py from the llama.cpp tree (matches its converter); PyPI's `gguf` otherwise."""
    sys.path.insert(0, str(Path(src) / "gguf-py"))
    import gguf

    return gguf


def q4_0_from_checkpoint(folder: Path, out: Path, src: str = DEFAULT_SRC) -> Path:
    """`out` (Q4_0 GGUF of the bf16 checkpoint `folder`), made once."""
    if out.is_file():
        return out
    for name in TOKENIZER_FILES:  # the converter reads the vocabulary beside the weights
        if not (folder / name).is_file():
            shutil.copy(tokenizer_dir() / name, folder / name)
    bf16 = out.with_suffix(".bf16.gguf")
    env = dict(os.environ, PYTHONPATH=str(Path(src) / "gguf-py"))
    done = subprocess.run([sys.executable, str(Path(src) / "convert_hf_to_gguf.py"), str(folder), "--outtype", "bf16",
                           "--outfile", str(bf16)], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"convert_hf_to_gguf.py failed on {folder}:\n{done.stderr[-4000:]}")
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
    params.nthread = os.cpu_count() or 2
    tmp = out.with_suffix(".part")
    if llama_cpp.llama_model_quantize(str(bf16).encode(), str(tmp).encode(), ctypes.byref(params)) != 0:
        raise SystemExit(f"llama_model_quantize failed on {bf16}")
    bf16.unlink()
    tmp.rename(out)
    return out


def ggml_quantize(array: np.ndarray, qtype: int) -> np.ndarray:
    """`array` (float32, rows of the last dimension) as ggml type `qtype`'s blocks, by ggml's C code."""
    import llama_cpp

    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_row_size.restype = ctypes.c_size_t
    lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    src = np.ascontiguousarray(array, dtype=np.float32)
    k = src.shape[-1]
    rows = src.size // k
    row_bytes = lib.ggml_row_size(qtype, k)
    out = np.empty((*src.shape[:-1], row_bytes), dtype=np.uint8)
    step = -(-rows // 2)

    def part(r0: int) -> None:  # ctypes releases the GIL: the two halves run on both cores
        n = min(step, rows - r0)
        lib.ggml_quantize_chunk(qtype, src.ctypes.data + r0 * k * 4, out.ctypes.data + r0 * row_bytes, 0, n, k, None)

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(part, range(0, rows, step)))
    return out


class GgufStream:
    """Write `out` from `template`'s metadata and tensors given in order by name, each quantized
    as `template` stores the same role (blk.0's types for every block)."""

    def __init__(self, template: Path, out: Path, block_count: int, src: str = DEFAULT_SRC) -> None:
        self.gguf = gguf = gguf_module(src)
        reader = gguf.GGUFReader(str(template))
        arch = reader.fields["general.architecture"].contents()
        self.types = {t.name: t.tensor_type for t in reader.tensors}
        self.writer = gguf.GGUFWriter(str(out), arch)
        skip = {"GGUF.version", "GGUF.tensor_count", "GGUF.kv_count", "general.architecture"}
        for name, field in reader.fields.items():
            if name in skip:
                continue
            value = block_count if name == f"{arch}.block_count" else field.contents()
            vtype = field.types[0]
            sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            self.writer.add_key_value(name, value, vtype, sub_type=sub)

    def role_type(self, name: str):
        parts = name.split(".")
        if parts[0] == "blk":
            parts[1] = "0"
        return self.types[".".join(parts)]

    def write(self, tensors: Iterator[tuple[str, np.ndarray]], infos: list[tuple[str, tuple[int, ...]]]) -> None:
        """`infos`: every (name, numpy shape) in write order; `tensors` yields the same names in the
        same order as float32 arrays, each quantized and written before the next is asked for."""
        gguf = self.gguf
        for name, shape in infos:
            qtype = self.role_type(name)
            if qtype == gguf.GGMLQuantizationType.F32:
                self.writer.add_tensor_info(name, shape, np.dtype(np.float32), 4 * int(np.prod(shape)))
            else:  # quantized tensors are declared by their byte shape
                raw = gguf.quants.quant_shape_to_byte_shape(shape, qtype)
                self.writer.add_tensor_info(name, raw, np.dtype(np.uint8), int(np.prod(raw)), raw_dtype=qtype)
        self.writer.write_header_to_file()
        self.writer.write_kv_data_to_file()
        self.writer.write_ti_data_to_file()
        for (name, shape), (got, array) in zip(infos, tensors, strict=True):
            assert got == name and array.shape == shape, (got, name, array.shape, shape)
            qtype = self.role_type(name)
            data = array if qtype == gguf.GGMLQuantizationType.F32 else ggml_quantize(array, int(qtype))
            self.writer.write_tensor_data(data)
        self.writer.close()
