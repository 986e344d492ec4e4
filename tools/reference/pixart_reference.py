#!/usr/bin/env python3
"""Golden fixtures for veto's PixArt-Sigma family.

Builds a tiny random `PixArtSigmaPipeline` in the folder layout of the real
PixArt-alpha/PixArt-Sigma-XL-2-1024-MS repo (T5 tokenizer + encoder, PixArtTransformer2DModel,
AutoencoderKL, the repo's DPMSolverMultistepScheduler config) under tests/fixtures/pixart/sigma,
then writes f32 safetensors fixtures:

- `text.safetensors`: the pipeline's `encode_prompt` (caption cleaning, 300 tokens, the
  attention mask, T5 run with the mask) for the prompt, the negative prompt and "".
- `captions.json`: diffusers' caption cleaning (`_text_preprocessing(clean_caption=True)`, which
  needs bs4 and ftfy) on a list of inputs.
- `transformer.safetensors`: one PixArtTransformer2DModel call on a batch of two rows with
  different text masks, every block's output and the final output.
- `pipeline_<case>.safetensors`: per-step and final latents of
  * the stock diffusers pipelines: `none`, `cfg` (PixArtSigmaPipeline) and `pag`, `cfg_pag`
    (PixArtSigmaPAGPipeline);
  * the stock PixArtSigmaPipeline with a cross-attention processor of ours that runs NAG the way
    the official generic NAG processor (ChenDarYen/Normalized-Attention-Guidance,
    `NAGAttnProcessor2_0`, used by its SDXL pipeline) does: the negative context batched after
    the positive rows, the image queries of the guided row reused for it, one masked SDPA over
    the batch (the text masks of every row *and of the negative* applied), NAG (L1 norm) on the
    conditional row, CFG's unconditional row plain: `nag`, `cfg_nag`, `nag_end`; NASA
    (`Z+ - phi Z-`) and VSF (VSF eq. 6 with the negative prompt unpadded) the same way:
    `nasa`, `vsf`.

CPU, f32, fixed seeds; running it twice writes identical files. Developers run it; CI never does:

    /work/venv/ref/bin/python tools/reference/pixart_reference.py

(needs `beautifulsoup4` and `ftfy` for diffusers' caption cleaning; see requirements.txt).
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DPMSolverMultistepScheduler,
    PixArtSigmaPAGPipeline,
    PixArtSigmaPipeline,
    PixArtTransformer2DModel,
)
from diffusers.utils import is_bs4_available, is_ftfy_available
from transformers import T5Config, T5EncoderModel, T5TokenizerFast

sys.path.insert(0, str(Path(__file__).resolve().parent))
from flux_reference import (  # noqa: E402
    NEGATIVE_PROMPT,
    PROMPT,
    corpus_lines,
    guide,
    randomize_,
    train_t5_spiece,
    write_safetensors,
    write_t5_tokenizer,
    AttnGuidance,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
OUT = REPO_ROOT / "tests" / "fixtures" / "pixart"
FOLDER = OUT / "sigma"

# sample_size 32 selects diffusers' ASPECT_RATIO_256_BIN; 240 x 272 is its 0.88 bin (no resize),
# 30 x 34 latents, 15 x 17 patches (non-square: the interpolated position embedding matters).
HEIGHT, WIDTH = 240, 272
STEPS = 4
CFG_SCALE = 4.5  # the pipeline's default guidance_scale
PAG_SCALE = 3.0
PAG_LAYERS = "blocks.1"  # PixArtSigmaPAGPipeline's default
MAX_SEQUENCE_LENGTH = 300
NAG = AttnGuidance(mode="nag", nag_scale=5.0, nag_tau=2.5, nag_alpha=0.375, nag_norm="l1")  # NAG paper, PixArt row
NASA = AttnGuidance(mode="nasa", nasa_scale=0.5)
VSF_SCALE, VSF_BIAS = 1.2, 0.2
NAG_END = 0.3


# --------------------------------------------------------------------------------------------
# Tiny components.
# --------------------------------------------------------------------------------------------


def build_t5(vocab_rows: int) -> T5EncoderModel:
    config = T5Config(
        vocab_size=vocab_rows,
        d_model=32,
        d_kv=16,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=2,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        dropout_rate=0.0,
        layer_norm_epsilon=1e-6,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    model = T5EncoderModel(config)
    randomize_(model, seed=303)
    return model.eval()


def build_transformer() -> PixArtTransformer2DModel:
    # The real PixArt-Sigma-XL-2-1024-MS config with small widths and depth: 16 x 72 heads -> 2 x 8,
    # 28 layers -> 2, caption_channels 4096 -> 32 (the tiny T5), sample_size 128 -> 32.
    model = PixArtTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        cross_attention_dim=16,
        attention_bias=True,
        sample_size=32,
        patch_size=2,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
        interpolation_scale=2,
        use_additional_conditions=False,
        caption_channels=32,
    )
    randomize_(model, seed=304)
    return model.eval()


def build_vae() -> AutoencoderKL:
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        act_fn="silu",
        latent_channels=4,
        norm_num_groups=8,
        sample_size=HEIGHT,
        scaling_factor=0.13025,
    )
    randomize_(vae, seed=305)
    with torch.no_grad():
        vae.decoder.conv_out.weight.mul_(0.3)
    return vae.eval()


def build_scheduler() -> DPMSolverMultistepScheduler:
    # PixArt-Sigma-XL-2-1024-MS scheduler/scheduler_config.json.
    return DPMSolverMultistepScheduler(
        algorithm_type="dpmsolver++",
        beta_end=0.02,
        beta_schedule="linear",
        beta_start=0.0001,
        dynamic_thresholding_ratio=0.995,
        euler_at_final=False,
        lambda_min_clipped=-float("inf"),
        lower_order_final=True,
        num_train_timesteps=1000,
        prediction_type="epsilon",
        sample_max_value=1.0,
        solver_order=2,
        solver_type="midpoint",
        steps_offset=0,
        thresholding=False,
        timestep_spacing="linspace",
        trained_betas=None,
        use_karras_sigmas=False,
        use_lu_lambdas=False,
        variance_type=None,
    )


def build_folder() -> PixArtSigmaPipeline:
    if FOLDER.exists():
        shutil.rmtree(FOLDER)
    spiece = train_t5_spiece(corpus_lines())
    with tempfile.TemporaryDirectory() as tmp:
        write_t5_tokenizer(Path(tmp) / "tokenizer", spiece)
        tokenizer = T5TokenizerFast.from_pretrained(Path(tmp) / "tokenizer")
    rows = 64 * math.ceil((len(tokenizer) + 1) / 64)
    pipe = PixArtSigmaPipeline(
        tokenizer=tokenizer,
        text_encoder=build_t5(rows),
        vae=build_vae(),
        transformer=build_transformer(),
        scheduler=build_scheduler(),
    )
    pipe.save_pretrained(FOLDER, safe_serialization=True)
    shutil.rmtree(FOLDER / "tokenizer")
    write_t5_tokenizer(FOLDER / "tokenizer", spiece)
    index = json.loads((FOLDER / "model_index.json").read_text())
    index["tokenizer"] = ["transformers", "T5Tokenizer"]
    (FOLDER / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    # Load it back as a user would.
    return PixArtSigmaPipeline.from_pretrained(FOLDER, torch_dtype=torch.float32)


# --------------------------------------------------------------------------------------------
# Cross-attention processor with negative guidance, in the official generic NAG processor's
# layout: encoder rows [row_0 .. row_{B-1}, negative], masks likewise, the guided row's queries
# repeated for the negative row, one masked SDPA, the method on the guided row.
# --------------------------------------------------------------------------------------------


@dataclass
class Plan:
    mode: str = "none"  # none | nag | nasa | vsf
    guided_row: int = 0
    neg_context: torch.Tensor | None = None  # [1, L, C] (projected by caption_projection)
    neg_mask: torch.Tensor | None = None  # [1, L] 1 = keep


@dataclass
class Holder:
    plan: Plan = field(default_factory=Plan)


def mask_bias(mask: torch.Tensor) -> torch.Tensor:
    """diffusers' encoder mask -> bias: (1 - mask) * -10000, [B, 1, 1, L]."""
    return ((1.0 - mask.to(torch.float32)) * -10000.0)[:, None, None, :]


