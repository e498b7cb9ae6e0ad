import pytest
import torch

from semroute.flow import RectifiedFlow, SampleConfig, flow_schedulers


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
        scheduler = SampleConfig(shift=shift).make_scheduler()
        out = flow.sample(
            lambda x, t: (x - target) / t.view(-1, 1, 1, 1), noise, scheduler, steps=7, guidance_scale=1.0
        )
        torch.testing.assert_close(out, target.expand_as(out), atol=1e-5, rtol=0)


def test_guidance_extrapolates_from_unconditional_to_conditional():
    cond, uncond = torch.full((1, 1, 2, 2), 1.0), torch.full((1, 1, 2, 2), -1.0)
    w = 3.0

    def velocity(x, t):
        x_c, x_u = x.chunk(2)
        tt = t[: len(x_c)].view(-1, 1, 1, 1)
        return torch.cat([(x_c - cond) / tt, (x_u - uncond) / tt])

    out = RectifiedFlow().sample(
        velocity, torch.randn(4, 1, 2, 2), SampleConfig().make_scheduler(), steps=10, guidance_scale=w
    )
    torch.testing.assert_close(out, (uncond + w * (cond - uncond)).expand_as(out), atol=1e-4, rtol=0)


def test_time_sampling_is_logit_normal():
    t = RectifiedFlow().sample_t(20000, generator=torch.Generator().manual_seed(0))
    assert t.min() > 0 and t.max() < 1
    assert t.median().item() == pytest.approx(0.5, abs=0.02)
    assert torch.logit(t).std().item() == pytest.approx(1.0, abs=0.03)


def test_caption_dropout_rate_and_target():
    from semroute.features import drop_captions

    flow = RectifiedFlow(caption_dropout=0.1)
    drop = flow.drop_mask(20000, generator=torch.Generator().manual_seed(0))
    assert drop.float().mean().item() == pytest.approx(0.1, abs=0.01)
    # Dropped captions take the null prompt's features, padded to the batch's length; the others are
    # untouched.
    text, mask = torch.randn(3, 4, 5, 2), torch.ones(4, 5, dtype=torch.bool)
    null_text, null_mask = torch.randn(3, 2, 2), torch.tensor([True, False])
    which = torch.tensor([False, True, False, True])
    out, out_mask = drop_captions(text, mask, null_text, null_mask, which)
    assert torch.equal(out[:, 0], text[:, 0]) and torch.equal(out_mask[2], mask[2])
    assert torch.equal(out[:, 1, :2], null_text) and not out[:, 1, 2:].any()
    assert out_mask[3].tolist() == [True, False, False, False, False]


def test_every_flow_matching_scheduler_integrates_straight_paths():
    """The sampler uses the scheduler it is given (Heun visits timesteps twice), never a rebuilt Euler."""
    import diffusers

    target, noise = torch.randn(1, 3, 4, 4), torch.randn(2, 3, 4, 4)
    calls = {}
    for name in ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler"):
        seen = []

        def velocity(x, t, seen=seen):
            seen.append(t[0].item())
            return (x - target) / t.view(-1, 1, 1, 1)

        scheduler = SampleConfig(scheduler=name).make_scheduler()
        assert type(scheduler) is getattr(diffusers, name)
        out = RectifiedFlow.sample(velocity, noise, scheduler, steps=6, guidance_scale=1.0)
        torch.testing.assert_close(out, target.expand_as(out), atol=1e-4, rtol=0)
        calls[name] = len(seen)
    assert calls == {"FlowMatchEulerDiscreteScheduler": 6, "FlowMatchHeunDiscreteScheduler": 11}
    assert "FlowMatchHeunDiscreteScheduler" in flow_schedulers()
    with pytest.raises(ValueError, match="not a diffusers flow-matching scheduler; valid: FlowMatch"):
        SampleConfig(scheduler="DDIMScheduler")


def test_bad_arguments():
    with pytest.raises(ValueError, match="caption_dropout"):
        RectifiedFlow(caption_dropout=1.5)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        RectifiedFlow().sample(
            lambda x, t: x,
            torch.zeros(1, 1, 2, 2),
            SampleConfig().make_scheduler(),
            steps=0,
            guidance_scale=1.0,
        )
