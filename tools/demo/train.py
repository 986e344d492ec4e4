#!/usr/bin/env python3
"""Trains veto's demo model: a tiny FLUX.1-schnell-like pipeline for the synthetic world of
`veto::demo` (coloured shapes with built-in co-occurrences), saved in the real diffusers
`FluxPipeline` folder layout so that veto runs it through the production Flux code path.

    /work/venv/ref/bin/python tools/demo/train.py --out models/demo

What it does, in order (fixed seeds throughout; CPU, f32):
 1. Data: `cargo run -p veto --example demo_data` renders N seeded scenes with OUR Rust renderer
    (images.npy, shapes.npy — each pixel's coverage by each shape — and scenes.json); nothing
    of the world is re-implemented here.
 2. Tokenizers in the real formats, learned from the captions with the helpers of
    tools/reference/flux_reference.py: CLIP byte-level BPE (vocab.json + merges.txt) and a T5
    sentencepiece unigram model (spiece.model + tokenizer.json). With a corpus this small every
    word of the world becomes one token.
 3. VAE: a small AutoencoderKL (3 blocks: 64x64 -> 16x16, 6 latent channels), trained on the
    renders (L1 + MSE + a small KL) with two anchors that give the latent space directions a
    tiny denoiser can follow from a caption:
    - RGB anchor: channels 0-2 tied to the patch's mean RGB (without it the samples ignored
      colour words: session 6 pilots, 14% vs 8% of prompts fully present after 12 min);
    - shape anchor: channels 3-4 tied to the patch's mean shape code (circle, square, triangle,
      star: four directions in a plane, times the coverage), from shapes.npy. Before it
      (session 9) colour was learnt (97%) and shape hardly (38% right on one-object prompts,
      even at 32 steps): an outline was something the transformer had to draw token by token;
      now the shape is one latent direction per object, and the convolutional decoder draws
      the outline. Session 10 pilots (7 min of flow training on one thread each, same data):
      positive rate at 4 steps 2.9% without the shape anchor, 18.3% with it.
    Channel 5 is free. shift_factor / scaling_factor measured on the encoded data; the decoder
    keeps training on the frozen encoder's latents during phase 4.
 4. Transformer: FluxTransformer2DModel (3 double + 3 single blocks, width 128), trained with
    rectified flow (x_s = (1-s) x0 + s e, target e - x0), jointly with the small CLIP and T5
    encoders (trained from random init, not frozen). Captions are dropped 10% of the time (the
    empty prompt, as the pipeline encodes it) so CFG has an unconditional branch.
    Few steps, as schnell: sigmas are drawn from a logit-normal centred at 0.5 ("mid"), a quarter
    on the k/8 grid the 1/2/4/8-step samplers visit. Session 9 (two full runs on the same data):
    "mid" against "high" (centred at 0.73, the noisy end, used before) took the default suite's
    positive rate at 4 steps from 13.5% to 17.0% and the unnamed companion from 6.2% to 16.7%
    (NAG: 2.1%), and the right shape on one-object prompts from 33% to 38%: outlines are refined
    at low noise, which "high" starved.
    The time budget (<= 60 min on 2 cores) leaves no room for a teacher run plus distillation.
    Two single-threaded processes train data-parallel (DDP over gloo: ~2x the samples/s of one
    two-threaded process on this model); the learning rate decays over the time budget; an EMA
    of the weights is what gets saved.
 5. Optional decoder refinement (`--refine-minutes M`, off by default: the committed weights
    were trained without it): the budget's last M minutes train the VAE decoder to turn the
    finished (EMA) transformer's x0 predictions of noised training latents — at the last sigma
    of 2-, 4- and 8-step sampling — into the clean renders. Measured (session 8, 312 images of
    the default suite, none, 4 steps): 10 single-thread minutes of it on the committed weights
    (a scratch run) took the images with everything the prompt names from 14.7% to 19.6% and
    made shapes visibly crisper; but a full run with 9 of the 58 minutes moved from the flow phase to it
    reached only 13.5% (its transformer, with 15% fewer steps, was weaker): the transformer,
    not the decoder, is what limits the demo.
    `--refine-from P` interleaves the same objective with the flow phase instead (the decoder
    tuner's batches, past share P of it, take the EMA transformer's predictions; ~no extra
    time). Session 11, a full run with P = 0.4 on the shape-anchored world: the right object on
    one-object prompts at 4 steps 47% (8 steps 62%) against the committed weights' 51% (69%),
    with 6,411 flow steps against 6,891 — no gain, stars still 3 of 32. The decoder draws stars
    from encoder latents, even blurred ones (a 3x3 latent blur at half weight keeps their arms);
    the transformer's lumpy star latents are what it cannot fix. Off by default.
 6. Save: FluxPipeline.save_pretrained, tokenizers rewritten exactly in the real repos' file
    formats, scheduler FlowMatchEulerDiscreteScheduler with shift 1.0 (schnell), plus sample
    images generated by diffusers' own FluxPipeline from the saved folder.

--pilot shrinks every phase to a few minutes, to check that losses fall and samples look right.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools" / "reference"))
import flux_reference as ref  # noqa: E402  (tokenizer helpers)

from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast  # noqa: E402

SIZE = 64
MAX_SEQ = 32  # T5 tokens (the demo's max_sequence_length; veto's demo defaults use the same)
TEXT_DIM = 64
LATENT_CHANNELS = 6  # 0-2 colour (RGB anchor), 3-4 shape (shape anchor), 5 free
VAE_BLOCKS = [16, 32, 32]  # len 3: 64x64 -> 16x16 latents; len 4: -> 8x8 (the real Flux VAE's 8x)
HEADS, LAYERS = 4, (3, 3)  # transformer width = 32 * HEADS; (double, single) blocks
KL_WEIGHT = 1e-5
RGB_ANCHOR = 1.0  # weight of the loss tying latent channels 0-2 to the image's pooled RGB
SHAPE_ANCHOR = 1.0  # weight of the loss tying latent channels 3.. to the pooled shape code (0: off)
# The shape code of each shape of `Shape::ALL` (circle, square, triangle, star): four directions
# in a plane, so a patch's code is its coverage (the length) times its shape (the direction).
# "onehot": one channel per shape instead, every pair of shapes equally far apart.
SHAPE_CODE_SETS = {
    "planar": ((1.0, 0.0), (0.0, 1.0), (-1.0, 0.0), (0.0, -1.0)),
    "onehot": ((1.0, 0.0, 0.0, 0.0), (0.0, 1.0, 0.0, 0.0), (0.0, 0.0, 1.0, 0.0), (0.0, 0.0, 0.0, 1.0)),
}
SHAPE_CODES = SHAPE_CODE_SETS["planar"]
SHAPE_CODE_SCALE = 1.0  # length of a fully covered patch's code
SIGMA_DIST = "mid"  # "mid": logit-normal at 0.5; "high": leaning to noise; "grid": 70% on the k/8 grid, 30% uniform
CAPTION_DROPOUT = 0.1
DECODER_EVERY = 4  # one VAE-decoder batch per this many transformer steps
GRID_FRACTION = 0.7  # share of training sigmas on the k/8 grid the 1/2/4/8-step samplers use
REFINE_SIGMAS = (0.125, 0.25, 0.375, 0.5)  # decoder refinement: the last sigma of 8/4/2-step sampling (+3/8)
REFINE_SHARE = 0.7  # of refinement inputs; the rest are plain encoder latents
REFINE_FROM = 1.0  # share of the flow phase after which the decoder tuner refines (1: never; see --refine-from)


def latent_patch() -> int:
    """Pixels per latent pixel along each side (the VAE downsamples once per block after the first)."""
    return 2 ** (len(VAE_BLOCKS) - 1)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------------------------------------
# 1. Data from the Rust renderer
# ------------------------------------------------------------------------------------------------


def render_data(out: Path, count: int, seed: int) -> None:
    if all((out / f).exists() for f in ("images.npy", "shapes.npy", "scenes.json")):
        log(f"reusing data in {out}")
        return
    log(f"rendering {count} scenes with `cargo run -p veto --example demo_data` ...")
    subprocess.run(
        ["cargo", "run", "--quiet", "-p", "veto", "--example", "demo_data", "--", str(out), str(count), str(seed), str(SIZE)],
        cwd=REPO,
        check=True,
    )


def load_data(folder: Path) -> tuple[np.ndarray, list[dict]]:
    images = np.load(folder / "images.npy", mmap_mode="r")
    scenes = json.loads((folder / "scenes.json").read_text())
    assert images.shape[0] == len(scenes) and images.shape[1:] == (SIZE, SIZE, 3), images.shape
    return np.ascontiguousarray(images), scenes


def load_shape_codes(folder: Path, chunk: int = 1000) -> torch.Tensor:
    """The shape-anchor targets [N, code channels, h, w]: each latent pixel's mean shape code over its
    patch, from the renderer's per-pixel shape coverage (`shapes.npy`, Scene::shape_coverage)."""
    cover = np.load(folder / "shapes.npy", mmap_mode="r")
    codes = SHAPE_CODE_SCALE * torch.tensor(SHAPE_CODES)  # [shapes, code channels]
    out = []
    for i in range(0, cover.shape[0], chunk):
        c = torch.from_numpy(np.ascontiguousarray(cover[i : i + chunk])).float() / 255.0  # [n, H, W, shapes]
        out.append(F.avg_pool2d((c @ codes).permute(0, 3, 1, 2), latent_patch()))
    return torch.cat(out)


