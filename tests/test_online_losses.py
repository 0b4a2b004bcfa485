"""The online-RL helpers at the end of tasks/train/losses.py, each against an independent reference:

- plain Python loops (statistics.mean / stdev / pstdev, math.exp) over the same numbers;
- hand-worked examples, with the arithmetic written out in the comments;
- properties that hold by the maths (RLOO advantages sum to 0; k1 and k3 are unbiased for KL,
  checked by Monte Carlo against the exact KL of two categoricals; reward-to-go at gamma=lam=1).

trl 1.16 has no standalone group-advantage function (GRPOTrainer computes it inline in
_generate_and_score_completions), so there is no trl comparison here.
"""
import math
import statistics

import pytest
import torch

from tasks.train.losses import (
    clipped_policy_loss,
    clipped_value_loss,
    gae,
    group_advantages,
    kl_estimate,
    masked_mean,
    masked_whiten,
    rloo_advantages,
)

F64 = torch.float64


def rand(*shape, seed=0, dtype=F64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def prefix_mask(lengths, T):
    """(N, T) bool mask, row i true on its first lengths[i] tokens."""
    return torch.tensor([[t < n for t in range(T)] for n in lengths])


# ---- masked_mean / masked_whiten ----------------------------------------------------------------


def test_masked_mean_all_matches_mean_of_selected_elements():
    x = rand(4, 7, seed=1)
    mask = prefix_mask([7, 3, 1, 5], 7)
    expected = statistics.mean(x[mask].tolist())
    assert masked_mean(x, mask).item() == pytest.approx(expected, rel=1e-12)
    # a float mask gives the same
    assert masked_mean(x, mask.to(F64)).item() == pytest.approx(expected, rel=1e-12)


def test_masked_mean_per_row_and_per_column():
    x = rand(4, 7, seed=2)
    lengths = [7, 3, 0, 5]
    mask = prefix_mask(lengths, 7)
    rows = masked_mean(x, mask, dim=1)
    for i, n in enumerate(lengths):
        expected = statistics.mean(x[i, :n].tolist()) if n else 0.0  # an empty row gives 0
        assert rows[i].item() == pytest.approx(expected, rel=1e-12, abs=1e-15)
    cols = masked_mean(x, mask, dim=0)
    for t in range(7):
        selected = [x[i, t].item() for i in range(4) if mask[i, t]]
        assert cols[t].item() == pytest.approx(statistics.mean(selected), rel=1e-12)


def test_masked_mean_ignores_masked_out_values():
    x = rand(3, 5, seed=3)
    mask = prefix_mask([2, 5, 4], 5)
    junk = torch.where(mask, x, torch.full_like(x, 1e6))
    assert masked_mean(junk, mask).item() == pytest.approx(masked_mean(x, mask).item(), rel=1e-12)
    assert torch.allclose(masked_mean(junk, mask, dim=1), masked_mean(x, mask, dim=1), rtol=1e-12)


def test_masked_mean_nothing_masked_in_is_zero():
    x = rand(2, 3, seed=4)
    mask = torch.zeros(2, 3, dtype=torch.bool)
    assert masked_mean(x, mask).item() == 0.0
    assert masked_mean(x, mask, dim=1).tolist() == [0.0, 0.0]


def test_masked_whiten_matches_whitening_of_selected_elements():
    x = 3.0 + 2.5 * rand(5, 6, seed=5)
    mask = prefix_mask([6, 2, 4, 1, 5], 6)
    out = masked_whiten(x, mask, eps=0.0)
    selected = x[mask].tolist()
    m, s = statistics.mean(selected), statistics.pstdev(selected)  # population std (PPO's)
    for i in range(5):
        for t in range(6):
            expected = (x[i, t].item() - m) / s if mask[i, t] else 0.0
            assert out[i, t].item() == pytest.approx(expected, rel=1e-10, abs=1e-12)
    whitened = out[mask].tolist()
    assert statistics.mean(whitened) == pytest.approx(0.0, abs=1e-12)
    assert statistics.pstdev(whitened) == pytest.approx(1.0, rel=1e-10)
    assert (out[~mask] == 0).all()


def test_masked_whiten_default_eps_and_junk_outside_mask():
    x = rand(3, 4, seed=6)
    mask = prefix_mask([4, 1, 3], 4)
    junk = torch.where(mask, x, torch.full_like(x, -1e5))
    out = masked_whiten(junk, mask)  # eps 1e-8: negligible against a variance of order 1
    selected = x[mask].tolist()
    m, s = statistics.mean(selected), statistics.pstdev(selected)
    expected = torch.where(mask, (x - m) / s, torch.zeros_like(x))
    assert torch.allclose(out, expected, rtol=1e-7, atol=1e-9)


# ---- rloo_advantages ------------------------------------------------------------------------------


@pytest.mark.parametrize("K", [2, 3, 4, 8])
def test_rloo_matches_leave_one_out_loop(K):
    r = rand(5, K, seed=10 + K)
    out = rloo_advantages(r)
    assert out.shape == r.shape
    for b in range(5):
        row = r[b].tolist()
        for i in range(K):
            baseline = statistics.mean(row[:i] + row[i + 1 :])  # mean of the others
            assert out[b, i].item() == pytest.approx(row[i] - baseline, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("K", [2, 3, 5])
def test_rloo_properties(K):
    r = rand(6, K, seed=20 + K)
    out = rloo_advantages(r)
    # advantages within a group sum to zero
    assert torch.allclose(out.sum(-1), torch.zeros(6, dtype=F64), atol=1e-12)
    # and are the centred rewards scaled by K / (K - 1)
    assert torch.allclose(out, K / (K - 1) * (r - r.mean(-1, keepdim=True)), rtol=1e-12, atol=1e-12)


def test_rloo_k2_hand_values():
    # K = 2: each baseline is the other reward, so A = (r1 - r2, r2 - r1)
    out = rloo_advantages(torch.tensor([[1.0, 4.0], [-2.0, -2.0]], dtype=F64))
    assert out.tolist() == [[-3.0, 3.0], [0.0, 0.0]]


def test_rloo_needs_two_samples():
    with pytest.raises(ValueError):
        rloo_advantages(torch.zeros(3, 1))


# ---- group_advantages (GRPO) ----------------------------------------------------------------------


@pytest.mark.parametrize("G", [2, 3, 8])
def test_group_advantages_matches_statistics_loop(G):
    r = rand(4, G, seed=30 + G)
    out = group_advantages(r)
    centred = group_advantages(r, scale=False)
    for b in range(4):
        row = r[b].tolist()
        m, s = statistics.mean(row), statistics.stdev(row)  # sample (n - 1) std
        for i in range(G):
            assert out[b, i].item() == pytest.approx((row[i] - m) / (s + 1e-4), rel=1e-12)
            assert centred[b, i].item() == pytest.approx(row[i] - m, rel=1e-12, abs=1e-12)


def test_group_advantages_hand_values_and_eps():
    # rewards (0, 1, 2): mean 1, sample std 1 -> (-1, 0, 1) / (1 + eps)
    r = torch.tensor([[0.0, 1.0, 2.0]], dtype=F64)
    assert group_advantages(r, eps=0.0).tolist() == [[-1.0, 0.0, 1.0]]
    assert group_advantages(r, eps=1.0).tolist() == [[-0.5, 0.0, 0.5]]
    assert group_advantages(r)[0].tolist() == pytest.approx([-1 / 1.0001, 0.0, 1 / 1.0001], rel=1e-12)


def test_group_advantages_equal_rewards_give_zero():
    r = torch.tensor([[0.7, 0.7, 0.7, 0.7], [0.0, 0.0, 0.0, 0.0], [1.0, 2.0, 1.0, 2.0]], dtype=F64)
    out = group_advantages(r)
    assert out[:2].tolist() == [[0.0] * 4] * 2
    assert out[2].abs().min().item() > 0.5  # the non-degenerate group is not zeroed
    assert group_advantages(r, scale=False)[:2].tolist() == [[0.0] * 4] * 2


def test_group_advantages_unscaled_is_only_centred():
    r = 10.0 * rand(3, 5, seed=40)
    out = group_advantages(r, scale=False)
    assert torch.allclose(out, r - r.mean(-1, keepdim=True), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(out, group_advantages(r))  # scaling does something here


# ---- kl_estimate ----------------------------------------------------------------------------------


def test_kl_estimate_matches_hand_formulas():
    logps = rand(3, 5, seed=50) - 2.0
    ref = rand(3, 5, seed=51) - 2.0
    k1 = kl_estimate(logps, ref, "k1")
    k3 = kl_estimate(logps, ref, "k3")
    default = kl_estimate(logps, ref)
    for i in range(3):
        for t in range(5):
            p, q = logps[i, t].item(), ref[i, t].item()
            assert k1[i, t].item() == pytest.approx(p - q, rel=1e-12, abs=1e-15)
            # k3 = ratio - log ratio - 1, ratio = pi_ref / pi
            assert k3[i, t].item() == pytest.approx(math.exp(q - p) - (q - p) - 1, rel=1e-10, abs=1e-15)
    assert torch.equal(default, k3)


def test_kl_estimate_hand_value():
    # pi = 0.5, pi_ref = 0.25: k1 = log 2; k3 = 0.5 - log 0.5 - 1 = log 2 - 0.5
    p, q = torch.tensor([math.log(0.5)], dtype=F64), torch.tensor([math.log(0.25)], dtype=F64)
    assert kl_estimate(p, q, "k1").item() == pytest.approx(math.log(2), rel=1e-12)
    assert kl_estimate(p, q, "k3").item() == pytest.approx(math.log(2) - 0.5, rel=1e-12)


def test_k3_is_never_negative_and_zero_at_equality():
    logps = 5.0 * rand(2000, seed=52)
    ref = 5.0 * rand(2000, seed=53)
    assert (kl_estimate(logps, ref, "k3") >= 0).all()
    assert (kl_estimate(logps, ref, "k1") < 0).any()  # k1 is not
    assert (kl_estimate(logps.float(), ref.float(), "k3") >= 0).all()
    assert kl_estimate(logps, logps, "k3").abs().max().item() == 0.0


def test_kl_estimators_are_unbiased_monte_carlo():
    pi = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05], dtype=F64)
    pi_ref = torch.full((5,), 0.2, dtype=F64)
    exact = sum(a * math.log(a / b) for a, b in zip(pi.tolist(), pi_ref.tolist()))  # ~0.2171
    reverse = sum(b * math.log(b / a) for a, b in zip(pi.tolist(), pi_ref.tolist()))  # ~0.2537
    assert abs(exact - reverse) > 0.03  # so the tolerance below tells the two directions apart

    g = torch.Generator().manual_seed(0)
    tokens = torch.multinomial(pi, 200_000, replacement=True, generator=g)  # samples from pi
    logps, ref = pi.log()[tokens], pi_ref.log()[tokens]
    for estimator in ("k1", "k3"):
        mc = kl_estimate(logps, ref, estimator).mean().item()
        assert mc == pytest.approx(exact, abs=4e-3), estimator


def test_kl_estimate_unknown_estimator_raises():
    with pytest.raises(ValueError):
        kl_estimate(torch.zeros(2), torch.zeros(2), "k2")


# ---- clipped_policy_loss --------------------------------------------------------------------------

# clip_eps = 0.2, so the range is [0.8, 1.2]. loss = max(-A rho, -A clip(rho)).
#   A    rho   -A rho   -A clip(rho)   loss   clipped taken
POLICY_CASES = [
    (2.0, 1.1, -2.2, -2.2, -2.2, False),  # inside the range: both terms equal
    (2.0, 1.5, -3.0, -2.4, -2.4, True),  # A > 0, rho above: gain capped at 1.2 A
    (2.0, 0.5, -1.0, -1.6, -1.0, False),  # A > 0, rho below: unclipped (pessimistic) term
    (-2.0, 1.1, 2.2, 2.2, 2.2, False),  # inside
    (-2.0, 1.5, 3.0, 2.4, 3.0, False),  # A < 0, rho above: unclipped (pessimistic) term
    (-2.0, 0.5, 1.0, 1.6, 1.6, True),  # A < 0, rho below: capped at 0.8 |A|
    (2.0, 1.0, -2.0, -2.0, -2.0, False),  # on-policy
    (0.0, 1.5, 0.0, 0.0, 0.0, False),  # zero advantage
]


def policy_inputs(old=-1.3):
    adv = torch.tensor([c[0] for c in POLICY_CASES], dtype=F64)
    ratio = torch.tensor([c[1] for c in POLICY_CASES], dtype=F64)
    old_logps = torch.full_like(ratio, old)
    logps = (old_logps + ratio.log()).requires_grad_(True)
    return logps, old_logps, adv, ratio


def test_clipped_policy_loss_hand_table():
    logps, old_logps, adv, _ = policy_inputs()
    loss, clipped = clipped_policy_loss(logps, old_logps, adv, clip_eps=0.2)
    for i, (_, _, _, _, expected, was_clipped) in enumerate(POLICY_CASES):
        assert loss[i].item() == pytest.approx(expected, rel=1e-12, abs=1e-12), POLICY_CASES[i]
        assert clipped[i].item() is was_clipped, POLICY_CASES[i]


def test_clipped_policy_loss_gradient_vanishes_where_clipped():
    # d/dlogp (-A rho) = -A rho where the unclipped term is taken; 0 where the clipped one is
    logps, old_logps, adv, ratio = policy_inputs()
    loss, clipped = clipped_policy_loss(logps, old_logps, adv, clip_eps=0.2)
    loss.sum().backward()
    for i, (a, rho, _, _, _, was_clipped) in enumerate(POLICY_CASES):
        expected = 0.0 if was_clipped else -a * rho
        assert logps.grad[i].item() == pytest.approx(expected, rel=1e-12, abs=1e-12), POLICY_CASES[i]


def test_clipped_policy_loss_on_policy_gradient_is_reinforce():
    old = rand(4, 6, seed=60) - 3.0
    adv = rand(4, 6, seed=61)
    logps = old.clone().requires_grad_(True)
    loss, clipped = clipped_policy_loss(logps, old, adv, clip_eps=0.2)
    assert torch.allclose(loss, -adv, rtol=1e-12, atol=1e-15)
    assert not clipped.any()
    loss.sum().backward()
    assert torch.allclose(logps.grad, -adv, rtol=1e-12, atol=1e-15)
    assert old.grad is None


def test_clipped_policy_loss_matches_elementwise_loop():
    old = rand(200, seed=62) - 2.0
    logps = old + 0.5 * rand(200, seed=63)
    adv = rand(200, seed=64)
    eps = 0.2
    loss, clipped = clipped_policy_loss(logps, old, adv, clip_eps=eps)
    for i in range(200):
        a, rho = adv[i].item(), math.exp(logps[i].item() - old[i].item())
        # the PPO objective min(rho A, clip(rho) A), negated
        objective = min(rho * a, min(max(rho, 1 - eps), 1 + eps) * a)
        assert loss[i].item() == pytest.approx(-objective, rel=1e-10, abs=1e-12)
        takes_clip = (a > 0 and rho > 1 + eps) or (a < 0 and rho < 1 - eps)
        assert clipped[i].item() is takes_clip


# ---- gae ------------------------------------------------------------------------------------------


def test_gae_hand_example():
    # T = 3, gamma = 0.9, lam = 0.8 (gamma lam = 0.72); r = (1, 0, 2), V = (0.5, 1.0, 1.5), V_3 = 0.
    #   delta_2 = 2 + 0.9 * 0   - 1.5 = 0.5
    #   delta_1 = 0 + 0.9 * 1.5 - 1.0 = 0.35
    #   delta_0 = 1 + 0.9 * 1.0 - 0.5 = 1.4
    #   A_2 = 0.5
    #   A_1 = 0.35 + 0.72 * 0.5  = 0.71
    #   A_0 = 1.4  + 0.72 * 0.71 = 1.9112
    #   returns = A + V = (2.4112, 1.71, 2.0)
    # Row 2 is the same response cut after 2 tokens (mask 1 1 0; junk reward/value at t = 2):
    #   delta_1 = 0 + 0.9 * 0 - 1.0 = -1.0      (the state after the last real token is terminal)
    #   delta_0 = 1.4 as before
    #   A_1 = -1.0;  A_0 = 1.4 + 0.72 * (-1.0) = 0.68;  A_2 = 0
    #   returns = (1.18, 0.0, 0.0)
    rewards = torch.tensor([[1.0, 0.0, 2.0], [1.0, 0.0, 7.0]], dtype=F64)
    values = torch.tensor([[0.5, 1.0, 1.5], [0.5, 1.0, 99.0]], dtype=F64)
    mask = prefix_mask([3, 2], 3)
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    assert adv.flatten().tolist() == pytest.approx([1.9112, 0.71, 0.5, 0.68, -1.0, 0.0], abs=1e-12)
    assert ret.flatten().tolist() == pytest.approx([2.4112, 1.71, 2.0, 1.18, 0.0, 0.0], abs=1e-12)


def naive_gae(rewards, values, lengths, gamma, lam):
    """A_t = sum_l (gamma lam)^l delta_{t+l} over the row's real tokens, V after the last = 0."""
    N, T = rewards.shape
    adv = [[0.0] * T for _ in range(N)]
    ret = [[0.0] * T for _ in range(N)]
    for i in range(N):
        n = lengths[i]
        r, v = rewards[i].tolist()[:n], values[i].tolist()[:n] + [0.0]
        delta = [r[t] + gamma * v[t + 1] - v[t] for t in range(n)]
        for t in range(n):
            adv[i][t] = sum((gamma * lam) ** l * delta[t + l] for l in range(n - t))
            ret[i][t] = adv[i][t] + v[t]
    return torch.tensor(adv, dtype=F64), torch.tensor(ret, dtype=F64)


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (0.99, 0.0), (0.7, 1.0)])
def test_gae_matches_naive_sum(gamma, lam):
    lengths = [8, 5, 1, 0, 7]
    rewards, values = rand(5, 8, seed=70), rand(5, 8, seed=71)
    mask = prefix_mask(lengths, 8)
    adv, ret = gae(rewards, values, mask, gamma=gamma, lam=lam)
    exp_adv, exp_ret = naive_gae(rewards, values, lengths, gamma, lam)
    assert torch.allclose(adv, exp_adv, rtol=1e-10, atol=1e-12)
    assert torch.allclose(ret, exp_ret, rtol=1e-10, atol=1e-12)
    assert (adv[~mask] == 0).all() and (ret[~mask] == 0).all()
    # a float mask gives the same
    adv_f, ret_f = gae(rewards, values, mask.to(F64), gamma=gamma, lam=lam)
    assert torch.equal(adv_f, adv) and torch.equal(ret_f, ret)


