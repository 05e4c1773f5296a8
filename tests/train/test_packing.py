"""Token-budget packing (train/packing.py), packed rows (train/batch.py), denominators from lengths
and the compact rollout payload (train/rollout_share.py), on one process. The packed path's losses
and gradients against the padded path, at TP=2 / DP=2, are in test_parallel_equivalence.py."""
import math
import random

import pytest
import torch

from erc_megatron.model.config import ConfigError
from erc_megatron.rollout.collect import Sample
from erc_megatron.train.batch import (pack_row, pack_sequences, packed_attention_mask, packed_cu_seqlens,
                                      packed_position_ids, unpack)
from erc_megatron.train.minibatch import RolloutTable, plan_minibatches, samples_of_rank, split_minibatches
from erc_megatron.train.packing import first_fit_decreasing, pack_for_data_parallel
from erc_megatron.train.rollout_share import decode_share, encode_share
from erc_megatron.train.update import denominators_from_lengths, minibatch_denominators


def _long_tailed(n, seed, cap=4000):
    rng = random.Random(seed)
    return [min(cap, int(20 + rng.paretovariate(1.2) * 40)) for _ in range(n)]


@pytest.mark.parametrize("dp", [1, 2, 3, 4])
def test_packer_respects_budget_uses_every_sequence_once_balances_and_is_deterministic(dp):
    budget = 4096
    lengths = _long_tailed(300, seed=dp)
    plan = pack_for_data_parallel(lengths, budget, dp)
    assert plan == pack_for_data_parallel(list(lengths), budget, dp)  # deterministic
    assert len({len(mbs) for mbs in plan}) == 1  # same number of micro-batches on every rank
    used = sorted(i for mbs in plan for mb in mbs for i in mb)
    assert used == list(range(len(lengths)))  # every sequence exactly once
    for mbs in plan:
        for mb in mbs:
            assert sum(lengths[i] for i in mb) <= budget
    loads = [sum(lengths[i] for mb in mbs for i in mb) for mbs in plan]
    # balanced by tokens: no rank is more than one micro-batch's budget above another
    assert max(loads) - min(loads) <= budget, loads
    # FFD's bound: at most 11/9 OPT + 1 bins, OPT >= total / budget
    bins = first_fit_decreasing(lengths, budget)
    assert len(bins) <= math.ceil(11 / 9 * math.ceil(sum(lengths) / budget)) + 1
    # and it packs: far fewer rows than one per sequence
    assert sum(len(mbs) for mbs in plan) < len(lengths) / 5


def test_packer_pads_ranks_with_empty_micro_batches_and_refuses_overlong_sequences():
    assert pack_for_data_parallel([5, 3], 10, 4) == [[[0, 1]], [[]], [[]], [[]]]
    assert pack_for_data_parallel([6, 6, 6], 10, 2) == [[[0], [2]], [[1], []]]
    with pytest.raises(ValueError, match=r"sequence 1 has 11 tokens .*trainer\.max_tokens_per_micro_batch=10"):
        pack_for_data_parallel([3, 11], 10, 1)
    with pytest.raises(ConfigError, match="trainer.max_tokens_per_micro_batch"):
        first_fit_decreasing([1], 0)


