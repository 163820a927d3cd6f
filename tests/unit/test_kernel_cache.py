"""The C++ kernel cache (`qwenrun.kernels`): keyed by what the library depends on, safe against killed and
concurrent builds, and filled while a model loads, never in its first request.

A real compile takes 30+ s, so all but the last test stand in for torch's builder with `fake_load`, which
keeps torch's protocol (its `lock` baton: take it or wait while the file exists) and writes a Python module
in place of the library.
"""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from qwenrun import kernels

ROOT = Path(__file__).resolve().parents[2]

# A process that loads the kernels through `cpu_ops` with torch's `load` replaced by fake_load.
# argv: mode ("build" or "hang": killed while it holds torch's baton), seconds one build takes,
# file that gets one line per build, file to wait for before loading (a start barrier, or "-").
SCRIPT = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    import torch.utils.cpp_extension as ext
    from torch.utils.file_baton import FileBaton
    from qwenrun import kernels

    mode, seconds, builds, barrier = sys.argv[1], float(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]

    def fake_load(name, sources, build_directory, **kwargs):
        baton = FileBaton(os.path.join(build_directory, "lock"))
        if baton.try_acquire():
            try:
                with builds.open("a") as f:
                    f.write(f"{os.getpid()}\\n")
                time.sleep(3600 if mode == "hang" else seconds)
                Path(build_directory, name + ".py").write_text("def argmax(x):\\n    return x.argmax(-1)\\n")
            finally:
                baton.release()
        else:
            baton.wait()
        return kernels._import(Path(build_directory, name + ".py"))

    ext.load = fake_load
    kernels._unsupported = lambda: None
    print("READY", flush=True)
    while barrier != "-" and not os.path.exists(barrier):
        time.sleep(0.01)
    ops = kernels.cpu_ops()
    print("LOADED" if ops is not None and ops.__name__ == kernels.NAME else f"NOT LOADED {ops}", flush=True)
""")


def _spawn(tmp_path: Path, mode: str = "build", seconds: float = 0.0, barrier: str = "-") -> subprocess.Popen:
    env = {**os.environ, "QWENRUN_CACHE_DIR": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-c", SCRIPT, mode, str(seconds), str(tmp_path / "builds.log"), barrier],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _builds(tmp_path: Path) -> list[str]:
    log = tmp_path / "builds.log"
    return log.read_text().split() if log.exists() else []


def _fake_compile(calls: list[Path]):
    def compile_(directory: Path):
        calls.append(directory)
        path = directory / f"{kernels.NAME}.py"
        path.write_text("ok = True\n")
        return kernels._import(path)

    return compile_


def test_cache_dir_is_keyed_by_source_torch_python_and_flags(tmp_path, monkeypatch):
    monkeypatch.setenv("QWENRUN_CACHE_DIR", str(tmp_path))
    base = kernels.build_dir()
    assert kernels.build_dir() == base and base.parent == tmp_path / "kernels"
    other_process = subprocess.run(
        [sys.executable, "-c", "from qwenrun import kernels; print(kernels.build_dir())"],
        env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, check=True,
    )
    assert other_process.stdout.strip() == str(base)  # no per-process salt (hash randomisation, pids)

    edited = tmp_path / "cpu_kernels.cpp"
    edited.write_bytes(kernels.SOURCE.read_bytes() + b"\n// edited\n")
    same = tmp_path / "same" / "cpu_kernels.cpp"  # another checkout, same source
    same.parent.mkdir()
    same.write_bytes(kernels.SOURCE.read_bytes())
    changes = {
        "source": (kernels, "SOURCE", edited),
        "torch install": (torch, "__file__", str(tmp_path / "venv2" / "torch" / "__init__.py")),
        "python": (sys, "executable", str(tmp_path / "venv2" / "bin" / "python")),
        "flags": (kernels, "CFLAGS", (*kernels.CFLAGS, "-DEXTRA")),
        "cpu": (kernels, "_cpu_flags", lambda: {"avx2"}),
    }
    seen = {base}
    for what, (owner, name, value) in changes.items():
        with monkeypatch.context() as m:
            m.setattr(owner, name, value)
            changed = kernels.build_dir()
        assert changed not in seen, f"the cache directory ignores the {what}"
        seen.add(changed)
    with monkeypatch.context() as m:
        m.setattr(kernels, "SOURCE", same)
        assert kernels.build_dir() == base  # the checkout's path is not part of the key


def test_finished_build_loads_without_lock_or_compile(tmp_path, monkeypatch):
    calls: list[Path] = []
    monkeypatch.setattr(kernels, "_compile", _fake_compile(calls))
    directory = tmp_path / "k"
    assert kernels.load_or_build(directory, wait_s=5).ok
    assert calls == [directory] and (directory / "built").read_text() == f"{kernels.NAME}.py"
    (directory / "lock").touch()  # a stale torch baton, and a live holder of our lock: neither matters now
    with open(directory / "qwenrun.lock") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        assert kernels.load_or_build(directory, wait_s=0).ok
    assert calls == [directory]


def test_unfinished_build_is_cleared_and_redone(tmp_path, monkeypatch, caplog):
    """A killed build leaves torch's baton and half-written files; the next one starts clean."""
    calls: list[Path] = []
    monkeypatch.setattr(kernels, "_compile", _fake_compile(calls))
    directory = tmp_path / "k"
    directory.mkdir()
    for leftover in ("lock", "build.ninja", "cpu_kernels.o", f"{kernels.NAME}.so"):
        (directory / leftover).write_text("half")
    assert kernels.load_or_build(directory, wait_s=5).ok
    assert calls == [directory]
    left = sorted(p.name for p in directory.iterdir() if p.name != "__pycache__")  # the fake's bytecode
    assert left == ["built", "qwenrun.lock", f"{kernels.NAME}.py"]
    assert "was killed before it finished" in caplog.text
    assert "compiling qwenrun's CPU kernels (once, ~30 s)" in caplog.text


