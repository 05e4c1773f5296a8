"""The run config: every field validated, none silently ignored, `train --help` from the field docs."""
import dataclasses
import typing

import pytest

from erc_megatron.model.config import ConfigError
from erc_megatron.train.config import RunConfig
from erc_megatron.utils import config_tree
from erc_megatron.utils.config_docs import describe, field_docs

BASE = ["model.path=/tmp/model", "data.train_path=/tmp/train.jsonl"]

# One refused value per field, with what the message must say (the field's path and the allowed values).
BAD = {
    "model.path": ("''", "model.path is required"),
    "model.make_vocab_size_divisible_by": ("0", ">= 1"),
    "model.params_dtype": ("int8", "one of"),
    "model.recompute_granularity": ("partial", "(None, 'full', 'selective')"),
    "model.recompute_method": ("uniform", "set recompute_granularity: full"),
    "model.recompute_num_layers": ("0", "integer >= 1 or null"),
    "model.moe_aux_loss_coeff": ("-0.1", ">= 0 or null"),
    "model.moe_router_load_balancing_type": ("sinkhorn", "one of"),
    "model.moe_token_dispatcher_type": ("flex", "'alltoall', 'allgather'"),
    "parallel.tensor_model_parallel_size": ("0", ">= 1"),
    "parallel.pipeline_model_parallel_size": ("0", ">= 1"),
    "parallel.context_parallel_size": ("0", ">= 1"),
    "parallel.expert_model_parallel_size": ("0", ">= 1"),
    "parallel.expert_tensor_parallel_size": ("0", ">= 1 or null"),
    "parallel.seed": ("x", "must be an integer"),
    "parallel.distributed_timeout_minutes": ("0", ">= 1"),
    "parallel.use_distributed_optimizer": ("maybe", "true or false"),
    "parallel.sequence_parallel": ("true", "tensor_model_parallel_size > 1"),
    "optim.lr": ("0", "> 0"),
    "optim.min_lr": ("-1", "in [0"),
    "optim.lr_warmup_steps": ("-1", ">= 0"),
    "optim.lr_decay_style": ("step", "one of"),
    "optim.lr_decay_steps": ("0", "> 0"),
    "optim.weight_decay": ("-0.1", ">= 0"),
    "optim.adam_beta1": ("1.0", "[0, 1)"),
    "optim.adam_beta2": ("-0.5", "[0, 1)"),
    "optim.adam_eps": ("0", "> 0"),
    "optim.clip_grad": ("-1", ">= 0"),
    "loss.surrogate": ("ppo", "ppo_clip"),
    "loss.eps_low": ("1.0", "[0, 1)"),
    "loss.eps_high": ("-0.1", ">= 0"),
    "loss.clip_ratio_c": ("0.5", "> 1"),
    "loss.gppo_beta1": ("-1", ">= 0"),
    "loss.gppo_beta2": ("-1", ">= 0"),
    "loss.gspo_eps_low": ("1.5", "[0, 1)"),
    "loss.gspo_eps_high": ("-1", ">= 0"),
    "loss.erc": ("maybe", "true or false"),
    "loss.erc_low": ("1.0", "(0, 1)"),
    "loss.erc_high": ("1.0", "> 1"),
    "loss.agg": ("sum", "token-mean"),
    "loss.tis_cap": ("-1", ">= 0"),
    "loss.entropy_coef": ("-1", ">= 0"),
    "logits.temperature": ("0.5", "rollout.temperature"),
    "logits.chunk_size": ("0", ">= 1 or null"),
    "logits.fused_output_layer": ("maybe", "true or false"),
    "data.train_path": ("/tmp/train.csv", ".jsonl"),
    "data.val_path": ("/tmp/val.txt", ".jsonl"),
    "data.prompt_key": ("a..b", "field name"),
    "data.answer_key": ("''", "field name"),
    "data.apply_chat_template": ("maybe", "true or false"),
    "data.max_prompt_length": ("0", ">= 1 or null"),
    "data.overlong_prompts": ("truncate", "drop"),
    "data.shuffle": ("maybe", "true or false"),
    "data.seed": ("1.5", "must be an integer"),
    "reward.fn": ("nocolon", "package.module:function"),
    "reward.kwargs": ("[1, 2]", "must be a mapping"),
    "rollout.server_urls": ("[localhost:30000]", "http://"),
    "rollout.n_samples_per_prompt": ("0", ">= 1"),
    "rollout.temperature": ("0", "> 0"),
    "rollout.top_p": ("0", "(0, 1]"),
    "rollout.top_k": ("0", "-1 (disabled) or >= 1"),
    "rollout.max_response_length": ("0", ">= 1"),
    "rollout.request_timeout_s": ("0", "> 0"),
    "rollout.max_retries": ("-1", ">= 0"),
    "rollout.startup_timeout_s": ("-5", "> 0"),
    "rollout.weight_sync_bucket_mb": ("0", ">= 1"),
    "rollout.dynamic_sampling": ("maybe", "true or false"),
    "rollout.max_extra_rounds": ("-1", ">= 0"),
    "rollout.overlong_buffer": ("100", "[0, max_response_length"),
    "rollout.embedded_seed": ("-1", ">= 0"),
    "rollout.embedded_threads": ("0", ">= 1"),
    "rollout.weight_sync_mode": ("shm", "['distributed', 'tensor']"),
    "rollout.api_key": ("''", "non-empty string without whitespace, or null"),
    "validation.every_steps": ("-1", ">= 0"),
    "validation.n_samples": ("0", ">= 1"),
    "validation.temperature": ("0", "> 0"),
    "validation.top_p": ("1.5", "(0, 1]"),
    "validation.max_prompts": ("-3", ">= 1 or null"),
    "validation.max_response_length": ("0", ">= 1 or null"),
    "trainer.run_dir": ("''", "directory"),
    "trainer.steps": ("0", ">= 1"),
    "trainer.prompts_per_step": ("0", ">= 1"),
    "trainer.prompts_per_minibatch": ("0", ">= 1"),
    "trainer.micro_batch_size": ("0", ">= 1"),
    "trainer.max_tokens_per_micro_batch": ("0", ">= 1 or null"),
    "trainer.nll_coef": ("-0.1", ">= 0"),
    "trainer.save_every": ("-1", ">= 0"),
    "trainer.resume": ("maybe", "true or false"),
    "trainer.seed": ("-1", ">= 0"),
    "trainer.profile_comm": ("maybe", "true or false"),
    "trainer.profile_steps": ("[0]", "1..trainer.steps"),
}
# Fields where every value of the annotated type is meaningful.
FREE = {"rollout.stop", "data.system_prompt"}


