"""MoE model config: validation, Qwen3MoeConfig translation, the router mapping, expert layout and
HF conversion (pure tests, no processes)."""
from __future__ import annotations

import pytest
import torch

from erc_megatron.model.config import ConfigError, ModelConfig, ParallelConfig, layout_errors
from erc_megatron.weights import hf_convert as H
from erc_megatron.weights import layout as L

MOE = dict(num_layers=2, hidden_size=32, ffn_hidden_size=48, num_attention_heads=4, num_query_groups=2,
           kv_channels=8, vocab_size=37, make_vocab_size_divisible_by=8, qk_layernorm=True,
           hf_architecture="Qwen3MoeForCausalLM", num_moe_experts=4, moe_ffn_hidden_size=12, moe_router_topk=2)


def _cfg(**kw) -> ModelConfig:
    return ModelConfig(**{**MOE, **kw})


@pytest.mark.parametrize("kw, message", [
    (dict(num_moe_experts=0), "model.num_moe_experts must be a positive integer or None"),
    (dict(moe_router_topk=5), "model.moe_router_topk must be in [1, model.num_moe_experts=4]"),
    (dict(moe_router_topk=0), "model.moe_router_topk must be in [1"),
    (dict(moe_ffn_hidden_size=-4), "model.moe_ffn_hidden_size must be a positive integer"),
    (dict(moe_aux_loss_coeff=-1e-3), "model.moe_aux_loss_coeff must be >= 0"),
    (dict(moe_router_load_balancing_type="sinkhorn"), "model.moe_router_load_balancing_type must be one of"),
    (dict(moe_token_dispatcher_type="flex"), "model.moe_token_dispatcher_type must be one of"),
    (dict(hf_architecture="Qwen3ForCausalLM"), "is dense; use one of ('Qwen3MoeForCausalLM',)"),
    (dict(num_moe_experts=None), "is a Mixture-of-Experts model: set model.num_moe_experts"),
])
def test_bad_moe_values_are_refused_naming_the_field(kw, message):
    with pytest.raises(ConfigError) as err:
        _cfg(**kw)
    assert message in str(err.value)


def test_moe_ffn_defaults_to_ffn_and_dense_stays_dense():
    assert _cfg(moe_ffn_hidden_size=None).moe_ffn_hidden_size == 48
    dense = ModelConfig()
    assert not dense.is_moe and dense.num_moe_experts is None


def _hf_moe_config(**kw):
    transformers = pytest.importorskip("transformers")
    base = dict(vocab_size=37, hidden_size=32, intermediate_size=48, moe_intermediate_size=12, num_experts=4,
                num_experts_per_tok=2, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                head_dim=8, router_aux_loss_coef=0.02, norm_topk_prob=True)
    config = transformers.Qwen3MoeConfig(**{**base, **kw})
    config.architectures = ["Qwen3MoeForCausalLM"]
    return config


def test_from_hf_config_maps_qwen3_moe_fields():
    cfg = ModelConfig.from_hf_config(_hf_moe_config())
    assert (cfg.num_moe_experts, cfg.moe_ffn_hidden_size, cfg.moe_router_topk) == (4, 12, 2)
    assert cfg.moe_router_pre_softmax is False  # norm_topk_prob=True: softmax over the top-k logits
    assert cfg.moe_aux_loss_coeff == 0.02 and cfg.qk_layernorm and cfg.hf_architecture == "Qwen3MoeForCausalLM"
    assert ModelConfig.from_hf_config(_hf_moe_config(norm_topk_prob=False)).moe_router_pre_softmax is True
    assert ModelConfig.from_hf_config(_hf_moe_config(), moe_aux_loss_coeff=0.0).moe_aux_loss_coeff == 0.0


@pytest.mark.parametrize("kw, message", [
    (dict(decoder_sparse_step=2), "leave layers [0, 2] dense"),
    (dict(mlp_only_layers=[1]), "leave layers [1] dense"),
])
def test_from_hf_config_refuses_dense_layers_in_a_moe_model(kw, message):
    with pytest.raises(ConfigError) as err:
        ModelConfig.from_hf_config(_hf_moe_config(**kw))
    assert message in str(err.value) and "decoder_sparse_step=1 and mlp_only_layers=[]" in str(err.value)


