"""The world model's capacity screen: which MMDiT can learn the shapes world, at equal CPU time, before the long run.

    python data/shapes/screen.py                         # every variant, CPU_MINUTES of one core each; resumable
    python data/shapes/screen.py --variants p1 wide      # some of them (two processes at once suit 2 cores)
    python data/shapes/screen.py --report                # the table and curves.png from out/screen/

All variants share the shipped model's VAE and pretrain.py's text towers of the screen's start (stage 2 at the then
defaults, trained once into out/screen/shared.tmp/; the long run's towers moved on since, RESULTS.md). Each variant then
trains pretrain.train_mmdit from scratch for its CPU-minutes (CPU_MINUTES unless it says otherwise) of one thread's
CPU time (time.process_time, evaluations excluded: other jobs on the machine slow a variant down but do not change its
budget), with the cosine schedule spread over the steps that budget buys (timed on its first steps). Every
EVAL_MINUTES of CPU its EMA is scored on train prompts (GenEval strict per tag, CFG-free, the world's Euler sampler):
a curve of what the variant learns per CPU-minute, with two measures that move while the detector's scores are still
0: its flow-matching loss on fixed latents, noise and σ (`flow_probe`), and how often it finishes renders noised to a
high σ₀ into the right scene (`recovery_probe`). The question it answers: which variant can reach single_object >= 0.6,
and at what cost. The screen ran at SD3's plain logit-normal training σ (sigma_shift 1) except where a variant says.
"""
import argparse
import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))
from data.shapes import pretrain as P  # noqa: E402
from data.shapes import world  # noqa: E402
import model  # noqa: E402
import reward  # noqa: E402
import sample  # noqa: E402

CPU_MINUTES = 30
EVAL_MINUTES = 5
OUT = HERE.parent.parent / "out" / "screen"
EVAL_PROMPTS = 6                       # train prompts per tag scored (single_object has 5) ...
EVAL_IMAGES = dict(single_object=8)    # ... images a prompt (4 elsewhere)
TEXT_STEPS = 600                       # the shared towers' stage 2, fixed for the whole screen (trained at the then
                                       # SPREAD_WEIGHT 1; pretrain.py's STEPS and weight moved on after it started)
VAL_LATENTS = 384                      # the flow-loss probe: fixed latents, noise and σ
RECOVER_FROM = (0.84, 0.94)            # the recovery probe: strict of samples finished from renders noised to these σ
SMALL_OBJECTS = {1: (0.30, 0.50), 2: (0.22, 0.36), 3: (0.18, 0.27), 4: (0.18, 0.27)}   # the world before the screen

BASE = dict(config=P.MMDIT, bf16=False, sides=None, tags=world.TAGS, sigma_shift=1.0,   # the screen ran at shift 1
            minutes=CPU_MINUTES)
VARIANTS = {   # name: what differs from BASE (MMDiT config, bf16 autocast, object sizes, the tags it trains on and is
               # scored on, the training σ's time shift, its CPU-minutes)
    "base": {},                                                           # D128 depth 4, patch 2: 64 tokens
    "p1": dict(config=replace(P.MMDIT, patch_size=1)),                    # 256 tokens, 4 px each
    "wide": dict(config=replace(P.MMDIT, hidden_size=192, depth=6, num_heads=3)),   # 2.4x the width x depth
    "bf16": dict(bf16=True),                                              # base under CPU bf16 autocast
    "small": dict(sides=SMALL_OBJECTS),                                   # base on the old object sizes
    "single": dict(tags=("single_object",)),          # base, all of it on the 5 single objects: can it draw them?
    "single_shift3": dict(tags=("single_object",), sigma_shift=3.0),     # ... with the training σ shifted to noise
    "single_long": dict(tags=("single_object",), sigma_shift=3.0, minutes=120),   # ... for 4x as long: can it ever?
}


