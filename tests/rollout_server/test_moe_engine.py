"""The embedded rollout server on a Qwen3-MoE model: generation as transformers does it, and expert
weights updated under the per-expert checkpoint names erc-megatron's weight sync sends (no processes)."""
from __future__ import annotations

import pytest
import torch

PROMPTS = [[5, 9, 2, 7], [11, 3], [8, 8, 1, 30, 4, 6]]


def _model(seed: int):
    transformers = pytest.importorskip("transformers")
    config = transformers.Qwen3MoeConfig(vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                                         num_experts=4, num_experts_per_tok=2, norm_topk_prob=True,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         head_dim=8, max_position_embeddings=256)
    config.architectures = ["Qwen3MoeForCausalLM"]
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # order-one weights: peaked, varied routing and next-token choices
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5 if p.dim() >= 2 else
                    1 + 0.3 * torch.randn(p.shape, generator=g))
    return model.float().eval()


def _greedy(engine, n: int = 7) -> list[list[int]]:
    from erc_megatron.rollout_server.engine import Request
    from erc_megatron.rollout_server.sampling import SamplingParams

    reqs = [Request(rid=str(i), input_ids=p, params=SamplingParams(temperature=0.0, max_new_tokens=n), seed=0)
            for i, p in enumerate(PROMPTS)]
    engine.generate(reqs)
    return [r.output_ids for r in reqs]


def _hf_greedy(model, n: int = 7) -> list[list[int]]:
    with torch.no_grad():
        return [model.generate(torch.tensor([p]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                               pad_token_id=0)[0, len(p):].tolist() for p in PROMPTS]


def test_engine_generates_and_takes_per_expert_weight_updates():
    from erc_megatron.model.config import ModelConfig
    from erc_megatron.patches.transformers_moe_experts import checkpoint_named_tensors
    from erc_megatron.rollout_server.engine import Engine
    from erc_megatron.rollout_server.weight_update import WeightUpdater
    from erc_megatron.weights.hf_convert import hf_param_names

    model, other = _model(0), _model(1)
    cfg = ModelConfig.from_hf_config(model.config)
    sent_names = hf_param_names(cfg)  # what iter_hf_weights / the weight sync send
    assert "model.layers.1.mlp.experts.3.up_proj.weight" in sent_names
    assert set(checkpoint_named_tensors(model)) == set(sent_names)

    engine = Engine(model, eos_token_ids=[], max_running_requests=2)
    try:
        assert _greedy(engine) == _hf_greedy(model)
        updater = WeightUpdater(engine)
        other_named = checkpoint_named_tensors(other)
        # the experts, in two buckets (staged, then committed), per-expert names only
        experts = [(n, other_named[n].clone()) for n in sent_names if ".mlp.experts." in n]
        ok, msg = updater.apply(experts[: len(experts) // 2], commit=False)
        assert ok, msg
        ok, msg = updater.apply(experts[len(experts) // 2:])
        assert ok, msg
        assert torch.equal(model.model.layers[1].mlp.experts.gate_up_proj, other.model.layers[1].mlp.experts.gate_up_proj)
        assert torch.equal(model.model.layers[0].mlp.experts.down_proj, other.model.layers[0].mlp.experts.down_proj)
        assert not torch.equal(model.model.layers[0].mlp.gate.weight, other.model.layers[0].mlp.gate.weight)
        ok, msg = updater.apply([(n, other_named[n].clone()) for n in sent_names if ".mlp.experts." not in n])
        assert ok, msg
        assert _greedy(engine) == _hf_greedy(other) != _hf_greedy(_model(0))
        # a fused name is not a checkpoint name; a wrong per-expert shape is refused, nothing changes
        ok, msg = updater.apply([("model.layers.0.mlp.experts.gate_up_proj", torch.zeros(4, 32, 32))])
        assert not ok and "unknown parameter name" in msg
        ok, msg = updater.apply([("model.layers.0.mlp.experts.0.gate_proj.weight", torch.zeros(32, 16))])
        assert not ok and "shape mismatch" in msg
        # release / resume replaces the fused parameters' storage: updates still land in the model
        engine.release_memory(["weights"])
        engine.resume_memory(["weights"])
        ok, msg = updater.apply([("model.layers.0.mlp.experts.2.down_proj.weight", torch.ones(32, 16))])
        assert ok, msg
        assert torch.equal(model.model.layers[0].mlp.experts.down_proj[2], torch.ones(32, 16))
    finally:
        engine.stop()
