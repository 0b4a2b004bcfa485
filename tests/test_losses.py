"""Each preference loss against its formula written out by hand (values and gradients)."""
import math

import pytest
import torch

from tasks.train.losses import LOSSES, PairLogps, bradley_terry_loss, preference_loss

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


def test_bradley_terry_with_margin():
    chosen, rejected = torch.tensor([1.0, 3.0]), torch.tensor([0.0, 0.0])
    margin = torch.tensor([1.0, 0.5])
    expected = [-math.log(sigmoid(1.0 - 0.0 - 1.0)), -math.log(sigmoid(3.0 - 0.0 - 0.5))]
    assert bradley_terry_loss(chosen, rejected, margin).tolist() == pytest.approx(expected, rel=1e-6)
    # a scalar margin too
    assert bradley_terry_loss(chosen, rejected, 1.0).tolist()[0] == pytest.approx(math.log(2))
