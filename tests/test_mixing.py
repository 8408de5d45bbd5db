"""CutMix and MixUp in the step (fasttin/mixing.py): exact pixels and loss weights, off is today's
step, and a resumed run draws the same mixing."""
import numpy as np
import pytest
import torch

from fasttin import mixing
from fasttin.loop import make_step
from fasttin.model import build_model
from fasttin.recipes import resolve, settings


def batch(n=6, res=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, res, res, generator=g), torch.randint(0, 5, (n,), generator=g)


def test_mixup_and_cutmix_pixels_and_loss_weights_follow_lambda():
    x, y = batch()
    seen = {"mixup": 0, "cutmix": 0}
    m = mixing.Mixing(mixup=0.4, cutmix=1.0, seed=3)
    for step in range(40):
        mix = m.draw(step, 16, 16)
        seen[mix.kind] += 1
        out = mixing.apply(x, mix)
        if mix.kind == "mixup":
            assert torch.allclose(out, mix.lam * x + (1 - mix.lam) * x.flip(0))
        else:
            y0, y1, x0, x1 = mix.box
            inside = torch.zeros(16, 16, dtype=torch.bool)
            inside[y0:y1, x0:x1] = True
            assert torch.equal(out[:, :, inside], x.flip(0)[:, :, inside])
            assert torch.equal(out[:, :, ~inside], x[:, :, ~inside])
            assert mix.lam == pytest.approx(1 - inside.float().mean().item())  # the own pixels' share
        logits = torch.randn(6, 5)
        soft = mix.lam * torch.nn.functional.one_hot(y, 5) + (1 - mix.lam) * torch.nn.functional.one_hot(y.flip(0), 5)
        want = torch.nn.functional.cross_entropy(logits, soft.float())
        assert mixing.loss(torch.nn.CrossEntropyLoss(), logits, y, mix) == pytest.approx(want.item(), rel=1e-5)
        assert torch.equal(mixing.counted_labels(y, mix), y if mix.lam >= 0.5 else y.flip(0))
    assert min(seen.values()) > 5  # both methods drawn, at about even odds
    assert torch.equal(x, batch()[0])  # the loader's batch untouched


def test_the_share_and_off_leave_batches_as_they_are():
    assert all(mixing.Mixing().draw(s, 8, 8) is None for s in range(50))
    half = [mixing.Mixing(mixup=1.0, share=0.5, seed=1).draw(s, 8, 8) for s in range(400)]
    assert 150 < sum(m is not None for m in half) < 250
    assert all(mixing.Mixing(cutmix=1.0, share=0.0).draw(s, 8, 8) is None for s in range(50))


def steps(cfg, n, state=None):
    torch.manual_seed(0)
    step = make_step(build_model(5, "imagenet"), cfg, device="cpu", steps_per_epoch=100)
    if state is not None:
        step.load_state_dict(state)
    for _ in range(n):
        step(*batch(seed=step.steps))
    return step


@pytest.mark.parametrize("over", [{}, {"mixup": 0.5, "cutmix": 1.0}])
def test_a_resumed_step_mixes_as_an_uninterrupted_one(over):
    """The mixing is drawn from (seed, step): two steps, a state dict, two more steps equal four in a
    row; with mixing off the step is the plain one (no mixing drawn)."""
    cfg = resolve("seed-64-scratch", res=16, batch_size=6, amp="off", channels_last=True, **over)
    straight = steps(cfg, 4)
    resumed = steps(cfg, 2, state=steps(cfg, 2).state_dict())
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert straight.mixing.on is bool(over)
    if over:
        plain = steps({**cfg, "mixup": 0.0, "cutmix": 0.0}, 4).model.state_dict()
        assert not all(torch.equal(a[k], plain[k]) for k in a)  # the mixing did change the training


def test_mixing_settings_refuse_what_is_out_of_range(capsys):
    from fasttin.recipes import train_parser
    for flags in (["--mixup", "-1"], ["--cutmix", "nan"], ["--mix-share", "1.5"], ["--mix-share", "x"]):
        with pytest.raises(SystemExit):
            train_parser().parse_args(["--data", "d", *flags])
        assert flags[0] in capsys.readouterr().err.splitlines()[-1]
    assert settings(train_parser().parse_args(["--data", "d", "--mix-share", "0.25"]))["mix_share"] == 0.25
    assert np.isclose(resolve("fast")["mix_share"], 1.0) and resolve("fast")["mixup"] == 0.0
