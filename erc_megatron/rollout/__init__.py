"""Rollout: the learner's SGLang client and an embedded server speaking SGLang's HTTP protocol.

- `client`: `SGLangClient` for real SGLang servers, a router, or the embedded server.
- `server`: `erc-megatron serve`, `start_server_in_thread`, `launch_server_process`.
- `engine`, `sampling`, `kv_cache`: the CPU continuous-batching engine behind the server.
- `weight_update`, `flat_bucket`: the server side of learner -> rollout weight sync.

Modules are imported explicitly (no re-exports) so the client never pulls in transformers.
"""
