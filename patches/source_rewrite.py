"""Rewrite one construct inside a third-party function, verified.

The CPU fixes for megatron-core are one-token changes inside long upstream functions (a
`device="cuda"` literal, a `torch.cuda.current_device()` call). Copying those functions would fork
them; instead we take the upstream source, check that every construct we rewrite is present (the
"shape" we expect), substitute it, and recompile the function in its own module's globals. If
upstream changed, the check fails with a message naming the function, the construct and the
megatron-core versions the patch was checked against.
"""
from __future__ import annotations

import inspect
import sys
import types
import textwrap
from dataclasses import dataclass
from typing import Any


class UpstreamChangedError(RuntimeError):
    """An upstream function no longer has the shape a patch was written for."""


@dataclass(frozen=True)
class Rewrite:
    """Replace `old` by `new` in the function's source; `old` must occur at least once."""

    old: str
    new: str


_ORIGINALS: dict[tuple[int, str], Any] = {}


def _unwrap(fn: Any) -> Any:
    return getattr(fn, "__func__", fn)


def rewrite_function(owner: Any, name: str, rewrites: list[Rewrite], checked: str) -> None:
    """Rewrite `owner.name` (a module-level function or a plain method of a class) in place.

    `checked` names the upstream versions the rewrite was verified against, for the error message.
    Idempotent: a function already rewritten by this module is left alone.
    """
    key = (id(owner), name)
    if key in _ORIGINALS:
        return
    qualname = getattr(owner, '__qualname__', getattr(owner, '__name__', owner))
    where = f"{getattr(owner, '__module__', '')}.{qualname}.{name}"
    try:
        raw = inspect.getattr_static(owner, name)
    except AttributeError as exc:
        raise UpstreamChangedError(f"{where} no longer exists (patch checked against {checked})") from exc
    wrapper = None
    if isinstance(raw, (staticmethod, classmethod)):
        wrapper = type(raw)
        raw = raw.__func__
    fn = inspect.unwrap(_unwrap(raw))  # decorators (contextmanager) are re-applied from the source
    if not inspect.isfunction(fn):
        raise UpstreamChangedError(f"{where} is no longer a plain function (patch checked against {checked})")
    if set(fn.__code__.co_freevars) - {"__class__"}:
        raise UpstreamChangedError(f"{where} became a closure; cannot rewrite (patch checked against {checked})")
    source = textwrap.dedent(inspect.getsource(fn))
    for rw in rewrites:
        if rw.old not in source:
            raise UpstreamChangedError(
                f"{where} no longer contains {rw.old!r}; the CPU fix for it must be re-checked "
                f"(patch checked against {checked})"
            )
        source = source.replace(rw.old, rw.new)
    filename = f"<erc_megatron.patches rewrite of {where}>"
    namespace: dict[str, Any] = {}
    uses_super = "__class__" in fn.__code__.co_freevars
    if uses_super:
        # zero-argument super() needs a __class__ cell: compile inside a class body, then bind the
        # new code to the ORIGINAL function's closure (whose cell holds the real class).
        source = "class _ErcRewriteScope:\n" + textwrap.indent(source, "    ")
    exec(compile(source, filename, "exec"), fn.__globals__, namespace)  # noqa: S102 - verified upstream source
    new = vars(namespace["_ErcRewriteScope"])[fn.__name__] if uses_super else namespace[fn.__name__]
    new = _unwrap(new) if not isinstance(new, (staticmethod, classmethod)) else new
    if uses_super:
        inner = inspect.unwrap(new)
        if inner.__code__.co_freevars != fn.__code__.co_freevars or inner is not new:
            raise UpstreamChangedError(f"{where}: cannot rebind its closure (patch checked against {checked})")
        new = types.FunctionType(inner.__code__, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
        new.__kwdefaults__ = fn.__kwdefaults__
        new.__qualname__ = fn.__qualname__
    if wrapper is not None and not isinstance(new, (staticmethod, classmethod)):
        new = wrapper(new)
    _ORIGINALS[key] = inspect.getattr_static(owner, name)
    _rebind(owner, name, _ORIGINALS[key], new)


def replace_attribute(owner: Any, name: str, new: Any, expected_signature: list[str], checked: str) -> None:
    """Replace `owner.name` by `new` after checking the upstream parameter names."""
    key = (id(owner), name)
    if key in _ORIGINALS:
        return
    old = getattr(owner, name, None)
    where = f"{getattr(owner, '__name__', owner)}.{name}"
    if old is None:
        raise UpstreamChangedError(f"{where} no longer exists (patch checked against {checked})")
    params = list(inspect.signature(old).parameters)
    if params != expected_signature:
        raise UpstreamChangedError(
            f"{where} has parameters {params}, expected {expected_signature} (patch checked against {checked})"
        )
    _ORIGINALS[key] = old
    _rebind(owner, name, old, new)


def _rebind(owner: Any, name: str, old: Any, new: Any) -> None:
    """Set owner.name, and for a module-level function also every `from x import name` copy of it
    in already-imported modules of the same top-level package (megatron imports by name)."""
    setattr(owner, name, new)
    if not isinstance(owner, types.ModuleType):
        return
    top = owner.__name__.split(".")[0] + "."
    for mod_name, mod in list(sys.modules.items()):
        if mod is owner or mod is None or not mod_name.startswith(top):
            continue
        for attr, value in list(vars(mod).items()):
            if value is old:
                setattr(mod, attr, new)

