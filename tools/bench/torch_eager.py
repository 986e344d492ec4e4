#!/usr/bin/env python3
"""PyTorch eager (diffusers from PyPI) at `veto bench`'s configs: one denoising step of the same
random-weight model shapes, no guidance and batched CFG, so veto's baseline can be compared with
the ecosystem's on the same machine (issue 14: veto's no-guidance step must not be slower).

    /work/venv/ref/bin/python tools/bench/torch_eager.py --family flux --sizes 512 --iters 3

Same shapes as `veto bench --family F` at its defaults (f32, `--threads` CPU threads; veto uses
every core the same way). Only the baseline and CFG: diffusers has no NAG or VSF processors, and
the official ones are what veto's parity fixtures replay, not what this times. Prints one line
per size: none (ms), CFG (ms, ratio).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def flux(size: int, text_len: int):
    from diffusers import FluxTransformer2DModel

    m = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=2, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
        guidance_embeds=False, axes_dims_rope=[16, 56, 56],
    )
    h = w = size // 16
    img_ids = torch.zeros(h, w, 3)
    img_ids[..., 1] = torch.arange(h)[:, None]
    img_ids[..., 2] = torch.arange(w)[None, :]
    img_ids = img_ids.reshape(-1, 3)
    txt_ids = torch.zeros(text_len, 3)

    def call(b: int):
        x = torch.randn(b, h * w, 64)
        ctx = torch.randn(b, text_len, 4096)
        pooled = torch.randn(b, 768)
        t = torch.full((b,), 0.75)
        return lambda: m(hidden_states=x, timestep=t, pooled_projections=pooled, encoder_hidden_states=ctx,
                         txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]

    return call


def sd3(size: int, text_len: int):
    from diffusers import SD3Transformer2DModel

    m = SD3Transformer2DModel(
        sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=64,
        num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432, pooled_projection_dim=2048,
        pos_embed_max_size=192, qk_norm="rms_norm",
    )
    ctx_len = 77 + text_len

    def call(b: int):
        x = torch.randn(b, 16, size // 8, size // 8)
        ctx = torch.randn(b, ctx_len, 4096)
        pooled = torch.randn(b, 2048)
        t = torch.full((b,), 750.0)
        return lambda: m(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=t,
                         return_dict=False)[0]

    return call


def sdxl(size: int, text_len: int):
    from diffusers import UNet2DConditionModel

    m = UNet2DConditionModel(
        in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(320, 640, 1280), layers_per_block=2, attention_head_dim=(5, 10, 20),
        cross_attention_dim=2048, transformer_layers_per_block=(1, 1, 2), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
        norm_num_groups=32,
    )

    def call(b: int):
        x = torch.randn(b, 4, size // 8, size // 8)
        ctx = torch.randn(b, 77, 2048)
        cond = {"text_embeds": torch.randn(b, 1280),
                "time_ids": torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]]).repeat(b, 1)}
        return lambda: m(x, 750.0, encoder_hidden_states=ctx, added_cond_kwargs=cond, return_dict=False)[0]

    return call


def pixart(size: int, text_len: int):
    from diffusers import PixArtTransformer2DModel

    m = PixArtTransformer2DModel(
        num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=2,
        cross_attention_dim=1152, sample_size=128, patch_size=2, interpolation_scale=2,
        use_additional_conditions=False, caption_channels=4096,
    )
    length = min(max(text_len, 1), 300)

    def call(b: int):
        # veto attends only the caption's real tokens: the same work as `length` unmasked ones.
        x = torch.randn(b, 4, size // 8, size // 8)
        ctx = torch.randn(b, length, 4096)
        t = torch.full((b,), 750.0)
        return lambda: m(x, encoder_hidden_states=ctx, timestep=t, added_cond_kwargs={"resolution": None,
                         "aspect_ratio": None}, return_dict=False)[0]

    return call


def sana(size: int, text_len: int):
    from diffusers import SanaTransformer2DModel

    m = SanaTransformer2DModel(
        in_channels=32, out_channels=32, num_attention_heads=70, attention_head_dim=32, num_layers=2,
        num_cross_attention_heads=20, cross_attention_head_dim=112, cross_attention_dim=2240,
        caption_channels=2304, mlp_ratio=2.5, sample_size=32, patch_size=1,
    )
    length = min(max(text_len, 1), 300)

    def call(b: int):
        x = torch.randn(b, 32, size // 32, size // 32)
        ctx = torch.randn(b, length, 2304)
        t = torch.full((b,), 750.0)
        return lambda: m(x, encoder_hidden_states=ctx, timestep=t, return_dict=False)[0]

    return call


def wan(size: int, text_len: int, frames: int = 5, heads: int = 12, ffn: int = 8960):
    from diffusers import WanTransformer3DModel

    m = WanTransformer3DModel(
        num_attention_heads=heads, attention_head_dim=128, ffn_dim=ffn, num_layers=1, in_channels=16,
        out_channels=16, text_dim=4096, freq_dim=256,
    )
    latent_frames = (frames - 1) // 4 + 1

    def call(b: int):
        x = torch.randn(b, 16, latent_frames, size // 8, size // 8)
        ctx = torch.randn(b, 512, 4096)
        t = torch.full((b,), 750.0)
        return lambda: m(x, timestep=t, encoder_hidden_states=ctx, return_dict=False)[0]

    return call


def wan14b(size: int, text_len: int):
    return wan(size, text_len, heads=40, ffn=13824)


# `wan` is the 1.3B width (1536), `wan14b` the 14B width (5120): veto bench times both.
FAMILIES = {"flux": flux, "sd3": sd3, "sdxl": sdxl, "unet": sdxl, "pixart": pixart, "sana": sana, "wan": wan,
            "wan14b": wan14b}


def median_ms(fn, iters: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", choices=sorted(FAMILIES), default="flux")
    p.add_argument("--sizes", default="512", help="comma-separated square sizes")
    p.add_argument("--text-len", type=int, default=256, help="T5 tokens, as `veto bench --text-len`")
    p.add_argument("--iters", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    print(f"PyTorch {torch.__version__} eager, {a.family} at veto bench's config, f32, {a.threads} threads")
    print(f"{'size':>6} {'none (ms)':>12} {'CFG (ms, ratio)':>18}")
    with torch.no_grad():
        for size in (int(s) for s in a.sizes.split(",")):
            build = FAMILIES[a.family](size, a.text_len)
            none = median_ms(build(1), a.iters)
            cfg = median_ms(build(2), a.iters)
            print(f"{size:>5}² {none:>12.0f} {cfg:>10.0f} ({100 * (cfg / none - 1):+.0f}%)", flush=True)


if __name__ == "__main__":
    main()
