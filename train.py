"""
E²PO training: Algorithm 1 of the paper with DiffusionNFT's objective, on one process or under torchrun.

    python train.py                                        # the shapes world, CPU, minutes
    python train.py --max_steps=2 --out_dir=out-test       # a smoke run
    python train.py config/geneval_k4.py --weights=/models/stable-diffusion-3.5-medium
    torchrun --nproc_per_node=8 train.py config/geneval_k12.py --weights=/models/sd3.5m
    torchrun --nnodes=2 --node_rank=0 --master_addr=HOST --nproc_per_node=8 train.py config/pickscore_k3.py ...
    python train.py --method=flow_grpo --num_variants=1 --num_seeds=8      # Flow-GRPO on the world
    python train.py --method=e_grpo --num_variants=1 --num_seeds=4 --egrpo_branch_steps=2 --global_std=False
    torchrun --nproc_per_node=8 train.py config/flow_grpo_geneval.py ...   # (also e_grpo_geneval, e_grpo_pickscore)

Settings are the constants below; `config/*.py` files and `--key=value` override them (configurator.py;
unknown keys and wrong types are errors). Each iteration (`step`; for nft one optimizer step):

  1. Phase I   learn the K−1 CLIP-L perturbations Δ of every prompt of this rank (perturb.py)
  2. rollouts  G noises × K conditions per prompt with the "old" adapter under the noise-aware
               schedule (sample.py); rewards (reward.py) run in a background thread while the next
               prompt samples
  3. advantages  rewards all-gathered; A = (R − group mean)/(std + 1e-4) with the std over the whole
               gathered batch (global_std) or per group; clip ±A_max; r = clip(A/A_max/2 + 1/2, 0, 1)
  4. NFT update  on C_orig only, over a random fraction of the sampler's own σ grid per sample:
               v_old (adapter "old"), v_θ ("policy"), v_ref (LoRA off) → nft_loss; one AdamW step
  5. old ← d·old + (1 − d)·θ (decay_type), EMA of θ into adapter "ema" (never written over θ)

Methods (`method`). Phase I, rollouts one prompt at a time with keyed noise, rewards, advantages, logging,
checkpoints, DDP and the presets are shared; only the rollout sampler, what is stored per step and the loss differ
(METHOD_PHASES: a sampler and an update phase per method).
- "nft": the above. E²PO is nft with K > 1; DiffusionNFT is nft with K = 1.
- "flow_grpo" (yifan123/flow_grpo, sd3_sde_with_logprob.py and scripts/train_sd3.py): on-policy rollouts with the
  policy adapter itself (there is no "old" adapter) by the SDE of sample.sde_step (η = sde_eta) on every step but
  the last, keeping the trajectory and each step's log-prob; training on the first int(T · timestep_fraction) steps
  (9 of 10). Per transition: ratio = exp(log p_θ − log p_old), A = (R − group mean)/(std + 1e-4) clipped ±A_max,
  policy = max(−A·ratio, −A·clip(ratio, 1 ± ε)), KL = mean_CHW((mean_θ − mean_ref)²)/(2 s_t²) to the LoRA-off
  reference, loss = mean(policy) + β·mean(KL) over the kept transitions of the global batch (grpo_loss, grpo_update).
  Samples whose advantage is zero are dropped. grpo_updates = 2 takes two optimizer steps per iteration as
  Flow-GRPO's SD3.5 presets do, each on one half of every group; the first is on-policy, so its ratio is exactly 1.
  Flow-GRPO-Fast: sde_window = w SDE steps at a keyed random start within sde_window_range, Euler elsewhere, trained
  on those w steps only.
- "e_grpo" (arXiv 2601.00423; the paper is the specification, its released code does not run): the entropy of an
  SDE step σ → σ' with std s_t·√(σ − σ') is h = d/2·log(2πe·a²·σ/(1 − σ)·(σ − σ')), a = sde_eta. From step 0,
  steps whose entropy is below τ are merged with the following ones into one step σ_i → σ_{i+l}, l the smallest
  count that reaches τ (sample.merge_plan; starts within the first int(T · timestep_fraction) steps). For every
  such active step, G = num_seeds branches share the prompt's ODE (Euler) prefix to σ_i, take the merged SDE step
  (sde_step from σ_i to σ_{i+l}: mean from the velocity at σ_i, std s_t·√(σ_i − σ_{i+l})) and finish by Euler
  (sample.sample_branches). Groups are (prompt, active step): advantages are normalised within them (the presets
  set global_std=False: mean and std per group), and the loss is Flow-GRPO's on the merged step's log-prob ratio.
  The G branches of a group leave one branch point, so one policy forward serves all G log-probs.
  The reading of τ: the paper writes e^h ∝ the variance term, so τ's units are a choice. Here τ is compared with
  the entropy power per dimension, e^(2h/d) = 2πe·a²·σ/(1 − σ)·Δσ (equivalently h/d ≥ ½·log τ nats): it does not
  grow with the latent size, and at τ = 2.2, a = 0.7 and SD3's shift-3 grid of 16 steps it keeps steps 0-4 single
  (2πe·a²·σ/(1 − σ)·Δσ = 8.4, 9.0, 4.6, 3.1, 2.4) and merges 5+6 and 7+8 (the paper's first 8 steps): the plan
  [(0,1), (1,1), (2,1), (3,1), (4,1), (5,2), (7,2)]. Compared with h itself (d = 16·64·64 at 512²) every step
  would pass; compared with h/d in nats (2πe·var ≥ e^4.4 ≈ 81) none would, and the first active step would merge
  all the way to the last step (from σ = 1 the merged variance stays a², whatever l): one active step, no
  exploration at the others. egrpo_branch_steps = n branches only n of the active steps per prompt (keyed), to fit
  a sample budget.
- E²PO's variants with a GRPO objective (grpo_variants=True; off by default: a GRPO method then runs with
  num_variants = 1, whatever the setting, which validate_config prints and config.json records): the groups are
  E²PO's (K' conditions × G noises under Eq. 13, per prompt or per (prompt, step)) and the update conditions on
  C_orig only, as E²PO's does. The variants then act as an exploration policy: the ratio compares θ and θ_old
  both under C_orig on transitions drawn under C_k(σ), with no importance weight for that change of condition, so
  the update is not an unbiased policy gradient of the C_orig policy (it pulls C_orig towards what the
  better-scoring variants drew). It needs grpo_updates = 1: the old log-prob under C_orig is the policy's own only
  before the first step.

Outputs (rank 0): out_dir/config.json, log.jsonl (one line per step), ckpt.pt (atomic), groups/*.png
(one rollout group: rows = variants, columns = seeds, each tile captioned with its reward), samples/*.png (held-out
prompts, EMA weights, captioned with prompt and score, the held-out score in the title), curves.png,
lora_policy.safetensors / lora_ema.safetensors (diffusers-loadable); the last lines printed are the held-out table
before → after, per GenEval tag.

out_dir (check_out_dir; the judgement calls). Every check runs before any model loads; `python train.py` prints a
user error as one line and exits 2 (configurator.user_errors), while train() raises it. Then rank 0 creates out_dir and
takes an exclusive fcntl.flock on out_dir/.lock (writing its pid there) before it looks inside or writes anything,
and holds it to the end: a second run into the same out_dir is refused at once, naming that pid. The OS drops the
lock when the process ends, however it ends (SIGKILL included), so a stale .lock never blocks; the file stays (deleting
it would let two runs lock two different files). flock needs a filesystem that supports it (local disks; NFS emulates
it). A folder is a run when it holds ckpt.pt, the final LoRA files, or a log.jsonl with a completed step. A run
killed before its first completed step leaves config.json and an empty log (or only the step-0 evaluation): not a
run, so a new run starts there (and replaces them), and --resume=True starts there from step 0; both say so. A run
with completed steps but no checkpoint yet (save_every) is refused either way: nothing to resume, and its log is
kept. resume=True into a folder with nothing at all is an error (a mistyped out_dir).

Divergence. sde_eta has an upper bound on the grid the run samples (sample.max_stable_eta): an SDE step multiplies
the latent by 1 − η²·Δσ/(2(1 − σ)) in its mean, so past η = 2·√((1 − σ)/Δσ) (2 at σ = 1; 1.85 on the 10-step
grid, where the second step binds) every step amplifies it and the rollouts diverge; validate_config checks it on the
steps each method takes (Flow-GRPO's or its window's, E-GRPO's merged steps, nft's train_solver = "sde"). It
is the explicit Euler stability bound of the discretisation: the continuous SDE has none, and below it a rollout can
still diverge for other reasons (a diverged policy, a float16 overflow). So every rollout is also checked
(check_finite): latents that are not finite or beyond ±LATENT_LIMIT, images or rewards that are not finite stop the run
with the likely cause, where it would otherwise log NaN losses, zero rewards and no update, and exit 0.

Distributed: no DDP wrapper. Only the policy LoRA trains; the base is frozen and the "old"/"ema"
adapters never get gradients, so after the last micro-step the policy gradients are averaged over
ranks in one flat all-reduce (= DDP with no_sync on every micro-step but the last, without a wrapper
that would need find_unused_parameters for three adapters sharing one base, and without `.module`
everywhere the sampler and the trainer call the model). The all-reduce runs before GradScaler's
unscale_, so an inf on any rank makes every rank skip the step. Every random draw (prompt order,
rollout noise, training timesteps and noise) comes from a CPU generator keyed by (seed, step, global
prompt/sample index), and perturb.py seeds Δ by (seed of the step, prompt), so 1, 2 or 8 ranks with the same global batch compute the same update
(up to float summation order), and a resumed run repeats exactly what an uninterrupted one does.
The global batch is prompts_per_step · K · G samples (E-GRPO: × the active steps branched); each rank takes
prompts_per_step / world_size prompts and accumulates over (its samples / train_micro_batch, at least 1) ·
int(train_sample_steps · timestep_fraction) micro-steps; validate_config asserts that everything divides. The GRPO
methods micro-batch their kept transitions and all-reduce once per optimizer step (grpo_updates per iteration), each
rank's loss scaled by world_size / the global count of kept transitions. Several nodes: every rank reads the
weights, prompts and (on resume) out_dir/ckpt.pt, so they must be on storage all nodes see.

Where this departs from the paper / DiffusionNFT's code
- One optimizer step per iteration over the whole buffer (paper Table 3: grad accumulation per epoch 1);
  the loss is averaged over every sample and training timestep of the global batch.
- Rollouts run one prompt group at a time (noise keyed by the prompt's global slot), so the result does
  not depend on the rank layout and each group's reward overlaps the next group's sampling.
- Groups are formed by prompt slot, not by prompt string: a prompt drawn twice in one step is two groups.
- v_old and v_ref are computed for all training timesteps of a micro-batch in batched no-grad forwards
  (chunks of rollout_micro_batch, old and reference in one forward of the doubled batch) before the n_t
  policy forwards; v_ref is skipped when kl_beta = 0.
- The old adapter decays with the number of optimizer steps taken (= DiffusionNFT's global_step), as
  does the EMA warm-up.
- dtype applies on CPU too (torch autocasts and scales there), so the CPU tests run the mixed-precision path a GPU
  runs; the world defaults to float32, the SD3.5 presets to float16 autocast over float32 MMDiT weights.

Where the GRPO methods depart from Flow-GRPO's code (scripts/train_sd3.py, config/grpo.py) and the E-GRPO paper
- No CFG: rollouts and training run at guidance 1 (Flow-GRPO's geneval_sd3/pickscore_sd3 sample and train with CFG
  4.5; its *_fast_nocfg presets, DiffusionNFT and E²PO run without). bench.py measures what CFG would cost.
- The last sampling step (σ_{T−1} → 0) is deterministic (sample.py), so no noise is left in the image; Flow-GRPO
  injects noise there too (and never trains on that step either).
- The first update's old log-prob is the policy's own, detached (θ = θ_old then): the ratio is exactly 1 instead of
  1 up to the float noise between the rollout's and the training forward (logged as logprob_gap); later updates
  use the rollout's log-probs, as the reference does for all.
- Zero-advantage samples are dropped without the reference's random re-admission of some of them (which only
  made the count divisible by its number of batches); the loss is averaged over the kept transitions.
- The updates' halves are keyed per group (grpo_chunks), not a shuffle of each rank's samples, so 1 or N ranks
  compute the same steps; the EMA (decay 0.9, warm-up as for nft) updates once per iteration, not every 8 steps.
- (Not a departure) the KL divides by 2·s_t² (std_dev_t, without dt), as the reference code does.
- Flow-GRPO-Fast: only the "sde" step type (the reference's Fast presets use its "cps" type; its clip range 1e-5
  and β = 0 are settings), and the window is drawn per prompt, not per sampling batch.
- E-GRPO: Euler for the ODE prefix and suffix; the branch noise of a step is shared across E²PO's K variants
  (like the initial noise); a merge never reaches the final step; egrpo_branch_steps is ours (0 = the paper's all).
"""

import fcntl
import hashlib
import importlib
import json
import math
import os
import random
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw
from tqdm import tqdm

import model as M
import perturb
import reward as R
import sample
from configurator import configure, user_errors

