#!/usr/bin/env python3
"""Golden fixtures for veto's Wan2.1 denoiser, its guidance and the UniPC flow scheduler.

Builds two tiny random `WanTransformer3DModel`s (T2V, and I2V with the image embedder and the
added k/v projections) in the folder layout of the real Wan-AI/Wan2.1-*-Diffusers repos
(`transformer/config.json` + `diffusion_pytorch_model.safetensors`, `scheduler/scheduler_config.json`
with Wan's UniPC settings) under tests/fixtures/wan/{t2v,i2v}, then writes f32 safetensors:

- `transformer_<model>_<case>.safetensors`: one transformer call, every block's output and the
  final output, for the cases
  * `none`: the stock diffusers processors;
  * `nag`: the cross-attention processor of the official NAG Wan code
    (ChenDarYen/Normalized-Attention-Guidance, `NAGWanAttnProcessor2_0`), re-implemented here
    for diffusers 0.42's `WanAttention`: the positive and the negative text batched after each
    other as `encoder_hidden_states` (2B rows for B latent rows), the queries computed once, L1
    norms, `nan_to_num(ratio, 10)`, clipped rows `G / (|G|_1 + 1e-7) |Z+|_1 tau`, then the blend;
    the image attention (I2V) added after it, unguided;
  * `nasa`: the same data flow with `Z+ - phi Z-`;
  * `cfg_nag`: the official CFG + NAG: the conditional pass with NAG, the unconditional pass
    (negative prompt as context) plain; both passes recorded (`uncond_*`, `cond_*`);
  * `vsf`: the official VSF Wan processor (weathon/VSF, `wan/processor.py`): context `[P, N]`
    (positive padded to L - n, negative unpadded, n rows), values of the last n rows times
    -alpha, an additive mask of -beta on their logits (after the 1/sqrt(d) scaling).
- `sampler_<case>.safetensors`: the T2V transformer driven by diffusers' UniPCMultistepScheduler
  with Wan's scheduler config (flow_prediction, use_flow_sigmas, flow_shift 3), every step's
  latents: `none`, `cfg`, `nag`, `cfg_nag`, `nasa`, `vsf`, `nag_end` (the official window rule:
  guidance off once `t < (1 - nag_end) * 1000`).
- `pipeline_flowmatch_cfg.safetensors`: the stock WanPipeline with FlowMatchEulerDiscreteScheduler
  (shift 5) instead of UniPC, CFG.
- `unipc_flow.safetensors`: the scheduler alone (sigmas, timesteps, per-step samples for fixed
  model outputs) for the repo config and a `flow_shift` override.

Text lengths are tiny (16 rows instead of 512) for T2V; the I2V model keeps 512 text rows because
diffusers' processor splits the image tokens off as `total - 512`. CPU, f32, fixed seeds; running
it twice writes identical files. Developers run it; CI never does:

    /work/venv/ref/bin/python tools/reference/wan_reference.py
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch
import torch.nn.functional as F
from diffusers import UniPCMultistepScheduler, WanTransformer3DModel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from flux_reference import randomize_, write_safetensors  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]
OUT = REPO_ROOT / "tests" / "fixtures" / "wan"

T2V = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=16,
    in_channels=16,
    out_channels=16,
    text_dim=24,
    freq_dim=32,
    ffn_dim=48,
    num_layers=2,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    image_dim=None,
    added_kv_proj_dim=None,
    rope_max_seq_len=1024,
)
I2V = {**T2V, "in_channels": 36, "image_dim": 20, "added_kv_proj_dim": 32}

# Wan2.1-T2V-1.3B-Diffusers' scheduler/scheduler_config.json.
SCHEDULER = {
    "_class_name": "UniPCMultistepScheduler",
    "_diffusers_version": "0.33.0.dev0",
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "disable_corrector": [],
    "dynamic_thresholding_ratio": 0.995,
    "final_sigmas_type": "zero",
    "flow_shift": 3.0,
    "lower_order_final": True,
    "num_train_timesteps": 1000,
    "predict_x0": True,
    "prediction_type": "flow_prediction",
    "rescale_betas_zero_snr": False,
    "sample_max_value": 1.0,
    "solver_order": 2,
    "solver_p": None,
    "solver_type": "bh2",
    "steps_offset": 0,
    "thresholding": False,
    "timestep_spacing": "linspace",
    "trained_betas": None,
    "use_beta_sigmas": False,
    "use_exponential_sigmas": False,
    "use_flow_sigmas": True,
    "use_karras_sigmas": False,
}

LATENT_GRID = (2, 4, 6)  # latent frames, height, width: 2 x 2 x 3 = 12 tokens
T2V_TEXT = 16  # text rows of the T2V cases (512 in the real pipeline)
I2V_TEXT = 512  # diffusers' I2V processor needs the real 512
POS_TOKENS, NEG_TOKENS = 7, 5  # real rows of the prompt and the negative prompt
IMAGE_TOKENS = 6  # CLIP vision tokens (257 in the real pipeline)
TIMESTEP = 757.0
NAG = dict(nag_scale=5.0, nag_tau=2.5, nag_alpha=0.25)
NASA_SCALE = 0.5
VSF = dict(vsf_scale=1.7, vsf_bias=0.2)
CFG_SCALE = 5.0
STEPS = 5
NAG_END = 0.5


# ---------------------------------------------------------------------------------------------
# Cross-attention processors with the official NAG / VSF Wan semantics.
# ---------------------------------------------------------------------------------------------


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.unflatten(2, (heads, -1)).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2).flatten(2, 3)


class NagProcessor:
    """The official NAGWanAttnProcessor2_0's data flow (NAG), or NASA with `nasa` set."""

    def __init__(self, scale: float, tau: float, alpha: float, image_tokens: int, nasa: float | None = None):
        self.scale, self.tau, self.alpha, self.image_tokens, self.nasa = scale, tau, alpha, image_tokens, nasa

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None, **kw):
        b = len(hidden_states)
        guided = len(encoder_hidden_states) == 2 * b
        img = None
        if attn.add_k_proj is not None:
            img = encoder_hidden_states[:, : self.image_tokens]
            encoder_hidden_states = encoder_hidden_states[:, self.image_tokens :]
            if guided:
                img = img[:b]
        q = _heads(attn.norm_q(attn.to_q(hidden_states)), attn.heads)
        k = _heads(attn.norm_k(attn.to_k(encoder_hidden_states)), attn.heads)
        v = _heads(attn.to_v(encoder_hidden_states), attn.heads)
        z_img = None
        if img is not None:
            ki = _heads(attn.norm_added_k(attn.add_k_proj(img)), attn.heads)
            vi = _heads(attn.add_v_proj(img), attn.heads)
            z_img = _merge(F.scaled_dot_product_attention(q, ki, vi))
        if guided:
            k, k_neg = torch.chunk(k, 2, dim=0)
            v, v_neg = torch.chunk(v, 2, dim=0)
        z = _merge(F.scaled_dot_product_attention(q, k, v))
        if guided:
            z_neg = _merge(F.scaled_dot_product_attention(q, k_neg, v_neg))
            if self.nasa is not None:
                z = z - self.nasa * z_neg
            else:
                g = z * self.scale - z_neg * (self.scale - 1)
                n_pos = torch.norm(z, p=1, dim=-1, keepdim=True).expand(*z.shape)
                n_g = torch.norm(g, p=1, dim=-1, keepdim=True).expand(*g.shape)
                ratio = torch.nan_to_num(n_g / n_pos, 10)
                clip = ratio > self.tau
                g[clip] = g[clip] / (n_g[clip] + 1e-7) * n_pos[clip] * self.tau
                z = g * self.alpha + z * (1 - self.alpha)
        if z_img is not None:
            z = z + z_img
        return attn.to_out[1](attn.to_out[0](z))


