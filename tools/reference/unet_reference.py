#!/usr/bin/env python3
"""Golden fixtures for veto's UNet family (SD1.5, SDXL and its few-step descendants).

Builds two tiny random pipelines (`sd15`: StableDiffusionPipeline, `sdxl`:
StableDiffusionXLPipeline) in the folder layout of the real Hugging Face repos, runs diffusers'
UNet2DConditionModel with attention processors of our own that add the guidance methods veto
implements (NAG, NASA and VSF on the cross-attention layers, PAG identity self-attention), a
reference text -> latents -> image pipeline (CFG, PAG and their combinations with NAG), drives
every scheduler veto reads from `scheduler_config.json` with a fixed fake model, and writes small
f32 safetensors fixtures that the Rust tests compare against.

Everything runs on the CPU in f32 with fixed seeds; running the script twice writes identical
files. Developers run it; CI never does:

    /work/venv/ref/bin/python tools/reference/unet_reference.py

See tools/reference/README.md and tests/fixtures/unet/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # before transformers is imported

import diffusers
import torch
import transformers
from diffusers import (
    AutoencoderKL,
    StableDiffusionPipeline,
    StableDiffusionXLPAGPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

# The Flux generator owns the shared pieces: the deterministic safetensors writer, the toy CLIP
# BPE tokenizer (learned from its corpus), the weight randomiser and the NAG/NASA formulas.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from flux_reference import (  # noqa: E402
    CLIP_EOS,
    CLIP_MAX_LENGTH,
    CLIP_NUM_MERGES,
    NEGATIVE_PROMPT,
    PROMPT,
    AttnGuidance,
    clip_encode_reference,
    corpus_lines,
    guide,
    learn_clip_bpe,
    randomize_,
    restore_clip_prefix,
    write_clip_tokenizer,
    write_safetensors,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = REPO_ROOT / "tests" / "fixtures" / "unet"

HEIGHT = WIDTH = 64  # latents 4 x 8 x 8
STEPS = 4
CFG_SCALE = 5.0  # diffusers `guidance_scale`
PAG_SCALE = 3.0
PAG_APPLIED_LAYERS = ("mid",)  # diffusers' default for the SDXL PAG pipeline
UNET_TIMESTEP = 637.0  # timestep of the single UNet calls (not a multiple of anything)
SDXL_PAD_TOKEN = "!"  # tokenizer_2 of the real SDXL repos pads with "!" (id 0)


# --------------------------------------------------------------------------------------------
# Guidance parameters.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UnetGuidance(AttnGuidance):
    """Attention-space guidance of one UNet call: AttnGuidance's NAG/NASA fields plus VSF.

    mode: none | nag | nasa | vsf. nag_norm defaults to L1 (the paper and the official SDXL
    processor both use L1)."""

    nag_norm: str = "l1"
    vsf_scale: float = 0.0  # alpha: the negative values are multiplied by -alpha
    vsf_bias: float = 0.0  # beta: -beta is added to the image -> negative logits (after 1/sqrt(d))

    def metadata(self) -> dict[str, str]:
        """The attention method and only its own parameters."""
        meta = {"attention": self.mode}
        if self.mode == "nag":
            meta.update(nag_scale=repr(self.nag_scale), nag_tau=repr(self.nag_tau), nag_alpha=repr(self.nag_alpha), nag_norm=self.nag_norm)
        elif self.mode == "nasa":
            meta["nasa_scale"] = repr(self.nasa_scale)
        elif self.mode == "vsf":
            meta.update(vsf_scale=repr(self.vsf_scale), vsf_bias=repr(self.vsf_bias))
        return meta


NO_GUIDANCE = UnetGuidance()
# NAG paper Table 5 (UNet rows): phi = 2 (s = 3), tau 2.5, alpha 0.5 (SDXL) / 0.375 (SD1.5).
NAG = {
    "sdxl": UnetGuidance(mode="nag", nag_scale=3.0, nag_tau=2.5, nag_alpha=0.5),
    "sd15": UnetGuidance(mode="nag", nag_scale=3.0, nag_tau=2.5, nag_alpha=0.375),
}
NASA = UnetGuidance(mode="nasa", nasa_scale=0.5)
# The official VSF cross-attention (Wan) script's values: scale 1.2, logit bias -0.2.
VSF = UnetGuidance(mode="vsf", vsf_scale=1.2, vsf_bias=0.2)


# --------------------------------------------------------------------------------------------
# Reference attention processors.
#
# They are set on every attention module of a diffusers UNet2DConditionModel, so the UNet trunk
# (resnets, norms, projections, feed-forwards) is diffusers' own and only attention is ours.
# Which rows of the batch get what is decided per UNet call by a ForwardPlan:
#
#  * attn2 (cross-attention, every transformer block): each row attends over its own text
#    context. On the `guided_rows` (the conditional row: row 0 without CFG, row 1 of
#    [uncond, cond] or of [uncond, cond, perturbed]) the attention guidance applies, as the
#    official SDXL NAG processor does: the same image queries attend the negative context too
#    (the image trunk runs once, nothing is tiled) and
#      - nag:  Z = NAG(Z+, Z-)  (eq. 7-10, norm over all heads' channels of a token);
#      - nasa: Z = Z+ - phi Z-;
#      - vsf:  Z = softmax(Q [K+ ; K-]^T / sqrt(d) + [0 ; -beta]) [V+ ; -alpha V-] (VSF eq. 6, the
#              negative context being the unpadded negative prompt);
#    before the output projection. The unconditional and the perturbed rows keep plain
#    attention (the official processor's 3x and 4x batch layouts do the same).
#  * attn1 (self-attention) in the PAG layers (diffusers' pag_applied_layers rule: a
#    self-attention module whose name matches the regex, default "mid"): on the `pag_rows`
#    the attention output is the value projection (identity attention map), i.e.
#    to_out(to_v(x)), as diffusers' PAGIdentitySelfAttnProcessor2_0.
# --------------------------------------------------------------------------------------------


@dataclass
class ForwardPlan:
    g: UnetGuidance = NO_GUIDANCE
    neg_context: torch.Tensor | None = None  # [1, Ln, C]: padded negative (NAG/NASA), unpadded (VSF)
    guided_rows: tuple[int, ...] = ()
    pag_rows: tuple[int, ...] = ()


@dataclass
class PlanHolder:
    """Shared by all processors of a UNet; set before each UNet call."""

    plan: ForwardPlan = field(default_factory=ForwardPlan)


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, s, c = x.shape
    return x.reshape(b, s, heads, c // heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    b, h, s, d = x.shape
    return x.transpose(1, 2).reshape(b, s, h * d)


def attend(q, k, v, heads: int, scale: float, key_bias: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention of [B, Sq, C] queries over [B, Sk, C] keys/values, heads merged back.
    key_bias [Sk] is added to the (scaled) logits of every query."""
    q, k, v = split_heads(q, heads), split_heads(k, heads), split_heads(v, heads)
    logits = (q @ k.transpose(-1, -2)) * scale
    if key_bias is not None:
        logits = logits + key_bias
    return merge_heads(logits.softmax(dim=-1) @ v)


