"""Model and parallel-layout configs (field names follow Megatron's flags)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

PARAMS_DTYPES = ("float32", "bfloat16", "float16")
RECOMPUTE_GRANULARITIES = (None, "full", "selective")
RECOMPUTE_METHODS = (None, "uniform", "block")


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
    """A Llama / Qwen2 / Qwen3-style dense decoder (RMSNorm, SwiGLU, RoPE, GQA)."""

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
    """Hugging Face architecture used when exporting (LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM)."""
    recompute_granularity: str | None = None
    """Activation recomputation (megatron's): None keeps every activation, "full" recomputes whole
    transformer layers in backward (see recompute_method), "selective" only the attention core."""
    recompute_method: str | None = None
    """With "full": "uniform" checkpoints groups of recompute_num_layers layers, "block" the first
    recompute_num_layers layers of each pipeline stage."""
    recompute_num_layers: int | None = None
    """With "full": layers per group (uniform) or per stage (block); None otherwise."""

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

    def padded_vocab_size(self, tensor_model_parallel_size: int) -> int:
        multiple = self.make_vocab_size_divisible_by * tensor_model_parallel_size
        return -(-self.vocab_size // multiple) * multiple

    @classmethod
    def from_hf_config(cls, hf: Any, **overrides: Any) -> ModelConfig:
        """Build from a transformers PretrainedConfig (Llama, Qwen2, Qwen3 dense)."""
        arch = (getattr(hf, "architectures", None) or [f"{type(hf).__name__.replace('Config', '')}ForCausalLM"])[0]
        supported = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
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
            qk_layernorm=arch == "Qwen3ForCausalLM",
            untie_embeddings_and_output_weights=not bool(getattr(hf, "tie_word_embeddings", False)),
            hf_architecture=arch,
        )
        values.update(overrides)
        return cls(**values)


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
    if p.expert_model_parallel_size > 1:
        if not num_experts:
            errors.append(f"expert_model_parallel_size is {p.expert_model_parallel_size} but the model is dense "
                          f"(no experts); use 1")
        elif num_experts % p.expert_model_parallel_size:
            errors.append(f"num_experts ({num_experts}) is not divisible by expert_model_parallel_size "
                          f"({p.expert_model_parallel_size})")
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
        if model.ffn_hidden_size % tp:
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



__all__ = ["PARAMS_DTYPES", "RECOMPUTE_GRANULARITIES", "RECOMPUTE_METHODS", "ConfigError", "ModelConfig",
           "ParallelConfig", "check_recompute", "layout_errors"]
