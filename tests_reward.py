"""Tests for reward.py (CPU, tiny random-init models; run: pytest -q tests_reward.py).

GenEval scoring on hand-made detections for every tag with hand-computed partial/strict scores; every
model family (CLIPModel for PickScore/CLIPScore/Aesthetic/HPS, Mask2Former for GenEval) on tiny random
weights of the real transformers classes, in fp32 and half precision; the OpenCLIP -> CLIPModel converter
against an open_clip-style reference forward; weighted combination; thread safety.
"""
import json
import os
import sys
import threading
import types
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import reward
from reward import Detection, geneval_score

torch.set_num_threads(1)


# ------------------------------------------------------------------------------------- GenEval scoring
def det(label, score=0.95, box=(0, 0, 10, 10), color=None):
    return Detection(label, score, box, None, color)


def test_single_object():
    meta = {"tag": "single_object", "include": [{"class": "bowl", "count": 1}], "prompt": "a photo of a bowl"}
    assert geneval_score([det("bowl", 0.8)], meta) == (1.0, True)
    assert geneval_score([], meta) == (0.0, False)                       # count term 1 - 1/1
    assert geneval_score([det("bowl", 0.3)], meta) == (0.0, False)       # score must exceed 0.3
    assert geneval_score([det("cup", 0.9)], meta) == (0.0, False)
    # two bowls: strict keeps the most confident 1 (>= count) -> correct; partial wants exactly 1: 1 - 1/1
    assert geneval_score([det("bowl", 0.8), det("bowl", 0.5)], meta) == (0.0, True)


def test_two_object():
    meta = {"tag": "two_object", "include": [{"class": "bowl", "count": 1}, {"class": "skis", "count": 1}]}
    assert geneval_score([det("bowl"), det("skis", 0.4)], meta) == (1.0, True)
    assert geneval_score([det("bowl")], meta) == (0.5, False)            # terms [1, 0]
    p, s = geneval_score([det("bowl"), det("skis"), det("skis")], meta)   # terms [1, 1 - 1/1]
    assert (p, s) == (0.5, True)


def test_counting_and_exclude():
    meta = {"tag": "counting", "include": [{"class": "wine glass", "count": 2}],
            "exclude": [{"class": "wine glass", "count": 3}]}
    g = lambda *scores: [det("wine glass", s) for s in scores]
    assert geneval_score(g(0.95, 0.92, 0.85), meta) == (1.0, True)     # 0.85 < counting threshold 0.9
    assert geneval_score(g(0.95), meta) == (0.5, False)                 # 1 - |2-1|/2
    assert geneval_score(g(0.95, 0.95, 0.95), meta) == (0.5, False)     # over-count: 1 - 1/2, excluded by ">= 3"
    assert geneval_score(g(*[0.99] * 5), meta) == (-0.5, False)         # 1 - 3/2 (Flow-GRPO's term goes negative)
    assert geneval_score(g(*[0.99] * 20), meta) == (1 - 14 / 2, False)  # at most 16 objects per class
    # exclude outside counting: strict fails, partial (include clauses only) does not see it
    meta2 = {"tag": "single_object", "include": [{"class": "bowl", "count": 1}], "exclude": [{"class": "cup", "count": 1}]}
    assert geneval_score([det("bowl"), det("cup", 0.5)], meta2) == (1.0, False)
    assert geneval_score([det("bowl"), det("cup", 0.2)], meta2) == (1.0, True)


def test_colors_and_classifier_calls():
    meta = {"tag": "colors", "include": [{"class": "cup", "count": 1, "color": "purple"}]}
    assert geneval_score([det("cup", color="purple")], meta) == (1.0, True)
    assert geneval_score([det("cup", color="red")], meta) == (0.5, False)    # terms [1, 1 - 1/1]
    assert geneval_score([], meta) == (0.0, False)                             # terms [0, 0]
    calls = []

    def clf(dets, classname):
        calls.append((classname, len(dets)))
        return ["purple" for _ in dets]
    assert geneval_score([det("cup", 0.9), det("cup", 0.5)], meta, clf) == (0.0, True)
    # strict classifies the top-1 cup; partial (2 cups != 1) never reaches the colour step; no repeats
    assert calls == [("cup", 1)]
    with pytest.raises(ValueError, match="colour"):
        geneval_score([det("cup")], meta)


