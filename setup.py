"""erc-megatron: Entropy Ratio Clipping (ERC) RL post-training on megatron-core.

torch is pinned and must be installed first (`pip install torch==2.13.0`): a bare
`torch` requirement on a machine without torch pulls the newest CUDA build.
"""
from setuptools import find_packages, setup

setup(
    name="erc-megatron",
    version="0.1.0",
    description="Entropy Ratio Clipping (ERC) with DAPO / GPPO on megatron-core, with an SGLang rollout path",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["erc_megatron", "erc_megatron.*"]) + ["erc_megatron.patches"],
    package_dir={"erc_megatron.patches": "patches"},
    install_requires=[
        "torch>=2.6",
        "megatron-core>=0.16,<0.20",
        "numpy",
        "packaging",
        "pyyaml",
        "requests",
        "safetensors",
        "transformers>=4.51",
        "tokenizers",
        "pyarrow",
        "math-verify",
        "tensorboard",
        "matplotlib",
    ],
    extras_require={
        "gpu": ["transformer-engine[pytorch]", "sglang", "sglang-router"],
        "mpi": ["mpi4py>=4.1"],
        "dev": ["pytest>=7", "pytest-timeout", "openai"],
    },
    entry_points={"console_scripts": ["erc-megatron=erc_megatron.cli:main"]},
)
