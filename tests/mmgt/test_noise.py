"""Stage II DDIM math: equal to the release's diffusers DDIMScheduler, step by step."""
import pytest
import torch

from mmgt.config import MMGT, TINY, SamplerConfig
from mmgt.noise import (DDIMSchedule, cfg_combine, cfg_split_combine, ddim_update, make_timesteps,
                        rescale_zero_terminal_snr, sample_noise)


def release_scheduler(beta_schedule="linear", spacing="trailing"):
    """The scheduler of MMGT's configs/prompts/animation.yaml (noise_scheduler_kwargs)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule=beta_schedule,
                         prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing=spacing,
                         steps_offset=1, clip_sample=False)


def test_sampler_defaults_are_the_release_settings():
    cfg = MMGT.sampler
    assert (cfg.train_timesteps, cfg.beta_start, cfg.beta_end) == (1000, 0.00085, 0.012)
    assert cfg.prediction_type == "v_prediction" and cfg.rescale_zero_terminal_snr
    assert cfg.timestep_spacing == "trailing" and cfg.steps_offset == 1 and cfg.eta == 0.0


def test_timesteps_4_steps_literal_and_equal_to_diffusers():
    s = DDIMSchedule(SamplerConfig(), 4)
    # trailing: round(arange(1000, 0, -250)) - 1 = [1000, 750, 500, 250] - 1
    assert s.timesteps.tolist() == [999, 749, 499, 249]
    assert s.timesteps.dtype == torch.int64
    # each step lands 1000 // 4 = 250 lower; the last one on "alpha = 1"
    assert s.prev_timesteps.tolist() == [749, 499, 249, -1]
    assert s.alpha_prev[-1].item() == 1.0
    d = release_scheduler()
    d.set_timesteps(4)
    assert torch.equal(s.timesteps, d.timesteps)


def test_timesteps_30_steps_equal_to_diffusers_with_its_prev_rule():
    s = DDIMSchedule(SamplerConfig(), 30)
    d = release_scheduler()
    d.set_timesteps(30)
    assert torch.equal(s.timesteps, d.timesteps)
    assert s.timesteps[:6].tolist() == [999, 966, 932, 899, 866, 832]
    assert s.timesteps[-1].item() == 32 and len(s) == 30
    # diffusers' step goes to t - 1000 // 30 = t - 33: from 966 to 933, not to the next listed 932
    assert s.prev_timesteps[:3].tolist() == [966, 933, 899]


def test_zero_terminal_snr_schedule():
    s = DDIMSchedule(SamplerConfig(), 4)
    d = release_scheduler()
    assert torch.equal(s.alphas_cumprod, d.alphas_cumprod)
    assert s.alphas_cumprod[-1].item() == pytest.approx(0.0, abs=1e-12)  # SNR(T) = 0: pure noise at t = 999
    assert s.betas[-1].item() == pytest.approx(1.0)
    # the first value is kept by the rescale: alpha_bar_0 = 1 - beta_start
    assert s.alphas_cumprod[0].item() == pytest.approx(1 - 0.00085, abs=1e-7)
    assert torch.equal(rescale_zero_terminal_snr(torch.linspace(0.00085, 0.012, 1000)), d.betas)


@pytest.mark.parametrize("steps", [4, 30])
def test_full_step_sequence_matches_diffusers(steps):
    s = DDIMSchedule(SamplerConfig(), steps)
    d = release_scheduler()
    d.set_timesteps(steps)
    g = torch.Generator().manual_seed(0)
    x_ref = torch.randn(2, 4, 3, 8, 8, generator=g)  # (B, C, F, h, w) video latents
    x = x_ref.clone()
    for i, t in enumerate(d.timesteps):
        v = torch.randn(x.shape, generator=g)  # stands in for the UNet's v-prediction
        x_ref = d.step(v, t, x_ref).prev_sample
        x = s.step(v, i, x)
        assert torch.allclose(x, x_ref, atol=1e-6, rtol=0), f"step {i} (t={int(t)})"


def test_eta_with_generator_matches_diffusers():
    s = DDIMSchedule(SamplerConfig(), 4, eta=0.7)
    d = release_scheduler()
    d.set_timesteps(4)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    x_ref = x.clone()
    g_ours, g_ref = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for i, t in enumerate(d.timesteps):
        v = torch.randn(x.shape, generator=torch.Generator().manual_seed(100 + i))
        x_ref = d.step(v, t, x_ref, eta=0.7, generator=g_ref).prev_sample
        x = s.step(v, i, x, generator=g_ours)
        assert torch.allclose(x, x_ref, atol=1e-6, rtol=0), f"step {i}"
    # the noise really is used: eta 0 gives a different path
    assert s.std_dev[1] > 0 and DDIMSchedule(SamplerConfig(), 4).std_dev.abs().max() == 0


def test_add_noise_velocity_and_pred_x0():
    s = DDIMSchedule(SamplerConfig(), 4)
    d = release_scheduler()
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(3, 4, 2, 8, 8, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    t = torch.tensor([999, 500, 10])
    xt = s.add_noise(x0, noise, t)
    assert torch.allclose(xt, d.add_noise(x0, noise, t), atol=1e-6)
    assert torch.allclose(xt[0], noise[0], atol=1e-6)  # zero SNR: t = 999 is pure noise
    v = s.velocity(x0, noise, t)
    assert torch.allclose(v, d.get_velocity(x0, noise, t), atol=1e-6)
    # with the exact v, the x0 estimate is x0 (v-prediction identity), at every noise level
    assert torch.allclose(s.pred_x0(v, t, xt), x0, atol=1e-5)
    assert torch.allclose(s.pred_x0(v[1:2], 500, xt[1:2]), x0[1:2], atol=1e-5)


def test_exact_v_lands_on_x0_after_the_last_step():
    # DDIM with the true v at every step reproduces x0 exactly (deterministic, eta 0)
    s = DDIMSchedule(SamplerConfig(), 4)
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(1, 4, 8, 8, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    x = s.add_noise(x0, noise, int(s.timesteps[0]))
    for i, t in enumerate(s.timesteps.tolist()):
        # recover the noise consistent with x at t (x = sqrt(a) x0 + sqrt(1-a) eps), then its v
        a = s.alphas_cumprod[t]
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        x = s.step(s.velocity(x0, eps, t), i, x)
    assert torch.allclose(x, x0, atol=1e-5)


def test_other_spacings_and_beta_schedules_match_diffusers():
    for schedule, spacing in (("scaled_linear", "trailing"), ("linear", "leading"), ("linear", "linspace")):
        cfg = SamplerConfig(timestep_spacing=spacing)
        s = DDIMSchedule(cfg, 10, beta_schedule=schedule)
        d = release_scheduler(schedule, spacing)
        d.set_timesteps(10)
        assert torch.equal(s.timesteps, d.timesteps), (schedule, spacing)
        x = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(4))
        v = torch.randn(x.shape, generator=torch.Generator().manual_seed(6))
        assert torch.allclose(s.step(v, 3, x), d.step(v, d.timesteps[3], x).prev_sample, atol=1e-6)
    assert make_timesteps(1000, 10, "leading", 1).tolist() == [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]


def test_cfg_combine_right_answers():
    uncond = torch.tensor([1.0, 2.0])
    cond = torch.tensor([3.0, 1.0])
    assert torch.equal(cfg_combine(uncond, cond, 1.0), cond)
    assert torch.equal(cfg_combine(uncond, cond, 0.0), uncond)
    assert torch.allclose(cfg_combine(uncond, cond, 3.5), torch.tensor([8.0, -1.5]))  # 1 + 3.5*2, 2 - 3.5
    batched = torch.stack([uncond, cond])  # reference layout: cat([uncond, cond])
    assert torch.allclose(cfg_split_combine(batched, 3.5), torch.tensor([[8.0, -1.5]]))
    with pytest.raises(ValueError, match="even"):
        cfg_split_combine(torch.zeros(3, 2), 2.0)


def test_coefficient_table_drives_the_pure_update():
    s = DDIMSchedule(TINY.sampler)  # tiny preset: 2 steps
    assert s.timesteps.tolist() == [999, 499]
    table = s.coefficients()  # (S, 3): alpha_t, alpha_prev, std
    assert table.shape == (2, 3)
    x = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(7))
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(8))
    a_t, a_prev, std = table[1]
    assert torch.equal(ddim_update(v, x, a_t, a_prev, std), s.step(v, 1, x))
    # the last step returns the predicted x0 (alpha_prev = 1)
    assert torch.allclose(s.step(v, 1, x), s.pred_x0(v, 499, x), atol=1e-6)


def test_sample_noise_reproducible_and_errors():
    a = sample_noise((1, 4, 2, 8, 8), torch.Generator().manual_seed(9))
    b = torch.randn((1, 4, 2, 8, 8), generator=torch.Generator().manual_seed(9))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="steps"):
        DDIMSchedule(SamplerConfig(), 0)
    with pytest.raises(ValueError, match="beta_schedule"):
        DDIMSchedule(SamplerConfig(), 4, beta_schedule="cosine")
    with pytest.raises(IndexError):
        DDIMSchedule(SamplerConfig(), 4).step(torch.zeros(1), 4, torch.zeros(1))