class GuidedCrossAttn:
    def __init__(self, holder: Holder):
        self.holder = holder

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        assert encoder_hidden_states is not None and not attn.norm_cross
        plan = self.holder.plan
        heads = attn.heads
        b = hidden_states.shape[0]
        # SANA 1.5 / Sprint's qk_norm (rms_norm_across_heads) on the full query / key width.
        norm_q = attn.norm_q if attn.norm_q is not None else (lambda x: x)
        norm_k = attn.norm_k if attn.norm_k is not None else (lambda x: x)
        q = norm_q(attn.to_q(hidden_states))
        k, v = norm_k(attn.to_k(encoder_hidden_states)), attn.to_v(encoder_hidden_states)
        bias = attention_mask  # [B, 1, L] from the transformer (bias form)
        assert bias is not None and bias.shape[0] == b
        bias = bias[:, None]  # [B, 1, 1, L]

        def split(x):
            return x.view(x.shape[0], -1, heads, x.shape[-1] // heads).transpose(1, 2)

        def merge(x):
            return x.transpose(1, 2).reshape(x.shape[0], -1, x.shape[1] * x.shape[3])

        r = plan.guided_row
        if plan.mode in ("nag", "nasa"):
            neg = plan.neg_context
            kn, vn = norm_k(attn.to_k(neg)), attn.to_v(neg)
            qb = torch.cat([q, q[r : r + 1]])
            kb, vb = torch.cat([k, kn]), torch.cat([v, vn])
            mb = torch.cat([bias, mask_bias(plan.neg_mask)])
            z = merge(F.scaled_dot_product_attention(split(qb), split(kb), split(vb), attn_mask=mb))
            z_neg = z[b:]
            z = z[:b].clone()
            z[r : r + 1] = guide(z[r : r + 1], z_neg, NAG if plan.mode == "nag" else NASA)
        elif plan.mode == "vsf":
            z = merge(F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=bias)).clone()
            neg = plan.neg_context  # unpadded
            kn, vn = norm_k(attn.to_k(neg)), attn.to_v(neg)
            keys = torch.cat([k[r : r + 1], kn], dim=1)
            values = torch.cat([v[r : r + 1], -VSF_SCALE * vn], dim=1)
            extra = torch.full((1, 1, 1, kn.shape[1]), -VSF_BIAS)
            z[r : r + 1] = merge(
                F.scaled_dot_product_attention(split(q[r : r + 1]), split(keys), split(values), attn_mask=torch.cat([bias[r : r + 1], extra], dim=-1))
            )
        else:
            z = merge(F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=bias))
        return attn.to_out[1](attn.to_out[0](z))


