"""Pretrain the shapes world's tiny SD3 from scratch, on CPU, and save it where the real loaders read it.

    python data/shapes/pretrain.py                      # all stages into out/sd3_tiny; hours on 2 CPU cores (STEPS)
    python data/shapes/pretrain.py --resume             # continue from the states saved in out/sd3_tiny.tmp/
    python data/shapes/pretrain.py --out data/shapes/sd3_tiny --replace   # rebuild the shipped model in place
    python data/shapes/pretrain.py --quick --out /tmp/sd3_tiny   # a smoke run of every stage in about a minute
    python data/shapes/pretrain.py --evaluate           # score the shipped model per GenEval tag, with and without CFG,
                                                        # its VAE's round trip, its towers' one-attribute cosines

Nothing is overwritten by accident: the default output is out/sd3_tiny, never the shipped model; an --out that holds
anything but a pipeline of this script is refused, and replacing one takes --replace (the new pipeline is written
beside it and swapped in whole). The work folder OUT.tmp/ holds the stages' saved states: a new run refuses to start
over it (continue with --resume, or delete it yourself). A long run whose work folder is gone continues from a saved
pipeline with --warm_start PIPELINE (its VAE, towers and MMDiT, at the step its e2po.json records); --vae_from PIPELINE
takes only the VAE (stage 1 costs ~2 CPU-s a step: 3000 steps are ~1.7 CPU-hours).

The result is a small model of the real architecture (MMDiT with dual attention and qk-norm, the SD3 16-channel VAE,
CLIP-L- and CLIP-G-shaped text towers with a CLIP BPE tokenizer) laid out as a diffusers pipeline root: transformer/,
vae/, text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/, scheduler/, model_index.json, plus e2po.json (the
conventions it was trained with). `python train.py` starts RL from it through the same loading code as SD3.5.

Three stages, each a fixed number of steps from fixed seeds, each saved to the work folder (OUT.tmp/) as it goes so
that a stopped run resumes (`--resume`) where it stopped:
  1. VAE: reconstruction of rendered images (MSE + L1, object pixels weighted up), latents kept near zero mean / unit
     variance in model space so SD3's fixed scale and shift (1.5305, 0.0609) apply as they are. Three levels: 4×
     downsampling, 16×16×16 latents for a 64² image (SD3's VAE has four levels, 8×).
  2. Text towers: CLIP-style contrastive training against a throwaway image tower on tag-balanced batches of train
     prompts, plus an auxiliary loss that reads each sentence's attributes (its first and second shape, count,
     colours, relation) off the pooled embedding with cosine classifiers, and a hinge that keeps sentences one
     attribute apart below a cosine, both on sentences of the world's whole language (text only, as CLIP's text side
     has read every phrase), so the pooled vectors (what drives adaLN, and what E²PO perturbs and compares by cosine)
     tell shapes, counts, relations and word order apart, not only colours.
  3. MMDiT: rectified flow on VAE latents of a tag-balanced dataset (LATENTS_PER_TAG renders of each tag, so single
     objects are a sixth of the data, not 0.6 %), logit-normal σ time-shifted by SIGMA_SHIFT (the sampler's shift: the
     steps that decide a shape are at high noise), text towers frozen, EMA of the weights (every EVAL_EVERY steps
     scored and saved as a pipeline in OUT.tmp/ema/), SD3's
     per-encoder caption dropout: CLIP-L and CLIP-G are each replaced by the empty prompt's encoding with probability
     CAPTION_DROPOUT, so the model also learns the unconditional velocity and classifier-free guidance works, as in the
     real model: a weaker CFG-free sampler and a stronger CFG one, the gap RL closes without CFG.

Departures from SD3: tiny widths; the CLIP tokenizers stop at TOKEN_LENGTH tokens and the (absent) T5 part is
T5_LENGTH zero tokens, not 77 and 256, so attention stays cheap on a CPU (e2po.json records T5_LENGTH for the loaders).
Images are of train prompts only; the test split's combinations stay held out for evaluation (its single objects are
atoms, trained on: world.split_prompts). Only the towers' text-only terms read held-out sentences.
"""
import argparse
import copy
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))  # the repo root, so `python data/shapes/pretrain.py` imports model
import model  # noqa: E402
import reward  # noqa: E402
import sample  # noqa: E402
from configurator import user_errors  # noqa: E402
from data.shapes import world  # noqa: E402

# ----------------------------------------------------------------------------- sizes
TOKEN_LENGTH = 16                      # CLIP tokens per prompt (SD3: 77); the longest world prompt has 13
T5_LENGTH = 8                          # zero "T5" tokens appended to the context (SD3: 256)
CLIP_L = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=1,
              projection_dim=64, hidden_act="quick_gelu")
CLIP_G = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=3, num_attention_heads=2,
              projection_dim=128, hidden_act="gelu")
