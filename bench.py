"""
bench.py: our hand-written SD3.5 stack against the reference implementations (diffusers + peft), side by side,
in one process, as ratios (reference time / our time: above 1 means we are faster).

    python bench.py                                   # the default world's model on CPU (about a minute)
    python bench.py --size sd35m                      # SD3.5-Medium config, random weights: CPU forward at batch 1
    python bench.py --size sd35m --device cuda        # GPU: fp16, 512², realistic batches, MFU and peak memory
    python bench.py --out bench.md                    # also write the table (with machine / date / command)
    python bench.py --compile                         # torch.compile both sides (same treatment)
    python bench.py --model /tmp/model_fast.py        # measure a candidate model.py (imported as `model`)

Rows (each the median of several repeats after warm-up; ours and the reference interleaved, alternating which
goes first, so drift and neighbours' load hit both sides alike):
- MMDiT forward           ours MMDiT vs diffusers SD3Transformer2DModel, no LoRA, no grad.
- NFT step                DiffusionNFT's training step: the old-adapter and reference (LoRA off) no-grad forwards,
                          the policy forward, the NFT loss and its backward into the LoRA (rank 32, alpha 64, targets
                          image + context q/k/v/out). Ours: model.add_lora + copy_adapter, switched with
                          use_adapter; when model.set_adapter accepts one adapter per batch chunk
                          (set_adapter(m, ("old", None))), old and reference run as ONE forward of the doubled batch
                          (valid: MMDiT rows are independent; a plain concatenation under one adapter would not be).
                          Reference: peft adapters "policy" and "old" on the diffusers model, switched with
                          set_adapter and disable_adapters()/enable_adapters(), as DiffusionNFT does.
- Flow-GRPO step vs NFT   train.py's two objectives on ours at the same batch, one training timestep each (both train
                          on 9 of 10 steps per sample, so per step is per sample): Flow-GRPO's reference (LoRA off,
                          no grad) and policy forwards, sde_step's log-prob and mean, grpo_loss and its backward,
                          against the NFT step above (the "reference" column here is the NFT step: ratio > 1 means
                          Flow-GRPO is cheaper). A second row runs Flow-GRPO with CFG (guidance 4.5, every forward on
                          the doubled batch [uncond, cond]), as Flow-GRPO trains SD3.5 and as DiffusionNFT, which
                          needs no CFG, compares itself with it; train.py runs Flow-GRPO without CFG (the first row).
                          On CUDA the peak-memory columns compare the two steps too.
- rollout per image       10 Euler steps with the "old" adapter: sample.sample on ours vs a plain loop over
                          diffusers' FlowMatchEulerDiscreteScheduler (shift 3) on the peft model; time / batch.
- VAE decode              model.VAE.decode vs diffusers AutoencoderKL.decode (+ the same unscale and [0,1] map).
- Δ optimisation          perturb.learn_perturbations, K = 12, 300 steps: seconds per prompt for 1 prompt and for a
                          batch. There is no reference implementation: absolute time only.

Weights are identical on both sides: the default size builds the diffusers models with random weights,
save_pretrained()s them and loads ours from that folder with model.load_mmdit / load_vae (or uses
data/shapes/sd3_tiny when it exists); the SD3.5-M size builds ours with random weights and gives diffusers' modules
*views* of the same tensors (no second copy: 2.2B parameters twice would not fit next to other work), then checks
that the outputs agree. Every row asserts that ours and the reference compute the same thing before timing it.

CPU runs use 1 torch thread unless --threads says otherwise: on shared cores more threads oversubscribe and made
every timing ~3x slower and noisy here. SD3.5-M on CPU runs in bfloat16 by default (this CPU's bf16 matmuls are ~5x
its fp32 ones, and one bf16 copy of the weights is 4.4 GiB), batch 1, 512², context 77 + 256 tokens: ~11 s a forward.
On CUDA: fp16 weights, LoRA in fp32 under fp16 autocast and the loss scaled by GradScaler's initial 2^16 before
its backward (as train.py), model FLOPs utilisation from an analytic FLOP count (every matmul + QKᵀ and AV; equal to
torch's FlopCounterMode, see test_e2po.py; the backward of the frozen base counted as one forward, since no weight
gradients are taken) and torch.cuda.max_memory_allocated per side.
The default size feeds random (context 24 = 16 CLIP + 8 T5 tokens, pooled) inputs, as the world's model sees them.

What the CPU tuning found (torch.profiler on the SD3.5-M forward; over 90 % of its time is the same matmuls and
attention kernel on both sides, and these took the ratio from 0.98 to 1.03):
- the feed-forward runs in 256-token chunks under no_grad on CPU (model.MLP_CHUNK): the 4x-wide hidden activation
  stays cache-sized and comes from the heap, not from a fresh 12 MB allocation whose page faults cost as much as
  the GELU;
- the qk RMSNorm scales q and k in their own dtype (a float32 statistic from vector_norm, no float32 copy of q);
- the tanh-GELU's cubic is a single addcmul.
Measured tables, with their commands and dates, are in RESULTS.md.
"""

import argparse
import contextlib
import datetime
import gc
import importlib.util
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

# ----------------------------------------------------------------------------------------------------------------
# settings

