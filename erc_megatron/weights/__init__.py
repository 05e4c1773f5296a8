"""Hugging Face <-> Megatron weights for Llama / Qwen2 / Qwen3 dense models at any TP x PP layout.

layout: where each Megatron parameter lives (TP split, pipeline stage) and `shard_for_rank` /
`gather_from_ranks`; hf_convert: HF <-> Megatron tensors (fused QKV, fused gate/up, padded
vocabulary); checkpoint_io: load / save HF safetensors checkpoints; hf_stream: `iter_hf_weights`,
the bucketed stream that weight sync consumes; convert_cli: `erc-megatron convert`.
"""