def install(transformer) -> tuple[Holder, dict]:
    holder = Holder()
    original = transformer.attn_processors
    procs = {}
    for name, proc in original.items():
        procs[name] = GuidedCrossAttn(holder) if ".attn2." in name else proc
    transformer.set_attn_processor(procs)
    return holder, original


# --------------------------------------------------------------------------------------------
# Fixtures.
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def encode(pipe, text: str):
    """(ids [1, 300], mask [1, 300], masked T5 output [1, 300, C]) as the pipeline's encode_prompt."""
    embeds, mask, _, _ = pipe.encode_prompt(text, do_classifier_free_guidance=False, clean_caption=True, max_sequence_length=MAX_SEQUENCE_LENGTH)
    cleaned = pipe._text_preprocessing(text, clean_caption=True)
    ids = pipe.tokenizer(cleaned, padding="max_length", max_length=MAX_SEQUENCE_LENGTH, truncation=True, return_tensors="pt").input_ids
    return ids.to(torch.int64), mask, embeds


def write_text(pipe):
    tensors, meta = {}, {"max_sequence_length": str(MAX_SEQUENCE_LENGTH)}
    for key, text in [("prompt", PROMPT), ("negative", NEGATIVE_PROMPT), ("empty", "")]:
        ids, mask, embeds = encode(pipe, text)
        n = int(mask.sum())
        tensors[f"{key}_ids"] = ids
        tensors[f"{key}_mask"] = mask.to(torch.int64)
        tensors[f"{key}_embeds"] = embeds[:, :n]  # the rows the transformer can see
        tensors[f"{key}_padded_embeds_max_abs"] = embeds.abs().amax(dim=(0, 1))  # the padded rows are real too
        meta[key] = text
    write_safetensors(OUT / "text.safetensors", tensors, meta)


