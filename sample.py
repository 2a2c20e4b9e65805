"""
Sampling for SD3.5-style rectified-flow models: the sigma schedule, three solvers, the
noise-aware condition schedule of E²PO (Eq. 13), group sampling (Eq. 8), and a CLI that writes images.

Conventions (SD3): x_σ = (1 − σ)·x0 + σ·ε, the model predicts v = ε − x0, so x0 = x_σ − σ·v.
σ runs 1 → 0 on `sigma_schedule`, which equals diffusers' FlowMatchEulerDiscreteScheduler(shift=3)
bit for bit. Every solver takes any callable `model(x, sigma, context, pooled) -> v` (x (B,16,h,w),
sigma (B,)), so the maths is testable with analytic flows; model.MMDiT is one such callable.

Solvers
- "euler": x ← x + (σ_next − σ)·v. The evaluation sampler (40 steps); equals diffusers'
  StableDiffusion3Pipeline at guidance 1.
- "dpm2m": deterministic DPM-Solver++(2M), data-prediction form, with α = 1 − σ, λ = log(α/σ):
  x_next = (σ_next/σ)·x − α_next·(e^(−h) − 1)·(D0 + D1/2), D0 = x0_i, D1 = (x0_i − x0_{i−1})·h/h_prev.
  First and last steps are first order (then the update is exactly Euler). DiffusionNFT's rollout
  solver (10 steps). As in DiffusionNFT, which runs it on the same σ grid starting at σ = 1, the
  step right after σ = 1 is first order as well: λ(1) = −∞, so h_prev = ∞ and the correction vanishes.
- "sde": Flow-GRPO's SDE step with noise level η (sde_step): s_t = η·sqrt(σ/(1 − σ)) (σ = 1 uses the next σ in
  the denominator), mean = x·(1 + s_t²/(2σ)·dt) + v·(1 + s_t²(1 − σ)/(2σ))·dt, x_next = mean + s_t·sqrt(−dt)·ξ,
  dt = σ_next − σ; sde_step also returns the step's Gaussian log-density (mean over C, H, W). η = 0 is Euler
  exactly. sample_groups(record=True) keeps the trajectory and the log-probs (Flow-GRPO's rollouts);
  sde_steps limits the noise to a window (Flow-GRPO-Fast).

E-GRPO (sample_branches): the entropy of an SDE step σ → σ' per dimension is ½·log(2πe·η²·σ/(1 − σ)·(σ − σ'))
(step_entropy); merge_plan merges low-entropy steps into single steps σ_i → σ_{i+l} reaching a threshold on
2πe·η²·σ/(1 − σ)·Δσ (entropy_power); per active step, G branches leave a shared Euler prefix with one merged SDE
step and finish by Euler.

Conditioning: C(σ) = C_orig + γ(σ)·(C_opt − C_orig) on context and pooled at every model call,
γ(σ) = clip((σ − (1 − ρ))/ρ, 0, 1) (Eq. 13; "static" ablation: γ ≡ 1). Written this way the original
member (C_opt == C_orig) is bit-exactly unchanged; γ = 0 and γ = 1 use C_orig / C_opt as they are.
Classifier-free guidance is optional and off by default (E²PO samples with scale 1: one forward per step).
Sampling runs under torch.no_grad; the solver state stays float32 and the model runs under whatever
autocast context the caller opened.

Group order (sample_groups): prompt-major, then variant, then noise seed:
    n = (p·K' + k')·G + g,  K' = K (anchor) or K − 1 (no anchor, variants 1..K−1)
The G noises of a prompt are shared by all its variants (Eq. 8), and are drawn as
torch.randn((P, G, C, h, w), generator=generator) on the generator's device (CPU by default).

Run:
    python sample.py --prompt "a red circle above a blue square"          # default world, data/shapes/sd3_tiny
    python sample.py --prompt "..." --num_variants 4 --num_images 3        # E²PO's variants side by side, and how
                                                                           # much they change the image vs the noise
    python sample.py --prompt "..." --solver dpm2m --steps 10              # the rollout sampler
    python sample.py --prompt "..." --weights sd3.5_medium.safetensors --text_encoders /path/to/pipeline_root

Departures from the references
- DiffusionNFT's rollout sampler passes the timestep to the transformer as an integer (σ·1000 cast to long);
  we pass the exact σ (as diffusers' pipeline does, and as DiffusionNFT's own training step does).
- Flow-GRPO also injects noise on the last step (σ_next = 0), which leaves noise in the output; our SDE
  takes a deterministic step there, so the sampler returns a clean x0.
- The SDE's step noise is shared across the K variants of a (prompt, seed) too, like the initial noise,
  so that under the SDE as well the spread across variants is purely semantic.
- sample_branches (E-GRPO): Euler prefix and suffix; the branch noise is shared across the K variants too.
"""

import argparse
import math
import os
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from configurator import user_errors

# -----------------------------------------------------------------------------
# defaults
NUM_TRAIN_TIMESTEPS = 1000   # SD3.5 scheduler config
SHIFT = 3.0                  # SD3.5 scheduler config
EVAL_STEPS = 40              # Euler, evaluation
ROLLOUT_STEPS = 10           # DPM-Solver++(2M), DiffusionNFT rollouts
ETA = 0.7                    # Flow-GRPO noise level for the SDE sampler
RHO = 0.4                    # Eq. 13 perturbation range
LATENT_CHANNELS = 16
LATENT_SIZE = (64, 64)       # 512² images through the 8× VAE
MICRO_BATCH = 8
SOLVERS = ("euler", "dpm2m", "sde")
SCHEDULES = ("noise_aware", "static")


# -----------------------------------------------------------------------------
# schedule and γ

