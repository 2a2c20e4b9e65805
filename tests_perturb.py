"""
Tests for the text-conditioning stack (model_text.py, to be merged into model.py) and perturb.py (E²PO Phase I).

    pytest -q tests_perturb.py
    python tests_perturb.py [STEPS] [THREADS]     # not a test: Δ-optimisation cost at the real CLIP-L shape

Tiny random CLIP-L / CLIP-G / T5 with tokenizers built here (a small CLIP BPE vocabulary, a small T5 unigram
vocabulary) are saved as a diffusers pipeline root and as single files; encode is checked against diffusers'
StableDiffusion3Pipeline.encode_prompt, and the perturbation learner against the properties of Eq. 9–12.
"""

import copy
import string

import pytest
import torch
from safetensors.torch import save_file
from transformers import (CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer, T5Config, T5EncoderModel,
                          T5Tokenizer)

from model import TextEncoders, load_text_encoders
from perturb import PerturbationCache, embedding_losses, learn_perturbations

torch.set_num_threads(1)

WORDS = ["a", "photo", "of", "red", "blue", "green", "circle", "square", "triangle", "two", "three", "left", "right",
         "and", "the", "big", "small"]
T5_LEN = 16           # T5 max_sequence_length in the tests (diffusers' default 256 is slow for nothing here)
DIMS = dict(clip_l=64, clip_g=128, t5=256)   # head_dim 64 so single-file loading can infer the head counts
PROMPTS = ["a photo of a red circle", "two blue squares left of the green triangle", "a big small circle"]


def clip_tokenizer(pad):
    chars = list(string.ascii_lowercase) + ["!", ",", "."]
    vocab = {c: i for i, c in enumerate(chars)}            # "!" must be id 26 < specials; SD3's tokenizer_2 pads "!"
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    merges = []
    for w in ["red", "blue", "circle", "photo"]:             # a few BPE merges so words become single tokens
        cur = list(w[:-1]) + [w[-1] + "</w>"]
        while len(cur) > 1:
            merges.append((cur[0], cur[1]))
            vocab.setdefault(cur[0] + cur[1], len(vocab))
            cur = [cur[0] + cur[1]] + cur[2:]
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)                      # EOS is the largest id, as in CLIP's real vocabulary
    return CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad, model_max_length=77)


def t5_tokenizer():
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("▁" + w, -2.0) for w in WORDS] + [("▁" + c, -5.0) for c in string.ascii_lowercase]
    pieces += [(c, -6.0) for c in string.ascii_lowercase]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)


def tiny_clip(tok, hidden, act, seed):
    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=hidden // 64, max_position_embeddings=77, projection_dim=hidden,
                         hidden_act=act, bos_token_id=0, eos_token_id=2, pad_token_id=1)   # SD3's legacy ids
    model = CLIPTextModelWithProjection(cfg).eval()
    with torch.no_grad():   # larger random embeddings than the 0.02 default, so the tiny towers are less degenerate
        model.text_model.embeddings.token_embedding.weight.normal_(0, 0.5)
    return model


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd3_text")
    tok_l, tok_g, tok_t5 = clip_tokenizer("<|endoftext|>"), clip_tokenizer("!"), t5_tokenizer()
    clip_l = tiny_clip(tok_l, DIMS["clip_l"], "quick_gelu", 0)
    clip_g = tiny_clip(tok_g, DIMS["clip_g"], "gelu", 1)
    torch.manual_seed(2)
    t5 = T5EncoderModel(T5Config(vocab_size=len(tok_t5), d_model=DIMS["t5"], d_kv=64, num_heads=2, d_ff=64,
                                 num_layers=2, feed_forward_proj="gated-gelu")).eval()
    for name, obj in [("text_encoder", clip_l), ("text_encoder_2", clip_g), ("text_encoder_3", t5),
                      ("tokenizer", tok_l), ("tokenizer_2", tok_g), ("tokenizer_3", tok_t5)]:
        obj.save_pretrained(root / name)
    (root / "text_encoders").mkdir()
    for name, m in [("clip_l", clip_l), ("clip_g", clip_g), ("t5xxl_fp16", t5)]:
        sd = {k: v.contiguous() for k, v in m.state_dict().items()
              if k not in ("encoder.embed_tokens.weight", "text_model.embeddings.position_ids")}
        save_file(sd, root / "text_encoders" / f"{name}.safetensors")
    te = load_text_encoders(root, max_sequence_length=T5_LEN)
    te_no_t5 = TextEncoders(te.clip_l, te.clip_g, te.tokenizer_l, te.tokenizer_g, joint_dim=DIMS["t5"],
                            max_sequence_length=T5_LEN)
    return dict(root=root, te=te, te_no_t5=te_no_t5, models=(clip_l, clip_g, t5), toks=(tok_l, tok_g, tok_t5))