def caption_variant(caption: str, rng: random.Random) -> str:
    """Caption augmentation: a quarter of captions lose their articles ("red circle and blue
    square"), the way people write negative prompts."""
    if rng.random() < 0.25:
        return " ".join(w for w in caption.split(" ") if w != "a")
    return caption


# ------------------------------------------------------------------------------------------------
# 2. Tokenizers and text encoders
# ------------------------------------------------------------------------------------------------


def tokenizer_corpus(scenes: list[dict]) -> list[str]:
    lines = sorted({s["caption"] for s in scenes})
    words = ["red", "green", "blue", "yellow", "circle", "square", "triangle", "star", "white", "gray", "black"]
    return lines + words + [" ".join(w for w in line.split(" ") if w != "a") for line in lines[:2000]]


def build_tokenizers(folder: Path, corpus: list[str]) -> tuple[CLIPTokenizer, T5TokenizerFast]:
    vocab, merges = ref.learn_clip_bpe(corpus, 400)
    ref.write_clip_tokenizer(folder / "tokenizer", vocab, merges)
    ref.write_t5_tokenizer(folder / "tokenizer_2", train_t5_spiece(corpus))
    clip = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    t5 = T5TokenizerFast.from_pretrained(folder / "tokenizer_2")
    log(f"tokenizers: CLIP {len(vocab)} ids, T5 {len(t5)} ids; "
        f"'a red circle and a blue square' -> {t5.tokenize('a red circle and a blue square')}")
    return clip, t5


