"""
E²PO Phase I: learn K−1 perturbations of the prompt's CLIP-L content-token embeddings (paper Sec. 4.2, Eq. 9–12).

For each prompt p: E = CLIP-L's static token embeddings (77×d, before position embeddings), I = the content positions
(no BOS, EOS, padding). Each perturbation δ_k ∈ R^{|I|×d}, k = 1..K−1, starts N(0, σ_init²) (Eq. 9) and is added at I
(Eq. 10). e_k = pooled projected CLIP embedding of Ẽ_k, e_anc that of E. Adam minimises, for T_emb steps,
    L_emb = λ_div·L_div + L_anc,   L_div = mean_{i≠j} cos(e_i, e_j)  (Eq. 11),
    L_anc = Σ_k max(0, |cos(e_k, e_anc) − μ| − ε)  (Eq. 12),
and after every step each δ_k,j is clipped to norm ≤ ‖δ‖max. C_opt_k is the full SD3 conditioning (context, pooled)
with the perturbed CLIP-L and the unchanged CLIP-G and T5 parts; [:, 0] is C_orig.

    python perturb.py --prompt "a photo of a red circle" --num_variants 12            # default world's encoders
    python perturb.py --prompt "..." --weights path/to/sd3.5_medium --device cuda      # real encoders (T5 not needed)

    from perturb import learn_perturbations
    out = learn_perturbations(text_encoders, prompts, num_variants=12)
    out.context, out.pooled      # (P,K,S,4096), (P,K,2048); [:, 0] = C_orig

All prompts and all variants are optimised together: one batched CLIP forward/backward per step. The loss is summed
over prompts, so every prompt gets exactly the gradient it would get alone (Adam is elementwise): a batch gives the
per-prompt results. Δ's initial noise is drawn from a generator seeded by (seed, encoder, prompt), so results do not
depend on the batch a prompt is in. Caveat: at σ_init = 1e-4 all variants start at cos ≈ 1, where the gradient is
tiny and its float32 rounding noise (which depends on batch shapes) flips the sign of some components in Adam's
first, sign-like steps; float32 batched and single-prompt runs are therefore equally good but not equal (they agree
to ~1e-9 with float64 encoders). A given call is deterministic for a seed.

Where this departs from / adds to the paper:
- Eq. 11 and Eq. 12 run over the K−1 perturbed variants (Algorithm 1), not K. With K = 2 there is no pair: L_div = 0.
- The optimisation forward is cut after the last EOS of the batch: CLIP's attention is causal and e is read at EOS,
  so the result is the same (up to float rounding) and Phase I is several times cheaper. The returned conditioning
  uses the full 77 tokens.
- encoders=("clip_l", "clip_g") (the paper's ablation) gives CLIP-G its own δ and its own L_emb (on CLIP-G's pooled
  embedding); the two are summed and optimised jointly; the top-level stats are CLIP-L's, stats["per_encoder"] both.
- A prompt without content tokens (e.g. "") has nothing to perturb: its variants equal C_orig (warning), no NaN.
- Note on Table 3: Eq. 12 is an L1 penalty of slope 1 per variant, while for variants spread evenly around the anchor
  at cosine μ, λ_div·∂L_div/∂cos(e_k, e_anc) ≈ λ_div·2μ/(K−2) (8 for λ_div = 50, K = 12). So the diversity term
  wins and variants go below μ−ε until ‖δ‖max binds: with Table 3's settings the norm bound, not L_anc, is what
  keeps them near the anchor. λ_div < (K−2)/(2μ) makes the band the optimum (test_e2po.py checks that regime).
- Δ is relearned every iteration (Algorithm 1), freshly seeded per step by train.py. Phase I is E²PO's extra cost (the
  paper's stated limitation); bench.py measures it per prompt.
"""

import argparse
import os
import sys
import time
import warnings
import zlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from configurator import user_errors
from model import DEFAULT_WEIGHTS, load_text_encoders

