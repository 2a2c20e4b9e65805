"""Tests of the shapes world (data/shapes/world.py): renderer, prompts/split, detector, tokenizer.

Run: pytest -q tests_world.py     (CPU, a few seconds)
"""
import json
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from data.shapes import world

N_IMAGES = 480          # renders scored by the detector accuracy test (all six tags, many seeds)


def relative_position(box_a, box_b, threshold=0.1):
    """GenEval's relation of box a to box b (x0, y0, x1, y1), with its 0.1 dimension margin."""
    boxes = np.array([box_a, box_b], np.float64).reshape(2, 2, 2)
    center_a, center_b = boxes.mean(axis=-2)
    dim_a, dim_b = np.abs(np.diff(boxes, axis=-2))[..., 0, :]
    offset = center_a - center_b
    revised = np.maximum(np.abs(offset) - threshold * (dim_a + dim_b), 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    rels = set()
    if dx < -0.5: rels.add("left of")
    if dx > 0.5: rels.add("right of")
    if dy < -0.5: rels.add("above")
    if dy > 0.5: rels.add("below")
    return rels


def sample_metas(n, seed=0):
    """n metadata dicts cycling through the six tags (random prompts within each tag)."""
    rows = world.make_prompts()
    by_tag = {t: [r for r in rows if r["tag"] == t] for t in world.TAGS}
    rng = np.random.default_rng(seed)
    return [by_tag[world.TAGS[i % 6]][rng.integers(len(by_tag[world.TAGS[i % 6]]))] for i in range(n)]


def center(box):
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2


# ----------------------------------------------------------------------------- renderer
def test_render_is_deterministic_and_batched():
    metas = sample_metas(12)
    a = world.render_batch(metas, seed=3)
    b = world.render_batch(metas, seed=3)
    c = world.render_batch(metas, seed=4)
    assert a.shape == (12, 3, 64, 64) and a.dtype == torch.float32
    assert 0.0 <= a.min() and a.max() <= 1.0
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    img = world.render(metas[0], np.random.default_rng(0), size=96)
    assert img.shape == (96, 96, 3) and img.dtype == np.uint8
    assert np.array_equal(img, world.render(metas[0], np.random.default_rng(0), size=96))


def test_render_honours_metadata():
    rng = np.random.default_rng(1)
    for meta in world.make_prompts()[::3]:
        _, objs = world.render_objects(meta, rng)
        want = Counter((it["class"], it.get("color")) for it in meta["include"] for _ in range(it["count"]))
        got = Counter((o["class"], o["color"] if any("color" in it for it in meta["include"]) else None) for o in objs)
        assert got == want, meta["prompt"]
        for i, o in enumerate(objs):                               # inside the image, not touching
            assert 0 <= o["box"][0] and o["box"][2] <= 64 and 0 <= o["box"][1] and o["box"][3] <= 64
            for p in objs[i + 1:]:
                assert (o["box"][2] < p["box"][0] or p["box"][2] < o["box"][0]
                        or o["box"][3] < p["box"][1] or p["box"][3] < o["box"][1])
        if meta["tag"] == "position":
            rel = meta["include"][1]["position"][0]
            assert rel in relative_position(objs[1]["box"], objs[0]["box"]), meta["prompt"]


def test_bad_metadata_is_a_clear_error():
    with pytest.raises(ValueError, match="hexagon"):
        world.render({"include": [{"class": "hexagon", "count": 1}]}, np.random.default_rng(0))
    with pytest.raises(ValueError, match="pink"):
        world.render({"include": [{"class": "circle", "count": 1, "color": "pink"}]}, np.random.default_rng(0))
    with pytest.raises(ValueError, match="split"):
        world.load_prompts("val")


# ----------------------------------------------------------------------------- prompts / split
def test_prompts_split_disjoint_and_cover_all_tags(tmp_path):
    train, test = world.load_prompts("train"), world.load_prompts("test")
    ptrain, ptest = {r["prompt"] for r in train}, {r["prompt"] for r in test}
    assert len(ptrain) == len(train) and len(ptest) == len(test)      # no duplicates
    assert not ptrain & ptest
    assert {r["tag"] for r in train} == {r["tag"] for r in test} == set(world.TAGS)
    assert sorted(json.dumps(r) for r in train + test) == sorted(json.dumps(r) for r in world.make_prompts())
    for tag in world.TAGS:                                              # stratified ~85/15
        n = sum(r["tag"] == tag for r in train + test)
        assert sum(r["tag"] == tag for r in test) == max(1, round(world.TEST_FRACTION * n))
    counts = world.write_prompts(tmp_path)                              # shipped files == regeneration
    assert counts == {"train": len(train), "test": len(test)}
    for split in ("train", "test"):
        assert (tmp_path / f"{split}.jsonl").read_text() == (world.HERE / f"{split}.jsonl").read_text()
    words = {w for r in train + test for w in r["prompt"].split()}
    assert words == set(world.VOCAB)
    assert "a photo of an orange circle" in ptrain | ptest                # GenEval's a/an rule
    assert "a photo of four crosses" in ptrain | ptest


def test_metadata_format_matches_geneval():
    for r in world.make_prompts():
        assert set(r) <= {"tag", "include", "exclude", "prompt"}
        assert all(set(it) <= {"class", "count", "color", "position"} for it in r["include"])
        if r["tag"] == "counting":
            assert r["exclude"] == [{"class": r["include"][0]["class"], "count": r["include"][0]["count"] + 1}]
        if r["tag"] == "position":
            assert r["include"][1]["position"][1] == 0 and r["include"][1]["position"][0] in world.RELATIONS


# ----------------------------------------------------------------------------- detector
def test_connected_components_matches_flood_fill():
    rng = np.random.default_rng(0)
    for _ in range(5):
        mask = rng.random((23, 31)) < 0.55
        labels, n = world.connected_components(mask)
        ref, k = np.zeros(mask.shape, int), 0                           # reference: BFS flood fill
        for y, x in zip(*np.nonzero(mask)):
            if ref[y, x]:
                continue
            k += 1
            stack = [(y, x)]
            ref[y, x] = k
            while stack:
                cy, cx = stack.pop()
                for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                    if 0 <= ny < 23 and 0 <= nx < 31 and mask[ny, nx] and not ref[ny, nx]:
                        ref[ny, nx] = k
                        stack.append((ny, nx))
        assert n == k and labels.max() == n and ((labels > 0) == mask).all()
        pairs = set(zip(labels[mask].tolist(), ref[mask].tolist()))    # same partition
        assert len(pairs) == n


def test_detector_finds_rendered_objects():
    """Per-object accuracy: one detection at the object, right class and colour, score >= 0.9 (GenEval's
    counting threshold), box near the drawn box; and no extra detections."""
    rng = np.random.default_rng(7)
    metas = sample_metas(N_IMAGES, seed=7)
    rendered = [world.render_objects(m, rng) for m in metas]
    dets = world.detect(np.stack([im for im, _ in rendered]).transpose(0, 3, 1, 2).astype(np.float32) / 255)
    n_obj = n_ok = n_exact_images = 0
    per_tag = Counter()
    for (img, objs), ds, meta in zip(rendered, dets, metas):
        n_exact_images += len([d for d in ds if d.score >= 0.3]) == len(objs)
        for o in objs:
            cx, cy = center(o["box"])
            hits = [d for d in ds if d.box[0] <= cx <= d.box[2] and d.box[1] <= cy <= d.box[3]]
            ok = (len(hits) == 1 and hits[0].label == o["class"] and hits[0].color == o["color"]
                  and hits[0].score >= 0.9 and np.abs(np.array(hits[0].box) - o["box"]).max() <= 1.5
                  and hits[0].mask.shape == img.shape[:2] and hits[0].mask[int(cy), int(cx)])
            n_obj += 1
            n_ok += ok
            per_tag[meta["tag"]] += not ok
    accuracy = n_ok / n_obj
    print(f"detector per-object accuracy {accuracy:.4f} over {n_obj} objects in {N_IMAGES} images; "
          f"misses by tag {dict(per_tag)}")
    assert accuracy >= 0.95
    assert n_exact_images / N_IMAGES >= 0.97


def test_detector_positions_follow_geneval_rule():
    rng = np.random.default_rng(11)
    metas = [r for r in world.make_prompts() if r["tag"] == "position"]
    images = [world.render(m, rng) for m in metas]
    ok = 0
    for meta, ds in zip(metas, world.detect(images)):
        a = [d for d in ds if d.label == meta["include"][0]["class"]]
        b = [d for d in ds if d.label == meta["include"][1]["class"]]
        ok += (len(a) == len(b) == 1
               and meta["include"][1]["position"][0] in relative_position(b[0].box, a[0].box))
    assert ok / len(metas) >= 0.95


def test_geneval_score_strict_on_renders():
    reward = pytest.importorskip("reward")
    rng = np.random.default_rng(3)
    metas = sample_metas(120, seed=3)
    images = world.render_batch(metas, seed=rng)
    try:
        scored = [reward.geneval_score(ds, m) for ds, m in zip(world.detect(images), metas)]
    except NotImplementedError:
        pytest.skip("reward.geneval_score not implemented yet")
    strict = np.mean([s for _, s in scored])
    partial = np.mean([p for p, _ in scored])
    print(f"GenEval on renders: strict {strict:.3f}, partial {partial:.3f}")
    assert strict >= 0.97 and partial >= 0.98
    single = [m for m in metas if m["tag"] == "single_object"]
    swapped = {c: world.SHAPES[(k + 1) % len(world.SHAPES)] for k, c in enumerate(world.SHAPES)}
    wrong = [{**m, "include": [{"class": swapped[m["include"][0]["class"]], "count": 1}]} for m in single]
    dets = world.detect(world.render_batch(single, seed=0))               # images of the right prompt
    assert all(reward.geneval_score(ds, m)[1] for ds, m in zip(dets, single))
    assert not any(reward.geneval_score(ds, m)[1] for ds, m in zip(dets, wrong))


def test_shapes_reward_end_to_end():
    """reward.build("shapes") on renders: right metadata scores ~1, metadata of other prompts scores lower."""
    reward = pytest.importorskip("reward")
    if not hasattr(reward, "build"):
        pytest.skip("reward.build not available yet")
    fn = reward.build("shapes")
    metas = sample_metas(48, seed=9)
    images = world.render_batch(metas, seed=9)
    right = fn(images, [m["prompt"] for m in metas], metas)
    shuffled = metas[1:] + metas[:1]
    wrong = fn(images, [m["prompt"] for m in shuffled], shuffled)
    assert right["avg"].shape == (48,)
    assert right["shapes_strict"].mean() >= 0.97 and right["avg"].mean() >= 0.98
    assert wrong["shapes_strict"].mean() <= 0.3 and wrong["avg"].mean() < right["avg"].mean() - 0.3


def test_detector_confidence_reflects_clarity():
    rng = np.random.default_rng(5)
    metas = sample_metas(60, seed=5)
    clean = [world.render(m, rng) for m in metas]
    blurred = [np.asarray(Image.fromarray(im).filter(ImageFilter.GaussianBlur(2.5))) for im in clean]
    s_clean = np.mean([d.score for ds in world.detect(clean) for d in ds])
    s_blur = np.mean([d.score for ds in world.detect(blurred) for d in ds])
    assert s_clean > 0.95 and s_blur < 0.5
    noise = torch.rand(6, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    assert all(d.score < 0.3 for ds in world.detect(noise) for d in ds)
    assert world.detect(torch.full((2, 3, 64, 64), 0.95)) == [[], []]    # blank background
    for ds in world.detect(clean[:10]):
        assert all(0.0 <= d.score <= 1.0 for d in ds)


def test_detector_input_formats_and_sizes():
    metas = sample_metas(6, seed=2)
    x = world.render_batch(metas, seed=2)
    uint8 = [(im.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8) for im in x]
    for a, b in zip(world.detect(x), world.detect(uint8)):
        assert [(d.label, d.color) for d in a] == [(d.label, d.color) for d in b]
    big = world.render_batch(metas, seed=2, size=128)
    for meta, ds in zip(metas, world.detect(big)):
        want = Counter(it["class"] for it in meta["include"] for _ in range(it["count"]))
        assert Counter(d.label for d in ds if d.score >= 0.9) == want
    with pytest.raises(ValueError, match="shape"):
        world.detect(np.zeros((2, 64, 64)))


# ----------------------------------------------------------------------------- tokenizer
@pytest.mark.parametrize("pad", ["<|endoftext|>", "!"])
def test_clip_tokenizer_round_trip(tmp_path, pad):
    from transformers import CLIPTokenizer, CLIPTokenizerFast
    world.write_clip_tokenizer(tmp_path, pad_token=pad)
    for cls in (CLIPTokenizer, CLIPTokenizerFast):
        tok = cls.from_pretrained(tmp_path, local_files_only=True)
        assert tok.model_max_length == 77 and tok.pad_token == pad
        assert tok.bos_token == "<|startoftext|>" and tok.eos_token == "<|endoftext|>"
        for word in world.VOCAB:
            assert tok.tokenize(word) == [word + "</w>"], word
        prompt = "a photo of an orange cross left of a blue diamond"
        ids = tok(prompt, padding="max_length", max_length=77, truncation=True).input_ids
        n = len(prompt.split())
        assert len(ids) == 77 and ids[0] == tok.bos_token_id and ids[n + 1] == tok.eos_token_id
        assert ids[n + 2:] == [tok.pad_token_id] * (75 - n)
        assert tok.decode(ids, skip_special_tokens=True) == prompt
        unknown = tok.tokenize("a zebra")                               # unknown words fall back to characters
        assert unknown[0] == "a</w>" and "".join(unknown[1:]) == "zebra</w>" and len(unknown) > 2
        assert tok.unk_token_id not in tok("a zebra").input_ids[1:-1]
    assert (tmp_path / "vocab.json").exists() and (tmp_path / "merges.txt").exists()