def train_t5_spiece(lines: list[str]) -> bytes:
    """flux_reference's unigram trainer with a vocabulary sized for this world."""
    saved = ref.T5_VOCAB_SIZE
    ref.T5_VOCAB_SIZE = 80
    try:
        return ref.train_t5_spiece(lines)
    finally:
        ref.T5_VOCAB_SIZE = saved


def build_text_encoders(clip_vocab: int, t5_vocab: int) -> tuple[CLIPTextModel, T5EncoderModel]:
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=clip_vocab,
            hidden_size=TEXT_DIM,
            intermediate_size=2 * TEXT_DIM,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            projection_dim=TEXT_DIM,
            bos_token_id=0,
            eos_token_id=2,  # the legacy value of the real config: pooled at argmax(input_ids)
            pad_token_id=1,
        )
    )
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=t5_vocab,
            d_model=TEXT_DIM,
            d_kv=32,
            d_ff=2 * TEXT_DIM,
            num_layers=2,
            num_heads=2,
            feed_forward_proj="gated-gelu",
            dropout_rate=0.0,
            is_encoder_decoder=False,
            use_cache=False,
            tie_word_embeddings=True,
        )
    )
    return clip, t5


class TextIds:
    """Token ids of every caption variant, computed once (the pipeline's padding: CLIP to 77 with
    its pad (= EOS), T5 to MAX_SEQ with <pad>, no attention masks)."""

    def __init__(self, clip_tok: CLIPTokenizer, t5_tok: T5TokenizerFast):
        self.clip_tok, self.t5_tok, self.cache = clip_tok, t5_tok, {}

    def __call__(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        missing = [t for t in dict.fromkeys(texts) if t not in self.cache]
        if missing:
            c = self.clip_tok(missing, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
            t = self.t5_tok(missing, padding="max_length", max_length=MAX_SEQ, truncation=True, return_tensors="pt").input_ids
            for k, text in enumerate(missing):
                self.cache[text] = (c[k], t[k])
        return torch.stack([self.cache[t][0] for t in texts]), torch.stack([self.cache[t][1] for t in texts])


# ------------------------------------------------------------------------------------------------
# 3. VAE
# ------------------------------------------------------------------------------------------------


def build_vae() -> AutoencoderKL:
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * len(VAE_BLOCKS),
        up_block_types=["UpDecoderBlock2D"] * len(VAE_BLOCKS),
        block_out_channels=list(VAE_BLOCKS),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=8,
        sample_size=SIZE,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=True,
    )
    # Residual branches start at zero (every resnet's conv2, the mid-block attention's output):
    # the network starts as a shallow conv encoder/decoder and learns in minutes, not hours.
    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import ResnetBlock2D

    with torch.no_grad():
        for m in vae.modules():
            if isinstance(m, ResnetBlock2D):
                m.conv2.weight.zero_()
                m.conv2.bias.zero_()
            elif isinstance(m, Attention):
                m.to_out[0].weight.zero_()
                m.to_out[0].bias.zero_()
    return vae


def to_pixels(batch: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def train_vae(vae: AutoencoderKL, images: np.ndarray, shape_codes: torch.Tensor | None, steps: int, batch: int,
              gen: torch.Generator) -> None:
    """Encoder and decoder together, as a plain autoencoder (the latents are the posterior
    means with a little noise, so the decoder tolerates imperfect latents; KL only as a tiny
    regulariser), with the latent anchors below."""
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0, betas=(0.9, 0.99))
    n = images.shape[0]
    for step in range(steps):
        lr = 2e-3 * min(1.0, (step + 1) / 30) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.randint(0, n, (batch,), generator=gen).numpy()
        x = to_pixels(images[idx])
        post = vae.encode(x).latent_dist
        z = post.mean + 0.05 * torch.randn(post.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        l1 = (rec - x).abs().mean()
        loss = l1 + F.mse_loss(rec, x) + KL_WEIGHT * post.kl().mean()
        if RGB_ANCHOR > 0:
            # Latent channels 0-2 carry the colour of their pixels' patch: the latent space is
            # then smooth in colour, which a small denoiser conditions on far more easily.
            pooled = F.avg_pool2d(x, latent_patch())
            loss = loss + RGB_ANCHOR * F.mse_loss(post.mean[:, :3], pooled)
        shape_err = None
        if shape_codes is not None:
            # Channels 3.. carry the shape code of the patch's object, the same for every patch
            # of it: a shape word then moves the latents in one direction, as a colour word does,
            # and the decoder (a convolutional net, good at outlines) draws the shape.
            shape_err = F.mse_loss(post.mean[:, 3 : 3 + shape_codes.shape[1]], shape_codes[torch.from_numpy(idx)])
            loss = loss + SHAPE_ANCHOR * shape_err
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            shape = f", shape code mse {shape_err.item():.4f}" if shape_err is not None else ""
            log(f"vae step {step}/{steps}: l1 {l1.item():.4f}{shape}")


class DecoderTuner:
    """Keeps training the VAE decoder on the frozen encoder's latents, one small batch every
    few transformer steps (the latents the transformer learns do not change)."""

    def __init__(self, vae: AutoencoderKL, images: np.ndarray, raw_latents: torch.Tensor, gen: torch.Generator,
                 distributed: bool = False):
        assert vae.post_quant_conv is None  # decode(z) is then decoder(z)
        self.vae, self.images, self.raw, self.gen = vae, images, raw_latents, gen
        params = list(vae.decoder.parameters())
        for p_ in params:
            p_.requires_grad_(True)
        self.net = torch.nn.parallel.DistributedDataParallel(vae.decoder) if distributed else vae.decoder
        self.opt = torch.optim.AdamW(params, lr=5e-4, weight_decay=0.0, betas=(0.9, 0.99))
        self.steps, self.running = 0, None

    def step(self, batch: int = 4, refine=None) -> None:
        """One decoder batch on encoder latents; `refine(idx)` -> (rows, latents) replaces those
        rows' inputs with other latents of the same images (the refinement phase below)."""
        idx = torch.randint(0, self.raw.shape[0], (batch,), generator=self.gen)
        z = self.raw[idx] + 0.05 * torch.randn(self.raw[idx].shape, generator=self.gen)
        if refine is not None:
            rows, replaced = refine(idx)
            z[rows] = replaced
        x = to_pixels(self.images[idx.numpy()])
        rec = self.net(z)
        l1 = (rec - x).abs().mean()
        loss = l1 + F.mse_loss(rec, x)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.steps += 1
        self.running = l1.item() if self.running is None else 0.95 * self.running + 0.05 * l1.item()


@torch.no_grad()
def encode_all(vae: AutoencoderKL, images: np.ndarray, batch: int = 64) -> torch.Tensor:
    out = []
    for i in range(0, images.shape[0], batch):
        out.append(vae.encode(to_pixels(images[i : i + batch])).latent_dist.mean)
    return torch.cat(out)


# ------------------------------------------------------------------------------------------------
# 4. Transformer
# ------------------------------------------------------------------------------------------------


def build_transformer() -> FluxTransformer2DModel:
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * LATENT_CHANNELS,
        num_layers=LAYERS[0],
        num_single_layers=LAYERS[1],
        attention_head_dim=32,
        num_attention_heads=HEADS,
        joint_attention_dim=TEXT_DIM,
        pooled_projection_dim=TEXT_DIM,
        guidance_embeds=False,
        axes_dims_rope=[8, 12, 12],
    )


class Denoiser(torch.nn.Module):
    """Text encoders + transformer, as FluxPipeline wires them (CLIP pooled, T5 states)."""

    def __init__(self, clip: CLIPTextModel, t5: T5EncoderModel, transformer: FluxTransformer2DModel):
        super().__init__()
        self.clip, self.t5, self.transformer = clip, t5, transformer
        h = w = SIZE // (2 ** len(VAE_BLOCKS))  # packed latent grid (2x2 patches of the latents)
        self.register_buffer("img_ids", FluxPipeline._prepare_latent_image_ids(1, h, w, "cpu", torch.float32))
        self.register_buffer("txt_ids", torch.zeros(MAX_SEQ, 3))

    def forward(self, packed, sigma, clip_ids, t5_ids):
        pooled = self.clip(clip_ids, output_hidden_states=False).pooler_output
        states = self.t5(t5_ids)[0]
        return self.transformer(
            hidden_states=packed,
            timestep=sigma,
            pooled_projections=pooled,
            encoder_hidden_states=states,
            txt_ids=self.txt_ids,
            img_ids=self.img_ids,
            return_dict=False,
        )[0]


def pack(latents: torch.Tensor) -> torch.Tensor:
    b, c, h, w = latents.shape
    return FluxPipeline._pack_latents(latents, b, c, h, w)


def sample_sigmas(batch: int, gen: torch.Generator) -> torch.Tensor:
    if SIGMA_DIST in ("high", "mid"):
        # Logit-normal, a quarter on the sampler's k/8 grid. "mid" centres it at 0.5 (SD3's
        # default): 2-3x the low-noise share of "high", where outlines are refined. "high"
        # centres it at sigma ~0.73, the noisy end, where the caption decides what the scene
        # holds (and where a 1-4 step sampler spends its first, decisive steps).
        centre = 1.0 if SIGMA_DIST == "high" else 0.0
        ln = torch.sigmoid(torch.randn(batch, generator=gen) + centre)
        grid = torch.randint(1, 9, (batch,), generator=gen).float() / 8
        return torch.where(torch.rand(batch, generator=gen) < 0.25, grid, ln)
    grid = torch.randint(1, 9, (batch,), generator=gen).float() / 8
    uniform = torch.rand(batch, generator=gen).clamp(min=1e-3)
    on_grid = torch.rand(batch, generator=gen) < GRID_FRACTION
    return torch.where(on_grid, grid, uniform)


def plain_model(model, world: int):
    """The model inside its DistributedDataParallel wrapper (when `world` > 1)."""
    return model.module if world > 1 else model


def train_flow(model, ema, latents, captions, text_ids, steps, batch, gen, rng, checkpoint=None, decoder=None,
               lr_max=8e-4, compile_model=True, deadline=None, rank=0, world=1, refine=None):
    """`checkpoint(step)` is called at 50% and 75% of the run (steps or time) (the EMA so far is saved), so a
    run cut short still leaves a usable model. `compile_model`: torch.compile (inductor) the
    denoiser — on CPU it fuses the elementwise work (RoPE, modulation, GELU) that dominates the
    eager step, ~2.3x faster after a ~3 min compile. `deadline` (time.time() value): stop early,
    with a log line, rather than overrun the training budget on a slower machine. `world` > 1:
    `model` is wrapped in DistributedDataParallel; every rank keeps the (identical) EMA, rank 0 logs
    and checkpoints. `refine` (see `refinement_inputs`): past REFINE_FROM of the run the decoder
    tuner's batches take the EMA transformer's predictions as inputs (interleaved refinement)."""
    say = log if rank == 0 else (lambda msg: None)
    plain = plain_model(model, world)
    opt = torch.optim.AdamW(model.parameters(), lr=lr_max, weight_decay=0.01, betas=(0.9, 0.99))
    forward = torch.compile(model) if compile_model else model
    n = latents.shape[0]
    ema_decay = 0.999 if steps > 3000 else 0.995 if steps > 500 else 0.9
    running = None
    start = time.time()
    checkpoints_left = [0.5, 0.75]
    spent = 0.0  # share of the time budget used, the same on every rank (synchronised below)
    for step in range(steps):
        # Cosine decay over whichever runs out first, steps or time: a run cut by the budget
        # still ends at a low learning rate.
        progress = max(step / steps, spent)
        lr = lr_max * min(1.0, (step + 1) / 100) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.randint(0, n, (batch,), generator=gen)
        x0 = latents[idx]
        flip = torch.rand(batch, generator=gen) < 0.5  # mirror images: every shape is left-right symmetric
        x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
        texts = ["" if rng.random() < CAPTION_DROPOUT else caption_variant(captions[i], rng) for i in idx.tolist()]
        clip_ids, t5_ids = text_ids(texts)
        noise = torch.randn(x0.shape, generator=gen)
        sigma = sample_sigmas(batch, gen)
        s = sigma[:, None, None, None]
        xt = (1 - s) * x0 + s * noise
        v = forward(pack(xt), sigma, clip_ids, t5_ids)
        loss = F.mse_loss(v, pack(noise - x0))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            if ema is not None:
                for pe, pm in zip(ema.parameters(), plain.parameters()):
                    pe.lerp_(pm, 1 - ema_decay)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if decoder is not None and step % DECODER_EVERY == 0:
            # Every rank takes the same branch: `progress` is synchronised (DDP decoder).
            if refine is not None and progress >= REFINE_FROM:
                decoder.step(batch=8, refine=refine)
            else:
                decoder.step()
        if step % 50 == 0 or step == steps - 1:
            rate = (step + 1) * batch * world / (time.time() - start)
            dec = f", decoder l1 {decoder.running:.4f}" if decoder is not None and decoder.running else ""
            say(f"flow step {step}/{steps}: loss {running:.4f} lr {lr:.2e} ({rate:.1f} samples/s){dec}")
        if checkpoint is not None and checkpoints_left and progress >= checkpoints_left[0]:
            checkpoints_left.pop(0)
            checkpoint(step + 1)
        if deadline is not None and step % 10 == 0:
            used = torch.tensor([(time.time() - start) / max(deadline - start, 1.0)])
            if world > 1:  # every rank stops at the same step (and sets the same lr)
                torch.distributed.all_reduce(used, op=torch.distributed.ReduceOp.MAX)
            spent = used.item()
            if spent >= 1.0:
                say(f"flow training stopped at step {step + 1}/{steps}: the time budget is spent")
                break


def refinement_inputs(decoder: DecoderTuner, ema: Denoiser, latents: torch.Tensor, captions: list[str], text_ids,
                      gen: torch.Generator):
    """The decoder refinement's inputs (`DecoderTuner.step(refine=...)`): for REFINE_SHARE of a
    batch's rows, the EMA transformer's x0 prediction of the row's training latents noised to one
    of REFINE_SIGMAS (in the VAE's raw latent scale); the other rows keep the encoder latents."""
    scale, shift = decoder.vae.config.scaling_factor, decoder.vae.config.shift_factor
    sigmas = torch.tensor(REFINE_SIGMAS)

    @torch.no_grad()
    def refine(idx: torch.Tensor):
        rows = (torch.rand(idx.shape[0], generator=gen) < REFINE_SHARE).nonzero()[:, 0]
        if rows.numel() == 0:
            return rows, decoder.raw[idx[rows]]
        x0 = latents[idx[rows]]
        sigma = sigmas[torch.randint(0, len(REFINE_SIGMAS), (rows.numel(),), generator=gen)]
        s = sigma[:, None, None, None]
        xt = (1 - s) * x0 + s * torch.randn(x0.shape, generator=gen)
        clip_ids, t5_ids = text_ids([captions[i] for i in idx[rows].tolist()])
        packed = pack(xt)
        v = ema(packed, sigma, clip_ids, t5_ids)
        size = x0.shape[-1] * latent_patch()
        x0_hat = FluxPipeline._unpack_latents(packed - sigma[:, None, None] * v, size, size, latent_patch())
        return rows, x0_hat / scale + shift

    return refine


def refine_decoder(decoder: DecoderTuner, refine, deadline: float, rank: int = 0, world: int = 1) -> None:
    """Phase 5: the decoder learns to turn the finished transformer's denoised predictions into
    the clean scene. A few-step sampler ends on the transformer's x0 prediction from sigma 1/n
    (n steps), which is a slightly blurred scene; these predictions of noised training latents at
    the last sigmas of 2-, 4- and 8-step sampling (and the plain encoder latents, the rest of
    the time) are the decoder's inputs, the renders its targets (measured effect: module
    docstring, phase 5). The decoder sees no caption: it sharpens what the latents say."""
    say = log if rank == 0 else (lambda msg: None)
    start, step, spent = time.time(), 0, 0.0
    while spent < 1.0:
        # Cosine from the tuner's rate to a tenth of it over the phase.
        lr = 5e-4 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * spent)))
        for g in decoder.opt.param_groups:
            g["lr"] = lr
        decoder.step(batch=8, refine=refine)
        if step % 10 == 0:
            used = torch.tensor([(time.time() - start) / max(deadline - start, 1.0)])
            if world > 1:
                torch.distributed.all_reduce(used, op=torch.distributed.ReduceOp.MAX)
            spent = used.item()
        if step % 200 == 0:
            say(f"decoder refinement step {step}: loss l1 {decoder.running:.4f} lr {lr:.2e}")
        step += 1
    say(f"decoder refinement: {step} steps x {world} ranks x 8 images in {(time.time() - start) / 60:.1f} min")


