"""Rewards for E2PO: GenEval (in-process, no mmdet), PickScore, CLIPScore, LAION Aesthetic, HPSv2.1, ImageReward
("image_reward") and an OCR reward on GOT-OCR 2.0 ("ocr_got") behind one interface, and GenEval's scoring rules around
any detector. Other code adds rewards with `register` (the shapes world registers "shapes" and "shapes_soft", its
GenEval scores with its own numpy detector, from data/shapes/world.py; train.py and evaluate.py import the module
named by their `reward_module` setting). Object detectors for other metrics sit behind one interface too
(`build_detector`: "grounding_dino", "mask2former", and any detector a reward registered with itself, e.g. "shapes").

    fn = reward.build({"pickscore": 1.0}, paths={"pickscore": ..., "pickscore_processor": ...}, device="cuda")
    scores = fn(images, prompts, metadata)   # images (B,3,H,W) float in [0,1]
    scores["pickscore"], scores["avg"]       # float32 tensors (B,), on the images' device

`spec` is one name or {name: weight}; the weighted sum of the named rewards is under "avg" (also for a
single reward). GenEval-style rewards add a "<name>_strict" entry (GenEval's 0/1 correctness, the
evaluation metric); the "<name>" entry is the partial score (the training reward) and is what "avg" uses.

Weights (never downloaded at run time; every model loads from a local path given in `paths`):
  key                   what                                                 where users get it (HF repo id)
  "clip_l"              CLIPModel dir + tokenizer + preprocessor_config.json  openai/clip-vit-large-patch14
                        (clipscore, aesthetic, geneval colour classifier)
  "pickscore"           CLIPModel dir (config.json + weights)                 yuvalkirstain/PickScore_v1
  "pickscore_processor" tokenizer + preprocessor_config.json dir             laion/CLIP-ViT-H-14-laion2B-s32B-b79K
  "hpsv2"               HPS_v2.1_compressed.pt (OpenCLIP ViT-H/14 layout,    xswu/HPSv2
                        converted on load by `openclip_to_transformers`), or a CLIPModel dir saved after conversion
  "hpsv2_processor"     like "pickscore_processor"                          laion/CLIP-ViT-H-14-laion2B-s32B-b79K
  "aesthetic"           LAION MLP as .safetensors (see `aesthetic_reward`)    camenduru/improved-aesthetic-predictor
                                                                            (sac+logos+ava1-l14-linearMSE.pth)
  "mask2former"         Mask2FormerForUniversalSegmentation dir, COCO        facebook/mask2former-swin-small-coco-instance
                        instance (GenEval's detector is Mask2Former Swin-S)
  "image_reward"        dir with ImageReward.pt + med_config.json            THUDM/ImageReward
                        (mapped onto transformers' BLIP classes by `imagereward_to_transformers`)
  "image_reward_tokenizer" the bert-base-uncased tokenizer dir               google-bert/bert-base-uncased
  "got_ocr"             GotOcr2ForConditionalGeneration dir + processor      stepfun-ai/GOT-OCR-2.0-hf
  "grounding_dino"      GroundingDinoForObjectDetection dir + processor      IDEA-Research/grounding-dino-tiny
                        (a detector, not a reward: evaluate.py's layout diversity on real images)
`huggingface-cli download <repo id> --local-dir <dir>` fetches any of them; a missing path raises
FileNotFoundError naming the key, the expected files and the repo id, before any model loads.
Shortcuts: paths[<reward>] may name one folder holding sub-folders named by key (e.g.
{"geneval": "/models/geneval"} with mask2former/ and clip_l/ inside); "pickscore_processor" may be left
out when the PickScore folder also holds the CLIP-H tokenizer + preprocessor_config.json; "hpsv2_processor"
defaults to "pickscore_processor"; "image_reward_tokenizer" may be left out when the ImageReward folder also holds
the BERT tokenizer files.
Models run in fp16 on CUDA (dtype=None), fp32 on CPU.

Tests: `python -m pytest -q test_e2po.py -k reward` (CPU, tiny random-init models of the real transformers classes).

Threads: the returned fn may be called from a background thread while the main thread samples, and from
several threads at once. Each loaded model (with its tokenizer) is cached once per (path, device, dtype)
and guarded by its own lock, held for the whole tokenise + forward; fast tokenizers are not safe under
concurrent calls, hence the lock. Different models run concurrently; one model serves one call at a time.

Departures from the references:
- GenEval ran mmdet's Mask2Former Swin-S and open_clip ViT-L/14 on PIL images; we run transformers'
  Mask2Former (same architecture/weights family) and CLIP ViT-L/14 on tensors (bicubic antialiased resize
  instead of PIL's). Masks come from `post_process_instance_segmentation` (384x384 mask resolution)
  rather than mmdet's full-resolution upsampling, so boxes can differ by a pixel or two.
- Partial score = Flow-GRPO/DiffusionNFT's `evaluate_reward` (mean over clause terms, count term
  1 - |expected - found|/expected, which goes negative when over-counting by more than `expected`).
  Their code appends a 1.0 term even after a failed relative-position check; we keep that quirk by
  default for parity with the paper's training reward (`POSITION_QUIRK = False` gives a clean 0 term).
  Strict = GenEval's `evaluate` (>= count among the most confident, colour/position on those, excludes).
- `soft_geneval_score` (`geneval_from_detector(..., soft=True)`) is ours, not GenEval's: the partial score averaged
  over thresholds 0, 0.1, ..., 0.9, a dense reward for models that rarely clear GenEval's 0.3 / 0.9.
- transformers builds Mask2Former's training loss (needs scipy) in the constructor; when scipy is
  missing we build it with an inference-only stub instead (see `build_mask2former`).
- ImageReward: THUDM's package runs BLIP's own ViT and "med" BERT on PIL images (bicubic resize to 224 + centre
  crop); we map ImageReward.pt onto transformers' BlipVisionModel + BlipTextModel (an exact key check; BLIP's unused
  contrastive projections are the only keys left out) and preprocess tensors like CLIP above. The tokenizer is the
  plain bert-base-uncased one: BLIP adds [DEC]/[ENC] tokens, which ImageReward's score never uses.
- OCR: Flow-GRPO and DiffusionNFT score OCR with PaddleOCR; "ocr_got" keeps their metric (`ocr_score`: the prompt's
  quoted text, lowercased without spaces, 1 - min(Levenshtein, len)/len, 0 distance when contained) on GOT-OCR 2.0
  (transformers), greedy decoding capped at OCR_MAX_NEW_TOKENS. Its numbers are not PaddleOCR's, hence the name.
"""
from __future__ import annotations

import json
import math
import os
import threading
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------- constants
# GenEval (djghosh13/geneval evaluation/evaluate_images.py defaults)
THRESHOLD = 0.3            # detection confidence, all tags but counting (kept if score > threshold)
COUNTING_THRESHOLD = 0.9   # detection confidence for the counting tag
SOFT_THRESHOLDS = tuple(i / 10 for i in range(10))   # soft_geneval_score: mean over thresholds 0, 0.1, ..., 0.9
MAX_OBJECTS = 16           # per class, most confident first
NMS_THRESHOLD = 1.0        # GenEval's max_overlap: 1.0 = no suppression
POSITION_THRESHOLD = 0.1   # position margin, fraction of the two objects' summed sizes
POSITION_QUIRK = True      # Flow-GRPO's extra 1.0 term after a failed position check (see docstring)
COLORS = ["red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white"]
COLOR_TEMPLATES = ["a photo of a {c} {o}", "a photo of a {c}-colored {o}", "a photo of a {c} object"]
COLOR_BACKGROUND = 0x99 / 255.0   # "#999"
RELATIONS = ("left of", "right of", "above", "below")
# COCO's 80 classes in detector order, with GenEval's names (object_names.txt)
GENEVAL_CLASSES = [
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "computer mouse", "tv remote",
    "computer keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book",
    "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
]
PICKSCORE_SCALE = 26.0     # PickScore is reported / 26 (Flow-GRPO's training reward)
CLIP_MAX_LENGTH = 77
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# ImageReward (THUDM/ImageReward ImageReward.py): BLIP ViT-L at 224 px, BERT "med" text at 35 tokens, then (r - mean) / std
IMAGEREWARD_MEAN = 0.16717362830052426
IMAGEREWARD_STD = 1.0333394966054072
IMAGEREWARD_MAX_LENGTH = 35
IMAGEREWARD_FILES = ("ImageReward.pt", "med_config.json")
# OCR (Flow-GRPO's ocr.py metric on a transformers OCR model)
OCR_MAX_NEW_TOKENS = 128   # GOT-OCR generation cap per image (the rendered text is a few words)
# Grounding DINO (layout detections for evaluate.py's SDI): transformers' / the model card's thresholds
GROUNDING_BOX_THRESHOLD = 0.35
GROUNDING_TEXT_THRESHOLD = 0.25