JOINT_DIM = 256                        # context channels: CLIP-L ‖ CLIP-G (192) zero-padded, as SD3 pads to 4096
VAE_CHANNELS = (32, 32, 64)            # three levels: 4x downsampling (a 16x16 latent grid at 64 px)
MMDIT = model.MMDiTConfig(hidden_size=128, depth=4, num_heads=2, patch_size=2, context_dim=JOINT_DIM,
                          pooled_dim=CLIP_L["projection_dim"] + CLIP_G["projection_dim"],
                          pos_embed_max_size=16, qk_norm=True, dual_attention_layers=(0, 1))

# ----------------------------------------------------------------------------- schedule
STEPS = dict(vae=3000, text=1000, mmdit=14000)
QUICK_STEPS = dict(vae=4, text=4, mmdit=6)
QUICK_DATA = dict(per_tag=12, evaluate_every=0)
BATCH = dict(vae=32, text=128, mmdit=64)
LR = dict(vae=2e-3, text=1e-3, mmdit=1e-3)
WARMUP = dict(vae=50, text=50, mmdit=200)
VAE_CROP = 32                          # the VAE trains on random 32x32 crops of the 64x64 renders (it is convolutional)
FG_WEIGHT = 9.0                        # reconstruction weight of object pixels relative to background
LATENT_NOISE = 0.1                     # the decoder learns to tolerate imperfect latents
LATENTS_PER_TAG = 6000                 # the fixed flow-matching dataset: renders per tag, spread over its prompts
AUX_WEIGHT = 1.0                       # text towers: attribute loss next to the contrastive one
AUX_SCALE = 16.0                       # the attribute heads' cosine-logit scale (a prompt must point at its classes)
SPREAD_MAX = 0.8                       # text towers: pooled cosine allowed between prompts one attribute apart ...
SPREAD_WEIGHT = 10.0                   # ... and the weight of the hinge on the excess (RESULTS.md: 1 left 0.94)
CAPTION_DROPOUT = 0.2                  # per text encoder (SD3: 0.464 for each of three); both dropped: 4 %
EMA_DECAY = 0.999
SIGMA_SHIFT = 3.0                      # training σ: a logit-normal draw time-shifted as the sampler's (shift 3)
SAVE_EVERY = dict(vae=500, text=200, mmdit=1000)   # steps between saved states (~10-20 CPU-min each)
EVAL_EVERY = 2000                      # MMDiT steps between progress evaluations (held-out strict, 4 images a prompt)
SEED = 0


def log(msg):
    print(f"[pretrain {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def adamw(params, lr):
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.99))


def cosine_lr(opt, step, total, base, warmup):
    lr = base * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / total))
    for g in opt.param_groups:
        g["lr"] = lr


def generators(stage, step):
    """(numpy rng, torch generator) keyed by (stage, step): a resumed stage draws what an uninterrupted one would."""
    key = [SEED, ["vae", "text", "mmdit"].index(stage), step]
    return np.random.default_rng(key), torch.Generator().manual_seed(int(np.random.SeedSequence(key).generate_state(1)[0]))


