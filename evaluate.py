"""
evaluate.py: the paper's Tables 1 and 2 for a base model and any number of LoRAs: GenEval (strict and partial, per tag
and overall, as GenEval reports it), rewards the model never trained on (PickScore, Aesthetic, ImageReward, HPSv2.1,
CLIPScore, OCR on GOT-OCR) and diversity over the N images of each prompt (DivGenBench's SDI and PVS, and the mean
pairwise cosine of CLIP image embeddings).

    python evaluate.py                                          # the shapes world's model, its held-out prompts
    python evaluate.py --lora out/lora_ema.safetensors --num_prompts 16 --num_images 4 --out out-eval
    python evaluate.py --lora e2po=out-e2po/lora_ema.safetensors nft=out-nft/lora_ema.safetensors
    python evaluate.py --weights /models/stable-diffusion-3.5-medium --max_sequence_length 128 --dtype float16 \\
        --prompts data/geneval/test_metadata.jsonl --reward_module "" --geneval_reward geneval \\
        --reward_paths '{"geneval": "/models/geneval", "pickscore": "/models/PickScore_v1", "clip_l": ...}'

One row per model: the base (LoRA off) and each --lora (a file train.py wrote, model.save_lora's format, or a
diffusers/peft SD3 LoRA; `name=path` names the row). Every prompt is sampled --num_images times with the evaluation
sampler (Euler; 20 steps on the world as train.py's evaluation, 40 on real weights as the paper; CFG-free unless
--guidance_scale > 1), from noise keyed by (prompt index, image index) exactly as train.evaluate draws it, so the base
world model's GenEval here equals train.py's step-0 evaluation on the same prompts and images. Every metric whose
models are available is scored; one whose weights are missing leaves its column out with a one-line note naming them.

Outputs in --out: results.md (the table, the per-tag GenEval, the notes), results.json (every number, per prompt
too), images/<row>/<prompt index>/<image index>.png and grid_<row>.png (rows = prompts, columns = images). --out must
be new or empty, so that everything in it is one evaluation's; --overwrite replaces an earlier evaluation there: it
removes the files evaluate.py writes (the four kinds above) and refuses a folder that holds anything else, so nothing
evaluate.py did not write is ever deleted. Two rows whose names give the same folder (`a/b` and `a_b`, or names that
differ only in case) are refused.

Every setting is checked before a model loads: the files, the prompts, --out (a folder that can be written: a file
there fails now, not after the first batch), and --reward_paths: every key known to reward.py, every value an
existing path (reward.check_reward_paths), and a path given for a metric that runs must be of the kind it loads (a
folder with config.json, ...; the error names the key). A metric whose path is not given is left out with a note. On
the command line a mistake prints one line, `evaluate.py: error: ...`, and exits with status 2 (no traceback; a
crash after the checks keeps its traceback); from Python, main(), prepare() and check_settings() raise it.

Metrics
- GenEval: the --geneval_reward (the world: "shapes", its detector; real weights: "geneval", Mask2Former + CLIP
  colour) over GenEval-format prompts; strict and partial per tag, "overall" the mean over tags (reward.geneval_summary).
- Rewards: reward.py's, by name (--rewards); PickScore is shown unscaled (×26, the paper's unit).
- PVS (DivGenBench): per image the mean HSV saturation and value (PIL's HSV, in [0,1]) and the std of the grayscale
  image (PIL's "L", in [0,1]); per prompt std(saturations) + std(values) + std(contrasts), population std.
- SDI (DivGenBench): per prompt 1 − the mean over image pairs of layout similarity, where similarity = the summed
  IoU of Hungarian-matched boxes / max(#boxes). Boxes: the --layout_detector (the GenEval reward's own detector when
  it registered one, the world's; else Grounding DINO with the prompt as caption) above SDI_SCORE_THRESHOLD.
- CLIP sim: per prompt the mean pairwise cosine of CLIP ViT-L/14 image embeddings (lower = more diverse).
Every diversity metric is averaged over prompts and needs --num_images >= 2.

Where this departs from the references
- DivGenBench's IDS (ArcFace identity cosine) and ASC (CSD style features) are left out: neither model has weights
  that load with this project's packages (ArcFace ships as insightface ONNX / MXNet files, CSD as a torch checkpoint
  of its own ViT). See the "not implemented" notes in results.md.
- SDI: two images with no boxes have similarity 1 (the same, empty, layout); one empty and one not, 0. Boxes are
  class-agnostic. DivGenBench's prompt set and its layout detector's thresholds are not reproduced; here the prompts
  are the evaluation's own.
- The OCR column uses GOT-OCR 2.0, not the anchors' PaddleOCR (reward.py).
- Images are scored as sampled (float tensors), not re-read from the PNGs (PNG rounding is below any metric's
  resolution, and PVS rounds to uint8 as PIL does).
"""