def test_color_attr():
    meta = {"tag": "color_attr", "include": [{"class": "handbag", "count": 1, "color": "pink"},
                                              {"class": "scissors", "count": 1, "color": "black"}]}
    assert geneval_score([det("handbag", color="pink"), det("scissors", color="black")], meta) == (1.0, True)
    assert geneval_score([det("handbag", color="pink"), det("scissors", color="red")], meta) == (0.75, False)
    assert geneval_score([det("handbag", color="pink")], meta) == (0.5, False)     # terms [1, 1, 0, 0]


def test_position_and_relative_position():
    meta = {"tag": "position", "include": [{"class": "laptop", "count": 1},
                                           {"class": "cow", "count": 1, "position": ["right of", 0]}]}
    laptop = det("laptop", box=(0, 0, 100, 100))
    # offset 110, margin 0.1 * (100 + 100) = 20 -> dx = 90 / 110 > 0.5
    assert geneval_score([laptop, det("cow", box=(110, 0, 210, 100))], meta) == (1.0, True)
    left = [laptop, det("cow", box=(-120, 0, -20, 100))]
    assert geneval_score(left, meta) == (0.75, False)                              # terms [1, 1, 0, 1] (quirk)
    assert geneval_score(left, meta, position_quirk=False) == (pytest.approx(2 / 3), False)
    assert geneval_score([det("cow", box=(110, 0, 210, 100))], meta) == (pytest.approx(1 / 3), False)  # [0, 1, 0]
    assert reward.relative_position((5, 0, 105, 100), (0, 0, 100, 100)) == set()   # within the margin
    assert reward.relative_position((0, 200, 10, 210), (0, 0, 10, 10)) == {"below"}
    assert reward.relative_position((0, 0, 10, 10), (300, 300, 310, 310)) == {"left of", "above"}
    assert reward.relative_position((0, 0, 10, 10), (300, 50, 310, 60)) == {"left of"}   # dy = 44/304 < 0.5


def test_metadata_errors():
    with pytest.raises(ValueError, match="include"):
        geneval_score([], {"tag": "single_object"})
    with pytest.raises(ValueError, match="colour"):
        geneval_score([], {"tag": "colors", "include": [{"class": "cup", "count": 1, "color": "teal"}]})
    with pytest.raises(ValueError, match="position"):
        geneval_score([], {"tag": "position", "include": [{"class": "cup", "count": 1, "position": ["right of", 0]}]})
    with pytest.raises(ValueError, match="position"):
        geneval_score([], {"tag": "position", "include": [{"class": "cup", "count": 1},
                                                           {"class": "dog", "count": 1, "position": ["near", 0]}]})