def load_state(path):
    """torch.load of a work-folder file; a damaged one is an error that names it (and what to do)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path} is damaged: torch.load cannot read it ({type(e).__name__}); delete it to redo "
                         "that part, or start the stage over without --resume") from None


class Stage:
    """A stage's modules + optimizer, saved to work/<name>.pt every SAVE_EVERY[name] steps (atomically) and at the
    end."""

    def __init__(self, name, work, modules, opt, steps):
        self.name, self.path, self.modules, self.opt, self.steps = name, work / f"{name}.pt", modules, opt, steps
        self.step, self.cpu = 0, 0.0          # steps done, and the CPU seconds they took (evaluations excluded)

    def resume(self):
        if self.path.is_file():
            state = load_state(self.path)
            for k, m in self.modules.items():
                m.load_state_dict(state[k])
            self.opt.load_state_dict(state["opt"])
            self.step, self.cpu = state["step"], state.get("cpu", 0.0)
            log(f"{self.name}: resumed at step {self.step}/{self.steps}")
        return self

    def done(self):
        return self.step >= self.steps

    def save(self):
        tmp = self.path.with_suffix(".tmp")
        torch.save({"step": self.step, "cpu": self.cpu, "opt": self.opt.state_dict(),
                    **{k: m.state_dict() for k, m in self.modules.items()}}, tmp)
        os.replace(tmp, self.path)


# ----------------------------------------------------------------------------- stage 1: VAE
def random_crops(images, size, rng):
    """One random size x size crop per image."""
    ys = rng.integers(0, images.shape[-2] - size + 1, len(images))
    xs = rng.integers(0, images.shape[-1] - size + 1, len(images))
    return torch.stack([im[:, y:y + size, x:x + size] for im, y, x in zip(images, ys, xs)])


def train_vae(prompts, steps, work, resume):
    vae = model.VAE(VAE_CHANNELS)
    st = Stage("vae", work, {"vae": vae}, adamw(vae.parameters(), LR["vae"]), steps)
    if resume:
        st.resume()
    while not st.done():
        rng, gen = generators("vae", st.step)
        metas = [prompts[i] for i in rng.integers(len(prompts), size=BATCH["vae"])]
        images = random_crops(world.render_batch(metas, rng), VAE_CROP, rng)
        mean = vae.encoder(images * 2 - 1)[:, :vae.latent_channels]
        latents = (mean - model.VAE_SHIFT) * model.VAE_SCALE
        noisy = latents + LATENT_NOISE * torch.randn(latents.shape, generator=gen)
        recon = vae.decoder(noisy / model.VAE_SCALE + model.VAE_SHIFT) / 2 + 0.5
        # objects are a few % of the pixels: weight them up, or the flat background dominates and colours wash out
        background = images[:, :, :1, :1]
        weight = 1 + FG_WEIGHT * ((images - background).abs().amax(1, keepdim=True) > 0.1).float()
        rec = (weight * ((recon - images) ** 2 + 0.1 * (recon - images).abs())).mean() / weight.mean()
        mu, var = latents.mean((0, 2, 3)), latents.var((0, 2, 3))
        loss = rec + 1e-3 * ((mu ** 2).mean() + ((var - 1) ** 2).mean())
        cosine_lr(st.opt, st.step, steps, LR["vae"], WARMUP["vae"])
        st.opt.zero_grad(set_to_none=True)
        loss.backward()
        st.opt.step()
        st.step += 1
        if st.step % 200 == 0 or st.done():
            log(f"vae {st.step:5d}/{steps} recon {rec.item():.5f} latent mean {mu.mean().item():+.3f} "
                f"var {var.mean().item():.3f}")
        if st.step % SAVE_EVERY["vae"] == 0 or st.done():
            st.save()
    return vae.eval().requires_grad_(False)


# ----------------------------------------------------------------------------- stage 2: text towers
def write_tokenizers(root):
    for name, pad in (("tokenizer", world.EOS), ("tokenizer_2", "!")):   # SD3 pads CLIP-G with "!"
        world.write_clip_tokenizer(root / name, pad_token=pad)
        config_file = root / name / "tokenizer_config.json"
        config = json.loads(config_file.read_text())
        config_file.write_text(json.dumps({**config, "model_max_length": TOKEN_LENGTH}, indent=2))
    return [CLIPTokenizer.from_pretrained(root / name) for name in ("tokenizer", "tokenizer_2")]


def build_text_towers(vocab_size, bos, eos):
    torch.manual_seed(SEED)
    return [CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=vocab_size, max_position_embeddings=TOKEN_LENGTH, bos_token_id=bos, eos_token_id=eos,
        pad_token_id=1, **spec)) for spec in (CLIP_L, CLIP_G)]


SLOTS = dict(first=world.SHAPES, second=world.SHAPES + ("none",), count=(1,) + world.COUNTS,
             first_color=tuple(world.COLORS) + ("none",), second_color=tuple(world.COLORS) + ("none",),
             relation=world.RELATIONS + ("none",))


def prompt_slots(meta):
    """A prompt's attributes in the order its words name them: {slot: value} over SLOTS. ("a photo of a square left of
    a circle": first square, second circle, relation "left of"; GenEval's metadata lists the circle first.)"""
    items = meta["include"][::-1] if meta["tag"] == "position" else meta["include"]
    first, second = items[0], (items[1] if len(items) > 1 else {})
    return dict(first=first["class"], second=second.get("class", "none"), count=first.get("count", 1),
                first_color=first.get("color", "none"), second_color=second.get("color", "none"),
                relation=meta["include"][-1].get("position", ["none"])[0])


def slot_targets(metas):
    """(B, len(SLOTS)) class indices of each prompt's attributes."""
    return torch.tensor([[SLOTS[k].index(v) for k, v in prompt_slots(m).items()] for m in metas])


def tag_balanced(prompts, n, rng):
    """n prompt indices: a tag uniformly, then a prompt of that tag uniformly (train.jsonl is 83 % color_attr)."""
    by_tag = [[i for i, m in enumerate(prompts) if m["tag"] == t] for t in world.TAGS]
    tags = rng.integers(len(by_tag), size=n)
    return [by_tag[t][rng.integers(len(by_tag[t]))] for t in tags]


