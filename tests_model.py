"""
tests_model.py: model.py against diffusers on tiny random weights (CPU, fp32, a few seconds).

    python -m pytest -q tests_model.py

Parity: our MMDiT (plain, qk-norm, MMDiT-X dual attention) and VAE loaded from a diffusers folder and from an
original-layout single file equal diffusers' SD3Transformer2DModel / AutoencoderKL (max abs diff <= 1e-5);
LoRA adapters switch as expected and a saved LoRA reproduces our output inside diffusers/peft; bad input
gives errors that name the file / key.
"""

import os

import pytest
import torch
from safetensors.torch import save_file

import model

torch.set_num_threads(1)
TOL = 1e-5
TINY = dict(sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=3, attention_head_dim=64,
            num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=128, pooled_projection_dim=24,
            pos_embed_max_size=16)
VARIANTS = {"plain": dict(qk_norm=None, dual_attention_layers=()),
            "qknorm": dict(qk_norm="rms_norm", dual_attention_layers=()),
            "dual": dict(qk_norm="rms_norm", dual_attention_layers=(0, 1))}
TINY_VAE = (32, 64, 64, 64)  # a channel change, so shortcut convs are exercised


def randomize(module, seed, std=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module.eval()


def reference_mmdit(variant, seed=0):
    from diffusers import SD3Transformer2DModel
    return randomize(SD3Transformer2DModel(**TINY, **VARIANTS[variant]), seed)


def reference_vae(seed=0):
    from diffusers import AutoencoderKL
    _, config = model.vae_to_diffusers(model.VAE(TINY_VAE).state_dict())
    config.pop("_class_name")
    return randomize(AutoencoderKL(**config), seed)


def mmdit_inputs(h=8, w=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 16, h, w, generator=g), torch.rand(2, generator=g),
            torch.randn(2, 5, TINY["joint_attention_dim"], generator=g),
            torch.randn(2, TINY["pooled_projection_dim"], generator=g))


def ref_forward(ref, x, sigma, context, pooled):
    with torch.no_grad():
        return ref(hidden_states=x, timestep=sigma * 1000, encoder_hidden_states=context,
                   pooled_projections=pooled).sample


def write_single_file(path, ours_sd, prefix, extra=None):
    """Original-layout single file: our keys under `prefix`, plus unrelated entries (e.g. text encoders)."""
    sd = {prefix + k: v.contiguous() for k, v in ours_sd.items()}
    sd.update(extra or {})
    save_file(sd, str(path))
    return path


def make_mmdit_case(variant, root):
    """(variant, diffusers reference, root with pipe/transformer/, original-layout single file)."""
    ref = reference_mmdit(variant)
    ref.save_pretrained(root / "pipe" / "transformer")
    ours_sd = model.mmdit_from_diffusers(ref.state_dict())
    single = write_single_file(root / "sd3.safetensors", ours_sd, model.MMDIT_PREFIX,
                               {"text_encoders.clip_l.transformer.x.weight": torch.zeros(3)})
    return variant, ref, root, single