class ReferenceAttnProcessor:
    def __init__(self, holder: PlanHolder, pag_layer: bool):
        self.holder = holder
        self.pag_layer = pag_layer

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        # The UNet's transformer attention uses none of diffusers' optional extras.
        assert attention_mask is None and attn.group_norm is None and attn.spatial_norm is None
        assert attn.norm_q is None and attn.norm_k is None and not attn.norm_cross
        assert not attn.residual_connection and attn.rescale_output_factor == 1.0
        assert hidden_states.ndim == 3
        plan = self.holder.plan
        heads, scale = attn.heads, attn.scale
        x = hidden_states
        q = attn.to_q(x)

        if encoder_hidden_states is None:  # self-attention (attn1)
            v = attn.to_v(x)
            z = attend(q, attn.to_k(x), v, heads, scale)
            if self.pag_layer and plan.pag_rows:
                z = z.clone()
                for r in plan.pag_rows:
                    z[r] = v[r]  # identity attention map: each token gets its own value
        else:  # cross-attention (attn2)
            ctx = encoder_hidden_states
            k, v = attn.to_k(ctx), attn.to_v(ctx)
            z = attend(q, k, v, heads, scale)
            g = plan.g
            if g.guided and plan.guided_rows:
                rows = list(plan.guided_rows)
                neg = plan.neg_context
                assert neg is not None and neg.shape[0] == 1
                kn, vn = attn.to_k(neg), attn.to_v(neg)
                z = z.clone()
                for r in rows:
                    qr = q[r : r + 1]
                    if g.mode == "vsf":
                        keys = torch.cat([k[r : r + 1], kn], dim=1)
                        values = torch.cat([v[r : r + 1], -g.vsf_scale * vn], dim=1)
                        bias = torch.zeros(keys.shape[1], dtype=q.dtype)
                        bias[k.shape[1] :] = -g.vsf_bias
                        z[r] = attend(qr, keys, values, heads, scale, bias)[0]
                    else:
                        z_neg = attend(qr, kn, vn, heads, scale)
                        z[r] = guide(z[r : r + 1], z_neg, g)[0]

        out = attn.to_out[0](z)
        return attn.to_out[1](out)  # dropout (identity in eval mode)


def pag_layer_names(unet: UNet2DConditionModel, layer_ids=PAG_APPLIED_LAYERS) -> set[str]:
    """Self-attention modules selected by diffusers' pag_applied_layers rule: the module name
    matches the regex and, when the id ends with a number, the last name component equals it."""
    from diffusers.models.attention_processor import Attention

    names = set()
    for layer_id in layer_ids:
        found = []
        for name, module in unet.named_modules():
            if not isinstance(module, Attention) or module.is_cross_attention:
                continue
            last_id, last_name = layer_id.split(".")[-1], name.split(".")[-1]
            fake = last_id.isnumeric() and last_name.isnumeric() and last_id == last_name
            if re.search(layer_id, name) is not None and not fake:
                found.append(name)
        assert found, f"no self-attention layer matches {layer_id}"
        names.update(found)
    return names


@contextlib.contextmanager
def reference_attention(unet: UNet2DConditionModel):
    """Installs the reference processors (restoring diffusers' afterwards); yields the holder."""
    original = unet.attn_processors
    holder = PlanHolder()
    pag_layers = pag_layer_names(unet)
    procs = {}
    for name in original:
        module_name = name[: -len(".processor")]
        procs[name] = ReferenceAttnProcessor(holder, pag_layer=module_name in pag_layers)
    unet.set_attn_processor(procs)
    try:
        yield holder
    finally:
        unet.set_attn_processor(original)


@contextlib.contextmanager
def record_blocks(unet: UNet2DConditionModel, record: dict | None, row: int):
    """Records the output of every down block, the mid block and every up block (row `row`)."""
    handles = []
    if record is not None:
        def hook(name):
            def fn(_module, _inputs, output):
                out = output[0] if isinstance(output, tuple) else output
                record[name] = out[row : row + 1].detach().clone()
            return fn

        for i, blk in enumerate(unet.down_blocks):
            handles.append(blk.register_forward_hook(hook(f"down_{i}")))
        handles.append(unet.mid_block.register_forward_hook(hook("mid")))
        for i, blk in enumerate(unet.up_blocks):
            handles.append(blk.register_forward_hook(hook(f"up_{i}")))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def unet_call(unet, holder: PlanHolder, sample, timestep, context, plan: ForwardPlan, added=None, record=None, record_row=0):
    holder.plan = plan
    with record_blocks(unet, record, record_row):
        return unet(sample, timestep, encoder_hidden_states=context, added_cond_kwargs=added, return_dict=False)[0]


# --------------------------------------------------------------------------------------------
# Text encoding, as diffusers' StableDiffusionPipeline / StableDiffusionXLPipeline.encode_prompt.
# --------------------------------------------------------------------------------------------


@dataclass
class Encoded:
    ids: torch.Tensor  # [1, L] int64 (tokenizer 1)
    ids_2: torch.Tensor | None  # [1, L] int64 (SDXL tokenizer_2)
    embeds: torch.Tensor  # [1, L, C] cross-attention context
    pooled: torch.Tensor | None  # [1, P] SDXL text_embeds (pooled, projected CLIP-G)


def tokenize(tokenizer, text: str, padded: bool) -> torch.Tensor:
    if padded:
        ids = tokenizer(text, padding="max_length", max_length=CLIP_MAX_LENGTH, truncation=True, return_tensors="pt").input_ids
    else:  # VSF: the negative prompt without padding ([BOS, tokens, EOS])
        ids = tokenizer(text, truncation=True, max_length=CLIP_MAX_LENGTH, return_tensors="pt").input_ids
    return ids.to(torch.int64)


@torch.no_grad()
def encode(model: str, pipe, text: str, padded: bool = True) -> Encoded:
    """SD1.5: CLIP-L last hidden state (after the final layer norm).
    SDXL: CLIP-L and CLIP-G penultimate hidden states (no final layer norm) concatenated on
    channels; pooled = CLIP-G's projected pooled output (text_embeds)."""
    ids = tokenize(pipe.tokenizer, text, padded)
    if model == "sd15":
        return Encoded(ids, None, pipe.text_encoder(ids)[0], None)
    ids_2 = tokenize(pipe.tokenizer_2, text, padded)
    out_1 = pipe.text_encoder(ids, output_hidden_states=True)
    out_2 = pipe.text_encoder_2(ids_2, output_hidden_states=True)
    embeds = torch.cat([out_1.hidden_states[-2], out_2.hidden_states[-2]], dim=-1)
    return Encoded(ids, ids_2, embeds, out_2.text_embeds)


def add_time_ids(height: int = HEIGHT, width: int = WIDTH) -> torch.Tensor:
    """SDXL micro-conditioning: original_size + crops_coords_top_left + target_size."""
    return torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32)


# --------------------------------------------------------------------------------------------
# Reference pipeline.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PipelineCase:
    name: str
    attn: UnetGuidance = NO_GUIDANCE
    cfg: bool = False
    pag: bool = False
    nag_end: float = 1.0  # attention guidance only while t >= floor((1 - nag_end) * 999)
    save_image: bool = False

    @property
    def guidance(self) -> str:
        parts = (["cfg"] if self.cfg else []) + (["pag"] if self.pag else []) + ([self.attn.mode] if self.attn.guided else [])
        return "+".join(parts) or "none"


