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

A sweep is resumable: run the same command again into the same --out and each OUT/<method>-s<seed>/ is
    - new (no run there): trained;
    - finished (its log.jsonl reaches the max_steps of its config.json): skipped, and reported from its files as they
      are (nothing in it is written, its train.log and wall_seconds included);
    - unfinished with a checkpoint (stopped or killed mid-run): continued with train.py's --resume=True, which repeats
      exactly what an uninterrupted run does; its train.log is appended to and its wall_seconds adds up both attempts.
Before anything runs, every existing run's config.json is compared with the full train.py config this sweep would
give it: a run started with other settings (another --set, --max_steps, --smoke, budget or train.py default), or an
unfinished run with no ckpt.pt to resume from, refuses the whole sweep with the list of them, and nothing is started
or changed. A --seeds or --methods value given twice is refused (both runs would share one folder), as are --set pairs
that are not KEY=VALUE, name no train.py setting, have the wrong type, or set what compare.py sets per run (seed,
out_dir, resume, method and the keys that define the chosen methods). On the command line such a mistake prints one
line, `compare.py: error: ...`, and exits with status 2; from Python, main() and check() raise it.

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
import configurator   # noqa: E402
import train   # noqa: E402
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


def launch(cmd, env, log):
    """Run one train.py command with its output going to the open file `log`; its exit status (the tests replace
    this to stand in for training)."""
    return subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT).returncode


