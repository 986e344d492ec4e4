#!/usr/bin/env python3
"""Golden fixtures for veto's SD3 / SD3.5 (MMDiT) implementation.

Builds tiny random Stable Diffusion 3 pipelines in the folder layout of the real Hugging Face repos
(an SD3.5-Large(-Turbo)-like one, an SD3.5-Medium-like MMDiT-X one, and a lone SD3-Medium-like
transformer without qk norm), a reference MMDiT forward with the guidance methods veto implements
(none, NAG, NASA, VSF in the paper's and in the official code's layout), a reference
text -> latents -> image pipeline (with CFG and CFG+NAG), and writes small f32 safetensors fixtures
that the Rust tests compare against.

Everything runs on the CPU in f32 with fixed seeds; running the script twice writes identical
files. Developers run it; CI never does:

    /work/venv/ref/bin/python tools/reference/sd3_reference.py

The tokenizer builders, the random-weight initialiser, the deterministic safetensors writer and the
elementary ops (LayerNorm, RMSNorm, timestep sinusoid, NAG/NASA combination) come from
flux_reference.py, unchanged. See tools/reference/README.md and tests/fixtures/sd3/README.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # before transformers is imported

sys.path.insert(0, str(Path(__file__).resolve().parent))

import diffusers  # noqa: E402
import numpy as np  # noqa: E402
import sentencepiece as spm  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402
from diffusers import (  # noqa: E402
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from safetensors.torch import load_file  # noqa: E402
from transformers import (  # noqa: E402
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5TokenizerFast,
)

from flux_reference import (  # noqa: E402
    CLIP_BOS,
    CLIP_EOS,
    CLIP_MAX_LENGTH,
    CLIP_NUM_MERGES,
    AttnGuidance,
    build_t5,
    clip_encode_reference,
    corpus_lines,
    gelu_tanh,
    guide,
    layer_norm,
    learn_clip_bpe,
    linear,
    max_abs,
    merge_heads,
    mlp2,
    modulate,
    randomize_,
    rel,
    rms_norm,
    silu,
    split_heads,
    timestep_sinusoid,
    train_t5_spiece,
    write_clip_tokenizer,
    write_safetensors,
    write_t5_tokenizer,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = REPO_ROOT / "tests" / "fixtures" / "sd3"

PROMPT = "a photo of a cat wearing glasses"
NEGATIVE_PROMPT = "glasses, blurry"
HEIGHT = WIDTH = 64  # latents 16 x 8 x 8 -> 4 x 4 = 16 image tokens after 2 x 2 patchify
MAX_SEQUENCE_LENGTH = 16  # T5 tokens; the padded context is 77 + 16 = 93 tokens
STEPS = 4
CFG_SCALE = 2.0  # guidance_scale of the cfg cases (the others run Turbo-like, guidance_scale 0)
TRANSFORMER_TIMESTEP = 812.5  # as passed to the transformer: t on the 0..1000 scale (no x1000 inside)

# CLIP-G pads with "!" in the real SD3 repos (tokenizer_2), CLIP-L with <|endoftext|>.
CLIP_G_PAD = "!"

# Shard sizes: the SD3.5-Large-like transformer and both T5 encoders are saved in several shards plus
# an index, as the real checkpoints are; the SD3.5-Medium / SD3-Medium transformers are single files.
TRANSFORMER_SHARD_SIZE = "200KB"
T5_SHARD_SIZE = "100KB"


# --------------------------------------------------------------------------------------------
# Guidance of one transformer call.
# --------------------------------------------------------------------------------------------


# NAG/NASA values written to the metadata of cases that do not use them (nag_scale 1 = off); the
# others are the SD3 NAG defaults, so a test may read them unconditionally.
NEUTRAL_ATTN = AttnGuidance(mode="none", nag_scale=1.0, nag_tau=2.5, nag_alpha=0.125, nag_norm="l1", nasa_scale=0.0)


@dataclass(frozen=True)
class Sd3Guidance:
    """Attention-space guidance of one MMDiT call.

    mode: none | nag | nasa | vsf. NAG/NASA parameters live in `attn` (flux_reference's
    AttnGuidance, combined by its `guide`); `nag_pooled` picks the pooled vector whose temb
    modulates the negative text stream (positive: the official diffusers SD3 NAG pipeline;
    negative: the official ComfyUI node). VSF: alpha = vsf_scale, beta = vsf_bias,
    layout paper | official.
    """

    mode: str = "none"
    attn: AttnGuidance = NEUTRAL_ATTN
    nag_pooled: str = "positive"
    vsf_scale: float = 0.0
    vsf_bias: float = 0.0
    vsf_layout: str = "paper"

    def metadata(self) -> dict[str, str]:
        return {
            "guidance": self.mode,
            **self.attn.metadata(),
            "nag_pooled": self.nag_pooled,
            "vsf_scale": repr(self.vsf_scale),
            "vsf_bias": repr(self.vsf_bias),
            "vsf_layout": self.vsf_layout,
        }


SD3_NONE = Sd3Guidance()
# NAG paper, Table 5 (SD3.5-Large): phi = 4, i.e. s = phi + 1 = 5; tau 2.5, alpha 0.125. The official
# SD3 NAG processor uses the L1 norm (the paper's), as does our fixture.
NAG_PARAMS = AttnGuidance(mode="nag", nag_scale=5.0, nag_tau=2.5, nag_alpha=0.125, nag_norm="l1")
SD3_NAG = Sd3Guidance(mode="nag", attn=NAG_PARAMS)
SD3_NAG_NEG_POOLED = replace(SD3_NAG, nag_pooled="negative")
SD3_NASA = Sd3Guidance(mode="nasa", attn=replace(NEUTRAL_ATTN, mode="nasa", nasa_scale=0.5))
SD3_VSF_PAPER = Sd3Guidance(mode="vsf", vsf_scale=3.5, vsf_bias=0.1, vsf_layout="paper")
SD3_VSF_OFFICIAL = replace(SD3_VSF_PAPER, vsf_layout="official")


# --------------------------------------------------------------------------------------------
# VSF attention layouts, as tables of which key block each query group sees (and with what bias).
#
# paper (VSF paper 3.2-3.3): context [P, N0]; an extra key/value block N1 = (keys of N0,
# -alpha * values of N0). Image queries see I, P and N1 (bias -beta); P sees I, P; N0 sees I, N0.
#
# official (weathon/VSF src/sd3_pipeline.py + src/processor.py): context [P, Na, Nb] (the unpadded
# negative twice); an extra key/value block Nb' = (keys of Nb, -alpha * values of Nb). Image queries
# see I, P, Na (unflipped!) and Nb' (bias -beta); P and Na see I, P, Na; Nb sees I, Nb. The official
# mask is written with `pos_len` measured after [P, N] was already concatenated (|P| + |N|), which is
# why Na ends up visible to the image and to P.
# --------------------------------------------------------------------------------------------

# query group -> {key block: logit bias}; a key block that is not listed is masked out.
VSF_VISIBILITY = {
    "paper": {
        "I": {"I": 0.0, "P": 0.0, "N1": "-beta"},
        "P": {"I": 0.0, "P": 0.0},
        "N0": {"I": 0.0, "N0": 0.0},
    },
    "official": {
        "I": {"I": 0.0, "P": 0.0, "Na": 0.0, "Nb'": "-beta"},
        "P": {"I": 0.0, "P": 0.0, "Na": 0.0},
        "Na": {"I": 0.0, "P": 0.0, "Na": 0.0},
        "Nb": {"I": 0.0, "Nb": 0.0},
    },
}
# Order of the query groups (= image rows, then the context stream) and of the key blocks.
VSF_QUERY_GROUPS = {"paper": ["I", "P", "N0"], "official": ["I", "P", "Na", "Nb"]}
VSF_KEY_BLOCKS = {"paper": ["I", "P", "N0", "N1"], "official": ["I", "P", "Na", "Nb", "Nb'"]}
VSF_FLIPPED = {"paper": ("N1", "N0"), "official": ("Nb'", "Nb")}  # flipped block, and its source


def vsf_group_sizes(layout: str, n_img: int, n_pos: int, n_neg: int) -> dict[str, int]:
    sizes = {"I": n_img, "P": n_pos}
    for name in VSF_KEY_BLOCKS[layout][2:]:
        sizes[name] = n_neg
    return sizes


def vsf_dense_bias(layout: str, n_img: int, n_pos: int, n_neg: int, beta: float) -> torch.Tensor:
    """The [queries, keys] additive logit bias (0, -beta or -inf) of a VSF layout."""
    sizes = vsf_group_sizes(layout, n_img, n_pos, n_neg)
    rows = []
    for q in VSF_QUERY_GROUPS[layout]:
        cols = []
        for k in VSF_KEY_BLOCKS[layout]:
            entry = VSF_VISIBILITY[layout][q].get(k)
            value = -math.inf if entry is None else (-beta if entry == "-beta" else entry)
            cols.append(torch.full((sizes[q], sizes[k]), value))
        rows.append(torch.cat(cols, dim=1))
    return torch.cat(rows, dim=0)


# --------------------------------------------------------------------------------------------
# Reference MMDiT forward, written out op by op on the weights of a diffusers
# SD3Transformer2DModel, with attention guidance.
#
# Unguided (= diffusers): image tokens = patchify conv + cropped 2-D sin-cos position embedding;
# temb = timestep_embedder(sinusoid(t)) + text_embedder(pooled); context = context_embedder(text).
# Each JointTransformerBlock: AdaLN-Zero on both streams (SD35AdaLayerNormZeroX with a second
# modulation for the image-only attn2 in the MMDiT-X blocks; AdaLayerNormContinuous on the
# context of the last, context_pre_only block); joint attention over [image ; context] with
# optional RMS qk norms; image: + gate * to_out(attn), + gate2 * attn2 (MMDiT-X), + gate_mlp *
# ff; context: + c_gate * to_add_out(attn), + c_gate_mlp * ff_context. Output: norm_out
# (AdaLayerNormContinuous, scale first) -> proj_out -> unpatchify.
#
# NAG / NASA (official SD3 NAG code): the negative text is a second context stream through every
# block, modulated by its own temb (timestep + pooled: the positive pooled vector by default, as
# the official diffusers pipeline passes it; the negative one with nag_pooled = negative); the
# image stream exists once and is modulated by the positive temb; the negative stream attends over
# [image ; negative context] with the same image q/k/v; the image rows of the attention output
# (heads merged, before to_out) become guide(Z+, Z-); text rows keep their own outputs. attn2 of
# MMDiT-X blocks is plain image self-attention (no text, no guidance).
#
# VSF: one context stream (modulated by the positive temb; the official pipeline never uses the
# negative pooled vector) holding the positive and the unpadded negative context, see the layout
# tables above; guidance acts inside the joint attention of every block (not attn2).
# --------------------------------------------------------------------------------------------


def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """[sin | cos] of pos * 10000^(-2i/dim), computed in f64 as diffusers does."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    out = torch.outer(pos.reshape(-1).to(torch.float64), omega)
    return torch.cat([out.sin(), out.cos()], dim=1)


