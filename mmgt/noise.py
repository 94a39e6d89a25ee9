"""Stage II DDIM as explicit tensor math (MMGT_SPEC.md section 5), equal to the release's diffusers DDIMScheduler.

The release samples with ``diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="linear",
clip_sample=False, steps_offset=1, prediction_type="v_prediction", rescale_betas_zero_snr=True,
timestep_spacing="trailing")`` (MMGT ``configs/prompts/animation.yaml``) and eta 0. This module recomputes that
schedule with the same float32 operations, so timesteps are identical and every step agrees with diffusers to
rounding, but holds no scheduler object: the per-step coefficients are plain tensors, which makes the update easy to
export, capture in a CUDA graph, or run per chunk.

Two reference behaviours kept on purpose:

* the previous timestep of a step is ``t - train_timesteps // steps`` (diffusers' rule), not the next entry of the
  trailing timestep list. For 4 steps both agree; for 30 steps the list is 999, 966, 932, ... while the step from 966
  lands on 933. Matching diffusers matters more here than tidiness: the release's frames came from that rule.
* the last step goes to "alpha_cumprod = 1" (``set_alpha_to_one``), i.e. the final sample is the predicted x0.
"""
from __future__ import annotations

import logging
from typing import Optional, Sequence, Union

import numpy as np
import torch

from mmgt.config import SamplerConfig

log = logging.getLogger(__name__)

BETA_SCHEDULES = ("linear", "scaled_linear")  # "linear" is the release's (and the spec's)
TIMESTEP_SPACINGS = ("trailing", "leading", "linspace")
PREDICTION_TYPES = ("v_prediction", "epsilon", "sample")

TimestepLike = Union[int, torch.Tensor]


