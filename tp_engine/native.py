"""Build a small C helper with ``cc`` at first use and cache the shared library.

Used by the shared-memory all-reduce (comm/shm_allreduce.c) and the AVX2
matmuls (kernels/cpu_gemm.c). The library is keyed by a hash of the source,
compiler, flags and platform, and installed atomically, so ranks compiling
at once each load a complete file.
"""
from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CACHE_ENV = "TP_ENGINE_CACHE_DIR"


def cache_dir() -> Path:
    """``$TP_ENGINE_CACHE_DIR``, else ``$XDG_CACHE_HOME/tp_engine``, else ``~/.cache/tp_engine``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "tp_engine"
    return Path.home() / ".cache" / "tp_engine"


def _build(src: Path, flags: list[str], out_dir: Path, timeout: float) -> Path:
    cc = os.environ.get("CC") or "cc"
    if shutil.which(cc) is None:
        raise RuntimeError(f"no C compiler ({cc!r} not on PATH)")
    key = hashlib.sha256(
        b"\0".join([src.read_bytes(), cc.encode(), " ".join(flags).encode(), platform.machine().encode(), sys.platform.encode()])
    ).hexdigest()[:16]
    so = out_dir / f"{src.stem}-{key}.so"
    if so.exists():
        return so
    out_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(prefix=f".{src.stem}-", suffix=".so", dir=out_dir)
    os.close(fd)
    try:
        proc = subprocess.run([cc, *flags, "-o", tmp, str(src)], capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"{cc} failed: {proc.stderr.strip()[-2000:]}")
        os.replace(tmp, so)  # atomic
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return so


def compile_shared(src: Path, flags: list[str], timeout: float = 300) -> Path:
    """The path of ``src`` compiled with ``flags`` (cached); a private temp dir if the cache is unwritable."""
    try:
        return _build(src, flags, cache_dir(), timeout)
    except OSError:
        return _build(src, flags, Path(tempfile.gettempdir()) / f"tp_engine-{os.getuid()}", timeout)
