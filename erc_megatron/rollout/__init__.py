"""Rollout, learner side: the SGLang client and the wire formats it shares with a server.

- `client`: `SGLangClient` for real SGLang servers, a router, or the embedded server
  (`erc_megatron.rollout_server`, its own package: it runs in another process).
- `flat_bucket`, `tensor_payload`: the wire formats of learner -> rollout weight sync (broadcast
  buckets, colocated-mode tensors), encoded here and decoded by the server.
- `collect`: one RL step's rollout, rewards and advantages, run on the learner's rank 0.

Modules are imported explicitly (no re-exports) so the client never pulls in transformers.
"""
