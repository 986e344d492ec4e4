#!/usr/bin/env python3
"""Golden fixtures for the parts of veto's Wan2.1 pipelines (text, image and video encoders).

Builds tiny random components in the folder layout of the real Wan-AI/Wan2.1-*-Diffusers repos
under tests/fixtures/wan_parts/wan/ and writes f32 safetensors fixtures next to it:

- `tokenizer/` (a tiny sentencepiece unigram in T5/UMT5 form: "▁" word prefix, <pad> 0, </s> 1,
  <unk> 2, no BOS, EOS appended) and `text_encoder/` (`UMT5EncoderModel`: every layer with its own
  relative-position bias, gated-GELU feed-forward).
- `umt5.safetensors`: the encoder on two rows with attention masks of 12 and 24 tokens.
- `wan_prompt.safetensors`: `WanPipeline._get_t5_prompt_embeds` (prompt_clean, padding to the
  max length, the encoder run with the mask, rows past the real tokens set to zero) for several
  prompts, one of them cut by the limit; `prompt_clean.json`: diffusers' `prompt_clean` (ftfy +
  html unescape twice + whitespace collapse) on a list of inputs.
- `vae/` (`AutoencoderKLWan`, the Wan2.1 layout: no residual blocks, no patching; widths 6..12,
  one residual block per level, z_dim 4) and `wan_vae.safetensors`: `encode` (latent mean) of a
  2 x 3 x 9 x 16 x 24 video and `decode` of 2 x 4 x 3 x 2 x 3 latents (3 latent frames: the
  temporal caches of every causal convolution and of the time up/down-sampling are exercised).
- `image_encoder/` (`CLIPVisionModelWithProjection`, GELU, 28 px, patch 14) and
  `image_processor/preprocessor_config.json` (CLIPImageProcessor, shortest edge and crop 28),
  `clip_vision.safetensors`: the processor's pixel values for two PNG images (one shrunk, one
  enlarged) and `hidden_states[-2]` of the encoder on them, as WanImageToVideoPipeline uses.

CPU, f32, fixed seeds; running it twice writes identical files. Developers run it; CI never does:

    /work/venv/ref/bin/python tools/reference/wan_parts_reference.py
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np
import torch
from diffusers import AutoencoderKLWan, WanPipeline
from diffusers.pipelines.wan.pipeline_wan import prompt_clean
from PIL import Image
from transformers import (
    AutoTokenizer,
    CLIPImageProcessor,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    UMT5Config,
    UMT5EncoderModel,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from flux_reference import corpus_lines, randomize_, train_t5_spiece, write_safetensors, write_t5_tokenizer  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]
OUT = REPO_ROOT / "tests" / "fixtures" / "wan_parts"
FOLDER = OUT / "wan"

PROMPT_MAX_LEN = 24  # the real pipelines use 512
PROMPTS = {
    "prompt": "A cat wearing glasses walks  on the beach,\n &amp; a dog   follows",
    "negative": "static, blurry, low quality",
    "long": " ".join(["a photo of a cat wearing glasses on a wooden chair near the window"] * 3),
    "empty": "",
}
CLEAN_CASES = [
    "  a  cat\n\tsitting  on\r\na chair  ",
    "Tom &amp;amp; Jerry &lt;3 &quot;quoted&quot; &#39;x&#39; &#x41;&#66; &nbsp;end",
    "\u201ccurly\u201d \u2018quotes\u2019",
    "\ufb01ne \ufb02ow ligatures",
    "\uff21\uff22\uff23 full width\u3000space",
    "caf\u00e9 na\u0131ve e\u0301",
    "tabs\tand\u00a0nbsp\u2003em space",
    "",
]


def umt5_config(vocab_size: int) -> dict:
    return dict(
        vocab_size=vocab_size,
        d_model=32,
        d_kv=8,
        d_ff=48,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        relative_attention_num_buckets=16,  # 8 per direction, 4 exact: distances 4..11 log-bucketed
        relative_attention_max_distance=12,  # farther than 12 share the last bucket
        dropout_rate=0.0,
        layer_norm_epsilon=1e-6,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )


@torch.no_grad()
def build_text(fixtures: dict) -> None:
    tok_dir = FOLDER / "tokenizer"
    write_t5_tokenizer(tok_dir, train_t5_spiece(corpus_lines()))
    (tok_dir / "spiece.model").unlink()  # the Wan repos ship tokenizer.json only
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    torch.manual_seed(0)
    model = UMT5EncoderModel(UMT5Config(**umt5_config(len(tokenizer)))).eval()
    randomize_(model, seed=81)
    model.save_pretrained(FOLDER / "text_encoder", safe_serialization=True)
    model = UMT5EncoderModel.from_pretrained(FOLDER / "text_encoder").eval()

    # Raw encoder: two rows, masks of different lengths.
    enc = tokenizer(
        [PROMPTS["negative"], PROMPTS["long"]],
        padding="max_length",
        max_length=PROMPT_MAX_LEN,
        truncation=True,
        return_tensors="pt",
    )
    out = model(enc.input_ids, enc.attention_mask).last_hidden_state
    fixtures["umt5"] = {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask, "last_hidden_state": out}

    ns = SimpleNamespace(tokenizer=tokenizer, text_encoder=model, _execution_device=torch.device("cpu"))
    prompt_fx = {}
    for name, text in PROMPTS.items():
        embeds = WanPipeline._get_t5_prompt_embeds(
            ns, text, max_sequence_length=PROMPT_MAX_LEN, device=torch.device("cpu"), dtype=torch.float32
        )
        ids = tokenizer(prompt_clean(text), padding="max_length", max_length=PROMPT_MAX_LEN, truncation=True).input_ids
        prompt_fx[f"{name}.embeds"] = embeds
        prompt_fx[f"{name}.ids"] = torch.tensor([ids], dtype=torch.int64)
    fixtures["wan_prompt"] = prompt_fx
    clean = [{"input": s, "output": prompt_clean(s)} for s in CLEAN_CASES]
    (OUT / "prompt_clean.json").write_text(json.dumps(clean, indent=2, ensure_ascii=False) + "\n")


def vae_config() -> dict:
    return dict(
        base_dim=6,
        z_dim=4,
        dim_mult=[1, 2, 2, 2],
        num_res_blocks=1,
        attn_scales=[],
        temperal_downsample=[False, True, True],
        dropout=0.0,
        latents_mean=[0.25, -0.5, 0.125, 1.0],
        latents_std=[1.5, 0.75, 2.0, 1.25],
    )


@torch.no_grad()
def randomize_vae_(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
        if name.endswith("gamma"):
            p.copy_(1.0 + 0.1 * noise)
        elif p.ndim >= 2:
            p.copy_(noise / math.sqrt(p[0].numel()))
        else:
            p.copy_(0.1 * noise)
    # Keep the decoded video mostly inside the [-1, 1] clamp so the comparison sees real values.
    model.decoder.conv_out.weight.mul_(0.3)


@torch.no_grad()
def build_vae(fixtures: dict) -> None:
    torch.manual_seed(0)
    vae = AutoencoderKLWan(**vae_config()).eval()
    randomize_vae_(vae, seed=82)
    vae.save_pretrained(FOLDER / "vae", safe_serialization=True)
    vae = AutoencoderKLWan.from_pretrained(FOLDER / "vae").eval()
    gen = torch.Generator().manual_seed(83)
    video = torch.rand((2, 3, 9, 16, 24), generator=gen) * 2 - 1
    mean = vae.encode(video).latent_dist.mean
    latents = torch.randn((2, 4, 3, 2, 3), generator=gen)
    decoded = vae.decode(latents).sample
    clamped = (decoded.abs() >= 1.0).float().mean().item()
    print(f"vae: latent {tuple(mean.shape)}, decoded {tuple(decoded.shape)}, clamped fraction {clamped:.3f}")
    fixtures["wan_vae"] = {"video": video, "latent_mean": mean, "latents": latents, "decoded": decoded}


def clip_config() -> dict:
    return dict(
        hidden_size=32,
        intermediate_size=56,
        projection_dim=16,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_channels=3,
        image_size=28,
        patch_size=14,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
    )


def test_image(h: int, w: int, seed: int) -> Image.Image:
    """Smooth colour gradients plus noise: resampling differences show, uint8 rounding matters."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    r = 127 + 100 * np.sin(x / 3.0 + y / 5.0)
    g = 127 + 100 * np.cos(y / 4.0 - x / 7.0)
    b = (x * 255.0 / max(w - 1, 1) + rng.normal(0, 25, size=(h, w))).clip(0, 255)
    return Image.fromarray(np.stack([r, g, b], axis=-1).clip(0, 255).round().astype(np.uint8), "RGB")


