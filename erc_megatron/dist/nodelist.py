"""Slurm host lists ('node[01-03,07],rack[1-2]-gpu[1-2]') expanded as `scontrol show hostnames` does.

No torch import: launch scripts call `python -m erc_megatron.dist.nodelist LIST` where Slurm's own
`scontrol` is not usable (a dry run on a machine without Slurm, or without a slurm.conf).
"""
from __future__ import annotations

import re
import sys

_RANGE = re.compile(r"(\d+)(?:-(\d+))?")


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside brackets."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"host list {text!r}: ']' without '['")
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise ValueError(f"host list {text!r}: '[' without ']'")
    parts.append(text[start:])
    return [p for p in (p.strip() for p in parts) if p]


def _expand_ranges(spec: str, whole: str) -> list[str]:
    out: list[str] = []
    for item in spec.split(","):
        m = _RANGE.fullmatch(item.strip())
        if not m:
            raise ValueError(f"host list {whole!r}: bad range {item!r} (expected N or N-M, digits only)")
        lo, hi = m.group(1), m.group(2) or m.group(1)
        if int(hi) < int(lo):
            raise ValueError(f"host list {whole!r}: range {item!r} goes down")
        # Slurm pads to the width of the lower bound ('[008-011]' -> 008..011, '[9-11]' -> 9..11)
        out.extend(f"{i:0{len(lo)}d}" for i in range(int(lo), int(hi) + 1))
    return out


def _expand_host(pattern: str, whole: str) -> list[str]:
    """One comma-free host pattern; several bracket groups give their product, left one slowest."""
    m = re.match(r"([^\[]*)\[([^\]]*)\](.*)", pattern)
    if not m:
        return [pattern]
    prefix, spec, rest = m.groups()
    tails = _expand_host(rest, whole)
    return [f"{prefix}{n}{t}" for n in _expand_ranges(spec, whole) for t in tails]


def expand_slurm_nodelist(nodelist: str) -> list[str]:
    """'node[01-03,07],gpu5' -> ['node01', 'node02', 'node03', 'node07', 'gpu5'].

    Raises ValueError naming the list on malformed brackets or ranges.
    """
    hosts: list[str] = []
    for part in _split_top_level(nodelist):
        hosts.extend(_expand_host(part, nodelist))
    return hosts


def main(argv: list[str] | None = None) -> int:
    """`python -m erc_megatron.dist.nodelist LIST`: one host per line, like `scontrol show hostnames`."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m erc_megatron.dist.nodelist 'node[01-03],gpu5'", file=sys.stderr)
        return 2
    try:
        hosts = expand_slurm_nodelist(args[0])
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print("\n".join(hosts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
