"""
tests_bench.py: bench.py's own machinery (no timings are asserted: speed is measured by bench.py, never by tests).

    python -m pytest -q tests_bench.py        # ~15 s on 2 cores

- the analytic MMDiT FLOP count (used for GPU MFU) equals torch's FlopCounterMode on the tiny and SD3.5-M configs;
- compare() warms up, then interleaves ours and the reference in alternating order;
- a one-repeat run of every row on the default size passes bench.py's parity checks (ours == diffusers + peft on
  the forward, the NFT step's loss, velocities and LoRA gradients, the rollout and the VAE decode) and writes the table.
"""

import torch
from torch.utils.flop_counter import FlopCounterMode

import bench
import model

torch.set_num_threads(1)


def test_flop_count_matches_torch():
    for cfg, latent, context in ((model.MMDiTConfig(**bench.TINY_MMDIT), 8, 24), (model.SD35_MEDIUM, 16, 77 + 256),
                                 (model.SD3_MEDIUM, 8, 20)):
        with torch.device("meta"):
            m = model.MMDiT(cfg)
        x, sigma, ctx, pooled, _, _ = bench.inputs(cfg, 2, latent, context, torch.device("meta"), torch.float32)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            m(x, sigma, ctx, pooled)
        assert bench.mmdit_flops(cfg, 2, latent, latent, context) == counter.get_total_flops()


def test_compare_warms_up_and_alternates():
    calls = []
    ours, ref = (lambda: calls.append("o")), (lambda: calls.append("r"))
    t_ours, t_ref = bench.compare(ours, ref, repeats=4, warmup=2, device=torch.device("cpu"))
    assert calls == list("oror" + "or" + "ro" + "or" + "ro")
    assert t_ours >= 0 and t_ref >= 0


def test_default_rows_agree_with_reference(tmp_path):
    out = tmp_path / "bench.md"
    assert bench.main(["--rows", "forward,nft,rollout,vae", "--repeats", "1", "--batch", "2",
                       "--out", str(out)]) == 0
    text = out.read_text()
    assert "failed" not in text, text
    for row in ("MMDiT forward", "NFT step", "rollout per image", "VAE decode"):
        line = next(l for l in text.splitlines() if l.startswith(f"| {row}"))
        ratio = line.split("|")[4].strip()
        assert float(ratio) > 0, line
    assert "- command: `python" in text and "- machine:" in text
