"""
DiffusionNFT against E²PO (and Flow-GRPO, E-GRPO) at the same sample budget on the shapes world: the paper's
Table 1 / Fig. 2 question at toy scale.

Every method draws N = budget images per prompt (same prompts_per_step, max_steps, learning rate, everything
else), so each step samples, decodes and rewards the same number of images, prompts_per_step · N:

    nft        DiffusionNFT: K=1 variant, G=N seeds
    e2po       E²PO: K variants (the original prompt + K−1 perturbed), G=N/K seeds (N=8: K=4, G=2)
    static     e2po with schedule="static" (the perturbation is kept at every noise level, γ ≡ 1)
    no_anchor  e2po with anchor=False: the original prompt is not in the group, so K+1 variants of
               which K perturbed × G seeds = N samples (the update still uses the original prompt)
    flow_grpo  Flow-GRPO: G=N SDE trajectories per prompt (η 0.7), trained on 9 of their 10 steps, two optimizer
               steps per iteration (Flow-GRPO's SD3.5 presets), β 0.04
    e_grpo     E-GRPO: 2 of the plan's active steps per prompt (egrpo_branch_steps=2, drawn per prompt) × G=N/2
               branches = N images; groups are (prompt, step) of N/2 with per-group std. Besides the N images it
               runs the shared ODE prefix (up to the branch point, no image of its own)
Model evaluations per image differ: NFT/E²PO 10 (DPM-Solver++), Flow-GRPO 10 (SDE), E-GRPO 10 − i − l for a
branch of the merged step i → i+l (which reuses the prefix's velocity) plus the shared prefix's i + 1 per prompt;
training forwards per image: NFT 9 (+ old and reference, no grad), Flow-GRPO 9 (+ reference), E-GRPO one per
(prompt, step) group, shared by its G branches (+ reference).

For each seed and method it runs `python train.py --key=value ...` in a subprocess (one torch thread
each; --jobs runs that many at once) into OUT/<method>-s<seed>/, then reads every log.jsonl and writes
OUT/compare.md (the table, also printed) and OUT/compare.png (mean over seeds vs step: training
reward, mean intra-group reward std, zero-std ratio; one line per method).

    python data/shapes/compare.py                                  # 3 seeds × nft, e2po, 80 steps each
    python data/shapes/compare.py --methods nft e2po static no_anchor --jobs 2
    python data/shapes/compare.py --report_only                    # re-read the logs, no training
    python data/shapes/compare.py --smoke --seeds 0 --jobs 1 --out out-compare-smoke   # 1 tiny step each
    python data/shapes/compare.py --set learning_rate=1e-4 eval_num_prompts=32           # any train.py key

Time: each run is one `python train.py` on this world. With --jobs 2 each run gets one core: at the present
defaults (timestep_fraction 0.99, emb_steps 50) an E²PO run took ≈14 min and a DiffusionNFT run ≈13 min (the
default sweep, 3 seeds × 2 methods, 42 min; all four methods about twice that).

Where this departs from the paper: a 64² world and a tiny pretrained MMDiT instead of SD3.5-M on 8 GPUs
(80 steps of 16 prompts instead of 300–850 of 48); both methods get the same N (the paper's DiffusionNFT
baseline, config/nft_baseline.py, has G=24 where E²PO-K4 has 4×2); the training reward is the world's
soft GenEval partial score (reward "shapes_soft") and the test score GenEval's scoring with a numpy detector
instead of Mask2Former + CLIP ("GenEval" here: partial = mean of clause terms; strict = GenEval's 0/1
correctness), on the EMA adapter over the held-out prompts × eval_num_images, the same noise for every run.
"""

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)
from train import num_seeds as DEFAULT_G, num_variants as DEFAULT_K   # noqa: E402  (the default run's K × G)

METHODS = ("nft", "e2po", "static", "no_anchor", "flow_grpo", "e_grpo")
COLORS = {"nft": (214, 39, 40), "e2po": (31, 119, 180), "static": (44, 160, 44), "no_anchor": (255, 127, 14),
          "flow_grpo": (148, 103, 189), "e_grpo": (140, 86, 75)}
SMOKE = {"max_steps": 1, "prompts_per_step": 1, "emb_steps": 2, "train_sample_steps": 4, "timestep_fraction": 0.5,
         "eval_sample_steps": 2, "eval_num_prompts": 2, "eval_num_images": 1, "eval_every": 1, "save_every": 1, "log_images_every": 0}