TINY_MMDIT = dict(hidden_size=128, depth=4, num_heads=2, context_dim=256, pooled_dim=192, pos_embed_max_size=16,
                  qk_norm=True, dual_attention_layers=(0, 1))         # data/shapes/pretrain.py's MMDIT
TINY_VAE = (32, 32, 64)                                              # data/shapes/pretrain.py's VAE_CHANNELS (4x)
TINY_WEIGHTS = HERE / "data" / "shapes" / "sd3_tiny"
LORA_RANK, LORA_ALPHA = 32, 64
NFT_TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",                # DiffusionNFT's peft targets
               "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"]
ROLLOUT_STEPS = 10
NUM_VARIANTS, DELTA_STEPS = 12, 300
ROWS = ("forward", "nft", "grpo", "rollout", "vae", "delta")
# per size and device: batch, latent side (h = w), context tokens, repeats, which rows
SIZES = {
    ("default", "cpu"): dict(batch=8, latent=16, context=24, repeats=30, warmup=3,     # the world: 64 px / 4x VAE
                             rows=("forward", "nft", "grpo", "rollout", "vae", "delta"), delta_batch=8),
    ("sd35m", "cpu"): dict(batch=1, latent=64, context=77 + 256, repeats=5, warmup=1, rows=("forward",)),
    ("default", "cuda"): dict(batch=32, latent=16, context=24, repeats=20, warmup=5,
                              rows=("forward", "nft", "grpo", "rollout", "vae", "delta"), delta_batch=8),
    ("sd35m", "cuda"): dict(batch=8, latent=64, context=77 + 256, repeats=10, warmup=3,
                            rows=("forward", "nft", "grpo", "rollout", "vae", "delta"), delta_batch=8),
}
# dense fp16/bf16 tensor-core peak (no sparsity), by substring of the device name, in TFLOP/s
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0,
               "RTX 4090": 165.0, "A6000": 155.0}

# ----------------------------------------------------------------------------------------------------------------
# imports: `model` may be a candidate file (--model) so that sample.py / perturb.py use it too