def time_shift(sigma, shift=SHIFT):
    """SD3's time shift of σ ∈ [0, 1] (floats, tensors or arrays): shift·σ / (1 + (shift − 1)·σ); 0 and 1
    stay."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def sigma_schedule(num_steps, shift=SHIFT):
    """(num_steps+1,) float32 sigmas, 1 → 0, equal to diffusers'
    FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift).set_timesteps(num_steps).sigmas.
    Its timesteps are linspace(1000·σ_max, 1000·σ_min, n) in float64, where σ_min is the shifted
    σ of train timestep 1 computed in float32; then shifted, cast to float32, and a 0 is appended."""
    if int(num_steps) != num_steps or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
    if not shift > 0:
        raise ValueError(f"shift must be > 0, got {shift!r}")
    n, T = int(num_steps), NUM_TRAIN_TIMESTEPS
    s = torch.tensor(1.0, dtype=torch.float32) / T                 # train σ of timestep 1, float32 as in diffusers
    sigma_min = time_shift(s, shift).item()
    t = np.linspace(1.0 * T, sigma_min * T, n)                     # σ_max = 1 (shift maps 1 to 1)
    sig = time_shift(t / T, shift)
    return torch.cat([torch.from_numpy(sig).to(torch.float32), torch.zeros(1)])


def gamma(sigma, rho=RHO):
    """Eq. 13: γ(σ) = clip((σ − (1 − ρ))/ρ, 0, 1), ρ ∈ (0, 1]. Takes a float (returns a float) or a
    tensor (returns float64). γ = 1 for σ ≥ 1 and 0 for σ ≤ 1 − ρ, exactly."""
    if not 0 < rho <= 1:
        raise ValueError(f"rho must be in (0, 1], got {rho!r}")
    if torch.is_tensor(sigma):
        s = sigma.double()
        g = ((s - (1.0 - rho)) / rho).clamp(0.0, 1.0)
        return torch.where(s >= 1.0, torch.ones_like(g), g)
    s = float(sigma)
    return 1.0 if s >= 1.0 else min(1.0, max(0.0, (s - (1.0 - rho)) / rho))


def _mix(orig, opt, g):
    """C_orig + γ·(C_opt − C_orig); γ = 0 / 1 return the tensors themselves (exact)."""
    if opt is None or g == 0.0:
        return orig
    if g == 1.0:
        return opt
    return orig + g * (opt - orig)


# -----------------------------------------------------------------------------
# one velocity evaluation (conditions at σ, optional CFG)

def _velocity(model, x, sigma, cond, g, guidance_scale):
    """v at (x, σ) with conditions mixed by γ = g. Returns float32."""
    context, pooled, context_opt, pooled_opt, neg_context, neg_pooled = cond
    ctx, pol = _mix(context, context_opt, g), _mix(pooled, pooled_opt, g)
    B = x.shape[0]
    if guidance_scale == 1.0:
        return model(x, sigma.expand(B), ctx, pol).float()
    # batched [uncond, cond] as diffusers' pipeline does
    v = model(torch.cat([x, x]), sigma.expand(2 * B), torch.cat([neg_context, ctx]), torch.cat([neg_pooled, pol])).float()
    v_uncond, v_cond = v.chunk(2)
    return v_uncond + guidance_scale * (v_cond - v_uncond)


# -----------------------------------------------------------------------------
# solver steps (x float32; σ's as float32 0-dim tensors for Euler, float64 python numbers for the rest)

def euler_step(x, v, sigma, sigma_next):
    """x + (σ_next − σ)·v with σ's as float32 tensors, as diffusers' FlowMatchEulerDiscreteScheduler."""
    return x + (sigma_next - sigma) * v


def dpm2m_step(x, x0, x0_prev, s, s_next, s_prev):
    """DPM-Solver++(2M) in data-prediction form for flow matching (α = 1 − σ, λ = log(α/σ)).
    s, s_next, s_prev are python floats; x0_prev None → first-order step (== Euler / DDIM)."""
    if s_next == 0.0 or x0_prev is None or s_prev >= 1.0:
        # first order: x_next = (σ_n/σ)·x + (1 − σ_n/σ)·x0   (the exact limit when σ_prev = 1: h_prev = ∞)
        r = s_next / s
        return r * x + (1.0 - r) * x0
    lam = lambda t: math.log(1.0 - t) - math.log(t)
    h, h_prev = lam(s_next) - lam(s), lam(s) - lam(s_prev)
    c = -(1.0 - s_next) * math.expm1(-h)                    # −α_next·(e^(−h) − 1)
    D1 = (h / h_prev) * (x0 - x0_prev)
    return (s_next / s) * x + c * (x0 + 0.5 * D1)


def sde_step(x, v, sigma, sigma_next, eta, prev_sample=None, noise=None):
    """Flow-GRPO's SDE transition (sde_step_with_logprob, sde_type="sde") and its log-density.
    x, v (B, ...); sigma, sigma_next (B,) tensors (or floats); eta > 0 (Flow-GRPO's noise level, E-GRPO's a).
        dt = σ' − σ,  s_t = η·√(σ/(1 − σ))  (σ = 1: σ' in the denominator, as the reference's sigmas[1])
        mean = x·(1 + s_t²·dt/(2σ)) + v·(1 + s_t²(1 − σ)/(2σ))·dt,  std = s_t·√(−dt)
    prev_sample = mean + std·noise unless prev_sample is given (then it is returned unchanged, and scored).
    log_prob (B,) is the Gaussian log-density of prev_sample, averaged (not summed) over C, H, W, as the reference.
    The coefficients are computed in float64 from the σ's and cast once, the tensors in x's dtype (at least
    float32), so gradients flow from v into mean and log_prob. σ' may be any later σ of the grid: E-GRPO's merged
    step σ_i → σ_{i+l} is this step with dt = σ_{i+l} − σ_i.
    Returns (prev_sample, log_prob (B,), mean, std_dev_t (B,): s_t, without the √(−dt))."""
    if not eta > 0:
        raise ValueError(f"eta must be > 0 (eta = 0 is the ODE: euler_step), got {eta!r}")
    if prev_sample is None and noise is None:
        raise ValueError("sde_step needs noise (to draw prev_sample) or prev_sample (to score it)")
    dtype = torch.promote_types(x.dtype, torch.float32)
    B = x.shape[0]
    as64 = lambda s: torch.as_tensor(s, device=x.device).double().reshape(-1).expand(B)
    s, s_next = as64(sigma), as64(sigma_next)
    if not bool(((s_next < s) & (s > 0) & (s <= 1) & (s_next >= 0)).all()):
        raise ValueError("sde_step needs 1 >= sigma > sigma_next >= 0")
    dt = s_next - s
    std_dev = eta * torch.sqrt(s / (1 - torch.where(s == 1, s_next, s)))
    c_x = 1 + std_dev ** 2 / (2 * s) * dt
    c_v = 1 + std_dev ** 2 * (1 - s) / (2 * s)
    step_std = std_dev * torch.sqrt(-dt)
    view = lambda t: t.to(dtype).view(-1, *([1] * (x.ndim - 1)))
    x, v = x.to(dtype), v.to(dtype)
    mean = x * view(c_x) + v * view(c_v) * view(dt)
    if prev_sample is None:
        prev_sample = mean + view(step_std) * noise.to(dtype)
    target = prev_sample.detach().to(dtype)
    log_prob = (-((target - mean) ** 2) / (2 * view(step_std) ** 2) - torch.log(view(step_std))
                - 0.5 * math.log(2 * math.pi))
    return prev_sample, log_prob.mean(tuple(range(1, x.ndim))), mean, std_dev.to(dtype)


def max_stable_eta(sigmas, steps=None):
    """The largest η for which every sde_step on `steps` leaves the latent's own coefficient in the mean within
    [−1, 1] (the explicit Euler stability bound of the SDE's drift): (bound, the binding step (σ, σ')).
        c_x = 1 + s_t²·dt/(2σ) = 1 − η²·(σ − σ')/(2(1 − σ))   (σ = 1: 1 − η²/2, whatever σ')
        |c_x| ≤ 1  ⇔  η ≤ 2·√((1 − σ)/(σ − σ'))              (σ = 1: η ≤ 2)
    Beyond it each such step multiplies x by |c_x| > 1 with a flipped sign, and the rollouts grow geometrically (at
    η = 5 on the 10-step grid the latents reach 1e7, inf at larger η). The continuous SDE has no such limit; the
    bound belongs to the grid (longer steps, e.g. E-GRPO's merged ones, bind harder). steps: [(i, j), ...], the
    SDE transitions σ_i → σ_j taken; None = every step but the last (which the samplers take deterministically)."""
    sig = [float(s) for s in sigmas]
    if steps is None:
        steps = [(i, i + 1) for i in range(len(sig) - 2)]
    best = (math.inf, None)
    for i, j in steps:
        s, s_next = sig[i], sig[j]
        den = 1 - (s_next if s == 1.0 else s)
        best = min(best, (2 * math.sqrt(den / (s - s_next)), (s, s_next)), key=lambda b: b[0])
    return best


def entropy_power(sigma, sigma_next, eta):
    """exp(2h/d) of one sde_step transition σ → σ' (d-dimensional Gaussian, std s_t·√(σ − σ') per dimension):
    2πe·s_t²·(σ − σ') = 2πe·η²·σ/(1 − σ)·(σ − σ'), with sde_step's s_t (σ' in the denominator where σ = 1).
    E-GRPO compares this with its threshold τ (train.py: the reading of τ). Floats in, float out."""
    s, s_next = float(sigma), float(sigma_next)
    var = eta ** 2 * s / (1 - (s_next if s == 1.0 else s)) * (s - s_next)
    return 2 * math.pi * math.e * var


def step_entropy(sigma, sigma_next, eta, dims=1):
    """E-GRPO's step entropy h = d/2·log(2πe·η²·σ/(1 − σ)·Δσ) in nats (d = dims; per dimension by default)."""
    return dims / 2 * math.log(entropy_power(sigma, sigma_next, eta))


