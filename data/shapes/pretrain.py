"""Pretrain the shapes world's tiny SD3 from scratch, on CPU, and save it where the real loaders read it.

    python data/shapes/pretrain.py                 # about 30 minutes on 2 cores; writes data/shapes/sd3_tiny/
    python data/shapes/pretrain.py --quick --out /tmp/sd3_tiny   # a smoke run in about a minute

The result is a small model of the real architecture (MMDiT with dual attention and qk-norm, the SD3
16-channel VAE, CLIP-L- and CLIP-G-shaped text towers with a CLIP BPE tokenizer) laid out as a diffusers
pipeline root: transformer/, vae/, text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/, scheduler/,
model_index.json. `python train.py` starts RL from it through the same loading code as SD3.5.

Three stages, each a fixed number of steps so a rerun reproduces the same weights on the same machine:
  1. VAE: reconstruction of rendered images (MSE + L1), latents kept near zero mean / unit variance in model
     space so SD3's fixed scale and shift (1.5305, 0.0609) apply as they are.
  2. Text towers: CLIP-style contrastive training against a throwaway image tower, so the pooled embeddings
     (what E²PO perturbs and compares by cosine) are semantic for this world.
  3. MMDiT: rectified flow on VAE latents (logit-normal σ, as SD3), text towers frozen, EMA of the weights.

Departures from SD3: tiny widths; the CLIP tokenizers stop at TOKEN_LENGTH tokens and the (absent) T5 part is
T5_LENGTH zero tokens, not 77 and 256, so attention stays cheap on a CPU. Prompts are the train split only;
the test split stays held out for evaluation.
"""
import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import CLIPTokenizer

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))  # the repo root, so `python data/shapes/pretrain.py` imports model
import model  # noqa: E402
from data.shapes import world  # noqa: E402

# ----------------------------------------------------------------------------- sizes
TOKEN_LENGTH = 16                      # CLIP tokens per prompt (SD3: 77); the longest world prompt has 13
T5_LENGTH = 8                          # zero "T5" tokens appended to the context (SD3: 256)
CLIP_L = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=1,
              projection_dim=64, hidden_act="quick_gelu")
CLIP_G = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=3, num_attention_heads=2,
              projection_dim=128, hidden_act="gelu")
JOINT_DIM = 256                        # context channels: CLIP-L ‖ CLIP-G (192) zero-padded, as SD3 pads to 4096
MMDIT = model.MMDiTConfig(hidden_size=128, depth=4, num_heads=2, context_dim=JOINT_DIM,
                          pooled_dim=CLIP_L["projection_dim"] + CLIP_G["projection_dim"],
                          pos_embed_max_size=16, qk_norm=True, dual_attention_layers=(0, 1))
VAE_CHANNELS = (32, 32, 64, 64)

# ----------------------------------------------------------------------------- schedule
STEPS = dict(vae=2000, text=300, mmdit=8000)
QUICK_STEPS = dict(vae=5, text=5, mmdit=10)
BATCH = dict(vae=16, text=128, mmdit=64)
VAE_CROP = 32                          # the VAE trains on random crops of the 64x64 renders
FG_WEIGHT = 9.0                        # reconstruction weight of object pixels relative to background
LR = dict(vae=2e-3, text=1e-3, mmdit=1e-3)
IMAGES_PER_PROMPT = 12                 # the fixed flow-matching dataset: renders per train prompt
EMA_DECAY = 0.999
SEED = 0


def log(msg):
    print(f"[pretrain {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def adamw(params, lr):
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.99))


def cosine_lr(opt, step, total, base, warmup=50):
    lr = base * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / total))
    for g in opt.param_groups:
        g["lr"] = lr


# ----------------------------------------------------------------------------- stage 1: VAE
def random_crops(images, size, rng):
    """One random size x size crop per image: the VAE is convolutional, and crops cost a quarter."""
    ys, xs = rng.integers(0, images.shape[-2] - size + 1, len(images)), rng.integers(0, images.shape[-1] - size + 1, len(images))
    return torch.stack([im[:, y:y + size, x:x + size] for im, y, x in zip(images, ys, xs)])