def import_project(model_path=None):
    if model_path:
        spec = importlib.util.spec_from_file_location("model", model_path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules["model"] = mod
        spec.loader.exec_module(mod)
    import model
    return model


def text_stack():
    from model import TextEncoders, load_text_encoders
    return TextEncoders, load_text_encoders


def nft_loss_fn():
    """train.nft_loss, the objective itself (its loss value only)."""
    from train import nft_loss
    return lambda *a: nft_loss(*a)[0]

# ----------------------------------------------------------------------------------------------------------------
# timing


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compare(ours, ref, repeats, warmup, device):
    """Median seconds of ours() and ref(), interleaved (ABBA order) after `warmup` calls of each."""
    for _ in range(warmup):
        ours(), ref()
    times = {ours: [], ref: []}
    for i in range(repeats):
        for fn in ((ours, ref) if i % 2 == 0 else (ref, ours)):
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            times[fn].append(time.perf_counter() - t)
    return statistics.median(times[ours]), statistics.median(times[ref])


def peak_memory(fn, device):
    """Peak allocated bytes during one call of fn (CUDA only), above what was allocated before."""
    if device.type != "cuda":
        return None
    gc.collect()
    torch.cuda.empty_cache()
    sync(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    sync(device)
    return torch.cuda.max_memory_allocated(device) - base


def backward_grads(ctx, loss, params):
    """Backward of loss scaled by ctx.loss_scale (as train.py's GradScaler under fp16); the params' gradients,
    unscaled (None where a param got none), taken off the params so the next call starts from zero."""
    (loss * ctx.loss_scale).backward()
    grads = [None if p.grad is None else p.grad / ctx.loss_scale for p in params]
    for p in params:
        p.grad = None
    return grads


def check_close(name, ours, ref, tol):
    """Relative max-abs agreement of two outputs (tensors or lists of tensors); AssertionError names the row."""
    ours = ours if isinstance(ours, (list, tuple)) else [ours]
    ref = ref if isinstance(ref, (list, tuple)) else [ref]
    for a, b in zip(ours, ref):
        a, b = a.detach().float(), b.detach().float()
        err = (a - b).abs().max().item() / max(b.abs().max().item(), 1e-6)
        if not err <= tol:
            raise AssertionError(f"{name}: ours and the reference disagree (relative max error {err:.2e} > {tol})")

# ----------------------------------------------------------------------------------------------------------------
# FLOPs (analytic, multiply-add = 2 FLOPs)


def mmdit_flops(cfg, batch, h, w, context_len):
    """Forward FLOPs of the MMDiT on (batch, C, h, w) latents and context_len tokens: every Linear/conv matmul and
    the attention products (QKᵀ and AV); norms, activations and softmax are ignored."""
    D, p = cfg.hidden_size, cfg.patch_size
    n, s = (h // p) * (w // p), context_len
    L, mlp = n + s, int(round(D * cfg.mlp_ratio))
    macs = n * cfg.in_channels * p * p * D + s * cfg.context_dim * D             # patch embed, context embed
    macs += cfg.timestep_dim * D + D * D + cfg.pooled_dim * D + D * D            # t and y embedders
    for i in range(cfg.depth):
        last, dual = i == cfg.depth - 1, i in cfg.dual_attention_layers
        macs += D * D * ((2 if last else 6) + (9 if dual else 6))                # adaLN modulations
        macs += s * 3 * D * D + (0 if last else s * (D * D + 2 * D * mlp))       # context stream
        macs += n * (4 * D * D + 2 * D * mlp)                                    # image stream
        macs += 2 * L * L * D                                                    # joint attention
        if dual:
            macs += n * 4 * D * D + 2 * n * n * D                                # attn2 (image only)
    macs += 2 * D * D + n * D * p * p * cfg.out_channels                         # final layer
    return 2 * batch * macs


def lora_flops(cfg, batch, h, w, context_len, rank):
    """Extra forward FLOPs of the LoRA on the NFT targets (x and context q/k/v/out)."""
    D, n, s = cfg.hidden_size, (h // cfg.patch_size) * (w // cfg.patch_size), context_len
    per_layer = lambda tokens, pairs: tokens * pairs * 2 * rank * D
    macs = sum(per_layer(n, 4) + per_layer(s, 3 if i == cfg.depth - 1 else 4) for i in range(cfg.depth))
    return 2 * batch * macs

# ----------------------------------------------------------------------------------------------------------------
# models with identical weights on both sides


@torch.no_grad()
def randomize_(module, seed, std=0.05):
    g = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.copy_((torch.randn(p.shape, generator=g) * std).to(p.dtype))
    return module


def tiny_mmdit_pair(model, device, dtype, weights=TINY_WEIGHTS):
    """(ours, diffusers) for the default world: the pipeline root `weights` (data/shapes/sd3_tiny) if present, else
    random weights written by diffusers' save_pretrained and read back by model.load_mmdit."""
    from diffusers import SD3Transformer2DModel
    if (weights / "transformer").is_dir():
        folder, source = weights / "transformer", str(weights)
    else:
        _, config = model.mmdit_to_diffusers(model.MMDiT(model.MMDiTConfig(**TINY_MMDIT)).state_dict())
        config.pop("_class_name")
        folder = Path(tempfile.mkdtemp(prefix="bench_mmdit_"))
        randomize_(SD3Transformer2DModel(**config), 0).save_pretrained(folder)
        source = "random weights"
    ref = SD3Transformer2DModel.from_pretrained(folder, torch_dtype=dtype).to(device).eval().requires_grad_(False)
    ours = model.load_mmdit(folder, dtype=dtype, device=device)
    return ours, ref, source


def sd35m_pair(model, device, dtype):
    """(ours, diffusers) at the SD3.5-M config with random weights; diffusers' parameters are views of ours (the
    fused qkv split into to_q/to_k/to_v rows), so there is one copy of the weights. adaLN and the output layer get
    small random values instead of DiT's zero init, so every block does something."""
    from diffusers import SD3Transformer2DModel
    cfg = model.SD35_MEDIUM
    with torch.device("meta"):
        ours = model.MMDiT(cfg)
    ours = ours.to(dtype).to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            fan_in = p[0].numel() if p.ndim > 1 else p.numel()
            std = 0.02 if ("adaLN" in name or "final_layer" in name or p.ndim == 1) else fan_in ** -0.5
            p.normal_(0.0, std, generator=g)
            if name.endswith("ln_q.weight") or name.endswith("ln_k.weight"):
                p.fill_(1.0)
        ours.pos_embed.copy_(model.sincos_pos_embed_2d(cfg.hidden_size, cfg.pos_embed_max_size)[None])
    ours.requires_grad_(False).eval()
    dsd, config = model.mmdit_to_diffusers(ours.state_dict())
    config.pop("_class_name")
    with torch.device("meta"):
        ref = SD3Transformer2DModel(**config)
    ref.load_state_dict(dsd, strict=True, assign=True)
    leftover = [n for n, t in list(ref.named_parameters()) + list(ref.named_buffers()) if t.is_meta]
    if leftover:
        raise RuntimeError(f"diffusers tensors not covered by the shared state dict: {leftover[:5]}")
    return ours, ref.eval().requires_grad_(False), "random weights (diffusers shares our tensors)"


def vae_pair(model, device, dtype, channels, weights=TINY_WEIGHTS):
    from diffusers import AutoencoderKL
    if channels == TINY_VAE and (weights / "vae").is_dir():
        folder = weights / "vae"
    else:
        _, config = model.vae_to_diffusers(model.VAE(channels).state_dict())
        config.pop("_class_name")
        folder = Path(tempfile.mkdtemp(prefix="bench_vae_"))
        randomize_(AutoencoderKL(**config), 1, std=0.02).save_pretrained(folder)
    ref = AutoencoderKL.from_pretrained(folder, torch_dtype=dtype).to(device).eval().requires_grad_(False)
    return model.load_vae(folder, dtype=dtype, device=device), ref


def add_loras(model, ours, ref):
    """Same LoRA on both sides: ours policy + old (old = policy + noise), peft "policy" + "old" with our values."""
    from peft import LoraConfig
    model.add_lora(ours, rank=LORA_RANK, alpha=LORA_ALPHA, adapter="policy", seed=0)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():   # B = 0 would make policy == old == ref; give B values so the three forwards differ
        for p in model.lora_parameters(ours, "policy")[1::2]:
            p.copy_(torch.randn(p.shape, generator=g) * 0.01)
        model.copy_adapter(ours, "policy", "old")
        for p in model.lora_parameters(ours, "old")[1::2]:
            p.add_(torch.randn(p.shape, generator=g).to(p) * 0.002)
    config = LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, init_lora_weights="gaussian", target_modules=NFT_TARGETS)
    with warnings.catch_warnings():   # peft warns that a second adapter is "multiple adapters": that is the point
        warnings.simplefilter("ignore")
        for name in ("policy", "old"):
            ref.add_adapter(config, adapter_name=name)
    ref_modules = dict(ref.named_modules())
    with torch.no_grad():
        for adapter in ("policy", "old"):
            for key, t in model.lora_state_dict(ours, adapter).items():
                layer, part = key.rsplit(".", 1)
                targets = model.mmdit_module_to_diffusers(layer)
                for j, target in enumerate(targets):
                    m = ref_modules[target]
                    if part == "lora_A":
                        m.lora_A[adapter].weight.copy_(t[j * LORA_RANK:(j + 1) * LORA_RANK])
                    else:
                        m.lora_B[adapter].weight.copy_(t[j])
    for n, p in ref.named_parameters():   # fp32 LoRA master weights on both sides (ours: add_lora's default)
        if ".lora_" in n:
            p.data = p.data.float()
    ref.set_adapter("policy")
    model.set_adapter(ours, "policy")
    for p in model.lora_parameters(ours, "policy"):
        p.requires_grad_(True)
    return [(n, p) for n, p in ref.named_parameters() if ".policy." in n]

# ----------------------------------------------------------------------------------------------------------------
# rows


def ref_call(ref, x, sigma, context, pooled):
    return ref(hidden_states=x, timestep=sigma * 1000, encoder_hidden_states=context, pooled_projections=pooled,
               return_dict=False)[0]


def inputs(cfg, batch, latent, context_len, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, latent, latent, generator=g)
    sigma = torch.rand(batch, generator=g) * 0.9 + 0.05
    context = torch.randn(batch, context_len, cfg.context_dim, generator=g)
    pooled = torch.randn(batch, cfg.pooled_dim, generator=g)
    x0 = torch.randn(batch, cfg.in_channels, latent, latent, generator=g)
    r = torch.rand(batch, generator=g)
    to = lambda t: t.to(device=device, dtype=dtype)
    return to(x), sigma.to(device), to(context), to(pooled), to(x0), r.to(device)


def row_forward(ctx, ours, ref):
    x, sigma, context, pooled, _, _ = ctx.inp
    f_ours = torch.no_grad()(lambda: ctx.run(ours)(x, sigma, context, pooled))
    f_ref = torch.no_grad()(lambda: ctx.run(ref)(x, sigma, context, pooled))
    with ctx.amp():
        check_close("MMDiT forward", f_ours(), f_ref(), ctx.tol)
    return dict(name=f"MMDiT forward (batch {len(x)})", fns=(f_ours, f_ref), flops=ctx.fwd_flops)


def nft_inputs(ctx):
    """(x_σ, σ, context, pooled, x0, r) of the NFT and Flow-GRPO rows."""
    x0, r = ctx.inp[4], ctx.inp[5]
    x, sigma, context, pooled = ctx.inp[:4]
    x_sigma = (1 - sigma.view(-1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1) * x    # x plays ε
    return x_sigma, sigma, context, pooled, x0, r


def ours_nft_step(ctx, model, ours):
    """train.py's NFT step on ours: v_old and v_ref without grad (one forward of the doubled batch when model.py
    allows one adapter per batch chunk), v_θ with grad, the loss, its backward. Returns (batched, step function)."""
    x_sigma, sigma, context, pooled, x0, r = nft_inputs(ctx)
    loss_fn, policy = nft_loss_fn(), model.lora_parameters(ours, "policy")
    f_ours_model = ctx.run(ours)
    batched = row_adapters(model, ours)
    two = lambda t: torch.cat([t, t])

    def ours_step():
        with ctx.amp():
            with torch.no_grad():
                if batched:   # one forward of the doubled batch: rows [0, B) with "old", [B, 2B) with LoRA off
                    with model.use_adapter(ours, ("old", None)):
                        v_old, v_ref = f_ours_model(two(x_sigma), two(sigma), two(context), two(pooled)).chunk(2)
                else:
                    with model.use_adapter(ours, "old"):
                        v_old = f_ours_model(x_sigma, sigma, context, pooled)
                    with model.use_adapter(ours, None):
                        v_ref = f_ours_model(x_sigma, sigma, context, pooled)
            with model.use_adapter(ours, "policy"):
                v = f_ours_model(x_sigma, sigma, context, pooled)
            loss = loss_fn(v, v_old, v_ref, x_sigma, x0, sigma, r)
        return loss.detach(), v_old, v_ref, v, backward_grads(ctx, loss, policy)
    return batched, ours_step


def row_nft(ctx, model, ours, ref, ref_params):
    """The DiffusionNFT step of train.py: v_old and v_ref without grad, v_θ with grad, loss, backward."""
    x_sigma, sigma, context, pooled, x0, r = nft_inputs(ctx)
    loss_fn = nft_loss_fn()
    f_ref_model = ctx.run(ref)
    batched, ours_step = ours_nft_step(ctx, model, ours)

    def ref_step():
        with ctx.amp():
            with torch.no_grad():
                ref.set_adapter("old")
                v_old = f_ref_model(x_sigma, sigma, context, pooled)
                ref.disable_adapters()
                v_ref = f_ref_model(x_sigma, sigma, context, pooled)
                ref.enable_adapters()
            ref.set_adapter("policy")
            v = f_ref_model(x_sigma, sigma, context, pooled)
            loss = loss_fn(v, v_old, v_ref, x_sigma, x0, sigma, r)
        return loss.detach(), v_old, v_ref, v, backward_grads(ctx, loss, [p for _, p in ref_params])

    a, b = ours_step(), ref_step()
    check_close("NFT step (loss, v_old, v_ref, v_θ)", list(a[:4]), list(b[:4]), ctx.tol)
    # gradients: our fused-qkv B (3, d, r) holds peft's to_q / to_k / to_v lora_B; compare them all, by name
    names = [k for k in model.lora_state_dict(ours, "policy")]
    ref_grad = dict(zip([n for n, _ in ref_params], b[4]))
    for key, g in zip(names, a[4]):
        layer, part = key.rsplit(".", 1)
        if part != "lora_B":
            continue
        theirs = [ref_grad[f"{t}.lora_B.policy.weight"] for t in model.mmdit_module_to_diffusers(layer)]
        check_close(f"NFT step (grad of {key})", g.reshape(-1, g.shape[-1]), torch.cat(theirs), 20 * ctx.tol)
    flops = 4 * ctx.fwd_flops + 3 * ctx.lora_flops   # old, ref, policy forwards + backward of inputs (frozen base)
    how = "old+ref in one forward" if batched else "old, ref"
    return dict(name=f"NFT step: {how}, policy fwd+bwd (batch {len(x_sigma)})", fns=(ours_step, ref_step), flops=flops)


def row_grpo(ctx, model, ours, guidance=1.0):
    """train.py's Flow-GRPO step on ours against its NFT step, at the same batch: v_ref (LoRA off, no grad) and v_θ
    (grad), sde_step's log-prob of a fixed next state and the step means, grpo_loss (β 0.04, ε 1e-4) and its
    backward. guidance > 1: every forward takes the doubled batch [uncond, cond] (uncond: zero conditions)."""
    import sample
    from train import grpo_loss
    x_sigma, sigma, context, pooled, _, r = nft_inputs(ctx)
    sigma_next, eta, policy = sigma * 0.9, 0.7, model.lora_parameters(ours, "policy")
    f = ctx.run(ours)
    adv = (2 * r - 1).float()
    cfg = guidance > 1
    uncond = (torch.zeros_like(context), torch.zeros_like(pooled))

    def velocity():
        if not cfg:
            return f(x_sigma, sigma, context, pooled)
        two = lambda t: torch.cat([t, t])
        v_u, v_c = f(two(x_sigma), two(sigma), torch.cat([uncond[0], context]),
                     torch.cat([uncond[1], pooled])).float().chunk(2)
        return v_u + guidance * (v_c - v_u)

    with torch.no_grad(), ctx.amp(), model.use_adapter(ours, "policy"):     # the rollout's next state and log-prob
        noise = torch.randn(x_sigma.shape, generator=torch.Generator().manual_seed(5)).to(x_sigma.device)
        prev, old_lp, _, _ = sample.sde_step(x_sigma, velocity(), sigma, sigma_next, eta, noise=noise)

    def grpo_step():
        with ctx.amp():
            with torch.no_grad(), model.use_adapter(ours, None):
                v_ref = velocity()
            with model.use_adapter(ours, "policy"):
                v = velocity()
            _, log_prob, mean, s_t = sample.sde_step(x_sigma, v, sigma, sigma_next, eta, prev_sample=prev)
            mean_ref = sample.sde_step(x_sigma, v_ref, sigma, sigma_next, eta, prev_sample=prev)[2]
            loss, _ = grpo_loss(log_prob, old_lp, adv, 1e-4, 5.0, mean, mean_ref, s_t, 0.04)
            loss = loss.mean()
        return loss.detach(), backward_grads(ctx, loss, policy)

    _, nft_step = ours_nft_step(ctx, model, ours)
    loss, grads = grpo_step()
    if not (torch.isfinite(loss) and all(g is not None and torch.isfinite(g).all() for g in grads)
            and any(g.abs().sum() > 0 for g in grads)):
        raise AssertionError("Flow-GRPO step: non-finite loss or no gradient")
    n = 2 if cfg else 1
    flops = n * (3 * ctx.fwd_flops + 3 * ctx.lora_flops)   # reference and policy forwards + backward of inputs
    how = f"with CFG {guidance:g} (2× batch per forward)" if cfg else "no CFG (train.py)"
    return dict(name=f"Flow-GRPO step, {how}, vs the NFT step (batch {len(x_sigma)}; reference column = NFT)",
                fns=(grpo_step, nft_step), flops=flops)


def row_adapters(model, module):
    """Whether this model.py accepts one adapter per batch chunk (set_adapter(m, ("old", None)))."""
    try:
        with model.use_adapter(module, ("old", None)):
            return True
    except (ValueError, TypeError):
        return False


def row_rollout(ctx, model, ours, ref):
    import sample
    from diffusers import FlowMatchEulerDiscreteScheduler
    x, _, context, pooled, _, _ = ctx.inp
    noise = x.float()
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    f_ours_model, f_ref_model = ctx.run(ours), ctx.run(ref)

    @torch.no_grad()
    def ours_rollout():
        with ctx.amp(), model.use_adapter(ours, "old"):
            return sample.sample(f_ours_model, noise, context, pooled, num_steps=ROLLOUT_STEPS, solver="euler")

    @torch.no_grad()
    def ref_rollout():   # diffusers' StableDiffusion3Pipeline denoising loop at guidance 1
        with ctx.amp():
            ref.set_adapter("old")
            sched.set_timesteps(ROLLOUT_STEPS, device=noise.device)
            latents = noise.to(ctx.dtype)
            for t in sched.timesteps:
                v = f_ref_model(latents, t.expand(len(latents)) / 1000, context, pooled)
                latents = sched.step(v, t, latents, return_dict=False)[0]
            ref.set_adapter("policy")
            return latents

    check_close("rollout", ours_rollout(), ref_rollout(), 5 * ctx.tol)
    B = len(x)
    return dict(name=f"rollout per image ({ROLLOUT_STEPS} Euler steps, batch {B}, adapter old)",
                fns=(ours_rollout, ref_rollout), per=B,
                flops=ROLLOUT_STEPS * (ctx.fwd_flops + ctx.lora_flops) / B)


def row_vae(ctx, model, channels, batch, latent):
    ours, ref = vae_pair(model, ctx.device, ctx.dtype, channels, ctx.weights)
    g = torch.Generator().manual_seed(3)
    z = torch.randn(batch, 16, latent, latent, generator=g).to(ctx.device, ctx.dtype)
    scale, shift = model.VAE_SCALE, model.VAE_SHIFT

    @torch.no_grad()
    def ours_decode():
        return ours.decode(z)

    @torch.no_grad()
    def ref_decode():
        return (ref.decode(z / scale + shift, return_dict=False)[0] / 2 + 0.5).clamp(0, 1)

    check_close("VAE decode", ours_decode(), ref_decode(), ctx.tol)
    return dict(name=f"VAE decode per image ({8 * latent}², batch {batch})", fns=(ours_decode, ref_decode),
                per=batch)


def tiny_text_encoders(device, dtype, real_size=False, weights=TINY_WEIGHTS):
    """CLIP-L/G towers: data/shapes/sd3_tiny's when present; else random towers with the world's tokenizer, at the
    world's widths or (real_size) at SD3's CLIP-L / CLIP-G widths. 77 positions (the text stack pads to 77)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer
    TextEncoders, load_text_encoders = text_stack()
    if not real_size and (weights / "text_encoder").is_dir():
        return load_text_encoders(str(weights), dtype=dtype, device=device, t5=False)
    from data.shapes import world
    root = Path(tempfile.mkdtemp(prefix="bench_text_"))
    toks, towers = [], []
    for name, pad in (("tokenizer", world.EOS), ("tokenizer_2", "!")):
        world.write_clip_tokenizer(root / name, pad_token=pad)
        toks.append(CLIPTokenizer.from_pretrained(root / name))
    vocab = json.loads((root / "tokenizer" / "vocab.json").read_text())
    if real_size:
        specs = (dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                      projection_dim=768, hidden_act="quick_gelu"),
                 dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                      projection_dim=1280, hidden_act="gelu"))
        t5_len, joint = 256, 4096
    else:
        specs = (dict(hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=1,
                      projection_dim=64, hidden_act="quick_gelu"),
                 dict(hidden_size=128, intermediate_size=512, num_hidden_layers=3, num_attention_heads=2,
                      projection_dim=128, hidden_act="gelu"))
        t5_len, joint = 8, 256
    torch.manual_seed(0)
    for spec in specs:
        cfg = CLIPTextConfig(vocab_size=len(vocab), max_position_embeddings=77, bos_token_id=vocab[world.BOS],
                             eos_token_id=vocab[world.EOS], pad_token_id=1, **spec)
        towers.append(CLIPTextModelWithProjection(cfg).to(dtype))
    shutil.rmtree(root, ignore_errors=True)
    return TextEncoders(*towers, *toks, max_sequence_length=t5_len, joint_dim=joint).to(device)


def row_delta(ctx, batch, real_size):
    """Absolute seconds per prompt of Phase I (no reference implementation exists)."""
    import perturb
    from data.shapes import world
    te = tiny_text_encoders(ctx.device, ctx.dtype if ctx.device.type == "cuda" else torch.float32, real_size,
                            ctx.weights)
    prompts = [m["prompt"] for m in world.load_prompts("train")[:batch]]
    rows = []
    for P in (1, batch):
        def run(P=P):
            return perturb.learn_perturbations(te, prompts[:P], num_variants=NUM_VARIANTS, steps=DELTA_STEPS)
        run()   # warm-up
        times = []
        for _ in range(ctx.delta_repeats):
            sync(ctx.device)
            t = time.perf_counter()
            run()
            sync(ctx.device)
            times.append(time.perf_counter() - t)
        rows.append(dict(name=f"Δ optimisation per prompt (K={NUM_VARIANTS}, {DELTA_STEPS} steps, {P} prompt"
                              f"{'s' if P > 1 else ''} at once)", ours=statistics.median(times) / P))
        print(f"  {rows[-1]['name']}: {rows[-1]['ours']:.3f} s", flush=True)
    return rows

# ----------------------------------------------------------------------------------------------------------------
# entry point


class Ctx:
    pass


def fmt_ms(s):
    return "—" if s is None else (f"{s * 1e3:.2f}" if s < 10 else f"{s * 1e3:.0f}")


def machine_line(device):
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    line = f"{cpu}, {os.cpu_count()} cores ({torch.get_num_threads()} torch threads)"
    if device.type == "cuda":
        line = f"{torch.cuda.get_device_name(device)} + " + line
    return f"{line}; torch {torch.__version__}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--size", choices=("default", "sd35m"), default="default")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None,
                    help="default: float32 (default size, CPU), bfloat16 (sd35m CPU), float16 (CUDA)")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--resolution", type=int, default=None, help="image side in pixels (latent = side / the VAE factor: the world 4, SD3.5 8)")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--rows", default=None, help="comma list of forward,nft,grpo,rollout,vae,delta")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (CPU default: 1)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the MMDiT on both sides")
    ap.add_argument("--model", default=None, help="a candidate model.py to import as `model`")
    ap.add_argument("--weights", default=None, help=f"default size: pipeline root (default {TINY_WEIGHTS}, "
                                                     "random weights when absent)")
    ap.add_argument("--peak_tflops", type=float, default=None, help="GPU peak for MFU (default: by device name)")
    ap.add_argument("--out", default=None, help="write the markdown table here too")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but torch.cuda.is_available() is False")
    if device.type not in ("cpu", "cuda"):
        ap.error(f"--device must be cpu or cuda, got {args.device}")
    if device.type == "cpu" or args.threads:   # CPU default 1 thread: on shared cores, 2+ threads oversubscribe and
        torch.set_num_threads(args.threads or 1)   # turn timings into noise (3x slower here); --threads N to change
    setting = dict(SIZES[(args.size, device.type)])
    for key in ("batch", "repeats"):
        if getattr(args, key):
            setting[key] = getattr(args, key)
    if args.resolution:
        factor = 2 ** (len(TINY_VAE) - 1) if args.size == "default" else 8      # the world's VAE is 4x, SD3.5's 8x
        if args.resolution % (2 * factor):
            ap.error(f"--resolution must be a multiple of {2 * factor} (VAE factor {factor} × patch 2)")
        setting["latent"] = args.resolution // factor
    rows_wanted = tuple(args.rows.split(",")) if args.rows else setting["rows"]
    unknown = set(rows_wanted) - set(ROWS)
    if unknown:
        ap.error(f"--rows: unknown {sorted(unknown)}; choose from {','.join(ROWS)}")
    dtype = getattr(torch, args.dtype) if args.dtype else \
        (torch.float16 if device.type == "cuda" else torch.bfloat16 if args.size == "sd35m" else torch.float32)
    t_start = time.time()
    model = import_project(args.model)
    torch.manual_seed(0)

    ctx = Ctx()
    ctx.device, ctx.dtype, ctx.weights = device, dtype, Path(args.weights) if args.weights else TINY_WEIGHTS
    if args.weights and not (ctx.weights / "transformer").is_dir():
        ap.error(f"--weights {args.weights}: no transformer/ folder there (expected a pipeline root)")
    ctx.tol = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}[dtype]
    ctx.delta_repeats = 3 if device.type == "cuda" else 1
    # CUDA: fp16 weights, fp32 LoRA, fp16 autocast (as train.py); CPU: everything in `dtype`, no autocast
    amp = device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
    # fp16 backward: the loss scaled as train.py's GradScaler scales it (its initial 2^16; fp16 gradients of the
    # early layers underflow without it), gradients unscaled before they are compared. 1 for other dtypes.
    ctx.loss_scale = torch.amp.GradScaler("cuda").get_scale() if amp and dtype == torch.float16 else 1.0
    ctx.amp = (lambda: torch.autocast("cuda", dtype=dtype)) if amp else contextlib.nullcontext
    compiled = {}

    def run(m):
        """The callable for module m: ours takes (x, σ, context, pooled); diffusers gets the same arguments."""
        if id(m) not in compiled:
            f = m if isinstance(m, model.MMDiT) else (lambda *a, m=m: ref_call(m, *a))
            compiled[id(m)] = torch.compile(f) if args.compile else f
        return compiled[id(m)]
    ctx.run = run

    B, lat, S = setting["batch"], setting["latent"], setting["context"]
    print(f"bench: size {args.size}, device {device}, dtype {str(dtype).replace('torch.', '')}, batch {B}, "
          f"latents {lat}x{lat}, context {S} tokens, repeats {setting['repeats']}", flush=True)
    results = []

    def attempt(label, fn, measure_setting=None):
        """Run one row; a failure (e.g. an out-of-memory on a smaller GPU) becomes a table line, not a crash."""
        try:
            row = fn()
            if measure_setting is not None:
                measure(row, measure_setting, device)
            results.append(row)
        except (AssertionError, RuntimeError, ValueError) as e:
            print(f"  {label}: FAILED: {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)
            results.append(dict(name=f"{label}: failed ({type(e).__name__})", ours=None, ref=None))
            if device.type == "cuda":
                torch.cuda.empty_cache()

    if any(r in rows_wanted for r in ("forward", "nft", "grpo", "rollout")):
        ours, ref, source = sd35m_pair(model, device, dtype) if args.size == "sd35m" else \
            tiny_mmdit_pair(model, device, dtype, ctx.weights)
        cfg = ours.cfg
        print(f"MMDiT: {sum(p.numel() for p in ours.parameters()) / 1e6:.1f}M parameters, {source}", flush=True)
        ctx.inp = inputs(cfg, B, lat, S, device, dtype)
        ctx.fwd_flops = mmdit_flops(cfg, B, lat, lat, S)
        ctx.lora_flops = lora_flops(cfg, B, lat, lat, S, LORA_RANK)
        if "forward" in rows_wanted:
            attempt("MMDiT forward", lambda: row_forward(ctx, ours, ref), setting)
        if any(r in rows_wanted for r in ("nft", "grpo", "rollout")):
            ref_params = add_loras(model, ours, ref)
            if "nft" in rows_wanted:
                ours.train(), ref.train()
                attempt("NFT step", lambda: row_nft(ctx, model, ours, ref, ref_params), setting)
                ours.eval(), ref.eval()
            if "grpo" in rows_wanted:
                ours.train()
                for guidance in (1.0, 4.5):
                    attempt("Flow-GRPO step", lambda g=guidance: row_grpo(ctx, model, ours, g), setting)
                ours.eval()
            if "rollout" in rows_wanted:
                attempt("rollout", lambda: row_rollout(ctx, model, ours, ref),
                        dict(setting, repeats=max(3, setting["repeats"] // 3), warmup=max(1, setting["warmup"] // 2)))
        del ours, ref, ctx.inp
        compiled.clear()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if "vae" in rows_wanted:
        channels = TINY_VAE if args.size == "default" else (128, 256, 512, 512)
        attempt("VAE decode", lambda: row_vae(ctx, model, channels, min(B, 8), lat), setting)
    if "delta" in rows_wanted:
        def delta_rows():
            rows = row_delta(ctx, setting.get("delta_batch", 8), args.size == "sd35m")
            for r in rows[:-1]:
                results.append(r)
            return rows[-1]
        attempt("Δ optimisation", delta_rows)

    header = [f"# bench.py: ours vs diffusers {version('diffusers')} + peft {version('peft')}",
              "",
              f"- date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
              f"- machine: {machine_line(device)}",
              f"- command: `python {' '.join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:]))}`",
              f"- size {args.size}, dtype {str(dtype).replace('torch.', '')}, batch {B}, latents {lat}x{lat} "
              f"({8 * lat}² images), context {S} tokens{', torch.compile' if args.compile else ''}; "
              f"median of {setting['repeats']} interleaved repeats; total {time.time() - t_start:.0f} s",
              ""]
    gpu = device.type == "cuda"
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if gpu and k in torch.cuda.get_device_name()),
                                    None)
    cols = ["row", "ours ms", "reference ms", "ratio (ref/ours)"]
    if gpu:
        cols += ["ours TFLOP/s", "ours MFU", "ref MFU", "ours peak MiB", "ref peak MiB"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in results:
        o, f = r["ours"], r.get("ref")
        ratio = f"{f / o:.2f}" if f and o else ("—" if o is None else "— (no reference)")
        cells = [r["name"], fmt_ms(o), fmt_ms(f), ratio]
        if gpu:
            fl = r.get("flops")
            tf = lambda s: fl / s / 1e12 if fl and s else None   # per-image flops / per-image time
            mfu = lambda s: f"{100 * tf(s) / peak:.1f}%" if peak and tf(s) else "—"
            mib = lambda b: f"{b / 2 ** 20:.0f}" if b is not None else "—"
            cells += [f"{tf(o):.1f}" if tf(o) else "—", mfu(o), mfu(f), mib(r.get("mem_ours")),
                      mib(r.get("mem_ref"))]
        lines.append("| " + " | ".join(cells) + " |")
    if gpu and not peak:
        lines += ["", "MFU: unknown peak for this GPU; pass --peak_tflops."]
    text = "\n".join(header + lines) + "\n"
    print("\n" + text)
    if args.out:
        Path(args.out).write_text(text)
    return 1 if any(r["ours"] is None for r in results) else 0


def version(pkg):
    try:
        return __import__(pkg).__version__
    except Exception:
        return "?"


def measure(row, setting, device):
    f_ours, f_ref = row.pop("fns")
    t_ours, t_ref = compare(f_ours, f_ref, setting["repeats"], setting["warmup"], device)
    per = row.get("per", 1)
    row["ours"], row["ref"] = t_ours / per, t_ref / per
    row["mem_ours"], row["mem_ref"] = peak_memory(f_ours, device), peak_memory(f_ref, device)
    print(f"  {row['name']}: ours {fmt_ms(row['ours'])} ms, reference {fmt_ms(row['ref'])} ms, "
          f"ratio {t_ref / t_ours:.2f}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
