"""Surrogates by registry name or `package.module:function` path, checked against float64 by hand."""
import textwrap

import pytest
import torch

from erc_megatron.algo import SURROGATES, PolicyLossConfig, policy_loss, register_surrogate, resolve_surrogate
from erc_megatron.model.config import ConfigError
from erc_megatron.train.config import RunConfig
from erc_megatron.utils import config_tree


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_surrogates.py").write_text(textwrap.dedent('''
        import torch

        def reinforce(cfg, log_prob, old_log_prob, advantages, mask):
            """Plain policy gradient: -A * logp, never clipped."""
            return -advantages * log_prob, torch.zeros_like(mask)
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_surrogates:reinforce"


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    logp = (-torch.rand(3, 5, generator=g, dtype=torch.float64) * 3).requires_grad_()
    old = -torch.rand(3, 5, generator=g, dtype=torch.float64) * 3
    adv = torch.randn(3, 5, generator=g, dtype=torch.float64)
    mask = torch.rand(3, 5, generator=g) > 0.3
    return logp, old, adv, mask


def test_builtins_are_registered():
    assert set(SURROGATES) >= {"ppo_clip", "gppo", "cispo", "gspo"}
    assert resolve_surrogate("gppo") is SURROGATES["gppo"]


def test_custom_surrogate_by_import_path_matches_float64(user_module):
    # through the run config, as a user would set it
    cfg = config_tree.load(RunConfig, None, ["model.path=/m", "data.train_path=/t.jsonl",
                                             f"loss.surrogate={user_module}", "loss.clip_ratio_c=0"]).loss
    logp, old, adv, mask = _inputs()
    loss, metrics = policy_loss(logp, old, adv, mask, config=cfg)
    loss.backward()
    m = mask.double()
    n = m.sum()
    assert torch.allclose(loss, (-adv * logp.detach() * m).sum() / n, rtol=1e-12, atol=0)
    assert torch.allclose(logp.grad, -adv * m / n, rtol=1e-12, atol=0)
    assert metrics["ppo_clipped"].item() == 0


def test_registered_name_and_dual_clip_apply_to_custom(user_module):
    fn = resolve_surrogate(user_module)
    register_surrogate("reinforce_test", fn)
    try:
        logp, old, adv, mask = _inputs(1)
        cfg = PolicyLossConfig(surrogate="reinforce_test", clip_ratio_c=3.0)
        loss, _ = policy_loss(logp, old, adv, mask, config=cfg)
        per_tok = -adv * logp.detach()
        # dual-clip caps A < 0 tokens at -A * c, as for the built-ins
        per_tok = torch.where(adv < 0, torch.minimum(-adv * 3.0, per_tok), per_tok)
        assert torch.allclose(loss, (per_tok * mask).sum() / mask.sum(), rtol=1e-12, atol=0)
    finally:
        del SURROGATES["reinforce_test"]


def test_bad_surrogates_are_refused(user_module):
    with pytest.raises(ConfigError, match=r"loss.surrogate must be one of \('ppo_clip', 'gppo', 'cispo', 'gspo'\)"):
        config_tree.load(RunConfig, None, ["model.path=/m", "data.train_path=/t.jsonl", "loss.surrogate=ppo"])
    with pytest.raises(ConfigError, match="loss.surrogate 'my_surrogates:nope'.*has no attribute 'nope'.*reinforce"):
        config_tree.load(RunConfig, None, ["model.path=/m", "data.train_path=/t.jsonl",
                                           "loss.surrogate=my_surrogates:nope"])
    with pytest.raises(ValueError, match="already registered"):
        register_surrogate("gppo", lambda *a: None)