class VsfProcessor:
    """The official VSF Wan processor (positive pass): context `[P, N]`, the last `neg_len`
    values times -alpha, an additive -beta mask on their logits; the image split as diffusers'
    `total - text_len`."""

    def __init__(self, alpha: float, beta: float, neg_len: int, text_len: int):
        self.alpha, self.beta, self.neg_len, self.text_len = alpha, beta, neg_len, text_len

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None, **kw):
        img = None
        if attn.add_k_proj is not None:
            n_img = encoder_hidden_states.shape[1] - self.text_len
            img = encoder_hidden_states[:, :n_img]
            encoder_hidden_states = encoder_hidden_states[:, n_img:]
        q = _heads(attn.norm_q(attn.to_q(hidden_states)), attn.heads)
        k = _heads(attn.norm_k(attn.to_k(encoder_hidden_states)), attn.heads)
        v = _heads(attn.to_v(encoder_hidden_states), attn.heads)
        v[:, :, -self.neg_len :] *= -self.alpha
        mask = torch.zeros(1, q.shape[2], k.shape[2])
        mask[:, :, -self.neg_len :] = -self.beta
        z_img = None
        if img is not None:
            ki = _heads(attn.norm_added_k(attn.add_k_proj(img)), attn.heads)
            vi = _heads(attn.add_v_proj(img), attn.heads)
            z_img = _merge(F.scaled_dot_product_attention(q, ki, vi))
        z = _merge(F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
        if z_img is not None:
            z = z + z_img
        return attn.to_out[1](attn.to_out[0](z))


def set_cross_processor(tr: WanTransformer3DModel, proc) -> None:
    for block in tr.blocks:
        block.attn2.set_processor(proc)


def stock_processors(tr: WanTransformer3DModel) -> None:
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    set_cross_processor(tr, WanAttnProcessor())


# ---------------------------------------------------------------------------------------------
# Models and inputs.
# ---------------------------------------------------------------------------------------------


def build_transformer(config: dict, seed: int) -> WanTransformer3DModel:
    torch.manual_seed(seed)
    tr = WanTransformer3DModel(**config).eval()
    with torch.no_grad():
        randomize_(tr, seed)
    return tr


def save_model_folder(folder: Path, tr: WanTransformer3DModel) -> None:
    if folder.exists():
        shutil.rmtree(folder)
    tr.save_pretrained(folder / "transformer", safe_serialization=True)
    (folder / "scheduler").mkdir(parents=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER, indent=2, sort_keys=True) + "\n")


