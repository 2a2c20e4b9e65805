"""
Tests for sample.py (CPU, a few seconds): `pytest tests_sample.py`.

The solvers are checked on an analytic flow whose exact velocity is known: data x0 ~ N(m, s²) per
dimension, noise N(0, 1). The marginal at σ is N((1−σ)m, (1−σ)²s² + σ²) and the ODE maps the noise ε
to m + s·ε, so every solver's error is computable. m is read from the conditions (mean of context +
mean of pooled), so the same flow also shows what the condition schedule does.
References: diffusers' FlowMatchEulerDiscreteScheduler (schedule), DPMSolverMultistepScheduler (the
2M update on our grid) and StableDiffusion3Pipeline (the Euler sampler end to end, with a tiny
random SD3Transformer2DModel, both called directly and loaded through model.load_mmdit).
"""

import importlib.util
from types import SimpleNamespace

import pytest
import torch

import sample as S

torch.set_num_threads(1)


class GaussianFlow:
    """Exact velocity of the N(0,1) → N(m, s²) rectified flow; m = mean(context) + mean(pooled) per sample."""

    def __init__(self, s=1.0):
        self.s, self.calls = s, []

    def mean(self, context, pooled):
        return (context.double().mean((1, 2)) + pooled.double().mean(1))[:, None, None, None]

    def __call__(self, x, sigma, context, pooled):
        self.calls.append((sigma.clone(), context.clone(), pooled.clone(), x.shape[0]))
        m, sg, x = self.mean(context, pooled), sigma.double()[:, None, None, None], x.double()
        var = (1 - sg) ** 2 * self.s ** 2 + sg ** 2
        return (-m + (sg - (1 - sg) * self.s ** 2) / var * (x - (1 - sg) * m)).float()


def _data(B, S_=3, D=8, Dp=5, hw=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, 16, hw, hw, generator=g), torch.randn(B, S_, D, generator=g),
            torch.randn(B, Dp, generator=g))


def _perturbed(P, K, zero=False, seed=1, S_=3, D=8, Dp=5):
    g = torch.Generator().manual_seed(seed)
    ctx = torch.randn(P, 1, S_, D, generator=g).repeat(1, K, 1, 1)
    pol = torch.randn(P, 1, Dp, generator=g).repeat(1, K, 1)
    if not zero:
        ctx[:, 1:] += 0.5 * torch.randn(P, K - 1, S_, D, generator=g)
        pol[:, 1:] += 0.5 * torch.randn(P, K - 1, Dp, generator=g)
    return SimpleNamespace(context=ctx, pooled=pol)


# ----------------------------------------------------------------------------- schedule

@pytest.mark.parametrize("n", [1, 2, 3, 10, 28, 40, 50])
def test_sigma_schedule_equals_diffusers(n):
    from diffusers import FlowMatchEulerDiscreteScheduler
    sch = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)   # SD3.5's scheduler config
    sch.set_timesteps(n)
    ours = S.sigma_schedule(n)
    assert ours.dtype == torch.float32 and ours.shape == (n + 1,)
    assert torch.equal(ours, sch.sigmas)
    assert torch.equal(ours[:-1] * 1000, sch.timesteps)
    assert ours[0] == 1.0 and ours[-1] == 0.0 and (ours.diff() < 0).all()


def test_sigma_schedule_bad_input():
    for bad in (0, -3, 2.5):
        with pytest.raises(ValueError, match="num_steps"):
            S.sigma_schedule(bad)


# ----------------------------------------------------------------------------- γ (Eq. 13)