def _leaf_fields():
    hints = typing.get_type_hints(RunConfig)
    for section in dataclasses.fields(RunConfig):
        for f in dataclasses.fields(hints[section.name]):
            if f.init:
                yield f"{section.name}.{f.name}"


def test_every_field_has_a_refused_value_and_a_doc():
    leaves = list(_leaf_fields())
    assert sorted(set(leaves) - set(BAD) - FREE) == [], "new fields need a refused value in BAD (or FREE)"
    assert sorted(set(BAD) - set(leaves)) == []
    hints = typing.get_type_hints(RunConfig)
    for leaf in leaves:
        section, name = leaf.split(".")
        assert field_docs(hints[section]).get(name), f"{leaf} has no docstring"


@pytest.mark.parametrize("path", sorted(BAD))
def test_bad_value_is_refused_naming_the_field(path):
    value, allowed = BAD[path]
    with pytest.raises(ConfigError) as err:
        config_tree.load(RunConfig, None, BASE + [f"{path}={value}"])
    msg = str(err.value)
    assert path in msg and allowed in msg, msg


def test_defaults_and_good_values_pass():
    cfg = config_tree.load(RunConfig, None, BASE + ["validation.max_prompts=3", "rollout.top_k=20",
                                                    "rollout.server_urls=[http://h:1]", "rollout.temperature=0.7",
                                                    "logits.temperature=0.7"])
    assert cfg.validation.max_prompts == 3 and cfg.rollout.top_k == 20
    # the learner divides by the rollout temperature, set or not
    assert cfg.logits.temperature == 0.7
    cfg = config_tree.load(RunConfig, None, BASE + ["rollout.temperature=0.6"])
    assert cfg.logits.temperature == 0.6