def shared_stages():
    """The VAE and text towers every variant uses: the shipped model's VAE (its round trip of the world's held-out
    scenes is in RESULTS.md) and pretrain.py's stage 2, trained once (resumable)."""
    work = OUT / "shared.tmp"
    work.mkdir(parents=True, exist_ok=True)
    prompts = world.load_prompts("train")
    vae = model.load_vae(model.DEFAULT_WEIGHTS).float().eval().requires_grad_(False)
    if (work / "text.pt").is_file() and P.load_state(work / "text.pt")["step"] >= TEXT_STEPS:
        return vae, P.saved_text_encoders(work)      # finished: only the towers (pretrain's heads may have moved on)
    return vae, P.text_stage(prompts, TEXT_STEPS, work, resume=True)[2]


def eval_prompts(tags=world.TAGS):
    prompts = world.load_prompts("train")
    return [m for t in tags for m in [m for m in prompts if m["tag"] == t][:EVAL_PROMPTS]
            for _ in range(EVAL_IMAGES.get(t, 4))]


def steps_for_budget(config, bf16, latents, context, pooled, minutes=CPU_MINUTES):
    """How many steps `minutes` of CPU buy: the CPU time of 10 timed training steps (after 2 warm-up steps)."""
    dit = model.MMDiT(config)
    opt = P.adamw(dit.parameters(), P.LR["mmdit"])
    n = P.BATCH["mmdit"]
    times = []
    for _ in range(12):
        t = time.process_time()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            v = dit(latents[:n], torch.rand(n), context[:n], pooled[:n])
        loss = torch.nn.functional.mse_loss(v.float(), latents[:n])
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.process_time() - t)
    per_step = float(np.mean(times[2:]))
    return int(minutes * 60 / per_step), per_step


def run_variant(name, vae, text):
    v = {**BASE, **VARIANTS[name]}
    work = OUT / name
    work.mkdir(parents=True, exist_ok=True)
    default_sides = world.OBJECT_SIDE
    world.OBJECT_SIDE = v["sides"] or default_sides
    try:
        train_variant(name, work, v["config"], v["bf16"], vae, text, v["tags"], v["sigma_shift"], v["minutes"])
    finally:
        world.OBJECT_SIDE = default_sides


def train_variant(name, work, config, bf16, vae, text, tags, sigma_shift, minutes):
    prompts = world.load_prompts("train")
    plan_file, curve_file = work / "plan.json", work / "curve.jsonl"
    data = work if name == "small" else OUT / "shared.tmp"        # the latents of renders at the world's sizes
    latents, index = P.flow_dataset(vae, prompts, data, P.LATENTS_PER_TAG)
    keep = torch.tensor([prompts[i]["tag"] in tags for i in index.tolist()])
    latents, index = latents[keep], index[keep]
    if not plan_file.exists():
        context, pooled = text.encode([prompts[i]["prompt"] for i in index[:P.BATCH["mmdit"]].tolist()])
        steps, per_step = steps_for_budget(config, bf16, latents, context, pooled, minutes)
        plan_file.write_text(json.dumps({"steps": steps, "cpu_per_step": per_step, "config": asdict(config),
                                         "bf16": bf16, "object_side": world.OBJECT_SIDE,
                                         "sigma_shift": sigma_shift, "minutes": minutes}, indent=1))
    plan = json.loads(plan_file.read_text())
    every = max(1, round(EVAL_MINUTES * 60 / plan["cpu_per_step"]))
    metas = eval_prompts(tags)
    probe = flow_probe(latents, index, prompts, text)
    recover = recovery_probe(vae, text, metas)

    def evaluate(step, ema, cpu):
        t = time.time()
        scores = P.geneval_per_tag(ema, vae, text, num_images=1, metas=metas)[1.0]
        row = {"step": step, "cpu_minutes": cpu / 60, "flow_loss": probe(ema), "recover": recover(ema), **scores}
        with open(curve_file, "a") as f:
            f.write(json.dumps(row) + "\n")
        P.log(f"screen {name} step {step} ({cpu / 60:.1f} CPU-min): train-prompt strict {P.fmt(scores)}; finished "
              f"from σ₀ {row['recover']} ({time.time() - t:.0f} s)")

    P.log(f"screen {name}: {plan['steps']} steps of {plan['cpu_per_step']:.2f} CPU-s, evaluated every {every}")
    ema = P.train_mmdit(vae, text, prompts, plan["steps"], work, resume=True, evaluate_every=every, config=config,
                        bf16=bf16, cpu_budget=minutes * 60, evaluate=evaluate, dataset=(latents, index),
                        sigma_shift=sigma_shift)
    state = P.load_state(work / "mmdit.pt")
    rows = read_curve(curve_file)
    if not rows or rows[-1]["step"] != state["step"]:
        evaluate(state["step"], ema, state["cpu"])
    sample.save_grid(decode_grid(ema, vae, text, metas), work / "samples.png", ncols=8)