def test_gamma_boundaries():
    rho = 0.4
    assert S.gamma(1.0, rho) == 1.0 and S.gamma(1 - rho, rho) == 0.0
    assert S.gamma(0.0, rho) == 0.0 and S.gamma(0.3, rho) == 0.0 and S.gamma(1.5, rho) == 1.0
    eps = 1e-9
    assert S.gamma(1 - rho - eps, rho) == 0.0
    assert S.gamma(1 - rho + eps, rho) == pytest.approx(eps / rho, rel=1e-6) and S.gamma(1 - rho + eps, rho) > 0
    assert S.gamma(1 - eps, rho) == pytest.approx(1 - eps / rho, abs=1e-12) and S.gamma(1 - eps, rho) < 1
    assert S.gamma(0.8, rho) == pytest.approx(0.5, abs=1e-15)
    # ρ = 1: γ(σ) = σ
    for s in (0.0, 0.25, 0.5, 0.999, 1.0):
        assert S.gamma(s, 1.0) == s
    # exact ends for many ρ, floats and float64 tensors alike
    for rho in torch.linspace(0.01, 1.0, 100).double().tolist():
        assert S.gamma(1.0, rho) == 1.0 and S.gamma(1.0 - rho, rho) == 0.0
        t = S.gamma(torch.tensor([1.0, 1.0 - rho, 1.0 - rho - 1e-6, 0.0], dtype=torch.float64), rho)
        assert t.tolist() == [1.0, 0.0, 0.0, 0.0]
    for bad in (0.0, -0.1, 1.01):
        with pytest.raises(ValueError, match="rho"):
            S.gamma(0.5, bad)


def test_condition_schedule_seen_by_the_model():
    """Each model call sees C_orig + γ(σ)(C_opt − C_orig): exactly C_opt at σ = 1, exactly C_orig for σ ≤ 1 − ρ."""
    noise, ctx, pol = _data(2)
    ctx_opt, pol_opt = ctx + 1.0, pol - 2.0
    f = GaussianFlow()
    S.sample(f, noise, ctx, pol, num_steps=10, solver="dpm2m", context_opt=ctx_opt, pooled_opt=pol_opt, rho=0.4)
    sig = S.sigma_schedule(10)
    assert len(f.calls) == 10
    n_mixed = 0
    for i, (sigma, c, p, _) in enumerate(f.calls):
        assert torch.equal(sigma, sig[i].expand(2))
        g = S.gamma(float(sig[i]), 0.4)
        if float(sig[i]) <= 0.6:
            assert torch.equal(c, ctx) and torch.equal(p, pol)
        elif g == 1.0:
            assert torch.equal(c, ctx_opt) and torch.equal(p, pol_opt)
        else:
            n_mixed += 1
            torch.testing.assert_close(c, ctx + g * (ctx_opt - ctx), rtol=0, atol=0)
            torch.testing.assert_close(p, pol + g * (pol_opt - pol), rtol=0, atol=0)
    assert n_mixed > 0
    # static ablation: C_opt at every call
    f = GaussianFlow()
    S.sample(f, noise, ctx, pol, num_steps=10, context_opt=ctx_opt, pooled_opt=pol_opt, schedule="static")
    assert all(torch.equal(c, ctx_opt) and torch.equal(p, pol_opt) for _, c, p, _ in f.calls)


# ----------------------------------------------------------------------------- solvers

def _errors(solver, steps, s=1.0):
    noise, ctx, pol = _data(16)
    f = GaussianFlow(s)
    exact = f.mean(ctx, pol) + s * noise.double()
    return [((S.sample(f, noise, ctx, pol, num_steps=n, solver=solver).double() - exact) ** 2).mean().sqrt().item()
            for n in steps]


def test_convergence_orders():
    """Euler is first order (error /2 when steps double), DPM-Solver++(2M) second order (/4)."""
    steps = (20, 40, 80)
    e_euler, e_dpm = _errors("euler", steps), _errors("dpm2m", steps)
    r_euler = [e_euler[i] / e_euler[i + 1] for i in range(2)]
    r_dpm = [e_dpm[i] / e_dpm[i + 1] for i in range(2)]
    print("euler errors", e_euler, "ratios", r_euler)
    print("dpm2m errors", e_dpm, "ratios", r_dpm)
    assert all(1.8 < r < 2.2 for r in r_euler), r_euler
    assert all(3.3 < r < 5.5 for r in r_dpm), r_dpm
    assert e_dpm[-1] < e_euler[-1] / 3