def merge_plan(sigmas, eta, tau, num_train_steps):
    """E-GRPO's active SDE steps on a σ grid (σ_0 = 1, ..., σ_T = 0): [(i, l), ...]. From step 0, each active step
    starts where the previous one ended and spans the smallest l ≥ 1 steps whose merged transition σ_i → σ_{i+l}
    reaches entropy_power ≥ tau; starts stay below num_train_steps (E-GRPO: the first 8 of 16). A merge never
    reaches the last step (σ_{T−1} → 0, which the samplers take deterministically): where even the longest allowed
    merge stays below tau, that longest one is the step."""
    sig = [float(s) for s in sigmas]
    last = len(sig) - 2                       # index of the final step σ_{T−1} → 0
    plan, i = [], 0
    while i < min(num_train_steps, last):
        l = 1
        while entropy_power(sig[i], sig[i + l], eta) < tau and i + l < last:
            l += 1
        plan.append((i, l))
        i += l
    return plan


def _solve(model, x, sigmas, cond, solver, eta, gammas, guidance_scale, step_noise, progress=None, sde_steps=None,
           trace=None):
    """Integrate from sigmas[0] to sigmas[-1]. gammas[i] is γ at model call i; step_noise(i) gives the
    SDE noise for step i (same shape as x). SDE: only the steps in sde_steps (None = all) are stochastic, the
    others (and the last, σ_next = 0) Euler. trace (a list) receives (x before step i, log-prob of the step or None)."""
    x = x.float()
    sig64 = sigmas.double().tolist()
    x0_prev = None
    for i in range(len(sigmas) - 1):
        v = _velocity(model, x, sigmas[i], cond, gammas[i], guidance_scale)
        x_in, log_prob = x, None
        if solver == "euler":
            x = euler_step(x, v, sigmas[i], sigmas[i + 1])
        elif solver == "dpm2m":
            x0 = x - sig64[i] * v
            s_prev = sig64[i - 1] if i > 0 else None
            x = dpm2m_step(x, x0, x0_prev, sig64[i], sig64[i + 1], s_prev)
            x0_prev = x0
        elif eta > 0 and sig64[i + 1] > 0 and (sde_steps is None or i in sde_steps):
            B = len(x)
            x, log_prob, _, _ = sde_step(x, v, sigmas[i].expand(B), sigmas[i + 1].expand(B), eta, noise=step_noise(i))
        else:
            x = x + (sig64[i + 1] - sig64[i]) * v
        if trace is not None:
            trace.append((x_in, log_prob))
        if progress is not None:
            progress.update(1)
    if trace is not None:
        trace.append((x, None))
    return x