def sd3_pos_embed_table(embed_dim: int, max_size: int, base_size: int) -> torch.Tensor:
    """The [max_size^2, embed_dim] position table (row-major over (row, col)): the first half of the
    channels encodes the column, the second half the row, positions scaled by base_size / max_size
    (base_size = sample_size // patch_size)."""
    coords = torch.arange(max_size, dtype=torch.float32) / (max_size / base_size)
    col = coords[None, :].expand(max_size, max_size)
    row = coords[:, None].expand(max_size, max_size)
    return torch.cat([sincos_1d(embed_dim // 2, col), sincos_1d(embed_dim // 2, row)], dim=1).float()


def patch_embed(tr: SD3Transformer2DModel, latents: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/p)(W/p), D]: patchify conv plus the centre crop of the position table."""
    pe = tr.pos_embed
    p = tr.config.patch_size
    x = F.conv2d(latents, pe.proj.weight, pe.proj.bias, stride=p).flatten(2).transpose(1, 2)
    h, w = latents.shape[-2] // p, latents.shape[-1] // p
    m = tr.config.pos_embed_max_size
    table = sd3_pos_embed_table(x.shape[-1], m, tr.config.sample_size // p).reshape(m, m, -1)
    top, left = (m - h) // 2, (m - w) // 2
    return x + table[top : top + h, left : left + w].reshape(1, h * w, -1)


def unpatchify(x: torch.Tensor, h: int, w: int, p: int, c: int) -> torch.Tensor:
    """[B, (h/p)(w/p), p*p*c] (channels ordered (dy, dx, c)) -> [B, c, h, w]."""
    b = x.shape[0]
    return x.reshape(b, h // p, w // p, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, h, w)


def conditioning(tr: SD3Transformer2DModel, timestep: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    tte = tr.time_text_embed
    return mlp2(timestep_sinusoid(timestep), tte.timestep_embedder) + mlp2(pooled, tte.text_embedder)


def qkv(attn, x, to_q, to_k, to_v, norm_q, norm_k):
    hd = to_q.out_features // attn.heads
    q, k, v = (split_heads(linear(x, layer), hd) for layer in (to_q, to_k, to_v))
    if norm_q is not None:
        q, k = rms_norm(q, norm_q), rms_norm(k, norm_k)
    return q, k, v


def attention(q, k, v, bias=None) -> torch.Tensor:
    """Softmax attention over [B, heads, seq, head_dim] with an optional additive [Lq, Lk] logit
    bias (added after the 1/sqrt(d) scaling); returns heads merged."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if bias is not None:
        scores = scores + bias
    return merge_heads(scores.softmax(-1) @ v)


def attention_by_key_blocks(q, k, v, layout, sizes, beta) -> torch.Tensor:
    """VSF attention computed per (query group, key block) and merged with log-sum-exp, the way the
    Rust side does it without a dense mask. Must equal `attention(q, k, v, vsf_dense_bias(...))`."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    starts_k, at = {}, 0
    for name in VSF_KEY_BLOCKS[layout]:
        starts_k[name] = (at, at + sizes[name])
        at += sizes[name]
    outs, at = [], 0
    for qg in VSF_QUERY_GROUPS[layout]:
        qq = q[:, :, at : at + sizes[qg]]
        at += sizes[qg]
        parts = []
        for kb, entry in VSF_VISIBILITY[layout][qg].items():
            a, b = starts_k[kb]
            s = qq @ k[:, :, a:b].transpose(-1, -2) * scale - (beta if entry == "-beta" else 0.0)
            parts.append((torch.logsumexp(s, -1, keepdim=True), s.softmax(-1) @ v[:, :, a:b]))
        lse = torch.logsumexp(torch.cat([l for l, _ in parts], -1), -1, keepdim=True)
        outs.append(sum(torch.exp(l - lse) * o for l, o in parts))
    return merge_heads(torch.cat(outs, dim=2))


def ff(net, x):
    """FeedForward(gelu-approximate): proj -> tanh-GELU -> linear."""
    return linear(gelu_tanh(linear(x, net[0].proj)), net[2])


def joint_block(blk, img, ctxs, temb, ctx_tembs, g: Sd3Guidance, vsf_sizes=None, check=None):
    """One JointTransformerBlock. img [1, Si, D]; ctxs / ctx_tembs: one entry per context stream
    (2 for NAG/NASA: positive, negative). Returns (img, ctxs or None for context_pre_only)."""
    attn = blk.attn
    n_img = img.shape[1]
    mods = linear(silu(temb), blk.norm1.linear).chunk(9 if blk.use_dual_attention else 6, dim=-1)
    shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = mods[:6]
    img_ln = layer_norm(img)
    img_n = modulate(img_ln, shift, scale)
    qi, ki, vi = qkv(attn, img_n, attn.to_q, attn.to_k, attn.to_v, attn.norm_q, attn.norm_k)

    img_outs, ctx_outs, ctx_mods = [], [], []
    for ctx, ct in zip(ctxs, ctx_tembs):
        if blk.context_pre_only:
            c_scale, c_shift = linear(silu(ct), blk.norm1_context.linear).chunk(2, dim=-1)  # scale first
            ctx_n = modulate(layer_norm(ctx), c_shift, c_scale)
            ctx_mods.append(None)
        else:
            c = linear(silu(ct), blk.norm1_context.linear).chunk(6, dim=-1)
            ctx_n = modulate(layer_norm(ctx), c[0], c[1])
            ctx_mods.append(c)
        qc, kc, vc = qkv(attn, ctx_n, attn.add_q_proj, attn.add_k_proj, attn.add_v_proj, attn.norm_added_q, attn.norm_added_k)
        q = torch.cat([qi, qc], dim=2)
        if g.mode == "vsf":
            # The flipped copy: keys of the source negative block, values times -alpha, appended last.
            src = vsf_sizes["P"] + (0 if g.vsf_layout == "paper" else vsf_sizes["Na"])
            k = torch.cat([ki, kc, kc[:, :, src:]], dim=2)
            v = torch.cat([vi, vc, -g.vsf_scale * vc[:, :, src:]], dim=2)
            n_neg = vsf_sizes[VSF_FLIPPED[g.vsf_layout][1]]
            bias = vsf_dense_bias(g.vsf_layout, n_img, vsf_sizes["P"], n_neg, g.vsf_bias)
            out = attention(q, k, v, bias)
            if check is not None:
                check.append(max_abs(out, attention_by_key_blocks(q, k, v, g.vsf_layout, vsf_sizes, g.vsf_bias)))
        else:
            out = attention(q, torch.cat([ki, kc], dim=2), torch.cat([vi, vc], dim=2))
        img_outs.append(out[:, :n_img])
        ctx_outs.append(out[:, n_img:])

    img_attn = guide(img_outs[0], img_outs[1], g.attn) if g.mode in ("nag", "nasa") else img_outs[0]
    img = img + gate[:, None] * linear(img_attn, attn.to_out[0])
    if blk.use_dual_attention:
        # attn2: plain self-attention of the image on its second modulation of the block input.
        shift2, scale2, gate2 = mods[6:]
        a2 = blk.attn2
        q2, k2, v2 = qkv(a2, modulate(img_ln, shift2, scale2), a2.to_q, a2.to_k, a2.to_v, a2.norm_q, a2.norm_k)
        img = img + gate2[:, None] * linear(attention(q2, k2, v2), a2.to_out[0])
    img = img + gate_mlp[:, None] * ff(blk.ff.net, modulate(layer_norm(img), shift_mlp, scale_mlp))

    if blk.context_pre_only:
        return img, None
    new_ctxs = []
    for ctx, out, c in zip(ctxs, ctx_outs, ctx_mods):
        ctx = ctx + c[2][:, None] * linear(out, attn.to_add_out)
        ctx = ctx + c[5][:, None] * ff(blk.ff_context.net, modulate(layer_norm(ctx), c[3], c[4]))
        new_ctxs.append(ctx)
    return img, new_ctxs


@torch.no_grad()
def mmdit_forward(
    tr: SD3Transformer2DModel,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    pooled: torch.Tensor,
    timestep: torch.Tensor,
    g: Sd3Guidance = SD3_NONE,
    neg_encoder_hidden_states: torch.Tensor | None = None,
    neg_pooled: torch.Tensor | None = None,
    vsf_neg_encoder_hidden_states: torch.Tensor | None = None,
    record: dict | None = None,
    check: list | None = None,
) -> torch.Tensor:
    """The SD3 transformer (batch 1) with guidance g; see the comment above. `record` collects
    per-block states; `check` collects max|dense - LSE-merged| of every VSF attention."""
    h, w = hidden_states.shape[-2:]
    img = patch_embed(tr, hidden_states)
    temb = conditioning(tr, timestep, pooled)
    pos_ctx = linear(encoder_hidden_states, tr.context_embedder)
    vsf_sizes = None
    if g.mode in ("nag", "nasa"):
        neg_temb = conditioning(tr, timestep, neg_pooled if g.nag_pooled == "negative" else pooled)
        ctxs = [pos_ctx, linear(neg_encoder_hidden_states, tr.context_embedder)]
        ctx_tembs = [temb, neg_temb]
    elif g.mode == "vsf":
        neg = linear(vsf_neg_encoder_hidden_states, tr.context_embedder)
        copies = 1 if g.vsf_layout == "paper" else 2
        ctxs = [torch.cat([pos_ctx] + [neg] * copies, dim=1)]
        ctx_tembs = [temb]
        vsf_sizes = vsf_group_sizes(g.vsf_layout, img.shape[1], pos_ctx.shape[1], neg.shape[1])
    else:
        ctxs, ctx_tembs = [pos_ctx], [temb]

    for i, blk in enumerate(tr.transformer_blocks):
        img, ctxs = joint_block(blk, img, ctxs, temb, ctx_tembs, g, vsf_sizes, check)
        if record is not None:
            record[f"block_{i}_img"] = img
            if ctxs is not None:
                record[f"block_{i}_txt"] = ctxs[0]
                if len(ctxs) > 1:
                    record[f"block_{i}_txt_neg"] = ctxs[1]

    scale, shift = linear(silu(temb), tr.norm_out.linear).chunk(2, dim=-1)  # scale first
    out = linear(modulate(layer_norm(img), shift, scale), tr.proj_out)
    return unpatchify(out, h, w, tr.config.patch_size, tr.config.out_channels)


# --------------------------------------------------------------------------------------------
# Text encoding (StableDiffusion3Pipeline.encode_prompt, and the official VSF pipeline's unpadded
# negative).
# --------------------------------------------------------------------------------------------


@dataclass
class Sd3Text:
    clip_l_ids: torch.Tensor  # [1, Lc] int64
    clip_g_ids: torch.Tensor  # [1, Lc] int64
    t5_ids: torch.Tensor  # [1, Lt] int64
    clip_l_hidden: torch.Tensor  # penultimate hidden states [1, Lc, hL]
    clip_g_hidden: torch.Tensor  # [1, Lc, hG]
    clip_l_embeds: torch.Tensor  # text_embeds (projected pooled) [1, 32]
    clip_g_embeds: torch.Tensor  # [1, 32]
    t5_hidden: torch.Tensor  # [1, Lt, D]
    prompt_embeds: torch.Tensor  # [1, Lc + Lt, D]
    pooled: torch.Tensor  # [1, 64]


@torch.no_grad()
def encode_prompt(pipe: StableDiffusion3Pipeline, text: str, padded: bool = True) -> Sd3Text:
    """padded (the diffusers pipeline): both CLIPs padded to 77 (CLIP-L with <|endoftext|>, CLIP-G
    with "!"), T5 padded with <pad> to max_sequence_length, all truncating. Unpadded (the official
    VSF pipeline's negative prompt): CLIP ids [BOS, tokens, EOS] and T5 ids [tokens, </s>] at their
    natural lengths (still truncated to 77 / max_sequence_length).

    CLIP: penultimate hidden states of each encoder, concatenated on the channel dim (L then G),
    zero-padded on the channel dim to the T5 width; pooled = [text_embeds L | text_embeds G]; T5:
    last hidden state without attention mask; prompt_embeds = [CLIP part ; T5 part] on the sequence."""
    clip_pad = "max_length" if padded else "longest"  # "longest" of a single prompt = no padding
    outs = []
    for tok, enc in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
        ids = tok(text, padding=clip_pad, max_length=CLIP_MAX_LENGTH, truncation=True, return_tensors="pt").input_ids
        o = enc(ids, output_hidden_states=True)
        outs.append((ids.to(torch.int64), o.hidden_states[-2], o.text_embeds))
    t5_ids = pipe.tokenizer_3(
        text, padding="max_length" if padded else False, max_length=MAX_SEQUENCE_LENGTH, truncation=True,
        add_special_tokens=True, return_tensors="pt",
    ).input_ids.to(torch.int64)
    t5_hidden = pipe.text_encoder_3(t5_ids)[0]
    clip = torch.cat([outs[0][1], outs[1][1]], dim=-1)
    clip = F.pad(clip, (0, t5_hidden.shape[-1] - clip.shape[-1]))
    return Sd3Text(
        clip_l_ids=outs[0][0], clip_g_ids=outs[1][0], t5_ids=t5_ids,
        clip_l_hidden=outs[0][1], clip_g_hidden=outs[1][1],
        clip_l_embeds=outs[0][2], clip_g_embeds=outs[1][2], t5_hidden=t5_hidden,
        prompt_embeds=torch.cat([clip, t5_hidden], dim=1),
        pooled=torch.cat([outs[0][2], outs[1][2]], dim=-1),
    )


# --------------------------------------------------------------------------------------------
# Reference pipeline (StableDiffusion3Pipeline with guidance).
# --------------------------------------------------------------------------------------------


def sd3_sigmas(config, steps: int) -> torch.Tensor:
    """FlowMatchEulerDiscreteScheduler (static shift s) as the SD3 pipeline drives it: the scheduler
    is built with sigma_min = shift(1/1000) (in f32), set_timesteps takes
    t = linspace(1000, 1000 sigma_min, n) (f64), sigma = t / 1000 and shifts it AGAIN,
    shift(x) = s x / (1 + (s - 1) x); then f32, with a final 0 appended."""
    assert not config.use_dynamic_shifting
    s = config.shift
    n_train = config.num_train_timesteps
    train = torch.from_numpy(np.linspace(1, n_train, n_train, dtype=np.float32)[::-1].copy()) / n_train
    train = s * train / (1 + (s - 1) * train)
    sigma_max, sigma_min = train[0].item(), train[-1].item()
    sigmas = np.linspace(sigma_max * n_train, sigma_min * n_train, steps) / n_train
    sigmas = s * sigmas / (1 + (s - 1) * sigmas)
    return torch.cat([torch.from_numpy(sigmas).to(torch.float32), torch.zeros(1)])


@dataclass(frozen=True)
class PipelineCase:
    name: str
    guidance: str  # none | nag | nasa | vsf | cfg | cfg+nag (as --guidance spells it)
    attn: Sd3Guidance = SD3_NONE
    guidance_scale: float = 0.0  # CFG when > 1 (batched [uncond, cond] in diffusers)
    save_image: bool = False


@torch.no_grad()
def reference_pipeline(pipe: StableDiffusion3Pipeline, case: PipelineCase, init_latents: torch.Tensor):
    """Runs the denoising loop; returns (timesteps [K], per-step latents, raw decoded image or None).

    CFG: v = v_uncond + c (v_cond - v_uncond), v_uncond from a plain pass on the padded negative
    prompt (embeds and pooled). CFG+NAG as the official SD3 NAG pipeline batches it: the uncond row
    is plain, NAG acts on the cond row, with the CFG negative (padded) as the NAG negative and the
    positive pooled vector for the NAG stream's temb."""
    tr = pipe.transformer
    pos = encode_prompt(pipe, PROMPT)
    neg = encode_prompt(pipe, NEGATIVE_PROMPT)
    vsf_neg = encode_prompt(pipe, NEGATIVE_PROMPT, padded=False)
    sigmas = sd3_sigmas(pipe.scheduler.config, STEPS)
    timesteps = sigmas[:-1] * 1000
    latents = init_latents
    steps = []
    for k, t in enumerate(timesteps):
        timestep = t.expand(1)
        v = mmdit_forward(
            tr, latents, pos.prompt_embeds, pos.pooled, timestep, case.attn,
            neg_encoder_hidden_states=neg.prompt_embeds, neg_pooled=neg.pooled,
            vsf_neg_encoder_hidden_states=vsf_neg.prompt_embeds,
        )
        if case.guidance_scale > 1.0:
            v_uncond = mmdit_forward(tr, latents, neg.prompt_embeds, neg.pooled, timestep)
            v = v_uncond + case.guidance_scale * (v - v_uncond)
        latents = latents + (sigmas[k + 1] - sigmas[k]) * v  # Euler step
        steps.append(latents)
    image = decode(pipe.vae, steps[-1]) if case.save_image else None
    return timesteps, steps, image


@torch.no_grad()
def decode(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """Raw VAE decode output (before clamping/postprocessing)."""
    return vae.decode(latents / vae.config.scaling_factor + vae.config.shift_factor).sample


# --------------------------------------------------------------------------------------------
# Building and saving the pipeline folders.
# --------------------------------------------------------------------------------------------


def transformer_config(model: str) -> dict:
    base = dict(
        sample_size=8,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        caption_projection_dim=32,
        pooled_projection_dim=64,
        pos_embed_max_size=16,
        qk_norm="rms_norm",
        dual_attention_layers=(),
    )
    if model == "medium":  # SD3.5-Medium-like MMDiT-X
        base.update(num_layers=3, dual_attention_layers=(0, 1))
    elif model == "sd3medium":  # SD3-Medium-like: no qk norm
        base.update(qk_norm=None)
    return base


TRANSFORMER_SEEDS = {"large": 211, "medium": 212, "sd3medium": 213}


def build_transformer(model: str) -> SD3Transformer2DModel:
    tr = SD3Transformer2DModel(**transformer_config(model))
    randomize_(tr, seed=TRANSFORMER_SEEDS[model])
    return tr.eval()


def build_vae() -> AutoencoderKL:
    """SD3-like VAE (16 latent channels, factor 8, no quant convs, scaling 1.5305 / shift 0.0609),
    made narrow (8 channels everywhere) to keep the fixtures small."""
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        act_fn="silu",
        latent_channels=16,
        norm_num_groups=8,
        sample_size=HEIGHT,
        scaling_factor=1.5305,
        shift_factor=0.0609,
        latents_mean=None,
        latents_std=None,
        force_upcast=True,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=True,
    )
    randomize_(vae, seed=121)
    with torch.no_grad():
        vae.decoder.conv_out.weight.mul_(0.3)  # keeps the decoded image roughly in [-1, 1]
    return vae.eval()


def build_clip(vocab_size: int, hidden: int, layers: int, act: str, seed: int) -> CLIPTextModelWithProjection:
    """CLIPTextModelWithProjection; bos/eos/pad ids as in the real SD3 text_encoder(_2)/config.json
    (eos_token_id 2, the legacy value: pooling at argmax(input_ids) = the first <|endoftext|>)."""
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        projection_dim=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        max_position_embeddings=CLIP_MAX_LENGTH,
        hidden_act=act,
        layer_norm_eps=1e-5,
        attention_dropout=0.0,
        dropout=0.0,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    )
    model = CLIPTextModelWithProjection(config)
    randomize_(model, seed=seed)
    return model.eval()


def build_scheduler() -> FlowMatchEulerDiscreteScheduler:
    # The real SD3 / SD3.5 scheduler_config.json values.
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)


def make_clip_g_tokenizer_config(folder: Path, vocab: dict[str, int]) -> None:
    """Turns a CLIP tokenizer folder into the SD3 tokenizer_2 variant: pad token "!" (id 0), listed
    as a special added token, as in the real stabilityai SD3 repos."""
    special = {"content": CLIP_G_PAD, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"] = {
        str(vocab[CLIP_G_PAD]): {**special, "special": True},
        **config["added_tokens_decoder"],
    }
    config["pad_token"] = CLIP_G_PAD
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    specials = json.loads((folder / "special_tokens_map.json").read_text())
    specials["pad_token"] = special
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")


def write_tokenizers(folder: Path, shared: dict) -> None:
    write_clip_tokenizer(folder / "tokenizer", shared["clip_vocab"], shared["clip_merges"])
    write_clip_tokenizer(folder / "tokenizer_2", shared["clip_vocab"], shared["clip_merges"])
    make_clip_g_tokenizer_config(folder / "tokenizer_2", shared["clip_vocab"])
    write_t5_tokenizer(folder / "tokenizer_3", shared["spiece"])


def build_shared_components(work: Path) -> dict:
    lines = corpus_lines()
    vocab, merges = learn_clip_bpe(lines, CLIP_NUM_MERGES)
    spiece = train_t5_spiece(lines)
    shared = dict(clip_vocab=vocab, clip_merges=merges, spiece=spiece)
    write_tokenizers(work, shared)  # load the tokenizers from the files we write, as the pipeline will
    shared.update(
        tokenizer=CLIPTokenizer.from_pretrained(work / "tokenizer"),
        tokenizer_2=CLIPTokenizer.from_pretrained(work / "tokenizer_2"),
        tokenizer_3=T5TokenizerFast.from_pretrained(work / "tokenizer_3"),
    )
    t5_rows = 64 * math.ceil((len(shared["tokenizer_3"]) + 1) / 64)  # more rows than ids, as the real T5
    # CLIP-L-like (quick_gelu) and CLIP-G-like (gelu) of different widths, 12 + 16 = 28 < 32 = T5 width,
    # so the channel zero-padding of the CLIP part is exercised (768 + 1280 < 4096 in the real model).
    shared.update(
        text_encoder=build_clip(len(vocab), hidden=12, layers=2, act="quick_gelu", seed=111),
        text_encoder_2=build_clip(len(vocab), hidden=16, layers=3, act="gelu", seed=112),
        text_encoder_3=build_t5(t5_rows),
        vae=build_vae(),
    )
    return shared


def save_pipeline_folder(folder: Path, model: str, shared: dict) -> StableDiffusion3Pipeline:
    """Writes one pipeline folder. Text encoders, tokenizers and VAE are shared between large/ and
    medium/ (byte-identical files, stored once by git)."""
    if folder.exists():
        shutil.rmtree(folder)
    pipe = StableDiffusion3Pipeline(
        transformer=build_transformer(model),
        scheduler=build_scheduler(),
        vae=shared["vae"],
        text_encoder=shared["text_encoder"],
        tokenizer=shared["tokenizer"],
        text_encoder_2=shared["text_encoder_2"],
        tokenizer_2=shared["tokenizer_2"],
        text_encoder_3=shared["text_encoder_3"],
        tokenizer_3=shared["tokenizer_3"],
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    for name in ("text_encoder", "text_encoder_2"):
        keys = load_file(folder / name / "model.safetensors").keys()
        assert "text_model.embeddings.token_embedding.weight" in keys and "text_projection.weight" in keys, name

    if model == "large":  # the real SD3.5-Large transformer is sharded
        shutil.rmtree(folder / "transformer")
        pipe.transformer.save_pretrained(folder / "transformer", safe_serialization=True, max_shard_size=TRANSFORMER_SHARD_SIZE)
        assert len(list((folder / "transformer").glob("diffusion_pytorch_model-*.safetensors"))) >= 2
    # The real T5 text_encoder_3 is sharded in every SD3 repo.
    shutil.rmtree(folder / "text_encoder_3")
    pipe.text_encoder_3.save_pretrained(folder / "text_encoder_3", safe_serialization=True, max_shard_size=T5_SHARD_SIZE)
    assert (folder / "text_encoder_3" / "model.safetensors.index.json").exists()

    # Tokenizers exactly as the real repos ship them (no CLIP tokenizer.json).
    for name in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        shutil.rmtree(folder / name)
    write_tokenizers(folder, shared)

    # model_index.json: transformers 5 aliases T5TokenizerFast to T5Tokenizer; the real repos name the
    # fast class. The real repos do not list the (absent) optional image_encoder / feature_extractor.
    index = json.loads((folder / "model_index.json").read_text())
    index = {k: v for k, v in index.items() if v != [None, None]}
    index["tokenizer"] = ["transformers", "CLIPTokenizer"]
    index["tokenizer_2"] = ["transformers", "CLIPTokenizer"]
    index["tokenizer_3"] = ["transformers", "T5TokenizerFast"]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return pipe


def save_lone_transformer(folder: Path) -> SD3Transformer2DModel:
    """The SD3-Medium-like transformer folder. Its config.json has no `qk_norm` and no
    `dual_attention_layers` keys, like the real stabilityai/stable-diffusion-3-medium-diffusers one
    (written by an older diffusers), so loaders must default them (None / [])."""
    if folder.exists():
        shutil.rmtree(folder)
    tr = build_transformer("sd3medium")
    tr.save_pretrained(folder, safe_serialization=True)
    config = json.loads((folder / "config.json").read_text())
    for key in ("qk_norm", "dual_attention_layers"):
        config.pop(key)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return tr


# --------------------------------------------------------------------------------------------
# Checks against diffusers / transformers.
# --------------------------------------------------------------------------------------------


def check_loaded(loaded, built, names) -> None:
    """Every weight loaded back equals the one built (a key that failed to load would silently be
    re-initialised)."""
    for name in names:
        a = getattr(loaded, name).state_dict() if name else loaded.state_dict()
        b = getattr(built, name).state_dict() if name else built.state_dict()
        assert a.keys() == b.keys(), f"{name}: keys differ"
        for k in a:
            assert torch.equal(a[k], b[k]), f"{name}.{k} differs after loading"


def check_tokenizers(pipe: StableDiffusion3Pipeline, shared: dict) -> None:
    """transformers' tokenizers (loaded from the folders) agree with the independent CLIP BPE encoder
    (CLIP-L padded with <|endoftext|>, CLIP-G with "!") and with sentencepiece."""
    sp = spm.SentencePieceProcessor(model_proto=shared["spiece"])
    vocab = shared["clip_vocab"]
    samples = [PROMPT, NEGATIVE_PROMPT, "A Photo of a CAT,  wearing glasses", "zebra 1234 quux", "it's the cat's hat", "ａ　ｃａｔ"]
    for text in samples:
        ref = clip_encode_reference(text, vocab, shared["clip_merges"])
        natural = ref[: ref.index(vocab[CLIP_EOS]) + 1]
        assert pipe.tokenizer(text, padding="max_length", max_length=CLIP_MAX_LENGTH, truncation=True).input_ids == ref, text
        ids_g = pipe.tokenizer_2(text, padding="max_length", max_length=CLIP_MAX_LENGTH, truncation=True).input_ids
        assert ids_g == natural + [vocab[CLIP_G_PAD]] * (CLIP_MAX_LENGTH - len(natural)), text
        for tok in (pipe.tokenizer, pipe.tokenizer_2):
            assert tok(text, padding="longest", max_length=CLIP_MAX_LENGTH, truncation=True).input_ids == natural, text
        assert pipe.tokenizer_3(text).input_ids == sp.encode(text) + [1], text
    assert vocab[CLIP_G_PAD] == 0 and pipe.tokenizer_2.pad_token_id == 0 and pipe.tokenizer.pad_token_id == vocab[CLIP_EOS]
    assert vocab[CLIP_BOS] == len(vocab) - 2


@torch.no_grad()
def check_encode(pipe: StableDiffusion3Pipeline) -> None:
    """encode_prompt equals StableDiffusion3Pipeline.encode_prompt (positive and CFG negative), and
    the unpadded CLIP part equals the padded one cut to its length (CLIP attention is causal, so
    padding after EOS changes nothing before it; pooled at EOS is the same)."""
    pos, neg = encode_prompt(pipe, PROMPT), encode_prompt(pipe, NEGATIVE_PROMPT)
    pe, npe, pp, npp = pipe.encode_prompt(
        PROMPT, None, None, negative_prompt=NEGATIVE_PROMPT, do_classifier_free_guidance=True,
        max_sequence_length=MAX_SEQUENCE_LENGTH,
    )
    for a, b in ((pos.prompt_embeds, pe), (neg.prompt_embeds, npe), (pos.pooled, pp), (neg.pooled, npp)):
        assert torch.equal(a, b)
    vsf = encode_prompt(pipe, NEGATIVE_PROMPT, padded=False)
    lc = vsf.clip_l_ids.shape[1]
    assert vsf.clip_g_ids.shape[1] == lc
    assert max_abs(vsf.prompt_embeds[:, :lc], neg.prompt_embeds[:, :lc]) < 1e-6
    assert max_abs(vsf.pooled, neg.pooled) < 1e-6


# --------------------------------------------------------------------------------------------
# Fixtures.
# --------------------------------------------------------------------------------------------


def transformer_cases(model: str) -> dict[str, Sd3Guidance]:
    if model == "sd3medium":
        return {"none": SD3_NONE}
    cases = {
        "none": SD3_NONE,
        "nag": SD3_NAG,
        "nasa": SD3_NASA,
        "vsf_paper": SD3_VSF_PAPER,
        "vsf_official": SD3_VSF_OFFICIAL,
    }
    if model == "large":
        cases["nag_negpooled"] = SD3_NAG_NEG_POOLED
    return cases


def pipeline_cases(model: str) -> list[PipelineCase]:
    if model == "medium":
        return [
            PipelineCase("none", "none"),
            PipelineCase("nag", "nag", SD3_NAG),
            PipelineCase("vsf_paper", "vsf", SD3_VSF_PAPER),
        ]
    return [
        PipelineCase("none", "none", save_image=True),
        PipelineCase("nag", "nag", SD3_NAG, save_image=True),
        PipelineCase("cfg", "cfg", guidance_scale=CFG_SCALE),
        PipelineCase("cfg_nag", "cfg+nag", SD3_NAG, guidance_scale=CFG_SCALE),
        PipelineCase("vsf_paper", "vsf", SD3_VSF_PAPER),
        PipelineCase("vsf_official", "vsf", SD3_VSF_OFFICIAL),
        PipelineCase("nasa", "nasa", SD3_NASA),
    ]


def transformer_inputs(model: str, n_vsf_neg: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(300 + TRANSFORMER_SEEDS[model])
    n_ctx = CLIP_MAX_LENGTH + MAX_SEQUENCE_LENGTH
    return {
        "hidden_states": torch.randn(1, 16, 8, 8, generator=gen),
        "encoder_hidden_states": torch.randn(1, n_ctx, 32, generator=gen),
        "pooled": torch.randn(1, 64, generator=gen),
        "neg_encoder_hidden_states": torch.randn(1, n_ctx, 32, generator=gen),
        "neg_pooled": torch.randn(1, 64, generator=gen),
        "vsf_neg_encoder_hidden_states": torch.randn(1, n_vsf_neg, 32, generator=gen),
        "timestep": torch.tensor([TRANSFORMER_TIMESTEP]),
    }


def inputs_of_case(inp: dict, g: Sd3Guidance) -> dict[str, torch.Tensor]:
    keys = ["hidden_states", "encoder_hidden_states", "pooled", "timestep"]
    if g.mode in ("nag", "nasa"):
        keys += ["neg_encoder_hidden_states", "neg_pooled"]
    elif g.mode == "vsf":
        keys += ["vsf_neg_encoder_hidden_states"]
    return {k: inp[k] for k in keys}


def call_reference(tr, inp: dict, g: Sd3Guidance, record=None, check=None) -> torch.Tensor:
    return mmdit_forward(
        tr, inp["hidden_states"], inp["encoder_hidden_states"], inp["pooled"], inp["timestep"], g,
        neg_encoder_hidden_states=inp["neg_encoder_hidden_states"], neg_pooled=inp["neg_pooled"],
        vsf_neg_encoder_hidden_states=inp["vsf_neg_encoder_hidden_states"], record=record, check=check,
    )


@torch.no_grad()
def write_transformer_fixtures(out: Path, model: str, tr: SD3Transformer2DModel, n_vsf_neg: int, summary: list[str]) -> None:
    inp = transformer_inputs(model, n_vsf_neg)

    # Our position table equals the buffer diffusers saved (pos_embed.pos_embed, a checkpoint key).
    m = tr.config.pos_embed_max_size
    table = sd3_pos_embed_table(tr.inner_dim, m, tr.config.sample_size // tr.config.patch_size)
    assert torch.equal(table[None], tr.pos_embed.pos_embed), f"{model}: position table differs"

    # The unguided reference forward must equal diffusers' own forward.
    expected = tr(
        hidden_states=inp["hidden_states"], encoder_hidden_states=inp["encoder_hidden_states"],
        pooled_projections=inp["pooled"], timestep=inp["timestep"], return_dict=False,
    )[0]
    ours = call_reference(tr, inp, SD3_NONE)
    err = max_abs(ours, expected)
    assert err < 1e-5, f"{model}: reference forward differs from diffusers by {err}"
    summary.append(f"transformer {model}: reference vs diffusers SD3Transformer2DModel max abs diff {err:.2e}")

    tr64 = copy.deepcopy(tr).double()
    inp64 = {k: v.double() for k, v in inp.items()}
    base = None
    for case, g in transformer_cases(model).items():
        record: dict[str, torch.Tensor] = {}
        check: list[float] = []
        output = call_reference(tr, inp, g, record, check)
        if g.mode == "vsf":
            assert max(check) < 1e-5, f"{model} {case}: LSE-merged attention differs from the dense mask by {max(check)}"
        base = output if case == "none" else base
        meta = {"model": model, **g.metadata()}
        if model == "sd3medium":
            meta["config"] = json.dumps(json.loads((out / "sd3_medium_transformer" / "config.json").read_text()), sort_keys=True)
        tensors = {**inputs_of_case(inp, g), "output": output, **record}
        name = "transformer_sd3medium_none" if model == "sd3medium" else f"transformer_{model}_{case}"
        write_safetensors(out / f"{name}.safetensors", tensors, meta)
        f32_noise = rel(output.double(), call_reference(tr64, inp64, g))
        line = f"transformer {model:9s} {case:13s}: |out| {output.norm():7.3f}  f32-vs-f64 rel {f32_noise:.1e}"
        if g.mode == "vsf":
            line += f"  (dense vs LSE-merged attention {max(check):.1e})"
        if case != "none":
            diff = rel(output, base)
            assert diff > 1e-2, f"{model} {case}: guidance changes the output by only {diff}"
            line += f"  rel diff vs none {diff:.3f}"
        summary.append(line)
    if model == "large":
        d = rel(call_reference(tr, inp, SD3_NAG_NEG_POOLED), call_reference(tr, inp, SD3_NAG))
        assert d > 1e-3, f"nag_pooled changes the output by only {d}"
        summary.append(f"transformer large nag_negpooled vs nag: rel diff {d:.3f}")


@torch.no_grad()
def write_pipeline_fixtures(out: Path, model: str, pipe: StableDiffusion3Pipeline, init: torch.Tensor, summary: list[str]) -> None:
    sched = copy.deepcopy(pipe.scheduler)
    sched.set_timesteps(STEPS)
    assert torch.equal(sched.sigmas, sd3_sigmas(pipe.scheduler.config, STEPS)), "sigma schedule mismatch"

    base = None
    for case in pipeline_cases(model):
        timesteps, steps, image = reference_pipeline(pipe, case, init)
        final = steps[-1]
        if case.guidance in ("none", "cfg"):
            # diffusers' StableDiffusion3Pipeline, from the same initial latents, must agree.
            expected = pipe(
                prompt=PROMPT,
                negative_prompt=NEGATIVE_PROMPT if case.guidance == "cfg" else None,
                guidance_scale=case.guidance_scale,
                height=HEIGHT, width=WIDTH, num_inference_steps=STEPS,
                max_sequence_length=MAX_SEQUENCE_LENGTH, latents=init, output_type="latent",
            ).images
            err = max_abs(expected, final)
            assert err < 1e-5, f"{model} {case.name}: reference pipeline differs from StableDiffusion3Pipeline by {err}"
            summary.append(f"pipeline {model} {case.name}: reference vs StableDiffusion3Pipeline max abs diff {err:.2e}")

        tensors = {"init_latents": init, "timesteps": timesteps, "final_latents": final}
        tensors.update({f"step_{k}_latents": s for k, s in enumerate(steps)})
        if image is not None:
            tensors["image"] = image
        g = case.attn
        meta = {
            "model": model,
            "prompt": PROMPT,
            "negative_prompt": NEGATIVE_PROMPT,
            **g.metadata(),
            "guidance": case.guidance,
            "nag_end": repr(1.0),
            "guidance_scale": repr(case.guidance_scale),
            "steps": str(STEPS),
            "height": str(HEIGHT),
            "width": str(WIDTH),
            "max_sequence_length": str(MAX_SEQUENCE_LENGTH),
        }
        write_safetensors(out / f"pipeline_{model}_{case.name}.safetensors", tensors, meta)
        base = final if case.name == "none" else base
        line = f"pipeline {model:6s} {case.name:12s}: t = {[round(x, 2) for x in timesteps.tolist()]}"
        if case.name != "none":
            diff = rel(final, base)
            assert diff > 1e-2, f"{model} {case.name}: guidance changes the latents by only {diff}"
            line += f"  final latents rel diff vs none {diff:.3f}"
        if image is not None:
            line += f"  image range [{image.min():.2f}, {image.max():.2f}]"
        summary.append(line)


@torch.no_grad()
def write_text_fixture(out: Path, pipe: StableDiffusion3Pipeline) -> Sd3Text:
    """text.safetensors; returns the unpadded (VSF) negative encoding."""
    tensors, encoded = {}, {}
    for prefix, text, padded in (("", PROMPT, True), ("neg_", NEGATIVE_PROMPT, True), ("vsf_neg_", NEGATIVE_PROMPT, False)):
        e = encoded[prefix] = encode_prompt(pipe, text, padded)
        tensors.update({
            f"{prefix}clip_l_ids": e.clip_l_ids,
            f"{prefix}clip_g_ids": e.clip_g_ids,
            f"{prefix}t5_ids": e.t5_ids,
            f"{prefix}clip_l_penultimate": e.clip_l_hidden,
            f"{prefix}clip_g_penultimate": e.clip_g_hidden,
            f"{prefix}clip_l_text_embeds": e.clip_l_embeds,
            f"{prefix}clip_g_text_embeds": e.clip_g_embeds,
            f"{prefix}t5_hidden": e.t5_hidden,
            f"{prefix}prompt_embeds": e.prompt_embeds,
            f"{prefix}pooled": e.pooled,
        })
    meta = {"prompt": PROMPT, "negative_prompt": NEGATIVE_PROMPT, "max_sequence_length": str(MAX_SEQUENCE_LENGTH), "pipeline": "large"}
    write_safetensors(out / "text.safetensors", tensors, meta)
    return encoded["vsf_neg_"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"fixture folder (default {DEFAULT_OUT})")
    args = parser.parse_args()
    out: Path = args.out
    assert sys.byteorder == "little", "safetensors data is little-endian"

    for logging in (diffusers.utils.logging, transformers.utils.logging):
        logging.set_verbosity_error()
        logging.disable_progress_bar()
    torch.manual_seed(0)
    torch.set_num_threads(1)  # bit-for-bit reproducible reductions
    torch.use_deterministic_algorithms(True)

    with tempfile.TemporaryDirectory() as tmp:
        shared = build_shared_components(Path(tmp))
    pipes = {}
    for model in ("large", "medium"):
        built = save_pipeline_folder(out / model, model, shared)
        # Everything below runs on the pipeline as loaded back from the folder.
        pipes[model] = StableDiffusion3Pipeline.from_pretrained(out / model, dtype=torch.float32)
        pipes[model].set_progress_bar_config(disable=True)
        check_loaded(pipes[model], built, ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"))
        check_tokenizers(pipes[model], shared)
    built = save_lone_transformer(out / "sd3_medium_transformer")
    sd3medium = SD3Transformer2DModel.from_pretrained(out / "sd3_medium_transformer").eval()
    assert sd3medium.config.qk_norm is None and tuple(sd3medium.config.dual_attention_layers) == ()
    check_loaded(sd3medium, built, ("",))

    summary: list[str] = []
    check_encode(pipes["large"])
    vsf_neg = write_text_fixture(out, pipes["large"])
    n_vsf_neg = vsf_neg.prompt_embeds.shape[1]
    summary.append(
        f"VSF negative: CLIP ids {vsf_neg.clip_l_ids.shape[1]}, T5 ids {vsf_neg.t5_ids.shape[1]} -> "
        f"vsf_neg_prompt_embeds {list(vsf_neg.prompt_embeds.shape)}"
    )

    init = torch.randn(1, 16, HEIGHT // 8, WIDTH // 8, generator=torch.Generator().manual_seed(501))
    for model, pipe in pipes.items():
        write_transformer_fixtures(out, model, pipe.transformer, n_vsf_neg, summary)
        write_pipeline_fixtures(out, model, pipe, init, summary)
    write_transformer_fixtures(out, "sd3medium", sd3medium, n_vsf_neg, summary)

    print("\n".join(summary))
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"wrote {out} ({total / 1e6:.2f} MB on disk)")


if __name__ == "__main__":
    sys.exit(main())