@pytest.fixture(scope="module", params=list(VARIANTS))
def mmdit_case(request, tmp_path_factory):
    return make_mmdit_case(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def dual_case(tmp_path_factory):
    return make_mmdit_case("dual", tmp_path_factory.mktemp("dual_only"))


@pytest.mark.parametrize("source", ["folder", "pipeline_root", "single_file"])
def test_mmdit_parity(mmdit_case, source):
    variant, ref, root, single = mmdit_case
    path = {"folder": root / "pipe" / "transformer", "pipeline_root": root / "pipe", "single_file": single}[source]
    ours = model.load_mmdit(path)
    assert ours.cfg.qk_norm == (variant != "plain")
    assert ours.cfg.dual_attention_layers == VARIANTS[variant]["dual_attention_layers"]
    assert not any(p.requires_grad for p in ours.parameters())
    for h, w in [(8, 12), (32, 20), (6, 6)]:  # non-square, the full pos_embed grid on one side, square
        inputs = mmdit_inputs(h, w)
        with torch.no_grad():
            v = ours(*inputs)
        diff = (v - ref_forward(ref, *inputs)).abs().max().item()
        print(f"mmdit {variant} {source} {h}x{w}: max abs diff {diff:.2e}")
        assert v.shape == inputs[0].shape and diff <= TOL


def test_mmdit_roundtrip_and_errors(mmdit_case, tmp_path):
    from diffusers import SD3Transformer2DModel
    variant, ref, root, single = mmdit_case
    ours = model.load_mmdit(single)
    dsd, config = model.mmdit_to_diffusers(ours.state_dict())
    rsd = ref.state_dict()
    assert set(dsd) == set(rsd) and all(torch.equal(dsd[k], rsd[k]) for k in rsd)
    assert {k: config[k] for k in TINY if k != "sample_size"} == {k: ref.config[k] for k in TINY if k != "sample_size"}
    model.save_diffusers(ours, tmp_path / "written")  # the folder diffusers itself reads back
    inputs = mmdit_inputs()
    back = SD3Transformer2DModel.from_pretrained(tmp_path / "written").eval()
    assert (ref_forward(back, *inputs) - ref_forward(ref, *inputs)).abs().max() == 0
    with pytest.raises(ValueError, match="exceeds pos_embed_max_size"):
        ours(*mmdit_inputs(34, 8))


def test_mmdit_sharded_and_half_precision(tmp_path):
    ref = reference_mmdit("dual", seed=3)
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="200KB")
    assert len([f for f in os.listdir(tmp_path / "sharded") if f.endswith(".safetensors")]) > 1
    inputs = mmdit_inputs()
    diff = (model.load_mmdit(tmp_path / "sharded")(*inputs) - ref_forward(ref, *inputs)).abs().max().item()
    print(f"mmdit sharded: max abs diff {diff:.2e}")
    assert diff <= TOL
    for dtype in (torch.float16, torch.bfloat16):
        half = reference_mmdit("dual", seed=3).to(dtype)
        half.save_pretrained(tmp_path / str(dtype))
        write_single_file(tmp_path / f"{dtype}.safetensors", model.mmdit_from_diffusers(half.state_dict()),
                          model.MMDIT_PREFIX)
        expected = ref_forward(half.float(), *inputs)
        for path in (tmp_path / str(dtype), tmp_path / f"{dtype}.safetensors"):
            ours = model.load_mmdit(path, dtype=torch.float32)  # upcast on load: same numbers as the fp32 reference
            assert ours.pos_embed.dtype == torch.float32
            assert (ours(*inputs) - expected).abs().max().item() <= TOL
            kept = model.load_mmdit(path, dtype=dtype)
            assert all(p.dtype == dtype for p in kept.parameters())
            assert torch.equal(kept.context_embedder.weight, half.context_embedder.weight)


def test_mmdit_head_dim_override(tmp_path):
    """Without qk-norm head_dim is invisible in the weights: 64 by default, overridable."""
    from diffusers import SD3Transformer2DModel
    ref = randomize(SD3Transformer2DModel(**{**TINY, "attention_head_dim": 32, "num_attention_heads": 4}), 4)
    ref.save_pretrained(tmp_path)
    inputs = mmdit_inputs()
    assert model.load_mmdit(tmp_path).cfg.num_heads == 2
    ours = model.load_mmdit(tmp_path, head_dim=32)
    assert ours.cfg.num_heads == 4
    diff = (ours(*inputs) - ref_forward(ref, *inputs)).abs().max().item()
    print(f"mmdit head_dim 32: max abs diff {diff:.2e}")
    assert diff <= TOL