NUM_VARIANTS = 12     # K, counts the original prompt (K = 1: the DiffusionNFT baseline, no perturbation)
STEPS = 300           # T_emb
LR = 1e-3             # α_emb, Adam
SIGMA_INIT = 1e-4     # σ_init of Eq. 9
DELTA_MAX = 0.05      # ‖δ‖max, per content token
LAMBDA_DIV = 50.0     # λ_div
MU = 0.8              # anchor target cosine μ
EPS = 0.01            # anchor margin ε
ENCODERS = ("clip_l",)  # ("clip_l", "clip_g") = the paper's unstable ablation
SEED = 0


@dataclass
class Perturbed:
    context: torch.Tensor   # (P, K, S, joint_dim); [:, 0] is C_orig, [:, 1:] the C_opt_k
    pooled: torch.Tensor    # (P, K, p_l + p_g)
    stats: dict             # see learn_perturbations


def embedding_losses(e, e_anc, mu=MU, eps=EPS):
    """e (P,M,p) pooled variant embeddings, e_anc (P,p) -> L_div (P,), L_anc (P,), cos_to_anchor (P,M).

    L_div: mean cosine over the ordered pairs i≠j of the M variants (Eq. 11);
    L_anc: Σ_k |cos(e_k, e_anc) − μ|_ε (Eq. 12)."""
    dtype = torch.promote_types(e.dtype, torch.float32)
    e = F.normalize(e.to(dtype), dim=-1)
    anc = F.normalize(e_anc.to(dtype), dim=-1)
    cos_anc = (e * anc[:, None]).sum(-1)
    M = e.shape[1]
    if M > 1:
        gram = e @ e.transpose(1, 2)
        L_div = (gram.sum((1, 2)) - gram.diagonal(dim1=1, dim2=2).sum(-1)) / (M * (M - 1))
    else:
        L_div = e.new_zeros(e.shape[0])
    L_anc = ((cos_anc - mu).abs() - eps).clamp_min(0).sum(-1)
    return L_div, L_anc, cos_anc


def clip_token_norms_(delta, delta_max):
    """In place: scale every token vector δ_k,j (last dim) to norm ≤ delta_max."""
    norm = delta.norm(dim=-1, keepdim=True)
    delta.mul_((delta_max / norm.clamp_min(1e-12)).clamp(max=1.0))