def diffusers_pipe(world, with_t5):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    clip_l, clip_g, t5 = world["models"]
    tok_l, tok_g, tok_t5 = world["toks"]
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8,
                                        num_attention_heads=2, joint_attention_dim=DIMS["t5"],
                                        caption_projection_dim=16,
                                        pooled_projection_dim=DIMS["clip_l"] + DIMS["clip_g"], out_channels=4,
                                        pos_embed_max_size=16)
    return StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=None,
                                    text_encoder=clip_l, tokenizer=tok_l, text_encoder_2=clip_g, tokenizer_2=tok_g,
                                    text_encoder_3=t5 if with_t5 else None, tokenizer_3=tok_t5 if with_t5 else None)


# ---- text stack ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("with_t5", [True, False])
def test_encode_matches_diffusers(world, with_t5):
    te = world["te"] if with_t5 else world["te_no_t5"]
    prompts = PROMPTS + [""]
    with torch.no_grad():   # as in the pipeline's __call__ (grad mode picks other CPU attention kernels: ~1e-6)
        ref_ctx, _, ref_pooled, _ = diffusers_pipe(world, with_t5).encode_prompt(
            prompts, prompt_2=None, prompt_3=None, device="cpu", do_classifier_free_guidance=False,
            max_sequence_length=T5_LEN)
    context, pooled = te.encode(prompts)
    assert context.shape == (4, 77 + T5_LEN, DIMS["t5"]) and pooled.shape == (4, DIMS["clip_l"] + DIMS["clip_g"])
    torch.testing.assert_close(context, ref_ctx, rtol=0, atol=1e-6)
    torch.testing.assert_close(pooled, ref_pooled, rtol=0, atol=1e-6)
    assert context[:, :77, DIMS["clip_l"] + DIMS["clip_g"]:].abs().max() == 0       # zero padding to the joint dim
    assert (context[:, 77:].abs().max() == 0) == (not with_t5)