def test_mmdit_bad_input(dual_case, tmp_path):
    variant, ref, root, single = dual_case
    with pytest.raises(FileNotFoundError, match="nope"):
        model.load_mmdit(tmp_path / "nope.safetensors")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        model.load_mmdit(tmp_path)  # empty folder
    (tmp_path / "weights.ckpt").write_bytes(b"PK\x03\x04 this is a pickle zip, not safetensors")
    with pytest.raises(ValueError, match="weights.ckpt.*not a readable safetensors"):
        model.load_mmdit(tmp_path / "weights.ckpt")
    sd = model.mmdit_from_diffusers(ref.state_dict())
    cases = {
        "missing": ({k: v for k, v in sd.items() if k != "joint_blocks.1.x_block.mlp.fc2.bias"},
                    r"missing keys: joint_blocks\.1\.x_block\.mlp\.fc2\.bias"),
        "unexpected": ({**sd, "joint_blocks.0.x_block.extra.weight": torch.zeros(2)},
                       r"unexpected keys: joint_blocks\.0\.x_block\.extra\.weight"),
        "shape": ({**sd, "joint_blocks.2.x_block.attn.proj.weight": torch.zeros(128, 64)},
                  r"shape mismatches: joint_blocks\.2\.x_block\.attn\.proj\.weight: \(128, 64\)"),
    }
    for name, (bad, pattern) in cases.items():
        path = write_single_file(tmp_path / f"{name}.safetensors", bad, model.MMDIT_PREFIX)
        with pytest.raises(ValueError, match=pattern) as e:
            model.load_mmdit(path)
        assert f"{name}.safetensors" in str(e.value)
    # diffusers layout: the error names the diffusers key
    dsd = {k: v for k, v in ref.state_dict().items() if k != "transformer_blocks.0.attn.to_k.weight"}
    save_file(dsd, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(ValueError, match=r"missing keys: transformer_blocks\.0\.attn\.to_k\.weight"):
        model.load_mmdit(tmp_path)


def test_sd35_medium_parameter_count():
    from diffusers import SD3Transformer2DModel
    cfg = model.SD35_MEDIUM
    with torch.device("meta"):
        ours = model.MMDiT(cfg)
        ref = SD3Transformer2DModel(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                                    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                                    pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384,
                                    qk_norm="rms_norm", dual_attention_layers=tuple(range(13)))
    n_ours, n_ref = (sum(p.numel() for p in m.parameters()) for m in (ours, ref))
    print(f"SD3.5-M parameters: ours {n_ours:,}, diffusers {n_ref:,}")
    assert n_ours == n_ref and n_ours > 2.2e9
    sd = {k: v for k, v in ours.state_dict().items()}
    assert model.mmdit_config_from_state_dict(sd) == cfg
    for preset in (model.SD3_MEDIUM, model.SD35_LARGE):
        with torch.device("meta"):
            m = model.MMDiT(preset)
        assert model.mmdit_config_from_state_dict(m.state_dict()) == preset


def test_grad_checkpointing_same_gradients():
    sd = model.mmdit_from_diffusers(reference_mmdit("dual").state_dict())
    ours = model.MMDiT(model.mmdit_config_from_state_dict(sd))
    ours.load_state_dict(sd)
    inputs = mmdit_inputs()
    grads = []
    for ckpt in (False, True):
        ours.zero_grad()
        ours.grad_checkpointing = ckpt
        ours(*inputs).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in ours.parameters()]))
    assert (grads[0] - grads[1]).abs().max() <= 1e-7


# ---------------------------------------------------------------------------------------------------------- VAE

@pytest.fixture(scope="module")
def vae_case(tmp_path_factory):
    ref = reference_vae()
    root = tmp_path_factory.mktemp("vae")
    ref.save_pretrained(root / "pipe" / "vae")
    single = write_single_file(root / "sd3.safetensors", model.vae_from_diffusers(ref.state_dict()), model.VAE_PREFIX,
                               {"model.diffusion_model.pos_embed": torch.zeros(1, 4, 8)})
    return ref, root, single