def test_layout_errors_name_expert_numbers():
    cfg = _cfg()
    errs = layout_errors(4, ParallelConfig(expert_model_parallel_size=3), cfg)
    assert any("num_experts (4) is not divisible by expert_model_parallel_size (3)" in e for e in errs)
    errs = layout_errors(4, ParallelConfig(tensor_model_parallel_size=2, expert_model_parallel_size=2), cfg)
    assert any("needs parallel.sequence_parallel: true" in e for e in errs)
    # megatron's MoELayer refuses to train under TP without sequence parallelism at EP1 too
    errs = layout_errors(2, ParallelConfig(tensor_model_parallel_size=2), cfg)
    assert any("tensor_model_parallel_size (2) (expert_model_parallel_size 1) needs parallel.sequence_parallel: true"
               in e for e in errs), errs
    assert layout_errors(2, ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True), cfg) == []
    errs = layout_errors(2, ParallelConfig(expert_model_parallel_size=2, expert_tensor_parallel_size=2), cfg)
    assert any("expert_tensor_parallel_size (2) x expert_model_parallel_size (2)" in e for e in errs)
    errs = layout_errors(4, ParallelConfig(expert_tensor_parallel_size=8), cfg)
    assert any("moe_ffn_hidden_size (12) is not divisible by expert_tensor_parallel_size (8)" in e for e in errs)
    dense = ModelConfig(num_attention_heads=4)
    assert any("the model is dense" in e for e in layout_errors(2, ParallelConfig(expert_tensor_parallel_size=2),
                                                               dense))
    assert layout_errors(4, ParallelConfig(expert_model_parallel_size=4), cfg) == []
    with pytest.raises(ConfigError, match="expert_tensor_parallel_size must be >= 1 or null"):
        ParallelConfig(expert_tensor_parallel_size=0)


def test_router_mapping_reproduces_qwen3_moe_routing():
    """Qwen3-MoE routing (softmax over all experts, top-k, renormalise iff norm_topk_prob) against
    megatron's top-k routing with the pre_softmax value `from_hf_config` picks, against a float64
    reference of that rule and against transformers' own router. Both libraries take the softmax in
    float32 whatever the input dtype, so weights agree to float32 rounding (1e-6); the other
    pre_softmax setting is off by far more. Same experts chosen."""
    transformers = pytest.importorskip("transformers")
    from megatron.core.transformer.moe.moe_utils import topk_routing_with_score_function
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

    g = torch.Generator().manual_seed(0)
    for norm in (True, False):
        for topk in (1, 2, 3):
            hf_cfg = _hf_moe_config(norm_topk_prob=norm, num_experts=6, num_experts_per_tok=topk)
            cfg = ModelConfig.from_hf_config(hf_cfg)
            router = Qwen3MoeTopKRouter(hf_cfg).double()
            with torch.no_grad():
                router.weight.copy_(torch.randn(router.weight.shape, generator=g, dtype=torch.float64))
            x = torch.randn(40, hf_cfg.hidden_size, generator=g, dtype=torch.float64)
            with torch.no_grad():
                logits, weights, indices = router(x)
            hf_weights = torch.zeros(40, 6, dtype=torch.float64).scatter(1, indices, weights.double())
            top, top_idx = logits.softmax(-1).topk(topk, dim=-1)  # the rule, in float64
            want = torch.zeros(40, 6, dtype=torch.float64).scatter(1, top_idx, top / top.sum(-1, keepdim=True)
                                                                   if norm else top)
            probs, routing_map = topk_routing_with_score_function(
                logits, topk, use_pre_softmax=cfg.moe_router_pre_softmax, score_function="softmax")
            assert torch.equal(routing_map, want > 0) and torch.equal(routing_map, hf_weights > 0), (norm, topk)
            assert torch.allclose(probs, want, rtol=0, atol=1e-6), (norm, topk, (probs - want).abs().max())
            assert torch.allclose(probs, hf_weights, rtol=0, atol=1e-6), (norm, topk)
            # the other setting gives other weights (the mapping is not vacuous) unless top-1 renormalised
            other, _ = topk_routing_with_score_function(
                logits, topk, use_pre_softmax=not cfg.moe_router_pre_softmax, score_function="softmax")
            assert (other - want).abs().max() > 1e-2, (norm, topk)


def test_expert_layout_shard_and_gather_round_trip():
    cfg = _cfg(num_moe_experts=4, moe_ffn_hidden_size=12)
    g = torch.Generator().manual_seed(0)
    full = {n: torch.randn(L.full_param_shape(n, cfg, 2), generator=g) for n in L.full_param_names(cfg)}
    assert "decoder.layers.1.mlp.experts.local_experts.3.linear_fc2.weight" in full
    assert "decoder.layers.0.mlp.linear_fc1.weight" not in full
    assert L.full_param_shape("decoder.layers.0.mlp.router.weight", cfg) == (4, 32)
    tp, pp, ep, etp = 2, 2, 2, 1
    states = {}
    for t in range(tp):
        for p in range(pp):
            for e in range(ep):
                st = L.shard_for_rank(full, cfg, t, tp, p, pp, ep_rank=e, ep_size=ep, etp_rank=0, etp_size=etp)
                # EP rank e holds experts 2e, 2e+1 as local experts 0, 1, whole (ETP 1)
                assert torch.equal(st["decoder.layers.0.mlp.experts.local_experts.1.linear_fc1.weight"],
                                   full[f"decoder.layers.{p}.mlp.experts.local_experts.{2 * e + 1}.linear_fc1.weight"])
                assert "decoder.layers.0.mlp.experts.local_experts.2.linear_fc1.weight" not in st
                states[(t, p, e, 0)] = st
    back = L.gather_from_ranks(states, cfg, tp, pp, ep_size=ep, etp_size=etp)
    assert set(back) == set(full) and all(torch.equal(back[n], full[n]) for n in full)
    # ETP 2: expert fc1 is cut as [gate_r; up_r], fc2 by columns, over the expert TP rank
    st = L.shard_for_rank(full, cfg, 0, 2, 0, 1, ep_rank=1, ep_size=2, etp_rank=1, etp_size=2)
    fc1 = full["decoder.layers.0.mlp.experts.local_experts.2.linear_fc1.weight"]
    assert torch.equal(st["decoder.layers.0.mlp.experts.local_experts.0.linear_fc1.weight"],
                       torch.cat([fc1[6:12], fc1[18:24]]))
    with pytest.raises(ConfigError, match="all \\(pp_rank, ep_rank, etp_rank\\)"):
        L.gather_from_ranks({k: v for k, v in states.items() if k[2] == 0}, cfg, tp, pp, ep_size=ep, etp_size=etp)
    with pytest.raises(ConfigError, match="not divisible by expert_model_parallel_size"):
        L.shard_for_rank(full, cfg, 0, 1, 0, 1, ep_rank=0, ep_size=3)


