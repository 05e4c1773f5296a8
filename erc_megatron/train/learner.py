"""The learner: one megatron-core model shard wrapped in megatron's DDP, its optimizer and LR schedule."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from erc_megatron.model.config import ConfigError, ModelConfig, ParallelConfig


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule (megatron's names)."""

    lr: float = 1e-6
    """Peak learning rate."""
    min_lr: float = 0.0
    """Learning rate at the end of decay."""
    lr_warmup_steps: int = 0
    """Linear warm-up, in optimizer steps."""
    lr_decay_style: str = "constant"
    """constant, linear or cosine."""
    lr_decay_steps: int = 1_000_000
    """Steps over which the rate decays (linear/cosine)."""
    weight_decay: float = 0.1
    """AdamW weight decay."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.999
    """AdamW beta2."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    clip_grad: float = 1.0
    """Global gradient-norm clip; 0 disables."""

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"optim.lr must be > 0, got {self.lr}")
        if not 0 <= self.min_lr <= self.lr:
            raise ConfigError(f"optim.min_lr must be in [0, optim.lr={self.lr}], got {self.min_lr}")
        styles = ("constant", "linear", "cosine")
        if self.lr_decay_style not in styles:
            raise ConfigError(f"optim.lr_decay_style must be one of {styles}, got {self.lr_decay_style!r}")
        if self.lr_warmup_steps < 0 or self.lr_decay_steps <= 0:
            raise ConfigError("optim.lr_warmup_steps must be >= 0 and optim.lr_decay_steps > 0, got "
                              f"{self.lr_warmup_steps} and {self.lr_decay_steps}")
        if self.weight_decay < 0:
            raise ConfigError(f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        if not self.adam_eps > 0:
            raise ConfigError(f"optim.adam_eps must be > 0, got {self.adam_eps}")
        if self.clip_grad < 0:
            raise ConfigError(f"optim.clip_grad must be >= 0, got {self.clip_grad}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"optim.{name} must be in [0, 1), got {getattr(self, name)}")


@dataclass
class Learner:
    """Everything one rank needs to run forward/backward and optimizer steps."""

    model: torch.nn.Module  # megatron DDP-wrapped GPTModel shard
    optimizer: object
    scheduler: object
    model_config: ModelConfig
    transformer_config: object
    distributed_optimizer: bool = False
    """Whether `optimizer` is megatron's DistributedOptimizer (Adam state sharded over data parallel)."""

    @property
    def unwrapped(self):
        return self.model.module


def build_learner(model_config: ModelConfig, optim: OptimConfig, parallel: ParallelConfig | None = None,
                  layout=None) -> Learner:
    """Model shard + megatron DDP + megatron optimizer (torch AdamW without TE/apex) + LR schedule.

    `parallel` says whether to use the distributed optimizer and sequence parallelism (None:
    ParallelConfig's defaults); `layout`: erc_megatron.dist.ParallelLayout (None: the one
    erc_megatron.dist.init_distributed made).
    """
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from erc_megatron.model.gpt import build_gpt_model, torch_dtype

    from erc_megatron.dist import current_layout

    layout = layout or current_layout()
    parallel = parallel or ParallelConfig()
    distopt = parallel.distributed_optimizer(layout.dp.size)
    gpt = build_gpt_model(model_config, layout=layout, sequence_parallel=parallel.sequence_parallel)
    tcfg = gpt.config
    ddp = DistributedDataParallel(
        config=tcfg,
        ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                                 use_distributed_optimizer=distopt),
        module=gpt,
    )
    dtype = torch_dtype(model_config.params_dtype)
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=optim.lr, min_lr=optim.min_lr, weight_decay=optim.weight_decay,
                        adam_beta1=optim.adam_beta1, adam_beta2=optim.adam_beta2, adam_eps=optim.adam_eps,
                        clip_grad=optim.clip_grad, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
                        params_dtype=dtype, use_distributed_optimizer=distopt),
        [ddp],
    )
    tcfg.finalize_model_grads_func = finalize_model_grads
    tcfg.grad_scale_func = optimizer.scale_loss
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0 if optim.lr_warmup_steps else optim.lr, max_lr=optim.lr, min_lr=optim.min_lr,
        lr_warmup_steps=optim.lr_warmup_steps, lr_decay_steps=max(optim.lr_decay_steps, optim.lr_warmup_steps + 1),
        lr_decay_style=optim.lr_decay_style, start_wd=optim.weight_decay, end_wd=optim.weight_decay,
        wd_incr_steps=1, wd_incr_style="constant")
    return Learner(ddp, optimizer, scheduler, model_config, tcfg, distopt)