def train_text(towers, tokenizers, prompts, steps, work, resume):
    """CLIP-style InfoNCE between each tower's pooled embedding and a small CNN's image embedding on tag-balanced
    batches of train prompts (a batch's repeated prompts are all positives), plus, on a second tag-balanced batch of
    the world's *language* (every sentence its grammar forms, world.make_prompts: text only), AUX_WEIGHT × the
    cross-entropy of cosine classifiers that read each sentence's attributes (SLOTS) off the tower's normalised
    pooled embedding, and SPREAD_WEIGHT × how far each sentence's cosine to a sentence one attribute away exceeds
    SPREAD_MAX.

    Why the whole language: the towers play CLIP's part, and CLIP's text side has read "two triangles" whatever
    GenEval holds out. Trained on the train split's sentences alone, the towers learnt "triangles" as "four" (the only
    count the split gives them) and encoded the held-out "two triangles" as four (RESULTS.md). No held-out image is
    seen by any stage: the contrastive term and every later stage use the train split's prompts only."""
    torch.manual_seed(SEED + 1)
    image_tower = nn.Sequential(
        nn.Conv2d(3, 32, 3, 2, 1), nn.GELU(), nn.Conv2d(32, 64, 3, 2, 1), nn.GELU(),
        nn.Conv2d(64, 128, 3, 2, 1), nn.GELU(), nn.Conv2d(128, 128, 3, 2, 1), nn.GELU(),
        nn.Flatten(), nn.Linear(128 * 16, 256), nn.GELU(),
        nn.Linear(256, CLIP_L["projection_dim"] + CLIP_G["projection_dim"]))
    scale = nn.Module()
    scale.logit = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    heads = nn.ModuleList(nn.ParameterList(nn.Parameter(torch.randn(len(v), spec["projection_dim"]))
                                           for v in SLOTS.values()) for spec in (CLIP_L, CLIP_G))
    modules = {"clip_l": towers[0], "clip_g": towers[1], "image_tower": image_tower, "scale": scale, "heads": heads}
    params = [p for m in modules.values() for p in m.parameters()]
    st = Stage("text", work, modules, adamw(params, LR["text"]), steps)
    if resume:
        st.resume()
    language = world.make_prompts()
    neighbours = [[] for _ in language]
    for ij in one_attribute_pairs(language).values():
        for i, j in ij:
            neighbours[i].append(j)
            neighbours[j].append(i)
    while not st.done():
        rng, _ = generators("text", st.step)
        metas = [prompts[i] for i in tag_balanced(prompts, BATCH["text"], rng)]
        picks = tag_balanced(language, BATCH["text"], rng)
        sentences = [language[i] for i in picks]
        near = [language[neighbours[i][rng.integers(len(neighbours[i]))]]["prompt"] for i in picks]
        images = world.render_batch(metas, rng)
        img = image_tower(images * 2 - 1).split([CLIP_L["projection_dim"], CLIP_G["projection_dim"]], -1)
        ids = [m["prompt"] for m in metas]
        same = torch.tensor([[a == b for b in ids] for a in ids], dtype=torch.float32)
        targets, slots = same / same.sum(1, keepdim=True), slot_targets(sentences)
        contrastive = aux = spread = 0.0
        for tower, tok, emb, head in zip(towers, tokenizers, img, heads):
            tokens = tok(ids + [m["prompt"] for m in sentences] + near, padding="max_length", max_length=TOKEN_LENGTH,
                         truncation=True, return_tensors="pt")
            txt, said, said_near = F.normalize(tower(input_ids=tokens["input_ids"]).text_embeds, dim=-1).chunk(3)
            logits = scale.logit.exp().clamp(max=100) * txt @ F.normalize(emb, dim=-1).T
            contrastive = contrastive + (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
            spread = spread + F.relu((said * said_near).sum(-1) - SPREAD_MAX).mean()
            for k, w in enumerate(head):
                aux = aux + F.cross_entropy(AUX_SCALE * said @ F.normalize(w, dim=-1).T, slots[:, k]) / len(SLOTS)
        loss = contrastive + AUX_WEIGHT * aux + SPREAD_WEIGHT * spread
        cosine_lr(st.opt, st.step, steps, LR["text"], WARMUP["text"])
        st.opt.zero_grad(set_to_none=True)
        loss.backward()
        st.opt.step()
        st.step += 1
        if st.step % 100 == 0 or st.done():
            log(f"text {st.step:5d}/{steps} contrastive loss {contrastive.item():.4f} attributes {aux.item():.4f} "
                f"spread {spread.item():.4f}")
        if st.step % SAVE_EVERY["text"] == 0 or st.done():
            st.save()
    for tower in towers:
        tower.eval().requires_grad_(False)


def one_attribute_pairs(rows):
    """{kind: [(i, j), ...]}: pairs of prompts of one tag that differ in one attribute (shape, colour, count,
    relation) or only in word order (the same words, the two objects swapped)."""
    slots = [prompt_slots(m) for m in rows]
    kinds = {"first": "shape", "second": "shape", "first_color": "colour", "second_color": "colour",
             "count": "count", "relation": "relation"}
    pairs = {}
    for i in range(len(rows)):
        for j in range(i + 1, len(rows)):
            if rows[i]["tag"] != rows[j]["tag"]:
                continue
            a, b = slots[i], slots[j]
            diff = [k for k in a if a[k] != b[k]]
            swapped = (a["first"], a["first_color"], a["second"], a["second_color"]) == \
                (b["second"], b["second_color"], b["first"], b["first_color"]) and a["relation"] == b["relation"]
            kind = kinds[diff[0]] if len(diff) == 1 else "order" if swapped else None
            if kind:
                pairs.setdefault(kind, []).append((i, j))
    return pairs


def new_towers(work):
    """The tokenizer folders written into `work`, and (untrained towers, tokenizers) over their vocabulary."""
    tokenizers = write_tokenizers(work)
    vocab = json.loads((work / "tokenizer" / "vocab.json").read_text())
    return build_text_towers(len(vocab), vocab[world.BOS], vocab[world.EOS]), tokenizers


def text_encoders(towers, tokenizers):
    return model.TextEncoders(*towers, *tokenizers, max_sequence_length=T5_LENGTH, joint_dim=JOINT_DIM)


def text_stage(prompts, steps, work, resume):
    """Stage 2 as a unit: the tokenizer folders, the towers, their training. Returns (towers, tokenizers, the
    TextEncoders that encode with them)."""
    towers, tokenizers = new_towers(work)
    train_text(towers, tokenizers, prompts, steps, work, resume)
    return towers, tokenizers, text_encoders(towers, tokenizers)


def saved_text_encoders(work):
    """The TextEncoders of a finished text stage saved in `work` (its towers' weights alone, not the heads)."""
    towers, tokenizers = new_towers(work)
    state = load_state(work / "text.pt")
    for tower, name in zip(towers, ("clip_l", "clip_g")):
        tower.load_state_dict(state[name])
        tower.eval().requires_grad_(False)
    return text_encoders(towers, tokenizers)


@torch.no_grad()
def tower_pairs(text, rows=None):
    """{tower: {kind: (max, mean) pooled cosine}} over one_attribute_pairs of every world prompt (held-out ones too)."""
    rows = rows or world.make_prompts()
    pairs = one_attribute_pairs(rows)
    prompts = [m["prompt"] for m in rows]
    out = {}
    for name, tower, tok in (("clip_l", text.clip_l, text.tokenizer_l), ("clip_g", text.clip_g, text.tokenizer_g)):
        ids = tok(prompts, padding="max_length", max_length=text.clip_length, truncation=True, return_tensors="pt")
        z = F.normalize(tower(input_ids=ids["input_ids"]).text_embeds.float(), dim=-1)
        out[name] = {}
        for kind, ij in pairs.items():
            i, j = torch.tensor(ij).T
            out[name][kind] = ((z[i] * z[j]).sum(-1).max().item(), (z[i] * z[j]).sum(-1).mean().item())
    return out


# ----------------------------------------------------------------------------- stage 3: MMDiT
@torch.no_grad()
def flow_dataset(vae, prompts, work, per_tag):
    """Latents of `per_tag` renders of each tag, spread evenly over the tag's train prompts (so a uniform draw is
    tag-balanced), and each latent's prompt index; cached in the work folder."""
    path = work / f"latents_{per_tag}.pt"
    if path.is_file():
        return load_state(path)
    rng = np.random.default_rng([SEED, 3])
    index = []
    for tag in world.TAGS:
        members = [i for i, m in enumerate(prompts) if m["tag"] == tag]
        index += [members[k % len(members)] for k in range(per_tag)]
    index = torch.tensor(index)
    latents = torch.cat([vae.encode(world.render_batch([prompts[i] for i in index[j:j + 256].tolist()], rng))
                         for j in range(0, len(index), 256)])
    tmp = path.with_suffix(f".{os.getpid()}.tmp")       # atomic: two processes may build the same cache
    torch.save((latents, index), tmp)
    os.replace(tmp, path)
    return latents, index


def caption_dropout(context, pooled, empty, keep_l, keep_g, text):
    """SD3's per-encoder dropout: where keep_* is False, that encoder's context channels and pooled slice are the
    empty prompt's (the unconditional input CFG uses)."""
    ctx_e, pool_e = empty
    dl, pl = text.clip_l.config.hidden_size, text.clip_l.config.projection_dim
    dg = text.clip_g.config.hidden_size
    n = text.clip_length
    context, pooled = context.clone(), pooled.clone()
    for keep, c_sl, p_sl in ((keep_l, slice(0, dl), slice(0, pl)), (keep_g, slice(dl, dl + dg), slice(pl, None))):
        context[~keep, :n, c_sl] = ctx_e[0, :n, c_sl]
        pooled[~keep, p_sl] = pool_e[0, p_sl]
    return context, pooled


def train_mmdit(vae, text, prompts, steps, work, resume, per_tag=LATENTS_PER_TAG, evaluate_every=EVAL_EVERY,
                config=MMDIT, bf16=False, cpu_budget=None, evaluate=None, dataset=None, init=None,
                sigma_shift=SIGMA_SHIFT):
    """The flow stage. `bf16` runs the forward under CPU bf16 autocast; `cpu_budget` (seconds of this process's CPU
    time, evaluations excluded, counted across resumes) stops early; `evaluate(step, ema, cpu)` replaces the default
    progress evaluation every `evaluate_every` steps (the state is saved after each). `dataset` = (latents, index)
    already in hand (default: flow_dataset, cached in the work folder). `init` = (MMDiT, step): a warm start from a
    saved pipeline's weights at its step, with a new optimizer (a saved state in the work folder, with --resume, comes
    first). `sigma_shift`: the training σ's time shift."""
    t0 = time.time()
    latents, index = dataset or flow_dataset(vae, prompts, work, per_tag)
    with torch.no_grad():
        context, pooled = text.encode([m["prompt"] for m in prompts])
        empty = text.encode([""])
    log(f"flow dataset: {len(latents)} latents {tuple(latents.shape[1:])}, std {latents.std().item():.3f} "
        f"({time.time() - t0:.0f} s)")
    torch.manual_seed(SEED + 2)
    dit, ema = model.MMDiT(config), model.MMDiT(config)
    ema.load_state_dict(dit.state_dict())
    ema.requires_grad_(False)
    st = Stage("mmdit", work, {"dit": dit, "ema": ema}, adamw(dit.parameters(), LR["mmdit"]), steps)
    if init and not (resume and st.path.is_file()):
        dit.load_state_dict(init[0].float().state_dict())
        ema.load_state_dict(init[0].float().state_dict())
        st.step = init[1]
        log(f"mmdit: warm start at step {st.step}/{steps} from the pipeline's weights (a new optimizer)")
    elif resume:
        st.resume()
    if evaluate is None:
        def evaluate(step, ema, cpu):
            log(f"mmdit {step:5d}: held-out GenEval strict, CFG-free, per tag: "
                f"{fmt(geneval_per_tag(ema, vae, text, num_images=4)[1.0])}")
            write_pipeline(work / "ema", work, ema, vae, [text.clip_l, text.clip_g], step)
            log(f"mmdit {step:5d}: the EMA is a pipeline in {work / 'ema'} (score it: --evaluate --out {work / 'ema'})")
    while not st.done() and (cpu_budget is None or st.cpu < cpu_budget):
        tick = time.process_time()
        _, gen = generators("mmdit", st.step)
        pick = torch.randint(len(latents), (BATCH["mmdit"],), generator=gen)
        x0, c, y = latents[pick], context[index[pick]], pooled[index[pick]]
        keep = torch.rand(2, len(pick), generator=gen) >= CAPTION_DROPOUT
        c, y = caption_dropout(c, y, empty, keep[0], keep[1], text)
        sigma = sample.time_shift(torch.sigmoid(torch.randn(len(pick), generator=gen)), sigma_shift)  # logit-normal
        noise = torch.randn(x0.shape, generator=gen)
        s = sigma.view(-1, 1, 1, 1)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            v = dit((1 - s) * x0 + s * noise, sigma, c, y)
        loss = F.mse_loss(v.float(), noise - x0)
        cosine_lr(st.opt, st.step, steps, LR["mmdit"], WARMUP["mmdit"])
        st.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(dit.parameters(), 1.0)
        st.opt.step()
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), dit.parameters()):
                pe.lerp_(p, 1 - min(EMA_DECAY, (1 + st.step) / (10 + st.step)))
        st.step += 1
        st.cpu += time.process_time() - tick
        if st.step % 100 == 0 or st.done():
            log(f"mmdit {st.step:5d}/{steps} flow loss {loss.item():.4f}")
        if evaluate_every and st.step % evaluate_every == 0:
            evaluate(st.step, ema.eval(), st.cpu)
        if st.step % SAVE_EVERY["mmdit"] == 0 or st.done() or (evaluate_every and st.step % evaluate_every == 0):
            st.save()
    if not st.done():
        st.save()
    return ema.eval()


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def geneval_per_tag(dit, vae, text, num_images=16, guidance=(1.0,), steps=20, split="test", save=None, metas=None):
    """{guidance scale: {tag: strict accuracy, "overall": mean over tags (GenEval's summary), "partial": ...}} on the
    held-out prompts (or `metas`), `num_images` each, Euler `steps` steps (the world's evaluation sampler), fixed
    noise."""
    metas = metas or world.load_prompts(split)
    items = [m for m in metas for _ in range(num_images)]
    side = world.SIZE // vae.factor
    noise = torch.randn((len(items), 16, side, side), generator=torch.Generator().manual_seed(SEED))
    context, pooled = text.encode([m["prompt"] for m in items])
    neg = text.encode([""])
    fn = reward.build("shapes")
    out = {}
    for scale in guidance:
        images = torch.cat([vae.decode(sample.sample(
            dit, noise[a:a + 64], context[a:a + 64], pooled[a:a + 64], num_steps=steps, solver="euler",
            guidance_scale=scale, neg_context=neg[0], neg_pooled=neg[1])) for a in range(0, len(items), 64)])
        scores = fn(images, [m["prompt"] for m in items], items)
        out[scale] = {**reward.geneval_summary(scores["shapes_strict"], [m["tag"] for m in items]),
                      "partial": float(scores["shapes"].mean())}
        if save:
            sample.save_grid(images[::num_images], f"{save}_cfg{scale:g}.png", ncols=8)
    return out


