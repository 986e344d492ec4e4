#!/usr/bin/env python3
"""Golden fixtures for veto's SANA models (the transformer and the DC-AE decoder).

Builds tiny random components in the folder layout of the real
Efficient-Large-Model/Sana_1600M_1024px_diffusers repo under tests/fixtures/sana/:

- `sana_1600m/transformer/`: `SanaTransformer2DModel` with the real config's shape choices
  (patch 1, no position embedding, attention_bias false, mlp_ratio 2.5) at tiny widths;
- `sana_1600m/vae/`: `AutoencoderDC` with the real dc-ae-f32c32-sana-1.0 decoder layout (six
  levels, 32x, ResBlock x3 then EfficientViTBlock x3 with the 5x5 multi-scale branch,
  `upsample_block_type` "interpolate", RMSNorm, SiLU) at tiny widths;
- `variants/pe_transformer/`: the transformer with a sin-cos position table and patch 2
  (`interpolation_scale` set, as SANA 4K's configs do);
- `variants/shuffle_vae/`: the DC-AE decoder with pixel-shuffle up-sampling, batch norms and
  ReLU in the ResBlocks (diffusers' defaults for those options);

then writes f32 safetensors fixtures:

- `transformer.safetensors`: one transformer call on two rows with text masks of 5 and 12
  tokens, every block's output and the output, plainly (`none`) and with a negative caption on
  row 1 (the conditional row of a CFG batch) in the cross-attention: `nag`, `nasa` in the
  official generic NAG processor's layout (negative batched after the positive rows with its
  mask, the guided row's queries reused, one masked SDPA; NAG phi 4 / tau 2.5 / alpha 0.375,
  L1) and `vsf` (VSF eq. 6, the negative unpadded). The processor is pixart_reference's
  `GuidedCrossAttn`, which SANA's cross-attention fits unchanged (same projections, the mask as
  an additive bias).
- `pe_transformer.safetensors`: the position-table variant's call (`none`).
- `sana_1600m/scheduler/`: the real repo's `DPMSolverMultistepScheduler` config (flow sigmas,
  flow_shift 3, flow_prediction); `scheduler.safetensors`: its timesteps and sigmas at 20 and 7
  steps, and 7 steps of latents with the fake model `0.1 x + 0.05 t / 1000`.
- `resize.safetensors`: diffusers' `resize_and_crop_tensor` of a random 64x48 image to 40x36,
  50x30 and 90x70 (the decoded image of a binned run back to the asked size).
- `dc_ae.safetensors`: `vae.decode` of two latents (2x3: linear attention everywhere; 2x2:
  the deepest level's 4 tokens take the quadratic branch) for both VAEs.

CPU, f32, fixed seeds; running it twice writes identical files. Developers run it; CI never does:

    /work/venv/ref/bin/python tools/reference/sana_reference.py
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch
from diffusers import AutoencoderDC, DPMSolverMultistepScheduler, SanaTransformer2DModel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from flux_reference import NEGATIVE_PROMPT, PROMPT, corpus_lines, randomize_, write_safetensors  # noqa: E402
from pixart_reference import NAG, NASA, VSF_BIAS, VSF_SCALE, Plan, install  # noqa: E402

# Pipeline runs: sample_size 32 selects diffusers' ASPECT_RATIO_1024_BIN; 960 x 1024 is its 0.94
# bin (no resize), 30 x 32 latents.
HEIGHT, WIDTH = 960, 1024
STEPS = 4
CFG_SCALE = 4.5  # SanaPipeline's default guidance_scale
PAG_SCALE = 3.0  # SanaPAGPipeline's default pag_scale
PAG_LAYERS = "transformer_blocks.0"  # SanaPAGPipeline's default pag_applied_layers
MAX_SEQUENCE_LENGTH = 300
NAG_END = 0.3

REPO_ROOT = Path(__file__).resolve().parents[2]
OUT = REPO_ROOT / "tests" / "fixtures" / "sana"
FOLDER = OUT / "sana_1600m"
VARIANTS = OUT / "variants"
CAPTION_CHANNELS = 24
LATENT_CHANNELS = 8


def build_transformer(position_table: bool) -> SanaTransformer2DModel:
    # Sana_1600M_1024px transformer/config.json with small widths and depth: 70 x 32 self-attention
    # heads -> 2 x 8, 20 x 112 cross-attention heads -> 4 x 4, 20 layers -> 2, caption_channels
    # 2304 (Gemma-2-2B) -> 24, 32 latent channels -> 8.
    model = SanaTransformer2DModel(
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=2,
        num_cross_attention_heads=4,
        cross_attention_head_dim=4,
        cross_attention_dim=16,
        caption_channels=CAPTION_CHANNELS,
        mlp_ratio=2.5,
        attention_bias=False,
        sample_size=32,
        patch_size=2 if position_table else 1,
        norm_elementwise_affine=False,
        norm_eps=1e-6,
        interpolation_scale=2 if position_table else None,
    )
    randomize_(model, seed=404 if position_table else 401)
    return model.eval()


def build_dc_ae(shuffle: bool) -> AutoencoderDC:
    # dc-ae-f32c32-sana-1.0 with small widths: block_out_channels (128, 256, 512, 512, 1024, 1024)
    # -> (4, 4, 8, 8, 16, 16), 3 layers per level -> 1, head width 32 -> 4, 32 latent channels -> 8.
    kwargs = dict(
        in_channels=3,
        latent_channels=LATENT_CHANNELS,
        attention_head_dim=4,
        encoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
        decoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
        encoder_block_out_channels=(4, 4, 8, 8, 16, 16),
        decoder_block_out_channels=(4, 4, 8, 8, 16, 16),
        encoder_layers_per_block=(1, 1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1, 1),
        encoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
        decoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
        downsample_block_type="Conv",
        upsample_block_type="interpolate",
        decoder_norm_types="rms_norm",
        decoder_act_fns="silu",
        scaling_factor=0.41407,
    )
    if shuffle:
        kwargs.update(
            upsample_block_type="pixel_shuffle",
            downsample_block_type="pixel_unshuffle",
            decoder_norm_types=("batch_norm",) * 3 + ("rms_norm",) * 3,
            decoder_act_fns=("relu",) * 3 + ("silu",) * 3,
        )
    vae = AutoencoderDC(**kwargs)
    randomize_(vae, seed=403 if shuffle else 402)
    # Batch norms with running statistics other than (0, 1), so eval mode's affine matters.
    gen = torch.Generator().manual_seed(405)
    with torch.no_grad():
        for m in vae.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(0.2 * torch.randn(m.running_mean.shape, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=gen))
    return vae.eval()


def save(model, folder: Path):
    if folder.exists():
        shutil.rmtree(folder)
    model.save_pretrained(folder, safe_serialization=True)


@torch.no_grad()
def transformer_call(tr, x, ctx, mask, t):
    blocks = {}
    handles = [
        blk.register_forward_hook(lambda m, i, o, k=k: blocks.__setitem__(k, o.detach().clone()))
        for k, blk in enumerate(tr.transformer_blocks)
    ]
    out = tr(x, encoder_hidden_states=ctx, encoder_attention_mask=mask, timestep=t, return_dict=False)[0]
    for h in handles:
        h.remove()
    return out, blocks


@torch.no_grad()
def write_transformers():
    tr = build_transformer(position_table=False)
    save(tr, FOLDER / "transformer")
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, LATENT_CHANNELS, 6, 10, generator=g)
    ctx = torch.randn(2, 12, CAPTION_CHANNELS, generator=g)
    neg = torch.randn(1, 12, CAPTION_CHANNELS, generator=g)  # 7 real tokens, then padding
    neg_mask = torch.zeros(1, 12, dtype=torch.int64)
    neg_mask[0, :7] = 1
    mask = torch.ones(2, 12, dtype=torch.int64)
    mask[0, 5:] = 0  # row 0 sees 5 tokens, row 1 all 12
    t = torch.tensor([637.5, 637.5])
    tensors = {"hidden_states": x, "encoder_hidden_states": ctx, "encoder_attention_mask": mask, "negative": neg[:, :7]}
    results = {}
    for case in ["none", "nag", "nasa", "vsf"]:
        holder, original = install(tr)
        # The batched methods take the padded negative with its mask; VSF the real tokens only.
        neg_context = tr.caption_norm(tr.caption_projection(neg[:, :7] if case == "vsf" else neg))
        holder.plan = Plan(case, 1, neg_context, neg_mask) if case != "none" else Plan()
        try:
            out, blocks = transformer_call(tr, x, ctx, mask, t)
        finally:
            tr.set_attn_processor(original)
        tensors[f"{case}_output"] = out
        tensors.update({f"{case}_block_{k}": b for k, b in blocks.items()})
        results[case] = out
    # The processor in the none case is the stock one's math.
    stock, _ = transformer_call(tr, x, ctx, mask, t)
    assert (stock - results["none"]).abs().max().item() < 1e-5
    for case in ["nag", "nasa", "vsf"]:
        assert (results[case] - results["none"]).abs().max().item() > 1e-3, case
        assert (results[case][0] - results["none"][0]).abs().max().item() == 0.0, f"{case}: row 0 is unguided"
    meta = {
        "timestep": "637.5",
        "guided_row": "1",
        "nag_scale": repr(NAG.nag_scale),
        "nag_tau": repr(NAG.nag_tau),
        "nag_alpha": repr(NAG.nag_alpha),
        "nag_norm": "l1",
        "nasa_scale": repr(NASA.nasa_scale),
        "vsf_scale": repr(VSF_SCALE),
        "vsf_bias": repr(VSF_BIAS),
    }
    write_safetensors(OUT / "transformer.safetensors", tensors, meta)

    pe = build_transformer(position_table=True)
    save(pe, VARIANTS / "pe_transformer")
    x = torch.randn(2, LATENT_CHANNELS, 6, 10, generator=g)
    out, blocks = transformer_call(pe, x, ctx, mask, t)
    tensors = {"hidden_states": x, "encoder_hidden_states": ctx, "encoder_attention_mask": mask, "output": out}
    tensors.update({f"block_{k}": b for k, b in blocks.items()})
    write_safetensors(OUT / "pe_transformer.safetensors", tensors, {"timestep": "637.5"})


@torch.no_grad()
def write_dc_ae():
    tensors = {}
    g = torch.Generator().manual_seed(8)
    for name, shuffle, folder in [("sana", False, FOLDER / "vae"), ("shuffle", True, VARIANTS / "shuffle_vae")]:
        vae = build_dc_ae(shuffle)
        save(vae, folder)
        for shape in [(2, 3), (2, 2)]:
            z = torch.randn(1, LATENT_CHANNELS, *shape, generator=g)
            key = f"{name}_{shape[0]}x{shape[1]}"
            tensors[f"{key}_latents"] = z
            tensors[f"{key}_image"] = vae.decode(z).sample
    write_safetensors(OUT / "dc_ae.safetensors", tensors, {})


def build_scheduler() -> DPMSolverMultistepScheduler:
    # Sana_1600M_1024px_diffusers scheduler/scheduler_config.json (flow-matching DPM-Solver++ 2M).
    return DPMSolverMultistepScheduler(
        algorithm_type="dpmsolver++",
        beta_end=0.02,
        beta_schedule="linear",
        beta_start=0.0001,
        dynamic_thresholding_ratio=0.995,
        euler_at_final=False,
        final_sigmas_type="zero",
        flow_shift=3.0,
        lambda_min_clipped=-float("inf"),
        lower_order_final=True,
        num_train_timesteps=1000,
        prediction_type="flow_prediction",
        sample_max_value=1.0,
        solver_order=2,
        solver_type="midpoint",
        steps_offset=0,
        thresholding=False,
        timestep_spacing="linspace",
        trained_betas=None,
        use_beta_sigmas=False,
        use_exponential_sigmas=False,
        use_flow_sigmas=True,
        use_karras_sigmas=False,
        use_lu_lambdas=False,
        variance_type=None,
    )


@torch.no_grad()
def write_scheduler():
    """The scheduler on its own, in unet_reference's scheduler fixture format: the fake model
    `0.1 * scaled_input + 0.05 * timestep / 1000` from fixed latents, every step's latents."""
    sched = build_scheduler()
    folder = FOLDER / "scheduler"
    if folder.exists():
        shutil.rmtree(folder)
    sched.save_pretrained(folder)
    tensors = {}
    for steps in [20, 7]:
        sched = DPMSolverMultistepScheduler.from_pretrained(folder)
        sched.set_timesteps(steps)
        tensors[f"steps{steps}_timesteps"] = sched.timesteps.to(torch.float32)
        tensors[f"steps{steps}_sigmas"] = sched.sigmas.to(torch.float32)
    x = torch.randn(1, LATENT_CHANNELS, 4, 6, generator=torch.Generator().manual_seed(9))
    tensors["init_latents"] = x.clone()
    sched = DPMSolverMultistepScheduler.from_pretrained(folder)
    sched.set_timesteps(7)
    for k, t in enumerate(sched.timesteps):
        scaled = sched.scale_model_input(x, t)
        out = 0.1 * scaled + 0.05 * (float(t) / 1000.0)
        x = sched.step(out, t, x, return_dict=False)[0]
        tensors[f"step_{k}_latents"] = x.clone()
    write_safetensors(OUT / "scheduler.safetensors", tensors, {"scheduler": type(sched).__name__})