def test_dpm2m_equals_diffusers_multistep_on_our_grid():
    """diffusers' DPMSolverMultistepScheduler (dpmsolver++, order 2, flow_prediction, final σ 0) run on the SD3
    σ grid — DiffusionNFT's rollout solver."""
    from diffusers import DPMSolverMultistepScheduler
    noise, ctx, pol = _data(4)
    f = GaussianFlow(0.7)
    for n in (1, 2, 3, 10, 20):
        sch = DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0,
                                          solver_order=2, lower_order_final=True, final_sigmas_type="zero",
                                          algorithm_type="dpmsolver++")
        sch.set_timesteps(n)
        sig = S.sigma_schedule(n)
        sch.sigmas, sch.timesteps = sig.clone(), sig[:-1] * 1000
        x = noise.clone()
        for i in range(n):
            x = sch.step(f(x, sig[i].expand(4), ctx, pol), sch.timesteps[i], x).prev_sample
        ours = S.sample(f, noise, ctx, pol, num_steps=n, solver="dpm2m")
        assert not x.isnan().any()
        torch.testing.assert_close(ours, x, rtol=0, atol=1e-5)


def test_sde_eta0_is_euler_and_sde_keeps_the_marginal():
    noise, ctx, pol = _data(4)
    f = GaussianFlow(0.5)
    euler = S.sample(f, noise, ctx, pol, num_steps=12, solver="euler")
    assert torch.equal(S.sample(f, noise, ctx, pol, num_steps=12, solver="sde", eta=0.0), euler)
    # η = 0.7 (Flow-GRPO): different samples, same distribution N(m, s²) up to discretisation
    B = 2048
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(B, 1, 4, 4, generator=g)
    ctx, pol = torch.full((B, 1, 1), 0.5), torch.zeros(B, 1)
    sde = S.sample(f, noise, ctx, pol, num_steps=40, solver="sde", eta=0.7, generator=torch.Generator().manual_seed(1))
    ode = S.sample(f, noise, ctx, pol, num_steps=40, solver="euler")
    assert (sde - ode).abs().mean() > 0.1
    assert abs(sde.mean().item() - 0.5) < 0.01
    assert abs(sde.std().item() / 0.5 - 1) < 0.08
    again = S.sample(f, noise, ctx, pol, num_steps=40, solver="sde", eta=0.7, generator=torch.Generator().manual_seed(1))
    assert torch.equal(sde, again)


def test_cfg():
    """guidance 1: one forward of B per step; >1: one batched forward of 2B, v_u + w(v_c − v_u)."""
    noise, ctx, pol = _data(3)
    neg_ctx, neg_pol = torch.zeros(1, *ctx.shape[1:]), torch.zeros(1, pol.shape[1])
    f = GaussianFlow()
    S.sample(f, noise, ctx, pol, num_steps=4)
    assert [c[3] for c in f.calls] == [3] * 4
    f = GaussianFlow()
    x = S.sample(f, noise, ctx, pol, num_steps=4, guidance_scale=3.0, neg_context=neg_ctx, neg_pooled=neg_pol)
    assert [c[3] for c in f.calls] == [6] * 4
    ref = GaussianFlow()
    cfg = lambda x, s, c, p: ref(x, s, neg_ctx.expand_as(c), neg_pol.expand_as(p)) + 3.0 * (
        ref(x, s, c, p) - ref(x, s, neg_ctx.expand_as(c), neg_pol.expand_as(p)))
    torch.testing.assert_close(x, S.sample(cfg, noise, ctx, pol, num_steps=4), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="neg_context"):
        S.sample(f, noise, ctx, pol, guidance_scale=2.0)


def test_bad_arguments():
    noise, ctx, pol = _data(2)
    f = GaussianFlow()
    with pytest.raises(ValueError, match="solver"):
        S.sample(f, noise, ctx, pol, solver="heun")
    with pytest.raises(ValueError, match="schedule"):
        S.sample(f, noise, ctx, pol, schedule="linear")
    with pytest.raises(ValueError, match="rho"):
        S.sample(f, noise, ctx, pol, rho=0.0)
    with pytest.raises(ValueError, match="shapes"):
        S.sample(f, noise, ctx[:1], pol)
    with pytest.raises(ValueError, match="context_opt"):
        S.sample(f, noise, ctx, pol, context_opt=ctx[:, :1])
    with pytest.raises(ValueError, match="anchor"):
        S.sample_groups(f, None, _perturbed(1, 1), 2, latent_size=(4, 4), anchor=False)
    with pytest.raises(ValueError, match="perturbed"):
        S.sample_groups(f, None, SimpleNamespace(context=ctx, pooled=pol), 2, latent_size=(4, 4))


