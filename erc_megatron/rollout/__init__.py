"""Rollout: the learner's SGLang client and an embedded server speaking SGLang's HTTP protocol.

- `client`: `SGLangClient` for real SGLang servers, a router, or the embedded server.
- `server`: `erc-megatron serve`, `start_server_in_thread`, `launch_server_process`.
- `openai_api`: the server's OpenAI-compatible `/v1/completions` and `/v1/chat/completions`.
- `engine`, `sampling`: the CPU continuous-batching engine behind the server (its KV cache access
  is `erc_megatron.patches.transformers_kv_cache`).
- `weight_update`, `flat_bucket`, `tensor_payload`: the server side of learner -> rollout weight
  sync (broadcast buckets, colocated-mode tensors).
- `collect`: one RL step's rollout, rewards and advantages, run on the learner's rank 0.

Modules are imported explicitly (no re-exports) so the client never pulls in transformers.
"""