# -----------------------------------------------------------------------------
# default config: the shapes world (config/shapes.py repeats these values)
# I/O
out_dir = "out"
resume = False              # continue from out_dir/ckpt.pt (a new run refuses an out_dir that holds one)
resume_override = False     # resume even where settings that define the run (K, G, reward, seed, ...) changed
eval_every = 40             # evaluate held-out prompts every N steps (0 = never)
save_every = 20             # checkpoint every N steps (and at the end)
log_images_every = 20       # save one rollout group as a grid every N steps (0 = never)
grid_prompts = 8            # held-out prompts shown in samples/*.png
wandb_log = False           # only if wandb is installed
wandb_project = "e2po"
wandb_run_name = ""
# model and data
weights = ""                # pipeline root or single-file checkpoint; "" = the shapes world (data/shapes/sd3_tiny)
text_encoders = ""          # pipeline root holding text_encoder*/tokenizer*; "" = weights (or its folder)
use_t5 = False              # SD3.5 uses T5-XXL; the shapes world has no T5
max_sequence_length = 0     # T5 tokens; 0 = the pipeline's own (its e2po.json: the world's 8 zeros), else 256
train_prompts = "data/shapes/train.jsonl"   # GenEval-format jsonl (key "prompt") or .txt, one prompt a line
balance_tags = True         # draw each GenEval tag equally often (the world's train split is 83 % color_attr); False, or
                            # prompts without tags: uniform over prompts (Flow-GRPO's and DiffusionNFT's GenEval runs)
eval_prompts = "data/shapes/test.jsonl"
eval_num_prompts = 0        # first N held-out prompts (0 = all)
eval_num_images = 16        # images per held-out prompt (noise keyed by prompt and image, not by seed; RESULTS.md)
reward = "shapes"           # "name" or "name:weight,name:weight" (reward.py); the world: GenEval's partial score, the
                            # paper's training reward ("shapes_soft": averaged over detection thresholds, denser)
reward_paths = {}           # local model folders, e.g. {"pickscore": "/models/PickScore_v1"}
reward_module = "data.shapes.world"   # imported first: registers rewards of its own (the world's shapes, shapes_soft)
eval_reward = "shapes"      # reward for evaluation ("" = reward); GenEval strict is logged per tag and as the tag mean
# method: "nft" = DiffusionNFT's objective (E²PO when num_variants > 1), "flow_grpo", "e_grpo" (the docstring)
method = "nft"
# E²PO groups
num_variants = 4            # K: the original prompt + K−1 perturbed variants
num_seeds = 2               # G: noises per variant (shared across variants, Eq. 8)
prompts_per_step = 8        # global number of prompt groups per iteration
anchor = True               # reference-anchored batching: C_orig is a member of the group
schedule = "noise_aware"    # Eq. 13; "static" = γ ≡ 1
rho = 0.4                   # perturbation range ρ
# Phase I: embedding perturbation (Eq. 9-12)
emb_steps = 50              # T_emb (paper and the SD3.5 presets: 300; on the world ‖δ‖max binds within 50)
emb_lr = 1e-3               # α_emb
sigma_init = 1e-4
delta_max = 0.04            # ‖δ‖max (paper 0.05 for SD3.5's CLIP-L; 0.04 puts the world's variants near cos μ)
lambda_div = 50.0
mu = 0.8                    # anchor target
anchor_margin = 0.01        # ε
perturb_encoders = ("clip_l",)
# sampling
train_sample_steps = 10
train_solver = "dpm2m"
eval_sample_steps = 20      # paper: 40 (the SD3.5 presets); 20 keeps the world's evaluations cheap
eval_solver = "euler"
resolution = 0              # pixels; 0 = the pipeline's native size (sample_size × VAE factor: the world's 64)
# LoRA
lora_rank = 32
lora_alpha = 64.0
# optimisation (DiffusionNFT objective)
learning_rate = 1e-3        # the world: 40 steps must move the policy (paper, SD3.5 presets: 3e-4)
weight_decay = 1e-4
beta1 = 0.9
beta2 = 0.999
adam_eps = 1e-8
grad_clip = 1.0             # max gradient norm; 0 = no clipping (the norm is still logged)
nft_beta = 1.0              # β: v± = v_old ± β(v_θ − v_old)
kl_beta = 1e-4              # β_kl, KL to the reference (LoRA off)
adv_clip_max = 5.0          # A_max
global_std = True           # advantage std over the whole gathered batch (else per group)
timestep_fraction = 0.99    # train on int(steps·fraction) of the sampler's σ grid per sample: 9 of 10 (DiffusionNFT)
decay_type = 1              # old adapter: 0 = copy θ, 1 = min(0.001·s, 0.5), 2 = 0 until 75 then min(0.0075·(s−75), 0.999)
# Flow-GRPO and E-GRPO (method="flow_grpo" / "e_grpo"); they share the optimizer, LoRA, EMA, grad_clip, adv_clip_max,
# global_std, train_sample_steps and timestep_fraction above, and ignore nft_beta, kl_beta, decay_type, train_solver
sde_eta = 0.7               # η, the SDE's noise level (Flow-GRPO's noise_level, E-GRPO's a); also train_solver="sde"
grpo_clip_range = 1e-4      # PPO clip ε on the log-prob ratio
grpo_kl_beta = 0.04         # β of the KL to the reference (LoRA off) on the step means (Flow-GRPO: GenEval 0.04,
                            # PickScore 0.01)
grpo_updates = 1            # optimizer steps per iteration, step u on the u-th slice of every group (Flow-GRPO: 2)
grpo_variants = False       # E²PO's variants with a GRPO method (the docstring says what that means); False: K → 1
sde_window = 0              # Flow-GRPO-Fast: w > 0 = only a window of w consecutive SDE steps (the rest Euler), trained
sde_window_range = (0, 5)   # ... the window lies in steps [lo, hi): start uniform in [lo, hi − w] (Fast: (0, T/2))
egrpo_tau = 2.2             # E-GRPO's entropy threshold τ on 2πe·a²·σ/(1 − σ)·Δσ, per dimension (the docstring)
egrpo_branch_steps = 0      # active steps branched per prompt and iteration (0 = every active step of the plan)
use_ema = True
ema_decay = 0.9
max_steps = 40              # the world: ≤ 10 min on 2 CPU cores
# system
device = ""                 # "" = cuda if available else cpu
dtype = "float32"           # compute: float32, or autocast float16 (with a GradScaler) / bfloat16, on GPU and CPU
mmdit_dtype = "float32"     # frozen MMDiT weights under autocast: float32 master weights, as DiffusionNFT (a float32
                            # residual stream); float16 / bfloat16 halve its memory. VAE and text encoders use dtype
grad_checkpointing = False
rollout_micro_batch = 64    # samples per no-grad forward: sampler (one group at most), v_old/v_ref, evaluation
train_micro_batch = 64      # samples per training forward (accumulated to the full batch). On the world's 2 cores,
                            # 64 and 64 instead of 8 and 4: update 2.6 → 1.3 s a step, start-up + one evaluation 21 → 16 s
max_skipped_steps = 10      # abort after this many consecutive non-finite steps
seed = 42
# -----------------------------------------------------------------------------
CONFIG_KEYS = [k for k, v in globals().items()
               if not k.startswith("_") and isinstance(v, (bool, int, float, str, tuple, list, dict))]

REPO = os.path.dirname(os.path.abspath(__file__))
ADV_EPS = 1e-4              # DiffusionNFT: (R − mean) / (std + 1e-4)
LATENT_LIMIT = 1e4          # rollout latents beyond this are a diverged sampler (model-space latents are O(1): the
                            # VAE's scaling makes them unit-variance, the noise starts at N(0, 1)); check_finite stops
ZERO_ADV = 1e-8             # GRPO drops samples with |A| at most this (a group of equal rewards: 0 up to rounding)
GRPO_METHODS = ("flow_grpo", "e_grpo")
METHODS = ("nft",) + GRPO_METHODS


def config_defaults():
    """The constants above as a dict (what configurator.configure starts from)."""
    return {k: globals()[k] for k in CONFIG_KEYS}


# -----------------------------------------------------------------------------
# the objective (pure functions)

def nft_loss(v_theta, v_old, v_ref, x_sigma, x0, sigma, r, beta=1.0, adv_clip_max=5.0, kl_beta=1e-4):
    """DiffusionNFT's loss (DESIGN.md §5) for one micro-batch at one σ per sample.
    v_theta carries the gradient; v_old, v_ref (may be None when kl_beta == 0) do not.
    x_sigma, x0: (B,C,h,w); sigma, r: (B,). Returns (loss, dict of detached terms)."""
    v_theta, v_old, x_sigma, x0 = v_theta.float(), v_old.float(), x_sigma.float(), x0.float()
    s = sigma.float().view(-1, *([1] * (x0.ndim - 1)))
    r = r.float()
    dims = tuple(range(1, x0.ndim))
    v_pos = (1 - beta) * v_old + beta * v_theta      # implicit positive policy
    v_neg = (1 + beta) * v_old - beta * v_theta      # implicit negative policy
    x_pos = x_sigma - s * v_pos
    x_neg = x_sigma - s * v_neg

    def normalised_mse(x):  # mean((x − x0)²) / sg(mean|x − x0|), per sample
        err = x - x0
        scale = err.detach().abs().mean(dims).clamp(min=1e-5)
        return (err ** 2).mean(dims) / scale

    loss_pos, loss_neg = normalised_mse(x_pos), normalised_mse(x_neg)
    policy = ((r * loss_pos + (1 - r) * loss_neg) / beta).mean() * adv_clip_max
    if v_ref is not None:
        kl = ((v_theta - v_ref.float()) ** 2).mean()
    else:
        kl = torch.zeros((), device=x0.device)
    loss = policy + kl_beta * kl
    terms = {"loss": loss.detach(), "policy_loss": policy.detach(), "kl": kl.detach(),
             "loss_pos": loss_pos.detach().mean(), "loss_neg": loss_neg.detach().mean()}
    return loss, terms


def grpo_loss(log_prob, old_log_prob, adv, clip_range=1e-4, adv_clip_max=5.0, mean=None, mean_ref=None, std_dev=None,
              kl_beta=0.0):
    """Flow-GRPO's loss per transition (M of them): the PPO-clipped policy term and the KL to the reference.
        ratio = exp(log p_θ − log p_old),  A clipped to ±adv_clip_max
        policy = max(−A·ratio, −A·clip(ratio, 1 − ε, 1 + ε))
        kl = mean_CHW((mean_θ − mean_ref)²) / (2·s_t²)   (the reference code's divisor: s_t², not s_t²·|dt|)
    log_prob carries the gradient (and mean, when kl_beta > 0); mean_ref (None: no KL) and std_dev (M,) do not.
    Returns (policy + kl_beta·kl, per transition (M,); dict of detached per-transition terms (M,)). The caller takes
    the mean over the global batch (train.grpo_update: the sum divided by the global count)."""
    adv = adv.float().clamp(-adv_clip_max, adv_clip_max)
    log_ratio = log_prob.float() - old_log_prob.float()
    ratio = torch.exp(log_ratio)
    policy = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip_range, 1 + clip_range))
    if mean_ref is not None:
        dims = tuple(range(1, mean.ndim))
        kl = ((mean.float() - mean_ref.float()) ** 2).mean(dims) / (2 * std_dev.float() ** 2)
    else:
        kl = torch.zeros_like(policy)
    loss = policy + kl_beta * kl
    terms = {"loss": loss.detach(), "policy_loss": policy.detach(), "kl": kl.detach(), "ratio": ratio.detach(),
             "clip_frac": ((ratio.detach() - 1).abs() > clip_range).float(), "approx_kl": 0.5 * log_ratio.detach() ** 2}
    return loss, terms


def compute_advantages(rewards, group_ids, global_std=True, adv_clip_max=5.0):
    """rewards (N,), group_ids (N,) → (clipped advantages A, optimality probability r), float64.
    A = (R − mean of its group) / (std + 1e-4), std (population) over all N or per group."""
    rewards = rewards.double()
    adv = torch.empty_like(rewards)
    std_all = rewards.std(unbiased=False)
    for g in torch.unique(group_ids):
        m = group_ids == g
        std = std_all if global_std else rewards[m].std(unbiased=False)
        adv[m] = (rewards[m] - rewards[m].mean()) / (std + ADV_EPS)
    adv = adv.clamp(-adv_clip_max, adv_clip_max)
    r = (adv / adv_clip_max / 2 + 0.5).clamp(0, 1)
    return adv, r


def group_stats(rewards, group_ids):
    """(mean intra-group std, fraction of groups whose rewards are all equal): the paper's Fig. 2."""
    stds = torch.stack([rewards[group_ids == g].double().std(unbiased=False) for g in torch.unique(group_ids)])
    return stds.mean().item(), (stds <= 1e-8).double().mean().item()


def old_decay(step, decay_type):
    """DiffusionNFT's decay of the old adapter after `step` optimizer steps: old ← d·old + (1−d)·θ."""
    flat, rate, hold = {0: (0, 0.0, 0.0), 1: (0, 0.001, 0.5), 2: (75, 0.0075, 0.999)}[decay_type]
    return 0.0 if step < flat else min((step - flat) * rate, hold)


