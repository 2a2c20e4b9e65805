"""
model.py: Stable Diffusion 3 / 3.5 in plain PyTorch: the MMDiT, the 16-channel VAE, the text stack (CLIP-L, CLIP-G
and T5-XXL through transformers), loaders for the checkpoints people actually have, and a hand-written LoRA with
several named adapters. Sections, top to bottom: constants, MMDiT, VAE, text stack, loaders, LoRA.

    import model
    mmdit = model.load_mmdit("sd3.5_medium.safetensors", dtype=torch.bfloat16, device="cuda")
    vae = model.load_vae("stable-diffusion-3.5-medium/", dtype=torch.float32, device="cuda")
    te = model.load_text_encoders("stable-diffusion-3.5-medium/")   # pipeline root; t5=False skips T5-XXL
    context, pooled = te.encode(["a photo of a cat"])  # (B, 77+256, 4096), (B, 2048)
    v = mmdit(x, sigma, context, pooled)        # x (B,16,h,w), sigma (B,) in [0,1] -> velocity (B,16,h,w)
    model.add_lora(mmdit, rank=32, alpha=64, adapter="policy")
    model.copy_adapter(mmdit, "policy", "old")   # frozen copy for rollouts
    with model.use_adapter(mmdit, None): ...     # reference model = LoRA off
    model.save_lora(mmdit, "lora.safetensors")  # loads in diffusers' StableDiffusion3Pipeline.load_lora_weights

A path is an original single file (`sd3.5_medium.safetensors`: `model.diffusion_model.*`, `first_stage_model.*`;
other prefixes such as text encoders are ignored), a diffusers folder (`transformer/`, `vae/`: one safetensors file
or shards with an index) or a pipeline root (then its `transformer/` resp. `vae/` is used). The architecture is
read from tensor shapes and from which keys exist; nothing is taken from config.json.

Loading builds the model on the meta device and assigns the tensors read one at a time (converted to `dtype` on
the way), so the peak is one model plus the file's memory-mapped pages, never two materialised copies (the
diffusers layout briefly adds the q/k/v weights while fusing them). The key set is checked exactly against the
architecture inferred from the shapes: missing, unexpected and mis-shaped keys are a ValueError naming them and the
file. Text encoders come from a pipeline root (text_encoder*/, tokenizer*/) or from the single files
`text_encoders/clip_l.safetensors`, `clip_g.safetensors`, `t5xxl_fp16.safetensors` (transformers key layout, config
inferred from shapes with head_dim 64; CLIP-L quick_gelu, CLIP-G gelu) with the tokenizer folders beside them.

`TextEncoders.encode` equals diffusers' `StableDiffusion3Pipeline.encode_prompt(...)` (guidance off, clip_skip None):
CLIP-L and CLIP-G take the tokenizer's model_max_length tokens (77 for SD3; padded, truncated with a warning) and
give their penultimate hidden state (no final LayerNorm) and the projected EOS state; context = [CLIP-L ‖ CLIP-G on
channels, zero-padded to the joint dim] ++ T5's last hidden state (no attention mask, as diffusers), and without T5
the T5 part is max_sequence_length zero tokens, exactly as diffusers does when text_encoder_3 is None; pooled =
CLIP-L ‖ CLIP-G text_embeds. Building blocks for perturb.py (Phase I perturbs CLIP-L's static token embeddings):

    ids, content = te.tokenize(prompts, "clip_l")       # (B,77) ids, (B,77) bool: not BOS / EOS / padding
    E = te.token_embeddings(ids, "clip_l")               # static embeddings, before position embeddings
    hidden, pooled = te.clip_forward(E + delta, ids, "clip_l")   # differentiable w.r.t. the embeddings
    parts = te.encode_parts(prompts); parts["clip_l"] = (hidden, pooled)
    context, pooled = te.assemble(parts["clip_l"], parts["clip_g"], parts["t5"])   # broadcasts leading dims

Public API: MMDiTConfig (presets SD3_MEDIUM, SD35_MEDIUM, SD35_LARGE), MMDiT, mmdit_config_from_state_dict,
load_mmdit, VAE, load_vae, pixels_per_token, mmdit_to_diffusers / mmdit_from_diffusers, vae_to_diffusers /
vae_from_diffusers, save_diffusers; TextEncoders, load_text_encoders, clip_from_state_dict, t5_from_state_dict; LoRA:
LORA_TARGETS, add_lora, set_adapter, use_adapter, active_adapter, adapters, lora_parameters, lora_state_dict,
load_lora_state_dict, copy_adapter, save_lora, load_lora. Pass the unwrapped module (not DDP's wrapper) to the LoRA
functions so layer names carry no "module." prefix.

Module attribute names are the original single-file keys (Stability-AI's mmditx.py / ldm VAE), so loading that
layout is a prefix strip; the diffusers layout goes through `mmdit_to_diffusers` / `vae_to_diffusers` and their
inverses. Tests: `python -m pytest -q test_e2po.py -k model` (parity with diffusers on tiny random weights).

Where this departs from the references:
- MMDiT.forward takes sigma in [0,1] (diffusers takes timestep = 1000*sigma) and casts its inputs to the weights'
  dtype; v comes back in the dtype of x. Joint attention puts context tokens first (as mmditx; diffusers puts them
  last; attention has no mask, so the result is the same up to summation order).
- head_dim is not stored in the weights without qk-norm; it defaults to 64 (every SD3 model) and can be overridden.
- Loaded models are frozen (requires_grad False) and in eval mode: this project trains LoRA adapters only.
- LoRA: A ~ N(0, std 1/rank) (peft's init_lora_weights="gaussian"; peft's default is Kaiming-uniform), B = 0,
  scale alpha/rank. A fused qkv layer carries three independent (A, B) pairs, exactly peft's to_q/to_k/to_v LoRA.
  save_lora folds alpha/rank into B, since diffusers loads a file without alpha as alpha = rank (scale 1).
- VAE.encode returns the posterior mean (no sampling), already shifted and scaled into model space.
- transformers' CLIPTextModel.forward takes no `inputs_embeds`, so `clip_forward` runs the embeddings, the encoder
  layers (explicit causal mask), the final LayerNorm, the EOS pooling and the projection itself, exactly as
  transformers does (tested equal to the normal forward). The mask is causal, so the pooled EOS state depends only on
  positions up to the EOS token: `clip_forward` accepts sequences cut after the last EOS (perturb.py's Phase I uses
  this to run several times cheaper); the penultimate states of the kept positions are unchanged too.
- A clip_l single file without `text_projection.weight` gets an identity projection (the SD3 reference code pools
  CLIP-L without projection), with a warning; any other missing or unexpected text key is an error.
"""

import json
import logging
import math
import os
import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.utils.checkpoint import checkpoint
from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel


# ----------------------------------------------------------------------------------------------------------------
# constants

MMDIT_PREFIX = "model.diffusion_model."      # original single file
VAE_PREFIX = "first_stage_model."
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model"  # .safetensors or .safetensors.index.json
DEFAULT_HEAD_DIM = 64                        # every SD3/SD3.5 MMDiT; not visible in weights without qk-norm
NORM_EPS = 1e-6                              # LayerNorm, RMSNorm and GroupNorm epsilon
VAE_SCALE, VAE_SHIFT = 1.5305, 0.0609        # latents = (z - shift) * scale
VAE_GROUPS = 32
CLIP_MAX_LENGTH = 77                         # SD3's CLIP length; the tokenizer's model_max_length decides (as diffusers)
T5_MAX_LENGTH = 256                          # diffusers' default max_sequence_length for SD3
JOINT_DIM = 4096                             # T5-XXL d_model = MMDiT context dim (used without T5 and without a transformer config)
TEXT_HEAD_DIM = 64                           # CLIP-L/G and T5-XXL attention head size (to infer head counts from shapes)
CLIP_ACT = {"clip_l": "quick_gelu", "clip_g": "gelu"}   # OpenAI CLIP-L vs OpenCLIP bigG
CLIP_FILES = {"clip_l": "clip_l.safetensors", "clip_g": "clip_g.safetensors"}
T5_FILES = ("t5xxl_fp16.safetensors", "t5xxl.safetensors")
CLIP_FOLDERS = {"clip_l": ("text_encoder", "tokenizer"), "clip_g": ("text_encoder_2", "tokenizer_2")}
T5_FOLDERS = ("text_encoder_3", "tokenizer_3")
# the default pipeline: the shapes world's tiny SD3 (built by data/shapes/pretrain.py)
DEFAULT_WEIGHTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "shapes", "sd3_tiny")
PIPELINE_NOTES = "e2po.json"   # in a pipeline root: conventions its weights were trained with, e.g. the world's
                               # {"max_sequence_length": 8} (zero T5 tokens); see pipeline_notes
LORA_TARGETS = ("x_block.attn.qkv", "x_block.attn.proj", "context_block.attn.qkv", "context_block.attn.proj")


@dataclass
class MMDiTConfig:
    in_channels: int = 16
    out_channels: int = 16
    patch_size: int = 2
    hidden_size: int = 1536
    depth: int = 24
    num_heads: int = 24
    mlp_ratio: float = 4.0
    context_dim: int = 4096
    pooled_dim: int = 2048
    timestep_dim: int = 256
    pos_embed_max_size: int = 384
    qk_norm: bool = True
    dual_attention_layers: tuple = tuple(range(13))

    @property
    def head_dim(self):
        return self.hidden_size // self.num_heads


SD3_MEDIUM = MMDiTConfig(hidden_size=1536, depth=24, num_heads=24, pos_embed_max_size=192, qk_norm=False,
                         dual_attention_layers=())
SD35_MEDIUM = MMDiTConfig(hidden_size=1536, depth=24, num_heads=24, pos_embed_max_size=384, qk_norm=True,
                          dual_attention_layers=tuple(range(13)))
SD35_LARGE = MMDiTConfig(hidden_size=2432, depth=38, num_heads=38, pos_embed_max_size=192, qk_norm=True,
                         dual_attention_layers=())

log = logging.getLogger(__name__)
# ----------------------------------------------------------------------------------------------------------------
# MMDiT building blocks


def modulate(x, shift, scale):
    """adaLN: x·(1 + scale) + shift, per sample; one fused kernel and one temporary (addcmul)."""
    return torch.addcmul(shift[:, None], x, 1 + scale[:, None])