@torch.no_grad()
def recovery_probe(vae, text, metas, starts=RECOVER_FROM, steps=20):
    """{σ₀: strict}: real renders of `metas`, encoded, noised to σ₀ (fixed noise) and sampled back to 0 from there
    with the world's Euler sampler (the steps of its 20-step schedule below σ₀). Whether a model can finish an image
    whose shape and place are already decided (low σ₀) but not decide them itself (high σ₀) shows where it fails
    while its pure-noise samples still score 0."""
    items = list(metas)
    x0 = vae.encode(world.render_batch(items, np.random.default_rng(3)))
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))
    context, pooled = text.encode([m["prompt"] for m in items])
    sigmas = sample.sigma_schedule(steps, sample.SHIFT)
    fn = reward.build("shapes")

    def probe(dit):
        out = {}
        for start in starts:
            k = int((sigmas > start).sum())           # the first schedule step at or below σ₀
            x = (1 - sigmas[k]) * x0 + sigmas[k] * eps
            for i in range(k, len(sigmas) - 1):
                x = sample.euler_step(x, dit(x, sigmas[i].expand(len(x)), context, pooled), sigmas[i], sigmas[i + 1])
            scores = fn(vae.decode(x), [m["prompt"] for m in items], items)["shapes_strict"]
            out[f"{start:.2f}"] = float(scores.mean())
        return out
    return probe