def build_tokenizer(chi: str):
    """A tiny BPE tokenizer in Gemma's shape: spaces as U+2581, <pad> 0, <eos> 1, <bos> 2, <unk> 3,
    <bos> prepended."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers
    from transformers import GemmaTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<pad>", "<eos>", "<bos>", "<unk>"], show_progress=False)
    tok.train_from_iterator(corpus_lines() + chi.split("\n") + [PROMPT, NEGATIVE_PROMPT], trainer)
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    tok.decoder = decoders.Replace("\u2581", " ")
    return GemmaTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")


def build_gemma2(vocab: int):
    from transformers import Gemma2Config, Gemma2Model

    # Gemma-2-2B's shape choices at tiny widths: 8 heads x 256 -> 2 x 8, 4 KV heads -> 1 (grouped),
    # query_pre_attn_scalar 256 -> 8, softcapping 50 / 30, sliding window 4096, 26 layers -> 2.
    config = Gemma2Config(
        vocab_size=vocab,
        hidden_size=CAPTION_CHANNELS,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        query_pre_attn_scalar=8,
        hidden_activation="gelu_pytorch_tanh",
        max_position_embeddings=8192,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        attention_bias=False,
        attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0,
        sliding_window=4096,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    config._attn_implementation = "eager"
    model = Gemma2Model(config)
    randomize_(model, seed=406)
    return model.eval()


@torch.no_grad()
def write_text():
    import inspect

    from diffusers import SanaPipeline

    chi = inspect.signature(SanaPipeline.__call__).parameters["complex_human_instruction"].default
    tokenizer = build_tokenizer("\n".join(chi))
    encoder = build_gemma2(len(tokenizer))
    for name, part in [("tokenizer", tokenizer), ("text_encoder", encoder)]:
        if (FOLDER / name).exists():
            shutil.rmtree(FOLDER / name)
        part.save_pretrained(FOLDER / name)
    tokenizer = type(tokenizer).from_pretrained(FOLDER / "tokenizer")
    pipe = SanaPipeline(tokenizer=tokenizer, text_encoder=encoder, vae=None, transformer=None, scheduler=None)
    tensors, meta = {}, {"max_sequence_length": "300", "complex_human_instruction": json.dumps(chi)}
    for key, text, use_chi in [("prompt", PROMPT, True), ("negative", NEGATIVE_PROMPT, False), ("plain", PROMPT, False)]:
        embeds, mask, _, _ = pipe.encode_prompt(
            text, do_classifier_free_guidance=False, max_sequence_length=300, complex_human_instruction=chi if use_chi else None
        )
        n = int(mask.sum())
        assert bool(mask[0, :n].all())
        tensors[f"{key}_embeds"] = embeds[:, :n]
        meta[key] = text
    chi_prompt = "\n".join(chi)
    ids = tokenizer(chi_prompt + PROMPT.lower().strip()).input_ids
    tensors["prompt_chi_ids"] = torch.tensor([ids], dtype=torch.int64)
    meta["num_chi_prompt_tokens"] = str(len(tokenizer.encode(chi_prompt)))
    write_safetensors(OUT / "text.safetensors", tensors, meta)


MODEL_INDEX = {
    "_class_name": "SanaPipeline",
    "_diffusers_version": "0.42.1",
    "scheduler": ["diffusers", "DPMSolverMultistepScheduler"],
    "text_encoder": ["transformers", "Gemma2Model"],
    "tokenizer": ["transformers", "GemmaTokenizerFast"],
    "transformer": ["diffusers", "SanaTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderDC"],
}


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


def load_pipeline():
    """The folder as a user loads it: SanaPipeline.from_pretrained (model_index.json written here,
    the components by the functions above)."""
    from diffusers import SanaPipeline

    (FOLDER / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2, sort_keys=True) + "\n")
    pipe = SanaPipeline.from_pretrained(FOLDER, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def negative_embeds(pipe):
    """encode_prompt of the negative prompt as the pipeline encodes it for CFG (no instruction
    prefix): [1, 300, C] and its mask."""
    embeds, mask, _, _ = pipe.encode_prompt(
        NEGATIVE_PROMPT, do_classifier_free_guidance=False, max_sequence_length=MAX_SEQUENCE_LENGTH, complex_human_instruction=None
    )
    return embeds, mask


@torch.no_grad()
def run_case(pipe, pag_pipe, case: Case, init: torch.Tensor):
    steps, timesteps, guided = [], [], []
    holder, original = None, None

    def on_step(p, i, t, kwargs):
        steps.append(kwargs["latents"].detach().clone())
        timesteps.append(float(t))
        guided.append(holder is not None and holder.plan.mode != "none")
        # The official SDXL NAG window: once t < floor((1 - nag_end) 999) the processors are
        # removed for good; checked here for the next step's t.
        ts = p.scheduler.timesteps
        if holder is not None and i + 1 < len(ts) and ts[i + 1] < math.floor((1.0 - case.nag_end) * 999):
            holder.plan = Plan()
        return {}

    kwargs = dict(
        negative_prompt=NEGATIVE_PROMPT,
        num_inference_steps=STEPS,
        height=HEIGHT,
        width=WIDTH,
        latents=init.clone(),
        output_type="latent",
        callback_on_step_end=on_step,
        max_sequence_length=MAX_SEQUENCE_LENGTH,
        guidance_scale=CFG_SCALE if case.cfg else 1.0,
    )
    if case.pag:
        out = pag_pipe(PROMPT, pag_scale=PAG_SCALE, **kwargs).images
    elif case.attn == "none":
        out = pipe(PROMPT, **kwargs).images
    else:
        holder, original = install(pipe.transformer)
        embeds, mask = negative_embeds(pipe)
        tr = pipe.transformer
        project = lambda e: tr.caption_norm(tr.caption_projection(e))  # noqa: E731
        row = 1 if case.cfg else 0
        if case.attn == "vsf":
            n = int(mask.sum())
            holder.plan = Plan("vsf", row, project(embeds[:, :n]), None)
        else:
            holder.plan = Plan(case.attn, row, project(embeds), mask)
        try:
            out = pipe(PROMPT, **kwargs).images
        finally:
            tr.set_attn_processor(original)
    tensors = {f"step_{k}_latents": s for k, s in enumerate(steps)}
    tensors.update(final_latents=out, init_latents=init, timesteps=torch.tensor(timesteps, dtype=torch.float32))
    if case.image:
        # The VAE on the top-left 2 x 2 latents (a 64 x 64 image keeps the file small).
        crop = out[:, :, :2, :2]
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


def write_pipelines():
    from diffusers import SanaPAGPipeline

    pipe = load_pipeline()
    pag_pipe = SanaPAGPipeline.from_pipe(pipe, pag_applied_layers=[PAG_LAYERS])
    pag_pipe.set_progress_bar_config(disable=True)
    init = torch.randn(1, LATENT_CHANNELS, HEIGHT // 32, WIDTH // 32, generator=torch.Generator().manual_seed(11))
    finals = {case.name: run_case(pipe, pag_pipe, case, init) for case in CASES}
    # Sanity: every method changes the result.
    for name, x in finals.items():
        if name != "none":
            d = (x - finals["none"]).abs().max().item()
            assert d > 1e-3, f"{name} equals none ({d})"
    d = (finals["nag_end"] - finals["nag"]).abs().max().item()
    assert d > 1e-4, f"nag_end equals nag ({d})"


@torch.no_grad()
def write_resize():
    """diffusers' `PixArtImageProcessor.resize_and_crop_tensor` (what SANA and PixArt pipelines do to
    an image decoded at a binned size) on a random 64 x 48 image, down and up."""
    from diffusers.image_processor import PixArtImageProcessor

    image = torch.randn(1, 3, 64, 48, generator=torch.Generator().manual_seed(12))
    tensors = {"image": image}
    for h, w in [(40, 36), (50, 30), (90, 70)]:
        tensors[f"resized_{h}x{w}"] = PixArtImageProcessor.resize_and_crop_tensor(image, w, h)
    write_safetensors(OUT / "resize.safetensors", tensors, {})


def main():
    torch.manual_seed(0)
    OUT.mkdir(parents=True, exist_ok=True)
    write_resize()
    if "--resize-only" in sys.argv:
        return
    if "--pipelines-only" not in sys.argv:
        write_transformers()
        write_dc_ae()
        write_scheduler()
        write_text()
    write_pipelines()
    print("wrote", OUT)


if __name__ == "__main__":
    main()