def test_hf_conversion_uses_per_expert_names_and_round_trips():
    cfg = _cfg()
    names = H.hf_param_names(cfg)
    assert "model.layers.1.mlp.experts.3.down_proj.weight" in names and "model.layers.0.mlp.gate.weight" in names
    assert not any("gate_up_proj" in n or n.endswith("mlp.gate_proj.weight") for n in names)
    g = torch.Generator().manual_seed(1)
    hf = {n: torch.randn(H.hf_shape(n, cfg), generator=g) for n in names}
    full = H.hf_to_megatron(hf, cfg)
    fc1 = full["decoder.layers.1.mlp.experts.local_experts.2.linear_fc1.weight"]
    assert torch.equal(fc1, torch.cat([hf["model.layers.1.mlp.experts.2.gate_proj.weight"],
                                       hf["model.layers.1.mlp.experts.2.up_proj.weight"]]))
    assert torch.equal(full["decoder.layers.0.mlp.router.weight"], hf["model.layers.0.mlp.gate.weight"])
    back = H.megatron_to_hf(full, cfg)
    assert set(back) == set(hf) and all(torch.equal(back[n], hf[n]) for n in hf)
    # an expert shard read straight from HF slices equals the cut of the full tensor
    shard = H.megatron_shard_from_hf("decoder.layers.1.mlp.experts.local_experts.2.linear_fc2.weight", cfg,
                                     H.dict_fetch(hf), 1, 2)
    assert torch.equal(shard, hf["model.layers.1.mlp.experts.2.down_proj.weight"][:, 6:])
    with pytest.raises(ConfigError, match="missing"):
        H.hf_to_megatron({n: t for n, t in hf.items() if "experts.3." not in n}, cfg)


def test_load_balance_figures_match_megatron_switch_loss():
    """moe/aux_loss is megatron's switch load-balancing loss divided by its coefficient; the load ratio
    is 1 when balanced and E / top-k when every token picks the same experts."""
    from megatron.core.transformer.moe.moe_utils import switch_load_balancing_loss_func

    from erc_megatron.model.moe_metrics import load_balance_figures

    g = torch.Generator().manual_seed(2)
    tokens, experts, topk, coeff = 50, 6, 2, 0.01
    logits = torch.randn(tokens, experts, generator=g, dtype=torch.float64)
    probs = logits.softmax(-1)
    routing = torch.zeros_like(probs).scatter(1, probs.topk(topk, dim=-1).indices, 1.0)
    per_expert = routing.sum(0)
    want = switch_load_balancing_loss_func(probs, per_expert, tokens, topk, experts, coeff) / coeff
    got = load_balance_figures(per_expert[None], probs.sum(0)[None], torch.tensor([float(tokens)]), topk)
    assert abs(got["moe/aux_loss"] - float(want)) < 1e-12, (got, float(want))
    assert got["moe/load_max_over_mean"] == float(per_expert.max() / per_expert.mean())
    even = load_balance_figures(torch.full((1, 4), 10.0), torch.full((1, 4), 5.0), torch.tensor([20.0]), 2)
    assert even == {"moe/aux_loss": 1.0, "moe/load_max_over_mean": 1.0}
    skewed = load_balance_figures(torch.tensor([[20.0, 20.0, 0.0, 0.0]]), torch.tensor([[10.0, 10.0, 0.0, 0.0]]),
                                  torch.tensor([20.0]), 2)
    assert skewed == {"moe/aux_loss": 2.0, "moe/load_max_over_mean": 2.0}
    assert load_balance_figures(torch.zeros(2, 4), torch.zeros(2, 4), torch.zeros(2), 2) == {}
