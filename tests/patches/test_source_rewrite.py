import contextlib
import sys
import types

import pytest

from erc_megatron.patches.source_rewrite import Rewrite, UpstreamChangedError, replace_attribute, rewrite_function

_SRC = '''
import contextlib

def alloc(n):
    return ("cuda", n)

class Base:
    def where(self):
        return "base"

class Child(Base):
    def where(self):
        return "child:" + super().where() + ":cuda"

    @contextlib.contextmanager
    def ctx(self):
        yield "cuda"
'''


def _fake_module(name):
    mod = types.ModuleType(name)
    mod.__file__ = f"<{name}>"
    exec(compile(_SRC, mod.__file__, "exec"), mod.__dict__)
    sys.modules[name] = mod
    # inspect.getsource needs real source lines: register them with linecache
    import linecache

    linecache.cache[mod.__file__] = (len(_SRC), None, _SRC.splitlines(True), mod.__file__)
    return mod


def test_rewrite_module_function_and_importers():
    mod = _fake_module("fakeupstream.core")
    importer = types.ModuleType("fakeupstream.user")
    importer.alloc = mod.alloc  # `from core import alloc`
    sys.modules["fakeupstream.user"] = importer
    rewrite_function(mod, "alloc", [Rewrite('"cuda"', '"cpu"')], "test 1.0")
    assert mod.alloc(3) == ("cpu", 3)
    assert importer.alloc(3) == ("cpu", 3)


def test_rewrite_method_with_super_and_contextmanager():
    mod = _fake_module("fakeupstream.core2")
    rewrite_function(mod.Child, "where", [Rewrite(':cuda"', ':cpu"')], "test 1.0")
    assert mod.Child().where() == "child:base:cpu"
    rewrite_function(mod.Child, "ctx", [Rewrite('yield "cuda"', 'yield "cpu"')], "test 1.0")
    with mod.Child().ctx() as v:
        assert v == "cpu"


def test_missing_construct_fails_loudly_naming_function_and_versions():
    mod = _fake_module("fakeupstream.core3")
    with pytest.raises(UpstreamChangedError) as err:
        rewrite_function(mod, "alloc", [Rewrite("torch.cuda.current_device()", '"cpu"')], "megatron-core 9.9")
    assert "alloc" in str(err.value) and "torch.cuda.current_device()" in str(err.value) and "9.9" in str(err.value)
    assert mod.alloc(1) == ("cuda", 1)  # untouched


def test_replace_attribute_checks_signature():
    mod = _fake_module("fakeupstream.core4")
    with pytest.raises(UpstreamChangedError, match=r"parameters \['n'\]"):
        replace_attribute(mod, "alloc", lambda a, b: None, ["a", "b"], "test 1.0")
    replace_attribute(mod, "alloc", lambda n: "new", ["n"], "test 1.0")
    assert mod.alloc(0) == "new"


def test_megatron_cpu_patches_apply_and_are_idempotent():
    from erc_megatron.patches.megatron_cpu import apply_cpu_patches

    assert apply_cpu_patches(force=True) is True
    assert apply_cpu_patches(force=True) is True
    from megatron.core.transformer import utils

    assert utils.get_default_causal_mask(3).device.type == "cpu"
    from megatron.core.tensor_parallel import random

    import torch

    tracker = random.CudaRNGStatesTracker()
    tracker.add("x", 123)
    with tracker.fork("x"):
        a = torch.rand(2)
    with tracker.fork("x"):
        b = torch.rand(2)
    assert not torch.equal(a, b)  # the tracked state advanced
    tracker2 = random.CudaRNGStatesTracker()
    tracker2.add("x", 123)
    with tracker2.fork("x"):
        assert torch.equal(torch.rand(2), a)  # same seed, same stream, on the CPU generator