def text_states(gen: torch.Generator, real: int, rows: int, dim: int) -> torch.Tensor:
    """UMT5-like states: `real` rows, then zero rows up to `rows` (as diffusers pads)."""
    x = torch.zeros(1, rows, dim)
    x[:, :real] = 0.5 * torch.randn(1, real, dim, generator=gen)
    return x


def run_traced(tr: WanTransformer3DModel, **kwargs) -> tuple[torch.Tensor, list[torch.Tensor]]:
    outs: list[torch.Tensor] = []
    hooks = [b.register_forward_hook(lambda m, i, o: outs.append(o.detach().clone())) for b in tr.blocks]
    try:
        with torch.no_grad():
            y = tr(return_dict=False, **kwargs)[0]
    finally:
        for h in hooks:
            h.remove()
    return y, outs


def transformer_fixtures(name: str, tr: WanTransformer3DModel, i2v: bool) -> None:
    gen = torch.Generator().manual_seed(7 if i2v else 3)
    c = I2V if i2v else T2V
    f, h, w = LATENT_GRID
    latents = torch.randn(1, c["in_channels"], f, h, w, generator=gen)
    rows = I2V_TEXT if i2v else T2V_TEXT
    pos = text_states(gen, POS_TOKENS, rows, c["text_dim"])
    neg = text_states(gen, NEG_TOKENS, rows, c["text_dim"])
    image = torch.randn(1, IMAGE_TOKENS, c["image_dim"], generator=gen) if i2v else None
    # VSF: the positive padded to rows - n, the negative unpadded.
    neg_vsf = neg[:, :NEG_TOKENS]
    pos_vsf = pos[:, : rows - NEG_TOKENS]
    t = torch.tensor([TIMESTEP])
    base = dict(latents=latents, timestep=t, context=pos, negative=neg)  # VSF: their first rows - n / n rows
    if image is not None:
        base["image"] = image

    def call(ctx, img_rows=1, **extra):
        kw = dict(hidden_states=latents, timestep=t, encoder_hidden_states=ctx)
        if image is not None:
            kw["encoder_hidden_states_image"] = image.repeat(img_rows, 1, 1)
        return run_traced(tr, **kw)

    def save(case: str, tensors: dict, meta: dict) -> None:
        meta = {"model": name, "timestep": str(TIMESTEP), "case": case, "neg_tokens": str(NEG_TOKENS), **{k: str(v) for k, v in meta.items()}}
        write_safetensors(OUT / f"transformer_{name}_{case}.safetensors", {**base, **tensors}, meta)

    def traced(prefix: str, y, outs) -> dict:
        d = {f"{prefix}output": y}
        d.update({f"{prefix}block_{i}": o for i, o in enumerate(outs)})
        return d

    stock_processors(tr)
    save("none", traced("", *call(pos)), {"attention": "none"})

    set_cross_processor(tr, NagProcessor(NAG["nag_scale"], NAG["nag_tau"], NAG["nag_alpha"], IMAGE_TOKENS))
    save("nag", traced("", *call(torch.cat([pos, neg]), img_rows=2)), {"attention": "nag", "nag_norm": "l1", **NAG})
    # CFG + NAG: the conditional pass with NAG, the unconditional pass plain (same processor).
    cond = traced("cond_", *call(torch.cat([pos, neg]), img_rows=2))
    uncond = traced("uncond_", *call(neg))
    save("cfg_nag", {**cond, **uncond}, {"attention": "nag", "nag_norm": "l1", **NAG})

    set_cross_processor(tr, NagProcessor(0, 0, 0, IMAGE_TOKENS, nasa=NASA_SCALE))
    save("nasa", traced("", *call(torch.cat([pos, neg]), img_rows=2)), {"attention": "nasa", "nasa_scale": NASA_SCALE})

    set_cross_processor(tr, VsfProcessor(VSF["vsf_scale"], VSF["vsf_bias"], NEG_TOKENS, rows))
    save("vsf", traced("", *call(torch.cat([pos_vsf, neg_vsf], dim=1))), {"attention": "vsf", **VSF})
    stock_processors(tr)