# ----------------------------------------------------------------------------------------------------------------
# Schedule construction (pure functions, float32 like diffusers)
# ----------------------------------------------------------------------------------------------------------------
def make_betas(train_timesteps: int, beta_start: float, beta_end: float, schedule: str = "linear") -> torch.Tensor:
    """Training betas (T,) float32: "linear" = linspace(start, end); "scaled_linear" = linspace of sqrt, squared."""
    if schedule == "linear":
        return torch.linspace(beta_start, beta_end, train_timesteps, dtype=torch.float32)
    if schedule == "scaled_linear":
        return torch.linspace(beta_start ** 0.5, beta_end ** 0.5, train_timesteps, dtype=torch.float32) ** 2
    raise ValueError(f"noise schedule: unknown beta_schedule {schedule!r}; known: {', '.join(BETA_SCHEDULES)}")


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Rescale betas so that the last timestep has SNR 0 (Lin et al. 2023, Algorithm 1), as diffusers does.

    sqrt(alpha_bar) is shifted so its last value is 0 and scaled so its first value is unchanged.
    """
    alphas_bar_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()  # (T,)
    first = alphas_bar_sqrt[0].clone()
    last = alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt -= last  # last timestep: pure noise
    alphas_bar_sqrt *= first / (first - last)  # first timestep: as before
    alphas_bar = alphas_bar_sqrt ** 2  # (T,)
    alphas = torch.cat([alphas_bar[0:1], alphas_bar[1:] / alphas_bar[:-1]])  # undo the cumulative product
    return 1 - alphas


def make_timesteps(train_timesteps: int, steps: int, spacing: str = "trailing",
                   steps_offset: int = 1) -> torch.Tensor:
    """Inference timesteps, descending, int64 (diffusers' DDIMScheduler.set_timesteps).

    trailing: round(arange(T, 0, -T/steps)) - 1, e.g. 4 of 1000 -> [999, 749, 499, 249] (steps_offset unused).
    leading: arange(steps) * (T // steps) reversed, + steps_offset.
    linspace: round(linspace(0, T - 1, steps)) reversed.
    """
    if not 1 <= steps <= train_timesteps:
        raise ValueError(f"noise schedule: steps must be in [1, {train_timesteps}], got {steps}")
    if spacing == "trailing":
        ratio = train_timesteps / steps
        ts = np.round(np.arange(train_timesteps, 0, -ratio)).astype(np.int64) - 1
    elif spacing == "leading":
        ratio = train_timesteps // steps
        ts = (np.arange(0, steps) * ratio).round()[::-1].copy().astype(np.int64) + steps_offset
    elif spacing == "linspace":
        ts = np.linspace(0, train_timesteps - 1, steps).round()[::-1].copy().astype(np.int64)
    else:
        raise ValueError(f"noise schedule: unknown timestep_spacing {spacing!r}; "
                         f"known: {', '.join(TIMESTEP_SPACINGS)}")
    return torch.from_numpy(ts)


# ----------------------------------------------------------------------------------------------------------------
# The update itself (pure tensor math, export-friendly)
# ----------------------------------------------------------------------------------------------------------------
def predict_x0_eps(model_output: torch.Tensor, sample: torch.Tensor, alpha_prod_t: torch.Tensor,
                   prediction_type: str = "v_prediction"):
    """(x0, eps) from the network output at a timestep with cumulative alpha ``alpha_prod_t`` (broadcastable)."""
    beta_prod_t = 1 - alpha_prod_t
    if prediction_type == "v_prediction":
        x0 = alpha_prod_t ** 0.5 * sample - beta_prod_t ** 0.5 * model_output
        eps = alpha_prod_t ** 0.5 * model_output + beta_prod_t ** 0.5 * sample
    elif prediction_type == "epsilon":
        x0 = (sample - beta_prod_t ** 0.5 * model_output) / alpha_prod_t ** 0.5
        eps = model_output
    elif prediction_type == "sample":
        x0 = model_output
        eps = (sample - alpha_prod_t ** 0.5 * x0) / beta_prod_t ** 0.5
    else:
        raise ValueError(f"noise schedule: unknown prediction_type {prediction_type!r}; known: {PREDICTION_TYPES}")
    return x0, eps


def ddim_update(model_output: torch.Tensor, sample: torch.Tensor, alpha_prod_t: torch.Tensor,
                alpha_prod_prev: torch.Tensor, std_dev: Optional[torch.Tensor] = None,
                noise: Optional[torch.Tensor] = None, prediction_type: str = "v_prediction") -> torch.Tensor:
    """One DDIM update x_t -> x_prev (DDIM paper eq. 12), the operations in diffusers' order.

    ``std_dev`` is eta * sigma_t (None or 0: deterministic); ``noise`` the standard-normal variance noise (only
    added when given). Coefficients may be 0-dim tensors or tensors broadcastable to the sample.
    """
    x0, eps = predict_x0_eps(model_output, sample, alpha_prod_t, prediction_type)
    std_sq = 0.0 if std_dev is None else std_dev ** 2
    direction = (1 - alpha_prod_prev - std_sq) ** 0.5 * eps  # "direction pointing to x_t"
    prev = alpha_prod_prev ** 0.5 * x0 + direction
    if noise is not None and std_dev is not None:
        prev = prev + std_dev * noise
    return prev


def cfg_combine(uncond: torch.Tensor, cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: uncond + scale * (cond - uncond) (the reference's formula)."""
    return uncond + scale * (cond - uncond)


def cfg_split_combine(model_output: torch.Tensor, scale: float) -> torch.Tensor:
    """CFG on a doubled batch laid out as the reference does: cat([uncond, cond]) along dim 0."""
    if model_output.shape[0] % 2:
        raise ValueError(f"CFG output: batch must be [uncond, cond] (even), got shape {tuple(model_output.shape)}")
    uncond, cond = model_output.chunk(2)
    return cfg_combine(uncond, cond, scale)


def sample_noise(shape: Sequence[int], generator: Optional[torch.Generator] = None,
                 device: Optional[Union[str, torch.device]] = None,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal noise as diffusers' randn_tensor draws it: on the generator's device, then moved.

    So the same seed gives the same initial latents as the reference on any target device.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    rand_device = generator.device if generator is not None else device
    return torch.randn(tuple(shape), generator=generator, device=rand_device, dtype=dtype).to(device)


# ----------------------------------------------------------------------------------------------------------------
# The schedule object
# ----------------------------------------------------------------------------------------------------------------
class DDIMSchedule:
    """The release's DDIM for a fixed number of steps, as tensors.

    Attributes (all CPU unless moved with :meth:`to`):
        timesteps        (S,) int64, descending: the t fed to the UNet at step index i
        prev_timesteps   (S,) int64: where step i lands (diffusers' t - T // S; -1 = final, alpha 1)
        alphas_cumprod   (T,) float32 training cumulative alphas (after the zero-SNR rescale)
        alpha_t          (S,) float32 alphas_cumprod[timesteps]
        alpha_prev       (S,) float32 alphas_cumprod[prev_timesteps] (1.0 where prev < 0)
        std_dev          (S,) float32 eta * sigma_t (zeros at eta 0)
    """

    def __init__(self, cfg: SamplerConfig = SamplerConfig(), steps: Optional[int] = None, *,
                 beta_schedule: Optional[str] = None, eta: Optional[float] = None, set_alpha_to_one: bool = True):
        beta_schedule = cfg.beta_schedule if beta_schedule is None else beta_schedule
        if cfg.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"SamplerConfig.prediction_type {cfg.prediction_type!r} unknown; "
                             f"known: {PREDICTION_TYPES}")
        self.cfg = cfg
        self.steps = int(cfg.steps if steps is None else steps)
        self.eta = float(cfg.eta if eta is None else eta)
        if self.eta < 0:
            raise ValueError(f"noise schedule: eta must be >= 0, got {self.eta}")
        self.prediction_type = cfg.prediction_type
        self.beta_schedule = beta_schedule
        T = cfg.train_timesteps

        # 1. training schedule (float32, same ops as diffusers so the values are bit-identical)
        betas = make_betas(T, cfg.beta_start, cfg.beta_end, beta_schedule)  # (T,)
        if cfg.rescale_zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        self.betas = betas
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)  # (T,)
        self.final_alpha_cumprod = torch.tensor(1.0) if set_alpha_to_one else self.alphas_cumprod[0].clone()

        # 2. inference timesteps and where each step lands
        self.timesteps = make_timesteps(T, self.steps, cfg.timestep_spacing, cfg.steps_offset)  # (S,)
        self.prev_timesteps = self.timesteps - T // self.steps  # (S,)

        # 3. per-step coefficients
        self.alpha_t = self.alphas_cumprod[self.timesteps]  # (S,)
        prev_idx = self.prev_timesteps.clamp(min=0)
        self.alpha_prev = torch.where(self.prev_timesteps >= 0, self.alphas_cumprod[prev_idx],
                                      self.final_alpha_cumprod)  # (S,)
        beta_t = 1 - self.alpha_t
        beta_prev = 1 - self.alpha_prev
        variance = (beta_prev / beta_t) * (1 - self.alpha_t / self.alpha_prev)  # (S,) sigma_t^2 at eta 1
        self.std_dev = self.eta * variance ** 0.5  # (S,)
        log.debug("DDIM %d steps (%s, %s, eta %.3g): timesteps %s", self.steps, beta_schedule,
                  cfg.timestep_spacing, self.eta, self.timesteps.tolist())

    def __len__(self) -> int:
        return self.steps

    @property
    def init_noise_sigma(self) -> float:  # DDIM starts from unit-variance noise
        return 1.0

    def to(self, device: Union[str, torch.device]) -> "DDIMSchedule":
        """Move every coefficient tensor to ``device`` (in place; returns self)."""
        for name in ("betas", "alphas_cumprod", "final_alpha_cumprod", "timesteps", "prev_timesteps", "alpha_t",
                     "alpha_prev", "std_dev"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    def coefficients(self) -> torch.Tensor:
        """(S, 3) float32 table [alpha_t, alpha_prev, std_dev] per step, for graphs that take them as inputs."""
        return torch.stack([self.alpha_t, self.alpha_prev, self.std_dev], dim=1)

    # -- per-step math -------------------------------------------------------------------------------------------
    def step(self, model_output: torch.Tensor, i: int, sample: torch.Tensor, *,
             generator: Optional[torch.Generator] = None, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x at step index i (timestep ``timesteps[i]``) -> x at the next, lower noise level.

        With eta > 0 the variance noise is ``noise`` if given, else drawn from ``generator`` as diffusers does.
        """
        if not 0 <= i < self.steps:
            raise IndexError(f"DDIM step index {i} out of range for {self.steps} steps")
        if model_output.shape != sample.shape:
            raise ValueError(f"DDIM step: model_output {tuple(model_output.shape)} != sample {tuple(sample.shape)}")
        std = self.std_dev[i]
        if self.eta > 0:
            if noise is not None and generator is not None:
                raise ValueError("DDIM step: pass either noise or generator, not both")
            if noise is None:
                noise = sample_noise(model_output.shape, generator, model_output.device, model_output.dtype)
        else:
            noise = None
        return ddim_update(model_output, sample, self.alpha_t[i], self.alpha_prev[i], std, noise,
                           self.prediction_type)

    def _alpha_at(self, t: TimestepLike, like: torch.Tensor) -> torch.Tensor:
        """alphas_cumprod at timestep(s) t, shaped to broadcast over ``like`` (one value per batch item)."""
        ac = self.alphas_cumprod.to(device=like.device, dtype=like.dtype)
        if isinstance(t, torch.Tensor):
            a = ac[t.to(device=like.device, dtype=torch.long)].flatten()  # (B,) or (1,)
        else:
            a = ac[int(t)].reshape(1)  # (1,)
        return a.reshape(-1, *([1] * (like.dim() - 1)))

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: TimestepLike) -> torch.Tensor:
        """Forward diffusion q(x_t | x0) = sqrt(a_t) x0 + sqrt(1 - a_t) noise (t: int or (B,) timesteps)."""
        a = self._alpha_at(t, x0)
        return a ** 0.5 * x0 + (1 - a) ** 0.5 * noise

    def pred_x0(self, model_output: torch.Tensor, t: TimestepLike, sample: torch.Tensor) -> torch.Tensor:
        """The network's x0 estimate at timestep t (int or (B,) timesteps)."""
        x0, _ = predict_x0_eps(model_output, sample, self._alpha_at(t, sample), self.prediction_type)
        return x0

    def velocity(self, x0: torch.Tensor, noise: torch.Tensor, t: TimestepLike) -> torch.Tensor:
        """The v-prediction target sqrt(a_t) noise - sqrt(1 - a_t) x0 (for checks and re-noising)."""
        a = self._alpha_at(t, x0)
        return a ** 0.5 * noise - (1 - a) ** 0.5 * x0


__all__ = [
    "BETA_SCHEDULES", "TIMESTEP_SPACINGS", "PREDICTION_TYPES", "make_betas", "rescale_zero_terminal_snr",
    "make_timesteps", "predict_x0_eps", "ddim_update", "cfg_combine", "cfg_split_combine", "sample_noise",
    "DDIMSchedule",
]