def test_gae_ragged_rows_ignore_padding_and_match_unpadded():
    # a row padded with junk gives the same as that row alone, cut to its real length
    lengths = [6, 3, 4]
    rewards, values = rand(3, 6, seed=72), rand(3, 6, seed=73)
    mask = prefix_mask(lengths, 6)
    junk_r = torch.where(mask, rewards, torch.full_like(rewards, 123.0))
    junk_v = torch.where(mask, values, torch.full_like(values, -456.0))
    adv, ret = gae(junk_r, junk_v, mask, gamma=0.95, lam=0.9)
    for i, n in enumerate(lengths):
        a, r = gae(rewards[i : i + 1, :n], values[i : i + 1, :n], torch.ones(1, n, dtype=torch.bool), 0.95, 0.9)
        assert torch.allclose(adv[i, :n], a[0], rtol=1e-12, atol=1e-12)
        assert torch.allclose(ret[i, :n], r[0], rtol=1e-12, atol=1e-12)
        assert (adv[i, n:] == 0).all() and (ret[i, n:] == 0).all()
        # the last real token: next value is 0, so A = r - V there
        last = n - 1
        assert adv[i, last].item() == pytest.approx(rewards[i, last].item() - values[i, last].item(), rel=1e-12)
        assert ret[i, last].item() == pytest.approx(rewards[i, last].item(), rel=1e-12)