# ---------------------------------------------------------------------------------------------
# Sampler loops (transformer + UniPC), as WanPipeline's denoising loop.
# ---------------------------------------------------------------------------------------------


def sampler_fixtures(tr: WanTransformer3DModel) -> None:
    gen = torch.Generator().manual_seed(11)
    f, h, w = LATENT_GRID
    init = torch.randn(1, T2V["in_channels"], f, h, w, generator=gen)
    pos = text_states(gen, POS_TOKENS, T2V_TEXT, T2V["text_dim"])
    neg = text_states(gen, NEG_TOKENS, T2V_TEXT, T2V["text_dim"])
    neg_vsf = neg[:, :NEG_TOKENS]
    pos_vsf = pos[:, : T2V_TEXT - NEG_TOKENS]

    def loop(case: str, cfg: bool, attention: str | None, nag_end: float = 1.0) -> None:
        sched = UniPCMultistepScheduler.from_config(SCHEDULER)
        sched.set_timesteps(STEPS)
        if attention == "nag":
            set_cross_processor(tr, NagProcessor(NAG["nag_scale"], NAG["nag_tau"], NAG["nag_alpha"], IMAGE_TOKENS))
        elif attention == "nasa":
            set_cross_processor(tr, NagProcessor(0, 0, 0, IMAGE_TOKENS, nasa=NASA_SCALE))
        elif attention == "vsf":
            set_cross_processor(tr, VsfProcessor(VSF["vsf_scale"], VSF["vsf_bias"], NEG_TOKENS, T2V_TEXT))
        else:
            stock_processors(tr)
        latents = init.clone()
        steps = {}
        guiding = attention is not None
        for i, t in enumerate(sched.timesteps):
            if guiding and attention != "vsf" and t < (1 - nag_end) * 1000:
                guiding = False  # the official pipelines restore the plain processors for good
                stock_processors(tr)
            if attention == "vsf":
                ctx = torch.cat([pos_vsf, neg_vsf], dim=1)
            elif guiding:
                ctx = torch.cat([pos, neg])
            else:
                ctx = pos
            ts = t.expand(1)
            with torch.no_grad():
                pred = tr(hidden_states=latents, timestep=ts, encoder_hidden_states=ctx, return_dict=False)[0]
                if cfg:
                    un = tr(hidden_states=latents, timestep=ts, encoder_hidden_states=neg, return_dict=False)[0]
                    pred = un + CFG_SCALE * (pred - un)
            latents = sched.step(pred, t, latents, return_dict=False)[0]
            steps[f"step_{i}"] = latents.clone()
        stock_processors(tr)
        meta = {
            "guidance": ("cfg+" if cfg else "") + (attention or ("none" if not cfg else "")),
            "steps": STEPS,
            "guidance_scale": CFG_SCALE if cfg else 1.0,
            "nag_end": nag_end,
            "neg_tokens": NEG_TOKENS,
            "nag_norm": "l1",
            "nasa_scale": NASA_SCALE,
            **NAG,
            **VSF,
        }
        meta["guidance"] = meta["guidance"].rstrip("+") or "none"
        tensors = {
            "init_latents": init,
            "context": pos,
            "negative": neg,
            "timesteps": sched.timesteps.to(torch.float32),
            "sigmas": sched.sigmas.to(torch.float32),
            "final": latents,
            **steps,
        }
        write_safetensors(OUT / f"sampler_{case}.safetensors", tensors, {k: str(v) for k, v in meta.items()})

    loop("none", False, None)
    loop("cfg", True, None)
    loop("nag", False, "nag")
    loop("cfg_nag", True, "nag")
    loop("nasa", False, "nasa")
    loop("vsf", False, "vsf")
    loop("nag_end", False, "nag", nag_end=NAG_END)


