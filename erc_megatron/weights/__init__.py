"""Hugging Face <-> Megatron weights for Llama / Qwen2 / Qwen3 dense and Qwen3-MoE models at any
TP x PP (x EP x expert TP) layout.

layout: where each Megatron parameter lives (TP split, pipeline stage, expert-parallel rank) and
`shard_for_rank` / `gather_from_ranks`; hf_convert: HF <-> Megatron tensors (fused QKV, fused
gate/up, per-expert names, padded vocabulary); checkpoint_io: load / save HF safetensors
checkpoints; hf_stream: `iter_hf_weights`, the bucketed stream that weight sync consumes;
expert_gather: one layer's experts from the EP x expert-TP ranks; convert_cli: `erc-megatron convert`.
"""
