"""erc-megatron: Entropy Ratio Clipping (ERC) RL post-training on megatron-core.

torch is pinned and must be installed first (`pip install torch==2.13.0`): a bare
`torch` requirement on a machine without torch pulls the newest CUDA build.
"""
import os
import re

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def read_version() -> str:
    """erc_megatron/__init__.py's __version__, the one version source (read, not imported: no deps at build)."""
    with open(os.path.join(HERE, "erc_megatron", "__init__.py")) as f:
        match = re.search(r'^__version__ = "([^"]+)"$', f.read(), re.M)
    if match is None:
        raise RuntimeError("erc_megatron/__init__.py has no `__version__ = \"...\"` line")
    return match.group(1)


setup(
    name="erc-megatron",
    version=read_version(),
    description="Entropy Ratio Clipping (ERC) with DAPO / GPPO on megatron-core, with an SGLang rollout path",
    long_description=open(os.path.join(HERE, "README.md")).read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.11",
    packages=find_packages(include=["erc_megatron", "erc_megatron.*"]) + ["erc_megatron.patches"],
    package_dir={"erc_megatron.patches": "patches"},
    # ranges = what the tests ran on: Python 3.11 (megatron-core 0.16.1) and 3.12 (0.17.1, 0.18.2, 0.19.2),
    # torch 2.13.0; lower bounds are the versions installed there
    install_requires=[
        "torch>=2.13,<2.14",
        "megatron-core>=0.16.1,<0.20",
        "numpy>=2.0,<3",
        "packaging>=24",
        "pyyaml>=6.0",
        "requests>=2.32",
        "safetensors>=0.8",
        "transformers>=5.25,<6",
        "tokenizers>=0.23",
        "pyarrow>=26",
        "math-verify>=0.9",
        "tensorboard>=2.21",
        "matplotlib>=3.11",
    ],
    extras_require={
        "gpu": ["transformer-engine[pytorch]", "sglang", "sglang-router"],
        "mpi": ["mpi4py>=4.1"],
        "dev": ["pytest>=9", "pytest-timeout>=2.4", "openai>=3.60",
                "ruff>=0.17", "mypy>=2.4", "pre-commit>=4.7", "types-PyYAML", "types-requests"],
    },
    entry_points={"console_scripts": ["erc-megatron=erc_megatron.cli:main"]},
)