def unipc_fixture() -> None:
    gen = torch.Generator().manual_seed(5)
    tensors = {}
    cases = {"repo": ({}, 10), "shift5": ({"flow_shift": 5.0}, 7), "order1": ({"solver_order": 1}, 4)}
    for name, (override, steps) in cases.items():
        sched = UniPCMultistepScheduler.from_config(SCHEDULER, **override)
        sched.set_timesteps(steps)
        sample = torch.randn(1, 4, 2, 3, 3, generator=gen)
        tensors[f"{name}_sample_0"] = sample.clone()
        for i, t in enumerate(sched.timesteps):
            out = 0.7 * torch.randn(sample.shape, generator=gen) + 0.3 * sample
            tensors[f"{name}_output_{i}"] = out
            sample = sched.step(out, t, sample, return_dict=False)[0]
            tensors[f"{name}_sample_{i + 1}"] = sample.clone()
        tensors[f"{name}_timesteps"] = sched.timesteps.to(torch.float32)
        tensors[f"{name}_sigmas"] = sched.sigmas.to(torch.float32)
    meta = {"cases": "repo:10,shift5:7,order1:4", "scheduler_config": json.dumps(SCHEDULER, sort_keys=True)}
    write_safetensors(OUT / "unipc_flow.safetensors", tensors, meta)


# ---------------------------------------------------------------------------------------------
# The whole pipeline on wan-parts' tiny UMT5 / tokenizer / VAE (tests/fixtures/wan_parts/wan).
# ---------------------------------------------------------------------------------------------

PARTS = REPO_ROOT / "tests" / "fixtures" / "wan_parts" / "wan"
PIPE_T2V = {**T2V, "in_channels": 4, "out_channels": 4, "text_dim": 32}
PIPE_SIZE = dict(height=32, width=48, num_frames=5)  # 2 latent frames of 4 x 6
PIPE_STEPS = 4
PROMPT = "a red fox jumps over a fence"
NEGATIVE = "blurry, static"


def run_stock(pipe, **kwargs) -> tuple[list, torch.Tensor]:
    """One stock pipeline call to latents, with every step's latents recorded."""
    steps: list = []

    def record(p, i, t, kw):
        steps.append(kw["latents"].clone())
        return {}

    with torch.no_grad():
        out = pipe(num_inference_steps=PIPE_STEPS, output_type="latent", callback_on_step_end=record, **PIPE_SIZE,
                   **kwargs).frames
    return steps, out


def pipeline_meta(prompt: str, meta: dict) -> dict:
    """The request a pipeline fixture replays, as string metadata."""
    meta = {"prompt": prompt, "negative_prompt": NEGATIVE, "steps": PIPE_STEPS, "height": PIPE_SIZE["height"],
            "width": PIPE_SIZE["width"], "frames": PIPE_SIZE["num_frames"], "max_sequence_length": 512, **meta}
    return {k: str(v) for k, v in meta.items()}