def test_gae_gamma_lam_one_gives_reward_to_go():
    # with gamma = lam = 1 the values telescope away: returns_t = sum_{t' >= t} r_t' (real tokens)
    lengths = [7, 4, 1]
    rewards, values = rand(3, 7, seed=74), 10.0 * rand(3, 7, seed=75)
    mask = prefix_mask(lengths, 7)
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    for i, n in enumerate(lengths):
        row = rewards[i].tolist()
        for t in range(7):
            to_go = sum(row[t:n]) if t < n else 0.0
            assert ret[i, t].item() == pytest.approx(to_go, rel=1e-10, abs=1e-12)
            expected_adv = to_go - values[i, t].item() if t < n else 0.0
            assert adv[i, t].item() == pytest.approx(expected_adv, rel=1e-10, abs=1e-12)


def test_gae_lam_one_gives_discounted_monte_carlo_return():
    # lam = 1: returns_t = sum_l gamma^l r_{t+l}, whatever the values
    gamma, n = 0.8, 5
    rewards, values = rand(1, n, seed=76), rand(1, n, seed=77)
    _, ret = gae(rewards, values, torch.ones(1, n, dtype=torch.bool), gamma=gamma, lam=1.0)
    r = rewards[0].tolist()
    for t in range(n):
        assert ret[0, t].item() == pytest.approx(sum(gamma**l * r[t + l] for l in range(n - t)), rel=1e-10)