# paths key -> (expected files, HF repo id)
WEIGHT_SOURCES = {
    "clip_l": ("a directory with config.json, model.safetensors, tokenizer files (vocab.json, merges.txt, "
               "tokenizer_config.json) and preprocessor_config.json", "openai/clip-vit-large-patch14"),
    "pickscore": ("a CLIPModel directory with config.json and model weights", "yuvalkirstain/PickScore_v1"),
    "pickscore_processor": ("a directory with tokenizer files and preprocessor_config.json",
                            "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"),
    "hpsv2": ("HPS_v2.1_compressed.pt (OpenCLIP ViT-H/14 state dict) or a converted CLIPModel directory",
              "xswu/HPSv2"),
    "hpsv2_processor": ("a directory with tokenizer files and preprocessor_config.json",
                        "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"),
    "aesthetic": ("the LAION aesthetic MLP as .safetensors, converted from sac+logos+ava1-l14-linearMSE.pth "
                  "(see reward.aesthetic_reward)", "camenduru/improved-aesthetic-predictor"),
    "mask2former": ("a Mask2FormerForUniversalSegmentation directory (COCO instance) with config.json, "
                    "model weights and preprocessor_config.json", "facebook/mask2former-swin-small-coco-instance"),
    "image_reward": ("a directory with ImageReward.pt and med_config.json", "THUDM/ImageReward"),
    "image_reward_tokenizer": ("the bert-base-uncased tokenizer (vocab.txt, tokenizer_config.json)",
                               "google-bert/bert-base-uncased"),
    "got_ocr": ("a GotOcr2ForConditionalGeneration directory with config.json, model weights, tokenizer and "
                "preprocessor_config.json", "stepfun-ai/GOT-OCR-2.0-hf"),
    "grounding_dino": ("a GroundingDinoForObjectDetection directory with config.json, model weights, tokenizer and "
                       "preprocessor_config.json", "IDEA-Research/grounding-dino-tiny"),
}
REQUIRED_FILES = {"image_reward": IMAGEREWARD_FILES}   # keys whose folder holds these files instead of a config.json


# ------------------------------------------------------------------------------------- GenEval scoring
@dataclass
class Detection:
    """One detected object. box = (x0, y0, x1, y1) in pixels (x1, y1 exclusive, as mmdet's mask2bbox);
    mask (H, W) bool or None; color set -> the CLIP colour classifier is skipped for this detection."""
    label: str
    score: float
    box: tuple[float, float, float, float]
    mask: np.ndarray | None = None
    color: str | None = None


def box_iou(a, b) -> float:
    """IoU with GenEval's +1 pixel convention."""
    def area(x):
        return max(x[2] - x[0] + 1, 0) * max(x[3] - x[1] + 1, 0)
    inter = area([max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])])
    union = area(a) + area(b) - inter
    return inter / union if union else 0.0


