"""The optimiser factory: AdamW or Lookahead(RAdam), and the one-cycle schedule."""

import io
import itertools

import pytest
import torch

from lib.errors import UserError
from optim import build_optimizer, build_scheduler, current_lr, param_groups


def tiny_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 1))


def train(net, opt, sched=None, steps=5):
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        loss = net(torch.randn(8, 3, generator=g)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
    return loss.item()


def test_weight_decay_skips_biases_and_norm_parameters():
    net = tiny_net()
    decay, no_decay = param_groups(net, 0.01)
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert {p.ndim for p in decay["params"]} == {2} and {p.ndim for p in no_decay["params"]} == {1}
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(net.parameters()))


def test_default_optimizer_is_adamw():
    opt = build_optimizer(tiny_net(), lr=1e-3, weight_decay=1e-4)
    assert type(opt) is torch.optim.AdamW


def test_over9000_is_lookahead_over_radam_and_differs_from_plain_radam():
    from pytorch_optimizer import Lookahead

    net_a, net_b = tiny_net(), tiny_net()
    opt = build_optimizer(net_a, lr=1e-2, weight_decay=0.0, over9000=True)
    assert isinstance(opt, Lookahead) and type(opt.optimizer) is torch.optim.RAdam
    plain = torch.optim.RAdam(net_b.parameters(), lr=1e-2)
    train(net_a, opt, steps=5)  # k = 5: the slow weights pull the fast ones back after the 5th step
    train(net_b, plain, steps=5)
    assert not torch.allclose(net_a[0].weight, net_b[0].weight)


def test_one_cycle_warms_up_to_max_lr_then_anneals():
    net = tiny_net()
    opt = build_optimizer(net, lr=1e-3, weight_decay=0.0)
    sched = build_scheduler(opt, max_lr=1e-3, total_steps=100, pct_start=0.2, div_factor=25, final_div_factor=1e4)
    lrs = [current_lr(opt)]
    for _ in range(99):
        opt.step()
        sched.step()
        lrs.append(current_lr(opt))
    assert lrs[0] == pytest.approx(1e-3 / 25)
    assert max(lrs) == pytest.approx(1e-3) and lrs.index(max(lrs)) in (19, 20)
    assert lrs[-1] == pytest.approx(1e-3 / 25 / 1e4)
    assert all(a <= b for a, b in itertools.pairwise(lrs[:20]))  # warm-up is monotonic


@pytest.mark.parametrize("over9000", [False, True])
def test_optimizer_and_schedule_state_round_trip_through_weights_only_files(over9000):
    net = tiny_net()
    opt = build_optimizer(net, lr=1e-2, weight_decay=1e-4, over9000=over9000)
    sched = build_scheduler(opt, 1e-2, 20)
    train(net, opt, sched, steps=3)
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "sched": sched.state_dict(), "net": net.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    net2 = tiny_net()
    net2.load_state_dict(saved["net"])
    opt2 = build_optimizer(net2, lr=1e-2, weight_decay=1e-4, over9000=over9000)
    sched2 = build_scheduler(opt2, 1e-2, 20)
    opt2.load_state_dict(saved["opt"])
    sched2.load_state_dict(saved["sched"])
    assert train(net, opt, sched, steps=4) == train(net2, opt2, sched2, steps=4)  # identical continuation


def test_bad_settings_are_user_errors():
    with pytest.raises(UserError, match="max_lr"):
        build_optimizer(tiny_net(), lr=0.0, weight_decay=0.0)
    with pytest.raises(UserError, match="weight_decay"):
        build_optimizer(tiny_net(), lr=1e-3, weight_decay=-1.0)
    with pytest.raises(UserError, match="steps"):
        build_scheduler(build_optimizer(tiny_net(), 1e-3, 0.0), 1e-3, 0)