def ema_decay_at(step, decay):
    """EMA decay with warm-up after `step` optimizer steps: min((1+s)/(10+s), decay)."""
    return min((1 + step) / (10 + step), decay)


@torch.no_grad()
def lerp_params_(dst, src, d):
    """dst ← d·dst + (1 − d)·src, parameter by parameter (lists in the same order)."""
    assert len(dst) == len(src)
    for a, b in zip(dst, src):
        assert a.shape == b.shape
        a.mul_(d).add_(b.to(a.dtype), alpha=1 - d)


def num_train_timesteps(cfg):
    return int(cfg.train_sample_steps * cfg.timestep_fraction)


def egrpo_plan(cfg):
    """E-GRPO's active SDE steps [(i, l), ...] on the rollout grid (sample.merge_plan): starts within the first
    int(train_sample_steps · timestep_fraction) steps, each merged until 2πe·a²·σ/(1 − σ)·Δσ ≥ egrpo_tau."""
    return sample.merge_plan(sample.sigma_schedule(cfg.train_sample_steps), cfg.sde_eta, cfg.egrpo_tau,
                             num_train_timesteps(cfg))


def flow_grpo_steps(cfg, step, slot):
    """(the rollout's SDE steps, None = every step but the last; the steps trained on) for one prompt slot.
    Flow-GRPO trains on the first int(T · timestep_fraction) steps (at most T − 1: the last step is deterministic);
    Flow-GRPO-Fast (sde_window = w) on a window of w SDE steps, its start keyed by (seed, step, slot)."""
    if not cfg.sde_window:
        return None, list(range(min(num_train_timesteps(cfg), cfg.train_sample_steps - 1)))
    lo, hi = cfg.sde_window_range
    gen = keyed_generator(cfg.seed, step, "window", slot)
    start = int(torch.randint(lo, hi - cfg.sde_window + 1, (1,), generator=gen))
    steps = list(range(start, start + cfg.sde_window))
    return set(steps), steps