@torch.no_grad()
def reference_pipeline(model: str, pipe, case: PipelineCase, init: torch.Tensor):
    """Returns (timesteps, per-step latents, per-step guided noise predictions, image or None)."""
    unet = pipe.unet
    pos = encode(model, pipe, PROMPT)
    neg = encode(model, pipe, NEGATIVE_PROMPT)
    vsf_neg = encode(model, pipe, NEGATIVE_PROMPT, padded=False)

    # Batch rows: [uncond]? + [cond] + [perturbed]? (diffusers' order).
    rows = ([neg] if case.cfg else []) + [pos] + ([pos] if case.pag else [])
    cond_row = 1 if case.cfg else 0
    pag_row = len(rows) - 1 if case.pag else None
    context = torch.cat([r.embeds for r in rows])
    added = None
    if model == "sdxl":
        added = {"text_embeds": torch.cat([r.pooled for r in rows]), "time_ids": add_time_ids().repeat(len(rows), 1)}
    plan = ForwardPlan(
        g=case.attn,
        neg_context=(vsf_neg if case.attn.mode == "vsf" else neg).embeds,
        guided_rows=(cond_row,) if case.attn.guided else (),
        pag_rows=(pag_row,) if case.pag else (),
    )

    sched = copy.deepcopy(pipe.scheduler)
    sched.set_timesteps(STEPS)
    latents = init * sched.init_noise_sigma
    steps, noises = [], []
    with reference_attention(unet) as holder:
        for t in sched.timesteps:
            # The official SDXL NAG pipeline's window: its processors are removed for good
            # once t < floor((1 - nag_end) * 999).
            if t < math.floor((1.0 - case.nag_end) * 999):
                plan = replace(plan, g=NO_GUIDANCE, guided_rows=())
            x = sched.scale_model_input(torch.cat([latents] * len(rows)), t)
            out = unet_call(unet, holder, x, t, context, plan, added)
            cond = out[cond_row : cond_row + 1]
            noise = out[0:1] + CFG_SCALE * (cond - out[0:1]) if case.cfg else cond
            if case.pag:
                noise = noise + PAG_SCALE * (cond - out[pag_row : pag_row + 1])
            latents = sched.step(noise, t, latents, return_dict=False)[0]
            steps.append(latents)
            noises.append(noise)
    image = decode(pipe.vae, latents) if case.save_image else None
    return sched.timesteps.to(torch.float32), steps, noises, image


@torch.no_grad()
def decode(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """Raw VAE decode (no clamp, no postprocess); SD/SDXL VAEs have no shift."""
    return vae.decode(latents / vae.config.scaling_factor).sample


# --------------------------------------------------------------------------------------------
# Tiny models.
# --------------------------------------------------------------------------------------------


def build_clip(vocab_size: int, with_projection: bool, seed: int):
    """CLIP-L-like (quick_gelu) or CLIP-G-like (gelu, with text projection) text encoder. Special
    ids as the real configs: bos 0, eos 2 (the legacy value: pooling at argmax(input_ids), i.e.
    the first <|endoftext|>), pad 1."""
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        projection_dim=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=CLIP_MAX_LENGTH,
        hidden_act="gelu" if with_projection else "quick_gelu",
        layer_norm_eps=1e-5,
        attention_dropout=0.0,
        dropout=0.0,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    )
    model = (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)
    randomize_(model, seed=seed)
    return model.eval()


def build_vae(scaling_factor: float, seed: int) -> AutoencoderKL:
    """SD/SDXL-style AutoencoderKL: 4 latent channels, 4 levels (factor 8), quant convs, mid
    attention; channels tiny to fit the fixture budget."""
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        act_fn="silu",
        latent_channels=4,
        norm_num_groups=4,
        sample_size=HEIGHT,
        scaling_factor=scaling_factor,
        force_upcast=True,
        use_quant_conv=True,
        use_post_quant_conv=True,
        mid_block_add_attention=True,
    )
    randomize_(vae, seed=seed)
    with torch.no_grad():
        vae.decoder.conv_out.weight.mul_(0.3)  # keeps the decoded image roughly in [-1, 1]
    return vae.eval()


def unet_config(model: str) -> dict:
    common = dict(
        sample_size=HEIGHT // 8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 24),
        layers_per_block=1,
        norm_num_groups=8,
        act_fn="silu",
        flip_sin_to_cos=True,
        freq_shift=0,
    )
    if model == "sd15":
        # SD1.5 layout (CrossAttn levels then a plain one); attention_head_dim 8 is diffusers'
        # historical name for 8 heads, as in the real config.
        return dict(
            common,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            attention_head_dim=8,
            cross_attention_dim=32,
        )
    # SDXL layout: a plain first level, CrossAttn below; text_time conditioning.
    return dict(
        common,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=[2, 4],
        transformer_layers_per_block=[1, 2],
        use_linear_projection=True,
        cross_attention_dim=64,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32,
    )


def build_unet(model: str) -> UNet2DConditionModel:
    unet = UNet2DConditionModel(**unet_config(model))
    randomize_(unet, seed=611 if model == "sd15" else 612)
    return unet.eval()


# --------------------------------------------------------------------------------------------
# Scheduler configs.
#
# REAL_CONFIGS are the scheduler_config.json files of the real repos, written from memory
# (key order and values as we remember them; see the README for the values we are unsure of).
# DERIVED_CONFIGS are what the model cards' code builds (`Class.from_config(base, **overrides)`),
# saved with diffusers' save_config (so they carry every key, with diffusers 0.42.1 defaults).
# --------------------------------------------------------------------------------------------

