"""One RL step, one file per phase, in the order the train loop (erc_megatron.train.main) calls them:

1. `collect`: rank 0 generates over SGLang's HTTP API and scores (dynamic sampling), sets the group
   advantages, and broadcasts the step's groups to every rank (also validation, every N steps).
2. `old_policy`: each data-parallel rank packs its share into micro-batches and runs the forward-only
   pass for old log-probs and entropies (the ERC ratio's denominator).
3. `policy_update`: per mini-batch, the global loss denominators and one optimizer step.
4. `sync_weights`: the new weights to the rollout servers, under a new weight version.
5. `log_checkpoint`: the step's metrics and progress line, checkpoints, the final validation.

Each phase takes the run's fixed parts (`erc_megatron.train.run.Run`) and, where it changes it,
the loop state (`LoopState`); metrics are added to the step's dict.
"""