def relative_position(box_a, box_b, margin: float | None = None) -> set[str]:
    """Relations of A relative to B ("left of", "right of", "above", "below"), GenEval's rule: centre
    offset shrunk by margin * (size_a + size_b) per axis, then direction components beyond 0.5."""
    margin = POSITION_THRESHOLD if margin is None else margin
    a = np.asarray(box_a[:4], dtype=np.float64).reshape(2, 2)
    b = np.asarray(box_b[:4], dtype=np.float64).reshape(2, 2)
    offset = a.mean(0) - b.mean(0)
    size = np.abs(a[1] - a[0]) + np.abs(b[1] - b[0])
    revised = np.maximum(np.abs(offset) - margin * size, 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    rel = set()
    if dx < -0.5:
        rel.add("left of")
    if dx > 0.5:
        rel.add("right of")
    if dy < -0.5:
        rel.add("above")
    if dy > 0.5:
        rel.add("below")
    return rel


def filter_detections(detections: list[Detection], tag: str, threshold: float | None = None) -> dict[str, list[Detection]]:
    """GenEval's selection: score > threshold (GenEval: 0.3, 0.9 for counting), most confident first, at most
    MAX_OBJECTS per class, greedy suppression above NMS_THRESHOLD IoU (off at 1.0)."""
    thr = threshold if threshold is not None else COUNTING_THRESHOLD if tag == "counting" else THRESHOLD
    by_class: dict[str, list[Detection]] = {}
    for d in sorted(detections, key=lambda d: -float(d.score)):
        if float(d.score) > thr:
            by_class.setdefault(d.label, []).append(d)
    out = {}
    for label, dets in by_class.items():
        dets, kept = dets[:MAX_OBJECTS], []
        while dets:
            best = dets.pop(0)
            kept.append(best)
            if NMS_THRESHOLD < 1:
                dets = [d for d in dets if box_iou(best.box, d.box) < NMS_THRESHOLD]
        out[label] = kept
    return out


def _check_meta(meta: dict) -> None:
    if not isinstance(meta, dict) or "tag" not in meta or "include" not in meta:
        raise ValueError(f"GenEval metadata needs 'tag' and 'include' (GenEval jsonl format), got {meta!r}")
    includes = list(meta["include"])
    for i, req in enumerate(includes + list(meta.get("exclude", []))):
        if "class" not in req or "count" not in req or int(req["count"]) < 1:
            raise ValueError(f"GenEval clause needs 'class' and 'count' >= 1, got {req!r} in {meta!r}")
        if "color" in req and req["color"] not in COLORS:
            raise ValueError(f"GenEval colour {req['color']!r} not in {COLORS}")
        if "position" in req:
            pos = req["position"]
            if (i >= len(includes) or not isinstance(pos, (list, tuple)) or len(pos) != 2 or pos[0] not in RELATIONS
                    or not isinstance(pos[1], int) or not 0 <= pos[1] < i):
                raise ValueError(f"GenEval position must be [relation in {RELATIONS}, index of an earlier include "
                                 f"clause], got {pos!r} in {meta!r}")


def geneval_score(detections: list[Detection], meta: dict,
                  classify_colors: Callable[[list[Detection], str], list[str]] | None = None,
                  position_quirk: bool | None = None, threshold: float | None = None) -> tuple[float, bool]:
    """GenEval scoring of one image: returns (partial, strict).

    detections: every raw detection of the image (any score); filtering follows GenEval.
    classify_colors(dets, classname) -> colour names, used for detections whose `color` is None.
    partial: Flow-GRPO/DiffusionNFT's training reward (mean of clause terms); strict: GenEval's correctness.
    threshold: detection score threshold for every tag instead of GenEval's (0.3, counting 0.9).
    """
    _check_meta(meta)
    position_quirk = POSITION_QUIRK if position_quirk is None else position_quirk
    objects = filter_detections(detections, meta["tag"], threshold)
    cache: dict[int, str] = {}

    def colors_of(dets: list[Detection], classname: str) -> list[str]:
        todo = [d for d in dets if d.color is None and id(d) not in cache]
        if todo:
            if classify_colors is None:
                raise ValueError(f"detections of {classname!r} have no colour and no colour classifier was given")
            for d, c in zip(todo, classify_colors(todo, classname)):
                cache[id(d)] = c
        return [d.color if d.color is not None else cache[id(d)] for d in dets]

    def rel_ok(found, targets, rel):
        return all(rel in relative_position(o.box, t.box) for o in found for t in targets)

    # strict: GenEval's evaluate()
    strict, groups = True, []
    for req in meta["include"]:
        n, found = int(req["count"]), objects.get(req["class"], [])[: int(req["count"])]
        ok = len(found) >= n
        if ok and "color" in req:
            ok = colors_of(found, req["class"]).count(req["color"]) >= n
        if ok and "position" in req:
            rel, target = req["position"]
            ok = groups[target] is not None and rel_ok(found, groups[target], rel)
        strict &= ok
        groups.append(found if ok else None)
    for req in meta.get("exclude", []):
        if len(objects.get(req["class"], [])) >= int(req["count"]):
            strict = False

    # partial: Flow-GRPO's evaluate_reward() (all detections of the class count, exact match wanted)
    terms, groups = [], []
    for req in meta["include"]:
        n, found = int(req["count"]), objects.get(req["class"], [])
        terms.append(1 - abs(n - len(found)) / n)
        ok = len(found) == n
        if not ok:
            if "color" in req or "position" in req:
                terms.append(0.0)
        else:
            if "color" in req:
                k = colors_of(found, req["class"]).count(req["color"])
                terms.append(1 - abs(n - k) / n)
                ok = k == n
            if ok and "position" in req:
                rel, target = req["position"]
                if groups[target] is None:
                    ok = False
                    terms.append(0.0)
                else:
                    ok = rel_ok(found, groups[target], rel)
                    terms += [1.0] if ok else ([0.0, 1.0] if position_quirk else [0.0])
        groups.append(found if ok else None)
    partial = sum(terms) / len(terms) if terms else 0.0
    return float(partial), bool(strict)


# ------------------------------------------------------------------------------------- tensor preprocessing
GENEVAL_TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")


def geneval_summary(strict, tags) -> dict[str, float]:
    """GenEval's report: strict accuracy per tag and "overall", the mean over the tags present (GenEval's
    summary_scores.py averages tasks, not images). strict: 0/1 per image; tags: the metadata "tag" per image."""
    strict = [float(s) for s in strict]
    if len(strict) != len(tags):
        raise ValueError(f"{len(strict)} scores for {len(tags)} tags")
    per = {t: float(np.mean([s for s, g in zip(strict, tags) if g == t])) for t in dict.fromkeys(tags)}
    order = [t for t in GENEVAL_TAGS if t in per] + sorted(t for t in per if t not in GENEVAL_TAGS)
    return {**{t: per[t] for t in order}, "overall": float(np.mean(list(per.values())))}


def resize_crop_normalize(images: torch.Tensor, size: int, crop: tuple[int, int], mean, std) -> torch.Tensor:
    """CLIP preprocessing on tensors: shortest edge -> size (bicubic, antialias), centre crop, normalise.
    images (B,3,H,W) in [0,1] -> float32 (B,3,*crop)."""
    x = images.float()
    h, w = x.shape[-2:]
    if min(h, w) != size:
        s = size / min(h, w)
        nh, nw = (size, max(size, int(w * s))) if h <= w else (max(size, int(h * s)), size)
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    h, w = x.shape[-2:]
    ch, cw = crop
    if h < ch or w < cw:
        x = F.pad(x, ((max(cw - w, 0) + 1) // 2, max(cw - w, 0) // 2, (max(ch - h, 0) + 1) // 2, max(ch - h, 0) // 2))
        h, w = x.shape[-2:]
    top, left = (h - ch) // 2, (w - cw) // 2
    x = x[..., top:top + ch, left:left + cw]
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


def _read_preprocessor(path: str, default_size=224, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD) -> dict:
    """size/crop/mean/std from a preprocessor_config.json (HF layout); defaults when absent."""
    cfg = {}
    f = os.path.join(path, "preprocessor_config.json") if os.path.isdir(path) else None
    if f and os.path.isfile(f):
        with open(f) as fh:
            cfg = json.load(fh)
    size = cfg.get("size", default_size)
    if isinstance(size, dict):
        size = size.get("shortest_edge", size.get("height", default_size))
    crop = cfg.get("crop_size", size)
    crop = (crop.get("height", size), crop.get("width", size)) if isinstance(crop, dict) else (crop, crop)
    return {"size": int(size), "crop": (int(crop[0]), int(crop[1])),
            "mean": tuple(cfg.get("image_mean", mean)), "std": tuple(cfg.get("image_std", std)), "raw": cfg}


# ------------------------------------------------------------------------------------- loading
def _default_dtype(device, dtype):
    if dtype is not None:
        return dtype
    return torch.float16 if torch.device(device).type == "cuda" else torch.float32


def _has_tokenizer(d) -> bool:
    return bool(d) and os.path.isdir(d) and any(os.path.isfile(os.path.join(d, f))
                                                for f in ("tokenizer.json", "vocab.json", "vocab.txt"))


def _need_path(paths: dict, key: str, reward: str) -> str:
    """The local path for `key`: paths[key]; else paths[reward]/<key> (one folder per reward holding
    sub-folders named by key, e.g. {"geneval": "/models/geneval"} with mask2former/ and clip_l/); a
    processor key also falls back to "pickscore_processor" (hpsv2) or to the model folder when that
    holds tokenizer files (pickscore). Raises FileNotFoundError naming the files and the HF repo id."""
    p = paths.get(key)
    if not p and paths.get(reward) and reward != key and os.path.isdir(os.path.join(paths[reward], key)):
        p = os.path.join(paths[reward], key)
    if not p and key == "hpsv2_processor":
        p = paths.get("pickscore_processor")
    if not p and key == "pickscore_processor" and _has_tokenizer(paths.get("pickscore")):
        p = paths["pickscore"]
    if not p and key == "image_reward_tokenizer" and _has_tokenizer(paths.get("image_reward")):
        p = paths["image_reward"]
    files, repo = WEIGHT_SOURCES[key]
    if not p:
        raise FileNotFoundError(f"reward {reward!r} needs reward_paths[{key!r}]: {files}; get it from the "
                                f"Hugging Face repo {repo} (e.g. huggingface-cli download {repo} --local-dir DIR)")
    if not os.path.exists(p):
        raise FileNotFoundError(f"reward {reward!r}: reward_paths[{key!r}] = {p!r} does not exist; expected "
                                f"{files}; get it from the Hugging Face repo {repo}")
    if key.endswith(("_processor", "_tokenizer")):
        if not _has_tokenizer(p):
            raise FileNotFoundError(f"reward {reward!r}: {p!r} has no tokenizer (tokenizer.json, vocab.json or "
                                    f"vocab.txt); expected {files} (Hugging Face repo {repo})")
    elif key in REQUIRED_FILES:
        folder = p if os.path.isdir(p) else os.path.dirname(p)
        lacking = [f for f in REQUIRED_FILES[key] if not os.path.isfile(os.path.join(folder, f))]
        if lacking:
            raise FileNotFoundError(f"reward {reward!r}: {folder!r} lacks {', '.join(lacking)}; expected {files} "
                                    f"(Hugging Face repo {repo})")
    elif os.path.isdir(p) and not os.path.isfile(os.path.join(p, "config.json")):
        raise FileNotFoundError(f"reward {reward!r}: {p!r} has no config.json; expected {files} "
                                f"(Hugging Face repo {repo})")
    return p


_CACHE: dict = {}
_CACHE_LOCK = threading.Lock()


def _cached(key, loader):
    with _CACHE_LOCK:
        if key not in _CACHE:
            _CACHE[key] = loader()
        return _CACHE[key]


def clear_cache() -> None:
    """Drop every cached reward model (frees their memory once no fn holds them)."""
    with _CACHE_LOCK:
        _CACHE.clear()


class ClipBundle:
    """A CLIPModel with its tokenizer and image preprocessing; `lock` guards every use."""

    def __init__(self, model, tokenizer, prep: dict, device, dtype):
        self.model, self.tokenizer, self.prep = model, tokenizer, prep
        self.device, self.dtype = torch.device(device), dtype
        self.lock = threading.Lock()

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        p = self.prep
        x = resize_crop_normalize(images.to(self.device), p["size"], p["crop"], p["mean"], p["std"])
        return x.to(self.dtype)

    @torch.no_grad()
    def image_embeds(self, images: torch.Tensor, preprocessed: bool = False) -> torch.Tensor:
        """(B,3,H,W) in [0,1] -> L2-normalised float32 (B, D). Call with `lock` held."""
        x = images.to(self.device, self.dtype) if preprocessed else self.preprocess(images)
        pooled = self.model.vision_model(pixel_values=x).pooler_output
        return F.normalize(self.model.visual_projection(pooled).float(), dim=-1)

    @torch.no_grad()
    def text_embeds(self, texts: list[str]) -> torch.Tensor:
        """list of str -> L2-normalised float32 (N, D). Call with `lock` held."""
        tok = self.tokenizer(list(texts), padding="max_length", truncation=True,
                             max_length=min(CLIP_MAX_LENGTH, self.model.config.text_config.max_position_embeddings),
                             return_tensors="pt")
        out = self.model.text_model(input_ids=tok["input_ids"].to(self.device),
                                    attention_mask=tok["attention_mask"].to(self.device)).pooler_output
        return F.normalize(self.model.text_projection(out).float(), dim=-1)


def _dtype_kwargs(dtype) -> dict:
    import transformers
    key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    return {key: dtype, "local_files_only": True}   # local paths only: nothing downloads


def _finish(model, device, dtype):
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def load_clip(model_path: str, processor_path: str | None = None, device="cpu", dtype=None) -> ClipBundle:
    """CLIPModel + tokenizer + preprocessing from local directories (cached per path/device/dtype)."""
    from transformers import AutoTokenizer, CLIPModel
    dtype = _default_dtype(device, dtype)
    processor_path = processor_path or model_path

    def load():
        model = CLIPModel.from_pretrained(model_path, **_dtype_kwargs(dtype))
        tok = AutoTokenizer.from_pretrained(processor_path, local_files_only=True)
        return ClipBundle(_finish(model, device, dtype), tok, _read_preprocessor(processor_path), device, dtype)
    return _cached(("clip", os.path.abspath(model_path), os.path.abspath(processor_path), str(device), dtype), load)


# ------------------------------------------------------------------------------------- HPS converter
IGNORED_OPENCLIP_KEYS = ("attn_mask", "visual.attn_mask")   # non-persistent buffers in old open_clip


def openclip_to_transformers(sd: dict, vision_heads: int | None = None, text_heads: int | None = None):
    """Map an OpenCLIP ViT state dict (open_clip layout: visual.conv1, visual.transformer.resblocks.*,
    transformer.resblocks.*, token_embedding, text_projection, ...) onto transformers' CLIPModel.

    Returns (state_dict, CLIPConfig). Sizes come from the weights; head counts default to width // 64
    (open_clip's head width; ViT-H/14: 16 and 16). Raises ValueError on missing or unexpected keys."""
    from transformers import CLIPConfig
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
    used, out = set(), {}

    def take(k):
        if k not in sd:
            raise ValueError(f"OpenCLIP state dict is missing key {k!r}")
        used.add(k)
        return sd[k]

    def count_blocks(prefix):
        ids = {int(k[len(prefix):].split(".")[0]) for k in sd if k.startswith(prefix)}
        if not ids:
            raise ValueError(f"OpenCLIP state dict has no {prefix}* keys")
        return max(ids) + 1

    def blocks(src, dst, n):
        for i in range(n):
            s, d = f"{src}{i}.", f"{dst}{i}."
            for a, b in (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"),
                         ("mlp.c_proj", "mlp.fc2"), ("attn.out_proj", "self_attn.out_proj")):
                out[d + b + ".weight"], out[d + b + ".bias"] = take(s + a + ".weight"), take(s + a + ".bias")
            w, bias = take(s + "attn.in_proj_weight"), take(s + "attn.in_proj_bias")
            for name, wi, bi in zip(("q_proj", "k_proj", "v_proj"), w.chunk(3, 0), bias.chunk(3, 0)):
                out[d + f"self_attn.{name}.weight"], out[d + f"self_attn.{name}.bias"] = wi, bi

    conv = take("visual.conv1.weight")
    v_width, patch = conv.shape[0], conv.shape[-1]
    v_pos = take("visual.positional_embedding")
    grid = int(round(math.sqrt(v_pos.shape[0] - 1)))
    v_layers = count_blocks("visual.transformer.resblocks.")
    v_mlp = sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
    tok_emb, t_pos = take("token_embedding.weight"), take("positional_embedding")
    t_width = tok_emb.shape[1]
    t_layers = count_blocks("transformer.resblocks.")
    t_mlp = sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
    text_proj, vis_proj = take("text_projection"), take("visual.proj")

    out["vision_model.embeddings.class_embedding"] = take("visual.class_embedding")
    out["vision_model.embeddings.patch_embedding.weight"] = conv
    out["vision_model.embeddings.position_embedding.weight"] = v_pos
    for a, b in (("visual.ln_pre", "vision_model.pre_layrnorm"), ("visual.ln_post", "vision_model.post_layernorm"),
                 ("ln_final", "text_model.final_layer_norm")):
        out[b + ".weight"], out[b + ".bias"] = take(a + ".weight"), take(a + ".bias")
    blocks("visual.transformer.resblocks.", "vision_model.encoder.layers.", v_layers)
    blocks("transformer.resblocks.", "text_model.encoder.layers.", t_layers)
    out["text_model.embeddings.token_embedding.weight"] = tok_emb
    out["text_model.embeddings.position_embedding.weight"] = t_pos
    out["visual_projection.weight"] = vis_proj.t().contiguous()
    out["text_projection.weight"] = text_proj.t().contiguous()
    out["logit_scale"] = take("logit_scale").reshape(())
    unexpected = sorted(k for k in sd if k not in used and k not in IGNORED_OPENCLIP_KEYS)
    if unexpected:
        raise ValueError(f"OpenCLIP state dict has unexpected keys: {unexpected[:10]}")
    config = CLIPConfig(
        text_config=dict(vocab_size=tok_emb.shape[0], hidden_size=t_width, intermediate_size=t_mlp,
                         num_hidden_layers=t_layers, num_attention_heads=text_heads or max(t_width // 64, 1),
                         max_position_embeddings=t_pos.shape[0], hidden_act="gelu", projection_dim=text_proj.shape[1],
                         bos_token_id=tok_emb.shape[0] - 2, eos_token_id=tok_emb.shape[0] - 1, pad_token_id=0),
        vision_config=dict(hidden_size=v_width, intermediate_size=v_mlp, num_hidden_layers=v_layers,
                           num_attention_heads=vision_heads or max(v_width // 64, 1), image_size=grid * patch,
                           patch_size=patch, hidden_act="gelu", projection_dim=vis_proj.shape[1]),
        projection_dim=text_proj.shape[1])
    return out, config


def _load_state_dict_file(path: str) -> dict:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(path)
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    return sd


def _assign_weights(build: Callable, sd: dict, path: str, what: str) -> nn.Module:
    """build() on the meta device (no random init of a large model), then assign `sd`: the key set must match the
    model's exactly (non-persistent position_ids buffers apart, which are filled with arange) and every shape must
    fit; anything else is a ValueError naming `path`."""
    with torch.device("meta"):
        model = build()
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(k for k in expected if k not in sd and not k.endswith("position_ids"))
    unexpected = sorted(k for k in sd if k not in expected)
    shapes = sorted(k for k in sd if k in expected and tuple(sd[k].shape) != expected[k])
    if missing or unexpected or shapes:
        raise ValueError(f"{path}: {what} do not fit {type(model).__name__}: missing {missing[:10]}, unexpected "
                         f"{unexpected[:10]}, mis-shaped {[(k, tuple(sd[k].shape), expected[k]) for k in shapes[:5]]}")
    model.load_state_dict(sd, strict=False, assign=True)
    for module in model.modules():   # non-persistent position_ids buffers are not in the state dict
        buf = module._buffers.get("position_ids")
        if buf is not None and buf.is_meta:
            module._buffers["position_ids"] = torch.arange(buf.shape[-1]).expand(buf.shape).clone()
    still_meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if still_meta:
        raise ValueError(f"{path}: {what} left uninitialised tensors {still_meta[:10]}")
    return model


def load_hps(path: str, processor_path: str, device="cpu", dtype=None, vision_heads=None, text_heads=None) -> ClipBundle:
    """HPSv2.1: an OpenCLIP ViT-H/14 checkpoint file (converted on load) or a converted CLIPModel dir."""
    from transformers import AutoTokenizer, CLIPModel
    dtype = _default_dtype(device, dtype)
    if os.path.isdir(path):
        return load_clip(path, processor_path, device, dtype)

    def load():
        sd, config = openclip_to_transformers(_load_state_dict_file(path), vision_heads, text_heads)
        model = _assign_weights(lambda: CLIPModel(config), sd, path, "converted HPS weights")
        tok = AutoTokenizer.from_pretrained(processor_path, local_files_only=True)
        return ClipBundle(_finish(model, device, dtype), tok, _read_preprocessor(processor_path), device, dtype)
    return _cached(("hps", os.path.abspath(path), os.path.abspath(processor_path), str(device), dtype), load)


# ------------------------------------------------------------------------------------- ImageReward (BLIP)
IGNORED_IMAGEREWARD_KEYS = (   # in ImageReward.pt, unused by its score: BLIP's contrastive projections, a position buffer
    "blip.vision_proj.weight", "blip.vision_proj.bias", "blip.text_proj.weight", "blip.text_proj.bias",
    "blip.text_encoder.embeddings.position_ids")


class ImageRewardModel(nn.Module):
    """ImageReward on transformers' BLIP classes: BlipVisionModel (ViT-L/16, 224 px) -> every image token into the
    cross-attention of BlipTextModel (BLIP's BERT "med" encoder) -> the [CLS] state -> a 768->1024->128->64->16->1
    head without activations (the layout of `AestheticMLP`, kept in float32) -> (r - mean) / std."""

    def __init__(self, vision_config, text_config):
        from transformers import BlipTextModel, BlipVisionModel
        super().__init__()
        self.vision_model = BlipVisionModel(vision_config)
        self.text_encoder = BlipTextModel(text_config, add_pooling_layer=False)
        self.mlp = AestheticMLP(text_config.hidden_size)

    def forward(self, pixel_values, input_ids, attention_mask):
        image_embeds = self.vision_model(pixel_values=pixel_values).last_hidden_state
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        text = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image_embeds,
                                 encoder_attention_mask=image_mask).last_hidden_state
        cls = text[:, 0].to(self.mlp.layers[0].weight.dtype)   # float32 after load_imagereward, as the reference
        return imagereward_normalise(self.mlp(cls).float().squeeze(-1))


def imagereward_normalise(raw: torch.Tensor) -> torch.Tensor:
    """ImageReward's reported score: (head output - 0.16717...) / 1.03333... (its mean and std over its training set)."""
    return (raw - IMAGEREWARD_MEAN) / IMAGEREWARD_STD


def imagereward_to_transformers(sd: dict, med_config: dict, vision_heads: int | None = None):
    """Map ImageReward.pt (BLIP's timm-style ViT `blip.visual_encoder.*`, BERT `blip.text_encoder.*`, head `mlp.*`)
    onto ImageRewardModel. Returns (state_dict, BlipVisionConfig, BlipTextConfig). Vision sizes come from the weights
    (heads default to width // 64: ViT-L 16), text sizes from med_config.json. ValueError on missing or unexpected
    keys (IGNORED_IMAGEREWARD_KEYS apart)."""
    from transformers import BlipTextConfig, BlipVisionConfig
    used, out = set(), {}

    def take(k):
        if k not in sd:
            raise ValueError(f"ImageReward state dict is missing key {k!r}")
        used.add(k)
        return sd[k]

    v = "blip.visual_encoder."
    conv, pos = take(v + "patch_embed.proj.weight"), take(v + "pos_embed")
    width, patch = conv.shape[0], conv.shape[-1]
    grid = int(round(math.sqrt(pos.shape[1] - 1)))
    layers = 1 + max((int(k[len(v + "blocks."):].split(".")[0]) for k in sd if k.startswith(v + "blocks.")), default=-1)
    if layers == 0:
        raise ValueError("ImageReward state dict has no blip.visual_encoder.blocks.* keys")
    out["vision_model.embeddings.class_embedding"] = take(v + "cls_token")
    out["vision_model.embeddings.position_embedding"] = pos
    out["vision_model.embeddings.patch_embedding.weight"] = conv
    out["vision_model.embeddings.patch_embedding.bias"] = take(v + "patch_embed.proj.bias")
    for i in range(layers):
        s, d = f"{v}blocks.{i}.", f"vision_model.encoder.layers.{i}."
        for a, b in (("norm1", "layer_norm1"), ("norm2", "layer_norm2"), ("attn.qkv", "self_attn.qkv"),
                     ("attn.proj", "self_attn.projection"), ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):
            out[d + b + ".weight"], out[d + b + ".bias"] = take(s + a + ".weight"), take(s + a + ".bias")
    out["vision_model.post_layernorm.weight"], out["vision_model.post_layernorm.bias"] = \
        take(v + "norm.weight"), take(v + "norm.bias")
    t = "blip.text_encoder."
    for k in sd:   # BLIP's med BERT uses transformers' BERT names, which BlipTextModel kept
        if k.startswith(t) and k not in IGNORED_IMAGEREWARD_KEYS:
            out["text_encoder." + k[len(t):]] = take(k)
    for k in sd:
        if k.startswith("mlp.layers."):
            out[k] = take(k)
    unexpected = sorted(k for k in sd if k not in used and k not in IGNORED_IMAGEREWARD_KEYS)
    if unexpected:
        raise ValueError(f"ImageReward state dict has unexpected keys: {unexpected[:10]}")
    if not med_config.get("add_cross_attention", False):
        raise ValueError("med_config.json must have add_cross_attention: true (ImageReward's text encoder "
                         "cross-attends to the image)")
    vision = BlipVisionConfig(hidden_size=width, intermediate_size=sd[v + "blocks.0.mlp.fc1.weight"].shape[0],
                              num_hidden_layers=layers, num_attention_heads=vision_heads or max(width // 64, 1),
                              image_size=grid * patch, patch_size=patch, hidden_act="gelu", layer_norm_eps=1e-6)
    text = BlipTextConfig(
        vocab_size=med_config["vocab_size"], hidden_size=med_config["hidden_size"],
        intermediate_size=med_config["intermediate_size"], num_hidden_layers=med_config["num_hidden_layers"],
        num_attention_heads=med_config["num_attention_heads"],
        max_position_embeddings=med_config["max_position_embeddings"], hidden_act=med_config.get("hidden_act", "gelu"),
        layer_norm_eps=med_config.get("layer_norm_eps", 1e-12), pad_token_id=med_config.get("pad_token_id", 0),
        encoder_hidden_size=width, is_decoder=True,   # is_decoder: BlipTextLayer builds its cross-attention only then
        bos_token_id=None, eos_token_id=None, sep_token_id=None)   # no generation; BLIP's ids would not fit a tiny vocab
    return out, vision, text


class ImageRewardBundle:
    """ImageRewardModel with its tokenizer and 224-px preprocessing; `lock` guards every use."""

    def __init__(self, model: ImageRewardModel, tokenizer, device, dtype):
        self.model, self.tokenizer, self.device, self.dtype = model, tokenizer, torch.device(device), dtype
        self.size = model.vision_model.config.image_size
        self.lock = threading.Lock()

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """(B,3,H,W) in [0,1] and B prompts -> float32 (B,) normalised ImageReward scores. Call with `lock` held."""
        x = resize_crop_normalize(images.to(self.device), self.size, (self.size, self.size), OPENAI_CLIP_MEAN,
                                  OPENAI_CLIP_STD).to(self.dtype)
        tok = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=IMAGEREWARD_MAX_LENGTH,
                             return_tensors="pt")
        return self.model(x, tok["input_ids"].to(self.device), tok["attention_mask"].to(self.device))


def load_imagereward(path: str, tokenizer_path: str, device="cpu", dtype=None, vision_heads=None) -> ImageRewardBundle:
    """ImageReward from a folder with ImageReward.pt + med_config.json (or the .pt with med_config.json beside it)
    and the bert-base-uncased tokenizer folder (cached per path/device/dtype)."""
    from transformers import AutoTokenizer
    dtype = _default_dtype(device, dtype)
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    weights = os.path.join(folder, IMAGEREWARD_FILES[0]) if os.path.isdir(path) else path

    def load():
        with open(os.path.join(folder, IMAGEREWARD_FILES[1])) as f:
            med = json.load(f)
        sd, vision, text = imagereward_to_transformers(_load_state_dict_file(weights), med, vision_heads)
        model = _assign_weights(lambda: ImageRewardModel(vision, text), sd, weights, "converted ImageReward weights")
        model = _finish(model, device, dtype)
        model.mlp.float()            # the head runs in float32, as the reference casts the [CLS] state to float
        tok = AutoTokenizer.from_pretrained(tokenizer_path, local_files_only=True)
        return ImageRewardBundle(model, tok, device, dtype)
    return _cached(("imagereward", os.path.abspath(weights), os.path.abspath(tokenizer_path), str(device), dtype), load)


# ------------------------------------------------------------------------------------- Mask2Former
class _InferenceOnlyLoss(nn.Module):
    """Stand-in for Mask2FormerLoss (whose constructor needs scipy); keeps its one buffer, no training."""

    def __init__(self, config, weight_dict):
        super().__init__()
        self.num_labels, self.eos_coef = config.num_labels, config.no_object_weight
        w = torch.ones(config.num_labels + 1)
        w[-1] = self.eos_coef
        self.register_buffer("empty_weight", w)

    def forward(self, *args, **kwargs):
        raise RuntimeError("reward.py builds Mask2Former for inference only (scipy missing); no loss")


_M2F_BUILD_LOCK = threading.Lock()


def build_mask2former(config_or_path, **kwargs):
    """Mask2FormerForUniversalSegmentation(config) or .from_pretrained(path, **kwargs), with the loss
    stubbed when scipy is missing (transformers builds the training loss in the constructor)."""
    from transformers import Mask2FormerForUniversalSegmentation
    from transformers.models.mask2former import modeling_mask2former as mm
    try:
        import scipy  # noqa: F401
        stub = False
    except ImportError:
        stub = True
    with _M2F_BUILD_LOCK:
        original = mm.Mask2FormerLoss
        if stub:
            mm.Mask2FormerLoss = _InferenceOnlyLoss
        try:
            if isinstance(config_or_path, (str, os.PathLike)):
                return Mask2FormerForUniversalSegmentation.from_pretrained(config_or_path, **kwargs)
            return Mask2FormerForUniversalSegmentation(config_or_path)
        finally:
            mm.Mask2FormerLoss = original


class Mask2FormerDetector:
    """Mask2Former COCO instance segmentation on (B,3,H,W) [0,1] tensors -> list[list[Detection]]."""

    def __init__(self, model, prep: dict, device, dtype, min_score: float = min(THRESHOLD, COUNTING_THRESHOLD)):
        from transformers import Mask2FormerImageProcessor
        self.model, self.device, self.dtype, self.min_score = model, torch.device(device), dtype, min_score
        raw = prep.get("raw", {})
        size = raw.get("size", {"shortest_edge": 800, "longest_edge": 1333})
        if not isinstance(size, dict):
            size = {"shortest_edge": int(size)}
        self.short = int(size.get("shortest_edge", 800))
        self.long = int(size.get("longest_edge") or 1333)
        self.divisor = int(raw.get("size_divisor", 32) or 1)
        self.mean = tuple(raw.get("image_mean", IMAGENET_MEAN))
        self.std = tuple(raw.get("image_std", IMAGENET_STD))
        n = model.config.num_labels
        id2label = {int(k): v for k, v in model.config.id2label.items()}
        self.labels = GENEVAL_CLASSES if n == 80 else [id2label[i] for i in range(n)]
        self.post = Mask2FormerImageProcessor()   # only its post_process_instance_segmentation is used
        self.lock = threading.Lock()

    def inputs(self, images: torch.Tensor):
        """Resize (shortest edge, longest cap, bilinear antialias), normalise, pad to the size divisor."""
        h, w = images.shape[-2:]
        s = self.short / min(h, w)
        if max(h, w) * s > self.long:
            s = self.long / max(h, w)
        nh, nw = int(round(h * s)), int(round(w * s))
        x = images.float().to(self.device)
        if (nh, nw) != (h, w):
            x = F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
        m = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        sd = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        x = (x - m) / sd
        ph, pw = -(-nh // self.divisor) * self.divisor, -(-nw // self.divisor) * self.divisor
        mask = torch.zeros(x.shape[0], ph, pw, dtype=torch.long, device=x.device)
        mask[:, :nh, :nw] = 1
        return F.pad(x, (0, pw - nw, 0, ph - nh)).to(self.dtype), mask, (nh, nw)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> list[list[Detection]]:
        h, w = images.shape[-2:]
        x, pmask, (nh, nw) = self.inputs(images)
        with self.lock:
            out = self.model(pixel_values=x, pixel_mask=pmask)
        masks, logits = out.masks_queries_logits.float(), out.class_queries_logits.float()
        ph, pw = x.shape[-2:]
        mh, mw = max(1, round(nh / ph * masks.shape[-2])), max(1, round(nw / pw * masks.shape[-1]))
        results = []
        for b in range(images.shape[0]):
            one = SimpleNamespace(class_queries_logits=logits[b:b + 1], masks_queries_logits=masks[b:b + 1, :, :mh, :mw])
            r = self.post.post_process_instance_segmentation(one, threshold=self.min_score, target_sizes=[(h, w)],
                                                             return_binary_maps=True)[0]
            dets = []
            seg = r["segmentation"]
            for i, info in enumerate(r["segments_info"]):
                m = seg[i].bool()
                ys, xs = torch.nonzero(m.any(1)).flatten(), torch.nonzero(m.any(0)).flatten()
                if len(xs) == 0:
                    continue
                box = (float(xs[0]), float(ys[0]), float(xs[-1] + 1), float(ys[-1] + 1))
                dets.append(Detection(self.labels[info["label_id"]], float(info["score"]), box, m.cpu().numpy()))
            results.append(dets)
        return results


def load_mask2former(path: str, device="cpu", dtype=None) -> Mask2FormerDetector:
    dtype = _default_dtype(device, dtype)

    def load():
        model = build_mask2former(path, **_dtype_kwargs(dtype))
        return Mask2FormerDetector(_finish(model, device, dtype), _read_preprocessor(path), device, dtype)
    return _cached(("m2f", os.path.abspath(path), str(device), dtype), load)


# ------------------------------------------------------------------------------------- OCR (GOT-OCR 2.0)
def quoted_text(prompt: str) -> str:
    """The text an OCR prompt asks for: what follows the first double quote, up to the next one (Flow-GRPO's
    prompt.split('"')[1]). ValueError when the prompt has no quote or the quotes hold nothing."""
    parts = prompt.split('"')
    if len(parts) < 2 or not parts[1].replace(" ", ""):
        raise ValueError(f"OCR reward: prompt {prompt!r} has no text between double quotes (e.g. 'a sign saying "
                         f"\"hello\"')")
    return parts[1]


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions, each 1), the python-Levenshtein package's distance."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def ocr_score(recognized: str, target: str) -> float:
    """Flow-GRPO's OCR reward: both strings lowercased without spaces; distance 0 when the target is contained in the
    recognised text, else their Levenshtein distance capped at len(target); reward 1 - distance / len(target)."""
    rec, tgt = recognized.replace(" ", "").lower(), target.replace(" ", "").lower()
    if not tgt:
        raise ValueError("OCR reward: empty target text")
    dist = 0 if tgt in rec else min(levenshtein(rec, tgt), len(tgt))
    return 1 - dist / len(tgt)


def to_pil_images(images: torch.Tensor) -> list:
    """(B,3,H,W) in [0,1] -> PIL RGB images, rounded to uint8 as Flow-GRPO's reward functions do."""
    from PIL import Image
    arr = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


class GotOcr:
    """GOT-OCR 2.0 (transformers' GotOcr2ForConditionalGeneration + its processor): plain OCR, greedy decoding up to
    `max_new_tokens` or <|im_end|>; returns the recognised text per image. `lock` guards every use."""

    def __init__(self, model, processor, device, dtype, max_new_tokens=OCR_MAX_NEW_TOKENS):
        self.model, self.processor, self.device, self.dtype = model, processor, torch.device(device), dtype
        self.max_new_tokens = max_new_tokens
        v = model.config.vision_config
        self.num_image_tokens = (v.image_size // v.patch_size // 4) ** 2   # two stride-2 convs in the projector
        self.lock = threading.Lock()

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> list[str]:
        inputs = self.processor(to_pil_images(images), return_tensors="pt", num_image_tokens=self.num_image_tokens)
        inputs = {k: (v.to(self.device, self.dtype) if k == "pixel_values" else v.to(self.device))
                  for k, v in inputs.items()}
        with self.lock:
            ids = self.model.generate(**inputs, do_sample=False, max_new_tokens=self.max_new_tokens,
                                      tokenizer=self.processor.tokenizer, stop_strings="<|im_end|>")
        return self.processor.batch_decode(ids[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def load_got_ocr(path: str, device="cpu", dtype=None, max_new_tokens=OCR_MAX_NEW_TOKENS) -> GotOcr:
    from transformers import AutoProcessor, GotOcr2ForConditionalGeneration
    dtype = _default_dtype(device, dtype)

    def load():
        model = GotOcr2ForConditionalGeneration.from_pretrained(path, **_dtype_kwargs(dtype))
        return GotOcr(_finish(model, device, dtype), AutoProcessor.from_pretrained(path, local_files_only=True),
                      device, dtype, max_new_tokens)
    return _cached(("got_ocr", os.path.abspath(path), str(device), dtype, max_new_tokens), load)


# ------------------------------------------------------------------------------------- Grounding DINO
def grounding_caption(prompt: str) -> str:
    """Grounding DINO's text input: the prompt lowercased, ending with a period (its model card's convention)."""
    text = prompt.strip().lower()
    return text if text.endswith(".") else text + "."


class GroundingDinoDetector:
    """Grounding DINO (transformers) with the prompt as the grounding caption: (B,3,H,W) [0,1] tensors and B prompts
    -> list[list[Detection]] (label = the grounded phrase, box in pixels, no mask), most confident first."""

    def __init__(self, model, processor, device, dtype, box_threshold=GROUNDING_BOX_THRESHOLD,
                 text_threshold=GROUNDING_TEXT_THRESHOLD):
        self.model, self.processor, self.device, self.dtype = model, processor, torch.device(device), dtype
        self.box_threshold, self.text_threshold = box_threshold, text_threshold
        self.lock = threading.Lock()

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: list[str]) -> list[list[Detection]]:
        h, w = images.shape[-2:]
        results = []
        for image, prompt in zip(to_pil_images(images), prompts):   # one caption per image: no text padding
            inputs = self.processor(images=image, text=grounding_caption(prompt), return_tensors="pt")
            inputs = {k: (v.to(self.device, self.dtype) if k == "pixel_values" else v.to(self.device))
                      for k, v in inputs.items()}
            with self.lock:
                out = self.model(**inputs)
            out.logits, out.pred_boxes = out.logits.float(), out.pred_boxes.float()
            r = self.processor.post_process_grounded_object_detection(
                out, inputs["input_ids"], threshold=self.box_threshold, text_threshold=self.text_threshold,
                target_sizes=[(h, w)])[0]
            labels = r.get("text_labels", r.get("labels"))
            dets = [Detection(str(lab), float(sc), tuple(float(v) for v in box.tolist()))
                    for sc, box, lab in zip(r["scores"], r["boxes"], labels)]
            results.append(sorted(dets, key=lambda d: -d.score))
        return results


def load_grounding_dino(path: str, device="cpu", dtype=None) -> GroundingDinoDetector:
    from transformers import AutoProcessor, GroundingDinoForObjectDetection
    dtype = _default_dtype(device, dtype)

    def load():
        model = GroundingDinoForObjectDetection.from_pretrained(path, **_dtype_kwargs(dtype))
        return GroundingDinoDetector(_finish(model, device, dtype), AutoProcessor.from_pretrained(
            path, local_files_only=True), device, dtype)
    return _cached(("gdino", os.path.abspath(path), str(device), dtype), load)


# ------------------------------------------------------------------------------------- colour classifier
class ColorClassifier:
    """GenEval's colour step: CLIP zero-shot over COLORS on the masked crop (background #999)."""

    def __init__(self, clip: ClipBundle):
        self.clip = clip
        self._weights: dict[str, torch.Tensor] = {}

    def weights(self, classname: str) -> torch.Tensor:
        """(D, 10) zero-shot weights: per colour, mean of the normalised template embeddings, renormalised.
        Call with clip.lock held."""
        if classname not in self._weights:
            texts = [t.format(c=c, o=classname) for c in COLORS for t in COLOR_TEMPLATES]
            e = self.clip.text_embeds(texts).view(len(COLORS), len(COLOR_TEMPLATES), -1).mean(1)
            self._weights[classname] = F.normalize(e, dim=-1).t()
        return self._weights[classname]

    def crops(self, image: torch.Tensor, dets: list[Detection]) -> torch.Tensor:
        """(N,3,crop,crop) preprocessed crops of one image (3,H,W) in [0,1]."""
        p, out = self.clip.prep, []
        H, W = image.shape[-2:]
        for d in dets:
            x = image.float()
            if d.mask is not None:
                m = torch.as_tensor(np.asarray(d.mask), device=x.device).bool()
                if tuple(m.shape) != (H, W):
                    raise ValueError(f"detection mask shape {tuple(m.shape)} != image size {(H, W)}")
                x = torch.where(m, x, torch.full_like(x, COLOR_BACKGROUND))
            x0, y0, x1, y1 = (int(round(v)) for v in d.box[:4])
            x0, y0 = min(max(x0, 0), W - 1), min(max(y0, 0), H - 1)
            x1, y1 = max(min(x1, W), x0 + 1), max(min(y1, H), y0 + 1)
            crop = x[:, y0:y1, x0:x1].unsqueeze(0)
            out.append(resize_crop_normalize(crop, p["size"], p["crop"], p["mean"], p["std"]))
        return torch.cat(out)

    def __call__(self, image: torch.Tensor, dets: list[Detection], classname: str) -> list[str]:
        x = self.crops(image.to(self.clip.device), dets)
        with self.clip.lock:
            w = self.weights(classname)
            e = self.clip.image_embeds(x, preprocessed=True)
        return [COLORS[i] for i in (e @ w).argmax(1).tolist()]


# ------------------------------------------------------------------------------------- reward factories
def _out(values, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(values, dtype=torch.float32).reshape(-1).to(like.device)


def soft_geneval_score(detections: list[Detection], meta: dict, classify_colors=None,
                       thresholds=SOFT_THRESHOLDS) -> float:
    """The partial score averaged over detection thresholds: each detection counts in proportion to its
    confidence instead of all-or-nothing at 0.3 / 0.9. Equal to the partial score when every detection is
    confident (clean renders); for a half-trained model it grades "almost a triangle" above "a blob", so
    few groups have zero reward variance. A training reward for small budgets; evaluation stays GenEval's."""
    return float(np.mean([geneval_score(detections, meta, classify_colors, threshold=t)[0] for t in thresholds]))


def geneval_from_detector(detect: Callable, name: str, color_classifier: ColorClassifier | None = None,
                          soft: bool = False):
    """GenEval scoring around any detector `detect(images) -> list[list[Detection]]`; returns
    fn(images, prompts, metadata) -> {name: partial, name + "_strict": strict (0/1)}, or with soft=True
    {name: soft_geneval_score} alone."""
    def fn(images, prompts, metadata):
        if metadata is None or len(metadata) != images.shape[0]:
            raise ValueError(f"reward {name!r} needs one GenEval metadata dict per image "
                             f"(got {None if metadata is None else len(metadata)} for {images.shape[0]} images)")
        for m in metadata:
            _check_meta(m)
        detections = detect(images)
        partial, strict = [], []
        for b, (dets, meta) in enumerate(zip(detections, metadata)):
            clf = None if color_classifier is None else (lambda ds, c, b=b: color_classifier(images[b], ds, c))
            if soft:
                partial.append(soft_geneval_score(dets, meta, clf))
            else:
                p, s = geneval_score(dets, meta, clf)
                partial.append(p)
                strict.append(float(s))
        out = {name: _out(partial, images)}
        if not soft:
            out[name + "_strict"] = _out(strict, images)
        return out
    return fn


def geneval_reward(paths: dict, device="cpu", dtype=None):
    """GenEval: Mask2Former (paths["mask2former"]) + CLIP ViT-L/14 colour (paths["clip_l"])."""
    m2f, clip_l = _need_path(paths, "mask2former", "geneval"), _need_path(paths, "clip_l", "geneval")
    detector = load_mask2former(m2f, device, dtype)
    return geneval_from_detector(detector, "geneval", ColorClassifier(load_clip(clip_l, None, device, dtype)))


def _clip_pair_scores(clip: ClipBundle, images, prompts, logit_scale: bool = False):
    with clip.lock:
        img = clip.image_embeds(images)
        txt = clip.text_embeds(prompts)
        s = (img * txt).sum(-1)
        if logit_scale:
            s = s * clip.model.logit_scale.float().exp()
    return s


def pickscore_reward(paths: dict, device="cpu", dtype=None):
    """PickScore: logit_scale.exp() * cos(text, image) with the PickScore_v1 CLIP-H, reported / 26."""
    clip = load_clip(_need_path(paths, "pickscore", "pickscore"),
                     _need_path(paths, "pickscore_processor", "pickscore"), device, dtype)

    def fn(images, prompts, metadata=None):
        return {"pickscore": _out(_clip_pair_scores(clip, images, prompts, logit_scale=True) / PICKSCORE_SCALE, images)}
    return fn


def clipscore_reward(paths: dict, device="cpu", dtype=None):
    """CLIPScore: cosine(text, image) with CLIP ViT-L/14."""
    clip = load_clip(_need_path(paths, "clip_l", "clipscore"), None, device, dtype)

    def fn(images, prompts, metadata=None):
        return {"clipscore": _out(_clip_pair_scores(clip, images, prompts), images)}
    return fn


def hpsv2_reward(paths: dict, device="cpu", dtype=None):
    """HPSv2.1: cosine(text, image) with the HPS v2.1 OpenCLIP ViT-H/14 mapped onto CLIPModel."""
    hps = load_hps(_need_path(paths, "hpsv2", "hpsv2"),
                   _need_path(paths, "hpsv2_processor", "hpsv2"), device, dtype)

    def fn(images, prompts, metadata=None):
        return {"hpsv2": _out(_clip_pair_scores(hps, images, prompts), images)}
    return fn


class AestheticMLP(nn.Module):
    """LAION improved-aesthetic-predictor head (keys layers.{0,2,4,6,7}.*); dropouts are identity at eval."""

    def __init__(self, dim: int = 768):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                                    nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))

    def forward(self, x):
        return self.layers(x)


def load_aesthetic_mlp(path: str, device="cpu") -> AestheticMLP:
    """Strict load of the MLP from .safetensors (fp32; it is tiny)."""
    from safetensors.torch import load_file
    sd = load_file(path)
    if "layers.0.weight" not in sd:
        raise ValueError(f"{path}: not the LAION aesthetic MLP (no 'layers.0.weight'; keys {sorted(sd)[:6]})")
    mlp = AestheticMLP(sd["layers.0.weight"].shape[1])
    missing, unexpected = mlp.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: aesthetic MLP keys: missing {missing}, unexpected {unexpected}")
    return mlp.to(device).eval().requires_grad_(False)


def aesthetic_reward(paths: dict, device="cpu", dtype=None):
    """LAION aesthetic predictor: MLP on the L2-normalised CLIP ViT-L/14 image embedding.

    Weights: sac+logos+ava1-l14-linearMSE.pth (github christophschuhmann/improved-aesthetic-predictor, also
    on HF e.g. camenduru/improved-aesthetic-predictor); convert once to safetensors:
        python -c "import torch,safetensors.torch as s; s.save_file(torch.load('sac+logos+ava1-l14-linearMSE.pth', map_location='cpu', weights_only=True), 'aesthetic_mlp.safetensors')"
    """
    clip = load_clip(_need_path(paths, "clip_l", "aesthetic"), None, device, dtype)
    mlp_path = _need_path(paths, "aesthetic", "aesthetic")
    mlp = _cached(("aes", os.path.abspath(mlp_path), str(device)), lambda: load_aesthetic_mlp(mlp_path, device))

    def fn(images, prompts=None, metadata=None):
        with clip.lock:
            e = clip.image_embeds(images)
            s = mlp(e.to(next(mlp.parameters()).device)).squeeze(-1)
        return {"aesthetic": _out(s, images)}
    return fn


def image_reward_reward(paths: dict, device="cpu", dtype=None):
    """ImageReward (BLIP ViT-L + BERT med, THUDM/ImageReward) on transformers' BLIP classes; the normalised score."""
    ir = load_imagereward(_need_path(paths, "image_reward", "image_reward"),
                          _need_path(paths, "image_reward_tokenizer", "image_reward"), device, dtype)

    def fn(images, prompts, metadata=None):
        with ir.lock:
            return {"image_reward": _out(ir(images, prompts), images)}
    return fn


def ocr_got_reward(paths: dict, device="cpu", dtype=None):
    """Flow-GRPO's OCR metric (`ocr_score` against the prompt's quoted text) on GOT-OCR 2.0 instead of PaddleOCR:
    named apart ("ocr_got") because its numbers are not PaddleOCR's."""
    ocr = load_got_ocr(_need_path(paths, "got_ocr", "ocr_got"), device, dtype)

    def fn(images, prompts, metadata=None):
        targets = [quoted_text(p) for p in prompts]   # a prompt without quotes fails before the OCR runs
        return {"ocr_got": _out([ocr_score(t, g) for t, g in zip(ocr(images), targets)], images)}
    return fn


REWARDS: dict[str, Callable] = {
    "geneval": geneval_reward, "pickscore": pickscore_reward, "clipscore": clipscore_reward,
    "aesthetic": aesthetic_reward, "hpsv2": hpsv2_reward, "image_reward": image_reward_reward, "ocr_got": ocr_got_reward,
}
REQUIRED_PATHS = {   # checked for every named reward before any model loads
    "geneval": ["mask2former", "clip_l"], "pickscore": ["pickscore", "pickscore_processor"],
    "clipscore": ["clip_l"], "aesthetic": ["clip_l", "aesthetic"], "hpsv2": ["hpsv2", "hpsv2_processor"],
    "image_reward": ["image_reward", "image_reward_tokenizer"], "ocr_got": ["got_ocr"],
}
NEEDS_METADATA = {"geneval"}   # rewards that score GenEval metadata ("tag", "include"), not only the prompt text


def grounding_dino_detector(paths: dict, device="cpu", dtype=None):
    detector = load_grounding_dino(_need_path(paths, "grounding_dino", "grounding_dino"), device, dtype)
    return lambda images, prompts: detector(images, prompts)


def mask2former_detector(paths: dict, device="cpu", dtype=None):
    detector = load_mask2former(_need_path(paths, "mask2former", "mask2former"), device, dtype)
    return lambda images, prompts: detector(images)


# Object detectors behind one interface, for metrics that need boxes (evaluate.py's layout diversity, SDI):
# factory(paths, device, dtype) -> detect(images (B,3,H,W) in [0,1], prompts) -> list[list[Detection]]
DETECTORS: dict[str, Callable] = {"grounding_dino": grounding_dino_detector, "mask2former": mask2former_detector}
DETECTOR_PATHS = {"grounding_dino": ["grounding_dino"], "mask2former": ["mask2former"]}


def register(name: str, factory: Callable, paths=(), needs_metadata: bool = False, detector: Callable | None = None,
             ) -> None:
    """Add a reward: factory(paths, device, dtype) -> fn(images, prompts, metadata) -> {name: (B,), ...}; `paths` are
    the reward_paths keys it needs (checked before anything loads); needs_metadata: it scores GenEval metadata.
    detector: factory(paths, device, dtype) -> detect(images, prompts) -> list[list[Detection]], the detector the
    reward scores with, registered under the same name in DETECTORS so other metrics can reuse it (the shapes world
    lends its numpy detector to evaluate.py's SDI this way, and nothing in the core imports the world)."""
    if name in REWARDS and REWARDS[name] is not factory:
        raise ValueError(f"reward {name!r} is registered already")
    REWARDS[name], REQUIRED_PATHS[name] = factory, list(paths)
    if needs_metadata:
        NEEDS_METADATA.add(name)
    if detector is not None:
        DETECTORS[name], DETECTOR_PATHS[name] = detector, list(paths)


def check_detector(name: str, paths: dict | None = None) -> None:
    """ValueError for an unknown detector, FileNotFoundError (naming files and repo id) for a missing path; loads nothing."""
    if name not in DETECTORS:
        raise ValueError(f"unknown detector {name!r}; choose from {sorted(DETECTORS)}")
    for key in DETECTOR_PATHS[name]:
        _need_path(dict(paths or {}), key, name)


def build_detector(name: str, paths: dict | None = None, device="cpu", dtype=None) -> Callable:
    """detect(images, prompts) -> list[list[Detection]] of a detector in DETECTORS; its paths are checked first."""
    check_detector(name, paths)
    return DETECTORS[name](dict(paths or {}), device, dtype)


def parse_spec(spec) -> dict[str, float]:
    """"name" -> {name: 1.0}; {name: weight} validated."""
    if isinstance(spec, str):
        spec = {spec: 1.0}
    if not isinstance(spec, dict) or not spec:
        raise ValueError(f"reward spec must be a name or a non-empty {{name: weight}} dict, got {spec!r}")
    out = {}
    for name, w in spec.items():
        if name not in REWARDS:
            raise ValueError(f"unknown reward {name!r}; choose from {sorted(REWARDS)}")
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise ValueError(f"reward weight for {name!r} must be a finite number, got {w!r}")
        out[name] = float(w)
    return out


def known_path_keys() -> list[str]:
    """The keys `paths` may hold: every weight key (WEIGHT_SOURCES, and those registered rewards and detectors
    need) and every reward or detector name (the one-folder-per-reward shortcut), sorted."""
    keys = set(WEIGHT_SOURCES) | set(REWARDS) | set(DETECTORS)
    for needed in (*REQUIRED_PATHS.values(), *DETECTOR_PATHS.values()):
        keys.update(needed)
    return sorted(keys)


def check_reward_paths(paths) -> None:
    """Check a `reward_paths` dict on its own, loading nothing: every key known (ValueError naming the key and
    listing the known ones: a typo such as "clipl" would otherwise be ignored), every value a str (TypeError) naming
    a path that exists (FileNotFoundError), each naming the key. check_paths then checks what a spec needs."""
    if not isinstance(paths, dict):
        raise TypeError(f"reward_paths must be a dict {{key: local path}}, got {type(paths).__name__} {paths!r}")
    known = known_path_keys()
    for key, path in paths.items():
        if key not in known:
            raise ValueError(f"reward_paths: unknown key {key!r}; the known keys are {', '.join(known)}")
        if not isinstance(path, str):
            raise TypeError(f"reward_paths[{key!r}] must be a str path, got {type(path).__name__} {path!r}")
        if not path or not os.path.exists(path):
            raise FileNotFoundError(f"reward_paths[{key!r}] = {path!r} does not exist")


def check_paths(spec, paths: dict | None) -> dict[str, str]:
    """Validate a spec and resolve every local path it needs, loading nothing (for config checks).
    Returns {key: resolved path}; raises ValueError (spec) or FileNotFoundError (paths) like build()."""
    paths = dict(paths or {})
    return {key: _need_path(paths, key, name) for name in parse_spec(spec) for key in REQUIRED_PATHS[name]}


def combine(fns: dict[str, Callable], weights: dict[str, float]) -> Callable:
    """Run several reward fns and add "avg" = sum_k weights[k] * scores[k]."""
    def fn(images, prompts, metadata=None):
        if not torch.is_tensor(images) or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"reward images must be a (B,3,H,W) tensor in [0,1], got "
                             f"{tuple(images.shape) if torch.is_tensor(images) else type(images)}")
        if prompts is not None and len(prompts) != images.shape[0]:
            raise ValueError(f"got {len(prompts)} prompts for {images.shape[0]} images")
        out: dict[str, torch.Tensor] = {}
        for name, f in fns.items():
            out.update(f(images, prompts, metadata))
        out["avg"] = sum(weights[n] * out[n] for n in weights)
        return out
    return fn


def build(spec, paths: dict | None = None, device="cpu", dtype=None) -> Callable:
    """Reward fn(images (B,3,H,W) in [0,1], prompts, metadata) -> {name: (B,) float32, ..., "avg": (B,)}.

    spec: a name in REWARDS or {name: weight}; paths: see the module docstring (keys in REQUIRED_PATHS);
    dtype None -> fp16 on CUDA, fp32 otherwise. Safe to call from several threads."""
    weights = parse_spec(spec)
    paths = dict(paths or {})
    check_paths(weights, paths)   # every path checked before anything loads
    return combine({name: REWARDS[name](paths, device, dtype) for name in weights}, weights)