# ----------------------------------------------------------------------------- groups

def _plain(f, P_ctx, P_pol, noise, **kw):
    """sample() on one prompt's original condition, for the G noises of that prompt."""
    G = noise.shape[0]
    return S.sample(f, noise, P_ctx.expand(G, -1, -1), P_pol.expand(G, -1), **kw)


@pytest.mark.parametrize("solver", ["euler", "dpm2m", "sde"])
def test_group_k1_equals_plain_sampling(solver):
    P, G = (1 if solver == "sde" else 2), 3
    pert = _perturbed(P, 1)
    f = GaussianFlow()
    grp = S.sample_groups(f, None, pert, G, num_steps=6, solver=solver, micro_batch=2, latent_size=(4, 4),
                          generator=torch.Generator().manual_seed(7))
    assert grp.latents.shape == (P * G, 16, 4, 4) and grp.images is None
    gen = torch.Generator().manual_seed(7)
    noise = torch.randn((P, G, 16, 4, 4), generator=gen)
    for p in range(P):
        ref = _plain(f, pert.context[p, 0], pert.pooled[p, 0], noise[p], num_steps=6, solver=solver, generator=gen)
        assert torch.equal(grp.latents[p * G:(p + 1) * G], ref)
    assert grp.prompt_idx.tolist() == [p for p in range(P) for _ in range(G)]
    assert grp.variant.tolist() == [0] * (P * G) and grp.seed_idx.tolist() == list(range(G)) * P


@pytest.mark.parametrize("solver", ["dpm2m", "sde"])
def test_zero_perturbations_equal_plain_sampling(solver):
    P, K, G = 2, 3, 2
    pert = _perturbed(P, K, zero=True)
    f = GaussianFlow()
    grp = S.sample_groups(f, None, pert, G, num_steps=6, solver=solver, micro_batch=4, latent_size=(4, 4),
                          generator=torch.Generator().manual_seed(0))
    assert grp.latents.shape[0] == P * K * G
    noise = torch.randn((P, G, 16, 4, 4), generator=torch.Generator().manual_seed(0))
    for n in range(P * K * G):
        p, g = int(grp.prompt_idx[n]), int(grp.seed_idx[n])
        # every member equals the original member with the same noise (SDE: same step noise too)
        assert torch.equal(grp.latents[n], grp.latents[(p * K + 0) * G + g])
        if solver == "dpm2m":
            ref = _plain(f, pert.context[p, 0], pert.pooled[p, 0], noise[p, g:g + 1], num_steps=6, solver=solver)
            assert torch.equal(grp.latents[n:n + 1], ref)