def test_packed_row_has_per_sequence_labels_positions_mask_and_cu_seqlens():
    prompts, responses = [[11, 12], [21], [31, 32, 33]], [[13, 14, 15], [22, 23], []]
    mb = pack_row(prompts, responses, row_length=14, pad_id=0)
    assert mb.tokens.tolist() == [[11, 12, 13, 14, 15, 21, 22, 23, 31, 32, 33, 0, 0, 0]]
    # no target crosses into the next sequence: each sequence's last position has label pad, mask 0
    assert mb.labels.tolist() == [[12, 13, 14, 15, 0, 22, 23, 0, 32, 33, 0, 0, 0, 0]]
    assert mb.loss_mask.tolist() == [[0, 1, 1, 1, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0]]
    assert mb.seq_lengths == [5, 3, 3]
    assert mb.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 0, 1, 2]]
    assert packed_cu_seqlens(mb.seq_lengths, 14).tolist() == [0, 5, 8, 11, 14]
    assert packed_cu_seqlens([4, 4], 8).tolist() == [0, 4, 8]  # no pad run, no empty segment
    assert packed_position_ids([2], 2).tolist() == [[0, 1]]
    blocked = packed_attention_mask(mb.seq_lengths, 14)[0, 0]
    start = (torch.arange(14) - packed_position_ids(mb.seq_lengths, 14)[0]).tolist()  # each token's sequence start
    for q in range(14):
        for k in range(14):
            same = start[q] == start[k]
            assert bool(blocked[q, k]) == (not (same and k <= q)), (q, k)
    # each sequence's values come back as its padded row would hold them
    padded = pack_sequences(prompts, responses, seq_length=6)
    assert torch.equal(unpack(mb.loss_mask, mb.seq_lengths), padded.loss_mask[:, :5])
    assert torch.equal(unpack(mb.labels, mb.seq_lengths)[:, :4] * padded.loss_mask[:, :4],
                       padded.labels[:, :4] * padded.loss_mask[:, :4])
    with pytest.raises(ValueError, match="do not fit"):
        pack_row(prompts, responses, row_length=10)


def test_unpack_is_differentiable_and_zero_past_each_sequence():
    x = torch.arange(1.0, 9.0).view(1, 8).requires_grad_()
    rows = unpack(x, [3, 1, 2])
    assert rows.tolist() == [[1, 2, 3], [4, 0, 0], [5, 6, 0]]
    rows.sum().backward()
    assert x.grad.tolist() == [[1, 1, 1, 1, 1, 1, 0, 0]]


def _groups(seed, n_groups=6, per_group=4):
    g = torch.Generator().manual_seed(seed)
    groups = []
    for gi in range(n_groups):
        group = []
        for _ in range(per_group):
            p = torch.randint(1, 50, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g).tolist()
            r = torch.randint(1, 50, (int(torch.randint(0, 9, (1,), generator=g)),), generator=g).tolist()
            lps = (-torch.rand(len(r), generator=g)).tolist()[:max(0, len(r) - gi % 2)]  # some short of one
            group.append(Sample(p, r, "", "", float(torch.randint(0, 3, (1,), generator=g)), lps, "stop", gi,
                                advantage=float(torch.randn(1, generator=g))))
        groups.append(group)
    return groups


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"])
def test_denominators_from_lengths_equal_the_padded_masks(agg):
    groups = _groups(3)
    padded = split_minibatches(groups, 3, 0, 1, micro_batch_size=4, pad_id=0)
    everyone = [split_minibatches(groups, 3, r, 2, micro_batch_size=2, pad_id=0) for r in range(2)]
    for i, m in enumerate(padded):
        want = minibatch_denominators(m.mine, agg, with_nll=True)
        assert m.denominators(agg, with_nll=True) == want
        both = everyone[0][i].mine + everyone[1][i].mine
        assert minibatch_denominators(both, agg, with_nll=True) == want
    assert denominators_from_lengths([2, 0, 3], [1.0, 2.0, 2.0], agg, with_nll=True).nll == 3.0