# ------------------------------------------------------------------------------------------------
# 5. Save and sample
# ------------------------------------------------------------------------------------------------


def save_pipeline(out: Path, ema: Denoiser, vae: AutoencoderKL, tok_dir: Path) -> None:
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    clip_tok = CLIPTokenizer.from_pretrained(tok_dir / "tokenizer")
    t5_tok = T5TokenizerFast.from_pretrained(tok_dir / "tokenizer_2")
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=ema.clip,
        tokenizer=clip_tok,
        text_encoder_2=ema.t5,
        tokenizer_2=t5_tok,
        transformer=ema.transformer,
    )
    if out.exists():
        shutil.rmtree(out)
    pipe.save_pretrained(out, safe_serialization=True)
    # Tokenizers exactly as the real repos ship them (no CLIP tokenizer.json).
    for name in ["tokenizer", "tokenizer_2"]:
        shutil.rmtree(out / name)
        shutil.copytree(tok_dir / name, out / name)
    index = json.loads((out / "model_index.json").read_text())
    index["tokenizer"] = ["transformers", "CLIPTokenizer"]
    index["tokenizer_2"] = ["transformers", "T5TokenizerFast"]
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    total = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    log(f"saved {out} ({total / 1e6:.1f} MB)")


@torch.no_grad()
def sample_grid(folder: Path, path: Path, prompts: list[str], steps_list=(1, 2, 4, 8), seeds=range(4)) -> None:
    """Samples with diffusers' own FluxPipeline from the saved folder: rows prompt x steps,
    columns seeds."""
    from PIL import Image

    pipe = FluxPipeline.from_pretrained(folder)
    rows = []
    for prompt in prompts:
        for steps in steps_list:
            row = []
            for seed in seeds:
                img = pipe(
                    prompt,
                    height=SIZE,
                    width=SIZE,
                    num_inference_steps=steps,
                    guidance_scale=0.0,
                    max_sequence_length=MAX_SEQ,
                    generator=torch.Generator().manual_seed(seed),
                    output_type="np",
                ).images[0]
                row.append((img * 255).round().astype(np.uint8))
            rows.append(np.concatenate(row, axis=1))
    Image.fromarray(np.concatenate(rows, axis=0)).save(path)
    log(f"samples: {path} (rows: {prompts} x steps {list(steps_list)})")