def test_group_order_shared_noise_and_original_member_untouched():
    P, K, G = 2, 4, 3
    pert = _perturbed(P, K)
    f = GaussianFlow()
    kw = dict(num_steps=10, solver="dpm2m", latent_size=(4, 4), micro_batch=5)
    grp = S.sample_groups(f, None, pert, G, generator=torch.Generator().manual_seed(0), **kw)
    n = torch.arange(P * K * G)
    assert torch.equal(grp.prompt_idx, n // (K * G)) and torch.equal(grp.variant, (n // G) % K)
    assert torch.equal(grp.seed_idx, n % G)
    noise = torch.randn((P, G, 16, 4, 4), generator=torch.Generator().manual_seed(0))
    for p in range(P):
        # the original member is bit-identical to sampling the original prompt alone with the same noise
        ref = _plain(f, pert.context[p, 0], pert.pooled[p, 0], noise[p], num_steps=10, solver="dpm2m")
        assert torch.equal(grp.latents[(p * K) * G:(p * K + 1) * G], ref)
        for k in range(1, K):
            rows = slice((p * K + k) * G, (p * K + k + 1) * G)
            # each perturbed member = sample() with Eq. 13 from the same noises …
            ref_k = S.sample(f, noise[p], pert.context[p, 0].expand(G, -1, -1), pert.pooled[p, 0].expand(G, -1),
                             num_steps=10, solver="dpm2m", context_opt=pert.context[p, k].expand(G, -1, -1),
                             pooled_opt=pert.pooled[p, k].expand(G, -1))
            assert torch.equal(grp.latents[rows], ref_k)
            # … and the perturbation had an effect
            assert (grp.latents[rows] - ref).abs().max() > 1e-3
    # noise shared across k: with a condition-blind model all K members of a (p, g) coincide, g's differ
    blind = lambda x, s, c, p: GaussianFlow()(x, s, torch.zeros_like(c), torch.zeros_like(p))
    b = S.sample_groups(blind, None, pert, G, generator=torch.Generator().manual_seed(0), **kw).latents.view(P, K, G, -1)
    assert torch.equal(b, b[:, :1].expand_as(b)) and (b[:, :, 0] - b[:, :, 1]).abs().max() > 0.1


def test_group_ablations_and_determinism():
    P, K, G = 2, 3, 2
    pert = _perturbed(P, K)
    f = GaussianFlow()
    kw = dict(num_steps=8, solver="dpm2m", latent_size=(4, 4))
    full = S.sample_groups(f, None, pert, G, generator=torch.Generator().manual_seed(5), micro_batch=4, **kw)
    one = S.sample_groups(f, None, pert, G, generator=torch.Generator().manual_seed(5), micro_batch=1, **kw)
    assert torch.equal(full.latents, one.latents)              # micro-batching does not change samples
    # no anchor: the same members without k = 0
    na = S.sample_groups(f, None, pert, G, generator=torch.Generator().manual_seed(5), anchor=False, **kw)
    keep = full.variant != 0
    assert na.latents.shape[0] == P * (K - 1) * G and (na.variant != 0).all()
    assert torch.equal(na.latents, full.latents[keep]) and torch.equal(na.variant, full.variant[keep])
    assert torch.equal(na.prompt_idx, full.prompt_idx[keep]) and torch.equal(na.seed_idx, full.seed_idx[keep])
    # static: perturbed members differ from noise-aware ones, originals do not
    st = S.sample_groups(f, None, pert, G, generator=torch.Generator().manual_seed(5), schedule="static", **kw)
    orig = full.variant == 0
    assert torch.equal(st.latents[orig], full.latents[orig])
    assert (st.latents[~orig] - full.latents[~orig]).abs().max() > 1e-3
    # static = sampling each variant plainly with C_opt
    noise = torch.randn((P, G, 16, 4, 4), generator=torch.Generator().manual_seed(5))
    ref = S.sample(f, noise[1], pert.context[1, 2].expand(G, -1, -1), pert.pooled[1, 2].expand(G, -1),
                   num_steps=8, solver="dpm2m")
    assert torch.equal(st.latents[(1 * K + 2) * G:(1 * K + 3) * G], ref)


class _ToyVAE:
    def decode(self, latents, slice_size=None):
        return torch.sigmoid(latents[:, :3].repeat_interleave(8, -1).repeat_interleave(8, -2))


def test_group_decodes():
    pert = _perturbed(1, 2)
    grp = S.sample_groups(GaussianFlow(), _ToyVAE(), pert, 2, num_steps=3, latent_size=(4, 4), micro_batch=3)
    assert grp.images.shape == (4, 3, 32, 32) and 0 <= grp.images.min() and grp.images.max() <= 1
    assert S.sample_groups(GaussianFlow(), _ToyVAE(), pert, 2, num_steps=3, latent_size=(4, 4), decode=False).images is None


# ----------------------------------------------------------------------------- the real model (model.py)

def _model_lib():
    try:
        import model
        model.load_mmdit, model.add_lora, model.use_adapter
        return model
    except (ImportError, AttributeError):
        return None


TINY_SD3 = dict(sample_size=8, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=8, num_attention_heads=2,
                joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=24, out_channels=16,
                pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm")


def _tiny_pipeline(tmp_path):
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)
    torch.manual_seed(0)
    tr = SD3Transformer2DModel(**TINY_SD3).eval()
    with torch.no_grad():                      # zero-initialised output layers would make v ≡ 0: randomise all
        for prm in tr.parameters():
            prm.copy_(torch.randn_like(prm) * 0.3)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1,
                        latent_channels=16, norm_num_groups=4, scaling_factor=1.5305, shift_factor=0.0609)
    pipe = StableDiffusion3Pipeline(transformer=tr, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
                                    text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                    text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    tr.save_pretrained(tmp_path / "transformer")
    return pipe, tr


def _pipeline_latents(pipe, noise, ctx, pol, steps):
    return pipe(prompt_embeds=ctx, pooled_prompt_embeds=pol, latents=noise.clone(), guidance_scale=1.0,
                num_inference_steps=steps, output_type="latent", height=noise.shape[2] * 8,
                width=noise.shape[3] * 8).images


def test_euler_equals_diffusers_sd3_pipeline(tmp_path):
    """Our Euler sampler with diffusers' own transformer as the velocity model == StableDiffusion3Pipeline
    (guidance 1, output_type='latent', which returns the model-space latents, not unscaled)."""
    pipe, tr = _tiny_pipeline(tmp_path)
    noise, ctx, pol = _data(2, S_=5, D=32, Dp=24, hw=8)
    ref = _pipeline_latents(pipe, noise, ctx, pol, 8)
    v = lambda x, s, c, p: tr(hidden_states=x, timestep=s * 1000, encoder_hidden_states=c, pooled_projections=p).sample
    ours = S.sample(v, noise, ctx, pol, num_steps=8, solver="euler")
    assert (ref - noise).abs().max() > 0.1           # the model did something
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)