@pytest.mark.parametrize("source", ["folder", "pipeline_root", "single_file"])
def test_vae_parity(vae_case, source):
    ref, root, single = vae_case
    path = {"folder": root / "pipe" / "vae", "pipeline_root": root / "pipe", "single_file": single}[source]
    vae = model.load_vae(path)
    assert vae.block_out_channels == TINY_VAE
    g = torch.Generator().manual_seed(0)
    images, latents = torch.rand(2, 3, 32, 40, generator=g), torch.randn(3, 16, 4, 5, generator=g)
    sf, sh = ref.config.scaling_factor, ref.config.shift_factor
    with torch.no_grad():
        enc_ref = (ref.encode(images * 2 - 1).latent_dist.mean - sh) * sf
        dec_ref = (ref.decode(latents / sf + sh).sample / 2 + 0.5).clamp(0, 1)
        enc, dec, dec_sliced = vae.encode(images), vae.decode(latents), vae.decode(latents, slice_size=2)
    d_enc, d_dec = (enc - enc_ref).abs().max().item(), (dec - dec_ref).abs().max().item()
    print(f"vae {source}: encode max abs diff {d_enc:.2e}, decode {d_dec:.2e}")
    assert enc.shape == (2, 16, 4, 5) and dec.shape == (3, 3, 32, 40)
    assert d_enc <= TOL and d_dec <= TOL and (dec_sliced - dec).abs().max() <= TOL
    assert 0 <= dec.min() and dec.max() <= 1


def test_vae_roundtrip_and_errors(vae_case, tmp_path):
    ref, root, single = vae_case
    vae = model.load_vae(single)
    dsd, config = model.vae_to_diffusers(vae.state_dict())
    rsd = ref.state_dict()
    assert set(dsd) == set(rsd) and all(torch.equal(dsd[k], rsd[k]) for k in rsd)
    assert config["block_out_channels"] == list(TINY_VAE)
    sd = model.vae_from_diffusers(rsd)
    bad = {k: v for k, v in sd.items() if k != "decoder.up.0.block.2.conv2.bias"}
    with pytest.raises(ValueError, match=r"missing keys: decoder\.up\.0\.block\.2\.conv2\.bias"):
        model.load_vae(write_single_file(tmp_path / "bad.safetensors", bad, model.VAE_PREFIX))
    with pytest.raises(ValueError, match="holds no MMDiT weights"):
        model.load_mmdit(tmp_path / "bad.safetensors")  # a VAE-only file is not an MMDiT


# ---------------------------------------------------------------------------------------------------------- LoRA

