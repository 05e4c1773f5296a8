"""Router load-balance figures of a MoE model over a training step.

`RouterStats` hooks every megatron-core router (its forward output `(probs, routing_map)` and its
input) while active and sums, per layer, the tokens each expert received and each expert's softmax
probability mass. `summarise` turns those sums into step figures:
- moe/aux_loss: the Switch load-balancing loss without its coefficient, E * sum_e f_e * P_e with
  f_e = tokens routed to e / (tokens x top-k) and P_e = mean router probability of e (1.0 when
  perfectly balanced), averaged over layers; what megatron's aux_loss adds, divided by
  moe_aux_loss_coeff;
- moe/load_max_over_mean: max over experts of tokens / mean tokens per expert, in the worst layer
  (1.0 when balanced, E / top-k when every token goes to the same experts).
Both are ratios, so counting a token on every tensor-parallel rank that saw it changes nothing:
the sums are all-reduced over the whole group given (default: every rank).
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def load_balance_figures(tokens_per_expert: torch.Tensor, prob_per_expert: torch.Tensor, num_tokens: torch.Tensor,
                         topk: int) -> dict[str, float]:
    """Figures from per-layer sums ([layers, experts], [layers, experts], [layers]); layers with no tokens skipped."""
    seen = num_tokens > 0
    if not bool(seen.any()):
        return {}
    t, p, n = tokens_per_expert[seen].double(), prob_per_expert[seen].double(), num_tokens[seen].double()
    experts = t.shape[1]
    f = t / (n[:, None] * topk)
    mean_p = p / n[:, None]
    aux = experts * (f * mean_p).sum(dim=1)
    ratio = t.max(dim=1).values / t.mean(dim=1)
    return {"moe/aux_loss": float(aux.mean()), "moe/load_max_over_mean": float(ratio.max())}


class RouterStats:
    """Context manager: while inside, every router forward of `model` adds to per-layer sums."""

    def __init__(self, model, num_layers: int, num_experts: int, topk: int, group=None):
        self.routers = [m for m in _modules(model) if type(m).__name__.endswith("Router") and hasattr(m, "weight")
                        and getattr(m, "layer_number", None) is not None]
        self.topk, self.group = topk, group
        self.tokens = torch.zeros(num_layers, num_experts, dtype=torch.float64)
        self.probs = torch.zeros(num_layers, num_experts, dtype=torch.float64)
        self.count = torch.zeros(num_layers, dtype=torch.float64)
        self._handles = []

    def __enter__(self) -> RouterStats:
        self._handles = [r.register_forward_hook(self._hook) for r in self.routers]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    @torch.no_grad()
    def _hook(self, router, inputs, output) -> None:
        hidden = inputs[0].detach()
        routing_map = output[1].detach()
        layer = router.layer_number - 1  # megatron numbers layers globally from 1
        logits = hidden.reshape(-1, hidden.shape[-1]).double() @ router.weight.detach().double().t()
        self.tokens[layer] += routing_map.reshape(-1, routing_map.shape[-1]).double().sum(0).cpu()
        self.probs[layer] += torch.softmax(logits, dim=-1).sum(0).cpu()
        self.count[layer] += logits.shape[0]

    def summarise(self) -> dict[str, float]:
        """Step figures, reduced over the group (collective: every rank of the group calls it)."""
        sums = torch.cat([self.tokens.reshape(-1), self.probs.reshape(-1), self.count])
        if dist.is_initialized():
            device = self.routers[0].weight.device if self.routers else torch.device("cpu")
            on_device = sums.to(device)
            dist.all_reduce(on_device, group=self.group)
            sums = on_device.cpu()
        layers, experts = self.tokens.shape
        tokens = sums[: layers * experts].view(layers, experts)
        probs = sums[layers * experts: 2 * layers * experts].view(layers, experts)
        return load_balance_figures(tokens, probs, sums[2 * layers * experts:], self.topk)


def _modules(model):
    chunks = model if isinstance(model, (list, tuple)) else [model]
    for chunk in chunks:
        yield from chunk.modules()


__all__ = ["RouterStats", "load_balance_figures"]