def test_wait_for_a_live_builder_is_bounded(tmp_path, monkeypatch, caplog):
    """Another live process holding the lock past the wait: this one runs on torch kernels and says why."""
    monkeypatch.setenv("QWENRUN_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("QWENRUN_KERNEL_BUILD_WAIT", "0.3")
    monkeypatch.setattr(kernels, "_unsupported", lambda: None)
    monkeypatch.setattr(kernels, "_compile", lambda d: pytest.fail("compiled while another process held the lock"))
    directory = kernels.build_dir()
    directory.mkdir(parents=True)
    with open(directory / "qwenrun.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write("4242")
        held.flush()
        start = time.monotonic()
        assert kernels.cpu_ops.__wrapped__() is None
    assert time.monotonic() - start < 5
    assert "waiting for process 4242" in caplog.text
    assert "process 4242 has been compiling them" in caplog.text and "using torch kernels" in caplog.text


def test_build_killed_by_sigkill_does_not_block_the_next_process(tmp_path):
    """The hang seen in the field: a build killed while it held torch's baton; every later start waited."""
    killed = _spawn(tmp_path, mode="hang")
    deadline = time.monotonic() + 60
    while not _builds(tmp_path):  # it holds the baton now
        assert killed.poll() is None and time.monotonic() < deadline, killed.communicate()
        time.sleep(0.05)
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    [directory] = (tmp_path / "cache" / "kernels").iterdir()
    assert (directory / "lock").exists()  # the stale baton
    later = _spawn(tmp_path)
    try:
        out, err = later.communicate(timeout=60)
    finally:
        later.kill()
    assert "LOADED" in out, err
    assert "was killed before it finished" in err
    assert len(_builds(tmp_path)) == 2 and not (directory / "lock").exists()


def test_concurrent_loads_build_once(tmp_path):
    go = tmp_path / "go"
    procs = [_spawn(tmp_path, seconds=2, barrier=str(go)) for _ in range(2)]
    try:
        for p in procs:
            assert p.stdout.readline().strip() == "READY", p.stderr.read()
        go.touch()  # both call cpu_ops at the same moment
        results = [p.communicate(timeout=60) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert all("LOADED" in out for out, _ in results), results
    assert len(_builds(tmp_path)) == 1
    assert sum("waiting for process" in err for _, err in results) == 1
    assert sum("compiling qwenrun's CPU kernels (once" in err for _, err in results) == 1


def test_loading_a_model_builds_kernels_before_the_first_forward(tmp_path, monkeypatch):
    """`LLM(...)` (and so `qwenrun serve`, before it reports healthy) compiles; requests never do."""
    from qwenrun import LLM, SamplingParams
    from qwenrun.models.qwen3 import Qwen3ForCausalLM
    from tiny import make_checkpoint

    folder, _ = make_checkpoint("dense-untied-gqa2", tmp_path / "ckpt")
    real = kernels.cpu_ops()  # what this machine has (None without AVX-512)
    events: list[str] = []

    def compile_(directory: Path):
        events.append("build")
        if real is None:
            raise RuntimeError("no compiler in this test")
        return real

    forward = Qwen3ForCausalLM.forward
    monkeypatch.setattr(Qwen3ForCausalLM, "forward",
                        lambda self, *a, **k: events.append("forward") or forward(self, *a, **k))
    monkeypatch.setattr(kernels, "_compile", compile_)
    monkeypatch.setattr(kernels, "_unsupported", lambda: None)
    monkeypatch.setenv("QWENRUN_CACHE_DIR", str(tmp_path / "cache"))
    kernels.cpu_ops.cache_clear()
    try:
        llm = LLM(folder, dtype="float32", kv_cache_memory=8 << 20)
        assert events[:1] == ["build"]
        llm.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    finally:
        kernels.cpu_ops.cache_clear()  # later tests see this machine's real kernels again
    assert events.count("build") == 1 and "forward" in events


def test_kernels_build_for_real_where_the_cpu_can_run_them():
    """The one real compile (shared with test_kernels.py through the user cache): found or built, where keyed."""
    ops = kernels.cpu_ops()
    if kernels._unsupported() is not None:
        assert ops is None
        return
    assert ops is not None and ops.__name__ == kernels.NAME
    assert Path(ops.__file__).parent == kernels.build_dir()
    assert (kernels.build_dir() / "built").read_text() == Path(ops.__file__).name
    x = torch.randn(3, 100)
    assert torch.equal(ops.argmax(x), x.argmax(-1))
