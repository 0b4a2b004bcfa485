"""Each loss against an independent reference, values and gradients.

- trl 1.16 where trl has the loss: its own loss code (DPOTrainer._compute_loss, RewardTrainer.compute_loss)
  called with a minimal stand-in trainer and a stand-in model that returns given log-probs / scores.
- The paper's formula written out by hand (plain Python loops) for the rest: slic, rrhf, rrhf_listwise,
  sft_weight.
"""
import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from tasks.train.losses import LOSSES, PairLogps, bradley_terry_loss, preference_loss, rrhf_listwise

TOL = dict(rel=1e-5, abs=1e-7)

# Two pairs, hand-picked so every loss is on its non-flat side for one pair and flat for the other.
PC, PR, RC, RR = [-4.0, -9.0], [-6.0, -5.0], [-5.0, -7.0], [-5.5, -6.0]
CT, RT = [2.0, 3.0], [4.0, 1.0]


def make_logps(with_ref=True):
    policy_chosen = torch.tensor(PC, requires_grad=True)
    policy_rejected = torch.tensor(PR, requires_grad=True)
    return PairLogps(
        policy_chosen=policy_chosen,
        policy_rejected=policy_rejected,
        ref_chosen=torch.tensor(RC) if with_ref else None,
        ref_rejected=torch.tensor(RR) if with_ref else None,
        chosen_tokens=torch.tensor(CT),
        rejected_tokens=torch.tensor(RT),
    )


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def margin(i):
    return (PC[i] - PR[i]) - (RC[i] - RR[i])


def check(name, params, expected_values, expected_grads_chosen, expected_grads_rejected, with_ref=True):
    logps = make_logps(with_ref)
    loss = preference_loss(name, logps, **params)
    assert loss.shape == (2,)
    assert loss.tolist() == pytest.approx(expected_values, rel=1e-5)
    loss.sum().backward()
    assert logps.policy_chosen.grad.tolist() == pytest.approx(expected_grads_chosen, rel=1e-5, abs=1e-7)
    assert logps.policy_rejected.grad.tolist() == pytest.approx(expected_grads_rejected, rel=1e-5, abs=1e-7)


# --------------------------------------------------------------------------------------------------
# trl 1.16 as the oracle: DPO (sigmoid), cDPO, IPO, hinge; the reward trainer's Bradley-Terry loss.
# --------------------------------------------------------------------------------------------------

def _stand_in_trainer(**attrs):
    """The attributes trl's loss methods read from `self`, and nothing else."""
    identity = lambda x: x  # noqa: E731  (one process: gather is the identity)
    return SimpleNamespace(
        model=SimpleNamespace(training=True),
        accelerator=SimpleNamespace(device=torch.device("cpu"), gather=identity, gather_for_metrics=identity),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
        **attrs,
    )


def trl_dpo_loss(loss_type, beta, label_smoothing, token_logps, completion_mask, ref_chosen, ref_rejected):
    """trl's DPOTrainer._compute_loss (the batch mean) on given per-token policy log-probs.

    token_logps: (2B, L-1) per-token log-probs of the shifted labels, chosen rows then rejected rows;
    completion_mask: (2B, L). The stand-in model returns them as trl's fused-LM-head model would (zero
    where the label is masked); reference log-probs come in as precomputed columns.
    """
    from trl.trainer.dpo_trainer import DPOTrainer

    shift_mask = completion_mask[:, 1:]

    def model(**kwargs):
        assert kwargs["fused_lm_head"] and kwargs["labels"].shape == completion_mask.shape
        zeros = torch.zeros_like(token_logps)
        return SimpleNamespace(
            log_probs=token_logps * shift_mask, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool()
        )

    trainer = _stand_in_trainer(
        loss_types=[loss_type], loss_weights=[1.0], beta=beta, label_smoothing=label_smoothing,
        f_divergence_type="reverse_kl", ld_alpha=None, use_weighting=False, aux_loss_enabled=False,
        precompute_ref_logps=True, args=SimpleNamespace(gradient_checkpointing_kwargs=None),
    )
    inputs = {
        "input_ids": torch.zeros(completion_mask.shape, dtype=torch.long),
        "attention_mask": torch.ones(completion_mask.shape, dtype=torch.long),
        "completion_mask": completion_mask,
        "ref_chosen_logps": ref_chosen,
        "ref_rejected_logps": ref_rejected,
    }
    return DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)


