import pytest
import torch

from semroute.flow import RectifiedFlow


def test_loss_is_zero_for_the_exact_velocity():
    flow = RectifiedFlow()
    x0 = torch.randn(8, 3, 4, 4)
    # On the straight path x_t = (1 - t) x0 + t noise, the velocity is (x_t - x0) / t.
    loss = flow.loss(lambda x, t: (x - x0) / t.view(-1, 1, 1, 1), x0, torch.Generator().manual_seed(0))
    assert loss.item() < 1e-8


def test_loss_is_positive_for_a_wrong_velocity():
    flow = RectifiedFlow()
    x0 = torch.randn(8, 3, 4, 4)
    assert flow.loss(lambda x, t: torch.zeros_like(x), x0).item() > 0.5


def test_sampler_integrates_straight_paths_exactly():
    target = torch.randn(1, 3, 4, 4)
    noise = torch.randn(5, 3, 4, 4)
    flow = RectifiedFlow()
    for shift in (1.0, 3.0):
        out = flow.sample(lambda x, t: (x - target) / t.view(-1, 1, 1, 1), noise, num_steps=7, shift=shift)
        torch.testing.assert_close(out, target.expand_as(out), atol=1e-5, rtol=0)


def test_guidance_extrapolates_from_unconditional_to_conditional():
    cond, uncond = torch.full((1, 1, 2, 2), 1.0), torch.full((1, 1, 2, 2), -1.0)
    w = 3.0

    def velocity(x, t):
        x_c, x_u = x.chunk(2)
        tt = t[: len(x_c)].view(-1, 1, 1, 1)
        return torch.cat([(x_c - cond) / tt, (x_u - uncond) / tt])

    out = RectifiedFlow().sample(velocity, torch.randn(4, 1, 2, 2), num_steps=10, guidance_scale=w)
    torch.testing.assert_close(out, (uncond + w * (cond - uncond)).expand_as(out), atol=1e-4, rtol=0)


def test_time_sampling_is_logit_normal():
    t = RectifiedFlow().sample_t(20000, generator=torch.Generator().manual_seed(0))
    assert 0 < t.min() and t.max() < 1
    assert t.median().item() == pytest.approx(0.5, abs=0.02)
    assert torch.logit(t).std().item() == pytest.approx(1.0, abs=0.03)


def test_caption_dropout_rate_and_target():
    flow = RectifiedFlow(caption_dropout=0.1)
    ids = torch.zeros(20000, dtype=torch.long)
    dropped = flow.drop_captions(ids, null_id=7, generator=torch.Generator().manual_seed(0))
    assert set(dropped.unique().tolist()) == {0, 7}
    assert (dropped == 7).float().mean().item() == pytest.approx(0.1, abs=0.01)


def test_bad_arguments():
    with pytest.raises(ValueError, match="caption_dropout"):
        RectifiedFlow(caption_dropout=1.5)
    with pytest.raises(ValueError, match="num_steps"):
        RectifiedFlow().sample(lambda x, t: x, torch.zeros(1, 1, 2, 2), num_steps=0)
