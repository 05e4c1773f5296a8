"""Tiny Qwen3-MoE checkpoints made with transformers (random weights of order one, float32)."""
from __future__ import annotations

import os

import torch

# name: Qwen3MoeConfig kwargs. Vocabularies are not multiples of 128 (padding matters); one routes
# with renormalised top-k weights (norm_topk_prob, megatron's pre_softmax=False), one without.
VARIANTS = {
    "qwen3moe_norm_topk": dict(vocab_size=101, hidden_size=32, intermediate_size=64, moe_intermediate_size=24,
                               num_experts=4, num_experts_per_tok=2, norm_topk_prob=True, num_attention_heads=4,
                               num_key_value_heads=2, head_dim=8, tie_word_embeddings=False, rope_theta=10000.0),
    "qwen3moe_pre_softmax": dict(vocab_size=67, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                                 num_experts=8, num_experts_per_tok=3, norm_topk_prob=False, num_attention_heads=4,
                                 num_key_value_heads=4, head_dim=12, tie_word_embeddings=True, rope_theta=5000.0),
}
TOKENS_SHAPE = (2, 8)


def randomise(model: torch.nn.Module, seed: int) -> None:
    """Weights of order one (transformers' own init is ~0.02 and would make logits nearly zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
            else:  # norm weights
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))


def make_moe_checkpoint(path: str, name: str, seed: int, num_layers: int = 2) -> dict:
    """Save one variant with save_pretrained; return its path, test tokens and float32/float64 logits."""
    import transformers

    config = transformers.Qwen3MoeConfig(num_hidden_layers=num_layers, max_position_embeddings=64,
                                         rms_norm_eps=1e-6, **VARIANTS[name])
    config.architectures = ["Qwen3MoeForCausalLM"]
    torch.manual_seed(seed)
    # eager experts: transformers' default grouped_mm kernel has no float64 path
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager",
                                                          experts_implementation="eager")
    randomise(model, seed=100 + seed)
    model = model.float().eval()
    model.save_pretrained(os.path.join(path, name))
    tokens = torch.randint(0, config.vocab_size, TOKENS_SHAPE, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ref32 = model(tokens).logits
        ref64 = model.double()(tokens).logits
    return dict(name=name, path=os.path.join(path, name), tokens=tokens, ref32=ref32, ref64=ref64)