def random_pairs(batch, length, seed, single_token=False):
    """Per-token log-probs (2B, L-1) with grad, ragged completion masks (2B, L), reference sums (B,) x 2."""
    g = torch.Generator().manual_seed(seed)
    rows = 2 * batch
    token_logps = (-3 * torch.rand(rows, length - 1, generator=g, dtype=torch.float64)).requires_grad_()
    completion_mask = torch.zeros(rows, length, dtype=torch.long)
    for row in range(rows):
        if single_token:  # one completion token: its log-prob is the summed log-prob
            completion_mask[row, -1] = 1
        else:  # a prompt of 1..3 tokens, then a completion of at least one token, then right padding
            start = int(torch.randint(1, 4, (1,), generator=g))
            end = int(torch.randint(start + 1, length + 1, (1,), generator=g))
            completion_mask[row, start:end] = 1
    sums = (token_logps.detach() * completion_mask[:, 1:]).sum(1)
    ref = sums + 2 * torch.randn(rows, generator=g, dtype=torch.float64)  # a reference near the policy
    return token_logps, completion_mask, ref[:batch], ref[batch:]


def ours(token_logps, completion_mask, ref_chosen, ref_rejected, per_token=False):
    """PairLogps from the same per-token log-probs (summed over the completion, or averaged)."""
    shift_mask = completion_mask[:, 1:]
    sums = (token_logps * shift_mask).sum(1)
    tokens = shift_mask.sum(1).to(sums.dtype)
    ref = torch.cat([ref_chosen, ref_rejected])
    if per_token:  # every log-prob divided by its response's token count
        sums, ref = sums / tokens, ref / tokens
    (pc, pr), (rc, rr), (ct, rt) = sums.chunk(2), ref.chunk(2), tokens.chunk(2)
    return PairLogps(pc, pr, rc, rr, ct, rt)


def compare_with_trl(name, params, trl_type, trl_beta, trl_ls, *, per_token=False, single_token=False, batch=6, seed=0):
    """Our per-pair losses against trl's, pair by pair (B = 1 calls) and as a batch; grads wrt token log-probs."""
    token_logps, mask, ref_c, ref_r = random_pairs(batch, 7, seed, single_token)
    # the whole batch: trl's mean loss and its gradient
    trl_mean = trl_dpo_loss(trl_type, trl_beta, trl_ls, token_logps, mask, ref_c, ref_r)
    (trl_grad,) = torch.autograd.grad(trl_mean, token_logps)
    our_losses = preference_loss(name, ours(token_logps, mask, ref_c, ref_r, per_token), **params)
    assert our_losses.shape == (batch,)
    (our_grad,) = torch.autograd.grad(our_losses.mean(), token_logps)
    assert our_losses.mean().item() == pytest.approx(trl_mean.item(), **TOL)
    assert torch.allclose(our_grad, trl_grad, rtol=1e-5, atol=1e-9)
    assert our_grad.abs().max() > 1e-3  # the comparison is not between two zeros
    # pair by pair: trl on a batch of one (for "aot", the only way its sort is the identity)
    for b in range(batch):
        rows = [b, batch + b]
        one = token_logps.detach()[rows].requires_grad_()
        trl_value = trl_dpo_loss(trl_type, trl_beta, trl_ls, one, mask[rows], ref_c[b : b + 1], ref_r[b : b + 1])
        assert our_losses[b].item() == pytest.approx(trl_value.item(), **TOL)
    return our_losses


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_matches_trl_sigmoid(beta):
    compare_with_trl("dpo", {"beta": beta}, "sigmoid", beta, 0.0)


@pytest.mark.parametrize("ls", [0.1, 0.3])
def test_cdpo_matches_trl(ls):
    # trl 1.16's "sigmoid" ignores label_smoothing; its "aot" loss is -(1-ls) log s(beta d) - ls log s(-beta d)
    # with d the sorted log-ratio differences, which on a batch of one is d = h: exactly cDPO.
    compare_with_trl("dpo", {"beta": 0.5, "label_smoothing": ls}, "aot", 0.5, ls, batch=1)
    for seed in range(1, 6):
        compare_with_trl("dpo", {"beta": 0.5, "label_smoothing": ls}, "aot", 0.5, ls, batch=1, seed=seed)