@pytest.mark.skipif(_model_lib() is None, reason="model.py (load_mmdit / add_lora / use_adapter) not available yet")
def test_euler_with_load_mmdit_equals_diffusers_sd3_pipeline(tmp_path):
    model = _model_lib()
    pipe, tr = _tiny_pipeline(tmp_path)
    mmdit = model.load_mmdit(tmp_path / "transformer")
    noise, ctx, pol = _data(2, S_=5, D=32, Dp=24, hw=8)
    ref = _pipeline_latents(pipe, noise, ctx, pol, 8)
    ours = S.sample(mmdit, noise, ctx, pol, num_steps=8, solver="euler")
    err = (ours - ref).abs().max().item()
    print(f"max |ours - diffusers pipeline| = {err:.2e} (latent scale {ref.abs().max().item():.2f})")
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


@pytest.mark.skipif(_model_lib() is None, reason="model.py (load_mmdit / add_lora / use_adapter) not available yet")
def test_group_sampling_uses_the_named_adapter(tmp_path):
    model = _model_lib()
    _, _ = _tiny_pipeline(tmp_path)
    mmdit = model.load_mmdit(tmp_path / "transformer")
    model.add_lora(mmdit, rank=2, alpha=4, adapter="old", seed=0)
    model.add_lora(mmdit, rank=2, alpha=4, adapter="policy", seed=1)
    with torch.no_grad():
        for prm in model.lora_parameters(mmdit, "old"):
            prm.add_(0.2 * torch.randn_like(prm))
    g = torch.Generator().manual_seed(1)
    pert = SimpleNamespace(context=torch.randn(1, 2, 5, 32, generator=g), pooled=torch.randn(1, 2, 24, generator=g))
    kw = dict(num_steps=3, latent_size=(8, 8), micro_batch=4)
    model.set_adapter(mmdit, "policy")
    old = S.sample_groups(mmdit, None, pert, 2, adapter="old", generator=torch.Generator().manual_seed(0), **kw)
    assert model.active_adapter(mmdit) == "policy"                # restored afterwards
    model.set_adapter(mmdit, "old")
    ref = S.sample_groups(mmdit, None, pert, 2, adapter=None, generator=torch.Generator().manual_seed(0), **kw)
    model.set_adapter(mmdit, None)
    base = S.sample_groups(mmdit, None, pert, 2, adapter=None, generator=torch.Generator().manual_seed(0), **kw)
    torch.testing.assert_close(old.latents, ref.latents, rtol=0, atol=1e-6)
    assert (old.latents - base.latents).abs().max() > 1e-4
    with pytest.raises(ValueError, match="adapter"):
        S.sample_groups(mmdit, None, pert, 2, adapter="nope", **kw)