SAMPLE_PROMPTS = ["a red circle", "a blue square and a yellow triangle", "a yellow star on a black background"]


def flow_worker(rank: int, world: int, job: dict) -> None:
    """Phase 4 in one process: `world` of them train data-parallel (DistributedDataParallel over
    gloo, one thread each — on 2 cores two single-threaded processes do ~2x the samples/s of one
    two-threaded process: the ops of a model this small are too short to split across threads).
    Rank 0 keeps the EMA, tunes its share of the decoder, checkpoints and writes flow_result.pt."""
    globals().update(job["config"])
    torch.set_num_threads(job["threads"])
    if world > 1:
        torch.distributed.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{job['port']}", rank=rank, world_size=world)
    vae = build_vae()
    vae.load_state_dict(job["vae_state"])
    vae.register_to_config(shift_factor=job["vae_config"]["shift_factor"], scaling_factor=job["vae_config"]["scaling_factor"])
    for p_ in vae.parameters():
        p_.requires_grad_(False)
    tok_dir = job["tok_dir"]
    clip_tok = CLIPTokenizer.from_pretrained(tok_dir / "tokenizer")
    t5_tok = T5TokenizerFast.from_pretrained(tok_dir / "tokenizer_2")
    clip, t5 = build_text_encoders(len(clip_tok), len(t5_tok))
    model = Denoiser(clip, t5, build_transformer())
    model.load_state_dict(job["model_state"])
    # Every rank keeps the EMA (identical: the same updates of the same weights), so every rank's
    # share of the decoder refinement reads it.
    ema = copy.deepcopy(model)
    for p_ in ema.parameters():
        p_.requires_grad_(False)
    trained = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    images, scenes = load_data(job["data_dir"])
    captions = [s["caption"] for s in scenes]
    seed = job["seed"] * 1000 + rank
    gen, rng = torch.Generator().manual_seed(seed), random.Random(seed)

    def checkpoint(step: int) -> None:
        save_pipeline(job["out"], ema, vae, tok_dir)
        sample_grid(job["out"], job["work"] / f"samples-{step}.png", SAMPLE_PROMPTS, steps_list=(2, 4), seeds=range(3))

    decoder = DecoderTuner(vae, images, job["raw"], gen, distributed=world > 1)
    text_ids = TextIds(clip_tok, t5_tok)
    refine = refinement_inputs(decoder, ema, job["latents"], captions, text_ids, gen)
    train_flow(trained, ema, job["latents"], captions, text_ids, job["steps"], job["batch"], gen, rng,
               checkpoint if rank == 0 else None, decoder, compile_model=job["compile"], deadline=job["deadline"],
               rank=rank, world=world, refine=refine)
    # The refinement gets its minutes after the flow phase, within the whole budget (a pilot's
    # flow phase ends early, by steps).
    refine_deadline = min(time.time() + job["refine_seconds"], job["budget_end"])
    if job["refine_seconds"] > 0:
        ema.eval()
        refine_decoder(decoder, refine, refine_deadline, rank, world)
    if rank == 0:
        torch.save({"ema": ema.state_dict(), "decoder": vae.decoder.state_dict()}, job["work"] / "flow_result.pt")
    if world > 1:
        torch.distributed.destroy_process_group()