def test_hinge_matches_trl():
    losses = compare_with_trl("hinge", {"beta": 0.5}, "hinge", 0.5, 0.0, batch=12)
    assert (losses == 0).any() and (losses > 0).any()  # both sides of the hinge


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_ipo_matches_trl_on_summed_logps(beta):
    # one completion token per response: trl's per-token average is then our summed log-prob
    compare_with_trl("ipo", {"beta": beta}, "ipo", beta, 0.0, single_token=True)


def test_ipo_is_trl_ipo_on_mean_token_logps():
    # trl divides (policy - reference) by the token count before eq. 17; ours does not (the contract's
    # summed log-probs). Given log-probs already averaged per token, the two agree.
    compare_with_trl("ipo", {"beta": 0.5}, "ipo", 0.5, 0.0, per_token=True)


def trl_reward_loss(chosen, rejected, margin, center_rewards_coefficient):
    """trl's RewardTrainer.compute_loss (the batch mean) with a stand-in model that outputs the given scores."""
    from trl.trainer.reward_trainer import RewardTrainer

    def model(**kwargs):
        return SimpleNamespace(logits=torch.cat([chosen, rejected]).unsqueeze(-1))

    trainer = _stand_in_trainer(args=SimpleNamespace(center_rewards_coefficient=center_rewards_coefficient))
    inputs = {"input_ids": torch.zeros(2 * len(chosen), 3, dtype=torch.long)}
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    if margin is not None:
        inputs["margin"] = margin
    return RewardTrainer.compute_loss(trainer, model, inputs)


@pytest.mark.parametrize("with_margin", [False, True])
@pytest.mark.parametrize("center", [None, 0.01, 0.5])
def test_bradley_terry_matches_trl_reward_trainer(with_margin, center):
    g = torch.Generator().manual_seed(7)
    chosen = (2 * torch.randn(9, generator=g, dtype=torch.float64)).requires_grad_()
    rejected = (2 * torch.randn(9, generator=g, dtype=torch.float64) + 0.5).requires_grad_()
    margin = torch.rand(9, generator=g, dtype=torch.float64) if with_margin else None
    trl_mean = trl_reward_loss(chosen, rejected, margin, center)
    trl_grads = torch.autograd.grad(trl_mean, (chosen, rejected))
    losses = bradley_terry_loss(chosen, rejected, margin, center_coefficient=center or 0.0)
    assert losses.shape == (9,)
    our_grads = torch.autograd.grad(losses.mean(), (chosen, rejected))
    assert losses.mean().item() == pytest.approx(trl_mean.item(), **TOL)
    for ours_, trl_ in zip(our_grads, trl_grads):
        assert torch.allclose(ours_, trl_, rtol=1e-5, atol=1e-9)
    for b in range(9):  # per pair: trl on a batch of one
        one = trl_reward_loss(chosen[b : b + 1], rejected[b : b + 1], None if margin is None else margin[b : b + 1], center)
        assert losses[b].item() == pytest.approx(one.item(), **TOL)


# --------------------------------------------------------------------------------------------------
# Hand-written formulas (plain Python).
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ls", [0.0, 0.2])
def test_dpo_and_cdpo(ls):
    beta = 0.5
    values, grads = [], []
    for i in range(2):
        h = margin(i)
        values.append(-(1 - ls) * math.log(sigmoid(beta * h)) - ls * math.log(sigmoid(-beta * h)))
        # d/dh [-(1-ls) log s(bh) - ls log s(-bh)] = -(1-ls) b s(-bh) + ls b s(bh); dh/dpc = 1, dh/dpr = -1
        grads.append(-(1 - ls) * beta * sigmoid(-beta * h) + ls * beta * sigmoid(beta * h))
    check("dpo", {"beta": beta, "label_smoothing": ls}, values, grads, [-g for g in grads])


def test_cdpo_at_zero_smoothing_is_dpo():
    a = preference_loss("dpo", make_logps(), beta=0.3, label_smoothing=0.0)
    b = preference_loss("dpo", make_logps(), beta=0.3)
    h = torch.tensor([margin(0), margin(1)])
    assert torch.allclose(a, b)
    assert torch.allclose(a, -torch.nn.functional.logsigmoid(0.3 * h))