import argparse
import importlib
import json
import os
import re
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import configurator
import model as M
import reward as R
import sample
import train

# -----------------------------------------------------------------------------
# defaults
NUM_IMAGES = 4              # images per prompt (GenEval samples 4)
WORLD_STEPS = train.eval_sample_steps   # Euler steps on the world (train.py's evaluation: 20)
REAL_STEPS = sample.EVAL_STEPS          # Euler steps on real weights (paper Table 3: 40)
BATCH_SIZE = train.rollout_micro_batch  # samples per forward; train.evaluate's chunking, so the draws match bit for bit
UNSEEN_REWARDS = ("pickscore", "aesthetic", "image_reward", "hpsv2", "clipscore", "ocr_got")
WEIGHT_SOURCES_DIRS = set(R.WEIGHT_SOURCES) - {"hpsv2", "aesthetic", "image_reward"}   # keys that must be folders
SDI_SCORE_THRESHOLD = 0.3   # detections kept for layouts (GenEval's detection threshold)
GRID_PROMPTS = 16           # prompts shown in each grid
COLUMNS = {                 # result key -> (table header, higher is better); the paper's order, extras after
    "geneval": ("GenEval", True), "pickscore": ("PickScore", True), "aesthetic": ("Aesthetic", True),
    "image_reward": ("ImgRwd", True), "hpsv2": ("HPSv2.1", True), "clipscore": ("CLIPScore", True),
    "ocr_got": ("OCR (GOT)", True), "sdi": ("SDI", True), "pvs": ("PVS", True), "clip_sim": ("CLIP sim", False)}
NOT_IMPLEMENTED = [
    "IDS (DivGenBench: ArcFace identity cosine) is not computed: it needs an ArcFace face-recognition model (insightface "
    "buffalo_l / antelopev2, shipped as ONNX or MXNet files) and a face detector, none of which loads with torch + "
    "transformers; a port would be a converted iresnet100 state dict plus its face alignment.",
    "ASC (DivGenBench: CSD style features) is not computed: it needs CSD's ViT-L/14 checkpoint (learn2phoenix/CSD, a "
    "torch file of its own layout with style/content heads) mapped onto transformers' CLIPVisionModel, and "
    "DivGenBench's exact aggregation of the style features, which we could not obtain."]


# -----------------------------------------------------------------------------
# diversity metrics (each on the N images of one prompt)

def pvs(images):
    """DivGenBench's PVS of one prompt's images (N,3,H,W) in [0,1]: std of the per-image mean HSV saturation + std of
    the mean HSV value + std of the grayscale std (PIL's HSV and L conversions, values in [0,1], population stds)."""
    sats, vals, contrasts = [], [], []
    for arr in to_uint8(images):
        im = Image.fromarray(arr)
        hsv = np.asarray(im.convert("HSV"), dtype=np.float64) / 255.0
        sats.append(hsv[..., 1].mean())
        vals.append(hsv[..., 2].mean())
        contrasts.append((np.asarray(im.convert("L"), dtype=np.float64) / 255.0).std())
    return float(np.std(sats) + np.std(vals) + np.std(contrasts))


