"""Callables named by import path (`package.module:function`), the one way users plug in code.

`reward.fn` and `loss.surrogate` both take such a path; errors name the config field (`what`).
"""
from __future__ import annotations

import importlib
from collections.abc import Callable

from erc_megatron.model.config import ConfigError


def is_import_path(text: str) -> bool:
    return isinstance(text, str) and (":" in text or "." in text)


def split_path(path: str, what: str) -> tuple[str, str]:
    if not isinstance(path, str) or not path.strip():
        raise ConfigError(f"{what} path must look like 'package.module:function', got {path!r}")
    module, sep, attr = path.strip().partition(":")
    if not sep:
        module, _, attr = module.rpartition(".")
    if not module or not attr:
        raise ConfigError(f"{what} path must look like 'package.module:function', got {path!r}")
    return module, attr


def load_callable(path: str, what: str) -> Callable:
    """Import the callable at `path`; every failure is a ConfigError naming `what`, the path and the cause."""
    module_name, attr = split_path(path, what)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise ConfigError(f"{what} {path!r}: module {module_name!r} not found ({exc})") from exc
    fn = module
    for part in attr.split("."):
        if not hasattr(fn, part):
            public = sorted(n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n)))
            raise ConfigError(f"{what} {path!r}: module {module_name!r} has no attribute {attr!r}; "
                              f"callables there: {', '.join(public) or 'none'}")
        fn = getattr(fn, part)
    if not callable(fn):
        raise ConfigError(f"{what} {path!r}: {attr!r} is a {type(fn).__name__}, not callable")
    return fn