def test_packed_plan_gives_every_sample_once_and_micro_batches_hold_its_values():
    groups = _groups(5)
    flat = [s for g in groups for s in g]
    table = RolloutTable.from_groups(groups)
    plans = plan_minibatches(table, 2, dp_size=2, micro_batch_size=4, max_tokens=16)
    assert sorted(samples_of_rank(plans, 0) + samples_of_rank(plans, 1)) == list(range(len(flat)))
    for r in range(2):
        mbs = [mb for m in split_minibatches(groups, 2, r, 2, 4, pad_id=0, max_tokens=16) for mb in m.mine]
        assert len({tuple(mb.tokens.shape) for mb in mbs}) == 1 and mbs[0].tokens.shape[0] == 1
        for mb, ids in zip(mbs, [mb for p in plans for mb in p.ranks[r]]):
            real = [i for i in ids if i is not None]
            assert mb.seq_lengths == ([table.seq_len(i) for i in real] or [1])
            adv = unpack(mb.advantages, mb.seq_lengths)
            lp = unpack(mb.rollout_logp, mb.seq_lengths)
            for row, i in enumerate(real):
                s = flat[i]
                start, n = len(s.prompt_ids) - 1, len(s.response_ids)
                assert torch.allclose(adv[row, start:start + n], torch.full((n,), s.advantage))
                want = s.rollout_logprobs[:n] + [0.0] * (n - len(s.rollout_logprobs))
                assert torch.allclose(lp[row, start:start + n], torch.tensor(want))
            assert mb.rewards.tolist() == ([flat[i].reward for i in real] or [float("-inf")])


@pytest.mark.parametrize("max_tokens", [None, 16])
def test_micro_batches_are_built_on_the_requested_device(max_tokens):
    # the meta device stands in for a GPU: every tensor the forward, loss and denominators read must move
    from erc_megatron.train.minibatch import build_minibatches

    groups = _groups(3)
    table = RolloutTable.from_groups(groups)
    plans = plan_minibatches(table, 2, dp_size=1, micro_batch_size=4, max_tokens=max_tokens)
    flat = dict(enumerate(s for g in groups for s in g))
    mbs = [mb for m in build_minibatches(table, plans, flat, 0, 0, max_tokens, device="meta") for mb in m.mine]
    tensors = [getattr(mb, f) for mb in mbs for f in ("tokens", "labels", "loss_mask", "advantages", "rollout_logp",
                                                       "rewards", "position_ids")]
    assert mbs and all(t is not None and t.device.type == "meta" for t in tensors)


def test_compact_payload_round_trip():
    groups = _groups(7)
    flat = [s for g in groups for s in g]
    table = RolloutTable.from_groups(groups)
    mine = [3, 0, 17, 9, 23]
    payload = encode_share(flat, mine)
    assert payload.dtype == torch.int32
    assert payload.numel() == sum(len(flat[i].prompt_ids) + 2 * len(flat[i].response_ids) for i in mine)
    back = decode_share(payload, table, mine)
    assert list(back) == mine
    for i in mine:
        s, b = flat[i], back[i]
        assert (b.prompt_ids, b.response_ids, b.reward, b.advantage, b.group) == \
            (s.prompt_ids, s.response_ids, s.reward, s.advantage, s.group)
        n = len(s.response_ids)
        # float32 bits, exactly what the padded micro-batch would hold
        want = torch.tensor(s.rollout_logprobs[:n] + [0.0] * (n - len(s.rollout_logprobs)), dtype=torch.float32)
        assert torch.equal(torch.tensor(b.rollout_logprobs, dtype=torch.float32), want)


def test_packed_rope_positions_restart_per_sequence():
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    from erc_megatron.patches.megatron_cpu import apply_cpu_patches
    from erc_megatron.patches.megatron_packed_rope import install_packed_rope, packed_positions

    apply_cpu_patches()

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.rotary_pos_emb = RotaryEmbedding(kv_channels=8, rotary_percent=1.0, use_cpu_initialization=True)

    model = Holder()
    whole = model.rotary_pos_emb(10)
    assert install_packed_rope(model)
    positions = packed_position_ids([4, 3], 10)
    with packed_positions(model, positions):
        emb = model.rotary_pos_emb(10)
    assert emb.shape == whole.shape
    assert torch.equal(emb[:4], whole[:4]) and torch.equal(emb[4:7], whole[:3]) and torch.equal(emb[7:], whole[:3])
    assert torch.equal(model.rotary_pos_emb(10), whole)  # outside the context: upstream behaviour
