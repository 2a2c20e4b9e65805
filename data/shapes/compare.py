"""
The paper's questions at toy scale: E²PO against DiffusionNFT (and Flow-GRPO, E-GRPO) on the shapes world, at the
same sample budget, over seeds. Every method draws N = --budget images per prompt (same prompts_per_step, max_steps,
learning rate, everything else), unless its name says otherwise:

    nft          DiffusionNFT: K=1 variant, G=N noises
    nft_same_g   DiffusionNFT with E²PO's G = N/K noises (N/K images per prompt: the paper's "G=2" row)
    e2po         E²PO: K variants (the original prompt + K−1 perturbed) × G=N/K noises (N=8: 4 × 2)
    e2po_k<K>    E²PO with another split of the same N, e.g. e2po_k2 (2 × 4), e2po_k8 (8 × 1) (Fig. 5)
    static       e2po with schedule="static": the perturbation at every noise level, γ ≡ 1 (Fig. 6)
    no_anchor    e2po with anchor=False: K perturbed variants × G = N, no original prompt in the group (Fig. 7)
    flow_grpo    Flow-GRPO: G=N SDE trajectories per prompt (η 0.7), trained on 9 of their 10 steps, two optimizer
                 steps per iteration (Flow-GRPO's SD3.5 presets), β 0.04
    e_grpo       E-GRPO: 2 of the plan's active steps per prompt × G=N/2 branches = N images; groups are (prompt,
                 step) of N/2 with per-group std; besides the N images it runs the shared ODE prefix

Model evaluations per image differ: NFT/E²PO 10 (DPM-Solver++), Flow-GRPO 10 (SDE), E-GRPO 10 − i − l for a branch
of the merged step i → i+l plus the shared prefix's i + 1 per prompt; training forwards per image: NFT 9 (+ old and
reference, no grad), Flow-GRPO 9 (+ reference), E-GRPO one per (prompt, step) group, shared by its G branches.

For each seed and method it runs `python train.py --key=value ...` in a subprocess (one torch thread each; --jobs
runs that many at once) into OUT/<method>-s<seed>/, then reads every log.jsonl and writes OUT/compare.md (a table of
every method, then one section per question of the paper with the methods it needs, also printed) and
OUT/compare.png (mean over seeds vs step: training reward, intra-group reward std, zero-std ratio, held-out GenEval
strict; one line per method).

    python data/shapes/compare.py                                    # 3 seeds × nft, e2po at train.py's defaults
    python data/shapes/compare.py --methods nft nft_same_g e2po e2po_k2 e2po_k8 static no_anchor flow_grpo e_grpo
    python data/shapes/compare.py --report_only --methods ...          # re-read the logs, no training
    python data/shapes/compare.py --smoke --seeds 0 --jobs 1 --out out-compare-smoke   # 1 tiny step each
    python data/shapes/compare.py --set learning_rate=1e-4 eval_num_prompts=32         # any train.py key

The questions (the sections of compare.md, each shown when its methods ran):
    Fig. 2   intra-group reward std and zero-std ratio over training: nft vs e2po
    Tab. 1   final held-out GenEval strict and partial: e2po vs nft (same N) and nft_same_g (same G)
    Fig. 5   the G × K split at fixed N: nft (N × 1), e2po_k2, e2po, e2po_k8
    Fig. 6/7 the noise-aware schedule and the anchor: e2po vs static and no_anchor
    Baselines Flow-GRPO and E-GRPO next to nft and e2po
A difference between two methods is reported as Δ = difference of the seed means ± its standard error
(√(s₁²/n₁ + s₂²/n₂), sample stds); "separable" when |Δ| > 2 SE, else "not separable from seed noise".

Where this departs from the paper: a 64² world and a tiny pretrained MMDiT instead of SD3.5-M on 8 GPUs (tens of
steps of 16 prompts instead of 300–850 of 48); E²PO's presets use G·K = 8 to 48 images per prompt and DiffusionNFT's
baseline G=24, here every method gets the same N; GenEval's scoring with the world's numpy detector instead of
Mask2Former + CLIP, on the EMA adapter over the held-out prompts × eval_num_images, the same noise for every run.
"""

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)
from train import num_seeds as DEFAULT_G, num_variants as DEFAULT_K   # noqa: E402  (the default run's K × G)

