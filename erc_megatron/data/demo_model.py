"""`erc-megatron make-demo-model`: a tiny tokenizer, model and data set for the CPU RL demo, made locally.

What it writes under `--out DIR` (nothing is downloaded):
- `DIR/model/`: a tiny Qwen2 (qkv bias) or Llama `*ForCausalLM` in safetensors, with the demo
  tokenizer and its chat template beside it, i.e. one Hugging Face directory that both the rollout
  server and the Megatron converter can load.
- `DIR/train.jsonl`, `DIR/val.jsonl`: addition of numbers 0..19 (`erc_megatron.data.synthetic`),
  prompt as a chat message list, answer as a string; validation pairs never occur in training.
- `DIR/demo_summary.json`: the settings and the warm model's accuracies.

Why it looks like this. The demo has to show held-out accuracy rising clearly within minutes of
ERC-DAPO on two CPU cores, with the learner at TP=2 x PP=2:
- Responses are at most 5 tokens (`\\boxed{`, one or two digits, `}`, end of turn), so a rollout
  step is a few forward passes of a model with ~80k parameters.
- The default model (hidden 64, 2 layers, 4 heads / 2 key-value heads, SwiGLU 128, untied
  embeddings) splits evenly over TP=2 (heads, kv heads, ffn) and PP=2 (one layer per stage).
- A randomly initialised model answers nothing right, and DAPO drops groups whose rewards are all
  equal, so RL would have nothing to learn from. A short supervised warm-up teaches the format and
  the arithmetic but labels a fraction `--sft-noise` of the examples with a systematic wrong answer
  (`correct + offset`, offsets from `--noise-offsets`, by default always +1). With noise above 0.5
  the wrong answer becomes the mode: greedy accuracy starts low, sampled (temperature 1) accuracy
  sits near 1 - noise, so sampled groups mix right and wrong answers and DAPO has signal on every
  prompt. The error is one behaviour shared by all prompts, so what RL unlearns on training pairs
  carries over to the held-out ones.
- Accuracies are measured with `math_reward`, the same function the RL run scores with.
- The tokenizer (`demo_tokenizer`, 36 tokens) is Qwen2-shaped byte-level BPE, so transformers
  loads it identically from a qwen2 or llama model directory.
Measured with the defaults (seed 0): warm-up ~10 s of CPU; held-out accuracy greedy 0.06,
temperature-1 sampled 0.24. A plain on-policy policy-gradient check (32 prompts x 8 samples, AdamW
lr 1e-4, no clipping) lifts the sampled held-out accuracy to 0.66 in 5 steps and the greedy one to
0.88; at lr 1e-5 it climbs steadily, sampled 0.24 -> 0.50 and greedy 0.06 -> 0.58 over 30 steps.
Everything is seeded by `--seed`; the command runs on one thread, so a seed gives the same files.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import time
from dataclasses import asdict, dataclass

import torch

from erc_megatron.data.demo_tokenizer import build_tokenizer, save_tokenizer
from erc_megatron.data.prompts import DataConfig, PromptDataset, load_prompt_dataset
from erc_megatron.data.synthetic import AdditionTaskConfig, format_response, make_rows, noisy_answer
from erc_megatron.model.config import ConfigError
from erc_megatron.utils.console import Progress
from erc_megatron.reward.math_reward import math_reward

_ARCHITECTURES = ("qwen2", "llama", "qwen3_moe")
# the MoE demo: every layer routes each token to 2 of 4 experts of a quarter of intermediate_size
_MOE_EXPERTS, _MOE_TOPK = 4, 2


@dataclass
class DemoModelConfig:
    """Shape of the tiny demo model."""

    architecture: str = "qwen2"
    """'qwen2' (Qwen2ForCausalLM, bias on q/k/v), 'llama' (LlamaForCausalLM, no biases) or 'qwen3_moe'
    (Qwen3MoeForCausalLM: q/k norms, 4 experts per layer of intermediate_size / 4, top-2 renormalised)."""
    hidden_size: int = 64
    """Model width."""
    num_layers: int = 2
    """Transformer layers (divisible by the pipeline-parallel size you will train with)."""
    num_attention_heads: int = 4
    """Query heads (divisible by the tensor-parallel size)."""
    num_key_value_heads: int = 2
    """Key/value heads for grouped-query attention (divisible by the tensor-parallel size)."""
    intermediate_size: int = 128
    """SwiGLU intermediate size."""
    tie_word_embeddings: bool = False
    """Share the input embedding with the output layer."""
    max_position_embeddings: int = 256
    """Longest sequence (prompt + response) the model is configured for."""

    def __post_init__(self) -> None:
        if self.architecture not in _ARCHITECTURES:
            raise ConfigError(f"model.architecture must be one of {_ARCHITECTURES}, got {self.architecture!r}")
        for name in ("hidden_size", "num_layers", "num_attention_heads", "num_key_value_heads",
                     "intermediate_size", "max_position_embeddings"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"model.hidden_size ({self.hidden_size}) must be divisible by "
                              f"model.num_attention_heads ({self.num_attention_heads})")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"model.num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                              f"model.num_key_value_heads ({self.num_key_value_heads})")


@dataclass
class WarmupConfig:
    """Supervised warm-up on deliberately noisy answers."""

    steps: int = 400
    """Optimizer steps of supervised training."""
    batch_size: int = 64
    """Examples per step."""
    lr: float = 3e-3
    """AdamW learning rate (cosine decay to 10%)."""
    noise: float = 0.7
    """Fraction of examples whose target answer is deliberately wrong."""
    noise_offsets: tuple[int, ...] = (1,)
    """A wrong target is the correct sum plus one of these offsets (drawn uniformly)."""
    eval_samples: int = 8
    """Sampled responses per validation prompt when measuring the temperature-1 accuracy."""
    seed: int = 0
    """Seed of the data split, initialisation, warm-up batches and evaluation sampling."""

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ConfigError(f"warmup.steps must be >= 0, got {self.steps}")
        if self.batch_size < 1:
            raise ConfigError(f"warmup.batch_size must be >= 1, got {self.batch_size}")
        if not self.lr > 0:
            raise ConfigError(f"warmup.lr must be > 0, got {self.lr}")
        if not 0.0 <= self.noise <= 1.0:
            raise ConfigError(f"warmup.noise must be in [0, 1], got {self.noise}")
        if not self.noise_offsets or any(o == 0 for o in self.noise_offsets):
            raise ConfigError(f"warmup.noise_offsets must be non-empty and non-zero, got {self.noise_offsets}")
        if self.eval_samples < 1:
            raise ConfigError(f"warmup.eval_samples must be >= 1, got {self.eval_samples}")


def build_model(config: DemoModelConfig, tokenizer, seed: int = 0):
    """A randomly initialised tiny `Qwen2ForCausalLM` / `LlamaForCausalLM` / `Qwen3MoeForCausalLM` sized to
    the tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common = dict(vocab_size=len(tokenizer), hidden_size=config.hidden_size,
                  intermediate_size=config.intermediate_size, num_hidden_layers=config.num_layers,
                  num_attention_heads=config.num_attention_heads, num_key_value_heads=config.num_key_value_heads,
                  max_position_embeddings=config.max_position_embeddings, rms_norm_eps=1e-6, hidden_act="silu",
                  tie_word_embeddings=config.tie_word_embeddings, bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, initializer_range=0.05)
    torch.manual_seed(seed)
    if config.architecture == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common, use_sliding_window=False))
    elif config.architecture == "qwen3_moe":
        from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

        moe = Qwen3MoeConfig(**common, num_experts=_MOE_EXPERTS, num_experts_per_tok=_MOE_TOPK, norm_topk_prob=True,
                             moe_intermediate_size=max(1, config.intermediate_size // _MOE_EXPERTS),
                             router_aux_loss_coef=0.001, attention_bias=False,
                             head_dim=config.hidden_size // config.num_attention_heads)
        moe.architectures = ["Qwen3MoeForCausalLM"]
        model = Qwen3MoeForCausalLM(moe)
    else:
        model = LlamaForCausalLM(LlamaConfig(**common, attention_bias=False, mlp_bias=False))
    return model.float()


def _response_ids(tokenizer, answer: int | str) -> list[int]:
    return tokenizer(format_response(answer), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def supervised_warmup(model, tokenizer, dataset: PromptDataset, config: WarmupConfig,
                      on_step=None) -> list[float]:
    """Train on (prompt, noisy `\\boxed{answer}`) pairs, loss on response tokens only; returns the losses.

    `on_step(steps_done)` is called after every optimizer step (progress reporting)."""
    rng = random.Random(config.seed + 2)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.0, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.1 + 0.9 * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * s / max(config.steps, 1)))).item())
    model.train()
    losses = []
    for _ in range(config.steps):
        seqs, labels = [], []
        for _ in range(config.batch_size):
            item = dataset[rng.randrange(len(dataset))]
            answer = noisy_answer(int(item["answer"]), rng, config.noise, config.noise_offsets)
            resp = _response_ids(tokenizer, answer)
            seqs.append(item["prompt_ids"] + resp)
            labels.append([-100] * len(item["prompt_ids"]) + resp)
        width = max(len(s) for s in seqs)
        input_ids = torch.tensor([s + [tokenizer.pad_token_id] * (width - len(s)) for s in seqs])
        label_ids = torch.tensor([lab + [-100] * (width - len(lab)) for lab in labels])
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
        loss = model(input_ids=input_ids, attention_mask=mask, labels=label_ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(len(losses))
    model.eval()
    return losses


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[int]], *, temperature: float, max_new_tokens: int = 8,
             seed: int = 0) -> list[str]:
    """Decoded responses (special tokens skipped); temperature 0 is greedy, otherwise pure sampling."""
    width = max(len(p) for p in prompts)
    input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    kwargs = dict(do_sample=False) if temperature == 0 else dict(do_sample=True, temperature=temperature,
                                                                   top_k=0, top_p=1.0)
    torch.manual_seed(seed)
    out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **kwargs)
    return tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)


