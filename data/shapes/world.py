"""The shapes world: e2po's embedded default task (what Shakespeare is to nanoGPT).

A small procedural world in which the whole E²PO method runs on CPU in minutes:

* images: coloured shapes (circle, square, triangle, diamond, cross) in six well separated colours
  on a plain light background, 64x64 by default, drawn by `render(meta, rng)` so that they satisfy a
  GenEval metadata dict (class, count, colour, relative position);
* prompts + metadata in GenEval's jsonl format for its six tags (single_object, two_object,
  counting, colors, color_attr, position), every combination of the world enumerated, split
  train/test by holding out combinations, never atoms (`split_prompts`): every shape, colour, relation and count is
  trained on, and the held-out prompts combine them in ways training never shows;
* a numpy detector `detect(images)` returning `reward.Detection`s (label, score, box, mask, colour)
  that plugs into reward.py's GenEval scoring in place of Mask2Former + CLIP colour classification, and the
  world's rewards built on it, registered with reward.py on import: "shapes" (GenEval's partial score, and its
  strict correctness as "shapes_strict") and "shapes_soft" (the partial score averaged over detection thresholds),
  each registered with the detector (reward.build_detector("shapes") for other metrics, e.g. evaluate.py's SDI);
* `write_clip_tokenizer(out_dir)`: a CLIP BPE tokenizer over the world's words (one token per word,
  unknown words fall back to characters) laid out as SD3's tokenizer/ and tokenizer_2/ folders.

Regenerate the prompt files (deterministic) and, optionally, a preview grid:

    python data/shapes/world.py                 # rewrites data/shapes/train.jsonl and test.jsonl
    python data/shapes/world.py --grid /tmp/world_grid.png

Departures from GenEval: the detector is a hand-written segmenter + template matcher, not
Mask2Former; colour comes from the nearest palette colour, not CLIP zero-shot on a masked crop.
The prompt templates are GenEval's ("a photo of a red circle", "a photo of two squares",
"a photo of a circle left of a square", ...), with GenEval's a/an rule.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))   # the repo root, for `python data/shapes/world.py`
import reward  # noqa: E402  (the world depends on the core, never the other way round)
import sample  # noqa: E402

# ----------------------------------------------------------------------------- world constants
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles",
           "diamond": "diamonds", "cross": "crosses"}
COLORS = {                      # RGB 0..255; nearest pair (orange/yellow) is ~85 apart
    "red": (210, 35, 35),
    "orange": (245, 130, 20),
    "yellow": (240, 215, 30),
    "green": (40, 160, 60),
    "blue": (40, 90, 215),
    "purple": (140, 50, 180),
}
COUNTS = (2, 3, 4)              # GenEval's counting tag asks for 2..4 (single objects are count 1)
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
RELATIONS = ("left of", "right of", "above", "below")
TAGS = ("single_object", "two_object", "counting", "colors", "color_attr", "position")

SIZE = 64                       # default image side (px)
SUPERSAMPLE = 4                 # shapes are drawn at 4x and box-downsampled (anti-aliased edges)
BACKGROUND = (244, 243, 238)    # light background; each image jitters it by +-BG_JITTER
BG_JITTER = 6
COLOR_JITTER = 10               # per-channel jitter of an object's colour (stays nearest its palette colour)
OBJECT_SIDE = {1: (0.40, 0.60), 2: (0.26, 0.38), 3: (0.22, 0.30), 4: (0.22, 0.30)}  # bbox side / image side
GAP = 0.05                      # min gap between objects' boxes and to the border (fraction of side, >= 2 px)
POSITION_SLOPE = 0.3            # "left of": |dy| <= 0.3 |dx| (well inside GenEval's 0.5 cone + 0.1 margin)
CROSS_ARM = 0.30                # arm thickness of the cross / its side

TEST_PROMPTS = dict(           # held-out prompts per tag (single_object: its 5 atoms, also trained on)
    two_object=6, counting=6, colors=6, color_attr=12, position=12)
SPLIT_SEED = 0
HERE = Path(__file__).resolve().parent

# detector settings
FG_THRESH = 0.18                # RGB distance (0..1 scale) from the background that counts as foreground
MIN_BLOB = 0.003                # blobs smaller than this fraction of the image are dropped
TEMPLATE = 12                   # shape features: blob occupancy resampled to TEMPLATE x TEMPLATE

# tokenizer
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MODEL_MAX_LENGTH = 77


# ----------------------------------------------------------------------------- prompts + metadata
def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _noun(cls: str, color: str | None = None) -> str:
    """'a circle', 'an orange square' (GenEval's a/an rule)."""
    words = f"{color} {cls}" if color else cls
    return f"{_article(words)} {words}"


def make_prompts() -> list[dict]:
    """Every prompt of the world, in GenEval's metadata format, in a fixed order."""
    rows = []
    for c in SHAPES:
        rows.append({"tag": "single_object", "include": [{"class": c, "count": 1}],
                     "prompt": f"a photo of {_noun(c)}"})
    for a, b in itertools.permutations(SHAPES, 2):
        rows.append({"tag": "two_object", "include": [{"class": a, "count": 1}, {"class": b, "count": 1}],
                     "prompt": f"a photo of {_noun(a)} and {_noun(b)}"})
    for c in SHAPES:
        for n in COUNTS:
            rows.append({"tag": "counting", "include": [{"class": c, "count": n}],
                         "exclude": [{"class": c, "count": n + 1}],
                         "prompt": f"a photo of {NUMBER_WORDS[n]} {PLURALS[c]}"})
    for c in SHAPES:
        for col in COLORS:
            rows.append({"tag": "colors", "include": [{"class": c, "count": 1, "color": col}],
                         "prompt": f"a photo of {_noun(c, col)}"})
    for a, b in itertools.permutations(SHAPES, 2):
        for ca, cb in itertools.permutations(COLORS, 2):
            rows.append({"tag": "color_attr",
                         "include": [{"class": a, "count": 1, "color": ca}, {"class": b, "count": 1, "color": cb}],
                         "prompt": f"a photo of {_noun(a, ca)} and {_noun(b, cb)}"})
    for a, b in itertools.permutations(SHAPES, 2):   # "a photo of a <b> <rel> a <a>": b is placed relative to a
        for rel in RELATIONS:
            rows.append({"tag": "position",
                         "include": [{"class": a, "count": 1}, {"class": b, "count": 1, "position": [rel, 0]}],
                         "prompt": f"a photo of {_noun(b)} {rel} {_noun(a)}"})
    return rows


def atoms(row: dict) -> set[tuple]:
    """What a prompt is made of, each as a tagged tuple: ("shape", class), ("color", name), ("count", n) for counting
    prompts, ("relation", rel)."""
    out = set()
    for item in row["include"]:
        out.add(("shape", item["class"]))
        if "color" in item:
            out.add(("color", item["color"]))
        if row["tag"] == "counting":
            out.add(("count", item["count"]))
        if "position" in item:
            out.add(("relation", item["position"][0]))
    return out


def _keeps_atoms(train: list[dict], tag: str) -> bool:
    """Does a tag's training set still hold every atom of the world it can hold, and every count for more than one
    shape (so "three" is learned as a number, not as a property of one shape)?"""
    have = set().union(*(atoms(r) for r in train))
    need = {("shape", c) for c in SHAPES}
    if tag in ("colors", "color_attr"):
        need |= {("color", c) for c in COLORS}
    if tag == "position":
        need |= {("relation", r) for r in RELATIONS}
    if tag == "counting":
        shapes_per_count = Counter(r["include"][0]["count"] for r in train)
        if any(shapes_per_count[n] < 2 for n in COUNTS):
            return False
    return need <= have


def split_prompts(rows: list[dict], seed: int = SPLIT_SEED):
    """Hold out combinations, never atoms: TEST_PROMPTS[tag] prompts of each tag, drawn in a fixed random order and
    skipped where holding one out would leave an atom (a shape, colour, relation, or a count for two shapes) absent
    from that tag's training prompts. single_object prompts are atoms themselves: the model must see each shape
    alone, so they are both trained on and evaluated (as GenEval's single_object classes are the detector's)."""
    train, test = [], []
    rng = np.random.default_rng(seed)
    for tag in TAGS:
        group = [r for r in rows if r["tag"] == tag]
        if tag == "single_object":
            train += group
            test += group
            continue
        held = []
        for i in rng.permutation(len(group)).tolist():
            if len(held) == TEST_PROMPTS[tag]:
                break
            rest = [r for j, r in enumerate(group) if j not in held and j != i]
            if _keeps_atoms(rest, tag):
                held.append(i)
        test += [r for i, r in enumerate(group) if i in held]
        train += [r for i, r in enumerate(group) if i not in held]
    return train, test


def write_prompts(out_dir: str | os.PathLike = HERE) -> dict[str, int]:
    """(Re)write train.jsonl / test.jsonl in out_dir; returns the number of prompts per split."""
    train, test = split_prompts(make_prompts())
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("test", test)):
        tmp = out_dir / f"{name}.jsonl.tmp"
        with open(tmp, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        os.replace(tmp, out_dir / f"{name}.jsonl")
    return {"train": len(train), "test": len(test)}


def load_prompts(split: str = "train", root: str | os.PathLike = HERE) -> list[dict]:
    """The metadata dicts of a split ('train' or 'test'), as written by write_prompts."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    path = Path(root) / f"{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; regenerate it with `python data/shapes/world.py`")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _vocab_words() -> tuple[str, ...]:
    words = set()
    for r in make_prompts():
        words.update(r["prompt"].split())
    return tuple(sorted(words))


VOCAB = _vocab_words()          # every word that occurs in a prompt of the world


# ----------------------------------------------------------------------------- renderer
def _shape_outline(draw: ImageDraw.ImageDraw, cls: str, box, fill) -> None:
    """Draw one upright shape filling the square box (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if cls == "circle":
        draw.ellipse(box, fill=fill)
    elif cls == "square":
        draw.rectangle(box, fill=fill)
    elif cls == "triangle":
        draw.polygon([(x0, y1), (x1, y1), (cx, y0)], fill=fill)
    elif cls == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)
    elif cls == "cross":
        h = CROSS_ARM * (x1 - x0) / 2
        draw.rectangle((cx - h, y0, cx + h, y1), fill=fill)
        draw.rectangle((x0, cy - h, x1, cy + h), fill=fill)
    else:
        raise ValueError(f"unknown shape class {cls!r}; the world has {SHAPES}")


def _relation_holds(b: tuple, a: tuple, rel: str, gap: float) -> bool:
    """Is object b (cx, cy, side) clearly `rel` object a (image y grows downwards)?"""
    dx, dy = b[0] - a[0], b[1] - a[1]
    need = (a[2] + b[2]) / 2 + gap
    if rel in ("left of", "right of"):
        main, cross = (-dx if rel == "left of" else dx), dy
    elif rel in ("above", "below"):
        main, cross = (-dy if rel == "above" else dy), dx
    else:
        raise ValueError(f"unknown relation {rel!r}; expected one of {RELATIONS}")
    return main >= need and abs(cross) <= POSITION_SLOPE * main


def _objects_from_meta(meta: dict, rng: np.random.Generator) -> tuple[list[dict], list[tuple[int, int, str]]]:
    """Objects to draw (class, colour name) and relations (i, j, rel): object i is rel object j."""
    if "include" not in meta or not meta["include"]:
        raise ValueError(f"metadata needs a non-empty 'include' list: {meta}")
    objects, first_of, relations = [], [], []
    for k, item in enumerate(meta["include"]):
        cls, count = item.get("class"), int(item.get("count", 1))
        if cls not in SHAPES:
            raise ValueError(f"unknown class {cls!r} in metadata; the world has {SHAPES}")
        if not 1 <= count <= 4:
            raise ValueError(f"count {count} out of range 1..4 for {cls!r}")
        color = item.get("color")
        if color is not None and color not in COLORS:
            raise ValueError(f"unknown colour {color!r}; the world has {tuple(COLORS)}")
        first_of.append(len(objects))
        for _ in range(count):
            objects.append({"class": cls, "color": color or str(rng.choice(list(COLORS)))})
        if "position" in item:
            rel, ref = item["position"]
            if count != 1 or int(ref) >= k or int(meta["include"][int(ref)].get("count", 1)) != 1:
                raise ValueError(f"position needs single objects and an earlier reference: {item}")
            relations.append((first_of[k], first_of[int(ref)], rel))
    if len(objects) > 4:
        raise ValueError(f"at most 4 objects per image, metadata asks for {len(objects)}")
    return objects, relations


def _place(n: int, relations, rng: np.random.Generator, size: int) -> list[tuple[float, float, float]]:
    """Rejection-sample (cx, cy, side) for n objects: inside the image, not touching, relations honoured."""
    gap = max(2.0, GAP * size)
    lo, hi = OBJECT_SIDE[n]
    sides = rng.uniform(lo, hi, n) * size
    for attempt in range(4000):
        if attempt and attempt % 200 == 0:
            sides = sides * 0.92            # crowded: shrink and keep trying
        cx = rng.uniform(gap + sides / 2, size - gap - sides / 2)
        cy = rng.uniform(gap + sides / 2, size - gap - sides / 2)
        boxes = [(cx[i], cy[i], sides[i]) for i in range(n)]
        apart = all(max(abs(boxes[i][0] - boxes[j][0]), abs(boxes[i][1] - boxes[j][1]))
                    >= (sides[i] + sides[j]) / 2 + gap for i in range(n) for j in range(i + 1, n))
        if apart and all(_relation_holds(boxes[i], boxes[j], rel, gap) for i, j, rel in relations):
            return boxes
    raise RuntimeError(f"could not place {n} objects at size {size}")


def render_objects(meta: dict, rng: np.random.Generator, size: int = SIZE) -> tuple[np.ndarray, list[dict]]:
    """Render an image for `meta`; also return the drawn objects [{class, color, box (x0,y0,x1,y1) px}]."""
    objects, relations = _objects_from_meta(meta, rng)
    placed = _place(len(objects), relations, rng, size)
    bg = np.clip(np.array(BACKGROUND) + rng.integers(-BG_JITTER, BG_JITTER + 1, 3), 0, 255)
    s = SUPERSAMPLE
    canvas = Image.new("RGB", (size * s, size * s), tuple(int(v) for v in bg))
    draw = ImageDraw.Draw(canvas)
    for obj, (cx, cy, side) in zip(objects, placed):
        rgb = np.clip(np.array(COLORS[obj["color"]]) + rng.integers(-COLOR_JITTER, COLOR_JITTER + 1, 3), 0, 255)
        box = (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)
        _shape_outline(draw, obj["class"], tuple(v * s for v in box), tuple(int(v) for v in rgb))
        obj["box"] = box
    image = np.asarray(canvas.resize((size, size), Image.BOX), dtype=np.uint8)
    return image, objects


def render(meta: dict, rng: np.random.Generator, size: int = SIZE) -> np.ndarray:
    """A random image (uint8, (size, size, 3)) that satisfies the GenEval metadata dict `meta`."""
    return render_objects(meta, rng, size)[0]


def render_batch(metas: list[dict], seed: int | np.random.Generator = 0, size: int = SIZE):
    """Images for a list of metadata as a float32 torch tensor (B, 3, size, size) in [0, 1]."""
    import torch
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    arr = np.stack([render(m, rng, size) for m in metas]).astype(np.float32) / 255.0
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


# ----------------------------------------------------------------------------- detector
def _as_hwc_list(images) -> list[np.ndarray]:
    """(B,3,H,W) float tensor/array in [0,1], (B,H,W,3) / list of uint8 HWC -> list of float HWC in [0,1]."""
    if hasattr(images, "detach"):
        images = images.detach().float().cpu().numpy()
    if isinstance(images, np.ndarray):
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4:
            raise ValueError(f"images must be (B,3,H,W) or (B,H,W,3), got shape {images.shape}")
        if images.shape[1] == 3 and images.shape[-1] != 3:
            images = images.transpose(0, 2, 3, 1)
        images = list(images)
    out = []
    for im in images:
        im = np.asarray(im)
        if im.ndim != 3 or im.shape[-1] != 3:
            raise ValueError(f"each image must be HWC with 3 channels, got shape {im.shape}")
        out.append(im.astype(np.float32) / 255.0 if im.dtype == np.uint8 else np.clip(im.astype(np.float32), 0, 1))
    return out


def connected_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """4-connected components of a bool mask: (labels int32 with 0 = background, count).

    Union-find in numpy: every pixel points at the smallest pixel index it has seen; each sweep takes
    the min over the four neighbours, then pointer jumping (label <- label of label) compresses paths.
    """
    h, w = mask.shape
    big = h * w
    lab = np.where(mask, np.arange(big).reshape(h, w), big)
    while True:
        new = lab.copy()
        np.minimum(new[1:], lab[:-1], out=new[1:])
        np.minimum(new[:-1], lab[1:], out=new[:-1])
        np.minimum(new[:, 1:], lab[:, :-1], out=new[:, 1:])
        np.minimum(new[:, :-1], lab[:, 1:], out=new[:, :-1])
        new = np.where(mask, new, big)
        flat = new.ravel()
        fg = flat < big
        for _ in range(4):
            flat[fg] = flat[flat[fg]]
        new = flat.reshape(h, w)
        if np.array_equal(new, lab):
            break
        lab = new
    roots, labels = np.unique(lab[mask], return_inverse=True)
    out = np.zeros((h, w), np.int32)
    out[mask] = labels.ravel() + 1
    return out, len(roots)


_PALETTE = np.array(list(COLORS.values()), np.float32) / 255.0
_PALETTE_NAMES = list(COLORS)
_TEMPLATES: dict[int, np.ndarray] = {}


def _blob_feature(occ: np.ndarray) -> np.ndarray:
    """Occupancy crop (h, w) in [0,1] -> TEMPLATE x TEMPLATE box-resampled feature."""
    im = Image.fromarray(occ.astype(np.float32)).resize((4 * TEMPLATE, 4 * TEMPLATE), Image.BILINEAR)
    return np.asarray(im.resize((TEMPLATE, TEMPLATE), Image.BOX), dtype=np.float32)


def _templates(size: int) -> np.ndarray:
    """Mean feature of each shape over clean renders at this image size (computed once per size)."""
    if size not in _TEMPLATES:
        rng = np.random.default_rng(1234)
        feats = []
        for cls in SHAPES:
            blobs = []
            for n in (1, 2, 3, 1, 2, 3):            # all size ranges, random sub-pixel offsets
                img = render({"include": [{"class": cls, "count": n}]}, rng, size)
                blobs += [b["feature"] for b in _blobs(img.astype(np.float32) / 255.0)]
            feats.append(np.mean(blobs, axis=0))
        _TEMPLATES[size] = np.stack(feats)
    return _TEMPLATES[size]


def _blobs(img: np.ndarray) -> list[dict]:
    """Segment foreground from the (border-estimated) background and describe every sizeable blob."""
    h, w, _ = img.shape
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    bg = np.median(border, axis=0)
    dist = np.linalg.norm(img - bg, axis=-1)
    labels, n = connected_components(dist > FG_THRESH)
    blobs = []
    for k in range(1, n + 1):
        m = labels == k
        area = int(m.sum())
        if area < MIN_BLOB * h * w:
            continue
        d = dist[m]
        core = d >= np.quantile(d, 0.5)
        color = np.median(img[m][core], axis=0)
        depth = max(float(np.linalg.norm(color - bg)), 1e-6)
        occ = np.clip(dist / depth, 0, 1) * m
        ys, xs = np.nonzero(occ >= 0.5)                  # box at the half-coverage edge, like the drawn box
        if len(ys) == 0:
            continue
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        occ = occ[y0:y1, x0:x1]
        blobs.append({"mask": m, "box": (float(x0), float(y0), float(x1), float(y1)), "color_rgb": color,
                      "core_pixels": img[m][core], "feature": _blob_feature(occ)})
    return blobs


def _classify(blob: dict, templates: np.ndarray):
    """(shape, colour, confidence) of one blob. Confidence = product of shape, aspect and colour terms, each
    falling off smoothly (not clipped to zero), so an almost-right blob from a half-trained model still gets
    partial credit: RL needs a reward that grades quality, not only a pass/fail on clean renders."""
    dists = np.abs(templates - blob["feature"]).mean(axis=(1, 2))
    order = np.argsort(dists)
    d1, d2 = float(dists[order[0]]), float(dists[order[1]])
    shape_fit = np.exp(-max(d1 - 0.08, 0.0) / 0.10)                 # clean renders: d1 < 0.08
    shape_margin = np.sqrt(np.clip((d2 - d1) / max(d2, 1e-6) / 0.5, 0, 1))   # nearest template clearly closer
    x0, y0, x1, y1 = blob["box"]
    aspect = abs(np.log((x1 - x0) / (y1 - y0)))                      # every shape is drawn upright in a square
    aspect_ok = np.exp(-max(aspect - 0.2, 0.0) / 0.3)
    cd = np.linalg.norm(_PALETTE - blob["color_rgb"], axis=1)
    corder = np.argsort(cd)
    c1, c2 = float(cd[corder[0]]), float(cd[corder[1]])
    color_margin = np.sqrt(np.clip((c2 - c1) / max(c2, 1e-6) / 0.7, 0, 1))
    pix_nearest = np.argmin(np.linalg.norm(blob["core_pixels"][:, None] - _PALETTE[None], axis=-1), axis=1)
    color_purity = np.clip((np.mean(pix_nearest == corder[0]) - 0.3) / 0.6, 0, 1)
    score = float(shape_fit * shape_margin * aspect_ok * color_margin * color_purity)
    return SHAPES[order[0]], _PALETTE_NAMES[corder[0]], score


def detect(images) -> list[list]:
    """Detect the shapes in each image: list (per image) of reward.Detection, highest score first.

    images: (B,3,H,W) float tensor/array in [0,1], or a list of uint8 (H,W,3) arrays.
    Detection.label is the shape class, .color the palette colour, .score in [0,1] (low for blurry,
    misshapen or mixed-colour blobs), .box (x0,y0,x1,y1) px, .mask bool (H,W).
    """
    results = []
    for img in _as_hwc_list(images):
        templates = _templates(img.shape[0])
        dets = []
        for blob in _blobs(img):
            label, color, score = _classify(blob, templates)
            dets.append(reward.Detection(label=label, score=score, box=blob["box"], mask=blob["mask"], color=color))
        dets.sort(key=lambda d: -d.score)
        results.append(dets)
    return results


# ----------------------------------------------------------------------------- rewards (registered with reward.py)
def _detect_tensors(images):
    return detect(images.detach().float().cpu())


def shapes_reward(paths: dict, device="cpu", dtype=None):
    """GenEval scoring with the world's detector: {"shapes": partial score, "shapes_strict": 0/1}."""
    return reward.geneval_from_detector(_detect_tensors, "shapes")


def shapes_soft_reward(paths: dict, device="cpu", dtype=None):
    """{"shapes_soft": the GenEval partial score averaged over detection thresholds 0, 0.1, ..., 0.9}: a shape counts in
    proportion to the detector's confidence (reward.soft_geneval_score), a denser signal for a weak model."""
    return reward.geneval_from_detector(_detect_tensors, "shapes_soft", soft=True)


def shapes_detector(paths: dict, device="cpu", dtype=None):
    """The world's detector behind reward.py's detector interface, detect(images, prompts) (the prompts are unused):
    registered with the rewards below, so evaluate.py's layout diversity (SDI) finds it without importing data/."""
    return lambda images, prompts=None: _detect_tensors(images)


reward.register("shapes", shapes_reward, needs_metadata=True, detector=shapes_detector)
reward.register("shapes_soft", shapes_soft_reward, needs_metadata=True, detector=shapes_detector)


# ----------------------------------------------------------------------------- CLIP tokenizer
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable unicode table (printable bytes map to themselves, in CLIP's order)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE on one word (last symbol carries '</w>'): merge the lowest-ranked pair until none applies."""
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    while len(parts) > 1:
        pairs = [(ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        rank, i = min(pairs)
        if rank == 1 << 30:
            break
        first, second = parts[i], parts[i + 1]
        merged, i = [], 0
        while i < len(parts):
            if i < len(parts) - 1 and parts[i] == first and parts[i + 1] == second:
                merged.append(first + second)
                i += 2
            else:
                merged.append(parts[i])
                i += 1
        parts = merged
    return parts


def clip_vocab_and_merges(words=VOCAB) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP-style vocab (bytes, bytes+'</w>', merged tokens, <|startoftext|>, <|endoftext|>) and merges.

    Merges are added word by word; each new merge ranks after all earlier ones, so words already
    reduced to one token stay one token. Any other word falls back to byte-level characters.
    """
    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars]
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        parts = _bpe(word, ranks)
        while len(parts) > 1:
            pair = (parts[0], parts[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            tokens.append(pair[0] + pair[1])
            parts = [pair[0] + pair[1]] + parts[2:]
    tokens = list(dict.fromkeys(tokens)) + [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}, merges


def write_clip_tokenizer(out_dir: str | os.PathLike, pad_token: str = EOS, words=VOCAB) -> Path:
    """Write a CLIP BPE tokenizer for the world's words, as SD3's tokenizer/ (pad '<|endoftext|>')
    or tokenizer_2/ (pad_token='!') folder: vocab.json, merges.txt, special_tokens_map.json,
    tokenizer_config.json. transformers' CLIPTokenizer loads it offline."""
    vocab, merges = clip_vocab_and_merges(words)
    if pad_token not in vocab:
        raise ValueError(f"pad_token {pad_token!r} is not in the vocabulary")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "vocab.json", "w") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(out / "merges.txt", "w") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))

    def added(content, normalized):
        return {"content": content, "lstrip": False, "normalized": normalized, "rstrip": False,
                "single_word": False, "special": True}
    decoder = {str(vocab[BOS]): added(BOS, True), str(vocab[EOS]): added(EOS, False)}
    if pad_token not in (BOS, EOS):
        decoder = {str(vocab[pad_token]): added(pad_token, False), **decoder}
    config = {"add_prefix_space": False, "added_tokens_decoder": decoder, "bos_token": BOS,
              "clean_up_tokenization_spaces": False, "do_lower_case": True, "eos_token": EOS,
              "errors": "replace", "model_max_length": MODEL_MAX_LENGTH, "pad_token": pad_token,
              "tokenizer_class": "CLIPTokenizer", "unk_token": EOS}
    special = {"bos_token": BOS, "eos_token": EOS, "pad_token": pad_token, "unk_token": EOS}
    with open(out / "tokenizer_config.json", "w") as f:
        json.dump(config, f, indent=2)
    with open(out / "special_tokens_map.json", "w") as f:
        json.dump(special, f, indent=2)
    return out


# ----------------------------------------------------------------------------- entry point
if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(HERE), help="folder for train.jsonl / test.jsonl")
    parser.add_argument("--grid", default=None, help="also save a PNG grid of renders of train prompts")
    args = parser.parse_args()
    counts = write_prompts(args.out)
    rows = load_prompts("train", args.out) + load_prompts("test", args.out)
    for tag in TAGS:
        print(f"{tag:14s} {sum(r['tag'] == tag for r in rows):4d} prompts")
    print(f"wrote {args.out}: train {counts['train']}, test {counts['test']}; vocabulary {len(VOCAB)} words")
    if args.grid:
        rng = np.random.default_rng(0)
        picks = [rows[i] for i in rng.choice(len(rows), 48, replace=False)]
        sample.save_grid(render_batch(picks, seed=0), args.grid, ncols=8)
        print(f"saved {args.grid}")