def method_overrides(method, budget, k):
    """train.py settings that define each method at N = budget images per prompt."""
    if method == "nft":
        return {"num_variants": 1, "num_seeds": budget}
    if method == "flow_grpo":
        return {"method": "flow_grpo", "num_variants": 1, "num_seeds": budget, "grpo_updates": 2}
    if method == "e_grpo":
        assert budget % 2 == 0, f"--budget {budget} must be even for e_grpo (2 active steps × G)"
        return {"method": "e_grpo", "num_variants": 1, "num_seeds": budget // 2, "egrpo_branch_steps": 2,
                "global_std": False}
    assert budget % k == 0, f"--budget {budget} must be a multiple of --k {k}"
    e2po = {"num_variants": k, "num_seeds": budget // k}
    return {"e2po": e2po, "static": {**e2po, "schedule": "static"},
            "no_anchor": {"num_variants": k + 1, "num_seeds": budget // k, "anchor": False}}[method]


def run_one(job):
    """One training run in a subprocess with one thread; its output goes to out_dir/train.log."""
    name, settings = job
    os.makedirs(settings["out_dir"], exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, "train.py"] + [f"--{k}={v}" for k, v in settings.items()]
    print(f"[{name}] start: {' '.join(cmd[1:])}", flush=True)
    with open(os.path.join(settings["out_dir"], "train.log"), "w") as log:
        rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
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
    return cfg, rows


def summarise(rows):
    """One run's numbers: final test score(s), means over training, training reward first → last 10%."""
    train = [r for r in rows if "reward_std" in r]
    evals = [r for r in rows if "eval_reward" in r]
    w = max(1, len(train) // 10)
    anchor = [r["reward_std_anchor"] for r in train if "reward_std_anchor" in r]   # E²PO: the G noises of C_orig alone
    s = {"std": np.mean([r["reward_std"] for r in train]), "zero": np.mean([r["zero_std_ratio"] for r in train]),
         "std_anchor": np.mean(anchor) if anchor else None,
         "r0": np.mean([r["reward_mean"] for r in train[:w]]), "r1": np.mean([r["reward_mean"] for r in train[-w:]]),
         "test": evals[-1]["eval_reward"], "test0": evals[0]["eval_reward"] if evals[0]["step"] == 0 else None}
    strict = [k for k in evals[-1] if k.startswith("eval_") and k.endswith("_strict")]
    s["strict"] = evals[-1][strict[0]] if strict else None
    return s


def pm(values, digits=3):
    """mean ± sample std over seeds (0 for one seed)."""
    values = [v for v in values if v is not None]
    sd = np.std(values, ddof=1) if len(values) > 1 else 0.0
    return f"{np.mean(values):.{digits}f} ± {sd:.{digits}f}" if values else "–"


def table(results):
    """Markdown table over seeds; results[method] = list of (seed, config, log rows)."""
    lines = [f"| method | K × G | final test GenEval partial (mean ± std over seeds) | gain over before training | strict | "
             f"mean intra-group reward std | the same over the original prompt's G noises alone | mean zero-std ratio | "
             f"train reward first → last 10% of steps | seeds |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    before = []
    for method, runs in results.items():
        sums = [summarise(rows) for _, _, rows in runs]
        before += [s["test0"] for s in sums if s["test0"] is not None]
        c = runs[0][1]
        kg = f"{c['num_variants']}{'' if c['anchor'] else ' (no anchor)'} × {c['num_seeds']}"
        if c.get("method") == "e_grpo":      # G branches at each of this many active steps
            kg += f" × {c.get('egrpo_branch_steps') or 'all'} steps"
        gains = [s["test"] - s["test0"] for s in sums if s["test0"] is not None]
        lines.append(f"| {method} | {kg} | {pm([s['test'] for s in sums])} | {pm(gains)} | {pm([s['strict'] for s in sums])} | "
                     f"{pm([s['std'] for s in sums])} | {pm([s['std_anchor'] for s in sums])} | {pm([s['zero'] for s in sums], 2)} | "
                     f"{np.mean([s['r0'] for s in sums]):.3f} → {np.mean([s['r1'] for s in sums]):.3f} | "
                     f"{len(sums)} ({' '.join(str(s) for s, _, _ in runs)}) |")
    if before:
        lines.append(f"\nTest GenEval partial before training (base model, every method and seed): {pm(before)}")
    return "\n".join(lines) + "\n"


def plot(results, path, keys=(("reward_mean", "training reward (mean)"), ("reward_std", "mean intra-group reward std"),
                              ("zero_std_ratio", "zero-std ratio (groups with equal rewards)"))):
    """One panel per key: x = step, y = mean over seeds, one line per method, legend at the top."""
    from PIL import Image, ImageDraw
    pw, ph, ml, mb, mt = 420, 300, 56, 44, 30
    img = Image.new("RGB", (pw * len(keys), ph + 28), "white")
    draw = ImageDraw.Draw(img)
    for i, method in enumerate(results):     # legend
        x = 10 + i * 130
        draw.line([(x, 14), (x + 24, 14)], fill=COLORS[method], width=3)
        draw.text((x + 30, 8), method, fill="black")
    for p, (key, title) in enumerate(keys):
        ox, oy = p * pw, 28
        curves = {}
        for method, runs in results.items():
            by_step = {}
            for _, _, rows in runs:
                for r in rows:
                    if key in r:
                        by_step.setdefault(r["step"], []).append(r[key])
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
                draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=COLORS[method])
            draw.line(xy, fill=COLORS[method], width=2)
    img.save(path)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--budget", type=int, default=DEFAULT_K * DEFAULT_G, help="N images per prompt (K·G for E²PO), for "
                    "every method (default: train.py's K·G)")
    ap.add_argument("--k", type=int, default=DEFAULT_K, help="E²PO's K (G = budget / K; default: train.py's)")
    ap.add_argument("--max_steps", type=int, default=None, help="default: train.py's")
    ap.add_argument("--methods", nargs="+", default=["nft", "e2po"], choices=METHODS)
    ap.add_argument("--jobs", type=int, default=2, help="runs at once (each with one thread)")
    ap.add_argument("--out", default="out-compare")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra train.py settings for every run")
    ap.add_argument("--smoke", action="store_true", help="1 tiny step per run: " + " ".join(f"{k}={v}" for k, v in SMOKE.items()))
    ap.add_argument("--report_only", action="store_true", help="only re-read OUT/*/log.jsonl")
    args = ap.parse_args()
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
    md = table(results)
    head = (f"# DiffusionNFT vs E²PO on the shapes world\n\n`python data/shapes/compare.py {' '.join(sys.argv[1:])}`\n\n")
    with open(os.path.join(out, "compare.md"), "w") as f:
        f.write(head + md + "\n![curves](compare.png)\n")
    plot(results, os.path.join(out, "compare.png"))
    print(md)
    print(f"wrote {os.path.join(out, 'compare.md')} and compare.png")


if __name__ == "__main__":
    main()
