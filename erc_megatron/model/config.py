"""Model and parallel-layout configs (field names follow Megatron's flags)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

PARAMS_DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
    """A config value is out of its allowed range; the message names the field."""


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


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

    def __post_init__(self) -> None:
        for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size",
                     "expert_model_parallel_size", "distributed_timeout_minutes"):
            _require(int(getattr(self, name)) >= 1, f"parallel.{name} must be >= 1, got {getattr(self, name)}")

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
    return errors



__all__ = ["PARAMS_DTYPES", "ConfigError", "ModelConfig", "ParallelConfig", "layout_errors"]