def randomize_lora(module, adapter, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.lora_parameters(module, adapter):
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def test_lora_adapters(dual_case):
    variant, ref, root, single = dual_case
    ours = model.load_mmdit(single)
    base_ptrs = {k: v.data_ptr() for k, v in ours.state_dict().items()}
    inputs = mmdit_inputs()
    with torch.no_grad():
        v_base = ours(*inputs)
        model.add_lora(ours, rank=4, alpha=8, adapter="policy", seed=0)
        layers = model.lora_layers(ours)
        assert len(layers) == 4 * 3 - 1  # the last block's context stream has no proj
        assert not any("attn2" in name for name in layers)
        model.set_adapter(ours, "policy")
        assert torch.equal(ours(*inputs), v_base)  # B = 0 changes nothing
        randomize_lora(ours, "policy", 1)
        v_policy = ours(*inputs)
        assert (v_policy - v_base).abs().max() > 1e-3
        model.copy_adapter(ours, "policy", "old")
        assert not any(p.requires_grad for p in model.lora_parameters(ours, "old"))
        assert all(p.requires_grad for p in model.lora_parameters(ours, "policy"))
        randomize_lora(ours, "policy", 2)
        v_policy2 = ours(*inputs)
        with model.use_adapter(ours, "old"):
            assert torch.equal(ours(*inputs), v_policy)
            with model.use_adapter(ours, None):
                assert torch.equal(ours(*inputs), v_base)
            assert torch.equal(ours(*inputs), v_policy)
        assert torch.equal(ours(*inputs), v_policy2) and model.active_adapter(ours) == "policy"
    # switching and adding adapters never copies base weights
    assert all(ours.state_dict()[k].data_ptr() == p for k, p in base_ptrs.items())
    # the fused qkv LoRA is three independent pairs: only q changes when only B_q is non-zero
    layer = layers["joint_blocks.0.x_block.attn.qkv"]
    x = torch.randn(3, 128)
    with torch.no_grad():
        layer.lora_B["policy"][1:].zero_()
        delta = layer(x) - torch.nn.functional.linear(x, layer.weight, layer.bias)
        A, B = layer.lora_A["policy"], layer.lora_B["policy"]
        assert torch.allclose(delta[:, :128], layer.scale["policy"] * x @ A[:4].T @ B[0].T, atol=1e-6)
        assert delta[:, 128:].abs().max() == 0
    with pytest.raises(ValueError, match="unknown adapter 'nope'"):
        model.set_adapter(ours, "nope")
    # our own (checkpoint) format: lora_state_dict -> load_lora_state_dict is exact
    model.load_lora_state_dict(ours, model.lora_state_dict(ours, "policy"), "fresh", alpha=8)
    with torch.no_grad(), model.use_adapter(ours, "fresh"):
        v_fresh = ours(*inputs)
    with torch.no_grad(), model.use_adapter(ours, "policy"):
        assert torch.equal(v_fresh, ours(*inputs))
    with pytest.raises(ValueError, match="shape mismatches"):
        bad = {k: v[..., :2] if k.endswith("lora_B") else v for k, v in model.lora_state_dict(ours, "policy").items()}
        model.load_lora_state_dict(ours, bad, "old")


def test_lora_save_load_and_diffusers(mmdit_case, tmp_path):
    variant, ref, root, single = mmdit_case
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    ours = model.load_mmdit(single)
    model.add_lora(ours, rank=4, alpha=12, adapter="policy", seed=0)  # scale 3: not a power of two
    randomize_lora(ours, "policy", 5)
    inputs = mmdit_inputs()
    path = tmp_path / "lora.safetensors"
    model.save_lora(ours, path, "policy")
    with torch.no_grad(), model.use_adapter(ours, "policy"):
        v_ours = ours(*inputs)
    # diffusers: the user's route, StableDiffusion3Pipeline.load_lora_weights
    pipe = StableDiffusion3Pipeline(transformer=reference_mmdit(variant), scheduler=FlowMatchEulerDiscreteScheduler(),
                                    vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                                    tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)
    pipe.load_lora_weights(str(path), adapter_name="e2po")
    diff = (ref_forward(pipe.transformer, *inputs) - v_ours).abs().max().item()
    print(f"lora {variant} ours vs diffusers/peft: max abs diff {diff:.2e}")
    assert diff <= TOL
    # round trip into a fresh model (adapter created from the file) and into an existing adapter
    fresh = model.load_mmdit(single)
    model.load_lora(fresh, path, "policy")
    model.add_lora(fresh, rank=4, alpha=12, adapter="other")
    model.load_lora(fresh, path, "other")
    for name in ("policy", "other"):
        with torch.no_grad(), model.use_adapter(fresh, name):
            assert (fresh(*inputs) - v_ours).abs().max() <= 1e-6
    a, b = model.lora_state_dict(ours, "policy"), model.lora_state_dict(fresh, "policy")
    assert set(a) == set(b) and all(torch.allclose(a[k], b[k], rtol=1e-6, atol=0) for k in a)
    # a LoRA for another architecture is refused by name
    with pytest.raises(ValueError, match="shape mismatches"):
        model.add_lora(fresh, rank=2, alpha=2, adapter="r2")
        model.load_lora(fresh, path, "r2")


NFT_TARGETS = ["attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "attn.to_k", "attn.to_out.0",
               "attn.to_q", "attn.to_v"]  # DiffusionNFT's peft target_modules


@pytest.mark.parametrize("targets", [NFT_TARGETS, ["attn.to_q", "attn2.to_out.0"]])
def test_lora_written_by_diffusers(dual_case, tmp_path, targets):
    """A LoRA trained with peft and saved by diffusers (alpha != rank in its metadata) loads into ours exactly,
    also one that adapts only to_q of a fused qkv (and a non-default target)."""
    from diffusers import StableDiffusion3Pipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    variant, ref, root, single = dual_case
    peft_model = reference_mmdit(variant)
    config = LoraConfig(r=4, lora_alpha=6, init_lora_weights="gaussian", target_modules=targets)
    peft_model.add_adapter(config)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    StableDiffusion3Pipeline.save_lora_weights(tmp_path, transformer_lora_layers=get_peft_model_state_dict(peft_model),
                                               transformer_lora_adapter_metadata=config.to_dict())
    ours = model.load_mmdit(single)
    model.load_lora(ours, tmp_path, "policy")
    assert model.lora_layers(ours)["joint_blocks.0.x_block.attn.qkv"].scale["policy"] == 1.5
    inputs = mmdit_inputs()
    with torch.no_grad():
        v_peft = ref_forward(peft_model, *inputs)
        assert (v_peft - ref_forward(ref, *inputs)).abs().max() > 1e-3  # the LoRA does something
        with model.use_adapter(ours, "policy"):
            diff = (ours(*inputs) - v_peft).abs().max().item()
    print(f"lora written by diffusers/peft {targets[:2]}... (alpha 6, rank 4) in ours: max abs diff {diff:.2e}")
    assert diff <= TOL


def test_lora_training_step_bf16_base(dual_case):
    """fp32 LoRA on a bf16 base: forward from fp32 inputs, gradients reach only the active adapter, also through
    activation checkpointing (what train.py does)."""
    variant, ref, root, single = dual_case
    ours = model.load_mmdit(single, dtype=torch.bfloat16)
    model.add_lora(ours, rank=4, alpha=8, adapter="policy", seed=0)
    model.copy_adapter(ours, "policy", "old")
    randomize_lora(ours, "policy", 3)
    model.set_adapter(ours, "policy")
    ours.grad_checkpointing = True
    inputs = mmdit_inputs()
    v = ours(*inputs)
    assert v.dtype == torch.float32 and torch.isfinite(v).all()
    v.square().mean().backward()
    policy = model.lora_parameters(ours, "policy")
    assert all(p.dtype == torch.float32 and p.grad is not None and p.grad.abs().sum() > 0 for p in policy)
    assert all(p.grad is None for p in model.lora_parameters(ours, "old"))
    assert all(p.grad is None for n, p in ours.named_parameters() if ".lora_" not in n)


def test_fresh_mmdit_init():
    """From scratch (the shapes world's pretraining): adaLN-zero and a zero output layer, so v = 0 at init, while
    gradients still reach the output layer; positions are distinct sin-cos rows."""
    cfg = model.MMDiTConfig(hidden_size=128, depth=2, num_heads=2, context_dim=32, pooled_dim=24, pos_embed_max_size=8,
                            dual_attention_layers=(0,))
    torch.manual_seed(0)
    net = model.MMDiT(cfg)
    x, sigma, context, pooled = mmdit_inputs(8, 8)
    v = net(x, sigma, context, pooled)
    assert torch.equal(v, torch.zeros_like(v))
    v.sub(x).square().mean().backward()
    assert net.final_layer.linear.weight.grad.abs().sum() > 0
    pe = net.pos_embed[0]
    assert pe.shape == (64, 128) and pe.abs().max() <= 1
    assert torch.cdist(pe, pe).add(torch.eye(64)).min() > 0.5  # every position distinguishable