def _check_args(solver, schedule, rho, num_steps, eta, guidance_scale, neg_context, neg_pooled):
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if not 0 < rho <= 1:
        raise ValueError(f"rho must be in (0, 1], got {rho!r}")
    if int(num_steps) != num_steps or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta!r}")
    if guidance_scale < 1:
        raise ValueError(f"guidance_scale must be >= 1 (1 = no CFG), got {guidance_scale!r}")
    if guidance_scale > 1 and (neg_context is None or neg_pooled is None):
        raise ValueError("guidance_scale > 1 needs neg_context and neg_pooled (the unconditional conditions)")


def _gammas(sigmas, context_opt, pooled_opt, schedule, rho):
    if context_opt is None and pooled_opt is None:
        return [0.0] * (len(sigmas) - 1)
    if schedule == "static":
        return [1.0] * (len(sigmas) - 1)
    return [gamma(s, rho) for s in sigmas[:-1].double().tolist()]


def _expand_neg(t, B):
    return None if t is None else (t.expand(B, *t.shape[1:]) if t.shape[0] == 1 else t)


# -----------------------------------------------------------------------------
# plain sampling

@torch.no_grad()
def sample(model, noise, context, pooled, num_steps=EVAL_STEPS, solver="euler", shift=SHIFT, eta=ETA,
           guidance_scale=1.0, neg_context=None, neg_pooled=None, context_opt=None, pooled_opt=None,
           rho=RHO, schedule="noise_aware", generator=None, progress=None):
    """Integrate noise (B,C,h,w) at σ = 1 to clean latents x0 (float32, model space).
    context (B,S,D), pooled (B,Dp). context_opt/pooled_opt (same shapes) switch on Eq. 13:
    C(σ) = C_orig + γ(σ)·(C_opt − C_orig); a missing one of the two stays at the original.
    neg_context/neg_pooled (B or 1 rows) are used only when guidance_scale > 1.
    generator draws the SDE's step noise (solver="sde"). progress: optional tqdm-like with .update()."""
    _check_args(solver, schedule, rho, num_steps, eta, guidance_scale, neg_context, neg_pooled)
    B = noise.shape[0]
    if noise.ndim != 4 or context.ndim != 3 or pooled.ndim != 2 or context.shape[0] != B or pooled.shape[0] != B:
        raise ValueError(f"shapes: noise (B,C,h,w), context (B,S,D), pooled (B,Dp) with one B; got "
                         f"{tuple(noise.shape)}, {tuple(context.shape)}, {tuple(pooled.shape)}")
    for name, t, ref in (("context_opt", context_opt, context), ("pooled_opt", pooled_opt, pooled)):
        if t is not None and t.shape != ref.shape:
            raise ValueError(f"{name} must have the shape of the original {tuple(ref.shape)}, got {tuple(t.shape)}")
    sigmas = sigma_schedule(num_steps, shift).to(noise.device)
    gammas = _gammas(sigmas, context_opt, pooled_opt, schedule, rho)
    cond = (context, pooled, context_opt, pooled_opt, _expand_neg(neg_context, B), _expand_neg(neg_pooled, B))
    gen_device = generator.device if generator is not None else noise.device
    step_noise = lambda i: torch.randn(noise.shape, generator=generator, device=gen_device).to(noise.device)
    return _solve(model, noise, sigmas, cond, solver, eta, gammas, guidance_scale, step_noise, progress)


# -----------------------------------------------------------------------------
# group sampling (Eq. 8 + Eq. 13 + reference-anchored batching)

@dataclass
class Group:
    latents: torch.Tensor             # (N,16,h,w) clean latents, float32, model space
    images: torch.Tensor | None       # (N,3,H,W) in [0,1], or None
    prompt_idx: torch.Tensor          # (N,) long, CPU: p
    variant: torch.Tensor             # (N,) long, CPU: k (0 = the original prompt)
    seed_idx: torch.Tensor            # (N,) long, CPU: g (which shared noise)
    trajectory: torch.Tensor | None = None   # record=True: (N, T+1, 16, h, w) x at every σ of the grid (float32)
    log_probs: torch.Tensor | None = None    # record=True: (N, T) sde_step log-prob of each step, nan where Euler


def _adapter_context(model, adapter):
    """model.use_adapter(model, adapter) when the model carries LoRA layers; otherwise nothing."""
    if adapter is None or not isinstance(model, torch.nn.Module):
        return nullcontext()
    try:
        import model as model_lib
    except ImportError:
        return nullcontext()
    if not hasattr(model_lib, "lora_layers") or not model_lib.lora_layers(model):
        return nullcontext()
    return model_lib.use_adapter(model, adapter)      # unknown adapter name: ValueError from model.set_adapter