def iou(a, b):
    """IoU of two boxes (x0, y0, x1, y1), continuous coordinates (x1, y1 exclusive: area = width × height)."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def hungarian(cost):
    """Minimum-cost assignment of a (n, m) cost matrix (Kuhn–Munkres with potentials, O(n²m)); returns the (row,
    column) pairs, min(n, m) of them. Written here because scipy is not a runtime package."""
    cost = np.asarray(cost, dtype=np.float64)
    transposed = cost.shape[0] > cost.shape[1]
    if transposed:
        cost = cost.T
    n, m = cost.shape
    u, v = np.zeros(n + 1), np.zeros(m + 1)
    match = np.zeros(m + 1, dtype=int)      # match[j] = row (1-based) assigned to column j; column 0 is a sentinel
    way = np.zeros(m + 1, dtype=int)
    for i in range(1, n + 1):
        match[0], j0 = i, 0
        minv, used = np.full(m + 1, np.inf), np.zeros(m + 1, dtype=bool)
        while True:
            used[j0] = True
            i0, delta, j1 = match[j0], np.inf, 0
            for j in range(1, m + 1):
                if not used[j]:
                    cur = cost[i0 - 1, j - 1] - u[i0] - v[j]
                    if cur < minv[j]:
                        minv[j], way[j] = cur, j0
                    if minv[j] < delta:
                        delta, j1 = minv[j], j
            for j in range(m + 1):
                if used[j]:
                    u[match[j]] += delta
                    v[j] -= delta
                else:
                    minv[j] -= delta
            j0 = j1
            if match[j0] == 0:
                break
        while j0:
            j1 = way[j0]
            match[j0] = match[j1]
            j0 = j1
    pairs = [(match[j] - 1, j - 1) for j in range(1, m + 1) if match[j]]
    return sorted((c, r) for r, c in pairs) if transposed else sorted(pairs)


def layout_similarity(boxes_a, boxes_b):
    """Summed IoU of the Hungarian-matched boxes / max(#boxes); 1 when both are empty, 0 when one is."""
    if not boxes_a and not boxes_b:
        return 1.0
    if not boxes_a or not boxes_b:
        return 0.0
    overlap = np.array([[iou(a, b) for b in boxes_b] for a in boxes_a])
    matched = sum(overlap[i, j] for i, j in hungarian(-overlap))
    return float(matched / max(len(boxes_a), len(boxes_b)))


def sdi(layouts):
    """DivGenBench's SDI of one prompt: 1 − mean pairwise layout similarity over its images' box lists."""
    sims = [layout_similarity(layouts[i], layouts[j]) for i in range(len(layouts)) for j in range(i + 1, len(layouts))]
    return 1.0 - float(np.mean(sims))


def mean_pairwise_cosine(embeddings):
    """Mean cosine over the distinct pairs of (N, D) embeddings."""
    e = torch.nn.functional.normalize(torch.as_tensor(embeddings, dtype=torch.float64), dim=-1)
    n = e.shape[0]
    sims = e @ e.T
    return float((sims.sum() - sims.diagonal().sum()) / (n * (n - 1)))


def to_uint8(images):
    """(N,3,H,W) in [0,1] -> (N,H,W,3) uint8, rounded as a PNG stores them."""
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


# -----------------------------------------------------------------------------
# settings

def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default="", help="pipeline root or single file (default: the shapes world's model)")
    ap.add_argument("--text_encoders", default="", help="pipeline root with text_encoder*/tokenizer* (default: --weights)")
    ap.add_argument("--lora", nargs="*", default=[], help="LoRA files, one row each; NAME=PATH names the row")
    ap.add_argument("--prompts", default="", help="GenEval-format .jsonl or .txt (default: the world's held-out prompts)")
    ap.add_argument("--num_prompts", type=int, default=0, help="the first N prompts (0 = all)")
    ap.add_argument("--num_images", type=int, default=NUM_IMAGES, help="images per prompt")
    ap.add_argument("--out", default="out-eval", help="an empty or new folder (see --overwrite)")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace an earlier evaluation in --out (a folder holding only evaluate.py's outputs)")
    ap.add_argument("--steps", type=int, default=0, help=f"Euler steps (0 = {WORLD_STEPS} on the world, {REAL_STEPS} else)")
    ap.add_argument("--solver", default="euler", choices=sample.SOLVERS)
    ap.add_argument("--guidance_scale", type=float, default=1.0, help="CFG scale (1 = CFG-free, as the paper evaluates)")
    ap.add_argument("--resolution", type=int, default=0, help="pixels (0 = the pipeline's native size, else 512)")
    ap.add_argument("--max_sequence_length", type=int, default=0,
                    help="T5 tokens (0 = the pipeline's own, else 256; the SD3.5 presets use 128)")
    ap.add_argument("--no_t5", action="store_true", help="zero T5 tokens even when the pipeline has T5")
    ap.add_argument("--reward_module", default=train.reward_module,
                    help="module imported first, registering rewards and detectors of its own ('' = none)")
    ap.add_argument("--geneval_reward", default="", help="GenEval-style reward ('' = shapes on the world, else geneval)")
    ap.add_argument("--rewards", nargs="*", default=list(UNSEEN_REWARDS), help="other rewards to score if available")
    ap.add_argument("--reward_paths", default="{}", help="JSON object of local model paths (reward.py keys) or a .json file")
    ap.add_argument("--layout_detector", default="",
                    help="detector for SDI ('' = the GenEval reward's own if it registered one, else grounding_dino)")
    ap.add_argument("--batch_size", type=int, default=BATCH_SIZE)
    ap.add_argument("--device", default="")
    ap.add_argument("--dtype", default="float32", choices=sorted(train.DTYPES),
                    help="autocast dtype (the MMDiT keeps float32 weights); VAE, text encoders and reward models use it")
    return ap.parse_args(argv)


def parse_reward_paths(text):
    """A JSON object, or the path of a .json file holding one."""
    if os.path.isfile(text):
        with open(text) as f:
            text = f.read()
    try:
        paths = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--reward_paths must be a JSON object or a .json file, got {text!r} ({e})") from None
    if not isinstance(paths, dict):
        raise ValueError(f"--reward_paths must be a JSON object, got {paths!r}")
    return paths


def parse_loras(specs):
    """[(row name, path)] from PATH or NAME=PATH arguments; every file must exist."""
    rows = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or os.path.exists(spec):
            name, path = os.path.splitext(os.path.relpath(spec))[0], spec
        if not os.path.exists(path):
            raise FileNotFoundError(f"--lora {path!r} does not exist")
        rows.append((name, path))
    names = [n for n, _ in rows]
    if "base" in names or len(set(names)) != len(names):
        raise ValueError(f"LoRA row names must be distinct and not 'base': {names}")
    folders = {}
    for name in ["base", *names]:   # case-insensitively: two rows must not share a folder on macOS / Windows either
        other = folders.setdefault(slug(name).lower(), name)
        if other != name:
            raise ValueError(f"--lora rows {other!r} and {name!r} would both write images/{slug(name)}/ and "
                             f"grid_{slug(name)}.png: give them names that differ in letters, digits, '.', '_' or '-' "
                             "(NAME=PATH)")
    return rows


def slug(name):
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "row"


def check_settings(args):
    """Everything that can be checked before a model loads: paths, prompts, which metrics can run (and notes for the
    ones that cannot). Returns a namespace of resolved settings."""
    world = not args.weights
    weights = args.weights or M.DEFAULT_WEIGHTS
    if not os.path.exists(weights):
        raise FileNotFoundError(f"--weights {weights!r} does not exist")
    te = args.text_encoders or (weights if os.path.isdir(weights) else os.path.dirname(os.path.abspath(weights)))
    if not os.path.isdir(te):
        raise FileNotFoundError(f"text encoders: {te!r} is not a pipeline root (pass --text_encoders)")
    if args.num_images < 1 or args.num_prompts < 0 or args.batch_size < 1 or args.steps < 0:
        raise ValueError("--num_images and --batch_size must be >= 1, --num_prompts and --steps >= 0")
    prompts = args.prompts or (train.eval_prompts if world else "")
    if not prompts:
        raise ValueError("--prompts is needed with --weights (a GenEval-format .jsonl or a .txt)")
    items = train.read_prompts(prompts)
    if args.num_prompts:
        items = items[:args.num_prompts]
    loras = parse_loras(args.lora)
    paths = parse_reward_paths(args.reward_paths)
    if args.reward_module:
        importlib.import_module(args.reward_module)
    R.check_reward_paths(paths)     # after the module: its rewards' keys are known keys too
    notes = list(NOT_IMPLEMENTED)

    def given(name, keys):
        """A path the user gave for a metric that runs must be of the right kind (an error naming the key); a path
        not given only leaves the metric out (a note, below)."""
        for key in keys:
            if key not in paths:
                continue
            if key in WEIGHT_SOURCES_DIRS and not os.path.isdir(paths[key]):
                files, repo = R.WEIGHT_SOURCES[key]
                raise NotADirectoryError(f"reward_paths[{key!r}] = {paths[key]!r} is a file; {name} needs {files} "
                                         f"(Hugging Face repo {repo})")
            try:
                R._need_path(paths, key, name)
            except FileNotFoundError as e:
                raise FileNotFoundError(f"reward_paths[{key!r}]: {e}") from None

    def available(name):
        given(name, R.REQUIRED_PATHS.get(name, ()))
        try:
            R.check_paths(name, paths)
            return True
        except (FileNotFoundError, ValueError) as e:
            notes.append(f"{COLUMNS.get(name, (name,))[0]} skipped: {e}")
            return False

    geneval = args.geneval_reward or ("shapes" if world else "geneval")
    if geneval not in R.REWARDS:
        raise ValueError(f"--geneval_reward {geneval!r} is not a registered reward ({sorted(R.REWARDS)}); "
                         f"does --reward_module {args.reward_module!r} register it?")
    if not all("include" in it for it in items):
        notes.append(f"GenEval skipped: the prompts of {prompts} carry no GenEval metadata (\"tag\", \"include\")")
        geneval = None
    elif not available(geneval):
        geneval = None
    rewards = []
    for name in args.rewards:
        if name not in R.REWARDS:
            raise ValueError(f"--rewards: unknown reward {name!r}; choose from {sorted(R.REWARDS)}")
        if name == "ocr_got" and not all('"' in it["prompt"] for it in items):
            notes.append("OCR (GOT) skipped: not every prompt has text between double quotes to read")
        elif name in R.NEEDS_METADATA and not all("include" in it for it in items):
            notes.append(f"{name} skipped: it needs GenEval metadata")
        elif available(name):
            rewards.append(name)
    detector = args.layout_detector or (geneval if geneval in R.DETECTORS else "grounding_dino")
    clip_l = "clip_l" in paths
    if args.num_images < 2:
        notes.append("diversity (SDI, PVS, CLIP sim) skipped: it needs --num_images >= 2")
        detector, clip_l = None, False
    else:
        if detector in R.DETECTOR_PATHS:
            given(detector, R.DETECTOR_PATHS[detector])
        try:
            R.check_detector(detector, paths)
        except (FileNotFoundError, ValueError) as e:
            notes.append(f"SDI skipped: {e}")
            detector = None
        if clip_l:
            given("clip_sim", ["clip_l"])
        else:
            notes.append("CLIP sim skipped: it needs reward_paths['clip_l'] (a CLIPModel dir, openai/clip-vit-large-patch14)")
    size = args.resolution or M.native_size(weights) or 512
    return argparse.Namespace(
        world=world, weights=weights, text_encoders=te, items=items, prompts=prompts, loras=loras, paths=paths,
        notes=notes, geneval=geneval, rewards=rewards, detector=detector, clip_l=clip_l, size=size,
        steps=args.steps or (WORLD_STEPS if world else REAL_STEPS), solver=args.solver,
        guidance_scale=args.guidance_scale, num_images=args.num_images, batch_size=args.batch_size, out=args.out,
        max_sequence_length=args.max_sequence_length or None, t5=not args.no_t5, dtype=args.dtype,
        device=torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu")))


OUTPUTS = re.compile(r"results\.md|results\.json|grid_[A-Za-z0-9._-]+\.png|images/[A-Za-z0-9._-]+/\d+/\d+\.png")


def check_out(out, overwrite=False):
    """--out must be a folder evaluate.py can write, new or empty, so that everything in it is one evaluation's.
    With overwrite it may hold an earlier evaluation: only files evaluate.py writes (results.md, results.json,
    grid_<row>.png, images/<row>/<prompt>/<image>.png), and those are returned, to be removed before this one starts;
    a folder holding anything else is refused, so nothing evaluate.py did not write is ever deleted. Writes nothing."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise FileExistsError(f"--out {out!r} is a file, not a folder")
    parent = os.path.abspath(out)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise NotADirectoryError(f"--out {out!r}: {parent!r} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"--out {out!r}: {parent!r} is not writable")
    if parent != os.path.abspath(out):
        return []
    found = sorted(os.path.relpath(os.path.join(d, f), out) for d, dirs, files in os.walk(out) for f in dirs + files)
    files = [f for f in found if os.path.islink(os.path.join(out, f)) or not os.path.isdir(os.path.join(out, f))]
    if not found:
        return []
    top = sorted(f + ("/" if os.path.isdir(os.path.join(out, f)) else "") for f in os.listdir(out))
    shown = ", ".join(top[:6]) + (f" and {len(top) - 6} more" if len(top) > 6 else "")
    if not overwrite:
        raise FileExistsError(f"--out {out!r} is not empty ({shown}): evaluate.py writes into a new or empty folder so "
                              "that it holds one evaluation; choose another --out, or pass --overwrite to replace an "
                              "earlier evaluation there")
    others = [f for f in files if not OUTPUTS.fullmatch(f.replace(os.sep, "/"))]
    if others:
        raise FileExistsError(f"--out {out!r} holds files evaluate.py does not write ({', '.join(others[:5])}"
                              f"{' …' if len(others) > 5 else ''}); --overwrite only replaces an earlier evaluation, "
                              "so choose another --out")
    return files


def prepare(argv=None):
    """Everything before a model loads: the settings (check_settings), then --out (check_out); an earlier evaluation
    there is removed (--overwrite) and the folder is created and probed for writing. Returns the settings."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    cfg = check_settings(args)
    stale = check_out(args.out, args.overwrite)
    for f in stale:
        os.remove(os.path.join(args.out, f))
    images = os.path.join(args.out, "images")
    for d, _, _ in sorted(os.walk(images), reverse=True) if stale else ():   # the emptied folders, deepest first
        os.rmdir(d)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.md"), "w") as f:   # a folder we cannot write fails now, not after a row
        f.write("evaluation in progress\n")
    return cfg


# -----------------------------------------------------------------------------
# the run

def load_models(cfg):
    """MMDiT (float32 weights) with one adapter per LoRA row, VAE, text encoders, the reward fns, the layout detector
    and CLIP."""
    dev, dtype = cfg.device, train.DTYPES[cfg.dtype]
    mmdit = M.load_mmdit(cfg.weights, dtype=torch.float32, device=dev)
    for i, (name, path) in enumerate(cfg.loras):
        M.load_lora(mmdit, path, adapter=f"row{i}")
    vae = M.load_vae(cfg.weights, dtype=dtype, device=dev)
    t5 = cfg.t5 and os.path.isdir(os.path.join(cfg.text_encoders, "text_encoder_3"))
    text = M.load_text_encoders(cfg.text_encoders, dtype=dtype, device=dev, t5=t5,
                                max_sequence_length=cfg.max_sequence_length)
    factor, patch = vae.factor, mmdit.cfg.patch_size
    if cfg.size % (factor * patch):
        raise ValueError(f"--resolution {cfg.size} must be a multiple of {factor * patch}")
    rdtype = dtype if dev.type == "cuda" else None
    fns = {name: R.build(name, cfg.paths, device=dev, dtype=rdtype) for name in [cfg.geneval, *cfg.rewards] if name}
    detector = R.build_detector(cfg.detector, cfg.paths, device=dev, dtype=rdtype) if cfg.detector else None
    clip = R.load_clip(cfg.paths["clip_l"], None, dev, rdtype) if cfg.clip_l else None
    ctx = nullcontext if cfg.dtype == "float32" else (lambda: torch.autocast(device_type=dev.type, dtype=dtype))
    return argparse.Namespace(mmdit=mmdit.eval(), vae=vae.eval(), text=text.eval(), fns=fns, detector=detector,
                              clip=clip, ctx=ctx)


@torch.no_grad()
def sample_batch(models, cfg, ids, adapter):
    """Images (B,3,H,W) in [0,1] (CPU float32) for global image ids (prompt = id // N, image = id % N), with noise
    keyed exactly as train.evaluate keys it."""
    n, lat, dev = cfg.num_images, cfg.size // models.vae.factor, cfg.device
    prompts = [cfg.items[i // n]["prompt"] for i in ids]
    context, pooled = models.text.encode(prompts)
    noise = torch.stack([torch.randn((sample.LATENT_CHANNELS, lat, lat),
                                     generator=train.keyed_generator("eval", i // n, i % n)) for i in ids])
    neg = {}
    if cfg.guidance_scale != 1.0:
        neg_context, neg_pooled = models.text.encode([""])
        neg = dict(neg_context=neg_context.to(dev), neg_pooled=neg_pooled.to(dev))
    with models.ctx(), M.use_adapter(models.mmdit, adapter):
        x0 = sample.sample(models.mmdit, noise.to(dev), context.to(dev), pooled.to(dev), num_steps=cfg.steps,
                           solver=cfg.solver, guidance_scale=cfg.guidance_scale, **neg)
        images = models.vae.decode(x0).float()
    return images.clamp(0, 1).cpu()


def score_batch(models, cfg, ids, images):
    """Per image: every reward's scores, the layout boxes and the CLIP embedding."""
    items = [cfg.items[i // cfg.num_images] for i in ids]
    prompts = [it["prompt"] for it in items]
    out = {}
    with torch.no_grad():
        for name, fn in models.fns.items():
            scores = fn(images, prompts, items if name in R.NEEDS_METADATA else None)
            out.update({k: v.float().cpu().tolist() for k, v in scores.items() if k != "avg"})
        if models.detector is not None:
            out["boxes"] = [[tuple(d.box) for d in dets if float(d.score) > SDI_SCORE_THRESHOLD]
                            for dets in models.detector(images, prompts)]
        if models.clip is not None:
            with models.clip.lock:
                out["clip_embeds"] = models.clip.image_embeds(images).cpu()
    return out


def evaluate_row(models, cfg, name, adapter):
    """Sample and score every prompt × image for one model; save its images and grid. Returns the row's results."""
    n, total = cfg.num_images, len(cfg.items) * cfg.num_images
    per_image, grid, pending, pvs_of = {}, [], {}, {}
    folder = os.path.join(cfg.out, "images", slug(name))
    for a in tqdm(range(0, total, cfg.batch_size), desc=name, unit="batch"):
        ids = list(range(a, min(a + cfg.batch_size, total)))
        images = sample_batch(models, cfg, ids, adapter)
        scores = score_batch(models, cfg, ids, images)
        for k, v in scores.items():
            per_image.setdefault(k, []).extend(list(v))
        for i, image, arr in zip(ids, images, to_uint8(images)):
            os.makedirs(os.path.join(folder, str(i // n)), exist_ok=True)
            Image.fromarray(arr).save(os.path.join(folder, str(i // n), f"{i % n}.png"))
            pending.setdefault(i // n, []).append(image)
            if len(pending[i // n]) == n:           # a prompt is complete: its PVS, then its images can go
                done = pending.pop(i // n)
                pvs_of[i // n] = pvs(torch.stack(done)) if n >= 2 else None
        grid += [img for i, img in zip(ids, images) if i // n < GRID_PROMPTS]
    per_image["pvs"] = [pvs_of[p] for p in range(len(cfg.items))]
    row = summarise(cfg, name, per_image)
    grid = torch.stack(grid)
    sample.save_grid(grid, os.path.join(cfg.out, f"grid_{slug(name)}.png"), ncols=n, labels=grid_captions(
        cfg, per_image, len(grid)), title=grid_title(cfg, name, row), scale=sample.grid_scale(grid))
    return row


def grid_captions(cfg, per_image, count):
    """Under each grid tile: its prompt (first column) and its GenEval strict score, when GenEval is scored."""
    key = f"{cfg.geneval}_strict" if cfg.geneval else None
    return [(cfg.items[i // cfg.num_images]["prompt"] if i % cfg.num_images == 0 else "")
            + (f"\nstrict {per_image[key][i]:.0f}" if key else "") for i in range(count)]


def grid_title(cfg, name, row):
    score = f" · GenEval strict {row['geneval']['strict']['overall']:.3f} over all {len(cfg.items)} prompts" \
        if row["geneval"] else ""
    return f"{name}{score} · rows: prompts, columns: images"


def summarise(cfg, name, per_image):
    """Means over images (rewards), GenEval per tag and overall, diversity per prompt then averaged over prompts."""
    n, P = cfg.num_images, len(cfg.items)
    row = {"name": name, "rewards": {}, "geneval": {}, "diversity": {}, "per_prompt": {}}
    for k in cfg.rewards:
        row["rewards"][k] = float(np.mean(per_image[k]))
        row["per_prompt"][k] = [float(np.mean(per_image[k][p * n:(p + 1) * n])) for p in range(P)]
    if "pickscore" in row["rewards"]:
        row["rewards"]["pickscore_raw"] = row["rewards"]["pickscore"] * R.PICKSCORE_SCALE
    if cfg.geneval:
        tags = [cfg.items[i // n].get("tag") for i in range(P * n)]
        for kind, key in (("strict", f"{cfg.geneval}_strict"), ("partial", cfg.geneval)):
            row["geneval"][kind] = R.geneval_summary(per_image[key], tags)
        for kind, key in (("strict", f"{cfg.geneval}_strict"), ("partial", cfg.geneval)):
            row["per_prompt"][f"geneval_{kind}"] = [float(np.mean(per_image[key][p * n:(p + 1) * n])) for p in range(P)]
    if n >= 2:
        metrics = {"pvs": per_image["pvs"]}
        if "boxes" in per_image:
            metrics["sdi"] = [sdi(per_image["boxes"][p * n:(p + 1) * n]) for p in range(P)]
        if "clip_embeds" in per_image:
            metrics["clip_sim"] = [mean_pairwise_cosine(torch.stack(per_image["clip_embeds"][p * n:(p + 1) * n]))
                                   for p in range(P)]
        for k, v in metrics.items():
            row["diversity"][k] = float(np.mean(v))
            row["per_prompt"][k] = v
    return row


# -----------------------------------------------------------------------------
# the report

def table_values(row):
    """{column key: value} of one row as the paper shows it (GenEval strict overall, PickScore unscaled)."""
    values = dict(row["diversity"])
    values.update({k: v for k, v in row["rewards"].items() if k != "pickscore_raw"})
    if "pickscore_raw" in row["rewards"]:
        values["pickscore"] = row["rewards"]["pickscore_raw"]
    if row["geneval"]:
        values["geneval"] = row["geneval"]["strict"]["overall"]
    return values


def markdown(cfg, rows):
    """results.md: the main table, GenEval per tag (strict, partial), the notes."""
    values = [table_values(r) for r in rows]
    keys = [k for k in COLUMNS if any(k in v for v in values)]
    head = [f"{COLUMNS[k][0]} {'↑' if COLUMNS[k][1] else '↓'}" for k in keys]
    lines = [f"# Evaluation: {cfg.weights}",
             "",
             f"{len(cfg.items)} prompts ({cfg.prompts}) × {cfg.num_images} images · {cfg.solver} {cfg.steps} steps · "
             f"CFG {cfg.guidance_scale:g} · {cfg.size} px · noise keyed by (prompt, image) as train.py's evaluation",
             "", "| model | " + " | ".join(head) + " |", "|---" * (len(keys) + 1) + "|"]
    for r, v in zip(rows, values):
        lines.append(f"| {r['name']} | " + " | ".join(f"{v[k]:.4f}" if k in v else "—" for k in keys) + " |")
    if cfg.geneval:
        for kind in ("strict", "partial"):
            tags = list(rows[0]["geneval"][kind])
            lines += ["", f"GenEval {kind} per tag ({cfg.geneval}; overall = mean over tags, as GenEval reports)", "",
                      "| model | " + " | ".join(tags) + " |", "|---" * (len(tags) + 1) + "|"]
            lines += [f"| {r['name']} | " + " | ".join(f"{r['geneval'][kind][t]:.4f}" for t in tags) + " |" for r in rows]
    lines += ["", "Notes:"] + [f"- {note}" for note in cfg.notes]
    return "\n".join(lines) + "\n"


def write_results(cfg, rows, seconds):
    os.makedirs(cfg.out, exist_ok=True)
    text = markdown(cfg, rows)
    with open(os.path.join(cfg.out, "results.md"), "w") as f:
        f.write(text)
    settings = {k: v for k, v in vars(cfg).items() if k not in ("items", "paths", "device", "notes")}
    settings.update(device=str(cfg.device), num_prompts=len(cfg.items), seconds=round(seconds, 1))
    with open(os.path.join(cfg.out, "results.json"), "w") as f:
        json.dump({"settings": settings, "notes": cfg.notes, "rows": rows}, f, indent=1)
    return text


def main(argv=None):
    """The evaluation; a mistake in the arguments raises before any model loads (the command line prints it as one
    line, see below)."""
    return run(prepare(argv))


def run(cfg):
    t0 = time.time()
    models = load_models(cfg)
    rows = [evaluate_row(models, cfg, "base", None)]
    rows += [evaluate_row(models, cfg, name, f"row{i}") for i, (name, _) in enumerate(cfg.loras)]
    text = write_results(cfg, rows, time.time() - t0)
    print(text)
    print(f"wrote {cfg.out}/results.md, results.json, images/ and grid_*.png in {time.time() - t0:.0f} s")
    return rows


if __name__ == "__main__":
    with configurator.user_errors("evaluate.py"):   # a user's mistake: one line, exit status 2, no traceback
        settings = prepare()
    run(settings)
