"""Import SGLang's Python modules (request classes, front-end client) on a machine without a GPU.

`pip install sglang==0.5.23 --no-deps` gives SGLang's code; its request classes
(`sglang.srt.managers.io_struct`) and front-end (`sglang.RuntimeEndpoint`, `sgl.function`)
are plain Python, but importing them walks through modules that import GPU-only packages at
module level: `triton` (sglang.srt.utils.common), `tvm_ffi` (sglang.kernels), `torchvision`
(sglang.srt.multimodal, whose PyPI wheels need a matching CUDA torch). Nothing from them runs
when building requests or driving a server over HTTP, so they are replaced by stand-ins:

- triton: SGLang's own stand-in, `sglang/_platform_stubs.py` (written for Apple Silicon, where
  Triton does not exist); its `install_platform_stubs` only acts on darwin/arm64 with MPS, so
  this module runs its Triton part here and skips its MPS part (no torch.mps / Tensor.to patches);
- torchvision, tvm_ffi: modules of `_platform_stubs._MockModule` (every attribute a stand-in,
  decorators pass through), served by an import hook for those names only.

This changes process-wide import state: use it in a process of its own (the interop test runs
one), never in the learner or the embedded server. Checked against SGLang 0.5.23; any other
version, or a changed `_platform_stubs`, fails loudly.
"""
from __future__ import annotations

import importlib.machinery
import importlib.metadata
import importlib.util
import os
import sys
import types

CHECKED = "0.5.23"
GPU_ONLY = ("torchvision", "tvm_ffi")
# transformers decides once, at import, whether torchvision exists; it must see the truth (no)
_IMPORT_FIRST = ("transformers.image_utils", "transformers.processing_utils", "transformers.video_utils")


class SGLangShapeChangedError(RuntimeError):
    """The installed SGLang is not the version these stand-ins were written for."""


class _StandInFinder:
    """Serves `_MockModule`s for GPU_ONLY packages (and their submodules)."""

    def __init__(self, mock_module_cls):
        self._cls = mock_module_cls

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] not in GPU_ONLY:
            return None
        return importlib.machinery.ModuleSpec(fullname, self, is_package=True)

    def create_module(self, spec):
        return self._cls(spec.name)

    def exec_module(self, module):
        pass


def _load_platform_stubs(package_dir: str):
    path = os.path.join(package_dir, "_platform_stubs.py")
    if not os.path.isfile(path):
        raise SGLangShapeChangedError(f"{path} is missing (checked against SGLang {CHECKED})")
    spec = importlib.util.spec_from_file_location("_erc_sglang_platform_stubs", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    for name in ("install_platform_stubs", "_MockModule", "_patch_non_blocking"):
        if not hasattr(module, name):
            raise SGLangShapeChangedError(f"sglang/_platform_stubs.py has no {name} (checked against {CHECKED})")
    return module


def import_sglang():
    """Import and return the `sglang` package with the stand-ins above in place."""
    if "sglang" in sys.modules:
        return sys.modules["sglang"]
    try:
        version = importlib.metadata.version("sglang")
    except importlib.metadata.PackageNotFoundError as exc:
        raise ImportError(f"sglang is not installed: pip install sglang=={CHECKED} --no-deps") from exc
    if version != CHECKED:
        raise SGLangShapeChangedError(f"sglang {version} is installed; these stand-ins were checked against {CHECKED}")
    spec = importlib.util.find_spec("sglang")
    stubs = _load_platform_stubs(os.path.dirname(spec.origin))
    for name in _IMPORT_FIRST:
        importlib.import_module(name)

    import torch

    if importlib.util.find_spec("triton") is None:
        # Run install_platform_stubs' Triton part: it checks sys.platform, platform.machine()
        # and MPS, then stubs Triton, then patches torch.mps and Tensor.to (skipped here).
        real_sys, real_platform, real_patch = stubs.sys, stubs.platform, stubs._patch_non_blocking
        real_mps, real_mps_available = torch.mps, torch.backends.mps.is_available
        stubs.sys = types.SimpleNamespace(platform="darwin", modules=sys.modules, meta_path=sys.meta_path)
        stubs.platform = types.SimpleNamespace(machine=lambda: "arm64")
        stubs._patch_non_blocking = lambda: None
        torch.backends.mps.is_available = lambda: True
        torch.mps = types.SimpleNamespace()  # receives the MPS stand-ins, then is put back
        try:
            stubs.install_platform_stubs()
        finally:
            stubs.sys, stubs.platform, stubs._patch_non_blocking = real_sys, real_platform, real_patch
            torch.mps, torch.backends.mps.is_available = real_mps, real_mps_available
        if "triton" not in sys.modules:
            raise SGLangShapeChangedError("sglang/_platform_stubs.install_platform_stubs no longer stubs triton "
                                          f"(checked against {CHECKED})")
    sys.meta_path.insert(0, _StandInFinder(stubs._MockModule))
    import sglang  # noqa: PLC0415

    return sglang