def _tiny_root(root):
    """A random tiny SD3 pipeline root (transformer/, vae/, text_encoder{,_2}/, tokenizer{,_2}/) for the CLI."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer
    from data.shapes import world
    model = _model_lib()
    torch.manual_seed(0)
    world.write_clip_tokenizer(root / "tokenizer")
    world.write_clip_tokenizer(root / "tokenizer_2", pad_token="!")
    tok = CLIPTokenizer.from_pretrained(root / "tokenizer")
    for name, hid in (("text_encoder", 32), ("text_encoder_2", 64)):
        cfg = CLIPTextConfig(vocab_size=len(tok), hidden_size=hid, intermediate_size=2 * hid, num_hidden_layers=1,
                             num_attention_heads=2, projection_dim=hid, max_position_embeddings=77,
                             bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        CLIPTextModelWithProjection(cfg).save_pretrained(root / name)
    dit = model.MMDiT(model.MMDiTConfig(hidden_size=32, depth=2, num_heads=2, context_dim=128, pooled_dim=96,
                                        pos_embed_max_size=8, qk_norm=True, dual_attention_layers=(0,)))
    with torch.no_grad():
        for prm in dit.parameters():
            prm.copy_(torch.randn_like(prm) * 0.05)
    model.save_diffusers(dit, root / "transformer", sample_size=4)
    model.save_diffusers(model.VAE(block_out_channels=(32, 32), latent_channels=16), root / "vae")


@pytest.mark.skipif(_model_lib() is None or importlib.util.find_spec("perturb") is None,
                    reason="model.py / perturb.py not available yet")
def test_cli_writes_images(tmp_path):
    from PIL import Image
    try:
        _tiny_root(tmp_path / "root")
    except (ImportError, AttributeError) as e:
        pytest.skip(f"cannot build a tiny pipeline root here: {e}")
    out = tmp_path / "out"
    S.main(["--prompt", "a red circle", "--weights", str(tmp_path / "root"), "--num_images", "2", "--steps", "3",
            "--num_variants", "2", "--out", str(out), "--solver", "dpm2m"])
    names = sorted(p.name for p in out.iterdir())
    assert names == ["grid.png", "k0_g0.png", "k0_g1.png", "k1_g0.png", "k1_g1.png"]
    assert Image.open(out / "k0_g0.png").size == (8, 8)             # native size: sample_size 4 × VAE factor 2
    assert Image.open(out / "grid.png").size == (16, 16)            # 2 variants side by side, 2 noises
    with pytest.raises(FileNotFoundError, match="weights"):
        S.main(["--prompt", "x", "--weights", str(tmp_path / "missing")])
    with pytest.raises(ValueError, match="prompt"):
        S.main(["--prompt", "  ", "--weights", str(tmp_path / "root")])


@pytest.mark.skipif(_model_lib() is None, reason="model.py not available yet")
def test_caller_autocast(tmp_path):
    """The sampler runs inside the caller's autocast: float32 latents out, close to the float32 run."""
    model = _model_lib()
    _tiny_pipeline(tmp_path)
    mmdit = model.load_mmdit(tmp_path / "transformer")
    g = torch.Generator().manual_seed(1)
    pert = SimpleNamespace(context=torch.randn(1, 2, 5, 32, generator=g), pooled=torch.randn(1, 2, 24, generator=g))
    kw = dict(num_steps=3, latent_size=(8, 8), adapter=None)
    ref = S.sample_groups(mmdit, None, pert, 2, generator=torch.Generator().manual_seed(0), **kw).latents
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = S.sample_groups(mmdit, None, pert, 2, generator=torch.Generator().manual_seed(0), **kw).latents
    assert low.dtype == torch.float32 and not torch.equal(low, ref)
    assert (low - ref).abs().max() < 0.05 * ref.abs().max()