@torch.no_grad()
def sample_groups(model, vae, perturbed, num_seeds, num_steps=ROLLOUT_STEPS, solver="dpm2m", rho=RHO,
                  schedule="noise_aware", anchor=True, micro_batch=MICRO_BATCH, latent_size=LATENT_SIZE,
                  generator=None, adapter="old", decode=True, shift=SHIFT, eta=ETA, progress=False, sde_steps=None,
                  record=False):
    """For each prompt p of `perturbed` (context (P,K,S,D), pooled (P,K,Dp); [:,0] the original), sample
    G = num_seeds noises × the K conditions, the G noises shared across k. Flattened prompt-major,
    then variant, then seed: n = (p·K' + k')·G + g (see the module docstring). Model calls run in
    chunks of `micro_batch` samples (each chunk is integrated over all steps). anchor=False drops
    k = 0. Samples with the named LoRA adapter of the model (None: as the model is set).
    Decodes with vae.decode (in chunks of micro_batch) when vae is given and decode=True.
    Deterministic given `generator` (initial noise (P,G,C,h,w), then, for the SDE, per step (P,G,C,h,w)).
    SDE only: sde_steps (a set of step indices; None = every step but the last) are stochastic, the rest Euler
    (Flow-GRPO-Fast's window); record=True keeps the trajectory and the per-step log-probs (Flow-GRPO's rollout)."""
    ctx_all, pool_all = perturbed.context, perturbed.pooled
    if ctx_all.ndim != 4 or pool_all.ndim != 3 or ctx_all.shape[:2] != pool_all.shape[:2]:
        raise ValueError(f"perturbed.context must be (P,K,S,D) and perturbed.pooled (P,K,Dp); got "
                         f"{tuple(ctx_all.shape)} and {tuple(pool_all.shape)}")
    _check_args(solver, schedule, rho, num_steps, eta, 1.0, None, None)
    P, K = ctx_all.shape[:2]
    G = int(num_seeds)
    if G < 1:
        raise ValueError(f"num_seeds must be >= 1, got {num_seeds!r}")
    if micro_batch < 1:
        raise ValueError(f"micro_batch must be >= 1, got {micro_batch!r}")
    variants = list(range(K)) if anchor else list(range(1, K))
    if not variants:
        raise ValueError("anchor=False needs num_variants K >= 2 (the group would be empty)")
    h, w = latent_size
    C = getattr(getattr(model, "cfg", None), "in_channels", LATENT_CHANNELS)
    device = ctx_all.device
    gen_device = generator.device if generator is not None else torch.device("cpu")
    noise = torch.randn((P, G, C, h, w), generator=generator, device=gen_device).to(device)

    sigmas = sigma_schedule(num_steps, shift).to(device)
    step_noise_all = None
    if solver == "sde" and eta > 0:
        step_noise_all = [torch.randn((P, G, C, h, w), generator=generator, device=gen_device).to(device)
                          for _ in range(num_steps - 1)]

    Kv = len(variants)
    idx = torch.arange(P * Kv * G)
    prompt_idx, kk, seed_idx = idx // (Kv * G), (idx // G) % Kv, idx % G
    variant = torch.tensor(variants)[kk]

    chunks = [slice(a, min(a + micro_batch, len(idx))) for a in range(0, len(idx), micro_batch)]
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(chunks) * num_steps, desc="sampling", unit="step")
    out, traces = [], []
    with _adapter_context(model, adapter):
        for sl in chunks:
            p, k, g = prompt_idx[sl].to(device), variant[sl].to(device), seed_idx[sl].to(device)
            context, pooled = ctx_all[p, 0], pool_all[p, 0]
            context_opt, pooled_opt = ctx_all[p, k], pool_all[p, k]
            if not (k != 0).any():
                context_opt = pooled_opt = None        # only originals: plain sampling
            gammas = _gammas(sigmas, context_opt, pooled_opt, schedule, rho)
            cond = (context, pooled, context_opt, pooled_opt, None, None)
            step_noise = (lambda i, p=p, g=g: step_noise_all[i][p, g]) if step_noise_all else None
            trace = [] if record else None
            out.append(_solve(model, noise[p, g], sigmas, cond, solver, eta, gammas, 1.0, step_noise, bar, sde_steps,
                              trace))
            if record:
                traces.append(trace)
    if bar is not None:
        bar.close()
    latents = torch.cat(out)
    trajectory = log_probs = None
    if record:
        trajectory = torch.cat([torch.stack([x for x, _ in t], 1) for t in traces])
        nan = lambda x: torch.full((len(x),), float("nan"), device=x.device)
        log_probs = torch.cat([torch.stack([nan(x) if lp is None else lp for x, lp in t[:-1]], 1) for t in traces])

    images = None
    if vae is not None and decode:
        images = torch.cat([vae.decode(latents[sl]).float() for sl in chunks])
    return Group(latents=latents, images=images, prompt_idx=prompt_idx, variant=variant, seed_idx=seed_idx,
                 trajectory=trajectory, log_probs=log_probs)


# -----------------------------------------------------------------------------
# E-GRPO's branching rollouts: a shared ODE prefix, one merged SDE step, an ODE suffix

@dataclass
class Branches:
    latents: torch.Tensor             # (N,16,h,w) clean latents (after the ODE suffix)
    images: torch.Tensor | None       # (N,3,H,W) in [0,1], or None
    prompt_idx: torch.Tensor          # (N,) long, CPU: p
    step_idx: torch.Tensor            # (N,) long, CPU: a, the active step (index into `plan`)
    variant: torch.Tensor             # (N,) long, CPU: k (0 = the original prompt)
    seed_idx: torch.Tensor            # (N,) long, CPU: g (which branch noise)
    x: torch.Tensor                   # (N,16,h,w) the branch point x(σ_i), shared by the G branches of (p, a, k)
    x_next: torch.Tensor              # (N,16,h,w) x(σ_{i+l}) after the merged SDE step
    log_prob: torch.Tensor            # (N,) sde_step log-prob of x_next
    sigma: torch.Tensor               # (N,) σ_i
    sigma_next: torch.Tensor          # (N,) σ_{i+l}