METHODS = ("nft", "nft_same_g", "e2po", "static", "no_anchor", "flow_grpo", "e_grpo")   # and e2po_k<K>
QUESTIONS = [   # (title, methods, what it asks)
    ("Fig. 2: does E²PO keep the intra-group variance alive?", ("nft", "e2po"),
     "the mean intra-group reward std and the zero-std ratio over training (the paper: DiffusionNFT's std collapses "
     "and its zero-std ratio rises; E²PO's stay)"),
    ("Tab. 1: final held-out score at equal budget", ("e2po", "nft", "nft_same_g"),
     "E²PO K × G against DiffusionNFT with the same N images per prompt and with E²PO's G noises"),
    ("Fig. 5: the G × K split at fixed N", ("nft", "e2po_k2", "e2po", "e2po_k8"),
     "more variants and fewer noises per variant, the same N"),
    ("Fig. 6 / 7: the noise-aware schedule and the anchor", ("e2po", "static", "no_anchor"),
     "γ(σ) fading the perturbation out (Eq. 13) against γ ≡ 1; the original prompt in the group or not"),
    ("Flow-GRPO and E-GRPO at the same budget", ("nft", "e2po", "flow_grpo", "e_grpo"), "the other objectives"),
]
PALETTE = [(214, 39, 40), (31, 119, 180), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
SMOKE = {"max_steps": 1, "prompts_per_step": 1, "emb_steps": 2, "train_sample_steps": 4, "timestep_fraction": 0.5,
         "eval_sample_steps": 2, "eval_num_prompts": 2, "eval_num_images": 1, "eval_every": 1, "save_every": 1,
         "log_images_every": 0}


def method_overrides(method, budget, k):
    """train.py settings that define each method at N = budget images per prompt (E²PO's K = k)."""
    def split(K):
        if budget % K:
            raise ValueError(f"--budget {budget} is not a multiple of K={K} ({method})")
        return {"num_variants": K, "num_seeds": budget // K}
    m = re.fullmatch(r"e2po_k(\d+)", method)
    if m:
        return split(int(m.group(1)))
    if method == "nft":
        return {"num_variants": 1, "num_seeds": budget}
    if method == "nft_same_g":
        return {"num_variants": 1, "num_seeds": split(k)["num_seeds"]}
    if method == "flow_grpo":
        return {"method": "flow_grpo", "num_variants": 1, "num_seeds": budget, "grpo_updates": 2}
    if method == "e_grpo":
        if budget % 2:
            raise ValueError(f"--budget {budget} must be even for e_grpo (2 active steps × G)")
        return {"method": "e_grpo", "num_variants": 1, "num_seeds": budget // 2, "egrpo_branch_steps": 2,
                "global_std": False}
    e2po = split(k)
    if method == "e2po":
        return e2po
    if method == "static":
        return {**e2po, "schedule": "static"}
    if method == "no_anchor":
        return {"num_variants": k + 1, "num_seeds": budget // k, "anchor": False}
    raise ValueError(f"unknown method {method!r}: one of {METHODS} or e2po_k<K>")


def run_one(job):
    """One training run in a subprocess with one thread; its output goes to out_dir/train.log, its wall time to
    out_dir/wall_seconds."""
    name, settings = job
    os.makedirs(settings["out_dir"], exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, "train.py"] + [f"--{k}={v}" for k, v in settings.items()]
    print(f"[{name}] start: {' '.join(cmd[1:])}", flush=True)
    t0 = time.time()
    with open(os.path.join(settings["out_dir"], "train.log"), "w") as log:
        rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    with open(os.path.join(settings["out_dir"], "wall_seconds"), "w") as f:
        f.write(f"{time.time() - t0:.0f}\n")
    print(f"[{name}] {'done' if rc == 0 else f'FAILED (exit {rc}), see ' + settings['out_dir'] + '/train.log'}", flush=True)
    return rc


def load_run(d):
    """(config.json, log.jsonl rows) of a finished run, or None with a message why not."""
    try:
        with open(os.path.join(d, "config.json")) as f:
            cfg = json.load(f)
        with open(os.path.join(d, "log.jsonl")) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError as e:
        return print(f"skipping {d}: {e.filename} is missing")
    last = rows[-1]["step"] if rows else 0
    if last < cfg["max_steps"] or "eval_reward" not in rows[-1]:
        return print(f"skipping {d}: unfinished (last logged step {last} of {cfg['max_steps']}, or no final eval)")
    wall = os.path.join(d, "wall_seconds")
    cfg["wall_seconds"] = float(open(wall).read()) if os.path.isfile(wall) else None
    return cfg, rows


def strict_key(row):
    """The GenEval strict overall key of an evaluation row (eval_<reward>_strict), or None."""
    return next((k for k in row if k.startswith("eval_") and k.endswith("_strict")), None)


def summarise(rows):
    """One run's numbers: held-out scores before and after, means over training, first → last 10 % of steps."""
    train = [r for r in rows if "reward_std" in r]
    evals = [r for r in rows if "eval_reward" in r]
    w = max(1, len(train) // 10)
    mean = lambda key, rs: float(np.mean([r[key] for r in rs if key in r])) if any(key in r for r in rs) else None
    first = evals[0] if evals[0]["step"] == 0 else None
    key = strict_key(evals[-1])
    return {"std": mean("reward_std", train), "zero": mean("zero_std_ratio", train),
            "std_first": mean("reward_std", train[:w]), "std_last": mean("reward_std", train[-w:]),
            "zero_first": mean("zero_std_ratio", train[:w]), "zero_last": mean("zero_std_ratio", train[-w:]),
            "std_anchor": mean("reward_std_anchor", train),      # E²PO: the G noises of C_orig alone
            "ratio": mean("variant_noise_ratio", train),
            "r0": mean("reward_mean", train[:w]), "r1": mean("reward_mean", train[-w:]),
            "test": evals[-1]["eval_reward"], "test0": first["eval_reward"] if first else None,
            "strict": evals[-1][key] if key else None, "strict0": first[key] if first and key else None}


def pm(values, digits=3):
    """mean ± sample std over seeds (0 for one seed)."""
    values = [v for v in values if v is not None]
    sd = np.std(values, ddof=1) if len(values) > 1 else 0.0
    return f"{np.mean(values):.{digits}f} ± {sd:.{digits}f}" if values else "–"


def delta(a, b):
    """'Δ ± SE (verdict)' of the seed means of a minus b; None-free lists of per-seed values."""
    if len(a) < 2 or len(b) < 2:
        return "–"
    d = np.mean(a) - np.mean(b)
    se = math.sqrt(np.var(a, ddof=1) / len(a) + np.var(b, ddof=1) / len(b))
    verdict = "separable" if abs(d) > 2 * se else "not separable from seed noise"
    return f"{d:+.3f} ± {se:.3f} ({verdict})"


def describe(method, cfg):
    """'K × G' (and the images per prompt) of a run's config."""
    kg = f"{cfg['num_variants']}{'' if cfg['anchor'] else ' (no anchor)'} × {cfg['num_seeds']}"
    if cfg.get("method") == "e_grpo":
        kg += f" × {cfg.get('egrpo_branch_steps') or 'all'} steps"
    return kg


def table(results):
    """Markdown table over seeds; results[method] = list of (seed, config, log rows)."""
    lines = ["| method | K × G | minutes | held-out GenEval strict after | strict gain | partial after | partial gain | "
             "intra-group reward std | the same over the original prompt's G noises | zero-std ratio (mean; first → "
             "last 10 %) | variant / noise pixel change | train reward first → last 10 % | seeds |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    before, before_strict = [], []
    for method, runs in results.items():
        sums = [summarise(rows) for _, _, rows in runs]
        before += [s["test0"] for s in sums if s["test0"] is not None]
        before_strict += [s["strict0"] for s in sums if s["strict0"] is not None]
        walls = [c["wall_seconds"] / 60 for _, c, _ in runs if c.get("wall_seconds")]
        gains = [s["test"] - s["test0"] for s in sums if s["test0"] is not None]
        sgains = [s["strict"] - s["strict0"] for s in sums if s["strict0"] is not None]
        zero = (f"{pm([s['zero'] for s in sums], 2)}; {np.mean([s['zero_first'] for s in sums]):.2f} → "
                f"{np.mean([s['zero_last'] for s in sums]):.2f}")
        lines.append(f"| {method} | {describe(method, runs[0][1])} | {np.mean(walls):.1f} | " if walls else
                     f"| {method} | {describe(method, runs[0][1])} | – | ")
        lines[-1] += (f"{pm([s['strict'] for s in sums])} | {pm(sgains)} | {pm([s['test'] for s in sums])} | "
                      f"{pm(gains)} | {pm([s['std'] for s in sums])} | {pm([s['std_anchor'] for s in sums])} | "
                      f"{zero} | {pm([s['ratio'] for s in sums], 2)} | {np.mean([s['r0'] for s in sums]):.3f} → "
                      f"{np.mean([s['r1'] for s in sums]):.3f} | {len(sums)} ({' '.join(str(s) for s, _, _ in runs)}) |")
    if before:
        lines.append(f"\nHeld-out GenEval before training (the base model, every method and seed): strict "
                     f"{pm(before_strict)}, partial {pm(before)}")
    return "\n".join(lines) + "\n"


def questions(results):
    """One section per question of the paper whose methods all ran: the numbers it needs and Δ ± SE between them."""
    sums = {m: [summarise(rows) for _, _, rows in runs] for m, runs in results.items()}
    per_seed = lambda m, key: [s[key] for s in sums[m] if s[key] is not None]
    out = []
    for title, methods, what in QUESTIONS:
        if not all(m in sums for m in methods):
            continue
        out += [f"### {title}", "", f"{what}.", "",
                "| method | strict after | partial after | intra-group std first → last 10 % | zero-std ratio first → last "
                "10 % |", "|---|---|---|---|---|"]
        for m in methods:
            out.append(f"| {m} | {pm(per_seed(m, 'strict'))} | {pm(per_seed(m, 'test'))} | "
                       f"{np.mean(per_seed(m, 'std_first')):.3f} → {np.mean(per_seed(m, 'std_last')):.3f} | "
                       f"{np.mean(per_seed(m, 'zero_first')):.2f} → {np.mean(per_seed(m, 'zero_last')):.2f} |")
        ref = methods[0] if title.startswith(("Tab", "Fig. 6", "Flow")) else methods[-1]
        if title.startswith("Fig. 5"):
            ref = "e2po"
        out.append("")
        for m in methods:
            if m != ref:
                out.append(f"- {ref} − {m}: strict {delta(per_seed(ref, 'strict'), per_seed(m, 'strict'))}; "
                           f"partial {delta(per_seed(ref, 'test'), per_seed(m, 'test'))}; "
                           f"zero-std ratio (last 10 %) {delta(per_seed(ref, 'zero_last'), per_seed(m, 'zero_last'))}")
        out.append("")
    return "\n".join(out)


def plot(results, path, keys=(("reward_mean", "training reward (mean)"), ("reward_std", "intra-group reward std"),
                              ("zero_std_ratio", "zero-std ratio (groups with equal rewards)"),
                              ("eval_strict", "held-out GenEval strict (EMA)"))):
    """One panel per key: x = step, y = mean over seeds, one line per method, legend at the top."""
    from PIL import Image, ImageDraw
    pw, ph, ml, mb, mt = 420, 300, 56, 44, 30
    colors = {m: PALETTE[i % len(PALETTE)] for i, m in enumerate(results)}
    legend = 18 * math.ceil(len(results) / 6)
    img = Image.new("RGB", (pw * len(keys), ph + legend + 10), "white")
    draw = ImageDraw.Draw(img)
    for i, method in enumerate(results):     # legend, six a row
        x, y = 10 + (i % 6) * 150, 8 + (i // 6) * 18
        draw.line([(x, y + 6), (x + 24, y + 6)], fill=colors[method], width=3)
        draw.text((x + 30, y), method, fill="black")
    for p, (key, title) in enumerate(keys):
        ox, oy = p * pw, legend + 10
        curves = {}
        for method, runs in results.items():
            by_step = {}
            for _, _, rows in runs:
                for r in rows:
                    k = strict_key(r) if key == "eval_strict" else key
                    if k in r:
                        by_step.setdefault(r["step"], []).append(r[k])
            curves[method] = sorted((s, float(np.mean(v))) for s, v in by_step.items())
        pts = [pt for c in curves.values() for pt in c]
        x0, x1 = min((s for s, _ in pts), default=0), max((s for s, _ in pts), default=1)
        y0, y1 = min((v for _, v in pts), default=0), max((v for _, v in pts), default=1)
        if key == "zero_std_ratio":
            y0, y1 = 0.0, 1.0
        pad = (y1 - y0) * 0.05 or 0.05
        y0, y1 = y0 - pad, y1 + pad
        L, R, T, B = ox + ml, ox + pw - 12, oy + mt, oy + ph - mb
        sx = lambda s: L + (s - x0) / max(x1 - x0, 1e-12) * (R - L)
        sy = lambda v: B - (v - y0) / max(y1 - y0, 1e-12) * (B - T)
        draw.text((L, oy + 8), title, fill="black")
        for j in range(5):                  # y ticks and grid
            v = y0 + (y1 - y0) * j / 4
            draw.line([(L, sy(v)), (R, sy(v))], fill=(225, 225, 225))
            draw.text((ox + 4, sy(v) - 6), f"{v:.3g}", fill="gray")
        draw.rectangle([L, T, R, B], outline="black")
        for j in range(5):                  # x ticks
            s = x0 + (x1 - x0) * j / 4
            draw.text((sx(s) - 8, B + 4), f"{s:.0f}", fill="gray")
        draw.text(((L + R) // 2 - 12, B + 22), "step", fill="black")
        for method, c in curves.items():
            xy = [(sx(s), sy(v)) for s, v in c]
            for x, y in xy:    # dots, so that a single step still shows
                draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colors[method])
            if len(xy) > 1:
                draw.line(xy, fill=colors[method], width=2)
    img.save(path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--budget", type=int, default=DEFAULT_K * DEFAULT_G, help="N images per prompt (K·G for E²PO), for "
                    "every method (default: train.py's K·G)")
    ap.add_argument("--k", type=int, default=DEFAULT_K, help="E²PO's K (G = budget / K; default: train.py's)")
    ap.add_argument("--max_steps", type=int, default=None, help="default: train.py's")
    ap.add_argument("--methods", nargs="+", default=["nft", "e2po"], help=f"{', '.join(METHODS)} or e2po_k<K>")
    ap.add_argument("--jobs", type=int, default=2, help="runs at once (each with one thread)")
    ap.add_argument("--out", default="out-compare")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra train.py settings for every run")
    ap.add_argument("--smoke", action="store_true", help="1 tiny step per run: " + " ".join(f"{k}={v}" for k, v in SMOKE.items()))
    ap.add_argument("--report_only", action="store_true", help="only re-read OUT/*/log.jsonl")
    args = ap.parse_args(argv)
    for m in args.methods:      # a bad name or budget fails before anything runs
        method_overrides(m, args.budget, args.k)
    out = os.path.abspath(args.out)
    common = dict(SMOKE) if args.smoke else {}
    common.update(kv.split("=", 1) for kv in args.set)
    if args.max_steps is not None:
        common["max_steps"] = args.max_steps
    run_dir = lambda m, s: os.path.join(out, f"{m}-s{s}")

    if not args.report_only:     # seed-major order, so a half-done sweep already has every method
        jobs = [(f"{m}-s{s}", {**common, **method_overrides(m, args.budget, args.k), "seed": s, "out_dir": run_dir(m, s)})
                for s in args.seeds for m in args.methods]
        with ThreadPoolExecutor(args.jobs) as pool:
            failed = [name for (name, _), rc in zip(jobs, pool.map(run_one, jobs)) if rc]
        if failed:
            print(f"failed runs (left out of the report): {failed}")

    results = {}
    for m in args.methods:
        for s in args.seeds:
            loaded = load_run(run_dir(m, s))
            if loaded:
                results.setdefault(m, []).append((s, *loaded))
    if not results:
        sys.exit("nothing to report")
    os.makedirs(out, exist_ok=True)
    md = table(results) + "\n" + questions(results)
    head = (f"# The paper's questions on the shapes world\n\n`python data/shapes/compare.py {' '.join(sys.argv[1:] if argv is None else argv)}`\n\n")
    with open(os.path.join(out, "compare.md"), "w") as f:
        f.write(head + md + "\n![curves](compare.png)\n")
    plot(results, os.path.join(out, "compare.png"))
    print(md)
    print(f"wrote {os.path.join(out, 'compare.md')} and compare.png")


if __name__ == "__main__":
    main()