def test_single_files_load_the_same(world):
    te1 = load_text_encoders(world["root"] / "text_encoders", max_sequence_length=T5_LEN)
    assert te1.t5 is not None
    assert te1.clip_l.config.hidden_act == "quick_gelu" and te1.clip_g.config.hidden_act == "gelu"
    for a, b in zip(te1.encode(PROMPTS), world["te"].encode(PROMPTS)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    te2 = load_text_encoders(world["root"], t5=False, max_sequence_length=T5_LEN, joint_dim=DIMS["t5"])
    assert te2.t5 is None
    torch.testing.assert_close(te2.encode(PROMPTS)[0][:, :77], te1.encode(PROMPTS)[0][:, :77], rtol=0, atol=1e-6)


def test_bad_paths_are_clear_errors(world, tmp_path):
    with pytest.raises(FileNotFoundError, match="not a folder"):
        load_text_encoders(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="clip_l.safetensors"):
        load_text_encoders(tmp_path)
    bad = tmp_path / "text_encoders"
    bad.mkdir()
    sd = {k: v for k, v in world["models"][0].state_dict().items() if "layers.1.mlp" not in k}
    save_file({k: v.contiguous() for k, v in sd.items()}, bad / "clip_l.safetensors")
    save_file({k: v.contiguous() for k, v in world["models"][1].state_dict().items()}, bad / "clip_g.safetensors")
    with pytest.raises(ValueError, match="missing keys.*layers.1.mlp"):
        load_text_encoders(bad, tokenizer_path=world["root"])


@pytest.mark.parametrize("source", ["root", "single_files"])
def test_building_blocks(world, source):
    # the pipeline root's configs use SD3's legacy eos_token_id=2 (pool at the largest id); single files get the
    # tokenizer's EOS id (pool at the first EOS): both pooling rules are checked
    te = world["te"]
    if source == "single_files":
        te = load_text_encoders(world["root"] / "text_encoders", t5=False, joint_dim=DIMS["t5"],
                                max_sequence_length=T5_LEN)
    assert (te.clip_l.text_model.eos_token_id == 2) == (source == "root")
    for name, model in (("clip_l", te.clip_l), ("clip_g", te.clip_g)):
        ids, content = te.tokenize(PROMPTS + [""], name)
        n = content.sum(-1)
        assert n[-1] == 0 and (n[:-1] > 0).all()
        tok = te.tokenizer_l if name == "clip_l" else te.tokenizer_g
        assert (ids[:, 0] == tok.bos_token_id).all() and not content[:, 0].any()
        assert (ids[torch.arange(len(ids)), n + 1] == tok.eos_token_id).all()       # EOS right after the content
        ref = model(input_ids=ids, output_hidden_states=True)
        hidden, pooled = te.clip_forward(te.token_embeddings(ids, name), ids, name)
        torch.testing.assert_close(hidden, ref.hidden_states[-2], rtol=0, atol=1e-6)
        torch.testing.assert_close(pooled, ref.text_embeds, rtol=0, atol=1e-6)
        S = int(n.max()) + 2                                  # cut after the last EOS: same pooled, same prefix
        h_cut, p_cut = te.clip_forward(te.token_embeddings(ids[:, :S], name), ids[:, :S], name)
        torch.testing.assert_close(p_cut, ref.text_embeds, rtol=0, atol=1e-5)
        torch.testing.assert_close(h_cut, ref.hidden_states[-2][:, :S], rtol=0, atol=1e-5)
    parts = te.encode_parts(PROMPTS)
    ctx, pooled = te.assemble((parts["clip_l"][0][:, None].expand(-1, 3, -1, -1), parts["clip_l"][1][:, None]),
                              tuple(x[:, None] for x in parts["clip_g"]), parts["t5"][:, None])
    ref = te.encode(PROMPTS)
    assert ctx.shape == (3, 3, 77 + T5_LEN, DIMS["t5"]) and torch.equal(ctx[:, 2], ref[0])
    assert torch.equal(pooled[:, 1], ref[1])


def test_over_long_prompt_warns_once(world):
    long = " ".join(["red circle"] * 60)
    with pytest.warns(UserWarning, match="truncated") as rec:
        ctx, _ = world["te"].encode([long, "a red circle"])
    assert sum("truncated" in str(r.message) for r in rec) == 1
    ids, content = world["te"].tokenize([long])
    assert content.sum() == 75 and ids[0, -1] == world["te"].tokenizer_l.eos_token_id


# ---- perturbations ---------------------------------------------------------------------------------------------

QUICK = dict(num_variants=4, steps=40)


def test_only_content_positions_and_norm_bound(world):
    te = world["te"]
    out = learn_perturbations(te, PROMPTS, **QUICK, delta_max=0.05)
    delta = out.stats["delta"]["clip_l"]
    _, content = te.tokenize(PROMPTS)
    norms = delta.norm(dim=-1)                                              # (P, K-1, 77)
    assert norms.max() <= 0.05 * (1 + 1e-5)
    assert (norms[~content[:, None].expand_as(norms)] == 0).all()
    assert (norms[content[:, None].expand_as(norms)] > 1e-4).all()          # every content token moved
    assert out.context.shape == (3, 4, 77 + T5_LEN, DIMS["t5"]) and out.pooled.shape == (3, 4, 192)
    assert torch.isfinite(out.context).all()


def test_only_clip_l_slice_changes(world):
    te = world["te"]
    ctx0, pooled0 = te.encode(PROMPTS)
    out = learn_perturbations(te, PROMPTS, **QUICK)
    dl = DIMS["clip_l"]
    assert torch.equal(out.context[:, 0], ctx0) and torch.equal(out.pooled[:, 0], pooled0)
    diff_c = (out.context[:, 1:] - ctx0[:, None]).abs()
    diff_p = (out.pooled[:, 1:] - pooled0[:, None]).abs()
    assert diff_c[..., :77, :dl].amax(dim=(-1, -2)).min() > 1e-4            # every variant's CLIP-L part changed
    assert diff_c[..., :77, dl:].max() == 0 and diff_c[..., 77:, :].max() == 0
    assert diff_p[..., :dl].amax(-1).min() > 1e-4 and diff_p[..., dl:].max() == 0
    both = learn_perturbations(te, PROMPTS, **QUICK, encoders=("clip_l", "clip_g"))
    diff_c = (both.context[:, 1:] - ctx0[:, None]).abs()
    assert diff_c[..., :77, dl:dl + DIMS["clip_g"]].amax(dim=(-1, -2)).min() > 1e-4
    assert diff_c[..., :77, dl + DIMS["clip_g"]:].max() == 0 and diff_c[..., 77:, :].max() == 0
    assert set(both.stats["per_encoder"]) == {"clip_l", "clip_g"}


def test_loss_decreases_and_reaches_anchor_band(world):
    # A setting where the band is the optimum: Eq. 12 is an L1 term (slope 1 per variant), so it holds the variants at
    # cos μ−ε only while λ_div·2μ/(K−2) < 1 (see perturb.py); with Table 3's λ_div = 50 diversity wins until the
    # norm bound binds.
    # The tiny tower also needs larger steps and a looser norm bound than CLIP-L to move its pooled embedding that far.
    out = learn_perturbations(world["te"], PROMPTS, num_variants=6, steps=300, lr=3e-2, delta_max=4.0, lambda_div=0.5)
    st = out.stats
    hist = st["L_emb_history"]
    assert (st["L_emb"] < hist[0] - 0.5).all() and (hist[-20:].mean(0) < hist[:20].mean(0)).all()
    cos = st["cos_to_anchor"]
    assert ((cos - 0.8).abs() <= 0.01 + 0.005).all(), cos
    assert (st["L_div_history"][0] > 0.99).all()                               # σ_init tiny: variants start ≈ anchor
    assert (st["mean_pairwise_cos"] < 0.7).all(), st["mean_pairwise_cos"]


def test_default_settings_decrease_loss(world):
    out = learn_perturbations(world["te"], PROMPTS[:1], num_variants=12, steps=100)
    hist = out.stats["L_emb_history"][:, 0]
    assert out.stats["L_emb"][0] < hist[0] and hist[-1] < hist[0]
    assert out.stats["cos_to_anchor"].shape == (1, 11) and out.stats["mean_pairwise_cos"].shape == (1,)


def test_batched_equals_per_prompt_and_deterministic(world):
    # float64 encoders: at σ_init = 1e-4 the first Adam steps are ≈ lr·sign(grad), and in float32 the gradient's
    # rounding noise (cosines near 1) flips the sign of some tiny components, so float32 batched and single runs differ
    # by more than rounding (still deterministic for a given batch); float64 shows the prompts are truly independent.
    te = world["te"]
    te64 = TextEncoders(copy.deepcopy(te.clip_l).double(), copy.deepcopy(te.clip_g).double(), te.tokenizer_l,
                        te.tokenizer_g, joint_dim=DIMS["t5"], max_sequence_length=T5_LEN)
    batch = learn_perturbations(te64, PROMPTS, **QUICK, seed=3)
    assert batch.context.dtype == torch.float64 and batch.stats["delta"]["clip_l"].dtype == torch.float64
    for i, p in enumerate(PROMPTS):
        one = learn_perturbations(te64, [p], **QUICK, seed=3)
        torch.testing.assert_close(one.context[0], batch.context[i], rtol=0, atol=1e-9)
        torch.testing.assert_close(one.stats["delta"]["clip_l"][0], batch.stats["delta"]["clip_l"][i],
                                   rtol=0, atol=1e-9)
    first = learn_perturbations(te, PROMPTS, **QUICK, seed=3)
    again = learn_perturbations(te, PROMPTS, **QUICK, seed=3)
    assert torch.equal(again.context, first.context) and torch.equal(again.pooled, first.pooled)
    other = learn_perturbations(te, PROMPTS, **QUICK, seed=4)
    assert not torch.equal(other.pooled, first.pooled)


def test_empty_prompt_gives_original_and_warns(world):
    te = world["te"]
    with pytest.warns(UserWarning, match="no content tokens"):
        out = learn_perturbations(te, ["", "a red circle"], **QUICK)
    assert torch.equal(out.context[0, 1:], out.context[0, :1].expand(3, -1, -1))
    assert torch.equal(out.pooled[0, 1:], out.pooled[0, :1].expand(3, -1))
    torch.testing.assert_close(out.context[0, 0], te.encode([""])[0][0], rtol=0, atol=1e-6)
    assert torch.isfinite(out.context).all() and all(torch.isfinite(v).all() for k, v in out.stats.items()
                                                     if k in ("L_div", "L_anc", "cos_to_anchor"))
    assert (out.pooled[1, 1:] != out.pooled[1, :1]).any()


def test_k1_and_k2(world):
    te = world["te"]
    out = learn_perturbations(te, PROMPTS, num_variants=1)
    ctx0, pooled0 = te.encode(PROMPTS)
    assert out.context.shape == (3, 1, 77 + T5_LEN, DIMS["t5"]) and torch.equal(out.context[:, 0], ctx0)
    assert torch.equal(out.pooled[:, 0], pooled0)
    two = learn_perturbations(te, PROMPTS, num_variants=2, steps=10)
    assert two.context.shape[1] == 2 and (two.stats["L_div"] == 0).all()
    with pytest.raises(ValueError, match="num_variants"):
        learn_perturbations(te, PROMPTS, num_variants=0)
    with pytest.raises(ValueError, match="encoders"):
        learn_perturbations(te, PROMPTS, encoders=("t5",))


def test_cache_reuses_delta(world):
    te, cache = world["te"], PerturbationCache()
    first = learn_perturbations(te, PROMPTS[:2], **QUICK, cache=cache)
    assert len(cache) == 2 and not first.stats["cached"].any()
    second = learn_perturbations(te, PROMPTS, **QUICK, cache=cache)
    assert second.stats["cached"].tolist() == [True, True, False] and len(cache) == 3
    torch.testing.assert_close(second.context[:2], first.context, rtol=0, atol=1e-5)
    assert torch.isnan(second.stats["L_emb_history"][:, :2]).all()
    learn_perturbations(te, PROMPTS[:1], **QUICK, cache=cache, seed=1)       # other settings: a miss
    assert len(cache) == 4


def test_embedding_losses_formula():
    e = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])
    anc = torch.tensor([[1.0, 0.0]])
    L_div, L_anc, cos = embedding_losses(e, anc, mu=0.8, eps=0.01)
    c = 2 ** -0.5
    torch.testing.assert_close(L_div, torch.tensor([(0 + c + c) * 2 / 6]))
    torch.testing.assert_close(cos, torch.tensor([[1.0, 0.0, c]]))
    torch.testing.assert_close(L_anc, torch.tensor([(0.2 - 0.01) + (0.8 - 0.01) + (0.8 - c - 0.01)]))


