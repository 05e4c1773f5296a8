"""Weight sync from the learner to the rollout servers."""
