"""
The builders test_e2po.py's fixtures call, as plain functions (the DDP test's subprocess imports this module too,
never the test module), and the end-to-end tests' reward:

* `build_tiny_pipeline(root)`: a random tiny SD3 pipeline root, laid out like the shipped shapes world;
* `build_clip_tokenizer(out_dir)`: a CLIP BPE tokenizer (the shapes world's writer), loaded back;
* the reward "redness", registered with reward.py on import (`reward="redness"`, or `--reward_module=conftest`).
"""
import json
from pathlib import Path

import torch
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

import model
import reward
from data.shapes import pretrain, world


def build_clip_tokenizer(out_dir, pad_token=world.EOS, words=world.VOCAB):
    """A CLIP BPE tokenizer written to out_dir by the shapes world's writer and loaded back: 256 byte tokens and
    their '</w>' forms, one token per word of `words` (any other word falls back to bytes), then <|startoftext|>
    and <|endoftext|>, the two largest ids as in CLIP's real vocabulary. pad_token "!" is SD3's tokenizer_2;
    words=() is byte-level only (514 ids: bos 512, eos 513)."""
    world.write_clip_tokenizer(out_dir, pad_token=pad_token, words=words)
    return CLIPTokenizer.from_pretrained(out_dir, local_files_only=True)


def build_tiny_pipeline(root, vae_channels=(32, 32, 32, 32), size=world.SIZE):
    """A random tiny SD3 pipeline root, written as the shapes world's is (pretrain.save_pipeline: fp16 diffusers
    folders, scheduler/, model_index.json, e2po.json; diffusers' StableDiffusion3Pipeline loads it): MMDiT with 2
    blocks of width 64 (dual attention in block 0), a VAE with `vae_channels` (4 levels: factor 8) and two CLIP-shaped
    towers of widths 32 and 64 with the world's tokenizers; no T5. `size`: the native image side in pixels (the
    transformer's sample_size × the VAE factor). Seeded, so every call writes the same weights. Returns str(root)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    tok = build_clip_tokenizer(root / "tokenizer")
    build_clip_tokenizer(root / "tokenizer_2", pad_token="!")
    towers = []
    for width, heads in ((32, 1), (64, 2)):
        cfg = CLIPTextConfig(vocab_size=len(tok), hidden_size=width, intermediate_size=2 * width,
                             num_hidden_layers=2, num_attention_heads=heads, projection_dim=width,
                             max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                             eos_token_id=tok.eos_token_id, pad_token_id=1)
        towers.append(CLIPTextModelWithProjection(cfg))
    pooled_dim = sum(t.config.projection_dim for t in towers)
    dit = model.MMDiT(model.MMDiTConfig(hidden_size=64, depth=2, num_heads=1, context_dim=128,
                                        pooled_dim=pooled_dim, pos_embed_max_size=8, qk_norm=True,
                                        dual_attention_layers=(0,)))
    with torch.no_grad():          # no zero-initialised layers: every path carries gradient
        for p in dit.parameters():
            p.copy_(torch.randn_like(p) * 0.05)
        dit.pos_embed.copy_(torch.randn_like(dit.pos_embed) * 0.05)
    vae = model.VAE(block_out_channels=tuple(vae_channels))
    pretrain.save_pipeline(root, dit, vae, towers)
    if size != world.SIZE:         # save_pipeline writes the world's size; the native size is the sample_size
        config = root / "transformer" / "config.json"
        config.write_text(json.dumps({**json.loads(config.read_text()), "sample_size": size // vae.factor}, indent=2))
    return str(root)


def redness_reward(paths, device, dtype):
    """The end-to-end tests' reward: mean redness − blueness. A random tiny model draws no shapes, so the shapes
    reward would be 0 everywhere, r = 1/2 and the NFT gradient would vanish; this one varies continuously."""
    def fn(images, prompts, metadata=None):
        return {"redness": (images[:, 0] - images[:, 2]).mean((1, 2)).float()}
    return fn


reward.register("redness", redness_reward)