def write_model_index(folder: Path, class_name: str, **extra: list[str]) -> None:
    """model_index.json of a Wan pipeline folder: the T2V components plus `extra` (I2V's image
    encoder and processor)."""
    index = {
        "_class_name": class_name,
        "_diffusers_version": "0.42.1",
        "scheduler": ["diffusers", "UniPCMultistepScheduler"],
        "text_encoder": ["transformers", "UMT5EncoderModel"],
        "tokenizer": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", "WanTransformer3DModel"],
        "vae": ["diffusers", "AutoencoderKLWan"],
        **extra,
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def pipeline_fixtures() -> None:
    from diffusers import AutoencoderKLWan, WanPipeline
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean
    from transformers import AutoTokenizer, UMT5EncoderModel

    folder = OUT / "pipeline"
    tr = build_transformer(PIPE_T2V, 3)
    save_model_folder(folder, tr)
    write_model_index(folder, "WanPipeline")
    tok = AutoTokenizer.from_pretrained(PARTS / "tokenizer")
    te = UMT5EncoderModel.from_pretrained(PARTS / "text_encoder").eval()
    vae = AutoencoderKLWan.from_pretrained(PARTS / "vae").eval()
    sched = UniPCMultistepScheduler.from_config(SCHEDULER)
    pipe = WanPipeline(tokenizer=tok, text_encoder=te, transformer=tr, vae=vae, scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator().manual_seed(21)
    f = (PIPE_SIZE["num_frames"] - 1) // 4 + 1
    init = torch.randn(1, 4, f, PIPE_SIZE["height"] // 8, PIPE_SIZE["width"] // 8, generator=gen)
    pos, neg = pipe.encode_prompt(PROMPT, NEGATIVE, do_classifier_free_guidance=True, max_sequence_length=512)
    n_neg = len(tok(prompt_clean(NEGATIVE), add_special_tokens=True).input_ids)

    def decode(latents: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
        std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
        return vae.decode(latents * std + mean, return_dict=False)[0]

    def save(case: str, steps: list, final: torch.Tensor, meta: dict, video: bool = False) -> None:
        tensors = {"init_latents": init, "final": final, **{f"step_{i}": x for i, x in enumerate(steps)}}
        if video:
            tensors["video"] = decode(final)
        write_safetensors(OUT / f"pipeline_{case}.safetensors", tensors, pipeline_meta(PROMPT, meta))

    # The stock WanPipeline: no guidance, CFG.
    for case, g in [("none", 1.0), ("cfg", CFG_SCALE)]:
        steps, out = run_stock(pipe, prompt=PROMPT, negative_prompt=NEGATIVE, guidance_scale=g, latents=init.clone())
        save(case, steps, out, {"guidance": "cfg" if g > 1 else "none", "guidance_scale": g}, video=case == "none")

    # NAG, CFG+NAG (official processor), VSF (official processor): WanPipeline's loop by hand.
    def loop(case: str, cfg: bool, attention: str) -> None:
        sch = UniPCMultistepScheduler.from_config(SCHEDULER)
        sch.set_timesteps(PIPE_STEPS)
        if attention == "nag":
            set_cross_processor(tr, NagProcessor(NAG["nag_scale"], NAG["nag_tau"], NAG["nag_alpha"], IMAGE_TOKENS))
            ctx = torch.cat([pos, neg])
        else:
            set_cross_processor(tr, VsfProcessor(VSF["vsf_scale"], VSF["vsf_bias"], n_neg, 512))
            ctx = torch.cat([pos[:, : 512 - n_neg], neg[:, :n_neg]], dim=1)
        latents, steps = init.clone(), []
        for t in sch.timesteps:
            ts = t.expand(1)
            with torch.no_grad():
                pred = tr(hidden_states=latents, timestep=ts, encoder_hidden_states=ctx, return_dict=False)[0]
                if cfg:
                    un = tr(hidden_states=latents, timestep=ts, encoder_hidden_states=neg, return_dict=False)[0]
                    pred = un + CFG_SCALE * (pred - un)
            latents = sch.step(pred, t, latents, return_dict=False)[0]
            steps.append(latents.clone())
        stock_processors(tr)
        meta = {"guidance": ("cfg+" if cfg else "") + attention, "guidance_scale": CFG_SCALE if cfg else 1.0}
        meta.update({"nag_norm": "l1", **NAG} if attention == "nag" else VSF)
        save(case, steps, latents, meta)

    loop("nag", False, "nag")
    loop("cfg_nag", True, "nag")
    loop("vsf", False, "vsf")

    # The stock WanPipeline with FlowMatch Euler instead of UniPC (as some few-step Wan folders
    # ship it), CFG; its config goes into the metadata (the Rust test writes it into the folder).
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=5.0)
    steps, out = run_stock(pipe, prompt=PROMPT, negative_prompt=NEGATIVE, guidance_scale=CFG_SCALE, latents=init.clone())
    config = json.dumps({"_class_name": "FlowMatchEulerDiscreteScheduler", **dict(pipe.scheduler.config)}, sort_keys=True)
    save("flowmatch_cfg", steps, out, {"guidance": "cfg", "guidance_scale": CFG_SCALE, "scheduler_config": config})
    pipe.scheduler = sched

    # WanImageToVideoPipeline.prepare_latents: the mask and the normalized image latents.
    from diffusers import WanImageToVideoPipeline
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    i2v = WanImageToVideoPipeline(
        tokenizer=tok,
        text_encoder=te,
        image_encoder=CLIPVisionModelWithProjection.from_pretrained(PARTS / "image_encoder").eval(),
        image_processor=CLIPImageProcessor.from_pretrained(PARTS / "image_processor"),
        transformer=build_transformer(I2V, 2),
        vae=vae,
        scheduler=sched,
    )
    image = torch.rand(1, 3, PIPE_SIZE["height"], PIPE_SIZE["width"], generator=gen) * 2 - 1
    with torch.no_grad():
        _, condition = i2v.prepare_latents(
            image, 1, 4, PIPE_SIZE["height"], PIPE_SIZE["width"], PIPE_SIZE["num_frames"], torch.float32, "cpu",
            None, latents=init.clone(),
        )
    write_safetensors(OUT / "i2v_condition.safetensors", {"image": image, "condition": condition},
                      {"frames": str(PIPE_SIZE["num_frames"])})


# ---------------------------------------------------------------------------------------------
# WanImageToVideoPipeline end to end: a PNG in, its preprocessing (Pillow Lanczos to the video
# size; CLIPImageProcessor), CLIP vision, the VAE condition, the denoising loop.
# ---------------------------------------------------------------------------------------------

PIPE_I2V = {**PIPE_T2V, "in_channels": 12, "image_dim": 32, "added_kv_proj_dim": 32}  # 4 noise + 4 mask + 4 image
I2V_IMAGE_SIZE = (41, 57)  # height, width of the input PNG: every resize path runs (not the video's 32 x 48)
I2V_PROMPT = "a cat turns its head"


def i2v_input_image(path: Path):
    """Smooth gradients plus noise (rounding in the 8-bit resamplers shows), saved losslessly."""
    import numpy as np
    from PIL import Image

    h, w = I2V_IMAGE_SIZE
    rng = np.random.default_rng(5)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    r = 127 + 110 * np.sin(x / 4.0 + y / 6.0)
    g = 127 + 110 * np.cos(y / 3.0 - x / 9.0)
    b = (y * 255.0 / (h - 1) + rng.normal(0, 30, size=(h, w))).clip(0, 255)
    img = Image.fromarray(np.stack([r, g, b], axis=-1).clip(0, 255).round().astype(np.uint8), "RGB")
    img.save(path)
    return Image.open(path).convert("RGB")


def i2v_pipeline_fixtures() -> None:
    from diffusers import AutoencoderKLWan, WanImageToVideoPipeline
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPVisionModelWithProjection, UMT5EncoderModel

    folder = OUT / "pipeline_i2v"
    tr = build_transformer(PIPE_I2V, 4)
    save_model_folder(folder, tr)
    write_model_index(
        folder,
        "WanImageToVideoPipeline",
        image_encoder=["transformers", "CLIPVisionModelWithProjection"],
        image_processor=["transformers", "CLIPImageProcessor"],
    )
    pipe = WanImageToVideoPipeline(
        tokenizer=AutoTokenizer.from_pretrained(PARTS / "tokenizer"),
        text_encoder=UMT5EncoderModel.from_pretrained(PARTS / "text_encoder").eval(),
        image_encoder=CLIPVisionModelWithProjection.from_pretrained(PARTS / "image_encoder").eval(),
        image_processor=CLIPImageProcessor.from_pretrained(PARTS / "image_processor"),
        transformer=tr,
        vae=AutoencoderKLWan.from_pretrained(PARTS / "vae").eval(),
        scheduler=UniPCMultistepScheduler.from_config(SCHEDULER),
    )
    pipe.set_progress_bar_config(disable=True)
    image = i2v_input_image(OUT / "i2v_input.png")
    gen = torch.Generator().manual_seed(31)
    f = (PIPE_SIZE["num_frames"] - 1) // 4 + 1
    init = torch.randn(1, 4, f, PIPE_SIZE["height"] // 8, PIPE_SIZE["width"] // 8, generator=gen)
    # The pipeline's own intermediate values, for diagnosis.
    image_embeds = pipe.encode_image(image, "cpu")
    resized = pipe.video_processor.preprocess(image, height=PIPE_SIZE["height"], width=PIPE_SIZE["width"])
    _, condition = pipe.prepare_latents(
        resized, 1, 4, PIPE_SIZE["height"], PIPE_SIZE["width"], PIPE_SIZE["num_frames"], torch.float32, "cpu",
        None, latents=init.clone(),
    )
    pos, neg = pipe.encode_prompt(I2V_PROMPT, NEGATIVE, do_classifier_free_guidance=True, max_sequence_length=512)
    n_neg = len(pipe.tokenizer(prompt_clean(NEGATIVE), add_special_tokens=True).input_ids)
    image_tokens = image_embeds.shape[1]

    def save(case: str, steps: list, final: torch.Tensor, meta: dict) -> None:
        tensors = {
            "init_latents": init,
            "final": final,
            "image_embeds": image_embeds,
            "resized_image": resized,
            "condition": condition,
            **{f"step_{i}": x for i, x in enumerate(steps)},
        }
        write_safetensors(OUT / f"pipeline_i2v_{case}.safetensors", tensors, pipeline_meta(I2V_PROMPT, meta))

    # The stock WanImageToVideoPipeline: no guidance, CFG (its two sequential passes).
    for case, g in [("none", 1.0), ("cfg", CFG_SCALE)]:
        steps, out = run_stock(pipe, image=image, prompt=I2V_PROMPT, negative_prompt=NEGATIVE, guidance_scale=g,
                               latents=init.clone())
        save(case, steps, out, {"guidance": "cfg" if g > 1 else "none", "guidance_scale": g})

    # NAG, CFG + NAG (the official NAG processor, image attention unguided) and VSF: the I2V
    # pipeline's loop by hand, latents concatenated with the condition as diffusers does.
    def loop(case: str, cfg: bool, attention: str) -> None:
        sch = UniPCMultistepScheduler.from_config(SCHEDULER)
        sch.set_timesteps(PIPE_STEPS)
        if attention == "nag":
            set_cross_processor(tr, NagProcessor(NAG["nag_scale"], NAG["nag_tau"], NAG["nag_alpha"], image_tokens))
            ctx, img = torch.cat([pos, neg]), image_embeds.repeat(2, 1, 1)
        else:
            set_cross_processor(tr, VsfProcessor(VSF["vsf_scale"], VSF["vsf_bias"], n_neg, 512))
            ctx, img = torch.cat([pos[:, : 512 - n_neg], neg[:, :n_neg]], dim=1), image_embeds
        latents, steps = init.clone(), []
        for t in sch.timesteps:
            ts = t.expand(1)
            x = torch.cat([latents, condition], dim=1)
            with torch.no_grad():
                pred = tr(hidden_states=x, timestep=ts, encoder_hidden_states=ctx, encoder_hidden_states_image=img,
                          return_dict=False)[0]
                if cfg:
                    stock_processors(tr)
                    un = tr(hidden_states=x, timestep=ts, encoder_hidden_states=neg,
                            encoder_hidden_states_image=image_embeds, return_dict=False)[0]
                    set_cross_processor(tr, NagProcessor(NAG["nag_scale"], NAG["nag_tau"], NAG["nag_alpha"], image_tokens))
                    pred = un + CFG_SCALE * (pred - un)
            latents = sch.step(pred, t, latents, return_dict=False)[0]
            steps.append(latents.clone())
        stock_processors(tr)
        meta = {"guidance": ("cfg+" if cfg else "") + attention, "guidance_scale": CFG_SCALE if cfg else 1.0}
        meta.update({"nag_norm": "l1", **NAG} if attention == "nag" else VSF)
        save(case, steps, latents, meta)

    loop("nag", False, "nag")
    loop("cfg_nag", True, "nag")
    loop("vsf", False, "vsf")


def main() -> None:
    assert sys.byteorder == "little"
    torch.set_grad_enabled(False)
    OUT.mkdir(parents=True, exist_ok=True)
    t2v = build_transformer(T2V, 1)
    i2v = build_transformer(I2V, 2)
    save_model_folder(OUT / "t2v", t2v)
    save_model_folder(OUT / "i2v", i2v)
    transformer_fixtures("t2v", t2v, False)
    transformer_fixtures("i2v", i2v, True)
    sampler_fixtures(t2v)
    unipc_fixture()
    pipeline_fixtures()
    i2v_pipeline_fixtures()
    print(f"wrote fixtures under {OUT}")


if __name__ == "__main__":
    main()