@torch.no_grad()
def vae_round_trip(vae, num_images=4, split="test"):
    """{tag: strict, "overall", "partial"} of rendered held-out scenes after a VAE encode/decode, and of the renders
    themselves: what the detector can still score once images pass through the latent space (the ceiling of any
    flow model on top of this VAE)."""
    metas = [m for m in world.load_prompts(split) for _ in range(num_images)]
    images = world.render_batch(metas, np.random.default_rng(SEED + 5))
    fn, prompts, tags = reward.build("shapes"), [m["prompt"] for m in metas], [m["tag"] for m in metas]
    out = {}
    for name, x in (("render", images), ("vae", vae.decode(vae.encode(images)).clamp(0, 1))):
        scores = fn(x, prompts, metas)
        out[name] = {**reward.geneval_summary(scores["shapes_strict"], tags), "partial": float(scores["shapes"].mean())}
    return out


def fmt(scores):
    return " ".join(f"{k} {v:.3f}" for k, v in scores.items())


def fmt_towers(cosines):
    """tower_pairs' table as one line a tower."""
    return [f"{tower} pooled cosine of prompts one attribute apart, max (mean): "
            + " ".join(f"{k} {hi:.3f} ({mean:.3f})" for k, (hi, mean) in kinds.items())
            for tower, kinds in cosines.items()]