def flow_probe(latents, index, prompts, text, n=VAL_LATENTS):
    """The flow-matching loss of a model on n fixed latents of the dataset (every len/n-th), with fixed noise and σ
    at n quantiles of SD3's logit-normal, CFG-free conditions: a smooth, cheap measure of how well a variant fits the
    data, where the detector's scores are still near 0."""
    pick = torch.arange(0, len(latents), len(latents) // n)[:n]
    x0, gen = latents[pick], torch.Generator().manual_seed(7)
    noise = torch.randn(x0.shape, generator=gen)
    sigma = torch.sigmoid(torch.erfinv(torch.linspace(-0.98, 0.98, n)) * 2 ** 0.5)
    context, pooled = text.encode([prompts[i]["prompt"] for i in index[pick].tolist()])
    s = sigma.view(-1, 1, 1, 1)

    @torch.no_grad()
    def probe(dit):
        v = torch.cat([dit(((1 - s) * x0 + s * noise)[a:a + 64], sigma[a:a + 64], context[a:a + 64],
                           pooled[a:a + 64]) for a in range(0, n, 64)])
        return float(torch.nn.functional.mse_loss(v, noise - x0))
    return probe


@torch.no_grad()
def decode_grid(ema, vae, text, metas):
    firsts = [m for i, m in enumerate(metas) if i == 0 or m["prompt"] != metas[i - 1]["prompt"]][:32]
    noise = torch.randn((len(firsts), 16, world.SIZE // vae.factor, world.SIZE // vae.factor),
                        generator=torch.Generator().manual_seed(1))
    context, pooled = text.encode([m["prompt"] for m in firsts])
    return vae.decode(sample.sample(ema, noise, context, pooled, num_steps=20, solver="euler"))


def read_curve(path):
    return [json.loads(line) for line in open(path)] if Path(path).exists() else []


def report():
    """The screen's table (last evaluation of each variant, and its best single_object) and curves.png."""
    lines = ["| variant | params | CPU-s a step | steps | CPU-min | flow loss | finished from σ₀ 0.84 / 0.94 | "
             "single_object | overall | best single | per tag (last) |", "|---" * 11 + "|"]
    curves = {}
    for name in VARIANTS:
        plan_file = OUT / name / "plan.json"
        rows = read_curve(OUT / name / "curve.jsonl")
        if not rows or not plan_file.exists():
            continue
        plan, last = json.loads(plan_file.read_text()), rows[-1]
        params = sum(p.numel() for p in model.MMDiT(model.MMDiTConfig(**plan["config"])).parameters())
        tags = " ".join(f"{t[:6]} {last[t]:.2f}" for t in world.TAGS if t in last)
        loss = f"{last['flow_loss']:.4f}" if "flow_loss" in last else "–"
        recover = " / ".join(f"{v:.3f}" for v in last["recover"].values()) if "recover" in last else "–"
        lines.append(f"| {name} | {params / 1e6:.2f} M | {plan['cpu_per_step']:.2f} | {last['step']} | "
                     f"{last['cpu_minutes']:.0f} | {loss} | {recover} | {last['single_object']:.3f} | "
                     f"{last['overall']:.3f} | "
                     f"{max(r['single_object'] for r in rows):.3f} | {tags} |")
        curves[name] = rows
    print("\n".join(lines))
    (OUT / "screen.md").write_text("\n".join(lines) + "\n")
    plot(curves, OUT / "curves.png")
    print(f"wrote {OUT / 'screen.md'} and {OUT / 'curves.png'}")


def plot(curves, path, size=(720, 300)):
    """single_object train-prompt strict (left) and the flow-loss probe (right) against CPU-minutes, a line a
    variant."""
    from PIL import Image, ImageDraw
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]
    w, h, pad = size[0] // 2, size[1], 30
    top = max([r.get("flow_loss", 0) for rows in curves.values() for r in rows] + [1e-6])
    span = max([r["cpu_minutes"] for rows in curves.values() for r in rows] + [CPU_MINUTES])
    for panel, (key, y_max) in enumerate((("single_object", 1.0), ("flow_loss", top))):
        x0 = panel * w
        draw.rectangle([x0 + pad, pad, x0 + w - 10, h - pad], outline="black")
        draw.text((x0 + pad, 8), f"{key} vs CPU-min (0..{span:.0f}), y 0..{y_max:.3g}", fill="black")
        for k, (name, rows) in enumerate(curves.items()):
            xy = [(x0 + pad + (w - 10 - pad) * r["cpu_minutes"] / span, h - pad - (h - 2 * pad) * r[key] / y_max)
                  for r in rows if key in r]
            if len(xy) > 1:
                draw.line(xy, fill=colors[k % len(colors)], width=2)
            if panel == 0:
                draw.text((x0 + pad + 5, pad + 5 + 12 * k), name, fill=colors[k % len(colors)])
    img.save(path)


def towers():
    """The shared towers' one-attribute cosine table (pretrain.tower_pairs), as --evaluate prints it."""
    _, text = shared_stages()
    print("\n".join(P.fmt_towers(P.tower_pairs(text))))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--report", action="store_true", help="only print the table and draw the curves")
    ap.add_argument("--towers", action="store_true", help="only print the shared towers' one-attribute cosines")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    if args.report:
        return report()
    if args.towers:
        return towers()
    torch.set_num_threads(args.threads)
    vae, text = shared_stages()
    for name in args.variants:
        run_variant(name, vae, text)
    report()


if __name__ == "__main__":
    main()
