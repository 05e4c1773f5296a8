"""The embedded rollout server: a separate process speaking SGLang's HTTP protocol on CPU.

- `server`: `erc-megatron serve`, `start_server_in_thread`, `launch_server_process`.
- `openai_api`: the server's OpenAI-compatible `/v1/completions` and `/v1/chat/completions`.
- `engine`, `sampling`: the CPU continuous-batching engine behind it (its KV cache access is
  `erc_megatron.patches.transformers_kv_cache`).
- `weight_update`: the server side of learner -> rollout weight sync (broadcast buckets, disk,
  colocated-mode tensors); the wire formats it decodes are `erc_megatron.rollout.flat_bucket` and
  `erc_megatron.rollout.tensor_payload`, shared with the learner's sender.

The learner imports this package only to start the server (`launch_server_process`); it talks to
it, as to a real SGLang server, through `erc_megatron.rollout.client`.
"""