# ----------------------------------------------------------------------------- saving
def save_pipeline(root, dit, vae, towers, mmdit_step=None):
    """Everything in fp16 (the shipped files stay small; fp16 copies, the modules stay as they are); the loaders
    upcast to the dtype asked for. e2po.json records the T5 length for the loaders and the MMDiT's pretraining step
    (where --warm_start continues)."""
    root = Path(root)
    side = world.SIZE // vae.factor
    half = lambda m: copy.deepcopy(m).half()                                      # noqa: E731
    model.save_diffusers(half(dit), root / "transformer", sample_size=side)   # 64 px: the pipeline's native size
    model.save_diffusers(half(vae), root / "vae")
    for tower, name in zip(towers, ("text_encoder", "text_encoder_2")):
        half(tower).save_pretrained(root / name, safe_serialization=True)
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
    notes = {"max_sequence_length": T5_LENGTH}                 # no T5: its zeros
    if mmdit_step is not None:
        notes["mmdit_step"] = int(mmdit_step)
    (root / model.PIPELINE_NOTES).write_text(json.dumps(notes))


def write_pipeline(root, work, dit, vae, towers, mmdit_step):
    """save_pipeline into a fresh folder beside `root` (with the tokenizer folders from `work`), swapped in whole."""
    new = Path(tempfile.mkdtemp(dir=root.parent, prefix=root.name + ".new-"))
    for name in ("tokenizer", "tokenizer_2"):
        shutil.copytree(work / name, new / name)
    save_pipeline(new, dit, vae, towers, mmdit_step=mmdit_step)
    swap_in(new, root)                    # the old pipeline stays until the new one is complete