def main() -> None:
    global VAE_BLOCKS, HEADS, LAYERS, SIGMA_DIST, LATENT_CHANNELS, KL_WEIGHT, RGB_ANCHOR, SHAPE_ANCHOR, SHAPE_CODES, SHAPE_CODE_SCALE
    global REFINE_FROM
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "models" / "demo")
    p.add_argument("--work", type=Path, default=Path("/tmp/veto-demo-train"), help="data and checkpoints")
    p.add_argument("--scenes", type=int, default=20000)
    p.add_argument("--vae-steps", type=int, default=1500)
    p.add_argument("--flow-steps", type=int, default=12000, help="at most; the time budget usually ends it")
    p.add_argument("--no-compile", action="store_true", help="eager PyTorch (slower; no C++ compiler needed)")
    p.add_argument("--budget-minutes", type=float, default=58.0, help="stop the flow phase early past this")
    p.add_argument("--refine-minutes", type=float, default=0.0,
                   help="the budget's last minutes: decoder refinement on the transformer's predictions (off)")
    p.add_argument("--refine-from", type=float, default=REFINE_FROM,
                   help="share of the flow phase after which the decoder tuner refines on the EMA's predictions "
                        "(1: never, the committed weights; session 11: 0.4 gave 47%% right objects on one-object "
                        "prompts at 4 steps against 51%%, in 7%% fewer flow steps)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=2, help="CPU threads in all")
    p.add_argument("--procs", type=int, default=2, help="data-parallel training processes (threads split among them)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae-blocks", default=",".join(map(str, VAE_BLOCKS)), help="VAE block widths (3: 4x, 4: 8x)")
    p.add_argument("--latent-channels", type=int, default=LATENT_CHANNELS)
    p.add_argument("--kl", type=float, default=KL_WEIGHT, help="VAE KL weight")
    p.add_argument("--rgb-anchor", type=float, default=RGB_ANCHOR, help="VAE: latent channels 0-2 ~ pooled RGB")
    p.add_argument("--shape-anchor", type=float, default=SHAPE_ANCHOR, help="VAE: latent channels 3.. ~ shape code")
    p.add_argument("--shape-code-scale", type=float, default=SHAPE_CODE_SCALE, help="length of a full patch's code")
    p.add_argument("--shape-code", choices=sorted(SHAPE_CODE_SETS), default="planar",
                   help="planar: 2 channels, four directions (the committed weights); onehot: 4 channels "
                        "(session 10: its encoder fit the code 6x worse after 1,500 VAE steps, mse 0.016 vs 0.0027; "
                        "that run was stopped)")
    p.add_argument("--heads", type=int, default=HEADS, help="transformer heads of 32 channels")
    p.add_argument("--layers", default=",".join(map(str, LAYERS)), help="double,single transformer blocks")
    p.add_argument("--sigmas", choices=["grid", "high", "mid"], default=SIGMA_DIST, help="training sigma distribution")
    p.add_argument("--pilot", action="store_true", help="a few minutes: check losses fall and samples look right")
    a = p.parse_args()
    if a.pilot:
        a.scenes, a.vae_steps, a.flow_steps = min(a.scenes, 3000), 80, 200
        a.refine_minutes = min(a.refine_minutes, 1.0)
    LATENT_CHANNELS, KL_WEIGHT, RGB_ANCHOR, SHAPE_ANCHOR = a.latent_channels, a.kl, a.rgb_anchor, a.shape_anchor
    SHAPE_CODES, SHAPE_CODE_SCALE = SHAPE_CODE_SETS[a.shape_code], a.shape_code_scale
    if SHAPE_ANCHOR > 0 and LATENT_CHANNELS < 3 + len(SHAPE_CODES[0]):
        p.error(f"--shape-anchor with --shape-code {a.shape_code} needs --latent-channels >= {3 + len(SHAPE_CODES[0])}")
    VAE_BLOCKS = [int(v) for v in a.vae_blocks.split(",")]
    HEADS, LAYERS, SIGMA_DIST = a.heads, tuple(int(v) for v in a.layers.split(",")), a.sigmas
    REFINE_FROM = a.refine_from
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    gen = torch.Generator().manual_seed(a.seed)
    rng = random.Random(a.seed)
    t0 = time.time()

    data_dir = a.work / f"data-{a.scenes}"
    render_data(data_dir, a.scenes, seed=1)
    images, scenes = load_data(data_dir)
    captions = [s["caption"] for s in scenes]
    log(f"{len(scenes)} scenes; e.g. {captions[:3]}")

    tok_dir = a.work / "tokenizers"
    clip_tok, t5_tok = build_tokenizers(tok_dir, tokenizer_corpus(scenes))
    text_ids = TextIds(clip_tok, t5_tok)

    vae = build_vae()
    # The shape-anchor targets (read from shapes.npy) only when the anchor is on.
    shape_codes = load_shape_codes(data_dir) if SHAPE_ANCHOR > 0 else None
    train_vae(vae, images, shape_codes, a.vae_steps, 8, gen)
    vae.eval()
    with torch.no_grad():
        from PIL import Image

        x = to_pixels(images[:8])
        rec = vae.decode(vae.encode(x).latent_dist.mean).sample
        grid = torch.cat([x, rec], dim=2).clamp(-1, 1).add(1).mul(127.5).round().byte()
        Image.fromarray(torch.cat(list(grid), dim=2).permute(1, 2, 0).numpy()).save(a.work / "vae_recon.png")
    raw = encode_all(vae, images)
    shift, std = raw.mean().item(), raw.std().item()
    vae.register_to_config(shift_factor=round(shift, 4), scaling_factor=round(1.0 / std, 4))
    latents = (raw - vae.config.shift_factor) * vae.config.scaling_factor
    log(f"latents {tuple(latents.shape)}: shift_factor {vae.config.shift_factor}, scaling_factor {vae.config.scaling_factor}")
    for p_ in vae.parameters():
        p_.requires_grad_(False)

    clip, t5 = build_text_encoders(len(clip_tok), len(t5_tok))
    model = Denoiser(clip, t5, build_transformer())
    log(f"transformer {sum(p.numel() for p in model.transformer.parameters()) / 1e6:.2f}M params, "
        f"text encoders {sum(p.numel() for p in [*clip.parameters(), *t5.parameters()]) / 1e6:.2f}M")
    job = dict(
        config=dict(VAE_BLOCKS=VAE_BLOCKS, HEADS=HEADS, LAYERS=LAYERS, SIGMA_DIST=SIGMA_DIST,
                    LATENT_CHANNELS=LATENT_CHANNELS, KL_WEIGHT=KL_WEIGHT, RGB_ANCHOR=RGB_ANCHOR, REFINE_FROM=REFINE_FROM),
        data_dir=data_dir, tok_dir=tok_dir, out=a.out, work=a.work, latents=latents, raw=raw,
        vae_state=vae.state_dict(), vae_config={k: vae.config[k] for k in ("shift_factor", "scaling_factor")}, model_state=model.state_dict(),
        steps=a.flow_steps, batch=a.batch, seed=a.seed, threads=max(1, a.threads // a.procs),
        compile=not a.no_compile, deadline=t0 + (a.budget_minutes - a.refine_minutes) * 60 - 90,
        refine_seconds=a.refine_minutes * 60, budget_end=t0 + a.budget_minutes * 60 - 90,
        port=29500 + os.getpid() % 1000,
    )
    if a.procs > 1:
        torch.multiprocessing.spawn(flow_worker, args=(a.procs, job), nprocs=a.procs, join=True)
    else:
        flow_worker(0, 1, job)
    result = torch.load(a.work / "flow_result.pt")
    ema = copy.deepcopy(model)
    ema.load_state_dict(result["ema"])
    vae.decoder.load_state_dict(result["decoder"])
    vae.eval()

    save_pipeline(a.out, ema, vae, tok_dir)
    log(f"training took {(time.time() - t0) / 60:.1f} min")
    sample_grid(a.out, a.work / "samples.png", SAMPLE_PROMPTS)


if __name__ == "__main__":
    main()