def test_ipo():
    beta = 0.25
    values = [(margin(i) - 1 / (2 * beta)) ** 2 for i in range(2)]
    grads = [2 * (margin(i) - 1 / (2 * beta)) for i in range(2)]
    check("ipo", {"beta": beta}, values, grads, [-g for g in grads])


def test_hinge():
    beta = 1.0  # margins are 1.5 and -3: pair 0 is past the hinge (zero loss and gradient)
    values = [max(0.0, 1 - beta * margin(i)) for i in range(2)]
    grads = [-beta if 1 - beta * margin(i) > 0 else 0.0 for i in range(2)]
    assert values[0] == 0 and values[1] > 0
    check("hinge", {"beta": beta}, values, grads, [-g for g in grads])


def test_slic_needs_no_reference():
    delta = 1.0  # pc - pr = 2 and -4: pair 0 is satisfied
    values = [max(0.0, delta - PC[i] + PR[i]) for i in range(2)]
    grads = [-1.0 if delta - PC[i] + PR[i] > 0 else 0.0 for i in range(2)]
    check("slic", {"delta": delta}, values, grads, [-g for g in grads], with_ref=False)


def random_pair_logps(batch, seed, with_ref=False):
    g = torch.Generator().manual_seed(seed)
    def logp():
        return (-30 * torch.rand(batch, generator=g, dtype=torch.float64)).requires_grad_()
    def count():
        return torch.randint(1, 20, (batch,), generator=g).double()
    pc, pr, ct, rt = logp(), logp(), count(), count()
    ref = (logp().detach(), logp().detach()) if with_ref else (None, None)
    return PairLogps(pc, pr, ref[0], ref[1], ct, rt)


@pytest.mark.parametrize("delta", [0.5, 5.0])
def test_slic_random(delta):
    # SLiC-HF L_cal = max(0, delta - log P(y+|x) + log P(y-|x)), with an SFT regulariser of weight 0.3
    logps = random_pair_logps(16, seed=3)
    losses = preference_loss("slic", logps, delta=delta, sft_weight=0.3)
    losses.sum().backward()
    pc, pr, ct = logps.policy_chosen.tolist(), logps.policy_rejected.tolist(), logps.chosen_tokens.tolist()
    for i in range(16):
        hinge_active = delta - pc[i] + pr[i] > 0
        assert losses[i].item() == pytest.approx(max(0.0, delta - pc[i] + pr[i]) + 0.3 * (-pc[i] / ct[i]), **TOL)
        assert logps.policy_chosen.grad[i].item() == pytest.approx(-float(hinge_active) - 0.3 / ct[i], **TOL)
        assert logps.policy_rejected.grad[i].item() == pytest.approx(float(hinge_active), **TOL)


def test_rrhf_uses_length_normalised_logps():
    values = [max(0.0, PR[i] / RT[i] - PC[i] / CT[i]) for i in range(2)]  # -1.5 vs -2; -5 vs -3
    active = [PR[i] / RT[i] - PC[i] / CT[i] > 0 for i in range(2)]
    assert active == [True, False]
    check(
        "rrhf", {}, values,
        [-1 / CT[i] if active[i] else 0.0 for i in range(2)],
        [1 / RT[i] if active[i] else 0.0 for i in range(2)],
        with_ref=False,
    )


def rrhf_by_hand(logps, tokens, rewards, valid, sft_weight):
    """RRHF (Yuan et al. 2023) for one prompt, from the paper: value and d loss / d logp_i, in loops."""
    K = len(logps)
    p = [logps[i] / tokens[i] if valid[i] else None for i in range(K)]
    value, grad = 0.0, [0.0] * K
    for i in range(K):
        for k in range(K):
            if valid[i] and valid[k] and rewards[i] < rewards[k] and p[i] - p[k] > 0:
                value += p[i] - p[k]
                grad[i] += 1 / tokens[i]
                grad[k] -= 1 / tokens[k]
    real = [i for i in range(K) if valid[i]]
    if real:
        best = real[0]
        for i in real:  # the first highest-reward candidate
            if rewards[i] > rewards[best]:
                best = i
        value += sft_weight * (-logps[best] / tokens[best])
        grad[best] += sft_weight * (-1 / tokens[best])
    return value, grad