def test_gae_lam_zero_gives_one_step_td():
    # lam = 0: A_t = delta_t = r_t + gamma V_{t+1} - V_t
    gamma = 0.9
    r, v = [0.3, -1.0, 2.0, 0.5], [1.0, 0.2, -0.4, 0.8]
    adv, _ = gae(torch.tensor([r], dtype=F64), torch.tensor([v], dtype=F64), torch.ones(1, 4, dtype=torch.bool), gamma, 0.0)
    v_next = v[1:] + [0.0]
    assert adv[0].tolist() == pytest.approx([r[t] + gamma * v_next[t] - v[t] for t in range(4)], abs=1e-12)


# ---- clipped_value_loss ---------------------------------------------------------------------------

# clip_eps = 0.2. V_clip = V_old + clip(V - V_old, -0.2, 0.2); loss = 0.5 max((V - R)^2, (V_clip - R)^2)
#   V    V_old  R     V_clip  (V-R)^2  (V_clip-R)^2  loss
VALUE_CASES = [
    (0.6, 0.5, 1.0, 0.6, 0.16, 0.16, 0.08),  # inside the range: both terms equal
    (1.0, 0.5, 1.0, 0.7, 0.0, 0.09, 0.045),  # moved past the range onto R: clipped term is worse
    (0.0, 0.5, 1.0, 0.3, 1.0, 0.49, 0.5),  # moved away from R: plain term is worse
    (1.5, 0.5, 1.0, 0.7, 0.25, 0.09, 0.125),  # overshot R: plain term is worse
    (1.0, 2.0, 0.0, 1.8, 1.0, 3.24, 1.62),  # moved toward R past the range: clipped term is worse
]