def _init_delta(prompt, name, seed, content, M, d, sigma_init):
    """δ (M,S,d): N(0, σ_init²) at the content positions, zeros elsewhere; depends only on (seed, encoder, prompt)."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(f"{name}\0{prompt}".encode())) % 2**62)
    pos = content.nonzero().flatten().cpu()
    delta = torch.zeros(M, content.shape[0], d)
    delta[:, pos] = torch.randn(M, len(pos), d, generator=g) * sigma_init
    return delta


def _optimize(te, state, idx, encoders, steps, lr, delta_max, lambda_div, mu, eps):
    """Adam on the δ of prompts `idx` (all encoders, variants, prompts in one batched forward per encoder per step).
    Writes the result into state[name]["delta"]; returns {name: (L_div, L_anc) histories (steps, len(idx))}."""
    run = {}
    for name in encoders:
        s = state[name]
        n_tokens = s["content"][idx].sum(-1) + 2                 # BOS + content + EOS: EOS is at n_tokens-1
        S = int(n_tokens.max())
        ids, E = s["ids"][idx, :S], s["E"][idx, :S]
        with torch.no_grad():
            anchor = te.clip_forward(E, ids, name)[1]
        delta = s["delta"][idx, :, :S].clone().requires_grad_(True)
        run[name] = dict(ids=ids.repeat_interleave(s["M"], 0), E=E, mask=s["mask"][idx, :, :S], anchor=anchor,
                         delta=delta)
    opt = torch.optim.Adam([r["delta"] for r in run.values()], lr=lr)
    hist = {name: ([], []) for name in encoders}
    for _ in range(steps):
        total = 0.0
        for name, r in run.items():
            Pt, M, S, d = r["delta"].shape
            x = (r["E"][:, None] + r["delta"] * r["mask"]).reshape(Pt * M, S, d)   # Eq. 10
            e = te.clip_forward(x, r["ids"], name)[1].view(Pt, M, -1)
            L_div, L_anc, _ = embedding_losses(e, r["anchor"], mu, eps)
            total = total + (lambda_div * L_div + L_anc).sum()                    # sum over prompts: independent
            hist[name][0].append(L_div.detach())
            hist[name][1].append(L_anc.detach())
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        with torch.no_grad():
            for r in run.values():
                clip_token_norms_(r["delta"], delta_max)
    for name, r in run.items():
        d = r["delta"].detach()
        if not torch.isfinite(d).all():   # cannot happen with finite encoders (cosines use clamped norms)
            raise RuntimeError(f"non-finite perturbation for encoder {name}")
        state[name]["delta"][idx, :, :d.shape[2]] = d
    if not steps:
        return None
    return {name: (torch.stack(d), torch.stack(a)) for name, (d, a) in hist.items()}


def check_settings(prompts, num_variants, encoders, steps, lr, sigma_init, delta_max, eps):
    """learn_perturbations' own checks, callable before the text encoders load (the CLI does): ValueError."""
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts must be a non-empty list of strings")
    if int(num_variants) != num_variants or num_variants < 1:
        raise ValueError(f"num_variants must be an integer >= 1 (K counts the original), got {num_variants}")
    if not encoders or len(set(encoders)) != len(encoders) or not set(encoders) <= {"clip_l", "clip_g"}:
        raise ValueError(f"encoders must be a non-empty subset of ('clip_l', 'clip_g'), got {encoders}")
    if steps < 0 or lr <= 0 or sigma_init < 0 or delta_max <= 0 or eps < 0:
        raise ValueError(f"invalid settings: steps={steps}, lr={lr}, sigma_init={sigma_init}, "
                         f"delta_max={delta_max}, eps={eps}")


