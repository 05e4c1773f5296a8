#!/usr/bin/env bash
# SGLang's Python code for the interop test (tests/rollout/test_sglang_interop.py), without its
# GPU stack: sglang itself with --no-deps (its pins would replace torch), then the pure-Python
# packages that importing its request classes and front-end needs. triton, torchvision and
# tvm_ffi are NOT installed: erc_megatron.patches.sglang_cpu_import puts stand-ins in their place.
set -euo pipefail
pip install --no-deps sglang==0.5.23 psutil pybase64 starlette msgspec pyzmq dill compressed-tensors gguf loguru \
    partial-json-parser sentencepiece
pip install aiohttp openai