def load_pipeline(root):
    dit, vae = model.load_mmdit(root), model.load_vae(root)
    return dit, vae, model.load_text_encoders(root, t5=False)


def report(root):
    """The held-out numbers of a saved pipeline: its VAE's round trip, then the model per tag without and with CFG
    (grids of the first image per prompt next to the pipeline folder: pretrain_cfg1.png, pretrain_cfg3.png)."""
    dit, vae, text = load_pipeline(root)
    for name, s in vae_round_trip(vae).items():
        log(f"{root}: held-out scenes, GenEval strict, {name}: {fmt(s)}")
    for line in fmt_towers(tower_pairs(text)):
        log(f"{root}: {line}")
    for scale, s in geneval_per_tag(dit, vae, text, guidance=(1.0, 3.0), save=Path(root).parent / "pretrain").items():
        log(f"{root}: held-out GenEval strict, guidance {scale:g}: {fmt(s)}")


PIPELINE_PARTS = {"transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler",
                  "model_index.json", model.PIPELINE_NOTES}
DEFAULT_OUT = HERE.parent.parent / "out" / "sd3_tiny"     # never the shipped model: that takes --out ... --replace


def check_out(root, replace):
    """An --out this script may write: absent, empty, or (with --replace) a pipeline of this script and nothing else.
    Its parent must be writable. Raises with the reason before any work starts."""
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(f"--out {root} is a file, not a folder")
    present = {p.name for p in root.iterdir()} if root.is_dir() else set()
    if present and not (present <= PIPELINE_PARTS and "model_index.json" in present):
        other = sorted(present - PIPELINE_PARTS) or ["no model_index.json"]
        raise FileExistsError(f"--out {root} holds files that are not a pipeline of this script ({', '.join(other)}); "
                              "choose an empty or new folder")
    if present and not replace:
        raise FileExistsError(f"--out {root} holds a pipeline; pass --replace to replace it (the new one is written "
                              "beside it and swapped in when complete), or choose another --out")
    parent = next(p for p in (root, *root.parents) if p.exists())
    if not os.access(parent, os.W_OK):
        raise PermissionError(f"--out {root}: {parent} is not writable")