# ------------------------------------------------------------------------------------- tiny models
def _bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def _save_tokenizer(d):
    """Character-level CLIP BPE tokenizer (no merges): 512 byte tokens + bos 512 + eos/pad 513."""
    from transformers import CLIPTokenizer
    chars = _bytes_to_unicode()
    vocab = {t: i for i, t in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    with open(os.path.join(d, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(d, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    CLIPTokenizer(os.path.join(d, "vocab.json"), os.path.join(d, "merges.txt")).save_pretrained(d)
    with open(os.path.join(d, "preprocessor_config.json"), "w") as f:
        json.dump({"size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32},
                   "image_mean": list(reward.OPENAI_CLIP_MEAN), "image_std": list(reward.OPENAI_CLIP_STD)}, f)


def _tiny_clip_config():
    from transformers import CLIPConfig
    return CLIPConfig(
        text_config=dict(vocab_size=514, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         max_position_embeddings=77, bos_token_id=512, eos_token_id=513, pad_token_id=513),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16)


def _tiny_m2f_config():
    from transformers import Mask2FormerConfig, SwinConfig
    bb = SwinConfig(image_size=64, patch_size=4, embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], window_size=2,
                    out_features=["stage1", "stage2", "stage3", "stage4"])
    labels = dict(enumerate(reward.GENEVAL_CLASSES))
    return Mask2FormerConfig(backbone_config=bb, feature_size=32, mask_feature_size=32, hidden_dim=32,
                             encoder_feedforward_dim=32, dim_feedforward=32, encoder_layers=1, decoder_layers=2,
                             num_attention_heads=2, num_queries=5, id2label=labels,
                             label2id={v: k for k, v in labels.items()})


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """paths dict with tiny random models of every family, saved like the real downloads."""
    from transformers import CLIPModel
    from safetensors.torch import save_file
    root = tmp_path_factory.mktemp("rewards")
    torch.manual_seed(0)
    paths = {}
    for key in ("clip_l", "pickscore"):
        d = str(root / key)
        CLIPModel(_tiny_clip_config()).save_pretrained(d)
        _save_tokenizer(d)
        paths[key] = d
    paths["pickscore_processor"] = paths["pickscore"]
    mlp = reward.AestheticMLP(16)
    paths["aesthetic"] = str(root / "aesthetic_mlp.safetensors")
    save_file({k: v.contiguous() for k, v in mlp.state_dict().items()}, paths["aesthetic"])
    sd = _openclip_sd()
    paths["hpsv2"] = str(root / "HPS_v2.1_compressed.pt")
    torch.save({"state_dict": sd}, paths["hpsv2"])
    m2f = reward.build_mask2former(_tiny_m2f_config())
    with torch.no_grad():   # make every query a confident "cup" so detections and colours happen
        m2f.class_predictor.bias.zero_()
        m2f.class_predictor.bias[reward.GENEVAL_CLASSES.index("cup")] = 12.0
    d = str(root / "mask2former")
    m2f.save_pretrained(d)
    with open(os.path.join(d, "preprocessor_config.json"), "w") as f:
        json.dump({"size": {"shortest_edge": 64, "longest_edge": 128}, "size_divisor": 32,
                   "image_mean": list(reward.IMAGENET_MEAN), "image_std": list(reward.IMAGENET_STD)}, f)
    paths["mask2former"] = d
    yield paths
    reward.clear_cache()


def _half():
    """fp16 if this CPU build runs a CLIP layer in fp16, else bf16."""
    try:
        x = torch.randn(2, 8, dtype=torch.float16)
        F.layer_norm(x, (8,)) @ torch.randn(8, 8, dtype=torch.float16)
        F.gelu(x)
        return torch.float16
    except RuntimeError:
        return torch.bfloat16


PROMPTS = ["a photo of a red cup", "a photo of two dogs", "a blue cat"]
META = [{"tag": "colors", "include": [{"class": "cup", "count": 1, "color": "red"}], "prompt": PROMPTS[0]},
        {"tag": "counting", "include": [{"class": "dog", "count": 2}], "exclude": [{"class": "dog", "count": 3}],
         "prompt": PROMPTS[1]},
        {"tag": "single_object", "include": [{"class": "cup", "count": 1}], "prompt": PROMPTS[2]}]


def _images(seed=0, b=3, h=48, w=64):
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", ["pickscore", "clipscore", "aesthetic", "hpsv2", "geneval"])
@pytest.mark.parametrize("half", [False, True])
def test_model_rewards_finite(tiny, name, half):
    dtype = _half() if half else torch.float32
    out = reward.build(name, tiny, dtype=dtype)(_images(), PROMPTS, META)
    assert out[name].shape == (3,) and out[name].dtype == torch.float32
    assert torch.isfinite(out[name]).all()
    assert torch.equal(out["avg"], out[name])
    if name == "geneval":
        assert set(out["geneval_strict"].tolist()) <= {0.0, 1.0}


def test_pickscore_and_clipscore_match_clipmodel(tiny):
    from transformers import AutoTokenizer, CLIPModel
    images = _images()
    out = reward.build({"pickscore": 1.0, "clipscore": 1.0}, tiny)(images, PROMPTS, None)
    model = CLIPModel.from_pretrained(tiny["pickscore"]).eval()
    tok = AutoTokenizer.from_pretrained(tiny["pickscore"])(PROMPTS, padding=True, return_tensors="pt")
    pix = reward.resize_crop_normalize(images, 32, (32, 32), reward.OPENAI_CLIP_MEAN, reward.OPENAI_CLIP_STD)
    with torch.no_grad():
        logits = model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"], pixel_values=pix).logits_per_image
    torch.testing.assert_close(out["pickscore"] * reward.PICKSCORE_SCALE, logits.diagonal(), atol=1e-4, rtol=1e-4)
    clip_l = CLIPModel.from_pretrained(tiny["clip_l"]).eval()
    with torch.no_grad():
        o = clip_l(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"], pixel_values=pix)
    cos = F.cosine_similarity(o.image_embeds, o.text_embeds, dim=-1)
    torch.testing.assert_close(out["clipscore"], cos, atol=1e-5, rtol=1e-5)


def test_preprocessing_shapes_and_values():
    x = torch.full((2, 3, 40, 80), 0.5)
    y = reward.resize_crop_normalize(x, 32, (32, 32), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    assert y.shape == (2, 3, 32, 32)
    torch.testing.assert_close(y, torch.zeros_like(y), atol=1e-5, rtol=0)   # constant image stays constant
    ramp = torch.linspace(0, 1, 80).view(1, 1, 1, 80).expand(1, 3, 40, 80)
    y = reward.resize_crop_normalize(ramp, 32, (32, 32), (0, 0, 0), (1, 1, 1))
    assert abs(y.mean().item() - 0.5) < 0.02                                  # centre crop keeps the middle


def test_preprocessing_matches_hf_clip_processor():
    """Our tensor resize/crop/normalise vs transformers' PIL CLIP processor (PIL rounds to uint8 after resizing)."""
    from PIL import Image
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    x = F.interpolate(torch.rand(1, 3, 6, 8, generator=torch.Generator().manual_seed(0)), size=(60, 80), mode="bilinear")
    arr = (x[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    proc = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    ref = torch.from_numpy(np.array(proc(images=Image.fromarray(arr), return_tensors="np")["pixel_values"]))
    ours = reward.resize_crop_normalize(torch.from_numpy(arr).permute(2, 0, 1)[None].float() / 255, 32, (32, 32),
                                        reward.OPENAI_CLIP_MEAN, reward.OPENAI_CLIP_STD)
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max() < 0.05 and (ours - ref).abs().mean() < 0.01


def test_aesthetic_matches_mlp(tiny):
    from transformers import CLIPModel
    images = _images(1)
    out = reward.build("aesthetic", tiny)(images, PROMPTS, None)
    model = CLIPModel.from_pretrained(tiny["clip_l"]).eval()
    mlp = reward.load_aesthetic_mlp(tiny["aesthetic"])
    pix = reward.resize_crop_normalize(images, 32, (32, 32), reward.OPENAI_CLIP_MEAN, reward.OPENAI_CLIP_STD)
    with torch.no_grad():
        e = F.normalize(model.visual_projection(model.vision_model(pixel_values=pix).pooler_output), dim=-1)
        torch.testing.assert_close(out["aesthetic"], mlp(e).squeeze(-1), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------- OpenCLIP converter
W, LAYERS, PATCH, GRID, EMBED, VOCAB, CTX = 32, 2, 8, 4, 16, 514, 77


def _openclip_sd(seed=0):
    """Synthetic state dict in open_clip's layout (width 32, 2 layers, patch 8 on 32 px, embed 16, vocab 514)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.2
    sd = {"visual.conv1.weight": r(W, 3, PATCH, PATCH), "visual.class_embedding": r(W),
          "visual.positional_embedding": r(GRID * GRID + 1, W), "visual.proj": r(W, EMBED),
          "token_embedding.weight": r(VOCAB, W), "positional_embedding": r(CTX, W), "text_projection": r(W, EMBED),
          "logit_scale": torch.tensor(4.6), "attn_mask": torch.zeros(CTX, CTX)}
    for ln in ("visual.ln_pre", "visual.ln_post", "ln_final"):
        sd[ln + ".weight"], sd[ln + ".bias"] = 1 + r(W), r(W)
    for pre in ("visual.transformer.resblocks.", "transformer.resblocks."):
        for i in range(LAYERS):
            p = f"{pre}{i}."
            for ln in ("ln_1", "ln_2"):
                sd[p + ln + ".weight"], sd[p + ln + ".bias"] = 1 + r(W), r(W)
            sd[p + "attn.in_proj_weight"], sd[p + "attn.in_proj_bias"] = r(3 * W, W), r(3 * W)
            sd[p + "attn.out_proj.weight"], sd[p + "attn.out_proj.bias"] = r(W, W), r(W)
            sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"] = r(4 * W, W), r(4 * W)
            sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"] = r(W, 4 * W), r(W)
    return sd


def _openclip_blocks(sd, pre, x, heads, causal):
    """open_clip's residual attention blocks, written with torch's multi-head attention (batch first)."""
    n = x.shape[1]
    mask = torch.full((n, n), float("-inf")).triu(1) if causal else None
    for i in range(LAYERS):
        p = lambda k: sd[f"{pre}.{i}.{k}"]
        h = F.layer_norm(x, (W,), p("ln_1.weight"), p("ln_1.bias")).transpose(0, 1)
        a, _ = F.multi_head_attention_forward(h, h, h, W, heads, p("attn.in_proj_weight"), p("attn.in_proj_bias"),
                                              None, None, False, 0.0, p("attn.out_proj.weight"), p("attn.out_proj.bias"),
                                              need_weights=False, attn_mask=mask)
        x = x + a.transpose(0, 1)
        h = F.layer_norm(x, (W,), p("ln_2.weight"), p("ln_2.bias"))
        x = x + F.linear(F.gelu(F.linear(h, p("mlp.c_fc.weight"), p("mlp.c_fc.bias"))), p("mlp.c_proj.weight"), p("mlp.c_proj.bias"))
    return x


def _openclip_encode(sd, pixels, ids, heads):
    x = F.conv2d(pixels, sd["visual.conv1.weight"], stride=PATCH).flatten(2).transpose(1, 2)
    x = torch.cat([sd["visual.class_embedding"].expand(x.shape[0], 1, W), x], 1) + sd["visual.positional_embedding"]
    x = F.layer_norm(x, (W,), sd["visual.ln_pre.weight"], sd["visual.ln_pre.bias"])
    x = _openclip_blocks(sd, "visual.transformer.resblocks", x, heads, causal=False)
    img = F.layer_norm(x[:, 0], (W,), sd["visual.ln_post.weight"], sd["visual.ln_post.bias"]) @ sd["visual.proj"]
    t = sd["token_embedding.weight"][ids] + sd["positional_embedding"]
    t = _openclip_blocks(sd, "transformer.resblocks", t, heads, causal=True)
    t = F.layer_norm(t, (W,), sd["ln_final.weight"], sd["ln_final.bias"])
    txt = t[torch.arange(t.shape[0]), ids.argmax(-1)] @ sd["text_projection"]
    return F.normalize(img, dim=-1), F.normalize(txt, dim=-1)


def test_openclip_converter_matches_reference():
    from transformers import CLIPModel
    sd = _openclip_sd(1)
    hf_sd, config = reward.openclip_to_transformers(sd, vision_heads=2, text_heads=2)
    assert config.vision_config.image_size == GRID * PATCH and config.projection_dim == EMBED
    model = CLIPModel(config).eval()
    missing, unexpected = model.load_state_dict(hf_sd, strict=False)
    assert not unexpected and all(k.endswith("position_ids") for k in missing)
    pixels = torch.randn(2, 3, 32, 32)
    ids = torch.full((2, CTX), 513)
    ids[:, 0], ids[0, 1:4], ids[1, 1:6] = 512, torch.tensor([5, 6, 7]), torch.tensor([8, 9, 10, 11, 12])
    ids[0, 4], ids[1, 6] = 513, 513
    ids[0, 5:], ids[1, 7:] = 0, 0     # open_clip pads with 0 after the end token
    ref_img, ref_txt = _openclip_encode(sd, pixels, ids, heads=2)
    with torch.no_grad():
        img = F.normalize(model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output), dim=-1)
        txt = F.normalize(model.text_projection(model.text_model(input_ids=ids).pooler_output), dim=-1)
    torch.testing.assert_close(img, ref_img, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(txt, ref_txt, atol=1e-5, rtol=1e-4)
    bad = dict(sd, **{"visual.extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="unexpected"):
        reward.openclip_to_transformers(bad)
    with pytest.raises(ValueError, match="missing"):
        reward.openclip_to_transformers({k: v for k, v in sd.items() if k != "ln_final.bias"})


def test_hpsv2_reward_matches_openclip_reference(tiny):
    """The hpsv2 reward (checkpoint file converted on load) == cosine of an open_clip-style forward."""
    from transformers import AutoTokenizer
    images = _images(5)
    out = reward.build("hpsv2", tiny)(images, PROMPTS)
    ids = AutoTokenizer.from_pretrained(tiny["pickscore"])(PROMPTS, padding="max_length", max_length=CTX,
                                                            return_tensors="pt")["input_ids"]
    pix = reward.resize_crop_normalize(images, 32, (32, 32), reward.OPENAI_CLIP_MEAN, reward.OPENAI_CLIP_STD)
    img, txt = _openclip_encode(_openclip_sd(), pix, ids, heads=1)   # heads default to width // 64 -> 1
    torch.testing.assert_close(out["hpsv2"], (img * txt).sum(-1), atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------- interface
def test_geneval_pipeline_detects_and_classifies(tiny):
    detector = reward.load_mask2former(tiny["mask2former"])
    images = _images(2)
    dets = detector(images)
    assert len(dets) == 3 and all(len(d) > 0 for d in dets)          # the biased head makes confident cups
    for d in dets[0]:
        assert d.label == "cup" and 0 < d.score <= 1 and d.mask.shape == (48, 64)
        x0, y0, x1, y1 = d.box
        assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 48
        ys, xs = np.nonzero(d.mask)
        assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == d.box
    clf = reward.ColorClassifier(reward.load_clip(tiny["clip_l"]))
    colors = clf(images[0], dets[0], "cup")
    assert len(colors) == len(dets[0]) and set(colors) <= set(reward.COLORS)
    # scores from the fn equal geneval_score on the same detections
    out = reward.build("geneval", tiny)(images, PROMPTS, META)
    for b in range(3):
        p, s = geneval_score(dets[b], META[b], lambda ds, c, b=b: clf(images[b], ds, c))
        assert out["geneval"][b].item() == pytest.approx(p) and out["geneval_strict"][b].item() == float(s)


def test_shapes_reward_uses_world_detector(monkeypatch):
    world = types.ModuleType("data.shapes.world")
    world.detect = lambda images: [[Detection("circle", 1.0, (0, 0, 5, 5), None, "red")] for _ in range(len(images))]
    monkeypatch.setitem(sys.modules, "data.shapes.world", world)
    meta = [{"tag": "colors", "include": [{"class": "circle", "count": 1, "color": c}]} for c in ("red", "blue")]
    out = reward.build("shapes")(torch.rand(2, 3, 8, 8), ["a red circle", "a blue circle"], meta)
    assert out["shapes"].tolist() == [1.0, 0.5] and out["shapes_strict"].tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match="metadata"):
        reward.build("shapes")(torch.rand(2, 3, 8, 8), ["a", "b"], None)


def test_shapes_reward_on_rendered_world():
    """The real shapes world (if present): its own renders score 1; mismatched metadata scores lower."""
    world = pytest.importorskip("data.shapes.world")
    metas = world.load_prompts("test")[:12]
    images = world.render_batch(metas, seed=0)
    fn = reward.build("shapes")
    good = fn(images, [m["prompt"] for m in metas], metas)
    assert good["shapes_strict"].mean() >= 0.9 and good["shapes"].mean() >= 0.9
    rolled = metas[1:] + metas[:1]
    bad = fn(images, [m["prompt"] for m in rolled], rolled)
    assert bad["shapes"].mean() < good["shapes"].mean()


def test_weighted_combination(tiny):
    images = _images(3)
    out = reward.build({"clipscore": 2.0, "pickscore": -0.5, "aesthetic": 0.25}, tiny)(images, PROMPTS, None)
    torch.testing.assert_close(out["avg"], 2 * out["clipscore"] - 0.5 * out["pickscore"] + 0.25 * out["aesthetic"])
    single = reward.build("clipscore", tiny)(images, PROMPTS, None)
    torch.testing.assert_close(single["clipscore"], out["clipscore"])


def test_spec_and_path_errors(tiny, tmp_path):
    with pytest.raises(ValueError, match="unknown reward"):
        reward.build("imagereward", tiny)
    with pytest.raises(ValueError, match="finite number"):
        reward.build({"clipscore": "1"}, tiny)
    with pytest.raises(FileNotFoundError, match="yuvalkirstain/PickScore_v1"):
        reward.build("pickscore", {"pickscore_processor": tiny["pickscore"]})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        reward.build("aesthetic", dict(tiny, aesthetic=str(tmp_path / "nope.safetensors")))
    with pytest.raises(FileNotFoundError, match="config.json"):
        reward.build("clipscore", {"clip_l": str(tmp_path)})
    with pytest.raises(FileNotFoundError, match="facebook/mask2former-swin-small-coco-instance"):
        reward.build({"clipscore": 1.0, "geneval": 1.0}, {"clip_l": tiny["clip_l"]})
    assert reward.check_paths({"hpsv2": 1.0, "shapes": 1.0}, tiny) == {"hpsv2": tiny["hpsv2"],
                                                                       "hpsv2_processor": tiny["pickscore_processor"]}
    with pytest.raises(FileNotFoundError, match="xswu/HPSv2"):
        reward.check_paths("hpsv2", {})
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        reward.build("pickscore", {"pickscore": tiny["pickscore"], "pickscore_processor": str(tmp_path)})
    # shortcuts: the PickScore folder holding its tokenizer; one folder per reward with sub-folders by key
    images = _images(4)
    torch.testing.assert_close(reward.build("pickscore", {"pickscore": tiny["pickscore"]})(images, PROMPTS)["pickscore"],
                               reward.build("pickscore", tiny)(images, PROMPTS)["pickscore"])
    root = tmp_path / "geneval"
    root.mkdir()
    os.symlink(tiny["mask2former"], root / "mask2former")
    os.symlink(tiny["clip_l"], root / "clip_l")
    torch.testing.assert_close(reward.build("geneval", {"geneval": str(root)})(images, PROMPTS, META)["geneval"],
                               reward.build("geneval", tiny)(images, PROMPTS, META)["geneval"])
    fn = reward.build("clipscore", tiny)
    with pytest.raises(ValueError, match="prompts"):
        fn(_images(), PROMPTS[:2], None)
    with pytest.raises(ValueError, match=r"\(B,3,H,W\)"):
        fn(torch.rand(3, 32, 32), PROMPTS, None)


def test_thread_safety(tiny):
    fn = reward.build({"pickscore": 1.0, "clipscore": 1.0, "geneval": 1.0}, tiny)
    batches = [(_images(10 + i), PROMPTS, META) for i in range(4)]
    serial = [fn(*b) for b in batches]
    barrier = threading.Barrier(4)

    def call(i):
        barrier.wait()
        return [fn(*batches[i]) for _ in range(2)]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(call, range(4)))
    for i, runs in enumerate(results):
        for r in runs:
            assert r.keys() == serial[i].keys()
            for k in r:
                torch.testing.assert_close(r[k], serial[i][k], atol=1e-6, rtol=0)
