"""Model and parallel-layout configs (field names follow Megatron's flags)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

PARAMS_DTYPES = ("float32", "bfloat16", "float16")
RECOMPUTE_GRANULARITIES = (None, "full", "selective")
RECOMPUTE_METHODS = (None, "uniform", "block")
MOE_LOAD_BALANCING_TYPES = ("aux_loss", "seq_aux_loss", "global_aux_loss", "none")
MOE_TOKEN_DISPATCHER_TYPES = ("alltoall", "allgather")
# HF architectures of Mixture-of-Experts models (the others are dense)
MOE_ARCHITECTURES = ("Qwen3MoeForCausalLM",)


class ConfigError(ValueError):
    """A config value is out of its allowed range; the message names the field."""


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def check_recompute(section: str, granularity: str | None, method: str | None, num_layers: int | None,
                    total_layers: int | None = None) -> None:
    """Megatron's rules for activation recomputation, refused here with the field names (megatron
    would assert deep inside TransformerConfig, or silently ignore a method without a granularity)."""
    _require(granularity in RECOMPUTE_GRANULARITIES,
             f"{section}.recompute_granularity must be one of {RECOMPUTE_GRANULARITIES}, got {granularity!r}")
    _require(method in RECOMPUTE_METHODS,
             f"{section}.recompute_method must be one of {RECOMPUTE_METHODS}, got {method!r}")
    _require(num_layers is None or (isinstance(num_layers, int) and not isinstance(num_layers, bool)
                                    and num_layers >= 1),
             f"{section}.recompute_num_layers must be an integer >= 1 or null, got {num_layers!r}")
    if granularity == "full":
        _require(method is not None, f"{section}.recompute_method must be one of ('uniform', 'block') with "
                                     f"{section}.recompute_granularity 'full', got null")
        _require(num_layers is not None, f"{section}.recompute_num_layers must be an integer >= 1 with "
                                         f"{section}.recompute_granularity 'full', got null")
        _require(total_layers is None or num_layers <= total_layers,
                 f"{section}.recompute_num_layers must be in [1, num_layers={total_layers}], got {num_layers}")
    else:
        what = "null" if granularity is None else "'selective' (it recomputes the attention core of every layer)"
        _require(method is None, f"{section}.recompute_method must be null with {section}.recompute_granularity "
                                 f"{what}, got {method!r}; set recompute_granularity: full to use it")
        _require(num_layers is None, f"{section}.recompute_num_layers must be null with "
                                     f"{section}.recompute_granularity {what}, got {num_layers!r}")


@dataclass
class ModelConfig:
    """A Llama / Qwen2 / Qwen3-style decoder (RMSNorm, SwiGLU, RoPE, GQA), dense or Qwen3-MoE-style."""

    num_layers: int = 4
    """Number of transformer layers."""
    hidden_size: int = 64
    """Model width."""
    ffn_hidden_size: int = 128
    """SwiGLU intermediate size (per branch)."""
    num_attention_heads: int = 4
    """Query heads."""
    num_query_groups: int | None = None
    """Key/value heads for grouped-query attention; None means equal to num_attention_heads."""
    kv_channels: int | None = None
    """Head dimension; None means hidden_size // num_attention_heads (Qwen3 sets it explicitly)."""
    vocab_size: int = 128
    """Real vocabulary size of the tokenizer/checkpoint (before padding)."""
    make_vocab_size_divisible_by: int = 128
    """The vocabulary is padded to a multiple of this times the tensor-parallel size."""
    max_position_embeddings: int = 4096
    """Longest sequence the rotary embedding is built for."""
    rotary_base: float = 10000.0
    """RoPE theta."""
    norm_epsilon: float = 1e-6
    """RMSNorm epsilon."""
    add_qkv_bias: bool = False
    """Bias on the q/k/v projections (Qwen2)."""
    qk_layernorm: bool = False
    """RMSNorm on queries and keys per head (Qwen3)."""
    untie_embeddings_and_output_weights: bool = True
    """False ties the output layer to the input embedding."""
    params_dtype: str = "float32"
    """Parameter dtype: float32, bfloat16 or float16."""
    hf_architecture: str = "LlamaForCausalLM"
    """Hugging Face architecture used when exporting (LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM,
    Qwen3MoeForCausalLM)."""
    recompute_granularity: str | None = None
    """Activation recomputation (megatron's): None keeps every activation, "full" recomputes whole
    transformer layers in backward (see recompute_method), "selective" only the attention core."""
    recompute_method: str | None = None
    """With "full": "uniform" checkpoints groups of recompute_num_layers layers, "block" the first
    recompute_num_layers layers of each pipeline stage."""
    recompute_num_layers: int | None = None
    """With "full": layers per group (uniform) or per stage (block); None otherwise."""
    num_moe_experts: int | None = None
    """Routed experts per layer (every layer is a MoE layer); None: a dense model."""
    moe_ffn_hidden_size: int | None = None
    """SwiGLU intermediate size of one expert (HF moe_intermediate_size); None: ffn_hidden_size."""
    moe_router_topk: int = 2
    """Experts each token is routed to (HF num_experts_per_tok)."""
    moe_router_pre_softmax: bool = False
    """True: softmax over all experts, then top-k, weights not renormalised (HF norm_topk_prob=False).
    False: softmax over the top-k logits, i.e. top-k probabilities renormalised to sum to 1
    (HF norm_topk_prob=True)."""
    moe_aux_loss_coeff: float = 0.0
    """Weight of the load-balancing loss (HF router_aux_loss_coef); 0 turns it off."""
    moe_router_load_balancing_type: str = "aux_loss"
    """aux_loss (per micro-batch, Switch-style, as HF), seq_aux_loss, global_aux_loss or none."""
    moe_token_dispatcher_type: str = "alltoall"
    """How tokens reach their experts' ranks: alltoall or allgather (megatron's dispatchers)."""

    def __post_init__(self) -> None:
        for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "vocab_size",
                     "make_vocab_size_divisible_by", "max_position_embeddings"):
            _require(int(getattr(self, name)) > 0,
                     f"model.{name} must be a positive integer, got {getattr(self, name)}")
        if self.num_query_groups is None:
            self.num_query_groups = self.num_attention_heads
        _require(self.num_attention_heads % self.num_query_groups == 0,
                 f"model.num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                 f"model.num_query_groups ({self.num_query_groups})")
        if self.kv_channels is None:
            _require(self.hidden_size % self.num_attention_heads == 0,
                     f"model.hidden_size ({self.hidden_size}) must be divisible by model.num_attention_heads "
                     f"({self.num_attention_heads}) unless model.kv_channels is set")
            self.kv_channels = self.hidden_size // self.num_attention_heads
        _require(self.params_dtype in PARAMS_DTYPES,
                 f"model.params_dtype must be one of {PARAMS_DTYPES}, got {self.params_dtype!r}")
        _require(self.norm_epsilon > 0, f"model.norm_epsilon must be > 0, got {self.norm_epsilon}")
        check_recompute("model", self.recompute_granularity, self.recompute_method, self.recompute_num_layers,
                        self.num_layers)
        self._check_moe()

    @property
    def is_moe(self) -> bool:
        return self.num_moe_experts is not None

    def _check_moe(self) -> None:
        is_moe_arch = self.hf_architecture in MOE_ARCHITECTURES
        if self.num_moe_experts is None:
            _require(not is_moe_arch, f"model.hf_architecture {self.hf_architecture!r} is a Mixture-of-Experts "
                                      f"model: set model.num_moe_experts")
            return
        _require(isinstance(self.num_moe_experts, int) and self.num_moe_experts >= 1,
                 f"model.num_moe_experts must be a positive integer or None (dense), got {self.num_moe_experts!r}")
        _require(is_moe_arch, f"model.num_moe_experts is set but model.hf_architecture {self.hf_architecture!r} "
                              f"is dense; use one of {MOE_ARCHITECTURES}")
        if self.moe_ffn_hidden_size is None:
            self.moe_ffn_hidden_size = self.ffn_hidden_size
        _require(int(self.moe_ffn_hidden_size) > 0,
                 f"model.moe_ffn_hidden_size must be a positive integer, got {self.moe_ffn_hidden_size}")
        _require(1 <= int(self.moe_router_topk) <= self.num_moe_experts,
                 f"model.moe_router_topk must be in [1, model.num_moe_experts={self.num_moe_experts}], "
                 f"got {self.moe_router_topk}")
        _require(float(self.moe_aux_loss_coeff) >= 0,
                 f"model.moe_aux_loss_coeff must be >= 0, got {self.moe_aux_loss_coeff}")
        _require(self.moe_router_load_balancing_type in MOE_LOAD_BALANCING_TYPES,
                 f"model.moe_router_load_balancing_type must be one of {MOE_LOAD_BALANCING_TYPES}, "
                 f"got {self.moe_router_load_balancing_type!r}")
        _require(self.moe_token_dispatcher_type in MOE_TOKEN_DISPATCHER_TYPES,
                 f"model.moe_token_dispatcher_type must be one of {MOE_TOKEN_DISPATCHER_TYPES}, "
                 f"got {self.moe_token_dispatcher_type!r}")

    def padded_vocab_size(self, tensor_model_parallel_size: int) -> int:
        multiple = self.make_vocab_size_divisible_by * tensor_model_parallel_size
        return -(-self.vocab_size // multiple) * multiple

    @classmethod
    def from_hf_config(cls, hf: Any, **overrides: Any) -> ModelConfig:
        """Build from a transformers PretrainedConfig (Llama, Qwen2, Qwen3 dense, Qwen3-MoE)."""
        arch = (getattr(hf, "architectures", None) or [f"{type(hf).__name__.replace('Config', '')}ForCausalLM"])[0]
        supported = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM") + MOE_ARCHITECTURES
        _require(arch in supported, f"Hugging Face architecture {arch!r} is not supported; supported: {supported}")
        act = getattr(hf, "hidden_act", "silu")
        _require(act == "silu", f"hidden_act {act!r} is not supported (SwiGLU needs 'silu')")
        rope_theta = getattr(hf, "rope_theta", None)
        if rope_theta is None:
            rope_params = getattr(hf, "rope_parameters", None) or {}
            rope_theta = rope_params.get("rope_theta", 10000.0)
        values = dict(
            num_layers=hf.num_hidden_layers,
            hidden_size=hf.hidden_size,
            ffn_hidden_size=hf.intermediate_size,
            num_attention_heads=hf.num_attention_heads,
            num_query_groups=getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads,
            kv_channels=getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads,
            vocab_size=hf.vocab_size,
            max_position_embeddings=hf.max_position_embeddings,
            rotary_base=float(rope_theta),
            norm_epsilon=hf.rms_norm_eps,
            add_qkv_bias=arch == "Qwen2ForCausalLM" or bool(getattr(hf, "attention_bias", False)),
            qk_layernorm=arch in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM"),
            untie_embeddings_and_output_weights=not bool(getattr(hf, "tie_word_embeddings", False)),
            hf_architecture=arch,
        )
        if arch in MOE_ARCHITECTURES:
            values.update(_moe_values_from_hf(hf))
        values.update(overrides)
        return cls(**values)


def _moe_values_from_hf(hf: Any) -> dict[str, Any]:
    """ModelConfig MoE fields from a Qwen3MoeConfig, refusing what megatron's MoE layer would not reproduce."""
    num_experts = getattr(hf, "num_experts", None) or getattr(hf, "num_local_experts", None)
    _require(bool(num_experts), "the Hugging Face MoE config has no num_experts")
    num_layers = hf.num_hidden_layers
    step = getattr(hf, "decoder_sparse_step", 1)
    dense_layers = sorted(getattr(hf, "mlp_only_layers", None) or [])
    # Qwen3-MoE: layer i is sparse iff i not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0
    sparse = [i for i in range(num_layers) if i not in dense_layers and step > 0 and (i + 1) % step == 0]
    _require(len(sparse) == num_layers,
             f"only all-MoE models are supported (every layer sparse): decoder_sparse_step={step} and "
             f"mlp_only_layers={dense_layers} leave layers {sorted(set(range(num_layers)) - set(sparse))} dense; "
             f"use decoder_sparse_step=1 and mlp_only_layers=[]")
    shared = getattr(hf, "shared_expert_intermediate_size", None)
    _require(not shared, f"shared experts (shared_expert_intermediate_size={shared}) are not supported")
    return dict(
        num_moe_experts=int(num_experts),
        moe_ffn_hidden_size=int(hf.moe_intermediate_size),
        moe_router_topk=int(hf.num_experts_per_tok),
        # HF: softmax over all experts, top-k, then (norm_topk_prob) renormalise. Megatron's
        # pre_softmax=False takes top-k logits then softmaxes over them: the same renormalised weights.
        moe_router_pre_softmax=not bool(getattr(hf, "norm_topk_prob", False)),
        moe_aux_loss_coeff=float(getattr(hf, "router_aux_loss_coef", 0.0) or 0.0),
    )


@dataclass
class ParallelConfig:
    """Parallel layout; data parallel size is what remains of the world size."""

    tensor_model_parallel_size: int = 1
    """Tensor (vocabulary / heads / ffn) parallel size."""
    pipeline_model_parallel_size: int = 1
    """Pipeline stages; layers are split evenly."""
    context_parallel_size: int = 1
    """Sequence split across ranks for attention (GPU with Transformer Engine only)."""
    expert_model_parallel_size: int = 1
    """Expert parallel size (MoE models only; dense models need 1)."""
    expert_tensor_parallel_size: int | None = None
    """Tensor parallel size inside each expert (MoE models only); None: tensor_model_parallel_size."""
    seed: int = 1234
    """Base seed for megatron's RNG trackers and parameter initialisation."""
    distributed_timeout_minutes: int = 10
    """Timeout of collectives before a rank gives up."""
    use_distributed_optimizer: bool | None = None
    """megatron's DistributedOptimizer (ZeRO-1): each data-parallel rank keeps the fp32 master weights
    and Adam moments of 1/dp of the parameters; gradients are reduce-scattered and the updated
    weights all-gathered instead of one all-reduce. None: on when the data-parallel size is > 1."""
    sequence_parallel: bool = False
    """megatron's sequence parallelism: norms, dropout and residuals work on 1/tp of the sequence, and
    the tensor-parallel all-reduces become reduce-scatter + all-gather. Needs tensor_model_parallel_size > 1."""

    def __post_init__(self) -> None:
        for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size",
                     "expert_model_parallel_size", "distributed_timeout_minutes"):
            _require(int(getattr(self, name)) >= 1, f"parallel.{name} must be >= 1, got {getattr(self, name)}")
        _require(self.use_distributed_optimizer in (None, True, False),
                 f"parallel.use_distributed_optimizer must be true, false or null (on when data-parallel size > 1), "
                 f"got {self.use_distributed_optimizer!r}")
        _require(self.sequence_parallel in (True, False),
                 f"parallel.sequence_parallel must be true or false, got {self.sequence_parallel!r}")
        _require(not self.sequence_parallel or self.tensor_model_parallel_size > 1,
                 f"parallel.sequence_parallel needs parallel.tensor_model_parallel_size > 1 (it splits the sequence "
                 f"over the tensor-parallel ranks), got tensor_model_parallel_size {self.tensor_model_parallel_size}")
        _require(self.expert_tensor_parallel_size is None or int(self.expert_tensor_parallel_size) >= 1,
                 f"parallel.expert_tensor_parallel_size must be >= 1 or null (= tensor_model_parallel_size), "
                 f"got {self.expert_tensor_parallel_size}")

    @property
    def expert_tp_size(self) -> int:
        """The expert tensor-parallel size in effect."""
        return self.expert_tensor_parallel_size or self.tensor_model_parallel_size

    def distributed_optimizer(self, data_parallel_size: int) -> bool:
        """Whether the distributed optimizer is used at this data-parallel size (None: dp > 1)."""
        if self.use_distributed_optimizer is None:
            return data_parallel_size > 1
        return bool(self.use_distributed_optimizer)

    @property
    def model_parallel_size(self) -> int:
        return self.tensor_model_parallel_size * self.pipeline_model_parallel_size * self.context_parallel_size


def layout_errors(world_size: int, parallel: ParallelConfig, model: ModelConfig | None = None,
                  *, has_transformer_engine: bool = False, num_experts: int | None = None) -> list[str]:
    """Every reason this layout cannot run, each naming the numbers involved (empty if it fits)."""
    p = parallel
    errors = []
    mp = p.model_parallel_size
    if world_size % mp != 0:
        errors.append(
            f"world size {world_size} is not divisible by tensor_model_parallel_size "
            f"({p.tensor_model_parallel_size}) x pipeline_model_parallel_size ({p.pipeline_model_parallel_size}) "
            f"x context_parallel_size ({p.context_parallel_size}) = {mp}")
    if num_experts is None and model is not None:
        num_experts = model.num_moe_experts
    ep, etp = p.expert_model_parallel_size, p.expert_tp_size
    if p.expert_model_parallel_size > 1:
        if not num_experts:
            errors.append(f"expert_model_parallel_size is {p.expert_model_parallel_size} but the model is dense "
                          f"(no experts); use 1")
        elif num_experts % p.expert_model_parallel_size:
            errors.append(f"num_experts ({num_experts}) is not divisible by expert_model_parallel_size "
                          f"({p.expert_model_parallel_size})")
    if p.expert_tensor_parallel_size not in (None, p.tensor_model_parallel_size) and not num_experts:
        errors.append(f"expert_tensor_parallel_size is {p.expert_tensor_parallel_size} but the model is dense "
                      f"(no experts); leave it null")
    if num_experts:
        expert_mp = etp * ep * p.pipeline_model_parallel_size
        if world_size % expert_mp:
            errors.append(f"world size {world_size} is not divisible by expert_tensor_parallel_size ({etp}) x "
                          f"expert_model_parallel_size ({ep}) x pipeline_model_parallel_size "
                          f"({p.pipeline_model_parallel_size}) = {expert_mp}")
        if p.tensor_model_parallel_size > 1 and not getattr(p, "sequence_parallel", False):
            # megatron-core's MoELayer refuses to train under TP without it, whatever the expert layout
            errors.append(f"a Mixture-of-Experts model with tensor_model_parallel_size "
                          f"({p.tensor_model_parallel_size}) (expert_model_parallel_size {ep}) needs "
                          f"parallel.sequence_parallel: true (megatron-core requires it)")
        if model is not None and model.moe_ffn_hidden_size % etp:
            errors.append(f"moe_ffn_hidden_size ({model.moe_ffn_hidden_size}) is not divisible by "
                          f"expert_tensor_parallel_size ({etp})")
    if p.context_parallel_size > 1 and not has_transformer_engine:
        errors.append(f"context_parallel_size {p.context_parallel_size} needs Transformer Engine attention "
                      f"(pip install .[gpu] on a GPU machine); use 1 on CPU")
    if model is not None:
        tp = p.tensor_model_parallel_size
        if model.num_attention_heads % tp:
            errors.append(f"num_attention_heads ({model.num_attention_heads}) is not divisible by "
                          f"tensor_model_parallel_size ({tp})")
        if model.num_query_groups % tp:
            errors.append(f"num_query_groups ({model.num_query_groups}) is not divisible by "
                          f"tensor_model_parallel_size ({tp})")
        if model.ffn_hidden_size % tp and not model.is_moe:  # a MoE model has no dense MLP
            errors.append(f"ffn_hidden_size ({model.ffn_hidden_size}) is not divisible by "
                          f"tensor_model_parallel_size ({tp})")
        if model.padded_vocab_size(tp) % tp:
            errors.append(f"padded vocabulary ({model.padded_vocab_size(tp)}) is not divisible by "
                          f"tensor_model_parallel_size ({tp})")
        pp = p.pipeline_model_parallel_size
        if model.num_layers % pp:
            errors.append(f"num_layers ({model.num_layers}) is not divisible by pipeline_model_parallel_size "
                          f"({pp}): {model.num_layers / pp:.2f} layers per stage")
        elif model.recompute_num_layers is not None and model.recompute_num_layers > model.num_layers // pp:
            errors.append(f"recompute_num_layers ({model.recompute_num_layers}) is more than the "
                          f"{model.num_layers // pp} layers per pipeline stage (num_layers {model.num_layers} / "
                          f"pipeline_model_parallel_size {pp})")
    return errors



__all__ = ["MOE_ARCHITECTURES", "MOE_LOAD_BALANCING_TYPES", "MOE_TOKEN_DISPATCHER_TYPES", "PARAMS_DTYPES",
           "RECOMPUTE_GRANULARITIES", "RECOMPUTE_METHODS", "ConfigError", "ModelConfig", "ParallelConfig",
           "check_recompute", "layout_errors"]