SCALED_LINEAR = {"beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085}

REAL_CONFIGS = {
    # runwayml/stable-diffusion-v1-5 (and stable-diffusion-v1-5/...): PNDM (PLMS, skip_prk_steps).
    "sd15_pndm": {
        "_class_name": "PNDMScheduler",
        "_diffusers_version": "0.6.0",
        **SCALED_LINEAR,
        "num_train_timesteps": 1000,
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "steps_offset": 1,
        "trained_betas": None,
        "clip_sample": False,
    },
    # stabilityai/stable-diffusion-xl-base-1.0
    "sdxl_base_euler": {
        "_class_name": "EulerDiscreteScheduler",
        "_diffusers_version": "0.19.0.dev0",
        **SCALED_LINEAR,
        "clip_sample": False,
        "interpolation_type": "linear",
        "num_train_timesteps": 1000,
        "prediction_type": "epsilon",
        "sample_max_value": 1.0,
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "steps_offset": 1,
        "timestep_spacing": "leading",
        "trained_betas": None,
        "use_karras_sigmas": False,
    },
    # stabilityai/stable-diffusion-2-1 (v-prediction)
    "sd21_ddim_v": {
        "_class_name": "DDIMScheduler",
        "_diffusers_version": "0.8.0",
        **SCALED_LINEAR,
        "clip_sample": False,
        "num_train_timesteps": 1000,
        "prediction_type": "v_prediction",
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "steps_offset": 1,
        "trained_betas": None,
    },
    # playgroundai/playground-v2.5-1024px-aesthetic
    "playground_v25_edm_dpm": {
        "_class_name": "EDMDPMSolverMultistepScheduler",
        "_diffusers_version": "0.27.0.dev0",
        "algorithm_type": "dpmsolver++",
        "dynamic_thresholding_ratio": 0.995,
        "euler_at_final": False,
        "final_sigmas_type": "zero",
        "lower_order_final": True,
        "num_train_timesteps": 1000,
        "prediction_type": "epsilon",
        "rho": 7.0,
        "sample_max_value": 1.0,
        "sigma_data": 0.5,
        "sigma_max": 80.0,
        "sigma_min": 0.002,
        "solver_order": 2,
        "solver_type": "midpoint",
        "thresholding": False,
    },
}

# name -> (class, base config, overrides, what builds it)
DERIVED_CONFIGS = {
    "sdxl_base_euler_v": ("EulerDiscreteScheduler", "sdxl_base_euler", {"prediction_type": "v_prediction"},
                          "SDXL base's Euler with v-prediction (v-pred SDXL finetunes)"),
    "sdxl_euler_linspace": ("EulerDiscreteScheduler", "sdxl_base_euler", {"timestep_spacing": "linspace"},
                            "SDXL base's Euler with linspace spacing"),
    "sdxl_lightning_euler": ("EulerDiscreteScheduler", "sdxl_base_euler", {"timestep_spacing": "trailing"},
                             "SDXL-Lightning model card: EulerDiscreteScheduler.from_config(..., timestep_spacing='trailing')"),
    "dmd2_lcm": ("LCMScheduler", "sdxl_base_euler", {},
                 "DMD2 model card: LCMScheduler.from_config(SDXL base), timesteps=[999, 749, 499, 249]"),
    "hyper_sdxl_tcd": ("TCDScheduler", "sdxl_base_euler", {},
                       "Hyper-SD model card: TCDScheduler.from_config(SDXL base), eta (gamma) passed to step"),
    "hyper_sdxl_ddim_trailing": ("DDIMScheduler", "sdxl_base_euler", {"timestep_spacing": "trailing"},
                                 "Hyper-SDXL N-step LoRAs: DDIMScheduler.from_config(..., timestep_spacing='trailing')"),
    "sd15_ddim": ("DDIMScheduler", "sd15_pndm", {}, "DDIMScheduler.from_config(SD1.5)"),
    "sd15_euler_a": ("EulerAncestralDiscreteScheduler", "sd15_pndm", {},
                     "EulerAncestralDiscreteScheduler.from_config(SD1.5): A1111's 'Euler a'"),
    "sdxl_euler_a_trailing": ("EulerAncestralDiscreteScheduler", "sdxl_base_euler", {"timestep_spacing": "trailing"},
                              "Euler a with trailing spacing (SDXL-Lightning users' variant)"),
    "sd15_dpmpp": ("DPMSolverMultistepScheduler", "sd15_pndm", {},
                   "DPMSolverMultistepScheduler.from_config(SD1.5): DPM++ 2M (dpmsolver++, order 2)"),
    "sd15_dpmpp_v": ("DPMSolverMultistepScheduler", "sd15_pndm", {"prediction_type": "v_prediction"},
                     "DPM++ 2M with v-prediction"),
    "sd15_dpmpp_karras": ("DPMSolverMultistepScheduler", "sd15_pndm", {"use_karras_sigmas": True},
                          "DPM++ 2M Karras"),
    "playground_v25_edm_dpm_v": ("EDMDPMSolverMultistepScheduler", "playground_v25_edm_dpm", {"prediction_type": "v_prediction"},
                                 "Playground v2.5's EDM DPM-Solver with v-prediction"),
    "playground_v25_edm_euler": ("EDMEulerScheduler", "playground_v25_edm_dpm", {},
                                 "EDMEulerScheduler.from_config(Playground v2.5)"),
    "playground_v25_edm_euler_v": ("EDMEulerScheduler", "playground_v25_edm_dpm", {"prediction_type": "v_prediction"},
                                   "EDM Euler with v-prediction"),
    "sd15_heun": ("HeunDiscreteScheduler", "sd15_pndm", {}, "HeunDiscreteScheduler.from_config(SD1.5): Heun (2n - 1 calls)"),
    "sd15_heun_v": ("HeunDiscreteScheduler", "sd15_pndm", {"prediction_type": "v_prediction"}, "Heun with v-prediction"),
    "sdxl_heun_karras": ("HeunDiscreteScheduler", "sdxl_base_euler", {"use_karras_sigmas": True},
                         "Heun Karras from SDXL base (leading spacing)"),
    "sd15_unipc": ("UniPCMultistepScheduler", "sd15_pndm", {},
                   "UniPCMultistepScheduler.from_config(SD1.5): UniPC bh2, order 2, with corrector"),
    "sd15_unipc_v": ("UniPCMultistepScheduler", "sd15_pndm", {"prediction_type": "v_prediction"},
                     "UniPC with v-prediction"),
    "sdxl_unipc": ("UniPCMultistepScheduler", "sdxl_base_euler", {}, "UniPC from SDXL base (leading spacing)"),
    "sd15_unipc_karras": ("UniPCMultistepScheduler", "sd15_pndm", {"use_karras_sigmas": True},
                          "A1111's 'UniPC' with Karras sigmas"),
    "sd15_dpmpp_sde": ("DPMSolverSDEScheduler", "sd15_pndm", {},
                       "DPMSolverSDEScheduler.from_config(SD1.5): A1111's 'DPM++ SDE'"),
    "sdxl_dpmpp_sde_karras": ("DPMSolverSDEScheduler", "sdxl_base_euler", {"use_karras_sigmas": True},
                              "A1111's 'DPM++ SDE Karras' from SDXL base"),
    "sd15_dpmpp_sde_v": ("DPMSolverSDEScheduler", "sd15_pndm", {"prediction_type": "v_prediction"},
                         "DPM++ SDE with v-prediction"),
}


def scheduler_configs() -> dict[str, dict]:
    """name -> the JSON object written to schedulers/<name>.json."""
    configs = {name: dict(cfg) for name, cfg in REAL_CONFIGS.items()}
    for name, (cls_name, base, overrides, _) in DERIVED_CONFIGS.items():
        sched = getattr(diffusers, cls_name).from_config(REAL_CONFIGS[base], **overrides)
        with tempfile.TemporaryDirectory() as tmp:
            sched.save_config(tmp)
            configs[name] = json.loads((Path(tmp) / "scheduler_config.json").read_text())
    return configs


def write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def scheduler_from_config(config: dict):
    return getattr(diffusers, config["_class_name"]).from_config(config)


@dataclass(frozen=True)
class SchedulerCase:
    name: str  # fixture scheduler_<name>.safetensors
    config: str  # schedulers/<config>.json
    steps: int = STEPS
    timesteps: tuple[int, ...] | None = None  # custom timesteps instead of num_inference_steps
    eta: float | None = None  # TCD gamma / DDIM eta, passed to step()
    stochastic: bool = False  # step() draws noise: pass a generator and record it
    brownian: bool = False  # DPMSolverSDEScheduler: record its Brownian-tree noise sampler


SCHEDULER_CASES = [
    SchedulerCase("euler_sdxl", "sdxl_base_euler"),
    SchedulerCase("euler_sdxl_v", "sdxl_base_euler_v"),
    SchedulerCase("euler_linspace", "sdxl_euler_linspace"),
    SchedulerCase("euler_lightning", "sdxl_lightning_euler"),
    SchedulerCase("lcm_dmd2", "dmd2_lcm", timesteps=(999, 749, 499, 249), stochastic=True),
    SchedulerCase("lcm_dmd2_steps", "dmd2_lcm", stochastic=True),
    SchedulerCase("tcd_hyper_sdxl", "hyper_sdxl_tcd", eta=0.3, stochastic=True),
    SchedulerCase("ddim_sd15", "sd15_ddim"),
    SchedulerCase("pndm_sd15", "sd15_pndm"),
    SchedulerCase("pndm_sd15_10", "sd15_pndm", steps=10),
    SchedulerCase("euler_a_sd15", "sd15_euler_a", stochastic=True),
    SchedulerCase("euler_a_trailing", "sdxl_euler_a_trailing", stochastic=True),
    SchedulerCase("ddim_sd21_v", "sd21_ddim_v"),
    SchedulerCase("ddim_hyper_trailing", "hyper_sdxl_ddim_trailing"),
    SchedulerCase("dpmpp_sd15", "sd15_dpmpp"),
    SchedulerCase("dpmpp_sd15_25", "sd15_dpmpp", steps=25),
    SchedulerCase("dpmpp_sd15_v", "sd15_dpmpp_v"),
    SchedulerCase("dpmpp_sd15_karras", "sd15_dpmpp_karras"),
    SchedulerCase("edm_dpm_playground", "playground_v25_edm_dpm"),
    SchedulerCase("edm_dpm_playground_v", "playground_v25_edm_dpm_v"),
    SchedulerCase("edm_euler_playground", "playground_v25_edm_euler"),
    SchedulerCase("edm_euler_playground_v", "playground_v25_edm_euler_v"),
    SchedulerCase("heun_sd15", "sd15_heun"),
    SchedulerCase("heun_sd15_v", "sd15_heun_v"),
    SchedulerCase("heun_sdxl_karras", "sdxl_heun_karras"),
    SchedulerCase("unipc_sd15", "sd15_unipc"),
    SchedulerCase("unipc_sd15_10", "sd15_unipc", steps=10),
    SchedulerCase("unipc_sd15_v", "sd15_unipc_v"),
    SchedulerCase("unipc_sdxl", "sdxl_unipc"),
    SchedulerCase("unipc_sd15_karras", "sd15_unipc_karras"),
    SchedulerCase("unipc_sd15_karras_10", "sd15_unipc_karras", steps=10),
    SchedulerCase("dpmpp_sde_sd15", "sd15_dpmpp_sde", brownian=True),
    SchedulerCase("dpmpp_sde_sdxl_karras", "sdxl_dpmpp_sde_karras", brownian=True),
    SchedulerCase("dpmpp_sde_sd15_v", "sd15_dpmpp_sde_v", brownian=True),
]


class RecordingBrownian:
    """Wraps DPMSolverSDEScheduler's Brownian-tree noise sampler and records, per call, the
    draw veto's scheduler takes instead: the first half of a step uses the sampler's output n1
    as is; the second half's output n2 (an increment over an interval containing the first)
    becomes the innovation z with n2 = (sqrt(d1) n1 + sqrt(d2 - d1) z) / sqrt(d2)."""

    def __init__(self, inner):
        self.inner = inner
        self.draws: list[torch.Tensor] = []
        self.first: tuple[float, float, torch.Tensor] | None = None

    def __call__(self, sigma, sigma_next):
        n = self.inner(sigma, sigma_next)
        frm, to = float(sigma), float(sigma_next)
        if self.first is not None and abs(self.first[0] - frm) < 1e-12 and to < self.first[1]:
            _, mid, n1 = self.first
            d1, d2 = frm - mid, frm - to
            z = (n.double() * d2 ** 0.5 - n1.double() * d1 ** 0.5) / (d2 - d1) ** 0.5
            self.draws.append(z.float())
            self.first = None
        else:
            self.draws.append(n.clone())
            self.first = (frm, to, n.clone())
        return n

FAKE_MODEL = "model_output = 0.1 * scaled_input + 0.05 * timestep / 1000"


def fake_model(scaled_input: torch.Tensor, t) -> torch.Tensor:
    return 0.1 * scaled_input + 0.05 * (float(t) / 1000.0)


@contextlib.contextmanager
def capture_noise(sched):
    """Records every tensor the scheduler draws through diffusers' randn_tensor."""
    module = sys.modules[type(sched).__module__]
    drawn: list[torch.Tensor] = []
    original = getattr(module, "randn_tensor", None)
    if original is None:
        yield drawn
        return

    def recording(*args, **kwargs):
        t = original(*args, **kwargs)
        drawn.append(t.clone())
        return t

    module.randn_tensor = recording
    try:
        yield drawn
    finally:
        module.randn_tensor = original


@torch.no_grad()
def write_scheduler_fixtures(out: Path, configs: dict[str, dict], summary: list[str]) -> None:
    init = torch.randn(1, 4, HEIGHT // 8, WIDTH // 8, generator=torch.Generator().manual_seed(701))
    for case in SCHEDULER_CASES:
        config = configs[case.config]
        sched = scheduler_from_config(config)
        if case.timesteps is not None:
            sched.set_timesteps(timesteps=list(case.timesteps))
        else:
            sched.set_timesteps(case.steps)
        tensors = {
            "timesteps": sched.timesteps.to(torch.float32),
            "init_latents": init,
            "init_noise_sigma": torch.tensor([float(sched.init_noise_sigma)], dtype=torch.float32),
        }
        sigmas = getattr(sched, "sigmas", None)
        if sigmas is not None:
            tensors["sigmas"] = sigmas.to(torch.float32)
        gen = torch.Generator().manual_seed(702)
        step_kwargs = {"generator": gen} if case.stochastic else {}
        if case.eta is not None:
            step_kwargs["eta"] = case.eta
        latents = init * sched.init_noise_sigma
        noise_steps = []
        brownian = None
        if case.brownian:
            # What step() would build on its first call, wrapped to record.
            positive = sched.sigmas[sched.sigmas > 0]
            brownian = RecordingBrownian(diffusers.schedulers.scheduling_dpmsolver_sde.BrownianTreeNoiseSampler(
                latents, positive.min().item(), sched.sigmas.max().item(), 703))
            sched.noise_sampler = brownian
        for k, t in enumerate(sched.timesteps):
            x = sched.scale_model_input(latents, t)
            mo = fake_model(x, t)
            with capture_noise(sched) as drawn:
                before = len(brownian.draws) if brownian else 0
                latents = sched.step(mo, t, latents, **step_kwargs).prev_sample
                if brownian and len(brownian.draws) > before:
                    assert len(brownian.draws) == before + 1
                    drawn.append(brownian.draws[-1])
            assert case.stochastic or case.brownian or not drawn, f"{case.name}: unexpected noise"
            assert len(drawn) <= 1
            tensors[f"step_{k}_scaled_input"] = x
            tensors[f"step_{k}_latents"] = latents
            if drawn:
                tensors[f"step_{k}_noise"] = drawn[0]
                noise_steps.append(k)
        assert torch.isfinite(latents).all()
        meta = {
            "scheduler": config["_class_name"],
            "config": f"schedulers/{case.config}.json",
            "prediction_type": config.get("prediction_type", "epsilon"),
            "timestep_spacing": str(config.get("timestep_spacing", "")),
            # steps asked for (PNDM makes one model call more than that, Heun 2n - 1)
            "num_inference_steps": str(len(sched.timesteps) if case.timesteps else case.steps),
            "custom_timesteps": json.dumps(list(case.timesteps)) if case.timesteps else "",
            "eta": repr(case.eta) if case.eta is not None else "",
            "fake_model": FAKE_MODEL,
            "noise_steps": json.dumps(noise_steps),
        }
        write_safetensors(out / f"scheduler_{case.name}.safetensors", tensors, meta)
        ts = [round(x, 3) for x in tensors["timesteps"].tolist()]
        summary.append(f"scheduler {case.name:24s} t = {ts if len(ts) <= 6 else ts[:3] + ['...'] + ts[-2:]}"
                       f" init_noise_sigma {float(sched.init_noise_sigma):.4f} noise at {noise_steps}")


# --------------------------------------------------------------------------------------------
# Pipeline folders.
# --------------------------------------------------------------------------------------------


def set_pad_token(folder: Path, pad: str, vocab: dict[str, int]) -> None:
    """Makes the CLIP tokenizer pad with `pad` (SDXL tokenizer_2 pads with "!"), as the real
    tokenizer_2 configs say."""
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["pad_token"] = pad
    config["added_tokens_decoder"][str(vocab[pad])] = {
        "content": pad, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True,
    }
    config["added_tokens_decoder"] = dict(sorted(config["added_tokens_decoder"].items(), key=lambda kv: int(kv[0])))
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    specials = json.loads((folder / "special_tokens_map.json").read_text())
    specials["pad_token"] = {"content": pad, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")


def fix_model_index(folder: Path, tokenizers: tuple[str, ...]) -> None:
    index = json.loads((folder / "model_index.json").read_text())
    for name in tokenizers:
        index[name] = ["transformers", "CLIPTokenizer"]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def build_shared(work: Path) -> dict:
    vocab, merges = learn_clip_bpe(corpus_lines(), CLIP_NUM_MERGES)
    write_clip_tokenizer(work / "tokenizer", vocab, merges)
    write_clip_tokenizer(work / "tokenizer_2", vocab, merges)
    set_pad_token(work / "tokenizer_2", SDXL_PAD_TOKEN, vocab)
    return dict(
        vocab=vocab,
        merges=merges,
        tokenizer=CLIPTokenizer.from_pretrained(work / "tokenizer"),
        tokenizer_2=CLIPTokenizer.from_pretrained(work / "tokenizer_2"),
        # The real SDXL text_encoder is the same CLIP ViT-L as SD1.5's: same seed, same weights.
        clip_l=build_clip(len(vocab), with_projection=False, seed=621),
        clip_g=build_clip(len(vocab), with_projection=True, seed=622),
    )


def save_pipeline_folder(model: str, folder: Path, shared: dict, configs: dict[str, dict]):
    if folder.exists():
        shutil.rmtree(folder)
    if model == "sd15":
        pipe = StableDiffusionPipeline(
            vae=build_vae(0.18215, seed=631),
            text_encoder=shared["clip_l"],
            tokenizer=shared["tokenizer"],
            unet=build_unet("sd15"),
            scheduler=scheduler_from_config(configs["sd15_dpmpp"]),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        scheduler_json = configs["sd15_dpmpp"]
    else:
        pipe = StableDiffusionXLPipeline(
            vae=build_vae(0.13025, seed=632),
            text_encoder=shared["clip_l"],
            text_encoder_2=shared["clip_g"],
            tokenizer=shared["tokenizer"],
            tokenizer_2=shared["tokenizer_2"],
            unet=build_unet("sdxl"),
            scheduler=scheduler_from_config(configs["sdxl_base_euler"]),
            force_zeros_for_empty_prompt=True,
            add_watermarker=False,
        )
        scheduler_json = configs["sdxl_base_euler"]
    pipe.save_pretrained(folder, safe_serialization=True)
    restore_clip_prefix(folder / "text_encoder" / "model.safetensors")
    write_json(folder / "scheduler" / "scheduler_config.json", scheduler_json)
    # Tokenizers exactly as the real repos ship them (vocab.json + merges.txt, no tokenizer.json).
    tokenizers = ("tokenizer",) if model == "sd15" else ("tokenizer", "tokenizer_2")
    for name in tokenizers:
        shutil.rmtree(folder / name)
        write_clip_tokenizer(folder / name, shared["vocab"], shared["merges"])
    if model == "sdxl":
        set_pad_token(folder / "tokenizer_2", SDXL_PAD_TOKEN, shared["vocab"])
    fix_model_index(folder, tokenizers)
    return pipe


def load_pipeline(model: str, folder: Path):
    cls = StableDiffusionPipeline if model == "sd15" else StableDiffusionXLPipeline
    pipe = cls.from_pretrained(folder, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --------------------------------------------------------------------------------------------
# Checks.
# --------------------------------------------------------------------------------------------


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||"""
    return ((a - b).norm() / b.norm()).item()


def scaled_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max|a - b| / max(1, max|b|): the parity measure of the Rust tests."""
    return max_abs(a, b) / max(1.0, b.abs().max().item())


def check_loaded(loaded, built, names) -> None:
    for name in names:
        a, b = getattr(loaded, name).state_dict(), getattr(built, name).state_dict()
        assert a.keys() == b.keys(), f"{name}: keys differ"
        for k in a:
            assert torch.equal(a[k], b[k]), f"{name}.{k} differs after loading"


def check_tokenizers(model: str, pipe, shared: dict) -> None:
    """transformers' tokenizers (loaded from the folder) agree with the independent CLIP BPE
    encoder of flux_reference; tokenizer_2 pads with "!" (id 0)."""
    vocab, merges = shared["vocab"], shared["merges"]
    for text in [PROMPT, NEGATIVE_PROMPT, "A Photo of a CAT,  wearing glasses", "zebra 1234 quux", "it's the cat's hat"]:
        expected = clip_encode_reference(text, vocab, merges)
        assert tokenize(pipe.tokenizer, text, True)[0].tolist() == expected, text
        n = expected.index(vocab[CLIP_EOS]) + 1
        assert tokenize(pipe.tokenizer, text, False)[0].tolist() == expected[:n], text
        if model == "sdxl":
            ids_2 = tokenize(pipe.tokenizer_2, text, True)[0].tolist()
            assert ids_2 == expected[:n] + [vocab[SDXL_PAD_TOKEN]] * (CLIP_MAX_LENGTH - n), text
            assert vocab[SDXL_PAD_TOKEN] == 0


@torch.no_grad()
def check_encode(model: str, pipe) -> None:
    """Our encode() equals the pipeline's encode_prompt, and the unpadded negative equals the
    first tokens of the padded one (CLIP attention is causal)."""
    pos, neg = encode(model, pipe, PROMPT), encode(model, pipe, NEGATIVE_PROMPT)
    if model == "sd15":
        e, ne = pipe.encode_prompt(PROMPT, "cpu", 1, True, NEGATIVE_PROMPT)
        assert torch.equal(e, pos.embeds) and torch.equal(ne, neg.embeds)
    else:
        e, ne, p, np_ = pipe.encode_prompt(PROMPT, device="cpu", do_classifier_free_guidance=True, negative_prompt=NEGATIVE_PROMPT)
        assert torch.equal(e, pos.embeds) and torch.equal(ne, neg.embeds)
        assert torch.equal(p, pos.pooled) and torch.equal(np_, neg.pooled)
    unpadded = encode(model, pipe, NEGATIVE_PROMPT, padded=False)
    n = unpadded.embeds.shape[1]
    err = max_abs(unpadded.embeds, neg.embeds[:, :n])
    assert err < 1e-5, f"{model}: unpadded negative differs from the padded prefix by {err}"


@torch.no_grad()
def check_vsf_block_merge(model: str, pipe) -> float:
    """The dense VSF attention of ReferenceAttnProcessor equals attending the positive and the
    (flipped, biased) negative key blocks separately and merging them by log-sum-exp, the way
    the Rust side computes it. Checked on the first cross-attention module with the real text
    contexts and random image tokens."""
    attn = next(m for n, m in pipe.unet.named_modules() if n.endswith("attn2"))
    g = VSF
    x = torch.randn(1, 16, attn.to_q.in_features, generator=torch.Generator().manual_seed(661))
    pos, vsf_neg = encode(model, pipe, PROMPT), encode(model, pipe, NEGATIVE_PROMPT, padded=False)
    holder = PlanHolder(ForwardPlan(g=g, neg_context=vsf_neg.embeds, guided_rows=(0,)))
    dense = ReferenceAttnProcessor(holder, pag_layer=False)(attn, x, pos.embeds)

    h = attn.heads
    q = split_heads(attn.to_q(x), h)

    def block(ctx, value_scale, bias):
        k, v = split_heads(attn.to_k(ctx), h), split_heads(value_scale * attn.to_v(ctx), h)
        logits = (q @ k.transpose(-1, -2)) * attn.scale + bias
        lse = logits.logsumexp(dim=-1, keepdim=True)
        return (logits - lse).exp() @ v, lse

    out_p, lse_p = block(pos.embeds, 1.0, 0.0)
    out_n, lse_n = block(vsf_neg.embeds, -g.vsf_scale, -g.vsf_bias)
    lse = torch.logaddexp(lse_p, lse_n)
    merged = merge_heads((lse_p - lse).exp() * out_p + (lse_n - lse).exp() * out_n)
    err = max_abs(attn.to_out[0](merged), dense)
    assert err < 1e-5, f"{model}: VSF block merge differs from the dense attention by {err}"
    return err


# --------------------------------------------------------------------------------------------
# Fixtures.
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def write_text_fixture(out: Path, model: str, pipe) -> None:
    pos, neg = encode(model, pipe, PROMPT), encode(model, pipe, NEGATIVE_PROMPT)
    vsf = encode(model, pipe, NEGATIVE_PROMPT, padded=False)
    tensors = {}
    for prefix, e in (("", pos), ("neg_", neg), ("vsf_neg_", vsf)):
        tensors[f"{prefix}input_ids"] = e.ids
        tensors[f"{prefix}prompt_embeds"] = e.embeds
        if model == "sdxl":
            tensors[f"{prefix}input_ids_2"] = e.ids_2
            if prefix != "vsf_neg_":
                tensors[f"{prefix}text_embeds"] = e.pooled
    if model == "sdxl":
        tensors["add_time_ids"] = add_time_ids()
    meta = {"prompt": PROMPT, "negative_prompt": NEGATIVE_PROMPT, "model": model, "height": str(HEIGHT), "width": str(WIDTH)}
    write_safetensors(out / f"text_{model}.safetensors", tensors, meta)


def unet_cases(model: str) -> dict[str, tuple[UnetGuidance, bool]]:
    """case -> (attention guidance, PAG-perturbed)"""
    return {
        "none": (NO_GUIDANCE, False),
        "nag": (NAG[model], False),
        "nasa": (NASA, False),
        "vsf": (VSF, False),
        "pag": (NO_GUIDANCE, True),
    }


@torch.no_grad()
def write_unet_fixtures(out: Path, model: str, pipe, summary: list[str]) -> None:
    unet = pipe.unet
    gen = torch.Generator().manual_seed(641 if model == "sd15" else 642)
    sample = torch.randn(1, 4, HEIGHT // 8, WIDTH // 8, generator=gen)
    timestep = torch.tensor([UNET_TIMESTEP])
    pos, neg = encode(model, pipe, PROMPT), encode(model, pipe, NEGATIVE_PROMPT)
    vsf_neg = encode(model, pipe, NEGATIVE_PROMPT, padded=False)
    added = {"text_embeds": pos.pooled, "time_ids": add_time_ids()} if model == "sdxl" else None
    base_inputs = {"sample": sample, "timestep": timestep, "encoder_hidden_states": pos.embeds}
    if model == "sdxl":
        base_inputs.update(text_embeds=pos.pooled, time_ids=add_time_ids())

    # The unguided reference forward must equal diffusers' own UNet.
    expected = unet(sample, timestep, encoder_hidden_states=pos.embeds, added_cond_kwargs=added, return_dict=False)[0]
    unet64 = copy.deepcopy(unet).double()
    added64 = {k: v.double() for k, v in added.items()} if added else None
    base = None
    for case, (g, perturbed) in unet_cases(model).items():
        neg_ctx = vsf_neg.embeds if g.mode == "vsf" else neg.embeds
        plan = ForwardPlan(g=g, neg_context=neg_ctx, guided_rows=(0,) if g.guided else (), pag_rows=(0,) if perturbed else ())
        record: dict[str, torch.Tensor] = {}
        with reference_attention(unet) as holder:
            output = unet_call(unet, holder, sample, timestep, pos.embeds, plan, added, record)
        with reference_attention(unet64) as holder64:
            plan64 = replace(plan, neg_context=neg_ctx.double())
            output64 = unet_call(unet64, holder64, sample.double(), timestep.double(), pos.embeds.double(), plan64, added64)
        if case == "none":
            err = max_abs(output, expected)
            assert err < 1e-5, f"{model}: reference UNet differs from diffusers by {err}"
            summary.append(f"unet {model}: reference (none) vs diffusers UNet2DConditionModel max abs diff {err:.2e}")
            base = output
        tensors = {**base_inputs, "output": output, **record}
        if g.mode in ("nag", "nasa"):
            tensors["neg_encoder_hidden_states"] = neg.embeds
        elif g.mode == "vsf":
            tensors["vsf_neg_encoder_hidden_states"] = vsf_neg.embeds
        meta = {
            "model": model,
            "guidance": "pag" if perturbed else g.mode,
            **g.metadata(),
            "pag_applied_layers": json.dumps(list(PAG_APPLIED_LAYERS)),
            "perturbed": str(perturbed).lower(),
            "pag_layers": json.dumps(sorted(pag_layer_names(unet))),
        }
        write_safetensors(out / f"unet_{model}_{case}.safetensors", tensors, meta)
        line = f"unet {model} {case:5s}: |out| {output.norm():7.3f}  f32-vs-f64 rel {rel(output.double(), output64):.1e}"
        if case != "none":
            diff = rel(output, base)
            assert diff > 1e-2, f"{model} {case}: guidance changes the output by only {diff}"
            line += f"  rel diff vs none {diff:.3f}"
        summary.append(line)


def pipeline_cases(model: str) -> list[PipelineCase]:
    nag = NAG[model]
    if model == "sd15":
        return [PipelineCase("none"), PipelineCase("cfg", cfg=True), PipelineCase("cfg_nag", nag, cfg=True)]
    return [
        PipelineCase("none", save_image=True),
        PipelineCase("nag", nag, save_image=True),
        PipelineCase("nag_end", nag, nag_end=0.3),
        PipelineCase("cfg", cfg=True),
        PipelineCase("cfg_nag", nag, cfg=True),
        PipelineCase("cfg_pag", cfg=True, pag=True),
        PipelineCase("cfg_pag_nag", nag, cfg=True, pag=True),
        PipelineCase("nasa", NASA),
        PipelineCase("vsf", VSF),
    ]


@torch.no_grad()
def diffusers_latents(model: str, pipe, case: PipelineCase, init: torch.Tensor) -> torch.Tensor | None:
    """The same case run by diffusers' own pipeline (none / cfg / cfg+pag only)."""
    kwargs = dict(
        prompt=PROMPT, height=HEIGHT, width=WIDTH, num_inference_steps=STEPS, latents=init.clone(), output_type="latent",
    )
    if case.attn.guided:
        return None
    if case.cfg:
        kwargs.update(negative_prompt=NEGATIVE_PROMPT, guidance_scale=CFG_SCALE)
    else:
        kwargs.update(guidance_scale=1.0)  # diffusers: CFG only when guidance_scale > 1
    if case.pag:
        pag_pipe = StableDiffusionXLPAGPipeline(**pipe.components, pag_applied_layers=list(PAG_APPLIED_LAYERS))
        pag_pipe.set_progress_bar_config(disable=True)
        return pag_pipe(**kwargs, pag_scale=PAG_SCALE).images
    return pipe(**kwargs).images


@torch.no_grad()
def write_pipeline_fixtures(out: Path, model: str, pipe, init: torch.Tensor, summary: list[str]) -> None:
    check_encode(model, pipe)
    finals: dict[str, torch.Tensor] = {}
    for case in pipeline_cases(model):
        timesteps, steps, noises, image = reference_pipeline(model, pipe, case, init)
        final = steps[-1]
        theirs = diffusers_latents(model, pipe, case, init)
        if theirs is not None:
            err = scaled_err(final, theirs)
            assert err < 1e-5, f"{model} {case.name}: reference pipeline differs from diffusers by {err}"
            who = "StableDiffusionXLPAGPipeline" if case.pag else type(pipe).__name__
            summary.append(f"pipeline {model} {case.name}: reference vs {who} scaled max diff {err:.2e}")
        tensors = {"init_latents": init, "timesteps": timesteps, "final_latents": final}
        tensors.update({f"step_{k}_latents": s for k, s in enumerate(steps)})
        tensors.update({f"step_{k}_noise_pred": n for k, n in enumerate(noises)})
        if image is not None:
            tensors["image"] = image
        meta = {
            "model": model,
            "prompt": PROMPT,
            "negative_prompt": NEGATIVE_PROMPT,
            "guidance": case.guidance,
            **case.attn.metadata(),
            "nag_end": repr(case.nag_end),
            "guidance_scale": repr(CFG_SCALE if case.cfg else 1.0),
            "pag_scale": repr(PAG_SCALE if case.pag else 0.0),
            "pag_applied_layers": json.dumps(list(PAG_APPLIED_LAYERS)),
            "scheduler": pipe.scheduler.__class__.__name__,
            "steps": str(STEPS),
            "height": str(HEIGHT),
            "width": str(WIDTH),
        }
        write_safetensors(out / f"pipeline_{model}_{case.name}.safetensors", tensors, meta)
        finals[case.name] = final
        line = f"pipeline {model} {case.name:11s}: t = {[round(x, 2) for x in timesteps.tolist()]}"
        if case.name != "none":
            diff = rel(final, finals["none"])
            assert diff > 1e-2, f"{model} {case.name}: guidance changes the latents by only {diff}"
            line += f"  final latents rel diff vs none {diff:.3f}"
        if case.nag_end < 1.0:
            diff = rel(final, finals["nag"])
            assert diff > 1e-2, f"{model} {case.name}: the NAG window changes the latents by only {diff}"
            line += f", vs nag {diff:.3f}"
        if image is not None:
            line += f"  image range [{image.min():.2f}, {image.max():.2f}]"
        summary.append(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"fixture folder (default {DEFAULT_OUT})")
    parser.add_argument("--schedulers-only", action="store_true",
                        help="write only schedulers/*.json and scheduler_*.safetensors (no models; seconds)")
    args = parser.parse_args()
    out: Path = args.out
    assert sys.byteorder == "little", "safetensors data is little-endian"

    for logging in (diffusers.utils.logging, transformers.utils.logging):
        logging.set_verbosity_error()
        logging.disable_progress_bar()
    torch.manual_seed(0)
    torch.set_num_threads(1)  # bit-for-bit reproducible reductions
    torch.use_deterministic_algorithms(True)

    configs = scheduler_configs()
    if (out / "schedulers").exists():
        shutil.rmtree(out / "schedulers")
    for name, config in configs.items():
        write_json(out / "schedulers" / f"{name}.json", config)
    if args.schedulers_only:
        summary: list[str] = []
        write_scheduler_fixtures(out, configs, summary)
        print("\n".join(summary))
        return

    with tempfile.TemporaryDirectory() as tmp:
        shared = build_shared(Path(tmp))
    pipes = {}
    summary: list[str] = []
    for model in ("sd15", "sdxl"):
        built = save_pipeline_folder(model, out / model, shared, configs)
        pipes[model] = load_pipeline(model, out / model)  # everything below uses the saved folder
        names = ("unet", "vae", "text_encoder") + (("text_encoder_2",) if model == "sdxl" else ())
        check_loaded(pipes[model], built, names)
        check_tokenizers(model, pipes[model], shared)
        summary.append(f"vsf {model}: dense attention vs log-sum-exp block merge max abs diff {check_vsf_block_merge(model, pipes[model]):.2e}")
        assert pipes[model].scheduler.config._class_name == ("DPMSolverMultistepScheduler" if model == "sd15" else "EulerDiscreteScheduler")

    init = torch.randn(1, 4, HEIGHT // 8, WIDTH // 8, generator=torch.Generator().manual_seed(651))
    for model, pipe in pipes.items():
        write_text_fixture(out, model, pipe)
        write_unet_fixtures(out, model, pipe, summary)
        write_pipeline_fixtures(out, model, pipe, init, summary)
    write_scheduler_fixtures(out, configs, summary)

    print("\n".join(summary))
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"wrote {out} ({total / 1e6:.2f} MB on disk)")


if __name__ == "__main__":
    sys.exit(main())