def test_recompute_and_parallel_combinations():
    full = ["model.recompute_granularity=full"]
    for extra, message in ((full, "model.recompute_method must be one of ('uniform', 'block')"),
                           (full + ["model.recompute_method=block"], "model.recompute_num_layers must be an integer"),
                           (["model.recompute_granularity=selective", "model.recompute_num_layers=2"],
                            "model.recompute_num_layers must be null with model.recompute_granularity 'selective'"),
                           (["model.recompute_method=ring"], "model.recompute_method must be one of")):
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            config_tree.load(RunConfig, None, BASE + extra)
    cfg = config_tree.load(RunConfig, None, BASE + full + ["model.recompute_method=uniform",
                                                           "model.recompute_num_layers=1",
                                                           "parallel.tensor_model_parallel_size=2",
                                                           "parallel.sequence_parallel=true",
                                                           "parallel.use_distributed_optimizer=null"])
    assert cfg.model.recompute_num_layers == 1 and cfg.parallel.sequence_parallel
    # null: on exactly when there is more than one data-parallel rank
    assert [cfg.parallel.distributed_optimizer(dp) for dp in (1, 2)] == [False, True]
    cfg = config_tree.load(RunConfig, None, BASE + ["parallel.use_distributed_optimizer=false"])
    assert not cfg.parallel.distributed_optimizer(8)


def test_recompute_layers_per_stage_in_the_layout_check():
    from erc_megatron.model.config import ModelConfig, ParallelConfig, layout_errors

    model = ModelConfig(num_layers=4, recompute_granularity="full", recompute_method="block", recompute_num_layers=3)
    assert layout_errors(4, ParallelConfig(pipeline_model_parallel_size=1), model) == []
    errors = layout_errors(4, ParallelConfig(pipeline_model_parallel_size=2), model)
    assert any("recompute_num_layers (3) is more than the 2 layers per pipeline stage" in e for e in errors), errors
    with pytest.raises(ConfigError, match=r"model.recompute_num_layers must be in \[1, num_layers=4\], got 5"):
        ModelConfig(num_layers=4, recompute_granularity="full", recompute_method="uniform", recompute_num_layers=5)


def test_data_seed_orders_the_prompts():
    from erc_megatron.data.prompts import DataConfig, PromptDataset, PromptIterator

    ds = PromptDataset([{"prompt_ids": [i], "prompt_text": str(i), "answer": str(i), "index": i} for i in range(50)],
                       "mem")

    def order(seed):
        return [x["index"] for x in PromptIterator.from_config(ds, DataConfig(seed=seed)).next_batch(50)]

    assert order(1) == order(1) and order(1) != order(2)
    assert PromptIterator.from_config(ds, DataConfig(seed=5, shuffle=False)).next_batch(3)[2]["index"] == 2


def test_train_help_lists_every_field_with_its_doc():
    from erc_megatron.cli import main

    lines = [line.strip() for line in describe(RunConfig)]
    assert "validation.max_prompts (int | None, None): Use only the first N validation prompts." in lines
    assert any(line.startswith("trainer.steps (int, 100): Rollout steps.") for line in lines)
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        main(["train", "--help"])
    text = out.getvalue()
    for leaf in _leaf_fields():
        assert f"  {leaf} (" in text, leaf


def test_token_budget_must_hold_the_longest_sequence_and_refuses_context_parallelism():
    ok = config_tree.load(RunConfig, None, BASE + ["data.max_prompt_length=100", "rollout.max_response_length=28",
                                                   "trainer.max_tokens_per_micro_batch=128"])
    assert ok.trainer.max_tokens_per_micro_batch == 128
    with pytest.raises(ConfigError, match=r"trainer.max_tokens_per_micro_batch \(127\) must be >= "
                                          r"data.max_prompt_length \+ rollout.max_response_length \(128\)"):
        config_tree.load(RunConfig, None, BASE + ["data.max_prompt_length=100", "rollout.max_response_length=28",
                                                  "trainer.max_tokens_per_micro_batch=127"])
    with pytest.raises(ConfigError, match="parallel.context_parallel_size 1"):
        config_tree.load(RunConfig, None, BASE + ["trainer.max_tokens_per_micro_batch=8192",
                                                  "parallel.context_parallel_size=2"])