@torch.no_grad()
def sample_branches(model, vae, perturbed, num_branches, plan, num_steps=ROLLOUT_STEPS, eta=ETA, rho=RHO,
                    schedule="noise_aware", anchor=True, micro_batch=MICRO_BATCH, latent_size=LATENT_SIZE,
                    generator=None, adapter="old", decode=True, shift=SHIFT):
    """E-GRPO's rollouts. For each prompt p and condition k (Eq. 13 as in sample_groups), one Euler trajectory from
    a noise shared by the K conditions; at each active step a = (i, l) of `plan` (merge_plan), G = num_branches
    branches leave the prefix at σ_i with one merged SDE step σ_i → σ_{i+l} (sde_step, noise level eta, branch noise
    shared across k) and finish by Euler to σ = 0. Flattened prompt-major, then active step, variant, branch:
        n = ((p·A + a)·K' + k')·G + g
    so each (prompt, step) group of K'·G samples is contiguous. Model calls run in chunks of `micro_batch` samples.
    Draws from `generator`: the initial noise (P,C,h,w), then per active step the branch noise (P,G,C,h,w)."""
    ctx_all, pool_all = perturbed.context, perturbed.pooled
    if ctx_all.ndim != 4 or pool_all.ndim != 3 or ctx_all.shape[:2] != pool_all.shape[:2]:
        raise ValueError(f"perturbed.context must be (P,K,S,D) and perturbed.pooled (P,K,Dp); got "
                         f"{tuple(ctx_all.shape)} and {tuple(pool_all.shape)}")
    _check_args("sde", schedule, rho, num_steps, eta, 1.0, None, None)
    P, K = ctx_all.shape[:2]
    G, A = int(num_branches), len(plan)
    if G < 1 or A < 1 or micro_batch < 1:
        raise ValueError(f"need num_branches >= 1, a non-empty plan and micro_batch >= 1; got {num_branches!r}, "
                         f"{plan!r}, {micro_batch!r}")
    if any(i < 0 or l < 1 or i + l > num_steps - 1 for i, l in plan):
        raise ValueError(f"plan {plan!r}: every (i, l) needs i >= 0, l >= 1 and i + l <= num_steps − 1 = "
                         f"{num_steps - 1}")
    variants = list(range(K)) if anchor else list(range(1, K))
    if not variants:
        raise ValueError("anchor=False needs num_variants K >= 2 (the group would be empty)")
    Kv, (h, w) = len(variants), latent_size
    C = getattr(getattr(model, "cfg", None), "in_channels", LATENT_CHANNELS)
    device = ctx_all.device
    gen_device = generator.device if generator is not None else torch.device("cpu")
    noise = torch.randn((P, C, h, w), generator=generator, device=gen_device).to(device)
    branch_noise = [torch.randn((P, G, C, h, w), generator=generator, device=gen_device).to(device) for _ in plan]
    sigmas = sigma_schedule(num_steps, shift).to(device)
    sig64 = sigmas.double().tolist()

    def conditions(p, k):
        context, pooled = ctx_all[p, 0], pool_all[p, 0]
        if not (k != 0).any():
            return (context, pooled, None, None, None, None), _gammas(sigmas, None, None, schedule, rho)
        opt = (ctx_all[p, k], pool_all[p, k])
        return (context, pooled, *opt, None, None), _gammas(sigmas, *opt, schedule, rho)

    # the ODE prefix of every unit u = p·K' + k', kept at each branch point: x(σ_i) and v(σ_i)
    unit_p = torch.arange(P * Kv) // Kv
    unit_k = torch.tensor(variants)[torch.arange(P * Kv) % Kv]
    starts = {i: a for a, (i, _) in enumerate(plan)}
    x_at, v_at = [[None] * A for _ in range(2)]
    with _adapter_context(model, adapter):
        parts = {a: ([], []) for a in range(A)}
        for c in range(0, P * Kv, micro_batch):
            p, k = unit_p[c:c + micro_batch].to(device), unit_k[c:c + micro_batch].to(device)
            cond, gammas = conditions(p, k)
            x = noise[p].float()
            for i in range(max(starts) + 1):
                v = _velocity(model, x, sigmas[i], cond, gammas[i], 1.0)
                if i in starts:
                    parts[starts[i]][0].append(x)
                    parts[starts[i]][1].append(v)
                x = euler_step(x, v, sigmas[i], sigmas[i + 1])
        for a in range(A):
            x_at[a], v_at[a] = torch.cat(parts[a][0]), torch.cat(parts[a][1])

        # the branches: n = ((p·A + a)·K' + k')·G + g. The merged SDE step of every branch (elementwise), then the
        # Euler suffixes of all active steps together: at grid step j every branch whose merged step ended at or
        # before σ_j is at σ_j, so one forward (in chunks of micro_batch samples) serves them all
        N = P * A * Kv * G
        n = torch.arange(N)
        prompt_idx, step_idx = n // (A * Kv * G), (n // (Kv * G)) % A
        kk, seed_idx = (n // G) % Kv, n % G
        unit = prompt_idx * Kv + kk
        variant = torch.tensor(variants)[kk]
        x_branch = torch.empty((N, C, h, w), device=device)
        x_next, log_prob = torch.empty_like(x_branch), torch.empty(N, device=device)
        for a, (i, l) in enumerate(plan):
            rows = n[step_idx == a]
            p, g, u = prompt_idx[rows].to(device), seed_idx[rows].to(device), unit[rows].to(device)
            B = len(rows)
            x_branch[rows] = x_at[a][u]
            x_next[rows], log_prob[rows], _, _ = sde_step(x_at[a][u], v_at[a][u], sigmas[i].expand(B),
                                                          sigmas[i + l].expand(B), eta, noise=branch_noise[a][p, g])
        resume_at = torch.tensor([sum(plan[a]) for a in step_idx.tolist()])      # i + l
        latents = x_next.clone()
        for j in range(int(resume_at.min()), num_steps):
            rows = n[resume_at <= j]
            for c in range(0, len(rows), micro_batch):
                r = rows[c:c + micro_batch]
                cond, gammas = conditions(prompt_idx[r].to(device), variant[r].to(device))
                v = _velocity(model, latents[r], sigmas[j], cond, gammas[j], 1.0)
                latents[r] = euler_step(latents[r], v, sigmas[j], sigmas[j + 1])
    stacked = dict(latents=latents, x=x_branch, x_next=x_next, log_prob=log_prob)
    sigma = torch.tensor([sig64[plan[a][0]] for a in step_idx.tolist()], dtype=torch.float32, device=device)
    sigma_next = torch.tensor([sig64[sum(plan[a])] for a in step_idx.tolist()], dtype=torch.float32, device=device)
    images = None
    if vae is not None and decode:
        images = torch.cat([vae.decode(stacked["latents"][c:c + micro_batch]).float()
                            for c in range(0, N, micro_batch)])
    return Branches(images=images, prompt_idx=prompt_idx, step_idx=step_idx, variant=variant, seed_idx=seed_idx,
                    sigma=sigma, sigma_next=sigma_next, **stacked)


# -----------------------------------------------------------------------------
# CLI

def variant_spread(images, variant, seed_idx):
    """How much E²PO's variants change an image, against how much the noise does: (mean |x(k, g) − x(0, g)| over
    perturbed variants k ≥ 1 and noises g, mean |x(0, g) − x(0, g')| over noise pairs g ≠ g'), per pixel and channel.
    images (N,...) of one prompt's group with their variant and seed indices (Group's). A variant spread much smaller
    than the noise spread means the group's diversity, and so its reward variance, comes from the G noises alone.
    The noise spread is nan with one noise."""
    images, variant, seed_idx = images.float(), torch.as_tensor(variant), torch.as_tensor(seed_idx)
    orig = {int(g): images[(variant == 0) & (seed_idx == g)][0] for g in seed_idx[variant == 0].unique()}
    perturbed = [(images[n] - orig[int(seed_idx[n])]).abs().mean() for n in range(len(images))
                 if variant[n] > 0 and int(seed_idx[n]) in orig]
    pairs = [(orig[a] - orig[b]).abs().mean() for a in orig for b in orig if a < b]
    mean = lambda xs: float(torch.stack(xs).mean()) if xs else float("nan")
    return mean(perturbed), mean(pairs)


def _load_model_lib():
    import model as model_lib
    return model_lib


def _to_pil(img):
    from PIL import Image
    arr = (img.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(arr)


def save_grid(images, path, ncols, labels=None, title=None, scale=1):
    """images (N,3,H,W) in [0,1] → one PNG, row-major with ncols columns, each tile upscaled `scale`× (nearest: the
    pixels as sampled). With `labels` (one string per image, "\n" for a new line, long lines wrapped to the tile) a
    caption goes under each tile; with `title`, a line above the grid (wrapped to its width)."""
    from PIL import Image, ImageDraw
    N, _, H, W = images.shape
    if labels is not None and len(labels) != N:
        raise ValueError(f"save_grid: {len(labels)} labels for {N} images")
    W, H = W * scale, H * scale
    font = _font()
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    captions = [_wrap(draw, font, str(t), W - 4) for t in labels] if labels is not None else []
    line = _line_height(draw, font)
    cap_h = (max(len(c) for c in captions) * line + 4) if captions else 0
    heading = _wrap(draw, font, title, ncols * W - 8) if title else []
    top = (len(heading) * line + 8) if title else 0
    nrows = math.ceil(N / ncols)
    grid = Image.new("RGB", (ncols * W, top + nrows * (H + cap_h)), "white")
    draw = ImageDraw.Draw(grid)
    for j, text in enumerate(heading):
        draw.text((4, 4 + j * line), text, fill="black", font=font)
    for i in range(N):
        x, y = (i % ncols) * W, top + (i // ncols) * (H + cap_h)
        grid.paste(_to_pil(images[i]).resize((W, H), Image.NEAREST), (x, y))
        for j, text in enumerate(captions[i] if captions else []):
            draw.text((x + 2, y + H + 2 + j * line), text, fill="black", font=font)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    grid.save(path)


GRID_SCALE = 3       # save_grid's upscaling of small images (the world samples 64 px), so a grid is readable


def grid_scale(images):
    """The `scale` for save_grid that makes tiles of these images readable: GRID_SCALE up to 128 px, else 1."""
    return GRID_SCALE if images.shape[-1] <= 128 else 1


def _font():
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=12)      # Pillow >= 10.1: a scalable font
    except TypeError:
        return ImageFont.load_default()             # older Pillow: the small bitmap font


def _line_height(draw, font):
    box = draw.textbbox((0, 0), "Ag", font=font)
    return box[3] - box[1] + 3


def _wrap(draw, font, text, width):
    """text → lines no wider than `width` pixels, split at spaces (and at "\n")."""
    lines = []
    for para in text.split("\n"):
        words, cur = para.split(" "), ""
        for w in words:
            nxt = f"{cur} {w}" if cur else w
            if cur and draw.textlength(nxt, font=font) > width:
                lines.append(cur)
                nxt = w
            cur = nxt
        lines.append(cur)
    return lines


def main(argv=None):
    ap = argparse.ArgumentParser(description="Sample images from an SD3/SD3.5 model (default: the shapes world).")
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--weights", default=None, help="pipeline root, transformer/ folder or single file (default: the "
                    "shapes world, data/shapes/sd3_tiny)")
    ap.add_argument("--text_encoders", default=None, help="pipeline root with text_encoder/, tokenizer/… (default: --weights)")
    ap.add_argument("--lora", default=None, help="LoRA safetensors (model.save_lora format)")
    ap.add_argument("--num_images", type=int, default=4, help="noises per variant")
    ap.add_argument("--steps", type=int, default=EVAL_STEPS)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="out/samples")
    ap.add_argument("--num_variants", type=int, default=1, help="K: the prompt plus K-1 learned perturbations")
    ap.add_argument("--solver", default="euler", choices=SOLVERS)
    ap.add_argument("--eta", type=float, default=ETA)
    ap.add_argument("--rho", type=float, default=RHO)
    ap.add_argument("--delta_max", type=float, default=None,
                    help="Phase I's ‖δ‖max (default: perturb.py's 0.05 for SD3.5's CLIP-L; the shapes world trains with 0.025)")
    ap.add_argument("--size", type=int, default=None, help="image side in pixels (default: the pipeline's native size "
                    "(the world: 64), else 512)")
    ap.add_argument("--guidance_scale", type=float, default=1.0)
    ap.add_argument("--micro_batch", type=int, default=MICRO_BATCH)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)

    # validate before loading anything: a mistake here prints one line and exits 2 (configurator.user_errors)
    with user_errors("sample.py"):
        if not args.prompt.strip():
            raise ValueError("--prompt is empty")
        if args.num_images < 1 or args.num_variants < 1 or args.steps < 1:
            raise ValueError("--num_images, --num_variants and --steps must be >= 1")
        if args.num_variants > 1 and args.guidance_scale != 1.0:
            raise ValueError("--num_variants > 1 samples without CFG (as E²PO does); leave --guidance_scale at 1")
        model_lib = _load_model_lib()
        weights = Path(args.weights or model_lib.DEFAULT_WEIGHTS)
        if not weights.exists():
            if args.weights is None:
                raise FileNotFoundError(f"the default world's model is missing: {weights} (build it with "
                                        f"`python data/shapes/pretrain.py`, or pass --weights)")
            raise FileNotFoundError(f"--weights not found: {weights}")
        te_path = Path(args.text_encoders) if args.text_encoders else weights
        if not te_path.is_dir():
            raise ValueError(f"text encoders need a pipeline root folder (text_encoder/, tokenizer/…); "
                             f"{te_path} is not one: pass --text_encoders")
        if args.lora and not Path(args.lora).is_file():
            raise FileNotFoundError(f"--lora not found: {args.lora}")
        out = Path(args.out)
        if out.exists() and not out.is_dir():
            raise NotADirectoryError(f"--out {out} is a file, not a folder")
        out.mkdir(parents=True, exist_ok=True)
        if not os.access(out, os.W_OK):
            raise PermissionError(f"--out {out} is not writable")
        size = args.size or model_lib.native_size(weights) or 512
        if args.solver == "sde" and args.steps > 1:
            bound, (sig, sig_next) = max_stable_eta(sigma_schedule(args.steps))
            if args.eta > bound:
                raise ValueError(f"--eta {args.eta} is above {bound:.3g}, the most the SDE step σ={sig:.4g} → "
                                 f"{sig_next:.4g} of {args.steps} steps takes before the samples diverge "
                                 "(sample.max_stable_eta)")

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    mmdit = model_lib.load_mmdit(weights, device=device).eval()
    vae = model_lib.load_vae(weights, device=device).eval()
    text = model_lib.load_text_encoders(te_path, device=device)   # T5 tokens: the pipeline's own (the world: 8 zeros)
    factor = vae.factor                                                       # 8 for SD3's VAE
    patch = getattr(getattr(mmdit, "cfg", None), "patch_size", 2)
    with user_errors("sample.py"):      # the model's own factor, known once it has loaded
        if size % (factor * patch):
            raise ValueError(f"--size must be a multiple of {factor * patch} (VAE factor {factor} × patch {patch}), "
                             f"got {size}")
    adapter = None
    if args.lora:
        model_lib.load_lora(mmdit, args.lora, adapter="policy")
        adapter = "policy"

    if args.num_variants > 1:
        import perturb
        perturbed = perturb.learn_perturbations(text, [args.prompt], num_variants=args.num_variants, seed=args.seed,
                                                delta_max=perturb.DELTA_MAX if args.delta_max is None else args.delta_max)
        s = perturbed.stats
        if "cos_to_anchor" in s:
            print(f"variants: cos to the original prompt {[round(float(c), 3) for c in torch.as_tensor(s['cos_to_anchor']).flatten()]}")
    else:
        with torch.no_grad():
            context, pooled = text.encode([args.prompt])
        perturbed = SimpleNamespace(context=context[:, None], pooled=pooled[:, None])
    perturbed.context, perturbed.pooled = perturbed.context.to(device), perturbed.pooled.to(device)

    generator = torch.Generator().manual_seed(args.seed)
    lat = size // factor
    if args.guidance_scale == 1.0:
        group = sample_groups(mmdit, vae, perturbed, args.num_images, num_steps=args.steps, solver=args.solver,
                              rho=args.rho, micro_batch=args.micro_batch, latent_size=(lat, lat),
                              generator=generator, adapter=adapter, eta=args.eta, progress=True)
        images, ncols = group.images, args.num_variants
        # grid: one row per noise, the variants side by side
        order = (group.seed_idx * args.num_variants + group.variant).argsort()
        images, names = images[order], [f"k{int(k)}_g{int(g)}" for k, g in zip(group.variant[order], group.seed_idx[order])]
        if args.num_variants > 1:
            by_variant, by_noise = variant_spread(group.images, group.variant, group.seed_idx)
            print(f"mean |pixel change|: variant vs the original prompt (same noise) {by_variant:.4f}; "
                  f"between noises (original prompt) {by_noise:.4f}")
    else:
        from tqdm import tqdm
        with torch.no_grad():
            neg_context, neg_pooled = text.encode([""])
        C = getattr(getattr(mmdit, "cfg", None), "in_channels", LATENT_CHANNELS)
        noise = torch.randn((args.num_images, C, lat, lat), generator=generator).to(device)
        N = args.num_images
        bar = tqdm(total=args.steps, desc="sampling", unit="step")
        with _adapter_context(mmdit, adapter):
            latents = sample(mmdit, noise, perturbed.context[:, 0].expand(N, -1, -1), perturbed.pooled[:, 0].expand(N, -1),
                             num_steps=args.steps, solver=args.solver, eta=args.eta, guidance_scale=args.guidance_scale,
                             neg_context=neg_context.to(device), neg_pooled=neg_pooled.to(device),
                             generator=generator, progress=bar)
        bar.close()
        with torch.no_grad():
            images = vae.decode(latents).float()
        ncols, names = min(N, 4), [f"k0_g{g}" for g in range(N)]

    for img, name in zip(images, names):
        _to_pil(img).save(out / f"{name}.png")
    save_grid(images, out / "grid.png", ncols=ncols if args.num_variants > 1 else min(len(images), 4))
    print(f"wrote {len(images)} images and grid.png to {out}/")


if __name__ == "__main__":
    main()