def test_clipped_value_loss_hand_cases():
    V, V_old, R = (torch.tensor([c[j] for c in VALUE_CASES], dtype=F64) for j in range(3))
    V.requires_grad_(True)
    loss = clipped_value_loss(V, V_old, R, clip_eps=0.2)
    assert loss.tolist() == pytest.approx([c[6] for c in VALUE_CASES], abs=1e-12)
    loss.sum().backward()
    # gradient (V - R) where the plain term wins, 0 where the clipped (constant in V) term wins
    expected = [0.0 if c[5] > c[4] else c[0] - c[2] for c in VALUE_CASES]
    # case 0 is inside the range: both terms equal and both depend on V; torch.maximum splits the
    # gradient between them, which still sums to V - R
    assert V.grad.tolist() == pytest.approx(expected, abs=1e-12)


def test_clipped_value_loss_matches_elementwise_loop():
    V, V_old, R = rand(300, seed=80), rand(300, seed=81), rand(300, seed=82)
    eps = 0.3
    loss = clipped_value_loss(V, V_old, R, clip_eps=eps)
    for i in range(300):
        v, o, r = V[i].item(), V_old[i].item(), R[i].item()
        v_clip = o + min(max(v - o, -eps), eps)
        assert loss[i].item() == pytest.approx(0.5 * max((v - r) ** 2, (v_clip - r) ** 2), rel=1e-10, abs=1e-15)