def run_one(job):
    """One training run in a subprocess with one thread; its output is appended to out_dir/train.log, its wall time
    (added to an earlier attempt's when it resumes) written to out_dir/wall_seconds."""
    name, settings = job
    os.makedirs(settings["out_dir"], exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, "train.py"] + [f"--{k}={v}" for k, v in settings.items()]
    print(f"[{name}] start: {' '.join(cmd[1:])}", flush=True)
    wall = os.path.join(settings["out_dir"], "wall_seconds")
    try:
        before = float(open(wall).read()) if settings.get("resume") else 0.0
    except (OSError, ValueError):   # an attempt killed before it wrote one
        before = 0.0
    t0 = time.time()
    with open(os.path.join(settings["out_dir"], "train.log"), "a") as log:
        log.write(("\n" if log.tell() else "") + f"=== compare.py {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                  f"{' '.join(cmd[1:])}\n")
        log.flush()
        rc = launch(cmd, env, log)
    with open(wall, "w") as f:
        f.write(f"{before + time.time() - t0:.0f}\n")
    print(f"[{name}] {'done' if rc == 0 else f'FAILED (exit {rc}), see ' + settings['out_dir'] + '/train.log'}", flush=True)
    return rc


def read_log(d):
    """(config.json, log.jsonl rows) of a run folder; a missing file raises FileNotFoundError."""
    with open(os.path.join(d, "config.json")) as f:
        cfg = json.load(f)
    with open(os.path.join(d, "log.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return cfg, rows


def differences(requested, recorded):
    """{key: (recorded, requested)} of the settings a run would get now (train.py's full config) that its config.json
    records otherwise. A requested "" or 0 that is train.py's default (a path or size train.py fills in) is not
    compared; strings compare as paths too (train.py resolves them from the repository)."""
    defaults = train.config_defaults()
    out = {}
    for key, want in requested.items():
        if key in ("out_dir", "resume", "resume_override") or (not want and want == defaults.get(key)):
            continue
        have = recorded.get(key, defaults.get(key))
        if json.loads(json.dumps(want)) == have:
            continue
        if isinstance(want, str) and isinstance(have, str) and want and have and \
                os.path.realpath(os.path.join(REPO, want)) == os.path.realpath(os.path.join(REPO, have)):
            continue
        out[key] = (have, want)
    return out


def run_state(d, requested):
    """What a sweep does with the folder of one of its runs: ("new", why) when it holds no run, ("finished", why) when
    its log reaches the max_steps its config.json records (skipped, reported from its files), ("resume", why) when it
    stopped after a checkpoint (continued with train.py's --resume=True). Raises ValueError when the run there cannot
    be continued as this sweep asks: it has no checkpoint to resume from, or it was started with other settings."""
    found = [f for f in train.RUN_FILES if os.path.exists(os.path.join(d, f))]
    if not found:
        return "new", ""
    try:
        cfg, rows = read_log(d)
    except (FileNotFoundError, json.JSONDecodeError) as e:
        if os.path.isfile(os.path.join(d, "ckpt.pt")):
            return "resume", f"checkpoint, unreadable log ({e})"
        raise ValueError(f"{d} holds a run ({', '.join(found)}) whose config.json / log.jsonl cannot be read ({e}) and "
                         "no ckpt.pt to resume from") from None
    changed = differences(requested, cfg)
    if changed:
        raise ValueError(f"{d} holds a run started with other settings ("
                         + "; ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in sorted(changed.items())) + ")")
    last = rows[-1]["step"] if rows else 0
    if last >= cfg["max_steps"]:
        return "finished", f"finished (logged step {last} of {cfg['max_steps']})"
    if not os.path.isfile(os.path.join(d, "ckpt.pt")):
        raise ValueError(f"{d} holds an unfinished run (logged step {last} of {cfg['max_steps']}) with no ckpt.pt to "
                         "resume from")
    return "resume", f"unfinished (logged step {last} of {cfg['max_steps']})"


def load_run(d):
    """(config.json, log.jsonl rows) of a finished run, or None with a message why not."""
    try:
        cfg, rows = read_log(d)
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


OWN_KEYS = ("seed", "out_dir", "resume", "resume_override")   # compare.py sets these for every run


def parse_set(pairs, methods, budget, k):
    """--set KEY=VALUE pairs -> {key: text as given}, each checked against train.py's settings as train.py checks it
    (configurator: a known key, the default's type); keys compare.py sets itself, per run or per method, are refused."""
    owned = {*OWN_KEYS, "method"} | {key for m in methods for key in method_overrides(m, budget, k)}
    out = {}
    for kv in pairs:
        key, sep, text = kv.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {kv!r} must look like KEY=VALUE (a train.py setting, e.g. learning_rate=1e-4)")
        if key in owned:
            raise ValueError(f"--set {kv!r}: compare.py sets {key} itself for every run (use --seeds, --out, --budget, "
                             "--k or --methods)")
        try:
            configurator.configure(train.config_defaults(), [f"--{key}={text}"])
        except (ValueError, TypeError) as e:
            raise type(e)(f"--set {kv!r}: {e}") from None
        out[key] = text
    return out


def check(argv=None):
    """Parse and check a sweep before anything runs (a ValueError / TypeError names the mistake); returns the plan:
    the jobs to launch (new runs, and unfinished ones resumed with --resume=True) and the finished ones skipped."""
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
    for flag, value in (("--jobs", args.jobs), ("--budget", args.budget), ("--k", args.k),
                        ("--max_steps", 1 if args.max_steps is None else args.max_steps)):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    for flag, values in (("--seeds", args.seeds), ("--methods", args.methods)):
        twice = sorted({v for v in values if values.count(v) > 1}, key=values.index)
        if twice:   # each (method, seed) has one folder: two runs of it would train into the same one
            raise ValueError(f"{flag} lists {' '.join(map(str, twice))} more than once: every method and seed runs "
                             f"once, into OUT/<method>-s<seed>/")
    for m in args.methods:      # a bad name or budget fails before anything runs
        method_overrides(m, args.budget, args.k)
    out = os.path.abspath(args.out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise FileExistsError(f"--out {args.out!r} is a file, not a folder")
    common = dict(SMOKE) if args.smoke else {}
    common.update(parse_set(args.set, args.methods, args.budget, args.k))
    if args.max_steps is not None:
        common["max_steps"] = args.max_steps
    run_dir = lambda m, s: os.path.join(out, f"{m}-s{s}")
    jobs, skipped, problems = [], [], []
    if not args.report_only:     # seed-major order, so a half-done sweep already has every method
        defaults = train.config_defaults()
        for s in args.seeds:
            for m in args.methods:
                settings = {**common, **method_overrides(m, args.budget, args.k), "seed": s, "out_dir": run_dir(m, s)}
                typed = configurator.configure(defaults, [f"--{k}={v}" for k, v in settings.items()])
                try:
                    state, why = run_state(run_dir(m, s), typed)
                except ValueError as e:
                    problems.append(str(e))
                    continue
                if state == "finished":
                    skipped.append((f"{m}-s{s}", why))
                else:
                    jobs.append((f"{m}-s{s}", {**settings, **({"resume": True} if state == "resume" else {})}, why))
        if problems:
            raise ValueError(f"--out {args.out!r} holds runs this sweep can neither skip nor resume (nothing was "
                             "started or changed; use another --out, or move these folders away):\n  "
                             + "\n  ".join(problems))
    return argparse.Namespace(args=args, out=out, run_dir=run_dir, jobs=jobs, skipped=skipped,
                              argv=sys.argv[1:] if argv is None else argv)


def run(plan):
    """Launch the plan's jobs (--jobs at once), then read every run's files and write compare.md and compare.png."""
    args, out, run_dir = plan.args, plan.out, plan.run_dir
    for name, why in plan.skipped:
        print(f"[{name}] {why}: skipped, reported from its files", flush=True)
    for name, settings, why in plan.jobs:
        if settings.get("resume"):
            print(f"[{name}] {why}: resuming it with --resume=True", flush=True)
    if plan.jobs:
        with ThreadPoolExecutor(args.jobs) as pool:
            rcs = list(pool.map(run_one, [(name, settings) for name, settings, _ in plan.jobs]))
        failed = [name for (name, _, _), rc in zip(plan.jobs, rcs) if rc]
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
    head = f"# The paper's questions on the shapes world\n\n`python data/shapes/compare.py {' '.join(plan.argv)}`\n\n"
    with open(os.path.join(out, "compare.md"), "w") as f:
        f.write(head + md + "\n![curves](compare.png)\n")
    plot(results, os.path.join(out, "compare.png"))
    print(md)
    print(f"wrote {os.path.join(out, 'compare.md')} and compare.png")
    return results


def main(argv=None):
    """The sweep; a mistake in its arguments raises (the command line prints it as one line, see below)."""
    return run(check(argv))


if __name__ == "__main__":
    with configurator.user_errors("compare.py"):    # a user's mistake: one line, exit status 2, no traceback
        plan = check()
    run(plan)