# ---- not a test: Δ-optimisation cost at the real CLIP-L shape ---------------------------------------------------

BENCH_PROMPTS = ["a photo of a red circle", "a photo of two blue squares", "a photo of a green triangle left of a "
                 "yellow circle", "a photo of three small purple hexagons", "a photo of an orange square above a "
                 "white star", "a photo of a big black circle and a small pink triangle", "a photo of four cyan "
                 "stars", "a photo of a brown square right of a gray circle"]


def bench_delta_cost(steps=20, threads=2, num_variants=12, batches=(1, 8), device="cpu"):
    """Time Phase I with a random CLIP-L of the real SD3 shape (768 wide, 12 layers, 12 heads, quick_gelu, vocab
    49408, projection 768); a word-level CLIP tokenizer (one token per word, as CLIP's BPE gives for these prompts),
    a tiny CLIP-G and no T5 (run once per call, not per step). Runs `steps` steps and extrapolates to 300."""
    import time
    torch.set_num_threads(threads)
    words = sorted({w for p in BENCH_PROMPTS for w in p.split()})
    vocab = {c: i for i, c in enumerate(string.ascii_lowercase)}
    vocab.update({c + "</w>": 26 + i for i, c in enumerate(string.ascii_lowercase)})
    merges = []
    for w in words:
        cur = list(w[:-1]) + [w[-1] + "</w>"]
        while len(cur) > 1:
            if (cur[0], cur[1]) not in merges:
                merges.append((cur[0], cur[1]))
            vocab.setdefault(cur[0] + cur[1], len(vocab))
            cur = [cur[0] + cur[1]] + cur[2:]
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = 49406, 49407
    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    assert len(tok(BENCH_PROMPTS[0])["input_ids"]) == len(BENCH_PROMPTS[0].split()) + 2
    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                         num_attention_heads=12, max_position_embeddings=77, projection_dim=768,
                         hidden_act="quick_gelu", bos_token_id=0, eos_token_id=2, pad_token_id=1)
    torch.manual_seed(0)
    clip_l = CLIPTextModelWithProjection(cfg).eval()
    tok_g = clip_tokenizer("!")
    clip_g = tiny_clip(tok_g, 64, "gelu", 1)
    te = TextEncoders(clip_l, clip_g, tok, tok_g, joint_dim=4096).to(device)
    a, b = torch.randn(2048, 768), torch.randn(768, 768)
    t0 = time.perf_counter()
    for _ in range(20):
        a @ b
    print(f"same-run reference: fp32 matmul {2 * 2048 * 768 * 768 * 20 / (time.perf_counter() - t0) / 1e9:.0f} GFLOP/s")
    learn_perturbations(te, BENCH_PROMPTS[:1], num_variants=num_variants, steps=2)         # warm-up
    for P in batches:
        out = learn_perturbations(te, BENCH_PROMPTS[:P], num_variants=num_variants, steps=steps)
        per_step, fixed = out.stats["time_optimize_s"] / steps, out.stats["time_s"] - out.stats["time_optimize_s"]
        tokens = (out.stats["num_content_tokens"] + 2).tolist()
        fwd = 2 * (num_variants - 1) * P * max(tokens) * 12 * (12 * 768 ** 2)      # matmul FLOPs, cut batch
        total = 300 * per_step + fixed
        print(f"P={P} K={num_variants} tokens/prompt={tokens}: {per_step * 1e3:.0f} ms/step over {steps} steps, "
              f"fixed {fixed:.1f}s (encode + final 77-token forward) -> 300 steps ≈ {total:.0f}s "
              f"({total / P:.0f}s per prompt), {threads} threads on {device}; ≈{fwd / 1e9:.0f} GFLOP forward per "
              f"step, {2 * fwd / per_step / 1e9:.0f} GFLOP/s fwd+bwd (input grads only)")


if __name__ == "__main__":
    import sys
    bench_delta_cost(steps=int(sys.argv[1]) if len(sys.argv) > 1 else 20,
                     threads=int(sys.argv[2]) if len(sys.argv) > 2 else 2)