def check_listwise(logps, tokens, rewards, mask, sft_weight):
    leaf = logps.clone().requires_grad_()
    losses = rrhf_listwise(leaf, tokens, rewards, mask, sft_weight=sft_weight)
    assert losses.shape == (logps.shape[0],)
    losses.sum().backward()
    assert torch.isfinite(leaf.grad).all()
    valid = torch.ones_like(logps, dtype=torch.bool) if mask is None else mask
    for b in range(logps.shape[0]):
        value, grad = rrhf_by_hand(logps[b].tolist(), tokens[b].tolist(), rewards[b].tolist(), valid[b].tolist(), sft_weight)
        assert losses[b].item() == pytest.approx(value, **TOL)
        assert leaf.grad[b].tolist() == pytest.approx(grad, **TOL)
    return losses


@pytest.mark.parametrize("sft_weight", [0.0, 0.7])
def test_rrhf_listwise_with_ties_and_ragged_groups(sft_weight):
    g = torch.Generator().manual_seed(11)
    B, K = 8, 5
    # some above zero: the loss is defined on any reals, and a padded candidate must not rank even then
    logps = 50 * torch.rand(B, K, generator=g, dtype=torch.float64) - 40
    tokens = torch.randint(1, 30, (B, K), generator=g).double()
    rewards = torch.randint(0, 3, (B, K), generator=g).double()  # three reward levels: many ties
    sizes = [5, 4, 3, 2, 1, 5, 2, 3]
    mask = torch.tensor([[k < n for k in range(K)] for n in sizes])
    logps[~mask] = float("nan")  # padding must not leak into values or gradients
    rewards[~mask] = torch.tensor([100.0, -100.0], dtype=torch.float64).repeat(8)[: int((~mask).sum())]  # nor into ranks or the best
    losses = check_listwise(logps, tokens, rewards, mask, sft_weight)
    assert torch.isfinite(losses).all()
    assert (losses[[i for i, n in enumerate(sizes) if n > 1]] > 0).any()


def test_rrhf_listwise_all_real_and_no_mask():
    g = torch.Generator().manual_seed(12)
    logps = -20 * torch.rand(3, 6, generator=g, dtype=torch.float64)
    tokens = torch.randint(1, 10, (3, 6), generator=g).double()
    rewards = torch.randn(3, 6, generator=g, dtype=torch.float64)
    check_listwise(logps, tokens, rewards, None, 0.25)
    check_listwise(logps, tokens, rewards, torch.ones(3, 6, dtype=torch.bool), 0.25)


def test_rrhf_listwise_ties_rank_nothing():
    logps = torch.tensor([[-10.0, -1.0, -5.0]], dtype=torch.float64, requires_grad=True)
    tokens = torch.ones(1, 3, dtype=torch.float64)
    # all tied: no ranking loss at all; the SFT term takes the first candidate
    loss = rrhf_listwise(logps, tokens, torch.zeros(1, 3, dtype=torch.float64), sft_weight=1.0)
    assert loss.tolist() == [10.0]
    # the best reward is ranked against the others, tied ones are not ranked among themselves
    loss = rrhf_listwise(logps, tokens, torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64))
    assert loss.tolist() == [(-1.0 + 10.0) + (-5.0 + 10.0)]


def test_rrhf_listwise_empty_group_is_zero():
    logps = torch.tensor([[-3.0, -4.0], [-1.0, -2.0]], requires_grad=True)
    mask = torch.tensor([[True, True], [False, False]])
    loss = rrhf_listwise(logps, torch.ones(2, 2), torch.tensor([[0.0, 1.0], [0.0, 1.0]]), mask, sft_weight=1.0)
    assert loss.tolist() == [1.0 + 4.0, 0.0]


