"""What the planner reads: the model's architecture, a parallel layout and the step's workload.

The recipe is read as raw YAML (plus `section.key=value` overrides), not through `RunConfig`, so
that keys added by newer config classes (MoE, distributed optimizer, packing) are read when present
and defaulted when absent. The architecture comes from `config.json` under `model.path`; where that
directory does not exist (a cluster path, say), from the Hugging Face configs of the models the
recipes name (`KNOWN_ARCHITECTURES`, keyed by the path's last component), or from `--hf-config`.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, replace
from typing import Any

from erc_megatron.model.config import ConfigError

# Hugging Face config.json fields of the models the recipes name (facts from their model cards)
KNOWN_ARCHITECTURES: dict[str, dict[str, Any]] = {
    "qwen2.5-32b": dict(architectures=["Qwen2ForCausalLM"], hidden_size=5120, intermediate_size=27648,
                        num_hidden_layers=64, num_attention_heads=40, num_key_value_heads=8, vocab_size=152064,
                        tie_word_embeddings=False),
    "qwen3-30b-a3b": dict(architectures=["Qwen3MoeForCausalLM"], hidden_size=2048, intermediate_size=6144,
                          num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                          vocab_size=151936, tie_word_embeddings=False, num_experts=128, num_experts_per_tok=8,
                          moe_intermediate_size=768, decoder_sparse_step=1, mlp_only_layers=[],
                          router_aux_loss_coef=0.001),
    "deepseek-r1-distill-qwen-7b": dict(architectures=["Qwen2ForCausalLM"], hidden_size=3584,
                                        intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                                        num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
    "deepseek-r1-distill-qwen-1.5b": dict(architectures=["Qwen2ForCausalLM"], hidden_size=1536,
                                          intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                                          num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=False),
}

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
RECOMPUTE = (None, "selective", "full")


@dataclass(frozen=True)
class Arch:
    """A Llama / Qwen2 / Qwen3 / Qwen3-MoE decoder, as far as memory and communication depend on it."""

    num_layers: int
    hidden: int
    ffn: int
    heads: int
    groups: int
    head_dim: int
    vocab: int
    tied: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    num_experts: int = 0
    """0: dense."""
    moe_ffn: int = 0
    topk: int = 0
    moe_layers: tuple[int, ...] = ()
    """Indices of the layers whose MLP is a mixture of experts."""
    name: str = ""

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def padded_vocab(self, tp: int, divisible_by: int = 128) -> int:
        m = divisible_by * tp
        return -(-self.vocab // m) * m

    @classmethod
    def from_hf(cls, hf: dict[str, Any], name: str = "") -> Arch:
        arch = (hf.get("architectures") or [""])[0]
        heads = int(hf["num_attention_heads"])
        n_layers = int(hf["num_hidden_layers"])
        experts = int(hf.get("num_experts") or hf.get("num_local_experts") or 0)
        moe_layers: tuple[int, ...] = ()
        if experts:
            step = int(hf.get("decoder_sparse_step", 1) or 1)
            dense_only = set(hf.get("mlp_only_layers") or [])
            moe_layers = tuple(i for i in range(n_layers) if i not in dense_only and (i + 1) % step == 0)
        return cls(num_layers=n_layers, hidden=int(hf["hidden_size"]), ffn=int(hf["intermediate_size"]),
                   heads=heads, groups=int(hf.get("num_key_value_heads") or heads),
                   head_dim=int(hf.get("head_dim") or hf["hidden_size"] // heads), vocab=int(hf["vocab_size"]),
                   tied=bool(hf.get("tie_word_embeddings", False)),
                   qkv_bias=arch == "Qwen2ForCausalLM" or bool(hf.get("attention_bias", False)),
                   qk_norm=arch in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM"),
                   num_experts=experts, moe_ffn=int(hf.get("moe_intermediate_size") or 0),
                   topk=int(hf.get("num_experts_per_tok") or 0), moe_layers=moe_layers, name=name or arch)


@dataclass(frozen=True)
class Layout:
    """One parallel layout (megatron's sizes and switches)."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    ep: int = 1
    etp: int = 1
    """Expert tensor-parallel size."""
    distopt: bool = False
    sp: bool = False
    recompute: str | None = None
    recompute_method: str | None = None
    recompute_num_layers: int | None = None

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def edp(self) -> int:
        """Expert data-parallel size: what is left of the world after etp x ep x pp."""
        return self.world // (self.etp * self.ep * self.pp)

    @property
    def label(self) -> str:
        parts = [f"TP{self.tp}", f"PP{self.pp}", f"DP{self.dp}"]
        if self.ep > 1 or self.etp > 1:
            parts.append(f"EP{self.ep}" + (f"xETP{self.etp}" if self.etp > 1 else ""))
        flags = [f for f, on in (("distopt", self.distopt), ("SP", self.sp)) if on]
        if self.recompute:
            flags.append(f"recompute={self.recompute}")
        return "x".join(parts) + (" " + ",".join(flags) if flags else "")


@dataclass(frozen=True)
class Workload:
    """One RL step as the learner sees it."""

    params_dtype: str = "bfloat16"
    micro_batch_size: int = 1
    seq_length: int = 4096
    """Padded length of every sequence (prompt + response) in the padded path."""
    max_tokens_per_micro_batch: int | None = None
    """Packed micro-batches of at most this many tokens (None: padded micro-batches)."""
    prompts_per_step: int = 128
    prompts_per_minibatch: int = 16
    n_samples: int = 8
    mean_tokens_per_sample: float | None = None
    """Packed path: mean prompt + response length (None: every sample at seq_length, the worst case)."""
    fused_output_layer: bool = False
    chunk_size: int | None = None
    clip_grad: float = 1.0
    weight_sync_bucket_bytes: int = 512 * 2**20
    make_vocab_size_divisible_by: int = 128
    backend: str = "nccl"
    """nccl (GPU) or gloo (CPU): the weight sync gathers TP shards with an all-gather or a gather."""
    moe_aux_loss: str = "aux_loss"
    """aux_loss, seq_aux_loss, global_aux_loss or none (megatron's moe_router_load_balancing_type)."""
    loss: dict = field(default_factory=dict)
    """The recipe's `loss` section (which step statistics travel)."""
    nll_coef: float = 0.0
    sync_destination: str = "rank0"
    """Weight sync senders (erc_megatron/weights/hf_stream.py): "rank0" (later stages hop their
    buckets to rank 0, which broadcasts all) or "stage" (each stage's leader broadcasts its own)."""

    @property
    def param_bytes(self) -> int:
        return DTYPE_BYTES[self.params_dtype]

    @property
    def minibatches(self) -> int:
        return self.prompts_per_step // self.prompts_per_minibatch

    @property
    def samples_per_minibatch(self) -> int:
        return self.prompts_per_minibatch * self.n_samples


@dataclass(frozen=True)
class StepShapes:
    """Micro-batches one data-parallel rank runs in a step: shape [b, s] and counts."""

    b: int
    s: int
    old_policy: int
    """Micro-batches of the old-policy pass (all mini-batches)."""
    updates: tuple[int, ...]
    """Micro-batches of each optimizer step."""

    @property
    def tokens(self) -> int:
        return self.b * self.s


def default_shapes(work: Workload, layout: Layout) -> StepShapes:
    """The step's micro-batches when every sample is as long as the recipe allows (packed: the mean
    length given, else the longest), split evenly over the data-parallel ranks."""
    n = work.samples_per_minibatch
    if work.max_tokens_per_micro_batch:
        per_sample = work.mean_tokens_per_sample or work.seq_length
        per_rank_tokens = n * per_sample / layout.dp
        per_mb = max(1, math.ceil(per_rank_tokens / work.max_tokens_per_micro_batch))
        b, s = 1, work.max_tokens_per_micro_batch
    else:
        per_mb = math.ceil(n / (layout.dp * work.micro_batch_size))
        b, s = work.micro_batch_size, work.seq_length
    return StepShapes(b=b, s=s, old_policy=per_mb * work.minibatches, updates=(per_mb,) * work.minibatches)


# ---------------------------------------------------------------------------------------------- recipes
def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    node = tree
    parts = dotted.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value


def load_raw_recipe(path: str, overrides: list[str] = ()) -> dict:
    import yaml

    with open(path) as f:
        tree = yaml.safe_load(f) or {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must be section.key=value")
        key, value = item.split("=", 1)
        _set_dotted(tree, key, yaml.safe_load(value))
    return tree


def _get(tree: dict, dotted: str, default: Any = None) -> Any:
    node: Any = tree
    for p in dotted.split("."):
        if not isinstance(node, dict) or p not in node:
            return default
        node = node[p]
    return default if node is None and default is not None else node


def load_hf_config(model_path: str, hf_config: str | None = None) -> tuple[dict, str]:
    """(config.json fields, where they came from)."""
    if hf_config:
        with open(hf_config) as f:
            return json.load(f), hf_config
    path = os.path.join(model_path, "config.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f), path
    key = os.path.basename(os.path.normpath(model_path)).lower()
    if key in KNOWN_ARCHITECTURES:
        return dict(KNOWN_ARCHITECTURES[key]), f"built-in config of {key}"
    raise ConfigError(f"model.path {model_path!r} has no config.json and is none of the built-in architectures "
                      f"{sorted(KNOWN_ARCHITECTURES)}: pass --hf-config CONFIG_JSON")


def arch_with_recipe(hf: dict, tree: dict, name: str) -> Arch:
    """The architecture, with the recipe's model.* MoE fields (when present) over config.json's."""
    arch = Arch.from_hf(hf, name)
    experts = _get(tree, "model.num_moe_experts")
    if experts:
        arch = replace(arch, num_experts=int(experts), moe_layers=arch.moe_layers or tuple(range(arch.num_layers)))
    for key, attr in (("model.moe_ffn_hidden_size", "moe_ffn"), ("model.moe_router_topk", "topk")):
        if _get(tree, key):
            arch = replace(arch, **{attr: int(_get(tree, key))})
    return arch


def trainer_has(section_cls: type, name: str) -> bool:
    """Whether this checkout's config class has the field (keys being added on other branches)."""
    import dataclasses

    return name in {f.name for f in dataclasses.fields(section_cls)}


def layout_from_recipe(tree: dict, world: int, distopt_supported: bool = True) -> Layout:
    """The recipe's layout on `world` ranks (data-parallel size is what remains).

    `parallel.use_distributed_optimizer` unset means on when data-parallel size > 1; with
    `distopt_supported=False` (a trainer without the field) it is off."""
    tp = int(_get(tree, "parallel.tensor_model_parallel_size", 1))
    pp = int(_get(tree, "parallel.pipeline_model_parallel_size", 1))
    if world % (tp * pp):
        raise ConfigError(f"{world} GPUs are not divisible by tensor_model_parallel_size ({tp}) x "
                          f"pipeline_model_parallel_size ({pp})")
    dp = world // (tp * pp)
    distopt = _get(tree, "parallel.use_distributed_optimizer")
    recompute = _get(tree, "model.recompute_granularity")
    if recompute not in RECOMPUTE:
        raise ConfigError(f"model.recompute_granularity must be one of {list(RECOMPUTE)}, got {recompute!r}")
    return Layout(tp=tp, pp=pp, dp=dp, ep=int(_get(tree, "parallel.expert_model_parallel_size", 1)),
                  etp=int(_get(tree, "parallel.expert_tensor_parallel_size") or 1),
                  distopt=bool(dp > 1 if distopt is None else distopt) and distopt_supported,
                  sp=bool(_get(tree, "parallel.sequence_parallel", False)), recompute=recompute,
                  recompute_method=_get(tree, "model.recompute_method"),
                  recompute_num_layers=_get(tree, "model.recompute_num_layers"))


def workload_from_recipe(tree: dict, backend: str = "nccl") -> Workload:
    prompt = int(_get(tree, "data.max_prompt_length", 1024))
    response = int(_get(tree, "rollout.max_response_length", 16))
    seq = -(-(prompt + response) // 8) * 8
    return Workload(
        params_dtype=str(_get(tree, "model.params_dtype", "float32")),
        micro_batch_size=int(_get(tree, "trainer.micro_batch_size", 1)),
        seq_length=seq, max_tokens_per_micro_batch=_get(tree, "trainer.max_tokens_per_micro_batch"),
        prompts_per_step=int(_get(tree, "trainer.prompts_per_step", 128)),
        prompts_per_minibatch=int(_get(tree, "trainer.prompts_per_minibatch", 16)),
        n_samples=int(_get(tree, "rollout.n_samples_per_prompt", 8)),
        fused_output_layer=bool(_get(tree, "logits.fused_output_layer", False)),
        chunk_size=_get(tree, "logits.chunk_size"), clip_grad=float(_get(tree, "optim.clip_grad", 1.0)),
        weight_sync_bucket_bytes=int(_get(tree, "rollout.weight_sync_bucket_mb", 512)) * 2**20,
        make_vocab_size_divisible_by=int(_get(tree, "model.make_vocab_size_divisible_by", 128)),
        backend=backend, moe_aux_loss=str(_get(tree, "model.moe_router_load_balancing_type", "aux_loss")),
        loss=dict(_get(tree, "loss", {}) or {}), nll_coef=float(_get(tree, "trainer.nll_coef", 0.0)))


@dataclass(frozen=True)
class Recipe:
    arch: Arch
    layout: Layout
    """The recipe's own layout on the GPUs given."""
    work: Workload
    arch_source: str
    tree: dict


def load_recipe_inputs(path: str, overrides: list[str] = (), gpus: int | None = None, hf_config: str | None = None,
                       backend: str = "nccl") -> Recipe:
    tree = load_raw_recipe(path, overrides)
    model_path = _get(tree, "model.path")
    if not model_path:
        raise ConfigError("model.path is required: a Hugging Face checkpoint directory")
    hf, source = load_hf_config(model_path, hf_config)
    arch = arch_with_recipe(hf, tree, os.path.basename(os.path.normpath(model_path)))
    tp = int(_get(tree, "parallel.tensor_model_parallel_size", 1))
    pp = int(_get(tree, "parallel.pipeline_model_parallel_size", 1))
    layout = layout_from_recipe(tree, gpus or tp * pp)
    return Recipe(arch, layout, workload_from_recipe(tree, backend), source, tree)