def learn_perturbations(text_encoders, prompts, num_variants=NUM_VARIANTS, steps=STEPS, lr=LR, sigma_init=SIGMA_INIT,
                        delta_max=DELTA_MAX, lambda_div=LAMBDA_DIV, mu=MU, eps=EPS, encoders=ENCODERS, seed=SEED):
    """Learn K−1 = num_variants−1 perturbations per prompt -> Perturbed(context (P,K,S,D), pooled (P,K,p), stats).

    stats (tensors on the CPU; the top-level values belong to encoders[0], per_encoder[name] has the same per encoder):
      L_div, L_anc, L_emb (P,)       final values (with the returned, norm-clipped Δ, full 77 tokens)
      cos_to_anchor (P,K−1)          cos(e_k, e_anc);  mean_pairwise_cos (P,)  mean cos(e_i, e_j), i≠j (= L_div)
      L_div_history, L_anc_history, L_emb_history (steps, P)   before each Adam step
      delta {name: (P,K−1,77,d)}     the learned Δ (zero outside the content positions)
      num_content_tokens (P,), time_s (whole call), time_optimize_s (the Adam loop)
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    encoders = tuple(encoders)
    check_settings(prompts, num_variants, encoders, steps, lr, sigma_init, delta_max, eps)
    t0 = time.perf_counter()
    te = text_encoders
    P, M = len(prompts), int(num_variants) - 1
    parts = te.encode_parts(prompts)
    n_content = parts["content_mask"][encoders[0]].sum(-1).cpu()
    stats = dict(num_content_tokens=n_content)
    if M == 0:
        context, pooled = te.assemble(*(tuple(x[:, None] for x in parts[n]) for n in ("clip_l", "clip_g")),
                                      parts["t5"][:, None])
        stats["time_s"] = time.perf_counter() - t0
        return Perturbed(context, pooled, stats)

    state = {}
    work = torch.promote_types(te.dtype, torch.float32)     # Δ, E and Adam in fp32 (fp64 if the encoders are)
    for name in encoders:
        ids, content = parts["input_ids"][name], parts["content_mask"][name]
        E = te.token_embeddings(ids, name).detach().to(work)
        delta = torch.stack([_init_delta(p, name, seed, content[i], M, E.shape[-1], sigma_init)
                             for i, p in enumerate(prompts)]).to(E)
        clip_token_norms_(delta, delta_max)
        state[name] = dict(ids=ids, content=content, E=E, mask=content[:, None, :, None].to(work), delta=delta, M=M)
    empty = [p for p, c in zip(prompts, parts["content_mask"]["clip_l"].sum(-1).tolist()) if c == 0]
    if empty:
        warnings.warn(f"{len(empty)} prompt(s) have no content tokens (e.g. {empty[0]!r}): "
                      f"their {M} variants equal the original", stacklevel=2)

    t_opt = time.perf_counter()
    hist = _optimize(te, state, torch.arange(P, device=te.device), encoders, steps, lr, delta_max, lambda_div, mu, eps)
    t_opt = time.perf_counter() - t_opt

    # final conditioning: full-length forward of the perturbed encoders, unchanged CLIP-G / T5 parts broadcast
    enc_parts, per_encoder = {}, {}
    for name in ("clip_l", "clip_g"):
        h0, p0 = parts[name]
        if name not in encoders:
            enc_parts[name] = (h0[:, None], p0[:, None])
            continue
        s = state[name]
        with torch.no_grad():
            x = (s["E"][:, None] + s["delta"] * s["mask"]).reshape(P * M, *s["E"].shape[1:])
            h, p = te.clip_forward(x, s["ids"].repeat_interleave(M, 0), name)
        h, p = h.view(P, M, *h.shape[1:]), p.view(P, M, -1)
        none = s["content"].sum(-1) == 0                                   # nothing to perturb: exactly C_orig
        h = torch.where(none[:, None, None, None], h0[:, None].to(h), h)
        p = torch.where(none[:, None, None], p0[:, None].to(p), p)
        L_div, L_anc, cos = embedding_losses(p, p0, mu, eps)
        per_encoder[name] = dict(L_div=L_div.cpu(), L_anc=L_anc.cpu(), L_emb=(lambda_div * L_div + L_anc).cpu(),
                                 cos_to_anchor=cos.cpu(), mean_pairwise_cos=L_div.cpu())
        enc_parts[name] = (torch.cat([h0[:, None], h.to(h0)], 1), torch.cat([p0[:, None], p.to(p0)], 1))
    context, pooled = te.assemble(enc_parts["clip_l"], enc_parts["clip_g"], parts["t5"][:, None])

    for name in encoders:
        st = per_encoder[name]
        for key, j in (("L_div_history", 0), ("L_anc_history", 1)):
            st[key] = hist[name][j].cpu().float() if hist is not None else torch.zeros(0, P)
        st["L_emb_history"] = lambda_div * st["L_div_history"] + st["L_anc_history"]
    stats.update(per_encoder[encoders[0]])
    stats["per_encoder"] = per_encoder
    stats["delta"] = {n: (state[n]["delta"] * state[n]["mask"]).cpu() for n in encoders}
    stats["time_s"], stats["time_optimize_s"] = time.perf_counter() - t0, t_opt
    return Perturbed(context, pooled, stats)


def prompt_cosines(text_encoders, prompts, encoder="clip_l"):
    """(P,P) cosine between the original prompts' pooled `encoder` embeddings: the yardstick for μ. Whether a variant
    at cos μ to its anchor is a small step or a large one depends on how far apart related prompts sit: in the shapes
    world "a photo of a red circle" is at 0.975 to "a photo of two red circles" and at −0.19 to "a photo of a blue
    circle" (python perturb.py --prompt ... --prompt ... prints this matrix)."""
    e = F.normalize(text_encoders.encode_parts(prompts)[encoder][1].float(), dim=-1)
    return e @ e.T