def gated_add(x, gate, y):
    """Residual with adaLN-zero gate: x + gate·y in one kernel."""
    return torch.addcmul(x, gate[:, None], y)


def layer_norm(x):
    return F.layer_norm(x, x.shape[-1:], eps=NORM_EPS)


def timestep_embedding(t, dim, max_period=10000.0):
    """Sinusoidal embedding [cos, sin] of t (B,) in float32 (mmditx / diffusers flip_sin_to_cos=True)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def sincos_pos_embed_2d(dim, grid):
    """(grid*grid, dim) fixed 2D sin-cos positions, row-major; half the channels encode the row, half the column."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    pos = torch.arange(grid, dtype=torch.float64)[:, None] * omega[None]  # (grid, dim/4)
    axis = torch.cat([torch.sin(pos), torch.cos(pos)], dim=1)              # (grid, dim/2)
    rows = axis[:, None].expand(grid, grid, -1)
    cols = axis[None, :].expand(grid, grid, -1)
    return torch.cat([rows, cols], dim=-1).reshape(grid * grid, dim).float()


class RMSNorm(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # the statistic in float32 without a float32 copy of x (vector_norm accumulates in float32); the scaling in
        # x's dtype, so half-precision q/k never make a float32 round trip (F.rms_norm and diffusers' form both
        # upcast x: two extra passes over q and k, and slower on CPU)
        norm = torch.linalg.vector_norm(x, 2, dim=-1, keepdim=True, dtype=torch.float32)
        y = x * torch.rsqrt(norm.square() / x.shape[-1] + NORM_EPS).to(x.dtype)
        w = self.weight.to(x.dtype)
        return y * w if self.weight.requires_grad and torch.is_grad_enabled() else y.mul_(w)


GELU_K1 = 2 * math.sqrt(2 / math.pi)       # tanh-GELU as x·sigmoid(K1·x + K3·x³), since 0.5·(1 + tanh(z)) = sigmoid(2z)
GELU_K3 = GELU_K1 * 0.044715


def gelu_tanh(x):
    """GELU (tanh approximation). On CPU without autograd, for half-precision or cache-sized tensors: the sigmoid
    form in place, 1.7x faster there in bf16 (CPU tanh is slow; equal up to float rounding). Otherwise F.gelu: on GPUs
    it is one fused kernel, and for large fp32 CPU tensors its single pass beats four passes through memory."""
    if x.device.type != "cpu" or torch.is_grad_enabled() or (x.dtype == torch.float32 and x.numel() > 2 ** 20):
        return F.gelu(x, approximate="tanh")
    return torch.addcmul(x.new_tensor(GELU_K1), x, x, value=GELU_K3).mul_(x).sigmoid_().mul_(x)


MLP_CHUNK = 256     # CPU inference: tokens per feed-forward chunk (0 = off)


class MLP(nn.Module):
    """fc1 → tanh-GELU → fc2. On CPU without autograd the tokens go through in chunks of MLP_CHUNK: the 4x-wide
    hidden activation then stays cache-sized and is reused from the heap instead of being a fresh multi-MB
    allocation per call (whose page faults cost as much as the GELU itself at SD3.5-M size). Rows are
    independent, so the result is the same."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        if MLP_CHUNK and x.shape[-2] > MLP_CHUNK and x.device.type == "cpu" and not torch.is_grad_enabled():
            return torch.cat([self.fc2(gelu_tanh(self.fc1(chunk))) for chunk in x.split(MLP_CHUNK, dim=-2)], dim=-2)
        return self.fc2(gelu_tanh(self.fc1(x)))


class Embedder(nn.Module):
    """Linear -> SiLU -> Linear, keys mlp.0 / mlp.2 (timestep and pooled-text embedders)."""

    def __init__(self, dim_in, dim):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim_in, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, x):
        return self.mlp(x)


class PatchEmbed(nn.Module):
    def __init__(self, patch, cin, dim):
        super().__init__()
        self.proj = nn.Conv2d(cin, dim, patch, stride=patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2).contiguous()  # (B, h*w, D), row major; contiguous, else
        # every residual add downstream inherits the conv's channel-major layout (strided, several times slower)


class Attention(nn.Module):
    """Fused qkv (one matmul), optional RMS qk-norm over head_dim, output projection (absent if pre_only)."""

    def __init__(self, dim, num_heads, qk_norm, pre_only=False):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        if not pre_only:
            self.proj = nn.Linear(dim, dim)
        if qk_norm:
            self.ln_q, self.ln_k = RMSNorm(dim // num_heads), RMSNorm(dim // num_heads)

    def pre(self, x):
        """x (B,L,D) -> q, k, v each (B,H,L,Dh)."""
        B, L, _ = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        if hasattr(self, "ln_q"):
            q, k = self.ln_q(q), self.ln_k(k)
        return q, k, v

    def forward(self, x):  # plain self-attention (attn2 of MMDiT-X)
        return self.proj(attention(*self.pre(x)))


def heads_to_tokens(t):
    """(B,H,L,Dh) -> (B,L,H*Dh), contiguous (one copy)."""
    B, H, L, Dh = t.shape
    return t.transpose(1, 2).reshape(B, L, H * Dh)


def attention(q, k, v):
    return heads_to_tokens(F.scaled_dot_product_attention(q, k, v))


class DismantledBlock(nn.Module):
    """One stream (image or context) of a joint block: adaLN-zero modulation, attention pre/post, MLP.

    The adaLN chunks are (shift, scale, gate) for attention, then for the MLP, then for attn2 (MMDiT-X).
    pre_only (context stream of the last block): only (shift, scale) and qkv; its output is discarded."""

    def __init__(self, dim, num_heads, mlp_hidden, qk_norm, pre_only=False, dual=False):
        super().__init__()
        self.pre_only, self.dual = pre_only, dual
        self.attn = Attention(dim, num_heads, qk_norm, pre_only)
        if dual:
            self.attn2 = Attention(dim, num_heads, qk_norm)
        if not pre_only:
            self.mlp = MLP(dim, mlp_hidden)
        self.n_mod = 2 if pre_only else (9 if dual else 6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, self.n_mod * dim))

    def pre_attention(self, x, c):
        mods = self.adaLN_modulation(c).chunk(self.n_mod, dim=-1)
        h = layer_norm(x)
        qkv = self.attn.pre(modulate(h, mods[0], mods[1]))
        x2 = modulate(h, mods[6], mods[7]) if self.dual else None
        return qkv, (x, mods, x2)

    def post_attention(self, attn_out, state):
        x, mods, x2 = state
        gate_msa, shift_mlp, scale_mlp, gate_mlp = mods[2:6]
        x = gated_add(x, gate_msa, self.attn.proj(attn_out))
        if self.dual:
            x = gated_add(x, mods[8], self.attn2(x2))
        return gated_add(x, gate_mlp, self.mlp(modulate(layer_norm(x), shift_mlp, scale_mlp)))


class JointBlock(nn.Module):
    def __init__(self, dim, num_heads, mlp_hidden, qk_norm, pre_only, dual):
        super().__init__()
        self.context_block = DismantledBlock(dim, num_heads, mlp_hidden, qk_norm, pre_only=pre_only)
        self.x_block = DismantledBlock(dim, num_heads, mlp_hidden, qk_norm, dual=dual)

    def forward(self, context, x, c):
        (cq, ck, cv), c_state = self.context_block.pre_attention(context, c)
        (xq, xk, xv), x_state = self.x_block.pre_attention(x, c)
        n = context.shape[1]
        out = F.scaled_dot_product_attention(torch.cat([cq, xq], 2), torch.cat([ck, xk], 2), torch.cat([cv, xv], 2))
        x = self.x_block.post_attention(heads_to_tokens(out[:, :, n:]), x_state)
        if self.context_block.pre_only:
            return None, x
        return self.context_block.post_attention(heads_to_tokens(out[:, :, :n]), c_state), x


class FinalLayer(nn.Module):
    def __init__(self, dim, patch, cout):
        super().__init__()
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))  # (shift, scale)
        self.linear = nn.Linear(dim, patch * patch * cout)

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(layer_norm(x), shift, scale))


class MMDiT(nn.Module):
    """SD3 / SD3.5 MMDiT (MMDiT-X dual attention in cfg.dual_attention_layers). forward(x, sigma, context, pooled)."""

    def __init__(self, cfg: MMDiTConfig):
        super().__init__()
        if cfg.hidden_size % cfg.num_heads:
            raise ValueError(f"hidden_size {cfg.hidden_size} is not divisible by num_heads {cfg.num_heads}")
        self.cfg, D = cfg, cfg.hidden_size
        self.grad_checkpointing = False
        self.x_embedder = PatchEmbed(cfg.patch_size, cfg.in_channels, D)
        self.register_buffer("pos_embed", torch.zeros(1, cfg.pos_embed_max_size ** 2, D))
        self.t_embedder = Embedder(cfg.timestep_dim, D)
        self.y_embedder = Embedder(cfg.pooled_dim, D)
        self.context_embedder = nn.Linear(cfg.context_dim, D)
        mlp_hidden = int(round(D * cfg.mlp_ratio))
        self.joint_blocks = nn.ModuleList([
            JointBlock(D, cfg.num_heads, mlp_hidden, cfg.qk_norm, i == cfg.depth - 1, i in cfg.dual_attention_layers)
            for i in range(cfg.depth)])
        self.final_layer = FinalLayer(D, cfg.patch_size, cfg.out_channels)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """For training from scratch (loading overwrites all of it): DiT's init, i.e. xavier Linears with zero bias,
        N(0, 0.02) embedders, adaLN-zero (every block starts as the identity) and a zero output layer, plus fixed
        2D sin-cos positions (SD3 stores its positions in the checkpoint)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.x_embedder.proj.weight.view(self.cfg.hidden_size, -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        for emb in (self.t_embedder, self.y_embedder):
            nn.init.normal_(emb.mlp[0].weight, std=0.02)
            nn.init.normal_(emb.mlp[2].weight, std=0.02)
        for m in self.modules():
            if hasattr(m, "adaLN_modulation"):
                nn.init.zeros_(m.adaLN_modulation[1].weight)
                nn.init.zeros_(m.adaLN_modulation[1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        if self.pos_embed.device.type != "meta":
            self.pos_embed.copy_(sincos_pos_embed_2d(self.cfg.hidden_size, self.cfg.pos_embed_max_size)[None])

    @property
    def dtype(self):
        return self.pos_embed.dtype

    def cropped_pos_embed(self, h, w):
        """Centre crop of the (max x max) position grid to the (h x w) patch grid."""
        m = self.cfg.pos_embed_max_size
        if h > m or w > m:
            raise ValueError(f"latent grid {h}x{w} patches exceeds pos_embed_max_size {m}")
        top, left = (m - h) // 2, (m - w) // 2
        return self.pos_embed.view(1, m, m, -1)[:, top:top + h, left:left + w].reshape(1, h * w, -1)

    def forward(self, x, sigma, context, pooled):
        """x (B,C,H,W) latents, sigma (B,) or scalar in [0,1], context (B,S,context_dim), pooled (B,pooled_dim)."""
        out_dtype, dtype = x.dtype, self.dtype
        B, _, H, W = x.shape
        p = self.cfg.patch_size
        if H % p or W % p:
            raise ValueError(f"latent size {H}x{W} is not a multiple of patch size {p}")
        h, w = H // p, W // p
        x, context, pooled = x.to(dtype), context.to(dtype), pooled.to(dtype)
        sigma = torch.as_tensor(sigma, device=x.device).reshape(-1).expand(B)
        t = timestep_embedding(sigma.float() * 1000, self.cfg.timestep_dim).to(dtype)
        c = self.t_embedder(t) + self.y_embedder(pooled)
        x = self.x_embedder(x) + self.cropped_pos_embed(h, w).to(dtype)
        context = self.context_embedder(context)
        for block in self.joint_blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                context, x = checkpoint(block, context, x, c, use_reentrant=False)
            else:
                context, x = block(context, x, c)
        x = self.final_layer(x, c)  # (B, h*w, p*p*C)
        x = x.view(B, h, w, p, p, -1).permute(0, 5, 1, 3, 2, 4).reshape(B, -1, H, W)
        return x.to(out_dtype)


def mmdit_config_from_state_dict(sd, head_dim=None):
    """MMDiTConfig from an original-layout state dict (prefix stripped); values may be tensors or shapes."""
    shape = {k: tuple(v.shape) if hasattr(v, "shape") else tuple(v) for k, v in sd.items()}
    need = ["x_embedder.proj.weight", "pos_embed", "context_embedder.weight", "y_embedder.mlp.0.weight",
            "t_embedder.mlp.0.weight", "final_layer.linear.weight", "joint_blocks.0.x_block.mlp.fc1.weight"]
    missing = [k for k in need if k not in shape]
    if missing:
        raise ValueError(f"not an SD3 MMDiT state dict: missing {missing}")
    D, cin, p, _ = shape["x_embedder.proj.weight"]
    m = math.isqrt(shape["pos_embed"][1])
    if m * m != shape["pos_embed"][1]:
        raise ValueError(f"pos_embed has {shape['pos_embed'][1]} positions, not a square grid")
    depth = 1 + max(int(k.split(".")[1]) for k in shape if k.startswith("joint_blocks."))
    qk_norm = "joint_blocks.0.x_block.attn.ln_q.weight" in shape
    if qk_norm:  # RMSNorm over head_dim: the weights tell us
        if head_dim not in (None, shape["joint_blocks.0.x_block.attn.ln_q.weight"][0]):
            raise ValueError(f"head_dim={head_dim} contradicts ln_q of size "
                             f"{shape['joint_blocks.0.x_block.attn.ln_q.weight'][0]}")
        head_dim = shape["joint_blocks.0.x_block.attn.ln_q.weight"][0]
    head_dim = head_dim or DEFAULT_HEAD_DIM
    if D % head_dim:
        raise ValueError(f"hidden size {D} is not divisible by head_dim {head_dim}")
    dual = tuple(i for i in range(depth) if f"joint_blocks.{i}.x_block.attn2.qkv.weight" in shape)
    return MMDiTConfig(in_channels=cin, out_channels=shape["final_layer.linear.weight"][0] // (p * p), patch_size=p,
                       hidden_size=D, depth=depth, num_heads=D // head_dim,
                       mlp_ratio=shape["joint_blocks.0.x_block.mlp.fc1.weight"][0] / D,
                       context_dim=shape["context_embedder.weight"][1], pooled_dim=shape["y_embedder.mlp.0.weight"][1],
                       timestep_dim=shape["t_embedder.mlp.0.weight"][1], pos_embed_max_size=m, qk_norm=qk_norm,
                       dual_attention_layers=dual)

# ----------------------------------------------------------------------------------------------------------------
# VAE (ldm layout: the original single-file keys)


def group_norm(c):
    return nn.GroupNorm(VAE_GROUPS, c, eps=NORM_EPS)


class ResnetBlock(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.norm1, self.conv1 = group_norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = group_norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        inplace = not torch.is_grad_enabled()  # SiLU's backward needs its input: in place only without autograd
        h = self.conv1(F.silu(self.norm1(x), inplace=inplace))
        h = self.conv2(F.silu(self.norm2(h), inplace=inplace))
        return h.add_(self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x)  # conv2 keeps no output


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1-conv projections."""

    def __init__(self, c):
        super().__init__()
        self.norm = group_norm(c)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (f(h).flatten(2).transpose(1, 2)[:, None] for f in (self.q, self.k, self.v))  # (B,1,HW,C)
        h = F.scaled_dot_product_attention(q, k, v)[:, 0].transpose(1, 2).reshape(B, C, H, W)
        return x + self.proj_out(h)


class Down(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Up(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Mid(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.block_1, self.attn_1, self.block_2 = ResnetBlock(c, c), AttnBlock(c), ResnetBlock(c, c)

    def forward(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    def __init__(self, ch, latent_channels, num_res=2):
        super().__init__()
        self.conv_in = nn.Conv2d(3, ch[0], 3, padding=1)
        self.down = nn.ModuleList()
        for i, c in enumerate(ch):
            level = nn.Module()
            level.block = nn.ModuleList([ResnetBlock(ch[max(i - 1, 0)] if j == 0 else c, c) for j in range(num_res)])
            if i < len(ch) - 1:
                level.downsample = Down(c)
            self.down.append(level)
        self.mid = Mid(ch[-1])
        self.norm_out, self.conv_out = group_norm(ch[-1]), nn.Conv2d(ch[-1], 2 * latent_channels, 3, padding=1)

    def forward(self, x):
        x = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                x = block(x)
            if hasattr(level, "downsample"):
                x = level.downsample(x)
        return self.conv_out(F.silu(self.norm_out(self.mid(x))))


class Decoder(nn.Module):
    def __init__(self, ch, latent_channels, num_res=3):
        super().__init__()
        self.conv_in = nn.Conv2d(latent_channels, ch[-1], 3, padding=1)
        self.mid = Mid(ch[-1])
        self.up = nn.ModuleList()
        for i, c in enumerate(ch):  # up[i] works at ch[i]; applied from the last level down to 0
            level = nn.Module()
            cin = ch[min(i + 1, len(ch) - 1)]
            level.block = nn.ModuleList([ResnetBlock(cin if j == 0 else c, c) for j in range(num_res)])
            if i > 0:
                level.upsample = Up(c)
            self.up.append(level)
        self.norm_out, self.conv_out = group_norm(ch[0]), nn.Conv2d(ch[0], 3, 3, padding=1)

    def forward(self, z):
        x = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            for block in level.block:
                x = block(x)
            if hasattr(level, "upsample"):
                x = level.upsample(x)
        return self.conv_out(F.silu(self.norm_out(x)))


def _conv_layout(x):
    """Channels-last on CPU: oneDNN's convolutions then skip a layout reorder around every conv (~1.5x faster
    decode, measured by bench.py); the layout propagates through conv, GroupNorm, SiLU and nearest upsampling.
    Elsewhere unchanged (not measured on GPUs)."""
    return x.contiguous(memory_format=torch.channels_last) if x.device.type == "cpu" else x


class VAE(nn.Module):
    """SD3 16-channel autoencoder. Images in [0,1] at the API; latents scaled and shifted (model space).
    SD3 has four levels (8x downsampling); `factor` reads the downsampling from the levels of any config."""

    def __init__(self, block_out_channels=(128, 256, 512, 512), latent_channels=16):
        super().__init__()
        self.block_out_channels, self.latent_channels = tuple(block_out_channels), latent_channels
        self.encoder = Encoder(self.block_out_channels, latent_channels)
        self.decoder = Decoder(self.block_out_channels, latent_channels)

    @property
    def dtype(self):
        return self.encoder.conv_in.weight.dtype

    @property
    def factor(self):
        """Pixels per latent side: 2^(levels - 1), 8 for SD3."""
        return 2 ** (len(self.block_out_channels) - 1)

    def encode(self, images):
        """images (B,3,H,W) in [0,1] -> latents (B,16,H/f,W/f), f = factor: posterior mean, (z - 0.0609) * 1.5305."""
        moments = self.encoder(_conv_layout(images.to(self.dtype) * 2 - 1))
        mean = moments[:, :self.latent_channels]
        return (mean - VAE_SHIFT) * VAE_SCALE

    def decode(self, latents, slice_size=None):
        """latents (B,16,h,w) -> images (B,3,f·h,f·w) in [0,1]; slice_size decodes that many at a time."""
        if slice_size is not None and latents.shape[0] > slice_size:
            return torch.cat([self.decode(chunk) for chunk in latents.split(slice_size)])
        x = self.decoder(_conv_layout(latents.to(self.dtype) / VAE_SCALE + VAE_SHIFT))
        return (x / 2 + 0.5).clamp(0, 1).contiguous()


def vae_config_from_state_dict(sd):
    shape = {k: tuple(v.shape) if hasattr(v, "shape") else tuple(v) for k, v in sd.items()}
    if "decoder.conv_in.weight" not in shape or "encoder.conv_in.weight" not in shape:
        raise ValueError("not an SD3 VAE state dict: missing encoder.conv_in.weight / decoder.conv_in.weight")
    levels = 1 + max(int(k.split(".")[2]) for k in shape if k.startswith("encoder.down."))
    ch = tuple(shape[f"encoder.down.{i}.block.0.conv1.weight"][0] for i in range(levels))
    return dict(block_out_channels=ch, latent_channels=shape["decoder.conv_in.weight"][1])

# ----------------------------------------------------------------------------------------------------------------
# text stack: CLIP-L, CLIP-G (and T5) through transformers, assembled as SD3 does


def _cast(x, like):
    return x.to(dtype=like.dtype, device=like.device)


def _as_list(prompts):
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts must be a string or a non-empty list of strings")
    return prompts


class TextEncoders(nn.Module):
    """CLIP-L + CLIP-G (+ optional T5) with their tokenizers; frozen and always in eval mode.

    Attributes: clip_l, clip_g (CLIPTextModelWithProjection), t5 (T5EncoderModel or None), tokenizer_l,
    tokenizer_g, tokenizer_t5, max_sequence_length (T5 tokens), joint_dim (context channels).
    Encoder names used by the building blocks: "clip_l", "clip_g".
    """

    def __init__(self, clip_l, clip_g, tokenizer_l, tokenizer_g, t5=None, tokenizer_t5=None,
                 max_sequence_length=T5_MAX_LENGTH, joint_dim=None):
        super().__init__()
        if t5 is not None and tokenizer_t5 is None:
            raise ValueError("TextEncoders: a T5 encoder needs tokenizer_t5")
        if t5 is not None and joint_dim is not None and joint_dim != t5.config.d_model:
            raise ValueError(f"TextEncoders: joint_dim={joint_dim} but T5 d_model is {t5.config.d_model}")
        self.clip_l, self.clip_g, self.t5 = clip_l, clip_g, t5
        self.tokenizer_l, self.tokenizer_g, self.tokenizer_t5 = tokenizer_l, tokenizer_g, tokenizer_t5
        self.max_sequence_length = int(max_sequence_length)
        # CLIP length as diffusers takes it: the tokenizer's model_max_length (77 for SD3; unset -> 77)
        length = getattr(tokenizer_l, "model_max_length", None)
        self.clip_length = int(length) if length and length <= clip_l.config.max_position_embeddings \
            else CLIP_MAX_LENGTH
        self.joint_dim = int(t5.config.d_model if t5 is not None else (joint_dim or JOINT_DIM))
        clip_dim = clip_l.config.hidden_size + clip_g.config.hidden_size
        if clip_dim > self.joint_dim:
            raise ValueError(f"TextEncoders: CLIP-L+CLIP-G width {clip_dim} exceeds the joint dim {self.joint_dim}")
        self.requires_grad_(False)
        self.eval()

    def train(self, mode=True):  # frozen: never leave eval mode (T5 has dropout)
        return super().train(False)

    @property
    def dtype(self):
        return self.clip_l.dtype

    @property
    def device(self):
        return self.clip_l.device

    def _parts(self, encoder):
        if encoder == "clip_l":
            return self.clip_l, self.tokenizer_l
        if encoder == "clip_g":
            return self.clip_g, self.tokenizer_g
        raise ValueError(f"unknown CLIP encoder {encoder!r}; expected 'clip_l' or 'clip_g'")

    # ---- building blocks -------------------------------------------------------------------------------------

    def _tokenize(self, prompts, encoder):
        """-> (input_ids (B,77), content_mask (B,77) bool, indices of truncated prompts)."""
        _, tok = self._parts(encoder)
        full = tok(prompts, padding=False, truncation=True, max_length=10**6)["input_ids"]
        truncated = [i for i, ids in enumerate(full) if len(ids) > self.clip_length]
        enc = tok(prompts, padding="max_length", max_length=self.clip_length, truncation=True, return_tensors="pt")
        ids, attn = enc["input_ids"], enc["attention_mask"].bool()
        n = attn.sum(-1, keepdim=True)                       # BOS + content + EOS
        pos = torch.arange(ids.shape[1])[None]
        content = (pos >= 1) & (pos < n - 1)                 # no BOS, EOS, padding
        return ids.to(self.device), content.to(self.device), truncated

    def tokenize(self, prompts, encoder="clip_l"):
        """CLIP tokens of `prompts` for "clip_l" / "clip_g": (input_ids (B,77) long, content_mask (B,77) bool).

        content_mask is True at the content tokens (Eq. 10's index set I: no BOS, EOS or padding).
        Prompts longer than 77 tokens are truncated (keeping the final EOS) with one warning per call."""
        prompts = _as_list(prompts)
        ids, content, truncated = self._tokenize(prompts, encoder)
        self._warn_truncated(prompts, truncated, [])
        return ids, content

    def token_embeddings(self, input_ids, encoder="clip_l"):
        """Static token embeddings (B,S,d) of `encoder`, before position embeddings (the paper's E)."""
        model, _ = self._parts(encoder)
        return model.text_model.embeddings.token_embedding(input_ids)

    def clip_forward(self, inputs_embeds, input_ids, encoder="clip_l"):
        """CLIP text tower from static token embeddings: -> (penultimate hidden (B,S,d), pooled projected (B,p)).

        inputs_embeds (B,S,d) replaces token_embedding(input_ids); input_ids (B,S) only decide the EOS position
        for pooling (transformers' rule: argmax id if config.eos_token_id == 2, else the first eos_token_id).
        S may be less than 77 if every row still holds its EOS (causal attention: earlier positions are exact).
        Differentiable w.r.t. inputs_embeds; equals model(input_ids, output_hidden_states=True)
        (hidden_states[-2], text_embeds) when inputs_embeds = token_embeddings(input_ids)."""
        model, _ = self._parts(encoder)
        tm = model.text_model
        x = tm.embeddings(inputs_embeds=inputs_embeds.to(model.dtype))
        S = x.shape[1]
        mask = torch.full((S, S), torch.finfo(x.dtype).min, dtype=x.dtype, device=x.device).triu(1)[None, None]
        penultimate = x
        for i, layer in enumerate(tm.encoder.layers):
            x = layer(x, mask)
            if i == len(tm.encoder.layers) - 2:
                penultimate = x
        x = tm.final_layer_norm(x)
        ids = input_ids.to(device=x.device, dtype=torch.int)
        if tm.eos_token_id == 2:   # legacy configs (SD3's): EOS is the largest id
            eos = ids.argmax(dim=-1)
        else:
            eos = (ids == tm.eos_token_id).int().argmax(dim=-1)
        pooled = model.text_projection(x[torch.arange(x.shape[0], device=x.device), eos])
        return penultimate, pooled

    @torch.no_grad()
    def encode_clip(self, prompts, encoder="clip_l", _ids=None):
        """(penultimate hidden (B,77,d), pooled projected (B,p)) of one CLIP, no perturbation."""
        prompts = _as_list(prompts)
        ids = _ids if _ids is not None else self.tokenize(prompts, encoder)[0]
        model, _ = self._parts(encoder)
        out = model(input_ids=ids, output_hidden_states=True)
        return out.hidden_states[-2], out.text_embeds

    @torch.no_grad()
    def encode_t5(self, prompts, _warn=True):
        """T5 part of the context (B, max_sequence_length, joint_dim); zeros without T5 (as diffusers)."""
        prompts = _as_list(prompts)
        B, T = len(prompts), self.max_sequence_length
        if self.t5 is None:
            return torch.zeros(B, T, self.joint_dim, dtype=self.dtype, device=self.device)
        tok = self.tokenizer_t5
        ids = tok(prompts, padding="max_length", max_length=T, truncation=True, add_special_tokens=True,
                  return_tensors="pt")["input_ids"].to(self.t5.device)
        if _warn:
            full = tok(prompts, padding=False, truncation=True, max_length=10**6)["input_ids"]
            self._warn_truncated(prompts, [], [i for i, x in enumerate(full) if len(x) > T])
        return self.t5(input_ids=ids)[0]

    @torch.no_grad()
    def encode_parts(self, prompts):
        """Per-encoder outputs: {"clip_l": (hidden, pooled), "clip_g": (hidden, pooled), "t5": hidden,
        "input_ids": {"clip_l": ids, "clip_g": ids}, "content_mask": {...}}. One truncation warning per call."""
        prompts = _as_list(prompts)
        parts, ids, content, trunc = {}, {}, {}, set()
        for name in ("clip_l", "clip_g"):
            ids[name], content[name], tr = self._tokenize(prompts, name)
            trunc.update(tr)
            parts[name] = self.encode_clip(prompts, name, _ids=ids[name])
        t5_trunc = []
        if self.t5 is not None:
            full = self.tokenizer_t5(prompts, padding=False, truncation=True, max_length=10**6)["input_ids"]
            t5_trunc = [i for i, x in enumerate(full) if len(x) > self.max_sequence_length]
        self._warn_truncated(prompts, sorted(trunc), t5_trunc)
        parts["t5"] = self.encode_t5(prompts, _warn=False)
        parts["input_ids"], parts["content_mask"] = ids, content
        return parts

    def assemble(self, clip_l, clip_g, t5):
        """(context (..., 77+T, joint_dim), pooled (..., p_l+p_g)) from per-encoder parts.

        clip_l, clip_g: (hidden (...,77,d), pooled (...,p)); t5: (...,T,joint_dim). Leading dims broadcast, so a
        perturbed CLIP-L of shape (P,K,77,d) combines with unchanged CLIP-G / T5 parts of shape (P,1,...)."""
        (hl, pl), (hg, pg) = clip_l, clip_g
        lead = torch.broadcast_shapes(hl.shape[:-2], hg.shape[:-2], t5.shape[:-2], pl.shape[:-1], pg.shape[:-1])
        hl, hg = hl.expand(*lead, *hl.shape[-2:]), hg.expand(*lead, *hg.shape[-2:])
        clip = torch.cat([hl, _cast(hg, hl)], dim=-1)
        clip = nn.functional.pad(clip, (0, self.joint_dim - clip.shape[-1]))
        context = torch.cat([clip, _cast(t5, clip).expand(*lead, *t5.shape[-2:])], dim=-2)
        pooled = torch.cat([pl.expand(*lead, pl.shape[-1]), _cast(pg, pl).expand(*lead, pg.shape[-1])], dim=-1)
        return context, pooled

    @torch.no_grad()
    def encode(self, prompts):
        """(context (B, 77+T, joint_dim), pooled (B, p_l+p_g)) == diffusers SD3 encode_prompt (no CFG)."""
        parts = self.encode_parts(prompts)
        return self.assemble(parts["clip_l"], parts["clip_g"], parts["t5"])

    def _warn_truncated(self, prompts, clip_idx, t5_idx):
        msgs = []
        if clip_idx:
            msgs.append(f"{len(clip_idx)} prompt(s) exceed CLIP's {self.clip_length} tokens and were truncated "
                        f"(first: {prompts[clip_idx[0]][:80]!r})")
        if t5_idx:
            msgs.append(f"{len(t5_idx)} prompt(s) exceed T5's max_sequence_length={self.max_sequence_length} "
                        f"and were truncated (first: {prompts[t5_idx[0]][:80]!r})")
        if msgs:
            warnings.warn("; ".join(msgs), stacklevel=3)


# ----------------------------------------------------------------------------------------------------------------
# loaders. First the layout conversion: ours (original single-file keys) <-> diffusers

# per-block module renames (ours -> diffusers); fused qkv become three modules
_BLOCK_RENAMES = [
    ("x_block.attn.qkv", ("attn.to_q", "attn.to_k", "attn.to_v")),
    ("context_block.attn.qkv", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")),
    ("x_block.attn2.qkv", ("attn2.to_q", "attn2.to_k", "attn2.to_v")),
    ("x_block.attn.proj", ("attn.to_out.0",)),
    ("context_block.attn.proj", ("attn.to_add_out",)),
    ("x_block.attn2.proj", ("attn2.to_out.0",)),
    ("x_block.attn.ln_q", ("attn.norm_q",)), ("x_block.attn.ln_k", ("attn.norm_k",)),
    ("context_block.attn.ln_q", ("attn.norm_added_q",)), ("context_block.attn.ln_k", ("attn.norm_added_k",)),
    ("x_block.attn2.ln_q", ("attn2.norm_q",)), ("x_block.attn2.ln_k", ("attn2.norm_k",)),
    ("x_block.adaLN_modulation.1", ("norm1.linear",)),
    ("context_block.adaLN_modulation.1", ("norm1_context.linear",)),
    ("x_block.mlp.fc1", ("ff.net.0.proj",)), ("x_block.mlp.fc2", ("ff.net.2",)),
    ("context_block.mlp.fc1", ("ff_context.net.0.proj",)), ("context_block.mlp.fc2", ("ff_context.net.2",)),
]
_GLOBAL_RENAMES = [
    ("x_embedder.proj", "pos_embed.proj"), ("context_embedder", "context_embedder"),
    ("t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_1"),
    ("t_embedder.mlp.2", "time_text_embed.timestep_embedder.linear_2"),
    ("y_embedder.mlp.0", "time_text_embed.text_embedder.linear_1"),
    ("y_embedder.mlp.2", "time_text_embed.text_embedder.linear_2"),
    ("final_layer.linear", "proj_out"), ("final_layer.adaLN_modulation.1", "norm_out.linear"),
]


def mmdit_module_to_diffusers(name):
    """Our module path -> tuple of diffusers module paths (three for a fused qkv)."""
    m = re.fullmatch(r"joint_blocks\.(\d+)\.(.+)", name)
    if m:
        for ours, theirs in _BLOCK_RENAMES:
            if m.group(2) == ours:
                return tuple(f"transformer_blocks.{m.group(1)}.{t}" for t in theirs)
    for ours, theirs in _GLOBAL_RENAMES:
        if name == ours:
            return (theirs,)
    raise KeyError(f"no diffusers name for MMDiT module {name!r}")


def _swap_halves(t):
    """(shift, scale) <-> (scale, shift) along dim 0: diffusers' AdaLayerNormContinuous chunks (scale, shift)."""
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def _needs_swap(name, depth):
    return name.startswith("final_layer.adaLN_modulation") or \
        name.startswith(f"joint_blocks.{depth - 1}.context_block.adaLN_modulation")


def mmdit_to_diffusers(sd, head_dim=None, sample_size=None):
    """Our MMDiT state dict -> (diffusers SD3Transformer2DModel state dict, its config.json dict)."""
    cfg = mmdit_config_from_state_dict(sd, head_dim)
    out = {"pos_embed.pos_embed": sd["pos_embed"]}
    for k, v in sd.items():
        if k == "pos_embed":
            continue
        module, param = k.rsplit(".", 1)
        if _needs_swap(k, cfg.depth):
            v = _swap_halves(v)
        names = mmdit_module_to_diffusers(module)
        for name, part in zip(names, v.chunk(len(names), dim=0)):
            out[f"{name}.{param}"] = part
    config = {"_class_name": "SD3Transformer2DModel", "sample_size": sample_size or min(128, cfg.pos_embed_max_size),
              "patch_size": cfg.patch_size, "in_channels": cfg.in_channels, "out_channels": cfg.out_channels,
              "num_layers": cfg.depth, "attention_head_dim": cfg.head_dim, "num_attention_heads": cfg.num_heads,
              "joint_attention_dim": cfg.context_dim, "caption_projection_dim": cfg.hidden_size,
              "pooled_projection_dim": cfg.pooled_dim, "pos_embed_max_size": cfg.pos_embed_max_size,
              "dual_attention_layers": list(cfg.dual_attention_layers),
              "qk_norm": "rms_norm" if cfg.qk_norm else None}
    return out, config


def mmdit_from_diffusers(dsd):
    """Diffusers SD3Transformer2DModel state dict -> ours. Unknown keys are kept as they are (the key check names
    them); a q/k/v triple is fused only when all three parts are present."""
    inverse = {t: (ours, j, len(theirs)) for ours, theirs in _BLOCK_RENAMES for j, t in enumerate(theirs)}
    glob = {theirs: ours for ours, theirs in _GLOBAL_RENAMES}
    out, parts = {}, {}  # parts: our key -> (number of parts, {index: (diffusers key, tensor)})
    for k, v in dsd.items():
        module, param = k.rsplit(".", 1) if "." in k else (k, "")
        m = re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)", module)
        if k == "pos_embed.pos_embed":
            out["pos_embed"] = v
        elif module in glob:
            out[f"{glob[module]}.{param}"] = v
        elif m and m.group(2) in inverse:
            ours, j, n = inverse[m.group(2)]
            parts.setdefault(f"joint_blocks.{m.group(1)}.{ours}.{param}", (n, {}))[1][j] = (k, v)
        else:
            out[k] = v
    for k, (n, got) in parts.items():
        if len(got) == n:
            out[k] = torch.cat([got[j][1] for j in range(n)], dim=0)
        else:  # incomplete q/k/v: keep diffusers names so the key check reports them
            out.update(dict(got.values()))
    depth = 1 + max([int(k.split(".")[1]) for k in out if k.startswith("joint_blocks.")], default=-1)
    return {k: _swap_halves(v) if _needs_swap(k, depth) else v for k, v in out.items()}


def _vae_renames(levels):
    """(ours, diffusers) module-path prefix pairs for an SD3 VAE with `levels` resolution levels."""
    pairs = [("encoder.norm_out", "encoder.conv_norm_out"), ("decoder.norm_out", "decoder.conv_norm_out")]
    for part in ("encoder", "decoder"):
        pairs += [(f"{part}.mid.block_1", f"{part}.mid_block.resnets.0"),
                  (f"{part}.mid.block_2", f"{part}.mid_block.resnets.1"),
                  (f"{part}.mid.attn_1.norm", f"{part}.mid_block.attentions.0.group_norm"),
                  (f"{part}.mid.attn_1.q", f"{part}.mid_block.attentions.0.to_q"),
                  (f"{part}.mid.attn_1.k", f"{part}.mid_block.attentions.0.to_k"),
                  (f"{part}.mid.attn_1.v", f"{part}.mid_block.attentions.0.to_v"),
                  (f"{part}.mid.attn_1.proj_out", f"{part}.mid_block.attentions.0.to_out.0")]
    for i in range(levels):
        pairs += [(f"encoder.down.{i}.block", f"encoder.down_blocks.{i}.resnets"),
                  (f"encoder.down.{i}.downsample", f"encoder.down_blocks.{i}.downsamplers.0"),
                  (f"decoder.up.{i}.block", f"decoder.up_blocks.{levels - 1 - i}.resnets"),
                  (f"decoder.up.{i}.upsample", f"decoder.up_blocks.{levels - 1 - i}.upsamplers.0")]
    return pairs


def _rename_prefix(k, pairs):
    for a, b in pairs:
        if k.startswith(a + "."):
            return b + k[len(a):]
    return k


def _vae_convert(sd, pairs, to_diffusers):
    """Rename by prefix pairs; the mid attention's 1x1 convs (ours) are Linear layers in diffusers."""
    shortcut = (".nin_shortcut.", ".conv_shortcut.") if to_diffusers else (".conv_shortcut.", ".nin_shortcut.")
    out = {}
    for k, v in sd.items():
        nk = _rename_prefix(k, pairs).replace(*shortcut)
        diffusers_key = nk if to_diffusers else k
        if ".mid_block.attentions.0.to_" in diffusers_key and k.endswith(".weight"):
            v = v.flatten(1) if to_diffusers else v[:, :, None, None]
        out[nk] = v
    return out


def vae_to_diffusers(sd):
    """Our VAE state dict -> (diffusers AutoencoderKL state dict, its config.json dict)."""
    cfg = vae_config_from_state_dict(sd)
    n = len(cfg["block_out_channels"])
    config = {"_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3,
              "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
              "block_out_channels": list(cfg["block_out_channels"]), "layers_per_block": 2, "act_fn": "silu",
              "latent_channels": cfg["latent_channels"], "norm_num_groups": VAE_GROUPS, "sample_size": 1024,
              "scaling_factor": VAE_SCALE, "shift_factor": VAE_SHIFT, "use_quant_conv": False,
              "use_post_quant_conv": False, "force_upcast": True, "mid_block_add_attention": True}
    return _vae_convert(sd, _vae_renames(n), True), config


def vae_from_diffusers(dsd):
    levels = 1 + max([int(k.split(".")[2]) for k in dsd if k.startswith("encoder.down_blocks.")], default=0)
    pairs = [(b, a) for a, b in _vae_renames(levels)]
    return _vae_convert(dsd, pairs, False)

# ---- MMDiT and VAE ---------------------------------------------------------------------------------------------


def _weight_files(path, subfolder):
    """-> list of safetensors files for a single file, a diffusers folder or a pipeline root."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"weights not found: {path}")
    if os.path.isdir(path):
        if os.path.isdir(os.path.join(path, subfolder)):
            path = os.path.join(path, subfolder)
        single = os.path.join(path, DIFFUSERS_WEIGHTS + ".safetensors")
        index = os.path.join(path, DIFFUSERS_WEIGHTS + ".safetensors.index.json")
        if os.path.isfile(single):
            return [single]
        if os.path.isfile(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            files = [os.path.join(path, name) for name in sorted(set(weight_map.values()))]
            for fn in files:
                if not os.path.isfile(fn):
                    raise FileNotFoundError(f"shard {fn} listed in {index} is missing")
            return files
        raise FileNotFoundError(f"no {DIFFUSERS_WEIGHTS}.safetensors(.index.json) in {path} (nor in {subfolder}/); "
                                "only safetensors weights are read")
    return [path]


def _read_header(files):
    """-> {key: (file, shape)} from safetensors headers, without reading tensors."""
    index = {}
    for fn in files:
        try:
            with safe_open(fn, framework="pt") as f:
                for k in f.keys():
                    index[k] = (fn, tuple(f.get_slice(k).get_shape()))
        except Exception as e:
            raise ValueError(f"{fn} is not a readable safetensors file ({type(e).__name__}: {e})") from None
    return index


def _read_tensors(index, keys, dtype, device):
    """Read `keys` ({our name: file key}) one tensor at a time, converting each on the way (one copy in memory)."""
    out, by_file = {}, {}
    for ours, theirs in keys.items():
        by_file.setdefault(index[theirs][0], []).append((ours, theirs))
    for fn, items in by_file.items():
        with safe_open(fn, framework="pt") as f:
            for ours, theirs in items:
                t = f.get_tensor(theirs)
                converted = t.to(device=device, dtype=dtype)
                # a no-op .to() would leave the weight backed by the file's memory map: rewriting that file later
                # (a re-saved checkpoint) would then change or crash the loaded model, so take a private copy
                out[ours] = converted.clone() if converted is t else converted
    return out


def _check_keys(got, expected, what, source):
    """got / expected: {key: shape}. Raise ValueError naming missing, unexpected and mis-shaped keys."""
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    wrong = sorted(f"{k}: {tuple(got[k])} vs expected {tuple(expected[k])}"
                   for k in set(got) & set(expected) if tuple(got[k]) != tuple(expected[k]))
    if missing or unexpected or wrong:
        def show(xs):
            return ", ".join(xs[:20]) + (f" ... (+{len(xs) - 20} more)" if len(xs) > 20 else "")
        msg = [f"{what} weights in {source} do not match the architecture inferred from them:"]
        msg += [f"  missing keys: {show(missing)}"] if missing else []
        msg += [f"  unexpected keys: {show(unexpected)}"] if unexpected else []
        msg += [f"  shape mismatches: {show(wrong)}"] if wrong else []
        raise ValueError("\n".join(msg))


def _meta(shapes):
    return {k: torch.empty(s, device="meta") for k, s in shapes.items()}


def _load(path, subfolder, prefix, diffusers_marker, ours_marker, from_diffusers, to_diffusers, build, what,
          dtype, device):
    """Shared loader: resolve files, pick the layout, check keys against the inferred model, then load by assign."""
    files = _weight_files(path, subfolder)
    source = files[0] if len(files) == 1 else os.path.dirname(files[0])
    index = _read_header(files)
    if any(k.startswith(prefix) for k in index):  # original single file: take our prefix, ignore the rest
        keys = {k[len(prefix):]: k for k in index if k.startswith(prefix)}
        layout = "original"
    elif any(k.startswith(diffusers_marker) for k in index):
        keys, layout = {k: k for k in index}, "diffusers"
    elif any(k.startswith(ours_marker) for k in index):
        keys, layout = {k: k for k in index}, "original"
    else:
        raise ValueError(f"{source} holds no {what} weights (no keys starting with {prefix!r}, "
                         f"{diffusers_marker!r} or {ours_marker!r})")
    shapes = {k: index[v][1] for k, v in keys.items()}
    try:
        ours_shapes = from_diffusers(_meta(shapes)) if layout == "diffusers" else _meta(shapes)
        with torch.device("meta"):
            model = build(ours_shapes)
    except (ValueError, KeyError) as e:
        raise ValueError(f"{source}: cannot infer the {what} architecture: {e}") from None
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if layout == "diffusers":
        expected = {k: tuple(v.shape) for k, v in to_diffusers(_meta(expected))[0].items()}
    _check_keys(shapes, expected, what, source)
    sd = _read_tensors(index, keys, dtype, device)
    if layout == "diffusers":
        sd = from_diffusers(sd)
    model.load_state_dict(sd, strict=True, assign=True)
    return model.requires_grad_(False).eval()


def load_mmdit(path, dtype=torch.float32, device="cpu", head_dim=None) -> MMDiT:
    """MMDiT from an original single file, a diffusers transformer/ folder or a pipeline root (frozen, eval)."""
    def build(shapes):
        return MMDiT(mmdit_config_from_state_dict(shapes, head_dim))

    return _load(path, "transformer", MMDIT_PREFIX, "transformer_blocks.", "joint_blocks.", mmdit_from_diffusers,
                 lambda sd: mmdit_to_diffusers(sd, head_dim), build, "MMDiT", dtype, device)


def load_vae(path, dtype=torch.float32, device="cpu") -> VAE:
    """VAE from an original single file, a diffusers vae/ folder or a pipeline root (frozen, eval)."""
    return _load(path, "vae", VAE_PREFIX, "encoder.down_blocks.", "encoder.down.", vae_from_diffusers,
                 vae_to_diffusers, lambda s: VAE(**vae_config_from_state_dict(s)), "VAE", dtype, device)


def pipeline_notes(path):
    """The conventions a pipeline root declares in its e2po.json ({} without one): diffusers configs cannot say how
    many zero T5 tokens a model without T5 was trained with (the world: 8; diffusers assumes 256)."""
    file = os.path.join(os.fspath(path), PIPELINE_NOTES)
    if not os.path.isfile(file):
        return {}
    with open(file) as f:
        return json.load(f)


def native_size(path):
    """Image side a pipeline root was made for: transformer/config.json sample_size (latent side) × the VAE factor
    2^(levels−1) from vae/config.json; None when `path` is not such a folder or says nothing."""
    cfg_t, cfg_v = os.path.join(path, "transformer", "config.json"), os.path.join(path, "vae", "config.json")
    if not os.path.isdir(path) or not os.path.isfile(cfg_t):
        return None
    with open(cfg_t) as f:
        sample_size = json.load(f).get("sample_size")
    levels = 4
    if os.path.isfile(cfg_v):
        with open(cfg_v) as f:
            levels = len(json.load(f).get("block_out_channels", [0] * 4))
    return None if sample_size is None else sample_size * 2 ** (levels - 1)


def pixels_per_token(path):
    """Image pixels per MMDiT token side, VAE factor × patch size, read from the safetensors headers of `path` (a
    pipeline root or the original single file) without loading a tensor: 16 for SD3.5. ValueError on unreadable files."""
    def header(subfolder):
        return _read_header(_weight_files(path, subfolder))
    mmdit = {k[len(MMDIT_PREFIX):] if k.startswith(MMDIT_PREFIX) else k: v for k, v in header("transformer").items()}
    patch_key = next((k for k in ("x_embedder.proj.weight", "pos_embed.proj.weight") if k in mmdit), None)
    if patch_key is None:
        raise ValueError(f"{path}: no MMDiT patch embedding (x_embedder.proj.weight / pos_embed.proj.weight)")
    vae = {k[len(VAE_PREFIX):] if k.startswith(VAE_PREFIX) else k: v for k, v in header("vae").items()}
    levels = {k.split(".")[2] for k in vae if k.startswith(("encoder.down.", "encoder.down_blocks."))}
    if not levels:
        raise ValueError(f"{path}: no VAE encoder levels (encoder.down.* / encoder.down_blocks.*)")
    return 2 ** (len(levels) - 1) * mmdit[patch_key][1][-1]


def save_diffusers(module, folder, sample_size=None):
    """Write an MMDiT or VAE as a diffusers folder (config.json + diffusion_pytorch_model.safetensors)."""
    sd = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items() if ".lora_" not in k}
    dsd, config = mmdit_to_diffusers(sd, module.cfg.head_dim, sample_size) if isinstance(module, MMDiT) \
        else vae_to_diffusers(sd)
    os.makedirs(folder, exist_ok=True)
    save_file({k: v.contiguous() for k, v in dsd.items()}, os.path.join(folder, DIFFUSERS_WEIGHTS + ".safetensors"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)

# ---- text encoders ---------------------------------------------------------------------------------------------

def _num_blocks(sd, prefix):
    idx = {int(k[len(prefix):].split(".")[0]) for k in sd if k.startswith(prefix)}
    if idx != set(range(len(idx))):
        raise ValueError(f"non-contiguous layer indices under {prefix!r}: {sorted(idx)}")
    return len(idx)


def _check_text_keys(model, sd, file):
    expected = set(model.state_dict().keys())
    missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - expected)
    if missing or unexpected:
        raise ValueError(f"{file}: missing keys {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                         f"unexpected keys {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}")


def clip_from_state_dict(sd, encoder, tokenizer, file="<state dict>", dtype=torch.float32, device="cpu"):
    """CLIPTextModelWithProjection from a transformers-layout state dict; config inferred from shapes."""
    sd = {k: v for k, v in sd.items() if k != "text_model.embeddings.position_ids"}
    need = ["text_model.embeddings.token_embedding.weight", "text_model.embeddings.position_embedding.weight",
            "text_model.encoder.layers.0.mlp.fc1.weight"]
    for k in need:
        if k not in sd:
            raise ValueError(f"{file}: missing key {k!r} (expected the transformers CLIP text layout)")
    vocab, hidden = sd[need[0]].shape
    if hidden % TEXT_HEAD_DIM:
        raise ValueError(f"{file}: hidden size {hidden} is not a multiple of head_dim {TEXT_HEAD_DIM}")
    if "text_projection.weight" not in sd:
        if encoder != "clip_l":
            raise ValueError(f"{file}: missing key 'text_projection.weight'")
        warnings.warn(f"{file}: no text_projection.weight; using identity (pooled = EOS state, as SD3's reference)")
        sd["text_projection.weight"] = torch.eye(hidden)
    cfg = CLIPTextConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=sd[need[2]].shape[0],
        num_hidden_layers=_num_blocks(sd, "text_model.encoder.layers."), num_attention_heads=hidden // TEXT_HEAD_DIM,
        max_position_embeddings=sd[need[1]].shape[0], projection_dim=sd["text_projection.weight"].shape[0],
        hidden_act=CLIP_ACT[encoder], layer_norm_eps=1e-5, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    with torch.device("meta"):
        model = CLIPTextModelWithProjection(cfg)
    _check_text_keys(model, sd, file)
    model.load_state_dict({k: v.to(dtype=dtype, device=device) for k, v in sd.items()}, strict=True, assign=True)
    emb = model.text_model.embeddings
    emb.register_buffer("position_ids", torch.arange(cfg.max_position_embeddings, device=device)[None],
                        persistent=False)
    return model


def t5_from_state_dict(sd, file="<state dict>", dtype=torch.float32, device="cpu"):
    """T5EncoderModel (v1.1 style) from a transformers-layout state dict; config inferred from shapes."""
    need = ["shared.weight", "encoder.block.0.layer.0.SelfAttention.q.weight",
            "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
    for k in need:
        if k not in sd:
            raise ValueError(f"{file}: missing key {k!r} (expected the transformers T5 encoder layout)")
    sd = dict(sd)
    sd.setdefault("encoder.embed_tokens.weight", sd["shared.weight"])
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in sd
    wi = "encoder.block.0.layer.1.DenseReluDense." + ("wi_0" if gated else "wi") + ".weight"
    if wi not in sd:
        raise ValueError(f"{file}: missing key {wi!r}")
    vocab, d_model = sd["shared.weight"].shape
    cfg = T5Config(vocab_size=vocab, d_model=d_model, d_kv=TEXT_HEAD_DIM, num_heads=sd[need[1]].shape[0] // TEXT_HEAD_DIM,
                   d_ff=sd[wi].shape[0], num_layers=_num_blocks(sd, "encoder.block."),
                   relative_attention_num_buckets=sd[need[2]].shape[0],
                   feed_forward_proj="gated-gelu" if gated else "relu", is_encoder_decoder=False, use_cache=False)
    with torch.device("meta"):
        model = T5EncoderModel(cfg)
    _check_text_keys(model, sd, file)
    model.load_state_dict({k: v.to(dtype=dtype, device=device) for k, v in sd.items()}, strict=True, assign=True)
    model.encoder.embed_tokens = model.shared
    return model


def _tokenizer(root, folder):
    path = os.path.join(root, folder)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer folder {path} not found (a pipeline root needs tokenizer/, tokenizer_2/"
                                f" and, with T5, tokenizer_3/; pass tokenizer_path=ROOT)")
    return AutoTokenizer.from_pretrained(path)


def load_text_encoders(path, dtype=torch.float32, device="cpu", t5=True, max_sequence_length=None,
                       joint_dim=None, tokenizer_path=None):
    """Load CLIP-L, CLIP-G and (optionally) T5 -> TextEncoders (frozen, eval).

    path: a diffusers pipeline root (text_encoder/, text_encoder_2/, [text_encoder_3/], tokenizer{,_2,_3}/); or the
    single files clip_l.safetensors, clip_g.safetensors [, t5xxl_fp16.safetensors | t5xxl.safetensors], either in
    `path` itself (e.g. the HF repo's text_encoders/ folder) or in path/text_encoders/ when path has no diffusers
    folders (a root with both loads the diffusers folders; pass ROOT/text_encoders to force the single files).
    Tokenizers come from tokenizer_path, default the root (path, or the parent of a text_encoders/ folder).
    t5=False, or no T5 weights (a logged warning), gives a zero T5 part of width joint_dim (default: the root's
    transformer/config.json joint_attention_dim, else 4096); with T5, joint_dim is T5's d_model.
    max_sequence_length (T5 tokens): None = the root's pipeline notes (the world: 8), else 256 as diffusers."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"text encoder path {path} is not a folder (expected a pipeline root or a folder "
                                f"with {CLIP_FILES['clip_l']}, {CLIP_FILES['clip_g']})")
    has = lambda *p: os.path.exists(os.path.join(path, *p))
    if has(CLIP_FILES["clip_l"]):                                   # the text_encoders/ folder itself
        folder = path
        root = path if has("tokenizer") else os.path.dirname(os.path.abspath(path))
    elif has("text_encoder") and has("text_encoder_2"):             # diffusers pipeline root
        folder, root = None, path
    elif has("text_encoders", CLIP_FILES["clip_l"]):                # root with single files only
        folder, root = os.path.join(path, "text_encoders"), path
    else:
        raise FileNotFoundError(f"{path}: neither a pipeline root (text_encoder/, text_encoder_2/) nor a folder with "
                                f"{CLIP_FILES['clip_l']} (directly or under text_encoders/)")
    tok_root = os.fspath(tokenizer_path) if tokenizer_path is not None else root
    clips, toks = {}, {}
    for name, (enc_dir, tok_dir) in CLIP_FOLDERS.items():
        toks[name] = _tokenizer(tok_root, tok_dir)
        if folder is None:
            clips[name] = CLIPTextModelWithProjection.from_pretrained(os.path.join(root, enc_dir), dtype=dtype)
        else:
            file = os.path.join(folder, CLIP_FILES[name])
            if not os.path.isfile(file):
                raise FileNotFoundError(f"{file} not found")
            clips[name] = clip_from_state_dict(load_file(file), name, toks[name], file, dtype=dtype)
    t5_model = None
    if t5 and folder is None:
        t5_dir = os.path.join(root, T5_FOLDERS[0])
        if os.path.isdir(t5_dir):
            t5_model = T5EncoderModel.from_pretrained(t5_dir, dtype=dtype)
        else:
            log.warning(f"{t5_dir} not found: the T5 part of the context will be zeros")
    elif t5:
        files = [os.path.join(folder, f) for f in T5_FILES if os.path.isfile(os.path.join(folder, f))]
        if files:
            t5_model = t5_from_state_dict(load_file(files[0]), files[0], dtype=dtype)
        else:
            log.warning(f"no {' / '.join(T5_FILES)} in {folder}: the T5 part of the context will be zeros")
    tok_t5 = _tokenizer(tok_root, T5_FOLDERS[1]) if t5_model is not None else None
    if t5_model is None and joint_dim is None:
        cfg_file = os.path.join(root, "transformer", "config.json")
        if os.path.isfile(cfg_file):
            with open(cfg_file) as f:
                joint_dim = json.load(f).get("joint_attention_dim")
    if max_sequence_length is None:
        max_sequence_length = pipeline_notes(root).get("max_sequence_length", T5_MAX_LENGTH)
    te = TextEncoders(clips["clip_l"], clips["clip_g"], toks["clip_l"], toks["clip_g"], t5_model, tok_t5,
                      max_sequence_length=max_sequence_length, joint_dim=joint_dim)
    return te.to(device)


# ----------------------------------------------------------------------------------------------------------------
# LoRA: named adapters on a shared frozen base


class LoRALinear(nn.Linear):
    """A Linear whose weight/bias are the base layer's own Parameters (shared, never copied) plus adapters.

    groups=3 for a fused qkv: three independent (A, B) pairs, A stacked (3r, in) so one matmul serves all three,
    B as (3, out/3, r) applied as a batched product; the update is block-diagonal, never a merged weight."""

    def __init__(self, base: nn.Linear, groups=1):
        nn.Module.__init__(self)
        self.in_features, self.out_features, self.groups = base.in_features, base.out_features, groups
        self.weight, self.bias = base.weight, base.bias
        self.lora_A, self.lora_B = nn.ParameterDict(), nn.ParameterDict()
        self.scale, self.active = {}, None

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        if isinstance(self.active, tuple):  # one adapter (or None) per equal chunk of the batch
            n = x.shape[0] // len(self.active)
            if n * len(self.active) != x.shape[0]:
                raise ValueError(f"batch {x.shape[0]} does not split into {len(self.active)} adapter chunks")
            for i, name in enumerate(self.active):
                if name in self.lora_A:
                    y[i * n:(i + 1) * n].add_(self.delta(x[i * n:(i + 1) * n], name), alpha=self.scale[name])
            return y
        if self.active is None or self.active not in self.lora_A:
            return y
        return y.add_(self.delta(x, self.active), alpha=self.scale[self.active])  # F.linear keeps no output

    def delta(self, x, name):
        """B·A·x of adapter `name`, without the alpha/rank scale."""
        A, B = self.lora_A[name], self.lora_B[name]
        h = F.linear(x, A.to(x.dtype))  # (..., g*r)
        g, d, r = B.shape
        if g == 1:
            return F.linear(h, B[0].to(h.dtype))
        return torch.einsum("...gr,gdr->...gd", h.unflatten(-1, (g, r)), B.to(h.dtype)).flatten(-2)


def lora_layers(module):
    return {name: m for name, m in module.named_modules() if isinstance(m, LoRALinear)}


def _check_adapter_name(name):
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"adapter name must be a non-empty string without '.', got {name!r}")


def add_lora(module, rank=32, alpha=64, adapter="policy", targets=LORA_TARGETS, seed=None, dtype=torch.float32):
    """Add adapter `adapter` to every Linear whose path ends with one of `targets` (A ~ N(0, std 1/rank), B = 0).

    Adding a second name reuses the wrapped layers. New LoRA parameters are trainable and in `dtype`
    (fp32 master weights); the base is left as it is (load_mmdit returns it frozen)."""
    _check_adapter_name(adapter)
    if rank <= 0:
        raise ValueError(f"LoRA rank must be positive, got {rank}")
    if adapter in adapters(module):
        raise ValueError(f"adapter {adapter!r} already exists; have {adapters(module)}")
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    active, hits = active_adapter(module), 0
    for name, layer in list(module.named_modules()):
        if not any(name == t or name.endswith("." + t) for t in targets):
            continue
        if not isinstance(layer, LoRALinear):
            if type(layer) is not nn.Linear:
                raise ValueError(f"LoRA target {name} is a {type(layer).__name__}, not a Linear")
            parent, child = name.rsplit(".", 1) if "." in name else ("", name)
            layer = LoRALinear(layer, groups=3 if child == "qkv" else 1)
            layer.active = active
            setattr(module.get_submodule(parent), child, layer)
        g = layer.groups
        A = torch.randn(g * rank, layer.in_features, generator=gen, dtype=torch.float32) / rank
        layer.lora_A[adapter] = nn.Parameter(A.to(device=layer.weight.device, dtype=dtype))
        layer.lora_B[adapter] = nn.Parameter(torch.zeros(g, layer.out_features // g, rank,
                                                         device=layer.weight.device, dtype=dtype))
        layer.scale[adapter] = alpha / rank
        hits += 1
    if hits == 0:
        raise ValueError(f"no Linear layer matches LoRA targets {targets}")
    return module


def adapters(module):
    names = set()
    for layer in lora_layers(module).values():
        names |= set(layer.lora_A.keys())
    return sorted(names)


def set_adapter(module, name):
    """Activate adapter `name` in every LoRA layer; None switches LoRA off (the reference model).

    A tuple/list of names (None allowed) splits the batch into that many equal chunks, chunk i with adapter name[i]:
    e.g. ("old", None) computes the old policy and the reference model in one forward of the concatenated batch
    (valid because every row of the MMDiT is independent of the others: no batch statistics, attention per sample)."""
    names = tuple(name) if isinstance(name, (tuple, list)) else (name,)
    if not names:
        raise ValueError("set_adapter: empty tuple of adapter names")
    for n in names:
        if n is not None and n not in adapters(module):
            raise ValueError(f"unknown adapter {n!r}; have {adapters(module)}")
    for layer in lora_layers(module).values():
        layer.active = names if len(names) > 1 else names[0]


def active_adapter(module):
    return next((layer.active for layer in lora_layers(module).values()), None)


@contextmanager
def use_adapter(module, name):
    previous = active_adapter(module)
    set_adapter(module, name)
    try:
        yield module
    finally:
        set_adapter(module, previous)


def _adapter_layers(module, adapter):
    """{path: LoRALinear} of the layers that carry `adapter` (ValueError if none do)."""
    layers = {name: layer for name, layer in lora_layers(module).items() if adapter in layer.lora_A}
    if not layers:
        raise ValueError(f"unknown adapter {adapter!r}; have {adapters(module)}")
    return layers


def lora_parameters(module, adapter):
    """[A, B, A, B, ...] of `adapter`, in module order (for the optimizer)."""
    return [p for layer in _adapter_layers(module, adapter).values() for p in (layer.lora_A[adapter],
                                                                               layer.lora_B[adapter])]


def lora_state_dict(module, adapter):
    """{"<layer path>.lora_A": (g*r, in), "<layer path>.lora_B": (g, out/g, r)} in our layout (detached)."""
    sd = {}
    for name, layer in _adapter_layers(module, adapter).items():
        sd[f"{name}.lora_A"] = layer.lora_A[adapter].detach()
        sd[f"{name}.lora_B"] = layer.lora_B[adapter].detach()
    return sd


def load_lora_state_dict(module, sd, adapter, alpha=None):
    """Load lora_state_dict output into `adapter` (created if missing: then alpha is required)."""
    if adapter not in adapters(module):
        if alpha is None:
            raise ValueError(f"adapter {adapter!r} does not exist; call add_lora first or pass alpha")
        B = next((v for k, v in sd.items() if k.endswith(".lora_B")), None)
        if B is None:
            raise ValueError("LoRA state dict holds no lora_B tensor")
        targets = tuple(k[:-len(".lora_A")] for k in sd if k.endswith(".lora_A"))
        add_lora(module, rank=B.shape[-1], alpha=alpha, adapter=adapter, targets=targets)
    expected = {k: tuple(v.shape) for k, v in lora_state_dict(module, adapter).items()}
    _check_keys({k: tuple(v.shape) for k, v in sd.items()}, expected, f"LoRA adapter {adapter!r}", "the state dict")
    layers = _adapter_layers(module, adapter)
    with torch.no_grad():
        for k, v in sd.items():
            name, part = k.rsplit(".", 1)
            getattr(layers[name], part)[adapter].copy_(v)


def copy_adapter(module, src, dst, requires_grad=False):
    """dst := src (values and scale); dst is created if missing and is frozen unless requires_grad."""
    _check_adapter_name(dst)
    with torch.no_grad():
        for layer in _adapter_layers(module, src).values():
            for store in (layer.lora_A, layer.lora_B):
                if dst not in store:
                    store[dst] = nn.Parameter(store[src].detach().clone())
                else:
                    store[dst].copy_(store[src])
                store[dst].requires_grad_(requires_grad)
            layer.scale[dst] = layer.scale[src]


def _lora_file_keys(name):
    """Diffusers LoRA key prefixes (one per (A, B) pair) for our layer `name`."""
    return [f"transformer.{d}" for d in mmdit_module_to_diffusers(name)]


def save_lora(module, path, adapter="policy"):
    """Write `adapter` as diffusers/peft LoRA safetensors (transformer.<diffusers module>.lora_{A,B}.weight).

    alpha/rank is folded into B, because diffusers reads a file without alpha as alpha = rank; rank and alpha are
    also kept in the metadata so load_lora restores the adapter exactly."""
    out, rank, alpha = {}, None, None
    for name, layer in _adapter_layers(module, adapter).items():
        A, B, s = layer.lora_A[adapter].detach(), layer.lora_B[adapter].detach(), layer.scale[adapter]
        rank = B.shape[-1]
        alpha = s * rank
        for j, key in enumerate(_lora_file_keys(name)):
            out[f"{key}.lora_A.weight"] = A[j * rank:(j + 1) * rank].float().contiguous().cpu()
            out[f"{key}.lora_B.weight"] = (B[j].float() * s).contiguous().cpu()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"          # atomic: a crash mid-write never leaves a truncated LoRA under the real name
    try:
        save_file(out, tmp, metadata={"format": "pt", "e2po_rank": str(rank), "e2po_alpha": repr(alpha)})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _diffusers_lora_alpha(meta, path):
    """lora_alpha from diffusers' `lora_adapter_metadata` (peft LoraConfig fields, prefixed "transformer.")."""
    if "lora_adapter_metadata" not in meta:
        return None
    info = json.loads(meta["lora_adapter_metadata"])
    if info.get("transformer.rank_pattern") or info.get("transformer.alpha_pattern"):
        raise ValueError(f"{path}: per-layer rank_pattern / alpha_pattern LoRAs are not supported")
    return info.get("transformer.lora_alpha")


def load_lora(module, path, adapter="policy"):
    """Read a save_lora file, or a diffusers/peft SD3 transformer LoRA (a file or a folder with
    pytorch_lora_weights.safetensors; alpha from its lora_adapter_metadata, else alpha = rank), into `adapter`.

    A missing adapter is created with the file's rank and alpha on the layers the file covers; an existing one keeps
    its scale (B is rescaled). A file that adapts only some of q/k/v of a fused qkv gets zero pairs for the rest."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "pytorch_lora_weights.safetensors")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"LoRA file not found: {path}")
    index = _read_header([path])
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
    ranks = {shape[0] for k, (_, shape) in index.items() if k.endswith(".lora_A.weight")}
    if len(ranks) != 1:
        raise ValueError(f"{path}: expected LoRA tensors (*.lora_A.weight) of one rank, found ranks {sorted(ranks)}")
    rank = ranks.pop()
    diffusers_alpha = _diffusers_lora_alpha(meta, path)
    if "e2po_alpha" in meta:  # ours: alpha/rank already folded into B
        alpha, file_scale = float(meta["e2po_alpha"]), 1.0
    elif diffusers_alpha is not None:  # peft: B as trained, scaled by alpha/rank at run time
        alpha, file_scale = float(diffusers_alpha), float(diffusers_alpha) / rank
    else:  # no alpha: diffusers reads alpha = rank
        alpha, file_scale = float(rank), 1.0
    file_modules = {k.rsplit(".lora_", 1)[0] for k in index}
    if adapter not in adapters(module):
        targets = []
        for name, _ in module.named_modules():
            try:
                if any(key in file_modules for key in _lora_file_keys(name)):
                    targets.append(name)
            except KeyError:
                pass
        if not targets:
            raise ValueError(f"{path}: no key matches a layer of this model (expected transformer.<diffusers name>."
                             f"lora_A.weight), e.g. {sorted(index)[:3]}")
        add_lora(module, rank=rank, alpha=alpha, adapter=adapter, targets=tuple(targets))
    layers = _adapter_layers(module, adapter)
    expected, zero = {}, []
    for name, layer in layers.items():
        r, keys = layer.lora_B[adapter].shape[-1], _lora_file_keys(name)
        for j, key in enumerate(keys):
            if key not in file_modules and any(k in file_modules for k in keys):
                zero.append((name, j))  # e.g. a to_q-only LoRA on our fused qkv
                continue
            expected[f"{key}.lora_A.weight"] = (r, layer.in_features)
            expected[f"{key}.lora_B.weight"] = (layer.out_features // layer.groups, r)
    _check_keys({k: s for k, (_, s) in index.items()}, expected, f"LoRA adapter {adapter!r}", path)
    tensors = _read_tensors(index, {k: k for k in index}, torch.float32, "cpu")
    with torch.no_grad():
        for name, layer in layers.items():
            A, B, s = layer.lora_A[adapter], layer.lora_B[adapter], layer.scale[adapter]
            r = B.shape[-1]
            for j, key in enumerate(_lora_file_keys(name)):
                if (name, j) in zero:
                    A[j * r:(j + 1) * r].zero_(), B[j].zero_()
                    continue
                A[j * r:(j + 1) * r].copy_(tensors[f"{key}.lora_A.weight"])
                B[j].copy_(tensors[f"{key}.lora_B.weight"] * (file_scale / s))