def write_captions(pipe):
    inputs = [
        "A Photo of a CAT wearing Glasses",
        "  padded   prompt \n with spaces ",
        "a cat, a dog. a bird",
        "a “quoted” ‘word’ — with dashes",
        "visit https://example.com/cat.png now @someone #123",
        "<b>bold</b> &amp; text &quot;here&quot;",
        "this-is-my-cute-cat-photo",
        "file_name_with_many_underscores_here",
        "price 1234567 and jc6640 and 6640vc231",
        "free shipping, click for more",
        "size 1920x1080 wallpaper",
        "'quoted whole caption'",
        "a cat...on a mat",
        "山 mountain 水",
    ]
    out = [[s, pipe._text_preprocessing(s, clean_caption=True)[0]] for s in inputs]
    (OUT / "captions.json").write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")


@torch.no_grad()
def write_transformer(pipe):
    tr = pipe.transformer
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 4, 30, 34, generator=g)
    ctx = torch.randn(2, 12, 32, generator=g)
    mask = torch.ones(2, 12, dtype=torch.int64)
    mask[0, 5:] = 0  # row 0 sees 5 tokens, row 1 all 12
    t = torch.tensor([637, 637])
    blocks = {}
    handles = [
        blk.register_forward_hook(lambda m, i, o, k=k: blocks.__setitem__(f"block_{k}", o.detach().clone()))
        for k, blk in enumerate(tr.transformer_blocks)
    ]
    out = tr(x, encoder_hidden_states=ctx, encoder_attention_mask=mask, timestep=t, added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]
    for h in handles:
        h.remove()
    tensors = {"hidden_states": x, "encoder_hidden_states": ctx, "encoder_attention_mask": mask, "output": out, **blocks}
    write_safetensors(OUT / "transformer.safetensors", tensors, {"timestep": "637"})


@dataclass(frozen=True)
class Case:
    name: str
    attn: str = "none"
    cfg: bool = False
    pag: bool = False
    nag_end: float = 1.0
    image: bool = False

    @property
    def guidance(self) -> str:
        parts = (["cfg"] if self.cfg else []) + (["pag"] if self.pag else []) + ([self.attn] if self.attn != "none" else [])
        return "+".join(parts) or "none"


CASES = [
    Case("none", image=True),
    Case("cfg", cfg=True),
    Case("pag", pag=True),
    Case("cfg_pag", cfg=True, pag=True),
    Case("nag", attn="nag"),
    Case("cfg_nag", attn="nag", cfg=True),
    Case("nag_end", attn="nag", nag_end=NAG_END),
    Case("nasa", attn="nasa"),
    Case("vsf", attn="vsf"),
]


