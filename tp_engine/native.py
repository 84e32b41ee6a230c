"""Build a small C helper with ``cc`` at first use and cache the shared library.

Used by the shared-memory all-reduce (comm/shm_allreduce.c), the matmuls
(kernels/cpu_gemm.c, kernels/gguf_gemm.c) and their thread pool
(kernels/pool.c). The library is keyed by a hash of the source
(and the local headers it includes), compiler, flags and platform, and
installed atomically, so ranks compiling at once each load a complete file.
"""
from __future__ import annotations

import hashlib
import os
import platform
import re
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


_INCLUDE = re.compile(rb'^\s*#\s*include\s+"([^"]+)"', re.MULTILINE)


def _sources(src: Path) -> list[bytes]:
    """The bytes of ``src`` and of the ``#include "..."`` files it pulls in from its own folder, recursively
    (gguf_gemm.c's NEON kernels live in headers: a change there must rebuild too)."""
    seen: dict[Path, bytes] = {}
    todo = [src]
    while todo:
        p = todo.pop()
        if p in seen or not p.is_file():
            continue
        seen[p] = p.read_bytes()
        todo += [p.parent / m.decode() for m in _INCLUDE.findall(seen[p])]
    return [seen[p] for p in sorted(seen)]


def _build(src: Path, flags: list[str], out_dir: Path, timeout: float) -> Path:
    cc = os.environ.get("CC") or "cc"
    if shutil.which(cc) is None:
        raise RuntimeError(f"no C compiler ({cc!r} not on PATH)")
    key = hashlib.sha256(
        b"\0".join([*_sources(src), cc.encode(), " ".join(flags).encode(), platform.machine().encode(), sys.platform.encode()])
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