def require_pipeline(path, flag):
    """`path` must be a pipeline folder (a model_index.json) for the option `flag`."""
    if not (Path(path) / "model_index.json").is_file():
        raise FileNotFoundError(f"--{flag}: {path} is not a pipeline folder (no model_index.json)")


def check_work(work, resume):
    """The work folder holds a run's saved states: a new run never starts over them, --resume needs them."""
    states = sorted(p.name for p in work.glob("*.pt")) if work.is_dir() else []
    if states and not resume:
        raise FileExistsError(f"{work} holds the saved states of an earlier run ({', '.join(states)}): continue it "
                              f"with --resume, or delete {work} yourself to start over")
    if resume and not states:
        raise FileNotFoundError(f"--resume: {work} holds no saved states to continue from")
    for name in states:           # a damaged state names itself now, not after an hour of the stages before it
        load_state(work / name)


def swap_in(new, root):
    """Replace `root` by the complete pipeline `new`: the old one is moved aside, the new renamed, the old deleted."""
    old = None
    if root.exists():
        old = Path(tempfile.mkdtemp(dir=root.parent, prefix=root.name + ".old-"))
        os.replace(root, old / root.name)
    os.replace(new, root)
    if old:
        shutil.rmtree(old)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None, help=f"the pipeline folder to write (default {DEFAULT_OUT}) or, with "
                        "--evaluate, to score (default: the shipped model)")
    parser.add_argument("--replace", action="store_true", help="replace the pipeline that --out holds")
    parser.add_argument("--quick", action="store_true", help="a few steps per stage (smoke test)")
    parser.add_argument("--resume", action="store_true", help="continue from the states saved in OUT.tmp/")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--evaluate", action="store_true", help="only score OUT per tag (16 images a prompt)")
    parser.add_argument("--vae_from", default=None, help="take stage 1 (the VAE) from this pipeline instead of "
                        "training it")
    parser.add_argument("--warm_start", default=None, help="take the VAE, text towers and MMDiT from this pipeline "
                        "(same sizes) and continue the MMDiT stage at the step its e2po.json records: for a long run "
                        "whose work folder is gone")
    args = parser.parse_args(argv)
    with user_errors("pretrain.py"):
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        if args.evaluate:
            root = Path(args.out or model.DEFAULT_WEIGHTS)
            require_pipeline(root, "evaluate")
        else:
            root = Path(args.out).resolve() if args.out else DEFAULT_OUT
            work = root.with_name(root.name + ".tmp")
            check_out(root, args.replace)
            check_work(work, args.resume)
            for flag in ("vae_from", "warm_start"):
                if getattr(args, flag):
                    require_pipeline(getattr(args, flag), flag)
            if args.warm_start and "mmdit_step" not in model.pipeline_notes(args.warm_start):
                raise ValueError(f"--warm_start: {args.warm_start}/{model.PIPELINE_NOTES} records no mmdit_step")
    torch.set_num_threads(args.threads)
    if args.evaluate:
        return report(root)
    steps = QUICK_STEPS if args.quick else STEPS
    work.mkdir(parents=True, exist_ok=True)
    prompts = world.load_prompts("train")
    t0 = time.time()
    source = args.warm_start or args.vae_from
    vae = (model.load_vae(source).float().eval().requires_grad_(False) if source
           else train_vae(prompts, steps["vae"], work, args.resume))
    init = None
    if args.warm_start:
        dit0, _, text = load_pipeline(args.warm_start)
        towers, tokenizers = [text.clip_l, text.clip_g], [text.tokenizer_l, text.tokenizer_g]
        for name in ("tokenizer", "tokenizer_2"):
            shutil.copytree(Path(args.warm_start) / name, work / name, dirs_exist_ok=True)
        init = (dit0, model.pipeline_notes(args.warm_start)["mmdit_step"])
    else:
        towers, tokenizers, text = text_stage(prompts, steps["text"], work, args.resume)
    dit = train_mmdit(vae, text, prompts, steps["mmdit"], work, args.resume, init=init,
                      **(QUICK_DATA if args.quick else {}))
    write_pipeline(root, work, dit, vae, towers, steps["mmdit"])
    size = sum(f.stat().st_size for f in root.rglob("*") if f.is_file()) / 2 ** 20
    log(f"wrote {root} ({size:.1f} MB) in {(time.time() - t0) / 60:.1f} min; the states stay in {work} (--resume)")
    if not args.quick:
        report(root)


if __name__ == "__main__":
    main()