@torch.no_grad()
def run_case(pipe, pag_pipe, case: Case, init: torch.Tensor):
    steps, timesteps = [], []

    guided = []

    def on_step(i, t, latents):
        steps.append(latents.detach().clone())
        timesteps.append(float(t))
        guided.append(holder is not None and holder.plan.mode != "none")
        # The official SDXL NAG window: once t < floor((1 - nag_end) 999) the processors are
        # removed for good; checked here for the next step's t.
        ts = pipe.scheduler.timesteps
        if holder is not None and i + 1 < len(ts) and ts[i + 1] < math.floor((1.0 - case.nag_end) * 999):
            holder.plan = Plan()

    kwargs = dict(
        negative_prompt=NEGATIVE_PROMPT,
        num_inference_steps=STEPS,
        height=HEIGHT,
        width=WIDTH,
        latents=init.clone(),
        output_type="latent",
        callback=on_step,
        callback_steps=1,
        max_sequence_length=MAX_SEQUENCE_LENGTH,
        guidance_scale=CFG_SCALE if case.cfg else 1.0,
    )
    holder, original = None, None
    if case.pag:
        out = pag_pipe(PROMPT, pag_scale=PAG_SCALE, **kwargs).images
    elif case.attn == "none":
        out = pipe(PROMPT, **kwargs).images
    else:
        holder, original = install(pipe.transformer)
        if True:
            proj = pipe.transformer.caption_projection
            if case.attn == "vsf":
                _, mask, embeds = encode(pipe, NEGATIVE_PROMPT)
                n = int(mask.sum())
                holder.plan = Plan("vsf", 1 if case.cfg else 0, proj(embeds[:, :n]), None)
            else:
                _, mask, embeds = encode(pipe, NEGATIVE_PROMPT)
                holder.plan = Plan(case.attn, 1 if case.cfg else 0, proj(embeds), mask)
        try:
            out = pipe(PROMPT, **kwargs).images
        finally:
            pipe.transformer.set_attn_processor(original)
    tensors = {f"step_{k}_latents": s for k, s in enumerate(steps)}
    tensors.update(final_latents=out, init_latents=init, timesteps=torch.tensor(timesteps, dtype=torch.float32))
    if case.image:
        # The VAE on the top-left 8 x 8 latents (a 64 x 64 image keeps the file small).
        crop = out[:, :, :8, :8]
        tensors["image_latents"] = crop
        tensors["image"] = pipe.vae.decode(crop / pipe.vae.config.scaling_factor).sample
    meta = {
        "prompt": PROMPT,
        "negative_prompt": NEGATIVE_PROMPT,
        "guidance": case.guidance,
        "attention": case.attn,
        "steps": str(STEPS),
        "height": str(HEIGHT),
        "width": str(WIDTH),
        "guidance_scale": repr(CFG_SCALE if case.cfg else 0.0),
        "max_sequence_length": str(MAX_SEQUENCE_LENGTH),
        "scheduler": type(pipe.scheduler).__name__,
        "nag_end": repr(case.nag_end),
        "guided_steps": json.dumps(guided),
    }
    if case.pag:
        meta.update(pag_scale=repr(PAG_SCALE), pag_applied_layers=json.dumps([PAG_LAYERS]))
    if case.attn == "nag":
        meta.update(nag_scale=repr(NAG.nag_scale), nag_tau=repr(NAG.nag_tau), nag_alpha=repr(NAG.nag_alpha), nag_norm="l1")
    if case.attn == "nasa":
        meta.update(nasa_scale=repr(NASA.nasa_scale))
    if case.attn == "vsf":
        meta.update(vsf_scale=repr(VSF_SCALE), vsf_bias=repr(VSF_BIAS))
    write_safetensors(OUT / f"pipeline_{case.name}.safetensors", tensors, meta)
    return out


def main():
    assert is_bs4_available() and is_ftfy_available(), "pip install beautifulsoup4 ftfy (diffusers' caption cleaning)"
    torch.manual_seed(0)
    OUT.mkdir(parents=True, exist_ok=True)
    pipe = build_folder()
    pipe.set_progress_bar_config(disable=True)
    pag_pipe = PixArtSigmaPAGPipeline.from_pipe(pipe, pag_applied_layers=[PAG_LAYERS])
    pag_pipe.set_progress_bar_config(disable=True)
    write_text(pipe)
    write_captions(pipe)
    write_transformer(pipe)
    init = torch.randn(1, 4, HEIGHT // 8, WIDTH // 8, generator=torch.Generator().manual_seed(11))
    finals = {}
    for case in CASES:
        finals[case.name] = run_case(pipe, pag_pipe, case, init)
    # Sanity: every method changes the result.
    for name, x in finals.items():
        if name != "none":
            d = (x - finals["none"]).abs().max().item()
            assert d > 1e-3, f"{name} equals none ({d})"
    d = (finals["nag_end"] - finals["nag"]).abs().max().item()
    assert d > 1e-4, f"nag_end equals nag ({d})"
    print("wrote", OUT)


if __name__ == "__main__":
    main()
