"""The step phases' pure parts (the phases themselves run in tests/train/test_train_e2e.py)."""
import math

from erc_megatron.train.phases.policy_update import mean_metrics


def test_mean_metrics_of_a_steps_updates():
    updates = [{"loss": 1.0, "rho_max": 1.5, "rho_min": 0.5, "pg/tokens": 10.0, "updated": 1.0, "gnorm": float("nan")},
               {"loss": 3.0, "rho_max": 2.5, "rho_min": 0.7, "pg/tokens": 6.0, "updated": 0.0, "gnorm": float("nan")},
               {"loss": float("inf"), "rho_max": 1.0, "rho_min": 0.1, "pg/tokens": 4.0, "updated": 1.0,
                "gnorm": float("nan")}]
    out = mean_metrics(updates)
    assert out["loss"] == 2.0  # non-finite values are left out of the mean
    assert (out["rho_max"], out["rho_min"]) == (2.5, 0.1)
    assert (out["pg/tokens"], out["updated"]) == (20.0, 2.0)  # counts add up
    assert math.isnan(out["gnorm"])
    assert mean_metrics([]) == {}