def evaluate_accuracy(model, tokenizer, dataset: PromptDataset, *, temperature: float, samples: int = 1,
                      seed: int = 0) -> tuple[float, list[tuple[str, str, float]]]:
    """Fraction of responses that `math_reward` scores as correct, and (response, answer, score) per response."""
    prompts = [item["prompt_ids"] for item in dataset for _ in range(samples)]
    answers = [item["answer"] for item in dataset for _ in range(samples)]
    responses = generate(model, tokenizer, prompts, temperature=temperature, seed=seed)
    scored = [(r, a, math_reward(r, a)) for r, a in zip(responses, answers)]
    return sum(s > 0 for _, _, s in scored) / len(scored), scored


def _write_jsonl(path: str, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def make_demo(out_dir: str, model_config: DemoModelConfig, task: AdditionTaskConfig, warmup: WarmupConfig,
              log=print) -> dict:
    """Write tokenizer, warmed-up model and data sets under `out_dir`; returns the summary."""
    t0 = time.time()
    model_dir = os.path.join(out_dir, "model")
    os.makedirs(model_dir, exist_ok=True)
    tokenizer = build_tokenizer()
    train_rows, val_rows = make_rows(task)
    paths = {"model": model_dir, "train": os.path.join(out_dir, "train.jsonl"),
             "val": os.path.join(out_dir, "val.jsonl")}
    _write_jsonl(paths["train"], train_rows)
    _write_jsonl(paths["val"], val_rows)
    data_cfg = DataConfig(train_path=paths["train"], val_path=paths["val"], max_prompt_length=None)
    train = load_prompt_dataset(paths["train"], data_cfg, tokenizer)
    val = load_prompt_dataset(paths["val"], data_cfg, tokenizer)

    model = build_model(model_config, tokenizer, seed=warmup.seed)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {type(model).__name__}, {n_params} parameters, vocabulary {len(tokenizer)}")
    log(f"data: {len(train)} training prompts, {len(val)} held-out prompts; warm-up {warmup.steps} steps "
        f"with noise {warmup.noise} (offsets {list(warmup.noise_offsets)})")
    with Progress("warm-up", total=warmup.steps, unit="steps", out=log) as progress:
        losses = supervised_warmup(model, tokenizer, train, warmup, on_step=progress.update)
    if losses:
        log(f"warm-up loss {losses[0]:.3f} -> {sum(losses[-10:]) / len(losses[-10:]):.3f} (mean of last 10)")

    acc = {
        "val_greedy": evaluate_accuracy(model, tokenizer, val, temperature=0.0)[0],
        "val_sampled": evaluate_accuracy(model, tokenizer, val, temperature=1.0, samples=warmup.eval_samples,
                                         seed=warmup.seed)[0],
    }
    train_probe = PromptDataset(train.items[:len(val)], train.path)
    acc["train_sampled"] = evaluate_accuracy(model, tokenizer, train_probe, temperature=1.0,
                                             samples=warmup.eval_samples, seed=warmup.seed + 1)[0]
    model.save_pretrained(model_dir)
    save_tokenizer(tokenizer, model_dir)
    summary = {"paths": paths, "accuracy": acc, "num_parameters": n_params, "vocab_size": len(tokenizer),
               "final_warmup_loss": losses[-1] if losses else None, "seconds": round(time.time() - t0, 1),
               "model": asdict(model_config), "task": asdict(task),
               "warmup": {**asdict(warmup), "noise_offsets": list(warmup.noise_offsets)}}
    with open(os.path.join(out_dir, "demo_summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    log(f"held-out accuracy: greedy {acc['val_greedy']:.3f}, sampled (T=1, {warmup.eval_samples}/prompt) "
        f"{acc['val_sampled']:.3f}; training prompts sampled {acc['train_sampled']:.3f}")
    log(f"wrote {model_dir}, {paths['train']}, {paths['val']} in {summary['seconds']} s")
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    m, t, w = DemoModelConfig(), AdditionTaskConfig(), WarmupConfig()
    parser.add_argument("--out", required=True, help="output directory (created if missing)")
    parser.add_argument("--seed", type=int, default=w.seed, help="seed for everything (default %(default)s)")
    parser.add_argument("--architecture", choices=_ARCHITECTURES, default=m.architecture)
    parser.add_argument("--hidden-size", type=int, default=m.hidden_size)
    parser.add_argument("--num-layers", type=int, default=m.num_layers)
    parser.add_argument("--num-attention-heads", type=int, default=m.num_attention_heads)
    parser.add_argument("--num-key-value-heads", type=int, default=m.num_key_value_heads)
    parser.add_argument("--intermediate-size", type=int, default=m.intermediate_size)
    parser.add_argument("--tie-word-embeddings", action="store_true", help="share input and output embeddings")
    parser.add_argument("--max-operand", type=int, default=t.max_operand, help="operands are 0..N")
    parser.add_argument("--val-pair-fraction", type=float, default=t.val_pair_fraction,
                        help="fraction of operand pairs held out for validation")
    parser.add_argument("--num-train", type=int, default=t.num_train, help="rows in train.jsonl")
    parser.add_argument("--sft-steps", type=int, default=w.steps, help="supervised warm-up steps")
    parser.add_argument("--sft-batch-size", type=int, default=w.batch_size)
    parser.add_argument("--sft-lr", type=float, default=w.lr)
    parser.add_argument("--sft-noise", type=float, default=w.noise,
                        help="fraction of warm-up examples with a deliberately wrong answer (default %(default)s)")
    parser.add_argument("--noise-offsets", type=str, default=",".join(map(str, w.noise_offsets)),
                        help="comma-separated offsets added to the right answer to make a wrong one")
    parser.add_argument("--eval-samples", type=int, default=w.eval_samples,
                        help="sampled responses per held-out prompt for the T=1 accuracy")


def run(args: argparse.Namespace) -> int:
    try:
        offsets = tuple(int(x) for x in str(args.noise_offsets).split(",") if x.strip())
    except ValueError:
        raise ConfigError(f"--noise-offsets must be comma-separated integers, got {args.noise_offsets!r}") from None
    model_config = DemoModelConfig(architecture=args.architecture, hidden_size=args.hidden_size,
                                   num_layers=args.num_layers, num_attention_heads=args.num_attention_heads,
                                   num_key_value_heads=args.num_key_value_heads,
                                   intermediate_size=args.intermediate_size,
                                   tie_word_embeddings=args.tie_word_embeddings)
    task = AdditionTaskConfig(max_operand=args.max_operand, val_pair_fraction=args.val_pair_fraction,
                              num_train=args.num_train, seed=args.seed)
    warmup = WarmupConfig(steps=args.sft_steps, batch_size=args.sft_batch_size, lr=args.sft_lr,
                          noise=args.sft_noise, noise_offsets=offsets, eval_samples=args.eval_samples,
                          seed=args.seed)
    # A model this small gains nothing from intra-op threads, and on a busy machine their spinning
    # costs minutes; one thread also makes the output independent of the core count.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        make_demo(args.out, model_config, task, warmup)
    finally:
        torch.set_num_threads(threads)
    return 0