def train_vae(prompts, steps, rng):
    vae = model.VAE(VAE_CHANNELS)
    opt = adamw(vae.parameters(), LR["vae"])
    for step in range(steps):
        metas = [prompts[i] for i in rng.integers(len(prompts), size=BATCH["vae"])]
        images = random_crops(world.render_batch(metas, rng), VAE_CROP, rng)
        mean = vae.encoder(images * 2 - 1)[:, :vae.latent_channels]
        latents = (mean - model.VAE_SHIFT) * model.VAE_SCALE
        noisy = latents + 0.1 * torch.randn_like(latents)      # a decoder that tolerates imperfect latents
        recon = vae.decoder(noisy / model.VAE_SCALE + model.VAE_SHIFT) / 2 + 0.5
        # objects are a few % of the pixels: weight them up, or the flat background dominates and colours wash out
        background = images[:, :, :1, :1]
        weight = 1 + FG_WEIGHT * ((images - background).abs().amax(1, keepdim=True) > 0.1).float()
        rec = (weight * ((recon - images) ** 2 + 0.1 * (recon - images).abs())).mean() / weight.mean()
        mu, var = latents.mean((0, 2, 3)), latents.var((0, 2, 3))
        reg = (mu ** 2).mean() + ((var - 1) ** 2).mean()
        loss = rec + 1e-3 * reg
        cosine_lr(opt, step, steps, LR["vae"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"vae {step:5d}/{steps} recon {rec.item():.5f} latent mean {mu.mean().item():+.3f} "
                f"var {var.mean().item():.3f}")
    return vae.eval().requires_grad_(False)


# ----------------------------------------------------------------------------- stage 2: text towers
def build_text_encoders(root):
    """Random CLIP-L/CLIP-G-shaped towers + the world's tokenizers, written under root and loaded back."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection
    for name, pad in (("tokenizer", world.EOS), ("tokenizer_2", "!")):   # SD3 pads CLIP-G with "!"
        world.write_clip_tokenizer(root / name, pad_token=pad)
        config_file = root / name / "tokenizer_config.json"
        config = json.loads(config_file.read_text())
        config_file.write_text(json.dumps({**config, "model_max_length": TOKEN_LENGTH}, indent=2))
    vocab = json.loads((root / "tokenizer" / "vocab.json").read_text())
    towers = []
    for spec in (CLIP_L, CLIP_G):
        cfg = CLIPTextConfig(vocab_size=len(vocab), max_position_embeddings=TOKEN_LENGTH,
                             bos_token_id=vocab[world.BOS], eos_token_id=vocab[world.EOS], pad_token_id=1, **spec)
        towers.append(CLIPTextModelWithProjection(cfg))
    return towers


def train_text(towers, prompts, steps, rng, root):
    """CLIP-style InfoNCE between each tower's pooled embedding and a small CNN's image embedding."""
    clip_l, clip_g = towers
    image_tower = nn.Sequential(
        nn.Conv2d(3, 32, 3, 2, 1), nn.GELU(), nn.Conv2d(32, 64, 3, 2, 1), nn.GELU(),
        nn.Conv2d(64, 128, 3, 2, 1), nn.GELU(), nn.Conv2d(128, 128, 3, 2, 1), nn.GELU(),
        nn.Flatten(), nn.Linear(128 * 16, 256), nn.GELU(),
        nn.Linear(256, CLIP_L["projection_dim"] + CLIP_G["projection_dim"]))
    logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    params = [*clip_l.parameters(), *clip_g.parameters(), *image_tower.parameters(), logit_scale]
    opt = adamw(params, LR["text"])
    tokenizers = [CLIPTokenizer.from_pretrained(root / name) for name in ("tokenizer", "tokenizer_2")]
    for step in range(steps):
        metas = [prompts[i] for i in rng.choice(len(prompts), size=BATCH["text"], replace=False)]
        images = world.render_batch(metas, rng)
        img = image_tower(images * 2 - 1).split([CLIP_L["projection_dim"], CLIP_G["projection_dim"]], -1)
        labels = torch.arange(len(metas))
        loss = 0.0
        for tower, tok, emb in zip(towers, tokenizers, img):
            ids = tok([m["prompt"] for m in metas], padding="max_length", max_length=TOKEN_LENGTH,
                      truncation=True, return_tensors="pt")["input_ids"]
            txt = F.normalize(tower(input_ids=ids).text_embeds, dim=-1)
            logits = logit_scale.exp().clamp(max=100) * txt @ F.normalize(emb, dim=-1).T
            loss = loss + (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        cosine_lr(opt, step, steps, LR["text"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"text {step:5d}/{steps} contrastive loss {loss.item():.4f}")
    for tower in towers:
        tower.eval().requires_grad_(False)


# ----------------------------------------------------------------------------- stage 3: MMDiT
@torch.no_grad()
def flow_dataset(vae, text, prompts, rng):
    """Latents of IMAGES_PER_PROMPT renders per prompt and each prompt's (context, pooled)."""
    context, pooled = text.encode([m["prompt"] for m in prompts])
    latents, index = [], []
    for i in range(IMAGES_PER_PROMPT):
        latents.append(torch.cat([vae.encode(world.render_batch(prompts[j:j + 128], rng))
                                  for j in range(0, len(prompts), 128)]))
        index.append(torch.arange(len(prompts)))
    return torch.cat(latents), torch.cat(index), context, pooled


def train_mmdit(vae, text, prompts, steps, rng, generator):
    latents, index, context, pooled = flow_dataset(vae, text, prompts, rng)
    log(f"flow dataset: {len(latents)} latents, std {latents.std().item():.3f}, mean {latents.mean().item():+.3f}")
    dit = model.MMDiT(MMDIT)
    ema = model.MMDiT(MMDIT)
    ema.load_state_dict(dit.state_dict())
    ema.requires_grad_(False)
    opt = adamw(dit.parameters(), LR["mmdit"])
    for step in range(steps):
        pick = torch.randint(len(latents), (BATCH["mmdit"],), generator=generator)
        x0, c, y = latents[pick], context[index[pick]], pooled[index[pick]]
        sigma = torch.sigmoid(torch.randn(len(pick), generator=generator))   # logit-normal (SD3)
        noise = torch.randn(x0.shape, generator=generator)
        s = sigma.view(-1, 1, 1, 1)
        v = dit((1 - s) * x0 + s * noise, sigma, c, y)
        loss = F.mse_loss(v, noise - x0)
        cosine_lr(opt, step, steps, LR["mmdit"], warmup=200)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(dit.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), dit.parameters()):
                pe.lerp_(p, 1 - min(EMA_DECAY, (1 + step) / (10 + step)))
        if step % 100 == 0 or step == steps - 1:
            log(f"mmdit {step:5d}/{steps} flow loss {loss.item():.4f}")
    return ema.eval()