def grpo_chunks(cfg, step, num_samples, n_group):
    """Which of the grpo_updates optimizer steps each sample of the global batch goes to: every group is split
    evenly, by a permutation keyed by (seed, step, group), so the split does not depend on the rank layout."""
    chunk = torch.zeros(num_samples, dtype=torch.long)
    if cfg.grpo_updates > 1:
        for g in range(num_samples // n_group):
            perm = torch.randperm(n_group, generator=keyed_generator(cfg.seed, step, "grpo-chunk", g))
            chunk[g * n_group + perm] = torch.arange(n_group) * cfg.grpo_updates // n_group
    return chunk


# -----------------------------------------------------------------------------
# configuration: parsing and validation (all before any model loads)

def parse_reward_spec(spec):
    """"shapes" → "shapes"; "geneval:0.7,pickscore:0.3" → {"geneval": 0.7, "pickscore": 0.3}."""
    if ":" not in spec and "," not in spec:
        return spec.strip()
    out = {}
    for part in spec.split(","):
        name, _, w = part.partition(":")
        try:
            out[name.strip()] = float(w) if w else 1.0
        except ValueError:
            raise ValueError(f"reward spec {spec!r}: weight {w!r} of {name!r} is not a number") from None
    return out


def resolve_path(path):
    """A relative path is taken from the working directory, else from the repository."""
    if not path or os.path.isabs(path) or os.path.exists(path):
        return path
    alt = os.path.join(REPO, path)
    return alt if os.path.exists(alt) else path


# prompt sets the presets name but the repo does not ship (README: prompt sets)
PROMPT_SOURCES = {
    os.path.join("data", "geneval"): "GenEval metadata jsonl: copy train_metadata.jsonl and test_metadata.jsonl (GenEval's "
                                     "553 prompts) from dataset/geneval/ of github.com/yifan123/flow_grpo (DiffusionNFT "
                                     "ships the same files)",
    os.path.join("data", "pickscore"): "one prompt a line: copy train.txt and test.txt from dataset/pickscore/ of "
                                       "github.com/yifan123/flow_grpo (DiffusionNFT ships the same files)"}


def read_prompts(path):
    """GenEval-format jsonl (one object with "prompt" per line) or .txt (one prompt per line) →
    list of metadata dicts, each with "prompt"."""
    path = resolve_path(path)
    if not os.path.isfile(path):
        where = next((f"; it is not shipped: {how}" for d, how in PROMPT_SOURCES.items() if d in os.path.normpath(path)), "")
        raise FileNotFoundError(f"prompt file {path!r} does not exist{where}")
    items = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            if path.endswith(".jsonl"):
                try:
                    item = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not valid JSON ({e})") from None
                if not isinstance(item, dict) or not isinstance(item.get("prompt"), str):
                    raise ValueError(f"{path}:{n}: each line needs a string field \"prompt\"")
            else:
                item = {"prompt": line}
            if len(item["prompt"].split()) > 60:
                print(f"warning: {path}:{n}: long prompt; CLIP truncates at 77 tokens", file=sys.stderr)
            items.append(item)
    if not items:
        raise ValueError(f"prompt file {path!r} is empty")
    return items


def group_size(cfg):
    """Samples per prompt group: (K with the anchor, K − 1 without) × G."""
    return (cfg.num_variants if cfg.anchor else cfg.num_variants - 1) * cfg.num_seeds


def samples_per_prompt(cfg):
    """Images sampled, decoded and rewarded per prompt and iteration: the group, and for E-GRPO one group per active
    step branched (egrpo_branch_steps, or every step of the plan)."""
    if cfg.method != "e_grpo":
        return group_size(cfg)
    return group_size(cfg) * (cfg.egrpo_branch_steps or len(egrpo_plan(cfg)))


def micro_batch_size(cfg, n_local):
    """Samples per training forward on a rank with n_local samples: a larger setting is one micro-batch."""
    return min(cfg.train_micro_batch, n_local)


# settings a resumed run may change (applied from the step it resumes at); any other difference from the checkpoint's
# settings changes what the run is, and resume refuses it unless resume_override=True
RESUMABLE_CHANGES = {
    "out_dir", "resume", "resume_override", "max_steps", "learning_rate", "weight_decay", "beta1", "beta2", "adam_eps",
    "grad_clip", "eval_every", "save_every", "log_images_every", "grid_prompts", "wandb_log", "wandb_project",
    "wandb_run_name", "eval_prompts", "eval_num_prompts", "eval_num_images", "eval_reward", "eval_sample_steps",
    "eval_solver", "device", "grad_checkpointing", "rollout_micro_batch", "train_micro_batch", "max_skipped_steps",
    "reward_paths"}
RUN_FILES = ("ckpt.pt", "log.jsonl", "config.json", "lora_policy.safetensors", "lora_ema.safetensors")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def check_numbers(cfg, bad):
    """Every numeric setting finite and in its range, before anything is read or loaded."""
    for key in CONFIG_KEYS:
        value = getattr(cfg, key)
        if isinstance(value, float) and not math.isfinite(value):
            bad(f"{key}={value} is not a finite number")
    at_least = {1: ("num_variants", "num_seeds", "prompts_per_step", "train_sample_steps", "eval_sample_steps",
                    "eval_num_images", "rollout_micro_batch", "train_micro_batch", "lora_rank", "max_skipped_steps"),
                0: ("max_steps", "emb_steps", "eval_every", "save_every", "log_images_every", "grid_prompts",
                    "eval_num_prompts", "resolution", "seed", "weight_decay", "grad_clip", "kl_beta", "sigma_init",
                    "lambda_div", "anchor_margin")}
    for low, keys in at_least.items():
        for key in keys:
            if getattr(cfg, key) < low:
                bad(f"{key} must be >= {low}, got {getattr(cfg, key)}")
    for key in ("learning_rate", "adam_eps", "lora_alpha", "nft_beta", "adv_clip_max", "emb_lr", "delta_max"):
        if not getattr(cfg, key) > 0:
            bad(f"{key} must be > 0, got {getattr(cfg, key)}")
    for key, lo, hi, text in (("beta1", 0, 1, "[0, 1)"), ("beta2", 0, 1, "[0, 1)"), ("ema_decay", 0, 1, "[0, 1)")):
        if not lo <= getattr(cfg, key) < hi:
            bad(f"{key} must be in {text}, got {getattr(cfg, key)}")
    if not -1 < cfg.mu < 1:
        bad(f"mu (the anchor cosine) must be in (-1, 1), got {cfg.mu}")
    if not 0 < cfg.rho <= 1:
        bad(f"rho must be in (0, 1], got {cfg.rho}")
    if not 0 < cfg.timestep_fraction <= 1 or num_train_timesteps(cfg) < 1:
        bad(f"timestep_fraction={cfg.timestep_fraction} leaves no training timestep of {cfg.train_sample_steps}")


def check_group(cfg, bad):
    """A group of at least 2 samples, with advice that fits the method (a GRPO method runs K = 1 unless
    grpo_variants=True, so raising num_variants would change nothing there)."""
    forced = cfg.method in GRPO_METHODS and not cfg.grpo_variants
    if not cfg.anchor and cfg.num_variants < 2:
        if forced:
            bad(f"anchor=False drops C_orig from the group, and method={cfg.method!r} samples C_orig alone "
                "(num_variants=1: grpo_variants=False), so no sample would be left: keep anchor=True, or add E²PO's "
                "variants with grpo_variants=True and num_variants >= 2")
        bad("anchor=False drops C_orig from the group, so it needs num_variants >= 2")
    n_group = group_size(cfg)
    if n_group < 2:
        if forced:
            bad(f"a group of {n_group} sample has no reward variance: raise num_seeds (method={cfg.method!r} samples "
                "num_variants=1, the original prompt only, unless grpo_variants=True)")
        bad(f"a group of {n_group} sample has no reward variance: raise num_variants or num_seeds")


def check_method(cfg, bad):
    """The method and its own settings (Flow-GRPO, E-GRPO), before anything loads."""
    if cfg.method not in METHODS:
        bad(f"method must be one of {METHODS}, got {cfg.method!r}")
    if cfg.method == "nft":
        for key in ("sde_window", "egrpo_branch_steps"):
            if getattr(cfg, key):
                bad(f"{key} belongs to a GRPO method (method='flow_grpo' / 'e_grpo'); 0 for method='nft'")
        return
    if cfg.num_variants > 1 and not cfg.grpo_variants:
        # E²PO's variants are off for the GRPO methods unless asked for: the world's default K = 4 is E²PO's, and
        # `python train.py --method=flow_grpo` must run Flow-GRPO itself (config.json records the K = 1 it runs)
        print0(f"method={cfg.method!r}: E²PO's variants are off (grpo_variants=False), so num_variants="
               f"{cfg.num_variants} → 1: G = num_seeds = {cfg.num_seeds} noises of the original prompt per group")
        cfg.num_variants = 1
    if not cfg.sde_eta > 0:
        bad(f"sde_eta must be > 0 for method={cfg.method!r} (the SDE's noise level; 0 has no log-probability)")
    if not cfg.grpo_clip_range > 0:
        bad(f"grpo_clip_range must be > 0, got {cfg.grpo_clip_range}")
    if cfg.grpo_kl_beta < 0:
        bad(f"grpo_kl_beta must be >= 0, got {cfg.grpo_kl_beta}")
    check_group(cfg, bad)             # before grpo_updates: a group of 0 or 1 has its own message
    if not 1 <= cfg.grpo_updates <= group_size(cfg):
        bad(f"grpo_updates={cfg.grpo_updates} must be in [1, the group of {group_size(cfg)}] (each update takes a "
            "slice of every group)")
    if cfg.num_variants > 1 and cfg.grpo_updates > 1:
        bad("grpo_variants needs grpo_updates=1: the old policy's log-probability under C_orig is known only while "
            "θ = θ_old, i.e. at the first update (the rollout's is under C_k(σ))")
    T = cfg.train_sample_steps
    if T < 2:
        bad(f"train_sample_steps={T}: {cfg.method} needs >= 2 (the last step is deterministic)")
    window = cfg.sde_window
    if window < 0:
        bad(f"sde_window must be >= 0, got {window}")
    if cfg.method == "flow_grpo" and window:
        rng = cfg.sde_window_range
        if not (len(rng) == 2 and all(isinstance(v, int) for v in rng)):
            bad(f"sde_window_range must be two ints (lo, hi), got {rng!r}")
        lo, hi = rng
        if not (window >= 1 and 0 <= lo and lo + window <= hi <= T - 1):
            bad(f"sde_window={window} in sde_window_range={rng!r} must fit in steps [0, {T - 1}) (0 <= lo, "
                f"lo + window <= hi <= train_sample_steps − 1 = {T - 1}: the last step is deterministic)")
    elif window:
        bad(f"sde_window={window}: the window is Flow-GRPO-Fast's (method='flow_grpo'); 0 for {cfg.method!r}")
    if cfg.method == "e_grpo":
        if not cfg.egrpo_tau > 0:
            bad(f"egrpo_tau must be > 0, got {cfg.egrpo_tau}")
        plan = egrpo_plan(cfg)     # never empty: T >= 2 and at least one training step (check_numbers)
        if not 0 <= cfg.egrpo_branch_steps <= len(plan):
            bad(f"egrpo_branch_steps={cfg.egrpo_branch_steps} must be in [0, {len(plan)}] (the plan's active steps "
                f"{plan})")
    elif cfg.egrpo_branch_steps:
        bad(f"egrpo_branch_steps is E-GRPO's (method='e_grpo'); 0 for {cfg.method!r}")


def sde_transitions(cfg):
    """[(what, grid size T, the SDE transitions [(i, j), ...] or None = every step but the last)] that this config
    samples with sample.sde_step (η = sde_eta)."""
    out, T = [], cfg.train_sample_steps
    if cfg.method == "flow_grpo":
        lo, hi = cfg.sde_window_range if cfg.sde_window else (0, T - 1)
        out.append(("the rollouts", T, [(i, i + 1) for i in range(lo, hi)]))
    elif cfg.method == "e_grpo":
        out.append(("the rollouts' active steps (merged ones included)", T, [(i, i + l) for i, l in egrpo_plan(cfg)]))
    elif cfg.train_solver == "sde":
        out.append(("train_solver='sde'", T, None))
    return out       # (eval_solver="sde" samples at sample.ETA, not sde_eta)


def check_sde_eta(cfg, bad):
    """sde_eta within sample.max_stable_eta on every SDE step this config takes (a larger η makes the rollouts grow
    geometrically: the run would log NaN losses and zero rewards instead of learning)."""
    for what, T, steps in sde_transitions(cfg):
        if T < 2 or steps == []:
            continue
        bound, (s, s_next) = sample.max_stable_eta(sample.sigma_schedule(T), steps)
        if cfg.sde_eta > bound:
            c_x = 1 - cfg.sde_eta ** 2 * (s - s_next) / (2 * (1 - (s_next if s == 1 else s)))
            bad(f"sde_eta={cfg.sde_eta} is above {bound:.3g}, the most the SDE step σ={s:.4g} → {s_next:.4g} of "
                f"{what} ({T} steps) takes: its mean multiplies the latent by 1 − η²·Δσ/(2(1 − σ)) = "
                f"{c_x:.3g}, more than 1 in size, "
                f"so the rollouts diverge (sample.max_stable_eta); use sde_eta <= {math.floor(bound * 100) / 100}")


LOCK_FILE = ".lock"          # out_dir/.lock: rank 0's flock for the whole run; it holds the holder's pid


def out_dir_problem(path):
    """Why `path` cannot be (or become) a folder this process writes into, or None; creates nothing. The creation
    itself may still fail where permission bits do not tell (root, /proc); lock_out_dir reports that one."""
    if not path.strip():
        return "out_dir is empty: name a folder (e.g. --out_dir=out)"
    full = os.path.abspath(path)
    if os.path.lexists(full):
        if not os.path.isdir(full):
            return f"out_dir {path!r} is not a folder (a file is there)"
        if not os.access(full, os.W_OK | os.X_OK):
            return f"out_dir {path!r} is not writable"
        return None
    parent = os.path.dirname(full)
    while not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"out_dir {path!r} cannot be created: {parent} is a file, not a folder"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"out_dir {path!r} cannot be created: {parent} is not writable"
    return None


def lock_out_dir(out_dir):
    """Create out_dir and take an exclusive flock on out_dir/.lock (writing this pid into it): the returned file
    descriptor holds it until release_lock or the end of the process, however it ends (SIGKILL included: the OS
    drops flocks with the process). The .lock file itself stays (removing it would let two runs lock two different
    files). A lock held by another process is a BlockingIOError naming its pid, raised at once."""
    path = os.path.join(out_dir, LOCK_FILE)
    try:
        os.makedirs(out_dir, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise OSError(f"config: cannot create out_dir {out_dir!r} ({e.strerror}: {e.filename})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown (it is starting)"
        os.close(fd)
        raise BlockingIOError(f"config: out_dir {out_dir!r} is in use by another run (pid {holder}, which holds "
                              f"{path}); wait for it to end or choose another --out_dir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def release_lock(cfg):
    """Close cfg.lock (lock_out_dir's descriptor), which releases the flock; nothing when there is none."""
    fd, cfg.lock = getattr(cfg, "lock", None), None
    if fd is not None:
        os.close(fd)


def run_marks(out_dir):
    """What makes out_dir a run: a checkpoint, the final LoRA files, or a log with a completed step (a line that is
    not the step-0 evaluation; an unreadable line counts too). config.json and a log with at most the step-0 line
    are what a run killed before its first completed step leaves: not a run."""
    marks = [f for f in RUN_FILES if f not in ("config.json", "log.jsonl") and os.path.exists(os.path.join(out_dir, f))]
    log = os.path.join(out_dir, "log.jsonl")
    if os.path.isfile(log):
        with open(log, errors="replace") as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    step = json.loads(line).get("step")
                except (json.JSONDecodeError, AttributeError):
                    step = None
                if step != 0:
                    marks.append("log.jsonl with completed steps")
                    break
    return marks


def check_out_dir(cfg, lock=False):
    """A new run never writes into another run's out_dir; a resumed run needs a readable checkpoint there, and
    settings that define the run must match it (unless resume_override). Returns the checkpoint (or None).
    lock=True (train(), rank 0): create out_dir and hold its lock (cfg.lock) before looking inside, so two runs
    started at once cannot both find it free; on an error here the lock is released again."""
    problem = out_dir_problem(cfg.out_dir)
    if problem:
        raise OSError(f"config: {problem}")
    cfg.lock = lock_out_dir(cfg.out_dir) if lock else None
    try:
        return inspect_out_dir(cfg)
    except BaseException:
        release_lock(cfg)
        raise


def inspect_out_dir(cfg):
    """check_out_dir's look inside out_dir (see run_marks for what counts as a run)."""
    path = os.path.join(cfg.out_dir, "ckpt.pt")
    marks = run_marks(cfg.out_dir) if os.path.isdir(cfg.out_dir) else []
    leftovers = [f for f in ("config.json", "log.jsonl") if os.path.exists(os.path.join(cfg.out_dir, f))]
    found = ", ".join(f for f in RUN_FILES if os.path.exists(os.path.join(cfg.out_dir, f)))
    if not cfg.resume:
        if "ckpt.pt" in marks:
            raise FileExistsError(
                f"config: out_dir {cfg.out_dir!r} already holds a run ({found}). Continue it "
                f"with --resume=True, or start over with another --out_dir (or delete {cfg.out_dir} yourself); "
                "nothing there was changed")
        if marks:
            raise FileExistsError(
                f"config: out_dir {cfg.out_dir!r} already holds a run ({found}) without a "
                f"checkpoint to continue from; start over with another --out_dir (or delete {cfg.out_dir} "
                "yourself); nothing there was changed")
        if leftovers:
            print0(f"out_dir {cfg.out_dir}: {', '.join(leftovers)} of a run stopped before its first step (no "
                   "checkpoint, no completed step) is not a run: a new run starts there and replaces them")
        return None
    if not os.path.isfile(path):
        if marks:
            raise FileNotFoundError(
                f"config: resume=True but {path} does not exist: the run in {cfg.out_dir} ({found}) "
                f"stopped before its first checkpoint (save_every), so there is nothing to resume; start over with "
                f"another --out_dir (or delete {cfg.out_dir} yourself)")
        if leftovers:
            print0(f"resume=True: {cfg.out_dir} holds no checkpoint and no completed step (only "
                   f"{', '.join(leftovers)}, of a run stopped before its first step): starting from step 0")
            return None
        raise FileNotFoundError(f"config: resume=True but {path} does not exist")
    ckpt = load_checkpoint(path)
    old, new = ckpt.get("config", {}), config_to_json(cfg)
    changed = {k: (old[k], v) for k, v in new.items() if k in old and old[k] != v and k not in RESUMABLE_CHANGES}
    if changed and not cfg.resume_override:
        lines = "\n".join(f"  {k}: {a!r} in the checkpoint, {b!r} now" for k, (a, b) in sorted(changed.items()))
        raise ValueError(f"config: resume would change settings that define the run in {cfg.out_dir}:\n{lines}\n"
                         "Use the checkpoint's values, or pass --resume_override=True to resume with these anyway")
    return ckpt


def validate_config(cfg, world_size, lock=False):
    """Reject impossible settings with a message naming the key; fill in derived paths and read the prompts (and,
    for resume=True, the checkpoint into cfg.checkpoint). No model loads and nothing is written, except with
    lock=True (train(), on rank 0): then out_dir is created and its lock held (cfg.lock; check_out_dir)."""
    def bad(msg):
        raise ValueError(f"config: {msg}")
    check_numbers(cfg, bad)
    check_method(cfg, bad)
    check_sde_eta(cfg, bad)
    check_group(cfg, bad)
    n_group = group_size(cfg)
    if cfg.prompts_per_step % world_size:
        bad(f"prompts_per_step={cfg.prompts_per_step} is not divisible by the world size {world_size}")
    n_local = cfg.prompts_per_step // world_size * n_group
    if cfg.method == "nft" and n_local % micro_batch_size(cfg, n_local):   # GRPO micro-batches its kept transitions
        bad(f"train_micro_batch={cfg.train_micro_batch} does not divide the {n_local} samples per rank "
            f"(prompts_per_step/world_size × group of {n_group})")
    if n_group % cfg.rollout_micro_batch and cfg.rollout_micro_batch < n_group:
        bad(f"rollout_micro_batch={cfg.rollout_micro_batch} does not divide the group of {n_group} samples")
    for key in ("dtype", "mmdit_dtype"):
        if getattr(cfg, key) not in DTYPES:
            bad(f"{key} must be one of {tuple(DTYPES)}, got {getattr(cfg, key)!r}")
    if cfg.dtype == "float32" and cfg.mmdit_dtype != "float32":
        bad(f"mmdit_dtype={cfg.mmdit_dtype!r} needs autocast: set dtype to float16 or bfloat16 as well")
    if cfg.schedule not in ("noise_aware", "static"):
        bad(f"schedule must be noise_aware or static, got {cfg.schedule!r}")
    for key in ("train_solver", "eval_solver"):
        if getattr(cfg, key) not in ("euler", "dpm2m", "sde"):
            bad(f"{key} must be euler, dpm2m or sde, got {getattr(cfg, key)!r}")
    if cfg.decay_type not in (0, 1, 2):
        bad(f"decay_type must be 0, 1 or 2, got {cfg.decay_type}")
    # files
    cfg.weights = resolve_path(cfg.weights) or M.DEFAULT_WEIGHTS
    if not os.path.exists(cfg.weights):
        hint = " (build the default world with: python data/shapes/pretrain.py)" if cfg.weights == M.DEFAULT_WEIGHTS else ""
        raise FileNotFoundError(f"config: weights {cfg.weights!r} does not exist{hint}")
    cfg.text_encoders = resolve_path(cfg.text_encoders) or (
        cfg.weights if os.path.isdir(cfg.weights) else os.path.dirname(cfg.weights))
    if not os.path.isdir(cfg.text_encoders):
        raise FileNotFoundError(f"config: text_encoders {cfg.text_encoders!r} is not a pipeline root folder")

    if not cfg.max_sequence_length:
        cfg.max_sequence_length = M.pipeline_notes(cfg.text_encoders).get("max_sequence_length", M.T5_MAX_LENGTH)
    if not cfg.resolution:
        cfg.resolution = M.native_size(cfg.weights) or 0
        if not cfg.resolution:
            bad(f"resolution=0 but the native size cannot be read from {cfg.weights!r}; set --resolution")
    step = M.pixels_per_token(cfg.weights)
    if cfg.resolution % step:
        bad(f"resolution={cfg.resolution} must be a multiple of {step} (the VAE factor × the patch size of "
            f"{cfg.weights})")

    if cfg.reward_module:
        try:
            importlib.import_module(cfg.reward_module)
        except ImportError as e:
            bad(f"reward_module {cfg.reward_module!r} cannot be imported ({e})")
    R.check_reward_paths(cfg.reward_paths)       # known keys (reward_module's included), existing paths
    for spec_key in ("reward", "eval_reward"):   # reward.py's own check: its path shortcuts, files and repo ids
        R.check_paths(parse_reward_spec(getattr(cfg, spec_key) or cfg.reward), cfg.reward_paths)
    cfg.train_items = read_prompts(cfg.train_prompts)
    cfg.eval_items = read_prompts(cfg.eval_prompts) if cfg.eval_every > 0 else []
    if cfg.eval_num_prompts:
        cfg.eval_items = cfg.eval_items[:cfg.eval_num_prompts]
    for spec_key, items, file_key in (("reward", cfg.train_items, "train_prompts"),
                                      ("eval_reward", cfg.eval_items, "eval_prompts")):
        spec = parse_reward_spec(getattr(cfg, spec_key) or cfg.reward)
        needs = [n for n in ([spec] if isinstance(spec, str) else spec) if n in R.NEEDS_METADATA]
        lacking = next((i for i, it in enumerate(items) if "include" not in it), None)
        if needs and lacking is not None:
            bad(f"{spec_key} {needs[0]!r} scores GenEval metadata (\"tag\", \"include\" per prompt), but prompt "
                f"{lacking + 1} of {getattr(cfg, file_key)} has none: use a GenEval-format .jsonl (README: prompt sets)")
    cfg.checkpoint = check_out_dir(cfg, lock=lock)
    return cfg


# -----------------------------------------------------------------------------
# distributed, randomness, precision

def setup_distributed(cfg):
    """torchrun sets RANK/LOCAL_RANK/WORLD_SIZE (and MASTER_ADDR/PORT, several nodes included);
    without them this is one process. nccl on GPU, gloo on CPU."""
    use_cuda = torch.cuda.is_available() and cfg.device in ("", "cuda")
    if "RANK" not in os.environ:
        dev = cfg.device or ("cuda" if use_cuda else "cpu")
        return SimpleNamespace(ddp=False, rank=0, local_rank=0, world_size=1, master=True, device=torch.device(dev))
    rank, local_rank, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    if use_cuda:
        dev = torch.device(f"cuda:{local_rank}")
        torch.cuda.set_device(dev)
    else:
        dev = torch.device(cfg.device or "cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return SimpleNamespace(ddp=True, rank=rank, local_rank=local_rank, world_size=world,
                           master=rank == 0, device=dev)


def world_size_from_env():
    return int(os.environ.get("WORLD_SIZE", 1)) if "RANK" in os.environ else 1


def print0(*args, **kwargs):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


def all_gather_cat(t, world):
    """Concatenate equally shaped tensors from every rank, in rank order."""
    if not world.ddp:
        return t
    out = [torch.empty_like(t) for _ in range(world.world_size)]
    dist.all_gather(out, t.contiguous())
    return torch.cat(out)


def all_reduce_grads(params, world):
    """Average the accumulated gradients over ranks, in one flat all-reduce (the only gradient sync)."""
    if not world.ddp:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world.world_size
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n


def keyed_seed(*keys):
    """A 63-bit seed from any tuple of keys (seed, step, tag, index...)."""
    return int.from_bytes(hashlib.sha256(repr(keys).encode()).digest()[:8], "little") & (2 ** 63 - 1)


def keyed_generator(*keys):
    """A CPU generator keyed by (seed, step, tag, index...): draws do not depend on the rank layout."""
    return torch.Generator().manual_seed(keyed_seed(*keys))


def prompt_groups(cfg):
    """The train prompts' indices, one list per GenEval tag with balance_tags (in order of first appearance), else one
    list of all."""
    tags = [item.get("tag") for item in cfg.train_items]
    if not cfg.balance_tags or None in tags:
        return [list(range(len(tags)))]
    return [[i for i, t in enumerate(tags) if t == tag] for tag in dict.fromkeys(tags)]


def prompts_for_step(cfg, step):
    """Global prompt indices of one step: consecutive slices of per-epoch keyed permutations. With tag groups, the
    stream goes round the tags (a keyed order each round) and takes each tag's prompts from its own permutations."""
    groups = prompt_groups(cfg)
    out = []
    for i in range(step * cfg.prompts_per_step, (step + 1) * cfg.prompts_per_step):
        if len(groups) == 1:
            n = len(groups[0])
            perm = torch.randperm(n, generator=keyed_generator(cfg.seed, "data-epoch", i // n))
            out.append(groups[0][int(perm[i % n])])
            continue
        round_, slot = divmod(i, len(groups))
        g = int(torch.randperm(len(groups), generator=keyed_generator(cfg.seed, "tag-round", round_))[slot])
        n = len(groups[g])
        perm = torch.randperm(n, generator=keyed_generator(cfg.seed, "data-epoch", g, round_ // n))
        out.append(groups[g][int(perm[round_ % n])])
    return out


def precision(cfg, device):
    """(autocast context factory, dtype of the frozen VAE and text encoders, dtype of the frozen MMDiT, GradScaler).
    The same code on GPU and CPU (torch autocasts and scales on both), so the CPU tests run the GPU's path."""
    if cfg.dtype == "float32":
        return nullcontext, torch.float32, torch.float32, torch.amp.GradScaler(device.type, enabled=False)
    ptdtype = DTYPES[cfg.dtype]
    ctx = lambda: torch.autocast(device_type=device.type, dtype=ptdtype)
    return ctx, ptdtype, DTYPES[cfg.mmdit_dtype], torch.amp.GradScaler(device.type, enabled=cfg.dtype == "float16")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -----------------------------------------------------------------------------
# checkpoints (atomic) and RNG state

def atomic_save(obj, path):
    """torch.save to path.tmp, then os.replace: a crash never leaves a half-written checkpoint (and a failed write
    leaves no .tmp behind)."""
    tmp = path + ".tmp"
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path, map_location="cpu"):
    """ckpt.pt → dict; a damaged or foreign file is an error that names it."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise RuntimeError(f"cannot read the checkpoint {path} ({type(e).__name__}: {e}); it is damaged or not a "
                           "ckpt.pt written by train.py") from None


def rng_state():
    np_state = np.random.get_state()
    state = {"python": list(random.getstate()[1]), "python_version": random.getstate()[0],
             "numpy": torch.from_numpy(np_state[1].astype(np.int64)), "numpy_pos": int(np_state[2]),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate((state["python_version"], tuple(state["python"]), None))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run, step):
    """Adapters (policy, old, ema), optimizer, scaler, step, per-rank RNG states, config → out_dir/ckpt.pt."""
    states = [None] * run.world.world_size
    if run.world.ddp:
        dist.all_gather_object(states, rng_state())
    else:
        states = [rng_state()]
    if run.world.master:
        ckpt = {"step": step, "config": run.cfg_dict, "optimizer": run.optimizer.state_dict(),
                "scaler": run.scaler.state_dict(), "rng": states, "skipped": run.skipped,
                "adapters": {a: {k: v.detach().cpu() for k, v in M.lora_state_dict(run.model, a).items()}
                             for a in run.adapters}}
        atomic_save(ckpt, os.path.join(run.cfg.out_dir, "ckpt.pt"))


def restore_checkpoint(run, ckpt):
    """Load everything save_checkpoint wrote, then apply the settings a resume may change (the optimizer's
    hyperparameters among them); returns the step to continue from."""
    for a, sd in ckpt["adapters"].items():
        if a not in run.adapters:   # e.g. an "ema" in the checkpoint of a run resumed with use_ema=False
            continue
        M.load_lora_state_dict(run.model, {k: v.to(run.world.device) for k, v in sd.items()}, a)
    run.optimizer.load_state_dict(ckpt["optimizer"])
    run.scaler.load_state_dict(ckpt["scaler"])
    run.skipped = ckpt["skipped"]
    if len(ckpt["rng"]) == run.world.world_size:
        set_rng_state(ckpt["rng"][run.world.rank])
    cfg = run.cfg
    for group in run.optimizer.param_groups:   # load_state_dict brought back the checkpoint's values
        group.update(lr=cfg.learning_rate, weight_decay=cfg.weight_decay, betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps)
    old = ckpt["config"]
    changed = {k: (old[k], v) for k, v in run.cfg_dict.items() if k in old and old[k] != v and k != "resume"}
    for k, (a, b) in sorted(changed.items()):
        print0(f"resume at step {ckpt['step']}: {k} {a!r} → {b!r}")
    return ckpt["step"]


# -----------------------------------------------------------------------------
# images and curves (Pillow only)

CURVES = ("reward_mean", "reward_std", "zero_std_ratio", "eval_reward", "policy_loss", "kl")


def plot_curves(rows, path, keys=CURVES):
    """One small panel per logged series (x = step), drawn with ImageDraw: train reward, intra-group std, the share of
    groups with zero std, the held-out reward and GenEval strict (when logged), the loss and KL."""
    strict = sorted({k for r in rows for k in r if k.startswith("eval_") and k.endswith("_strict")})
    keys = [k for k in list(keys[:4]) + strict + list(keys[4:]) if any(k in r for r in rows)]
    if not keys:
        return
    pw, ph, m = 360, 200, 36
    img = Image.new("RGB", (pw * 2, ph * math.ceil(len(keys) / 2)), "white")
    draw = ImageDraw.Draw(img)
    for i, key in enumerate(keys):
        pts = [(r["step"], r[key]) for r in rows if key in r and r[key] is not None and math.isfinite(r[key])]
        ox, oy = (i % 2) * pw, (i // 2) * ph
        draw.rectangle([ox + m, oy + 20, ox + pw - 10, oy + ph - m], outline="black")
        draw.text((ox + m, oy + 4), key, fill="black")
        if not pts:
            continue
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
        sx = lambda x: ox + m + (x - x0) / max(x1 - x0, 1e-12) * (pw - 10 - m)
        sy = lambda y: oy + ph - m - (y - y0) / max(y1 - y0, 1e-12) * (ph - m - 20)
        draw.text((ox + 2, oy + 20), f"{y1:.3g}", fill="gray")
        draw.text((ox + 2, oy + ph - m - 10), f"{y0:.3g}", fill="gray")
        draw.text((ox + m, oy + ph - m + 4), f"step {x0}", fill="gray")
        draw.text((ox + pw - 70, oy + ph - m + 4), f"{x1}", fill="gray")
        coords = [(sx(x), sy(y)) for x, y in pts]
        if len(coords) > 1:
            draw.line(coords, fill="blue", width=2)
        for c in coords:
            draw.ellipse([c[0] - 2, c[1] - 2, c[0] + 2, c[1] + 2], fill="blue")
    img.save(path)


class Logger:
    """log.jsonl (+ wandb when asked for and installed), rank 0 only."""

    def __init__(self, cfg, world, resume_step):
        self.master = world.master
        self.path = os.path.join(cfg.out_dir, "log.jsonl")
        self.rows, self.wandb = [], None
        if not self.master:
            return
        if os.path.isfile(self.path) and cfg.resume and resume_step:   # keep lines up to the checkpoint's step
            self.rows = [r for r in read_log(self.path) if r["step"] <= resume_step]
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in self.rows)
        os.replace(tmp, self.path)
        if cfg.wandb_log:
            try:
                import wandb
                self.wandb = wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name or None,
                                        config=config_to_json(cfg))
            except ImportError:
                print0("wandb_log=True but wandb is not installed: logging to log.jsonl only")

    def log(self, row):
        if not self.master:
            return
        self.rows.append(row)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.wandb is not None:
            self.wandb.log(row, step=row["step"])


def read_log(path):
    """The rows of a log.jsonl. A partial last line (a run killed mid-write) is dropped with a warning: the
    checkpoint, not the log, is the truth of where a run stands. A bad line elsewhere is an error naming it."""
    with open(path) as f:
        lines = [line for line in f.read().split("\n") if line.strip()]
    rows = []
    for n, line in enumerate(lines, 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if n < len(lines):
                raise ValueError(f"{path}:{n}: not a JSON line ({e})") from None
            print(f"warning: {path}:{n}: dropping a partial last line (the run stopped while writing it)",
                  file=sys.stderr)
    return rows


def config_to_json(cfg):
    return {k: getattr(cfg, k) for k in CONFIG_KEYS}


# -----------------------------------------------------------------------------
# building the run

def build_run(cfg, world):
    """Load the frozen models, add the policy/old/ema adapters, optimizer and reward functions."""
    dev = world.device
    ctx, wdtype, mmdit_dtype, scaler = precision(cfg, dev)
    mmdit = M.load_mmdit(cfg.weights, dtype=mmdit_dtype, device=dev)
    vae = M.load_vae(cfg.weights, dtype=wdtype, device=dev)
    text = M.load_text_encoders(cfg.text_encoders, dtype=wdtype, device=dev, t5=cfg.use_t5,
                              max_sequence_length=cfg.max_sequence_length)
    for module in (mmdit, vae, text):
        module.requires_grad_(False).eval()
    M.add_lora(mmdit, rank=cfg.lora_rank, alpha=cfg.lora_alpha, adapter="policy", seed=cfg.seed)
    adapters = ["policy"] + (["old"] if cfg.method == "nft" else []) + (["ema"] if cfg.use_ema else [])
    for a in adapters[1:]:
        M.copy_adapter(mmdit, "policy", a)
    for a in adapters:   # LoRA weights stay float32 (GradScaler needs float32 master weights)
        for p in M.lora_parameters(mmdit, a):
            p.data = p.data.float()
            p.requires_grad_(a == "policy")
    params = M.lora_parameters(mmdit, "policy")
    if world.ddp:        # identical start on every rank, whatever add_lora's RNG did
        for a in adapters:
            for p in M.lora_parameters(mmdit, a):
                dist.broadcast(p.data, src=0)
    mmdit.grad_checkpointing = cfg.grad_checkpointing
    M.set_adapter(mmdit, "policy")
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2),
                                  eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
    rdtype = wdtype if dev.type == "cuda" else None
    reward_fn = R.build(parse_reward_spec(cfg.reward), paths=cfg.reward_paths, device=dev, dtype=rdtype)
    eval_fn = reward_fn if not cfg.eval_reward or cfg.eval_reward == cfg.reward else \
        R.build(parse_reward_spec(cfg.eval_reward), paths=cfg.reward_paths, device=dev, dtype=rdtype)
    return SimpleNamespace(cfg=cfg, cfg_dict=config_to_json(cfg), world=world, model=mmdit, vae=vae, text=text,
                           params=params, adapters=adapters, optimizer=optimizer, scaler=scaler, ctx=ctx,
                           reward_fn=reward_fn, eval_fn=eval_fn, skipped=0,
                           executor=ThreadPoolExecutor(max_workers=1))


# -----------------------------------------------------------------------------
# one iteration, phase by phase

def local_prompts(run, step):
    """(global prompt-slot indices, metadata dicts) of this rank's share of the step's prompts."""
    cfg, world = run.cfg, run.world
    per_rank = cfg.prompts_per_step // world.world_size
    chosen = prompts_for_step(cfg, step)
    slots = list(range(world.rank * per_rank, (world.rank + 1) * per_rank))
    return slots, [cfg.train_items[chosen[s]] for s in slots]


def learn_deltas(run, step, items):
    """Phase I for this rank's prompts → Perturbed (P_local, K, ...). perturb.py seeds Δ's init by
    (seed, prompt), so a prompt gets the same Δ whatever batch or rank it is in; the seed changes per step."""
    cfg = run.cfg
    return perturb.learn_perturbations(
        run.text, [it["prompt"] for it in items], num_variants=cfg.num_variants, steps=cfg.emb_steps,
        lr=cfg.emb_lr, sigma_init=cfg.sigma_init, delta_max=cfg.delta_max, lambda_div=cfg.lambda_div, mu=cfg.mu,
        eps=cfg.anchor_margin, encoders=tuple(cfg.perturb_encoders), seed=keyed_seed(cfg.seed, step, "delta") % 2 ** 31)


def perturb_stats(perturbed, world):
    """Phase I diagnostics averaged over all prompts of the step: mean pairwise cos of the variants (L_div)
    and mean cos to the anchor (target μ). Empty for K = 1 (no perturbation)."""
    st = perturbed.stats
    if "mean_pairwise_cos" not in st:
        return {}
    local = torch.stack([st["mean_pairwise_cos"].float().mean(), st["cos_to_anchor"].float().mean()]).to(world.device)
    if world.ddp:
        dist.all_reduce(local)
        local /= world.world_size
    return {"mean_pairwise_cos": local[0].item(), "cos_to_anchor": local[1].item()}


def score(reward_fn, images, prompts, metadata):
    """Runs in the reward thread: {name: float32 CPU tensor (N,)} and the seconds it took."""
    t0 = time.time()
    with torch.no_grad():
        out = reward_fn(images, prompts, metadata)
    return {k: torch.as_tensor(v, dtype=torch.float32).detach().reshape(-1).cpu() for k, v in out.items()}, time.time() - t0


def sample_nft(run, step, slot, one):
    """DiffusionNFT / E²PO rollouts of one prompt: train_solver with the "old" adapter, nothing stored per step."""
    cfg = run.cfg
    lat = cfg.resolution // run.vae.factor
    return sample.sample_groups(
        run.model, run.vae, one, cfg.num_seeds, num_steps=cfg.train_sample_steps, solver=cfg.train_solver,
        rho=cfg.rho, schedule=cfg.schedule, anchor=cfg.anchor, micro_batch=cfg.rollout_micro_batch,
        latent_size=(lat, lat), generator=keyed_generator(cfg.seed, step, "rollout", slot),
        adapter="old", decode=True, eta=cfg.sde_eta)


def sample_flow_grpo(run, step, slot, one):
    """Flow-GRPO rollouts of one prompt, on-policy (the "policy" adapter, before this iteration's update): the SDE
    (η = sde_eta) on every step but the last, or on Flow-GRPO-Fast's window; the trajectory and the per-step
    log-probs are kept, and the steps to train on."""
    cfg = run.cfg
    lat = cfg.resolution // run.vae.factor
    sde_steps, train_steps = flow_grpo_steps(cfg, step, slot)
    group = sample.sample_groups(
        run.model, run.vae, one, cfg.num_seeds, num_steps=cfg.train_sample_steps, solver="sde", rho=cfg.rho,
        schedule=cfg.schedule, anchor=cfg.anchor, micro_batch=cfg.rollout_micro_batch, latent_size=(lat, lat),
        generator=keyed_generator(cfg.seed, step, "rollout", slot), adapter="policy", decode=True, eta=cfg.sde_eta,
        sde_steps=sde_steps, record=True)
    group.train_steps = train_steps
    return group


def sample_e_grpo(run, step, slot, one):
    """E-GRPO rollouts of one prompt, on-policy: an ODE prefix, G branches per active step with one merged SDE step,
    ODE to the end (sample.sample_branches). egrpo_branch_steps > 0 branches that many of the plan's active steps,
    drawn per prompt by (seed, step, slot)."""
    cfg = run.cfg
    lat = cfg.resolution // run.vae.factor
    plan = egrpo_plan(cfg)
    if cfg.egrpo_branch_steps:
        pick = torch.randperm(len(plan), generator=keyed_generator(cfg.seed, step, "egrpo-steps", slot))
        plan = [plan[a] for a in sorted(pick[:cfg.egrpo_branch_steps].tolist())]
    branches = sample.sample_branches(
        run.model, run.vae, one, cfg.num_seeds, plan, num_steps=cfg.train_sample_steps, eta=cfg.sde_eta, rho=cfg.rho,
        schedule=cfg.schedule, anchor=cfg.anchor, micro_batch=cfg.rollout_micro_batch, latent_size=(lat, lat),
        generator=keyed_generator(cfg.seed, step, "rollout", slot), adapter="policy", decode=True)
    branches.plan = plan
    return branches


def check_finite(run, step, slot, group):
    """Stop the run at the first rollout whose latents (or images) are not finite, or latents beyond LATENT_LIMIT,
    naming the likely cause (a diverged policy, the SDE's η, a half-precision overflow): such a group has zero reward
    variance and NaN losses, and the step would otherwise pass as a quiet no-op. One pass per group, negligible next
    to the sampling."""
    for name in ("latents", "images"):
        t = getattr(group, name, None)
        if t is None:
            continue
        t = t.float()
        ok = torch.isfinite(t) & (t.abs() <= LATENT_LIMIT) if name == "latents" else torch.isfinite(t)
        if bool(ok.all()):
            continue
        cfg = run.cfg
        bad_weights = [a for a in run.adapters
                       if not all(bool(torch.isfinite(p).all()) for p in M.lora_parameters(run.model, a))]
        if bad_weights:
            cause = (f"the LoRA weights of {bad_weights} are not finite (an update diverged): lower learning_rate "
                     "or grad_clip")
        elif sde_transitions(cfg):                   # the rollouts sample an SDE at sde_eta
            cause = (f"the SDE sampler diverged at sde_eta={cfg.sde_eta} (the weights are finite): lower sde_eta "
                     "(sample.max_stable_eta bounds it per step)")
        elif cfg.dtype != "float32":
            cause = (f"the sampler overflowed under dtype={cfg.dtype!r} (the weights are finite): try 'bfloat16' "
                     "or 'float32'")
        else:
            cause = "the sampler produced them from finite weights and noise (a bug: please report it)"
        n = (~ok.flatten(1)).any(1).sum().item()
        what = f"not finite (or beyond ±{LATENT_LIMIT:g})" if name == "latents" else "not finite"
        raise RuntimeError(f"step {step + 1}, prompt slot {slot}: the rollout's {name} are {what} in {n} of "
                           f"{len(t)} samples; {cause}. The run stops here (out_dir keeps its last checkpoint)")


def rollout(run, step, slots, items, perturbed, sampler=sample_nft):
    """Rollouts prompt by prompt with `sampler` (sample_nft: groups with the old adapter); each prompt's reward is
    computed in the background while the next prompt samples. Returns (groups, rewards dict of (N_local,), reward
    seconds)."""
    cfg = run.cfg
    groups, futures = [], []
    for i, (slot, item) in enumerate(zip(slots, items)):
        one = SimpleNamespace(context=perturbed.context[i:i + 1], pooled=perturbed.pooled[i:i + 1])
        with run.ctx(), torch.no_grad():
            group = sampler(run, step, slot, one)
        check_finite(run, step, slot, group)
        n = len(group.latents)
        futures.append(run.executor.submit(score, run.reward_fn, group.images, [item["prompt"]] * n, [item] * n))
        if cfg.anchor and cfg.num_variants > 1 and cfg.num_seeds > 1:   # how much the variants change the image
            first = slice(0, group_size(cfg))                            # (E-GRPO: in the first active step's group)
            group.spread = sample.variant_spread(group.images[first], group.variant[first], group.seed_idx[first])
        groups.append(group)
    results = [f.result() for f in futures]
    rewards = {k: torch.cat([r[0][k] for r in results]) for k in results[0][0]}
    for k, v in rewards.items():     # finite images (check_finite), so the reward function itself returned these
        if not bool(torch.isfinite(v).all()):
            raise RuntimeError(f"step {step + 1}: reward {k!r} is not finite for {(~torch.isfinite(v)).sum().item()} "
                               f"of {len(v)} samples from finite images; the reward function ({cfg.reward!r}) returned "
                               "NaN or inf. The run stops here (out_dir keeps its last checkpoint)")
    for g in groups[1:]:     # keep the first group's images for the grid; training needs latents only
        g.images = None
    return groups, rewards, sum(r[1] for r in results)


def spread_stats(groups, world):
    """Mean over this step's groups (all ranks) of sample.variant_spread: the pixel change a variant makes against the
    original prompt under the same noise, against the change a new noise makes. A ratio far below 1 means the group's
    diversity, and so its reward variance, comes from the G noises alone. Empty without variants or with G = 1."""
    spreads = [g.spread for g in groups if hasattr(g, "spread")]
    if not spreads:
        return {}
    local = torch.tensor(spreads, dtype=torch.float64).mean(0).to(world.device)
    if world.ddp:
        dist.all_reduce(local)
        local /= world.world_size
    variant, noise = local.tolist()
    return {"variant_spread": variant, "noise_spread": noise, "variant_noise_ratio": variant / max(noise, 1e-12)}


def advantages(run, rewards):
    """Gather every rank's rewards (global sample order = rank-major), form groups by prompt slot,
    return (this rank's r (N_local,), log stats)."""
    out = group_advantages(run, rewards)
    return out.r, out.stats


def group_advantages(run, rewards):
    """advantages() with everything the GRPO update needs too: SimpleNamespace(adv: the clipped advantages of the
    whole global batch (N_global,) float64, in global sample order; r: this rank's r (N_local,); stats; n_local).
    Groups are runs of group_size(cfg) consecutive samples: a prompt's (NFT, Flow-GRPO) or a (prompt, active step)'s
    (E-GRPO)."""
    cfg, world = run.cfg, run.world
    names = sorted(rewards)
    local = torch.stack([rewards[k] for k in names], 1).to(world.device)   # (N_local, n_rewards)
    gathered = all_gather_cat(local, world).cpu().double()
    avg = gathered[:, names.index("avg")]
    n_group = group_size(cfg)
    group_ids = torch.arange(len(avg)) // n_group
    adv, r = compute_advantages(avg, group_ids, cfg.global_std, cfg.adv_clip_max)
    std_mean, zero_ratio = group_stats(avg, group_ids)
    n_local = len(local)
    stats = {"reward_mean": avg.mean().item(), "reward_std": std_mean, "zero_std_ratio": zero_ratio,
             "adv_abs_mean": adv.abs().mean().item()}
    stats.update({f"reward_{k}": gathered[:, i].mean().item() for i, k in enumerate(names) if k != "avg"})
    if cfg.anchor and cfg.num_variants > 1 and cfg.num_seeds > 1:  # spread of the anchor alone (what K=1 sees)
        keep = (torch.arange(len(avg)) % n_group) < cfg.num_seeds    # group order: variant-major, k = 0 first
        stats["reward_std_anchor"] = group_stats(avg[keep], group_ids[keep])[0]
    return SimpleNamespace(adv=adv, r=r[world.rank * n_local:(world.rank + 1) * n_local].float(), stats=stats,
                           n_local=n_local)


@torch.no_grad()
def frozen_velocities(run, x, sigma, context, pooled, with_ref):
    """(v_old, v_ref or None), no grad, in chunks of rollout_micro_batch samples. With the reference, each chunk is
    one forward of the doubled batch under adapters ("old", None): MMDiT rows are independent, so this is exact."""
    bs, adapters = run.cfg.rollout_micro_batch, ("old", None) if with_ref else "old"
    n = 2 if with_ref else 1
    out = []
    with run.ctx(), M.use_adapter(run.model, adapters):
        for a in range(0, len(x), bs):
            args = [t[a:a + bs].repeat(n, *([1] * (t.ndim - 1))) for t in (x, sigma, context, pooled)]
            out.append(run.model(*args).float().unflatten(0, (n, -1)))
    v = torch.cat(out, dim=1)
    return v[0], (v[1] if with_ref else None)


def nft_update(run, step, groups, perturbed, slots, r):
    """One optimizer step of the NFT objective on this rank's samples, conditioned on C_orig only.
    Returns log terms (averaged over ranks), grad norm and whether the step was skipped."""
    cfg, world, dev, model = run.cfg, run.world, run.world.device, run.model
    x0_all = torch.cat([g.latents for g in groups]).float()
    context, pooled = perturbed.context[:, 0], perturbed.pooled[:, 0]   # C_orig (P_local, S, 4096), (P_local, 2048)
    prompt_of = torch.cat([torch.full((len(g.latents),), i, dtype=torch.long) for i, g in enumerate(groups)])
    sample_ids = torch.cat([torch.arange(len(g.latents)) + slot * group_size(cfg) for g, slot in zip(groups, slots)])
    sigmas = sample.sigma_schedule(cfg.train_sample_steps)[:-1]    # the sampler's own grid, σ > 0
    n_t, mb = num_train_timesteps(cfg), micro_batch_size(cfg, len(x0_all))
    n_micro = len(x0_all) // mb * n_t
    sums = {}
    model.train()
    for start in range(0, len(x0_all), mb):
        idx = torch.arange(start, start + mb)
        x0 = x0_all[idx].to(dev)
        ctx_b, pool_b, r_b = context[prompt_of[idx]].to(dev), pooled[prompt_of[idx]].to(dev), r[idx].to(dev)
        # each sample: its own random n_t of the grid and fresh ε per timestep (keyed: same on any rank layout)
        gens = [keyed_generator(cfg.seed, step, "nft", int(i)) for i in sample_ids[idx]]
        perms = torch.stack([torch.randperm(len(sigmas), generator=g)[:n_t] for g in gens])   # (mb, n_t)
        sigma = sigmas[perms.T].to(dev)                                                       # (n_t, mb)
        eps = torch.stack([torch.stack([torch.randn(x0.shape[1:], generator=g) for g in gens])
                           for _ in range(n_t)]).to(dev)                                      # (n_t, mb, C, h, w)
        s = sigma.view(n_t, mb, 1, 1, 1)
        x_sigma = (1 - s) * x0 + s * eps
        # the no-grad forwards of all n_t timesteps at once (old policy; reference = LoRA off)
        flat = lambda t: t.flatten(0, 1)
        rep = lambda t: t.repeat(n_t, *([1] * (t.ndim - 1)))
        v_old, v_ref = frozen_velocities(run, flat(x_sigma), flat(sigma), rep(ctx_b), rep(pool_b), cfg.kl_beta > 0)
        v_old, v_ref = v_old.view_as(x_sigma), None if v_ref is None else v_ref.view_as(x_sigma)
        for j in range(n_t):
            with run.ctx(), M.use_adapter(model, "policy"):
                v_theta = model(x_sigma[j], sigma[j], ctx_b, pool_b)
            loss, terms = nft_loss(v_theta, v_old[j], None if v_ref is None else v_ref[j], x_sigma[j], x0,
                                   sigma[j], r_b, cfg.nft_beta, cfg.adv_clip_max, cfg.kl_beta)
            run.scaler.scale(loss / n_micro).backward()
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v.float() / n_micro
    model.eval()
    all_reduce_grads(run.params, world)
    run.scaler.unscale_(run.optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(run.params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
    skipped = not torch.isfinite(grad_norm).item()
    if not skipped:
        run.scaler.step(run.optimizer)   # (also skips by itself if the scaler found an inf)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    terms = torch.stack([sums[k] for k in sorted(sums)]).to(dev)
    if world.ddp:
        dist.all_reduce(terms)
        terms /= world.world_size
    out = {k: v.item() for k, v in zip(sorted(sums), terms)}
    out.update(grad_norm=grad_norm.item(), skipped=skipped)
    return out


def flow_grpo_transitions(run, groups):
    """Flow-GRPO's training transitions: every (sample, trained step t) pair, x(σ_t) → x(σ_{t+1}) with its rollout
    log-prob; one next state per transition (n = 1). Sample indices follow the rewards' (local) order."""
    sig = sample.sigma_schedule(run.cfg.train_sample_steps).to(run.world.device)
    parts, offset = [], 0
    for i, g in enumerate(groups):
        N, steps = len(g.latents), torch.tensor(g.train_steps)
        n_t = len(steps)
        parts.append(dict(
            x=g.trajectory[:, steps].flatten(0, 1), x_next=g.trajectory[:, steps + 1].flatten(0, 1)[:, None],
            log_prob=g.log_probs[:, steps].reshape(-1, 1),
            sigma=sig[steps].repeat(N), sigma_next=sig[steps + 1].repeat(N),
            prompt=torch.full((N * n_t,), i), sample=(offset + torch.arange(N)).repeat_interleave(n_t)[:, None],
            orig=(g.variant == 0).repeat_interleave(n_t)))
        offset += N
    out = SimpleNamespace(**{k: torch.cat([p[k] for p in parts]) for k in parts[0]})
    out.per_sample = len(groups[0].train_steps)          # the same for every sample (all steps, or the window's w)
    return out


def e_grpo_transitions(run, groups):
    """E-GRPO's training transitions: one per (prompt, active step, variant) branch point, the merged SDE step
    σ_i → σ_{i+l} to each of its G branches (n = G): the G log-probs share one policy forward."""
    G, parts, offset = run.cfg.num_seeds, [], 0
    for i, b in enumerate(groups):
        N = len(b.latents)
        U = N // G
        parts.append(dict(
            x=b.x[::G], x_next=b.x_next.view(U, G, *b.x_next.shape[1:]), log_prob=b.log_prob.view(U, G),
            sigma=b.sigma[::G], sigma_next=b.sigma_next[::G], prompt=torch.full((U,), i),
            sample=(offset + torch.arange(N)).view(U, G), orig=b.variant[::G] == 0))
        offset += N
    out = SimpleNamespace(**{k: torch.cat([p[k] for p in parts]) for k in parts[0]})
    out.per_sample = 1
    return out


@torch.no_grad()
def frozen_forward(run, adapter, x, sigma, context, pooled):
    """v under `adapter` (None: LoRA off, the reference), no grad, in chunks of rollout_micro_batch samples."""
    bs = run.cfg.rollout_micro_batch
    with run.ctx(), M.use_adapter(run.model, adapter):
        return torch.cat([run.model(x[a:a + bs], sigma[a:a + bs], context[a:a + bs], pooled[a:a + bs]).float()
                          for a in range(0, len(x), bs)])


GRPO_TERMS = ("loss", "policy_loss", "kl", "ratio", "clip_frac", "approx_kl", "logprob_gap")


def grpo_update(run, step, units, perturbed, ga):
    """grpo_updates optimizer steps of the Flow-GRPO objective on this rank's transitions, conditioned on C_orig.
    Samples whose advantage is zero are dropped; update u takes the u-th slice of every group (grpo_chunks) and
    averages the loss over that slice's kept transitions in the whole global batch (each rank scales its sum by
    world_size / that count, so the all-reduced mean gradient is the global mean). The first update is on-policy:
    θ still equals the rollout policy, so its old log-prob is the policy's own, detached, and the ratio is exactly 1;
    later updates use the rollout's log-probs (the reference's). Returns log terms (means over the kept transitions
    of every update and rank), grad norm (mean over the updates taken) and whether a step was skipped."""
    cfg, world, dev, model = run.cfg, run.world, run.world.device, run.model
    context, pooled = perturbed.context[:, 0], perturbed.pooled[:, 0]   # C_orig (P_local, S, 4096), (P_local, 2048)
    base = world.rank * ga.n_local
    keep_all = ga.adv.abs() > ZERO_ADV
    chunk_all = grpo_chunks(cfg, step, len(ga.adv), group_size(cfg))
    adv = ga.adv[base:base + ga.n_local].float()
    keep, chunk = keep_all[base:base + ga.n_local], chunk_all[base:base + ga.n_local]
    sums, counts = torch.zeros(len(GRPO_TERMS), dtype=torch.float64), torch.zeros(len(GRPO_TERMS), dtype=torch.float64)
    norms, skipped = [], False
    for c in range(cfg.grpo_updates):
        n_terms = int((keep_all & (chunk_all == c)).sum()) * units.per_sample    # kept transitions, every rank
        if n_terms == 0:
            continue
        mask = keep[units.sample] & (chunk[units.sample] == c)                  # (U, n)
        live = mask.any(1).nonzero().flatten()
        model.train()
        for a in range(0, len(live), cfg.train_micro_batch):
            u = live[a:a + cfg.train_micro_batch]
            x, sigma, sigma_next = units.x[u].to(dev), units.sigma[u].to(dev), units.sigma_next[u].to(dev)
            ctx_b, pool_b = context[units.prompt[u]].to(dev), pooled[units.prompt[u]].to(dev)
            v_ref = frozen_forward(run, None, x, sigma, ctx_b, pool_b) if cfg.grpo_kl_beta > 0 else None
            with run.ctx(), M.use_adapter(model, "policy"):
                v = model(x, sigma, ctx_b, pool_b)
            uu, jj = mask[u].nonzero(as_tuple=True)                                # the kept (unit, branch) pairs
            step_args = (sigma[uu], sigma_next[uu], cfg.sde_eta)
            target = units.x_next[u][uu, jj].to(dev)
            _, log_prob, mean, std_dev = sample.sde_step(x[uu], v[uu], *step_args, prev_sample=target)
            mean_ref = None
            if v_ref is not None:
                mean_ref = sample.sde_step(x[uu], v_ref[uu], *step_args, prev_sample=target)[2]
            rollout_lp = units.log_prob[u][uu, jj].to(dev)
            old = log_prob.detach() if c == 0 else rollout_lp
            loss, terms = grpo_loss(log_prob, old, adv[units.sample[u][uu, jj]].to(dev), cfg.grpo_clip_range,
                                    cfg.adv_clip_max, mean, mean_ref, std_dev, cfg.grpo_kl_beta)
            run.scaler.scale(loss.sum() * (world.world_size / n_terms)).backward()
            if c == 0:    # the rollout's own transition recomputed: they differ by float noise only (C_orig members)
                orig = units.orig[u][uu].to(dev)
                terms["logprob_gap"] = torch.where(orig, (log_prob.detach() - rollout_lp).abs(), 0.0)
            for k, name in enumerate(GRPO_TERMS):
                if name in terms:
                    sums[k] += terms[name].double().sum().cpu()
                    counts[k] += (int(orig.sum()) if name == "logprob_gap" else len(uu))
        model.eval()
        all_reduce_grads(run.params, world)
        run.scaler.unscale_(run.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(run.params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        if torch.isfinite(grad_norm).item():
            run.scaler.step(run.optimizer)
        else:
            skipped = True
        run.scaler.update()
        run.optimizer.zero_grad(set_to_none=True)
        norms.append(grad_norm.item())
    both = torch.stack([sums, counts]).to(dev)
    if world.ddp:
        dist.all_reduce(both)
    sums, counts = both.cpu()
    out = {name: (sums[k] / counts[k]).item() for k, name in enumerate(GRPO_TERMS) if counts[k] > 0}
    out.update(grad_norm=float(np.mean(norms)) if norms else 0.0, skipped=skipped, updates=len(norms),
               kept_fraction=keep_all.double().mean().item())
    return out


def plan_stats(run, groups):
    """E-GRPO's branched steps this iteration, averaged over all prompts: active steps, merged ones (l > 1), and
    their entropy per dimension h/d = ½·log(2πe·a²·σ/(1 − σ)·Δσ) (nats)."""
    sig = sample.sigma_schedule(run.cfg.train_sample_steps).double().tolist()
    rows = [[len(b.plan), sum(l > 1 for _, l in b.plan),
             float(np.mean([sample.step_entropy(sig[i], sig[i + l], run.cfg.sde_eta) for i, l in b.plan]))]
            for b in groups]
    local = torch.tensor(rows, dtype=torch.float64).mean(0).to(run.world.device)
    if run.world.ddp:
        dist.all_reduce(local)
        local /= run.world.world_size
    active, merged, entropy = local.tolist()
    return {"egrpo_active_steps": active, "egrpo_merged_steps": merged, "egrpo_step_entropy": entropy}


def nft_phase(run, step, groups, perturbed, slots, rewards):
    """Advantages → r, then one NFT optimizer step. Returns (reward stats, update terms)."""
    r, stats = advantages(run, rewards)
    return stats, nft_update(run, step, groups, perturbed, slots, r)


def grpo_phase(transitions, extra_stats, run, step, groups, perturbed, slots, rewards):
    """Advantages (the gathered batch), the method's transitions, grpo_update (+ extra_stats(run, groups)).
    Returns (reward stats, update terms)."""
    ga = group_advantages(run, rewards)
    terms = grpo_update(run, step, transitions(run, groups), perturbed, ga)
    if extra_stats is not None:
        terms.update(extra_stats(run, groups))
    return ga.stats, terms


# method → (rollout sampler, update phase): where the methods differ; the loop (train) is the same for all
METHOD_PHASES = {
    "nft": (sample_nft, nft_phase),
    "flow_grpo": (sample_flow_grpo, lambda *a: grpo_phase(flow_grpo_transitions, None, *a)),
    "e_grpo": (sample_e_grpo, lambda *a: grpo_phase(e_grpo_transitions, plan_stats, *a)),
}


@torch.no_grad()
def update_old_and_ema(run, num_updates):
    """old ← d·old + (1−d)·θ (decay_type schedule); ema ← d'·ema + (1−d')·θ (warm-up). Returns d (None without an
    "old" adapter: the GRPO methods sample with the policy itself)."""
    d = None
    if "old" in run.adapters:
        d = old_decay(num_updates, run.cfg.decay_type)
        lerp_params_(M.lora_parameters(run.model, "old"), run.params, d)
    if run.cfg.use_ema:
        lerp_params_(M.lora_parameters(run.model, "ema"), run.params, ema_decay_at(num_updates, run.cfg.ema_decay))
    return d


@torch.no_grad()
def evaluate(run, adapter):
    """Held-out prompts × eval_num_images, Euler eval_sample_steps, with `adapter`; the noise is keyed by
    (prompt, image) alone, so every evaluation of every run sees the same draws. Returns ({name: mean over
    images}, this rank's first image of its first prompts, one caption per kept image: its prompt and scores). A
    GenEval strict score (name ending in "_strict") is reported as GenEval does when the prompts carry tags: the mean
    over tags, and each tag as name_<tag>."""
    cfg, world, dev = run.cfg, run.world, run.world.device
    lat = cfg.resolution // run.vae.factor
    n_img = cfg.eval_num_images
    mine = list(range(world.rank, len(cfg.eval_items) * n_img, world.world_size))   # image j of prompt i: i·n_img + j
    scores, tags, images_kept, captions = [], [], [], []
    for a in range(0, len(mine), cfg.rollout_micro_batch):
        ids = mine[a:a + cfg.rollout_micro_batch]
        items = [cfg.eval_items[i // n_img] for i in ids]
        prompts = [it["prompt"] for it in items]
        context, pooled = run.text.encode(prompts)
        # the same noise for every run and seed, so runs are compared on the same draws
        noise = torch.stack([torch.randn((16, lat, lat), generator=keyed_generator("eval", i // n_img, i % n_img))
                             for i in ids])
        with run.ctx(), M.use_adapter(run.model, adapter):
            x0 = sample.sample(run.model, noise.to(dev), context.to(dev), pooled.to(dev),
                               num_steps=cfg.eval_sample_steps, solver=cfg.eval_solver)
            images = run.vae.decode(x0).float()
        out, _ = score(run.eval_fn, images, prompts, items)
        scores.append(out)
        tags += [it.get("tag") for it in items]
        first = torch.tensor([i % n_img == 0 for i in ids])        # the grid shows each prompt's first image
        if sum(len(x) for x in images_kept) < cfg.grid_prompts and first.any():
            images_kept.append(images[first].cpu())
            captions += [caption(prompts[j], {k: v[j].item() for k, v in out.items()}) for j in range(len(ids))
                         if first[j]]
    local = {k: torch.cat([s[k] for s in scores]).tolist() for k in scores[0]} if scores else {}
    local["tag"] = tags
    gathered = [local]
    if world.ddp:
        gathered = [None] * world.world_size
        dist.all_gather_object(gathered, local)
    every = {k: [v for g in gathered for v in g.get(k, [])] for k in sorted({k for g in gathered for k in g})}
    tags = every.pop("tag", [])
    means = {k: float(np.mean(v)) for k, v in every.items()}
    for k, v in every.items():
        if k.endswith("_strict") and tags and None not in tags:
            summary = R.geneval_summary(v, tags)
            means[k] = summary.pop("overall")
            means.update({f"{k}_{t}": x for t, x in summary.items()})
    kept = torch.cat(images_kept)[:cfg.grid_prompts] if images_kept else None
    return means, kept, captions[:cfg.grid_prompts]


def caption(prompt, scores):
    """A grid tile's caption: the prompt, then its GenEval strict score (when the reward has one) and its reward."""
    parts = [f"strict {v:.0f}" for k, v in scores.items() if k.endswith("_strict")]
    parts += [f"reward {scores['avg']:.2f}"] if "avg" in scores else []
    return prompt + "\n" + " · ".join(parts)


def headline(means, n_prompts, n_images):
    """The held-out score a grid's title prints: GenEval strict when the reward has one, else the reward."""
    strict = [k for k in means if k.endswith("_strict")]
    name, value = (strict[0], means[strict[0]]) if strict else ("reward", means.get("avg", float("nan")))
    return f"held-out {name} {value:.3f} ({n_prompts} prompts x {n_images} images)"


def run_eval(run, step, tag=None):
    adapter = "ema" if run.cfg.use_ema else "policy"
    means, images, captions = evaluate(run, adapter)
    if run.world.master and images is not None:
        title = f"step {step} · {adapter} · {headline(means, len(run.cfg.eval_items), run.cfg.eval_num_images)}"
        sample.save_grid(images, os.path.join(run.cfg.out_dir, "samples", tag or f"step_{step:06d}.png"),
                         ncols=min(len(images), 4), labels=captions, title=title,
                         scale=sample.grid_scale(images))
    return means


def save_group_grid(run, step, group, item, rewards):
    """One rollout group: rows = variants (row 0 = the original prompt; E-GRPO: per active step), columns = seeds;
    each tile captioned with its variant, seed and reward, the prompt in the title."""
    rows = group.variant + getattr(group, "step_idx", 0) * run.cfg.num_variants
    order = torch.argsort(rows * run.cfg.num_seeds + group.seed_idx).tolist()
    labels = [("original" if group.variant[i] == 0 else f"variant {int(group.variant[i])}")
              + (f" · step {int(group.step_idx[i])}" if hasattr(group, "step_idx") else "")
              + f"\nseed {int(group.seed_idx[i])} · reward {float(rewards[i]):.2f}" for i in order]
    sample.save_grid(group.images[order], os.path.join(run.cfg.out_dir, "groups", f"step_{step:06d}.png"),
                     ncols=run.cfg.num_seeds, labels=labels, scale=sample.grid_scale(group.images),
                     title=f"step {step} · {item['prompt']!r} · rows: variants, columns: seeds")


# -----------------------------------------------------------------------------
# the loop

def prepare(cfg_dict):
    """Every check of train(), before anything loads: the settings (a dict of the keys above) → the validated cfg,
    holding out_dir's lock on rank 0 (cfg.lock, released by train_prepared)."""
    cfg = SimpleNamespace(**{**config_defaults(), **cfg_dict})
    return validate_config(cfg, world_size_from_env(), lock=int(os.environ.get("RANK", 0)) == 0)


def train(cfg_dict):
    """Run training with the given settings (a dict of the keys above). Returns the run namespace."""
    return train_prepared(prepare(cfg_dict))


def train_prepared(cfg):
    """train() after prepare(): load the models and run; out_dir's lock is released when this returns or raises."""
    try:
        return run_training(cfg)
    finally:
        release_lock(cfg)


def run_training(cfg):
    world = setup_distributed(cfg)
    random.seed(cfg.seed + world.rank)
    np.random.seed(cfg.seed + world.rank)
    torch.manual_seed(cfg.seed + world.rank)

    run = build_run(cfg, world)
    start = restore_checkpoint(run, cfg.checkpoint) if cfg.checkpoint is not None else 0
    cfg.checkpoint = None
    if world.master:       # written once the models load: a run that fails to start leaves out_dir as it was (only
                           # created, with its .lock)
        os.makedirs(cfg.out_dir, exist_ok=True)
        stale = os.path.join(cfg.out_dir, "ckpt.pt.tmp")
        if os.path.exists(stale):      # a save killed midway; ckpt.pt itself is whole (atomic_save)
            print0(f"removing {stale}, left by a checkpoint write that was interrupted")
            os.remove(stale)
        print(json.dumps(config_to_json(cfg), indent=1))
        tmp = os.path.join(cfg.out_dir, "config.json.tmp")
        with open(tmp, "w") as f:
            json.dump(config_to_json(cfg), f, indent=1)
        os.replace(tmp, os.path.join(cfg.out_dir, "config.json"))
    logger = Logger(cfg, world, start)
    n_global = cfg.prompts_per_step * samples_per_prompt(cfg)
    n_local = n_global // world.world_size
    sampler, update = METHOD_PHASES[cfg.method]
    if cfg.method == "nft":
        print0(f"world {world.world_size} · {cfg.prompts_per_step} prompts × K={cfg.num_variants} × G={cfg.num_seeds} "
               f"= {n_global} samples/step · {n_local // micro_batch_size(cfg, n_local)} micro-batches × "
               f"{num_train_timesteps(cfg)} timesteps per rank")
    else:
        print0(f"{cfg.method} · world {world.world_size} · {cfg.prompts_per_step} prompts × "
               f"{samples_per_prompt(cfg)} images (K={cfg.num_variants} × G={cfg.num_seeds}"
               + (f" × {cfg.egrpo_branch_steps or len(egrpo_plan(cfg))} active steps of the plan {egrpo_plan(cfg)}"
                  if cfg.method == "e_grpo" else "") + f") = {n_global} samples/step · {cfg.grpo_updates} update(s)")

    if cfg.eval_every > 0 and start == 0:
        means = run_eval(run, 0, "before.png")
        logger.log({"step": 0, **{f"eval_{k}" if k != "avg" else "eval_reward": v for k, v in means.items()}})
    bar = tqdm(range(start, cfg.max_steps), initial=start, total=cfg.max_steps, disable=not world.master,
               desc=("e2po" if cfg.num_variants > 1 else "nft") if cfg.method == "nft" else cfg.method)
    for step in bar:
        row = {"step": step + 1}
        t0 = time.time()
        slots, items = local_prompts(run, step)
        perturbed = learn_deltas(run, step, items)
        sync(world.device); t1 = time.time()
        groups, rewards, reward_s = rollout(run, step, slots, items, perturbed, sampler)
        sync(world.device); t2 = time.time()
        stats, terms = update(run, step, groups, perturbed, slots, rewards)
        sync(world.device); t3 = time.time()
        decay = update_old_and_ema(run, step + 1)
        run.skipped = run.skipped + 1 if terms["skipped"] else 0
        if run.skipped > cfg.max_skipped_steps:
            raise RuntimeError(f"{run.skipped} consecutive steps had a non-finite loss or gradient "
                               f"(last grad norm {terms['grad_norm']}); lower learning_rate or try dtype='bfloat16'")
        row.update(stats, **terms, lr=run.optimizer.param_groups[0]["lr"],
                   **({"old_decay": decay} if decay is not None else {}),
                   images_per_s=n_global / max(t2 - t1, 1e-9), time_delta=t1 - t0, time_rollout=t2 - t1,
                   time_reward=reward_s, time_update=t3 - t2)
        row.update(perturb_stats(perturbed, world), **spread_stats(groups, world))
        if world.master and cfg.log_images_every and (step + 1) % cfg.log_images_every == 0 and groups[0].images is not None:
            save_group_grid(run, step + 1, groups[0], items[0], rewards["avg"][:len(groups[0].latents)])
        del groups, perturbed
        last = step + 1 == cfg.max_steps
        if cfg.eval_every > 0 and ((step + 1) % cfg.eval_every == 0 or last):
            means = run_eval(run, step + 1, "after.png" if last else None)
            row.update({f"eval_{k}" if k != "avg" else "eval_reward": v for k, v in means.items()})
        logger.log(row)
        bar.set_postfix(reward=f"{row['reward_mean']:.3f}", std=f"{row['reward_std']:.3f}",
                        loss=f"{row.get('loss', float('nan')):.4f}")
        if (cfg.save_every and (step + 1) % cfg.save_every == 0) or last:
            save_checkpoint(run, step + 1)
    finish(run, logger)
    return run


def finish(run, logger):
    """Final LoRA files (diffusers-loadable), curves, and the before → after summary line."""
    cfg = run.cfg
    run.executor.shutdown()
    if run.world.master:
        M.save_lora(run.model, os.path.join(cfg.out_dir, "lora_policy.safetensors"), adapter="policy")
        if cfg.use_ema:
            M.save_lora(run.model, os.path.join(cfg.out_dir, "lora_ema.safetensors"), adapter="ema")
        plot_curves(logger.rows, os.path.join(cfg.out_dir, "curves.png"))
        evals = [r for r in logger.rows if "eval_reward" in r]
        if len(evals) > 1 and evals[0]["step"] == 0:
            before, after = evals[0], evals[-1]
            print(summary_table(cfg, before, after))
    if run.world.ddp:
        dist.barrier()


def summary_table(cfg, before, after):
    """The run's last lines: the held-out scores before → after, and GenEval strict per tag when the prompts carry
    tags."""
    adapter = "EMA" if cfg.use_ema else "policy"
    lines = [f"held-out scores ({adapter}, {len(cfg.eval_items)} prompts x {cfg.eval_num_images} images, step "
             f"{before['step']} → {after['step']})", f"  {'':<28}{'before':>8}{'after':>8}{'change':>9}"]
    keys = ["eval_reward"] + sorted(k for k in before if k.endswith("_strict"))
    for k in keys:
        name = f"{cfg.eval_reward or cfg.reward} reward" if k == "eval_reward" else k[5:]
        rows = [(name, k)] + [(f"  {t[len(k) + 1:]}", t) for t in before if t.startswith(k + "_")]
        for label, key in rows:
            a, b = before[key], after.get(key, float("nan"))
            lines.append(f"  {label:<28}{a:>8.3f}{b:>8.3f}{b - a:>+9.3f}")
    return "\n".join(lines)


def main(argv):
    with user_errors("train.py"):      # a mistake in the settings: one line, exit status 2 (configurator.py)
        cfg = prepare(configure(config_defaults(), argv))
    run = train_prepared(cfg)
    if run.world.ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
