"""The one config tree of a training run, validated once at start-up.

`erc-megatron train --config examples/<recipe>.yaml section.key=value ...` builds `RunConfig`.
Field names follow Megatron's flags where one exists.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from erc_megatron.algo import PolicyLossConfig
from erc_megatron.data.prompts import DataConfig
from erc_megatron.model.config import (MOE_LOAD_BALANCING_TYPES, MOE_TOKEN_DISPATCHER_TYPES, PARAMS_DTYPES,
                                       ConfigError, ParallelConfig, check_recompute)
from erc_megatron.reward.registry import RewardConfig
from erc_megatron.train.learner import OptimConfig
from erc_megatron.train.step import LogitsConfig


@dataclass
class ModelSection:
    """The policy checkpoint and how Megatron holds it (architecture comes from its config.json)."""

    path: str = ""
    """Hugging Face checkpoint directory (config.json, safetensors, tokenizer)."""
    make_vocab_size_divisible_by: int = 128
    """Vocabulary padding multiple (times the tensor-parallel size)."""
    params_dtype: str = "float32"
    """float32, bfloat16 or float16."""
    recompute_granularity: str | None = None
    """Activation recomputation (megatron's): null keeps every activation, "full" recomputes whole
    transformer layers in backward (with recompute_method), "selective" only the attention core."""
    recompute_method: str | None = None
    """With "full": "uniform" checkpoints groups of recompute_num_layers layers, "block" the first
    recompute_num_layers layers of each pipeline stage; null otherwise."""
    recompute_num_layers: int | None = None
    """With "full": layers per group (uniform) or per pipeline stage (block); null otherwise."""

    moe_aux_loss_coeff: float | None = None
    """MoE checkpoints: weight of the router load-balancing loss; None takes the checkpoint's
    router_aux_loss_coef (0 turns the loss off)."""
    moe_router_load_balancing_type: str = "aux_loss"
    """MoE checkpoints: aux_loss (per micro-batch, as HF), seq_aux_loss, global_aux_loss or none."""
    moe_token_dispatcher_type: str = "alltoall"
    """MoE checkpoints: how tokens reach their experts' ranks, alltoall or allgather."""

    def __post_init__(self) -> None:
        check_recompute("model", self.recompute_granularity, self.recompute_method, self.recompute_num_layers)
        if self.moe_aux_loss_coeff is not None and not float(self.moe_aux_loss_coeff) >= 0:
            raise ConfigError(f"model.moe_aux_loss_coeff must be >= 0 or null (the checkpoint's), "
                              f"got {self.moe_aux_loss_coeff}")
        if self.moe_router_load_balancing_type not in MOE_LOAD_BALANCING_TYPES:
            raise ConfigError(f"model.moe_router_load_balancing_type must be one of {MOE_LOAD_BALANCING_TYPES}, "
                              f"got {self.moe_router_load_balancing_type!r}")
        if self.moe_token_dispatcher_type not in MOE_TOKEN_DISPATCHER_TYPES:
            raise ConfigError(f"model.moe_token_dispatcher_type must be one of {MOE_TOKEN_DISPATCHER_TYPES}, "
                              f"got {self.moe_token_dispatcher_type!r}")
        if self.params_dtype not in PARAMS_DTYPES:
            raise ConfigError(f"model.params_dtype must be one of {PARAMS_DTYPES}, got {self.params_dtype!r}")
        if self.make_vocab_size_divisible_by < 1:
            raise ConfigError("model.make_vocab_size_divisible_by must be >= 1, "
                              f"got {self.make_vocab_size_divisible_by}")
        if not self.path:
            raise ConfigError("model.path is required: a Hugging Face checkpoint directory "
                              "(`erc-megatron make-demo-model --out DIR` creates the CPU demo's)")


@dataclass
class RolloutConfig:
    """Generation on the rollout servers (SGLang, or the embedded CPU server)."""

    server_urls: list[str] = field(default_factory=list)
    """SGLang server or router URLs; empty starts the embedded server on this node."""
    n_samples_per_prompt: int = 8
    """Responses per prompt (the DAPO/GRPO group size)."""
    temperature: float = 1.0
    """Sampling temperature (also divides the learner's logits)."""
    top_p: float = 1.0
    """Nucleus sampling."""
    top_k: int = -1
    """Top-k sampling; -1 disables."""
    max_response_length: int = 16
    """max_new_tokens per response."""
    stop: list[str] = field(default_factory=list)
    """Stop strings."""
    request_timeout_s: float = 600.0
    """Per-request HTTP timeout."""
    max_retries: int = 3
    """Retries on connection errors / 5xx, with exponential backoff."""
    startup_timeout_s: float = 300.0
    """How long to wait for servers to become healthy."""
    weight_sync_bucket_mb: int = 512
    """Bucket size of the weight sync broadcast."""
    weight_sync_mode: str = "distributed"
    """How weights reach the servers: "distributed" (a broadcast group, SGLang's
    /update_weights_from_distributed) or "tensor" (colocated: servers on rank 0's machine read
    shared memory, /update_weights_from_tensor)."""
    dynamic_sampling: bool = True
    """DAPO dynamic sampling: drop groups whose rewards are all equal and refill."""
    max_extra_rounds: int = 3
    """Cap on extra generation rounds to refill the batch."""
    overlong_buffer: int = 0
    """Soft overlong punishment L_cache (tokens); 0 disables; L_max is max_response_length."""
    embedded_seed: int = 0
    """Sampling seed of the embedded server."""
    embedded_threads: int = 1
    """CPU threads of the embedded server (the learner ranks share the cores)."""
    api_key: str | None = None
    """SGLang's --api-key of the servers (sent as `Authorization: Bearer`); also given to the embedded
    server. None: no key (the embedded server then listens on 127.0.0.1 only)."""

    def __post_init__(self) -> None:
        for url in self.server_urls:
            if not (isinstance(url, str) and url.startswith(("http://", "https://"))):
                raise ConfigError(f"rollout.server_urls entries must be http:// or https:// URLs, got {url!r}")
        for name in ("n_samples_per_prompt", "embedded_threads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"rollout.{name} must be >= 1, got {getattr(self, name)}")
        if self.top_k != -1 and self.top_k < 1:
            raise ConfigError(f"rollout.top_k must be -1 (disabled) or >= 1, got {self.top_k}")
        if self.api_key is not None and (not self.api_key or any(c.isspace() for c in self.api_key)):
            raise ConfigError("rollout.api_key must be a non-empty string without whitespace, or null (no key)")
        for name in ("request_timeout_s", "startup_timeout_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"rollout.{name} must be > 0, got {getattr(self, name)}")
        for name in ("max_retries", "max_extra_rounds", "embedded_seed"):
            if getattr(self, name) < 0:
                raise ConfigError(f"rollout.{name} must be >= 0, got {getattr(self, name)}")
        if self.temperature <= 0:
            raise ConfigError(f"rollout.temperature must be > 0 for RL (the learner divides logits by it), "
                              f"got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"rollout.top_p must be in (0, 1], got {self.top_p}")
        if self.max_response_length < 1:
            raise ConfigError(f"rollout.max_response_length must be >= 1, got {self.max_response_length}")
        if not 0 <= self.overlong_buffer <= self.max_response_length:
            raise ConfigError(f"rollout.overlong_buffer must be in [0, max_response_length="
                              f"{self.max_response_length}], got {self.overlong_buffer}")
        if self.weight_sync_mode not in ("distributed", "tensor"):
            raise ConfigError(f"rollout.weight_sync_mode must be one of ['distributed', 'tensor'], "
                              f"got {self.weight_sync_mode!r}")
        if self.weight_sync_bucket_mb < 1:
            raise ConfigError(f"rollout.weight_sync_bucket_mb must be >= 1, got {self.weight_sync_bucket_mb}")


@dataclass
class ValidationConfig:
    """Held-out accuracy: mean over k samples per prompt."""

    every_steps: int = 5
    """Validate every N steps (and before the first); 0 disables."""
    n_samples: int = 4
    """k samples per prompt (avg@k)."""
    temperature: float = 0.6
    """Validation sampling temperature."""
    top_p: float = 0.95
    """Validation nucleus sampling."""
    max_prompts: int | None = None
    """Use only the first N validation prompts."""
    max_response_length: int | None = None
    """Defaults to rollout.max_response_length."""

    def __post_init__(self) -> None:
        if self.every_steps < 0:
            raise ConfigError(f"validation.every_steps must be >= 0 (0 disables), got {self.every_steps}")
        if self.n_samples < 1:
            raise ConfigError(f"validation.n_samples must be >= 1, got {self.n_samples}")
        if not self.temperature > 0:
            raise ConfigError(f"validation.temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"validation.top_p must be in (0, 1], got {self.top_p}")
        for name in ("max_prompts", "max_response_length"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"validation.{name} must be >= 1 or null, got {getattr(self, name)}")


@dataclass
class TrainerConfig:
    """The RL loop."""

    run_dir: str = "runs/erc"
    """Metrics (JSONL, TensorBoard), plots and checkpoints go here."""
    steps: int = 100
    """Rollout steps."""
    prompts_per_step: int = 128
    """Prompts per rollout step (before the n samples)."""
    prompts_per_minibatch: int = 16
    """Prompts per optimizer step; prompts_per_step / prompts_per_minibatch updates per rollout step."""
    micro_batch_size: int = 1
    """Sequences per micro-batch on each data-parallel rank (padded micro-batches only)."""
    max_tokens_per_micro_batch: int | None = None
    """Pack sequences (prompt + response) without padding into micro-batches of at most this many
    tokens, balanced over the data-parallel ranks by token count (micro_batch_size is then unused);
    null: micro_batch_size sequences right-padded to the step's longest. Must be >= the longest
    prompt + response (README, "Packed micro-batches")."""
    nll_coef: float = 0.0
    """Positive-sample NLL coefficient (Klear-Reasoner; the ERC recipes use 0.1)."""
    save_every: int = 0
    """Checkpoint every N steps (0: only at the end)."""
    resume: bool = True
    """Resume from the newest checkpoint in run_dir if there is one."""
    seed: int = 1234
    """Rollout sampling seed (each request's sampling_seed derives from it); data order is data.seed."""
    profile_comm: bool = False
    """Record every collective and p2p op of the steps in profile_steps on every rank; writes
    comm_profile.json, comm_profile.png and comm_trace.json to run_dir and prints a table (README,
    "Communication profiler"). Off: no hooks are installed at all."""
    profile_steps: list[int] = field(default_factory=list)
    """1-based steps to profile when profile_comm is on (e.g. [2, 3]); empty: every step."""

    def __post_init__(self) -> None:
        if not self.run_dir:
            raise ConfigError("trainer.run_dir must be a directory path, got ''")
        if self.seed < 0:
            raise ConfigError(f"trainer.seed must be >= 0, got {self.seed}")
        for name in ("steps", "prompts_per_step", "prompts_per_minibatch", "micro_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"trainer.{name} must be >= 1, got {getattr(self, name)}")
        if self.prompts_per_step % self.prompts_per_minibatch:
            raise ConfigError(f"trainer.prompts_per_step ({self.prompts_per_step}) must be a multiple of "
                              f"trainer.prompts_per_minibatch ({self.prompts_per_minibatch})")
        if self.max_tokens_per_micro_batch is not None and (
                isinstance(self.max_tokens_per_micro_batch, bool) or self.max_tokens_per_micro_batch < 1):
            raise ConfigError(f"trainer.max_tokens_per_micro_batch must be an int >= 1 or null (padded "
                              f"micro-batches), got {self.max_tokens_per_micro_batch}")
        for name in ("nll_coef", "save_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"trainer.{name} must be >= 0, got {getattr(self, name)}")
        bad = [s for s in self.profile_steps
               if not isinstance(s, int) or isinstance(s, bool) or not 1 <= s <= self.steps]
        if bad or len(set(self.profile_steps)) != len(self.profile_steps):
            raise ConfigError(f"trainer.profile_steps must be distinct step numbers in 1..trainer.steps "
                              f"({self.steps}), got {self.profile_steps}")


@dataclass
class LogitsSection(LogitsConfig):
    """How per-token log-probs and entropies are taken from the vocab-parallel logits."""

    temperature: float | None = None
    """Leave unset: the learner divides logits by rollout.temperature; any other value is refused."""

    def __post_init__(self) -> None:
        if self.temperature is not None:
            super().__post_init__()
        elif self.chunk_size is not None and self.chunk_size < 1:
            raise ConfigError(f"logits.chunk_size must be >= 1 or null, got {self.chunk_size}")


@dataclass
class RunConfig:
    """Everything a run needs."""

    model: ModelSection = field(default_factory=lambda: ModelSection(path="<unset>"))
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: PolicyLossConfig = field(default_factory=PolicyLossConfig)
    logits: LogitsSection = field(default_factory=LogitsSection)
    data: DataConfig = field(default_factory=DataConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)

    def __post_init__(self) -> None:
        if self.model.path == "<unset>":
            raise ConfigError("model.path is required: a Hugging Face checkpoint directory")
        if self.data.train_path is None:
            raise ConfigError("data.train_path is required (JSONL or Parquet)")
        # the learner must see the distribution the rollout engine sampled from
        if self.logits.temperature is not None and self.logits.temperature != self.rollout.temperature:
            raise ConfigError(f"logits.temperature ({self.logits.temperature}) must equal rollout.temperature "
                              f"({self.rollout.temperature}) or be left unset: the learner must see the "
                              "distribution the rollout engine sampled from")
        self.logits.temperature = self.rollout.temperature
        budget = self.trainer.max_tokens_per_micro_batch
        if budget is not None and self.parallel.context_parallel_size > 1:
            raise ConfigError("trainer.max_tokens_per_micro_batch (packed micro-batches) needs "
                              f"parallel.context_parallel_size 1, got {self.parallel.context_parallel_size}")
        if budget is not None and self.data.max_prompt_length is not None:
            longest = self.data.max_prompt_length + self.rollout.max_response_length
            if budget < longest:
                raise ConfigError(f"trainer.max_tokens_per_micro_batch ({budget}) must be >= data.max_prompt_length "
                                  f"+ rollout.max_response_length ({longest}): every sequence must fit one micro-batch")