@pytest.mark.parametrize("sft_weight", [0.0, 0.4])
def test_pairwise_rrhf_is_listwise_with_two(sft_weight):
    logps = random_pair_logps(32, seed=5)
    pairwise = preference_loss("rrhf", logps, sft_weight=sft_weight)
    (grad_pairwise,) = torch.autograd.grad(pairwise.sum(), logps.policy_chosen)
    stacked = torch.stack([logps.policy_chosen, logps.policy_rejected], 1)
    tokens = torch.stack([logps.chosen_tokens, logps.rejected_tokens], 1)
    rewards = torch.tensor([1.0, 0.0], dtype=torch.float64).expand(32, 2)
    listwise = rrhf_listwise(stacked, tokens, rewards, sft_weight=sft_weight)
    (grad_listwise,) = torch.autograd.grad(listwise.sum(), logps.policy_chosen)
    assert torch.allclose(pairwise, listwise, rtol=1e-12, atol=0)
    assert torch.allclose(grad_pairwise, grad_listwise, rtol=1e-12, atol=0)
    assert (pairwise > sft_weight * (-logps.policy_chosen / logps.chosen_tokens)).any()  # some ranking loss


@pytest.mark.parametrize("name", list(LOSSES))
def test_sft_weight_adds_chosen_mean_nll(name):
    params = {"beta": 0.5} if name in ("dpo", "ipo", "hinge") else {}
    with_ref = name in ("dpo", "ipo", "hinge")
    plain = preference_loss(name, make_logps(with_ref), **params)
    logps = make_logps(with_ref)
    mixed = preference_loss(name, logps, sft_weight=0.7, **params)
    expected_nll = torch.tensor([-PC[i] / CT[i] for i in range(2)])
    assert torch.allclose(mixed - plain, 0.7 * expected_nll)
    # and its gradient on policy_chosen: the loss's own plus -0.7 / chosen_tokens
    plain_logps = make_logps(with_ref)
    preference_loss(name, plain_logps, **params).sum().backward()
    mixed.sum().backward()
    extra = logps.policy_chosen.grad - plain_logps.policy_chosen.grad
    assert torch.allclose(extra, torch.tensor([-0.7 / CT[i] for i in range(2)]))
    assert torch.allclose(logps.policy_rejected.grad, plain_logps.policy_rejected.grad)


def test_unknown_loss_lists_the_known_ones():
    with pytest.raises(ValueError, match="dpo, ipo, hinge, slic, rrhf"):
        preference_loss("ppo", make_logps())


def test_unknown_param_is_an_error():
    with pytest.raises(ValueError, match="label_smoothing"):
        preference_loss("ipo", make_logps(), beta=0.1, label_smoothing=0.1)


def test_reference_losses_need_reference():
    with pytest.raises(ValueError, match="reference"):
        preference_loss("dpo", make_logps(with_ref=False), beta=0.1)


def test_bradley_terry():
    chosen = torch.tensor([1.0, -0.5, 2.0], requires_grad=True)
    rejected = torch.tensor([0.0, 0.5, 2.0], requires_grad=True)
    loss = bradley_terry_loss(chosen, rejected)
    expected = [-math.log(sigmoid(c - r)) for c, r in [(1.0, 0.0), (-0.5, 0.5), (2.0, 2.0)]]
    assert loss.shape == (3,)
    assert loss.tolist() == pytest.approx(expected, rel=1e-6)
    assert loss.tolist()[2] == pytest.approx(math.log(2))
    loss.sum().backward()
    # d/dc -log s(c - r) = -s(r - c)
    assert chosen.grad.tolist() == pytest.approx([-sigmoid(r - c) for c, r in [(1.0, 0.0), (-0.5, 0.5), (2.0, 2.0)]], rel=1e-6)
    assert torch.allclose(rejected.grad, -chosen.grad)


def test_bradley_terry_with_margin_and_centering():
    chosen, rejected = torch.tensor([1.0, 3.0]), torch.tensor([0.0, -1.0])
    margin = torch.tensor([1.0, 0.5])
    expected = [-math.log(sigmoid(1.0 - 0.0 - 1.0)), -math.log(sigmoid(3.0 + 1.0 - 0.5))]
    assert bradley_terry_loss(chosen, rejected, margin).tolist() == pytest.approx(expected, rel=1e-6)
    # a scalar margin too
    assert bradley_terry_loss(chosen, rejected, 1.0).tolist()[0] == pytest.approx(math.log(2))
    # centering: + c * (chosen + rejected)^2 per pair
    centered = bradley_terry_loss(chosen, rejected, margin, center_coefficient=0.1)
    assert centered.tolist() == pytest.approx([expected[0] + 0.1 * 1.0**2, expected[1] + 0.1 * 2.0**2], rel=1e-6)