@torch.no_grad()
def build_clip(fixtures: dict) -> None:
    torch.manual_seed(0)
    model = CLIPVisionModelWithProjection(CLIPVisionConfig(**clip_config())).eval()
    randomize_(model, seed=84)
    model.save_pretrained(FOLDER / "image_encoder", safe_serialization=True)
    model = CLIPVisionModelWithProjection.from_pretrained(FOLDER / "image_encoder").eval()
    proc_dir = FOLDER / "image_processor"
    proc_dir.mkdir(parents=True, exist_ok=True)
    proc_config = {
        "crop_size": {"height": 28, "width": 28},
        "do_center_crop": True,
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_processor_type": "CLIPImageProcessor",
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "resample": 3,
        "rescale_factor": 0.00392156862745098,
        "size": {"shortest_edge": 28},
    }
    (proc_dir / "preprocessor_config.json").write_text(json.dumps(proc_config, indent=2) + "\n")
    processor = CLIPImageProcessor.from_pretrained(proc_dir)
    images = {"shrunk": test_image(45, 37, 1), "enlarged": test_image(17, 23, 2)}
    fx = {}
    for name, image in images.items():
        image.save(OUT / f"clip_{name}.png")
        image = Image.open(OUT / f"clip_{name}.png")
        pixels = processor(images=image, return_tensors="pt").pixel_values
        out = model(pixel_values=pixels, output_hidden_states=True)
        fx[f"{name}.pixel_values"] = pixels
        fx[f"{name}.penultimate"] = out.hidden_states[-2]
    fixtures["clip_vision"] = fx


def main() -> None:
    assert sys.byteorder == "little"
    torch.set_num_threads(1)
    if FOLDER.exists():
        shutil.rmtree(FOLDER)
    FOLDER.mkdir(parents=True)
    fixtures: dict = {}
    build_text(fixtures)
    build_vae(fixtures)
    build_clip(fixtures)
    meta = {"generator": "tools/reference/wan_parts_reference.py", "prompt_max_len": PROMPT_MAX_LEN}
    for name, tensors in fixtures.items():
        write_safetensors(OUT / f"{name}.safetensors", {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}, meta)
    for p in sorted(OUT.rglob("*")):
        if p.is_file():
            print(f"{p.relative_to(REPO_ROOT)}: {p.stat().st_size} bytes")


if __name__ == "__main__":
    main()
