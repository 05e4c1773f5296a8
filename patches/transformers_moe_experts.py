"""Per-expert checkpoint names for transformers' fused MoE expert parameters.

transformers 5.x keeps a Qwen3-MoE layer's experts as two 3-D parameters, `mlp.experts.gate_up_proj`
[experts, 2 x moe_intermediate, hidden] (each expert's gate rows, then its up rows: its forward
chunks the projection in two) and `mlp.experts.down_proj` [experts, hidden, moe_intermediate], and
converts to and from the per-expert names of checkpoints on disk (`mlp.experts.{e}.gate_proj.weight`,
`up_proj`, `down_proj`) only while loading and saving. Weight updates (SGLang's protocol, and what
erc-megatron sends) use the on-disk names, so the embedded server addresses views of the fused
parameters by those names; writing a view writes the fused parameter.

Checked against transformers 5.25.0 (`Qwen3MoeExperts`; the same fused layout is used by its other
MoE models through `@use_experts_implementation`). A module with `gate_up_proj` / `down_proj`
parameters of another shape fails loudly instead of being mis-sliced.
"""
from __future__ import annotations

import torch

CHECKED = "transformers 5.25.0 (Qwen3MoeExperts)"
_FUSED = ("gate_up_proj", "down_proj")


class UpstreamChangedError(RuntimeError):
    """transformers' fused expert layout is not the one these views were written for."""


def fused_expert_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Modules holding fused 3-D expert parameters, by module name."""
    out = {}
    for name, module in model.named_modules():
        own = dict(module.named_parameters(recurse=False))
        if _FUSED[0] in own and own[_FUSED[0]].dim() == 3:
            out[name] = module
    return out


def per_expert_views(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], set[str]]:
    """({checkpoint name: view into a fused parameter}, {fused parameter names the views replace})."""
    views: dict[str, torch.Tensor] = {}
    replaced: set[str] = set()
    for prefix, module in fused_expert_modules(model).items():
        gate_up, down = module.gate_up_proj, getattr(module, "down_proj", None)
        if not isinstance(down, torch.nn.Parameter) or down.dim() != 3:
            raise UpstreamChangedError(f"{prefix}: gate_up_proj is 3-D but down_proj is not a 3-D parameter "
                                       f"(views checked against {CHECKED})")
        experts, two_f, hidden = gate_up.shape
        if two_f % 2 or tuple(down.shape) != (experts, hidden, two_f // 2) or getattr(module, "has_bias", False):
            raise UpstreamChangedError(f"{prefix}: fused expert shapes {tuple(gate_up.shape)} / {tuple(down.shape)} "
                                       f"are not [E, 2F, H] / [E, H, F] without biases (views checked against "
                                       f"{CHECKED})")
        f = two_f // 2
        for e in range(experts):
            # views of .data: writing them writes the parameter, without autograd history
            views[f"{prefix}.{e}.gate_proj.weight"] = gate_up.data[e, :f]
            views[f"{prefix}.{e}.up_proj.weight"] = gate_up.data[e, f:]
            views[f"{prefix}.{e}.down_proj.weight"] = down.data[e]
        replaced.update({f"{prefix}.gate_up_proj", f"{prefix}.down_proj"})
    return views, replaced


def checkpoint_named_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict under checkpoint names: fused experts replaced by per-expert views.

    Views follow the parameters' storage at the time of the call: take them again after anything
    replaces a parameter's `.data` (the engine's release / resume of weights does)."""
    named = dict(model.state_dict(keep_vars=True))
    views, replaced = per_expert_views(model)
    for name in replaced:
        named.pop(name, None)
    named.update(views)
    return named


__all__ = ["CHECKED", "UpstreamChangedError", "checkpoint_named_tensors", "fused_expert_modules", "per_expert_views"]