def main(argv=None):
    ap = argparse.ArgumentParser(description="E²PO Phase I: learn and inspect embedding perturbations")
    ap.add_argument("--prompt", action="append", required=True, help="repeat for several prompts (one batch)")
    ap.add_argument("--num_variants", type=int, default=NUM_VARIANTS)
    ap.add_argument("--weights", default=None,
                    help=f"pipeline root or text_encoders/ folder (default {DEFAULT_WEIGHTS})")
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument("--lr", type=float, default=LR)
    ap.add_argument("--sigma_init", type=float, default=SIGMA_INIT)
    ap.add_argument("--delta_max", type=float, default=DELTA_MAX)
    ap.add_argument("--lambda_div", type=float, default=LAMBDA_DIV)
    ap.add_argument("--mu", type=float, default=MU)
    ap.add_argument("--eps", type=float, default=EPS)
    ap.add_argument("--encoders", default=",".join(ENCODERS), help="clip_l or clip_l,clip_g")
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--t5", action="store_true", help="also load T5 (not needed for the diagnostics)")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    weights = args.weights or DEFAULT_WEIGHTS
    with user_errors("perturb.py"):      # a mistake in the arguments: one line, exit status 2
        if not os.path.isdir(weights):
            if args.weights is None:
                raise FileNotFoundError(f"the default world's encoders ({DEFAULT_WEIGHTS}) are not there yet; build "
                                        "them with `python data/shapes/pretrain.py`, or pass --weights PATH (a "
                                        "pipeline root or text_encoders/ folder)")
            raise NotADirectoryError(f"--weights {weights} is not a folder")
        check_settings(args.prompt, args.num_variants, tuple(args.encoders.split(",")), args.steps, args.lr,
                       args.sigma_init, args.delta_max, args.eps)
    te = load_text_encoders(weights, dtype=getattr(torch, args.dtype), device=args.device, t5=args.t5)
    out = learn_perturbations(te, args.prompt, num_variants=args.num_variants, steps=args.steps, lr=args.lr,
                              sigma_init=args.sigma_init, delta_max=args.delta_max, lambda_div=args.lambda_div,
                              mu=args.mu, eps=args.eps, encoders=tuple(args.encoders.split(",")), seed=args.seed)
    st = out.stats
    print(f"context {tuple(out.context.shape)}  pooled {tuple(out.pooled.shape)}  {st['time_s']:.2f}s")
    for i, prompt in enumerate(args.prompt):
        print(f"\n[{i}] {prompt!r}  content tokens: {int(st['num_content_tokens'][i])}")
        if args.num_variants == 1:
            print("  K=1: no variants (DiffusionNFT baseline)")
            continue
        if args.steps:
            first = st["L_emb_history"][0, i].item()
            print(f"  L_emb {first:.4f} (step 0) -> {st['L_emb'][i].item():.4f} (final)")
        print(f"  L_div {st['L_div'][i].item():.4f}   L_anc {st['L_anc'][i].item():.4f}   "
              f"mean pairwise cos {st['mean_pairwise_cos'][i].item():.4f}")
        cos = " ".join(f"{c:.3f}" for c in st["cos_to_anchor"][i].tolist())
        print(f"  cos to anchor (target {args.mu}±{args.eps}): {cos}")
        for name, d in st["delta"].items():
            print(f"  {name} max token ‖δ‖ {d[i].norm(dim=-1).max().item():.4f} (bound {args.delta_max})")
    if len(args.prompt) > 1:   # how far apart the prompts themselves are, in the space where μ is measured
        encoder = args.encoders.split(",")[0]
        cos = prompt_cosines(te, args.prompt, encoder)
        print(f"\npooled {encoder} cos between the original prompts (μ = {args.mu} is measured on this scale):")
        for i in range(len(args.prompt)):
            print(f"  [{i}] " + " ".join(f"{c:.3f}" for c in cos[i].tolist()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