# ----------------------------------------------------------------------------- saving + a first look
def save_pipeline(root, dit, vae, towers):
    """Everything in fp16 (the shipped files stay under 10 MB); the loaders upcast to the dtype asked for."""
    model.save_diffusers(dit.half(), root / "transformer", sample_size=world.SIZE // vae.factor)   # latent side at 64 px
    model.save_diffusers(vae.half(), root / "vae")
    for tower, name in zip(towers, ("text_encoder", "text_encoder_2")):
        tower.half().save_pretrained(root / name, safe_serialization=True)
    (root / "scheduler").mkdir(exist_ok=True)
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}, indent=2))
    index = {"_class_name": "StableDiffusion3Pipeline", "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
             "text_encoder": ["transformers", "CLIPTextModelWithProjection"], "text_encoder_2":
             ["transformers", "CLIPTextModelWithProjection"], "text_encoder_3": [None, None],
             "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
             "tokenizer_3": [None, None], "transformer": ["diffusers", "SD3Transformer2DModel"],
             "vae": ["diffusers", "AutoencoderKL"]}
    (root / "model_index.json").write_text(json.dumps(index, indent=2))
    (root / model.PIPELINE_NOTES).write_text(json.dumps({"max_sequence_length": T5_LENGTH}))   # no T5: its zeros


@torch.no_grad()
def first_look(root, n=64):
    """Sample test prompts with the saved model (DPM-Solver++ 10 steps, as the rollouts) and score them."""
    import reward
    import sample
    dit, vae = model.load_mmdit(root), model.load_vae(root)
    text = model.load_text_encoders(root, t5=False)
    metas = world.load_prompts("test")[:n]
    context, pooled = text.encode([m["prompt"] for m in metas])
    g = torch.Generator().manual_seed(SEED)
    lat = world.SIZE // vae.factor
    noise = torch.randn(len(metas), 16, lat, lat, generator=g)
    x0 = sample.sample(dit, noise, context, pooled, num_steps=10, solver="dpm2m")
    images = vae.decode(x0)
    scores = reward.build("shapes")(images, [m["prompt"] for m in metas], metas)
    sample.save_grid(images, root.parent / "pretrain_samples.png", ncols=8)
    return scores["shapes"].mean().item(), scores["shapes_strict"].float().mean().item()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(HERE / "sd3_tiny"))
    parser.add_argument("--quick", action="store_true", help="a few steps per stage (smoke test)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reuse_text", default="", help="take text_encoder*/ from this pipeline root instead of training")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    rng = np.random.default_rng(SEED)
    generator = torch.Generator().manual_seed(SEED)
    steps = QUICK_STEPS if args.quick else STEPS
    prompts = world.load_prompts("train")
    root = Path(args.out)
    tmp = root.with_name(root.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    t0 = time.time()

    vae = train_vae(prompts, steps["vae"], rng)
    towers = build_text_encoders(tmp)
    if args.reuse_text:   # a development shortcut: keep the text towers of an earlier run
        from transformers import CLIPTextModelWithProjection
        towers = [CLIPTextModelWithProjection.from_pretrained(Path(args.reuse_text) / name, torch_dtype=torch.float32)
                  .eval().requires_grad_(False) for name in ("text_encoder", "text_encoder_2")]
        log(f"text towers reused from {args.reuse_text}")
    else:
        train_text(towers, prompts, steps["text"], rng, tmp)
    text = model.TextEncoders(*towers, *(CLIPTokenizer.from_pretrained(tmp / n) for n in ("tokenizer", "tokenizer_2")),
                              max_sequence_length=T5_LENGTH, joint_dim=JOINT_DIM)
    dit = train_mmdit(vae, text, prompts, steps["mmdit"], rng, generator)
    save_pipeline(tmp, dit, vae, towers)
    shutil.rmtree(root, ignore_errors=True)
    os.replace(tmp, root)                 # the old pipeline stays until the new one is complete
    size = sum(f.stat().st_size for f in root.rglob("*") if f.is_file()) / 2 ** 20
    log(f"wrote {root} ({size:.1f} MB) in {(time.time() - t0) / 60:.1f} min")
    partial, strict = first_look(root)
    log(f"test prompts, DPM-Solver++ 10 steps: shapes GenEval partial {partial:.3f}, strict {strict:.3f}")


if __name__ == "__main__":
    main()
