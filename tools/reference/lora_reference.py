#!/usr/bin/env python3
"""LoRA fixtures: tiny LoRA files in each supported format and what diffusers makes of them.

For each tiny fixture pipeline (Flux schnell, SD3 medium, SDXL, SD1.5) this script draws one
random LoRA per targeted module (A and B nonzero, ranks 2 and 4 mixed, linear and conv layers),
writes it in every key layout veto reads, and checks with diffusers that each file is accepted by
`load_lora_weights` and fuses (`fuse_lora`) to the same weights as W + scale * (alpha / rank) B A
computed here. It then runs the diffusers pipeline (no guidance, a few steps, fixed initial
latents) with the fused LoRA(s) and records the final latents: the Rust tests load the same files
through `--lora` and must reproduce them.

The format conversions below are written for this script from the layouts' descriptions (kohya
sd-scripts, ComfyUI / BFL, XLabs, diffusers / PEFT); diffusers is the judge of each file.

Run: /work/venv/ref/bin/python tools/reference/lora_reference.py
Writes tests/fixtures/lora/*.safetensors and prints a summary.
"""

from __future__ import annotations

import inspect
import json
import math
import re
import struct
import sys
from pathlib import Path

import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.loaders import lora_conversion_utils, lora_pipeline

REPO_ROOT = Path(__file__).resolve().parents[2]
FIXTURES = REPO_ROOT / "tests" / "fixtures"
OUT = FIXTURES / "lora"

PROMPT = "a photo of a cat wearing glasses"
HEIGHT = WIDTH = 64
STEPS = 2
MAX_SEQUENCE_LENGTH = 16

torch.set_grad_enabled(False)


# --------------------------------------------------------------------------------------------
# Deterministic safetensors writer (the same format as the other reference scripts write).
# --------------------------------------------------------------------------------------------


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    header: dict = {}
    if metadata:
        header["__metadata__"] = {k: str(metadata[k]) for k in sorted(metadata)}
    blobs, offset = [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().to(torch.float32).contiguous()
        data = t.numpy().tobytes()
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for b in blobs:
            f.write(b)


# --------------------------------------------------------------------------------------------
# The canonical LoRA: {component: {diffusers module name: (A, B)}}, delta = B A (alpha = rank).
# --------------------------------------------------------------------------------------------


def lora_pair(gen: torch.Generator, module: torch.nn.Module, rank: int, strength: float):
    if isinstance(module, torch.nn.Linear):
        a = torch.randn(rank, module.in_features, generator=gen) / math.sqrt(module.in_features)
        b = torch.randn(module.out_features, rank, generator=gen) * strength / math.sqrt(rank)
    else:
        kh, kw = module.kernel_size
        fan_in = module.in_channels * kh * kw
        a = torch.randn(rank, module.in_channels, kh, kw, generator=gen) / math.sqrt(fan_in)
        b = torch.randn(module.out_channels, rank, 1, 1, generator=gen) * strength / math.sqrt(rank)
    return a, b


def draw_lora(model: torch.nn.Module, names: list[str], seed: int, strength: float) -> dict:
    gen = torch.Generator().manual_seed(seed)
    mods = dict(model.named_modules())
    return {n: lora_pair(gen, mods[n], 2 if i % 3 else 4, strength) for i, n in enumerate(names)}


def delta(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if a.dim() == 2:
        return b @ a
    r = a.shape[0]
    return (b.reshape(b.shape[0], r) @ a.reshape(r, -1)).reshape(b.shape[0], *a.shape[1:])


def linear_names(model: torch.nn.Module, convs: bool = False) -> list[str]:
    kinds = (torch.nn.Linear, torch.nn.Conv2d) if convs else (torch.nn.Linear,)
    return [n for n, m in model.named_modules() if isinstance(m, kinds)]


def clip_names(te: torch.nn.Module) -> list[str]:
    return [n for n in linear_names(te) if ".layers." in n]


# --------------------------------------------------------------------------------------------
# Key layouts.
# --------------------------------------------------------------------------------------------


def flat(name: str) -> str:
    return name.replace(".", "_")


def spelled(comp: str, module: str) -> str:
    """A module as LoRA files name it: CLIP modules under `text_model.` (transformers 4's CLIPTextModel
    names, which real LoRAs and the checkpoints keep; transformers 5 dropped the wrapper)."""
    return f"text_model.{module}" if comp.startswith("text_encoder") and not module.startswith("text_model.") else module


def write_peft(lora: dict) -> dict:
    out = {}
    for comp, mods in lora.items():
        for m, (a, b) in mods.items():
            out[f"{comp}.{spelled(comp, m)}.lora_A.weight"] = a
            out[f"{comp}.{spelled(comp, m)}.lora_B.weight"] = b
    return out


def kohya_entry(out: dict, key: str, a: torch.Tensor, b: torch.Tensor) -> None:
    """kohya stores alpha; we store alpha = 1 and B times rank so that (alpha / rank) B A is unchanged.
    (One alpha for all modules: diffusers mis-scales kohya SD files whose alphas differ per module.)"""
    rank = a.shape[0]
    out[f"{key}.lora_down.weight"] = a
    out[f"{key}.lora_up.weight"] = b * float(rank)
    out[f"{key}.alpha"] = torch.tensor(1.0)


def write_kohya_sd(lora: dict, te_prefixes: dict, unet_name=lambda m: m) -> dict:
    out = {}
    for comp, mods in lora.items():
        prefix = "lora_unet_" if comp == "unet" else te_prefixes[comp]
        for m, (a, b) in mods.items():
            kohya_entry(out, prefix + flat(unet_name(m) if comp == "unet" else spelled(comp, m)), a, b)
    return out


# Flux: the BFL (original) module names and the diffusers modules each one fuses, in row order.
def flux_bfl_groups(tr, with_outer: bool = False) -> list[tuple[str, list[str], bool]]:
    groups = []
    for i in range(len(tr.transformer_blocks)):
        d, blk = f"double_blocks.{i}", f"transformer_blocks.{i}"
        groups += [
            (f"{d}.img_attn.qkv", [f"{blk}.attn.to_q", f"{blk}.attn.to_k", f"{blk}.attn.to_v"], False),
            (f"{d}.img_attn.proj", [f"{blk}.attn.to_out.0"], False),
            (f"{d}.img_mlp.0", [f"{blk}.ff.net.0.proj"], False),
            (f"{d}.img_mlp.2", [f"{blk}.ff.net.2"], False),
            (f"{d}.img_mod.lin", [f"{blk}.norm1.linear"], False),
            (f"{d}.txt_attn.qkv", [f"{blk}.attn.add_q_proj", f"{blk}.attn.add_k_proj", f"{blk}.attn.add_v_proj"], False),
            (f"{d}.txt_attn.proj", [f"{blk}.attn.to_add_out"], False),
            (f"{d}.txt_mlp.0", [f"{blk}.ff_context.net.0.proj"], False),
            (f"{d}.txt_mlp.2", [f"{blk}.ff_context.net.2"], False),
            (f"{d}.txt_mod.lin", [f"{blk}.norm1_context.linear"], False),
        ]
    for i in range(len(tr.single_transformer_blocks)):
        s, blk = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        groups += [
            (f"{s}.linear1", [f"{blk}.attn.to_q", f"{blk}.attn.to_k", f"{blk}.attn.to_v", f"{blk}.proj_mlp"], False),
            (f"{s}.linear2", [f"{blk}.proj_out"], False),
            (f"{s}.modulation.lin", [f"{blk}.norm.linear"], False),
        ]
    outer = [
        ("img_in", ["x_embedder"], False),
        ("txt_in", ["context_embedder"], False),
        ("time_in.in_layer", ["time_text_embed.timestep_embedder.linear_1"], False),
        ("time_in.out_layer", ["time_text_embed.timestep_embedder.linear_2"], False),
        ("vector_in.in_layer", ["time_text_embed.text_embedder.linear_1"], False),
        ("vector_in.out_layer", ["time_text_embed.text_embedder.linear_2"], False),
        ("final_layer.linear", ["proj_out"], False),
        # BFL orders the final modulation (shift, scale); diffusers' norm_out (scale, shift).
        ("final_layer.adaLN_modulation.1", ["norm_out.linear"], True),
    ]
    return groups if not with_outer else groups + outer


def fuse_group(mods: dict, names: list[str], swap: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One fused LoRA equal to the separate ones: A stacked, B block-diagonal."""
    pairs = [mods[n] for n in names]
    a = torch.cat([p[0] for p in pairs], 0)
    b = torch.block_diag(*[p[1] for p in pairs])
    if swap:
        half = b.shape[0] // 2
        b = torch.cat([b[half:], b[:half]], 0)
    return a, b


def write_flux_bfl(lora: dict, tr) -> dict:
    """ComfyUI / BFL layout: diffusion_model.<BFL name>.lora_A/lora_B, CLIP under text_encoders.clip_l."""
    out = {}
    for bfl, names, swap in flux_bfl_groups(tr):
        a, b = fuse_group(lora["transformer"], names, swap)
        out[f"diffusion_model.{bfl}.lora_A.weight"] = a
        out[f"diffusion_model.{bfl}.lora_B.weight"] = b
    for m, (a, b) in lora.get("text_encoder", {}).items():
        out[f"text_encoders.clip_l.transformer.{spelled('text_encoder', m)}.lora_A.weight"] = a
        out[f"text_encoders.clip_l.transformer.{spelled('text_encoder', m)}.lora_B.weight"] = b
    return out


def write_flux_kohya(lora: dict, tr) -> dict:
    """kohya sd-scripts Flux layout: lora_unet_<flattened BFL name>, CLIP under lora_te1_."""
    out = {}
    for bfl, names, swap in flux_bfl_groups(tr):
        a, b = fuse_group(lora["transformer"], names, swap)
        kohya_entry(out, "lora_unet_" + flat(bfl), a, b)
    for m, (a, b) in lora.get("text_encoder", {}).items():
        kohya_entry(out, "lora_te1_" + flat(spelled("text_encoder", m)), a, b)
    return out


def draw_xlabs(tr, seed: int, strength: float) -> dict:
    """An XLabs LoRA (its own layout: one down shared by q, k, v; no alpha)."""
    gen = torch.Generator().manual_seed(seed)
    dim = tr.config.num_attention_heads * tr.config.attention_head_dim
    rank = 4
    out = {}

    def pair(key: str, rows: int):
        out[f"{key}.down.weight"] = torch.randn(rank, dim, generator=gen) / math.sqrt(dim)
        out[f"{key}.up.weight"] = torch.randn(rows, rank, generator=gen) * strength / math.sqrt(rank)

    for i in range(len(tr.transformer_blocks)):
        p = f"double_blocks.{i}.processor"
        pair(f"{p}.qkv_lora1", 3 * dim)
        pair(f"{p}.proj_lora1", dim)
        pair(f"{p}.qkv_lora2", 3 * dim)
        pair(f"{p}.proj_lora2", dim)
    for i in range(len(tr.single_transformer_blocks)):
        pair(f"single_blocks.{i}.processor.qkv_lora", 3 * dim)
    return out


# SDXL's LDM (sgm) UNet names, the ones kohya uses for SDXL: diffusers name -> LDM name.
def sdxl_ldm_name(name: str, cfg) -> str:
    lpb = cfg.layers_per_block
    resnet = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
              "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
    top = {"conv_in": "input_blocks.0.0", "conv_out": "out.2", "time_embedding.linear_1": "time_embed.0",
           "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
           "add_embedding.linear_2": "label_emb.0.2"}
    if name in top:
        return top[name]

    def inner(kind: str, rest: str) -> str:
        if kind == "resnets":
            head, _, tail = rest.partition(".")
            return resnet[head] + ("." + tail if tail else "")
        return rest

    m = re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", name)
    if m:
        b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        return f"input_blocks.{1 + b * (lpb + 1) + j}.{0 if kind == 'resnets' else 1}.{inner(kind, rest)}"
    m = re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv", name)
    if m:
        return f"input_blocks.{1 + int(m[1]) * (lpb + 1) + lpb}.0.op"
    m = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", name)
    if m:
        idx = {("resnets", 0): 0, ("attentions", 0): 1, ("resnets", 1): 2}[(m[1], int(m[2]))]
        return f"middle_block.{idx}.{inner(m[1], m[3])}"
    m = re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", name)
    if m:
        b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        return f"output_blocks.{b * (lpb + 1) + j}.{0 if kind == 'resnets' else 1}.{inner(kind, rest)}"
    m = re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv", name)
    if m:
        b = int(m[1])
        has_attn = "CrossAttn" in cfg.up_block_types[b]
        return f"output_blocks.{b * (lpb + 1) + lpb}.{2 if has_attn else 1}.conv"
    raise ValueError(f"no LDM name for {name}")


# --------------------------------------------------------------------------------------------
# Checks with diffusers, expected outputs.
# --------------------------------------------------------------------------------------------


def patch_diffusers_flux_kohya_dims(dim: int, mlp: int) -> None:
    """diffusers' kohya-Flux converter hard-codes FLUX.1's widths (3072, 12288) for single_blocks
    linear1; rewrite that one literal for the tiny model's widths."""
    src = inspect.getsource(lora_conversion_utils._convert_kohya_flux_lora_to_diffusers)
    old = "dims=[3072, 3072, 3072, 12288]"
    assert old in src, "diffusers' kohya Flux converter changed; update the patch"
    src = src.replace(old, f"dims=[{dim}, {dim}, {dim}, {mlp}]")
    exec(compile(src, lora_conversion_utils.__file__, "exec"), lora_conversion_utils.__dict__)
    lora_pipeline._convert_kohya_flux_lora_to_diffusers = lora_conversion_utils._convert_kohya_flux_lora_to_diffusers


def expected_weights(pipe, lora: dict, scale: float) -> dict:
    """W + scale * B A for every module of the canonical LoRA."""
    want = {}
    for comp, mods in lora.items():
        named = dict(getattr(pipe, comp).named_modules())
        for m, (a, b) in mods.items():
            want[(comp, m)] = named[m].weight.detach().clone() + scale * delta(a, b)
    return want


def fused_with(load, folder: Path, files: list[tuple[Path, float]], components: list[str]):
    pipe = load(folder)
    for k, (path, scale) in enumerate(files):
        pipe.load_lora_weights(str(path), adapter_name=f"l{k}")
        pipe.fuse_lora(lora_scale=scale, components=components, adapter_names=[f"l{k}"])
        pipe.unload_lora_weights()
    return pipe


def check_fused(pipe, want: dict, what: str, summary: list[str]) -> None:
    worst, bad = 0.0, []
    for (comp, m), w in want.items():
        got = dict(getattr(pipe, comp).named_modules())[m].weight
        err = (got - w).abs().max().item() / max(1.0, w.abs().max().item())
        if err >= 1e-5:
            bad.append(f"{comp}.{m} ({err:.2g})")
        worst = max(worst, err)
    assert not bad, f"{what}: fused by diffusers differently from W + s B A: {', '.join(bad)}"
    summary.append(f"{what}: diffusers fuses {len(want)} modules as W + s·(alpha/rank)·B·A (max rel err {worst:.1e})")


def run(pipe, family: str, init: torch.Tensor) -> torch.Tensor:
    kwargs = dict(prompt=PROMPT, height=HEIGHT, width=WIDTH, num_inference_steps=STEPS, output_type="latent")
    if family == "flux":
        from diffusers.pipelines.flux.pipeline_flux import FluxPipeline as F

        packed = pipe(**kwargs, guidance_scale=0.0, max_sequence_length=MAX_SEQUENCE_LENGTH,
                      latents=F._pack_latents(init.clone(), 1, 16, 8, 8)).images
        return F._unpack_latents(packed, HEIGHT, WIDTH, 8)
    if family == "sd3":
        return pipe(**kwargs, guidance_scale=1.0, max_sequence_length=MAX_SEQUENCE_LENGTH, latents=init.clone()).images
    return pipe(**kwargs, guidance_scale=1.0, latents=init.clone()).images


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp(min=1.0)).item()


def write_expected(name: str, family: str, model: str, init, final, loras: list[tuple[str, float]],
                   base_final, summary: list[str], guidance_scale: float) -> None:
    moved = rel(final, base_final)
    assert moved > 1e-2, f"{name}: the LoRA changes the latents by only {moved}"
    meta = {
        "family": family, "model": model, "prompt": PROMPT, "steps": str(STEPS), "height": str(HEIGHT),
        "width": str(WIDTH), "guidance_scale": repr(guidance_scale), "max_sequence_length": str(MAX_SEQUENCE_LENGTH),
        "loras": json.dumps(loras),
    }
    write_safetensors(OUT / f"expected_{name}.safetensors", {"init_latents": init, "final_latents": final}, meta)
    summary.append(f"expected_{name}: loras {loras}; final latents move {moved:.3f} (rel) from the base model's")


class Family:
    def __init__(self, family, model, folder, cls, components, channels, guidance_scale):
        self.family, self.model, self.folder, self.cls = family, model, folder, cls
        self.components, self.channels, self.guidance_scale = components, channels, guidance_scale

    def load(self, folder=None):
        pipe = self.cls.from_pretrained(str(folder or self.folder), torch_dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        return pipe


def check_formats(fam: Family, files: dict[str, dict], lora: dict, init, summary: list[str],
                  metadata: dict | None = None, rename=None) -> torch.Tensor:
    """Each file fuses (diffusers) to W + B A and gives the same latents; returns them."""
    finals = []
    for fmt, tensors in files.items():
        path = OUT / f"{fam.model}_{fmt}.safetensors"
        write_safetensors(path, tensors, (metadata or {}).get(fmt))
        judged = path
        if rename and fmt in rename:
            # A layout diffusers does not read as such: hand it the equivalent it reads.
            judged = OUT / f"tmp_{fam.model}_{fmt}.safetensors"
            write_safetensors(judged, rename[fmt](tensors))
        pipe = fused_with(fam.load, fam.folder, [(judged, 1.0)], fam.components)
        if judged != path:
            judged.unlink()
        check_fused(pipe, expected_weights(fam.load(), lora, 1.0), f"{fam.model} {fmt}", summary)
        finals.append(run(pipe, fam.family, init))
    for f in finals[1:]:
        assert rel(f, finals[0]) < 1e-5, f"{fam.model}: formats disagree by {rel(f, finals[0])}"
    return finals[0]


def bfl_as_comfy_kohya(tensors: dict) -> dict:
    return {k.replace(".lora_A.weight", ".lora_down.weight").replace(".lora_B.weight", ".lora_up.weight"): v
            for k, v in tensors.items()}


def flux(summary: list[str]) -> None:
    fam = Family("flux", "flux", FIXTURES / "flux" / "schnell", FluxPipeline, ["transformer", "text_encoder"], 16, 0.0)
    base = fam.load()
    tr = base.transformer
    dim = tr.config.num_attention_heads * tr.config.attention_head_dim
    patch_diffusers_flux_kohya_dims(dim, tr.single_transformer_blocks[0].proj_mlp.out_features)
    # Not the embedders (img_in, txt_in, time_in, vector_in) nor the final layer: diffusers'
    # kohya-Flux converter names their LoRAs without the "transformer." prefix and so drops them
    # (veto merges them; the Rust unit tests check their names).
    outer = ("time_text_embed.", "x_embedder", "context_embedder", "norm_out.", "proj_out")
    names = [n for n in linear_names(tr) if not n.startswith(outer)]
    lora = {"transformer": draw_lora(tr, names, 1, 0.3), "text_encoder": draw_lora(base.text_encoder, clip_names(base.text_encoder), 2, 0.3)}
    init = torch.randn(1, 16, HEIGHT // 8, WIDTH // 8, generator=torch.Generator().manual_seed(801))
    base_final = run(base, "flux", init)
    files = {"peft": write_peft(lora), "bfl": write_flux_bfl(lora, tr), "kohya": write_flux_kohya(lora, tr)}
    final = check_formats(fam, files, lora, init, summary, rename={"bfl": bfl_as_comfy_kohya})
    write_expected("flux_scale1", "flux", "schnell", init, final, [["flux_peft", 1.0]], base_final, summary, 0.0)

    pipe = fused_with(fam.load, fam.folder, [(OUT / "flux_kohya.safetensors", 0.5)], fam.components)
    check_fused(pipe, expected_weights(fam.load(), lora, 0.5), "flux kohya at 0.5", summary)
    write_expected("flux_scale05", "flux", "schnell", init, run(pipe, "flux", init), [["flux_kohya", 0.5]],
                   base_final, summary, 0.0)

    write_safetensors(OUT / "flux_xlabs.safetensors", draw_xlabs(tr, 3, 0.3))
    pipe = fused_with(fam.load, fam.folder, [(OUT / "flux_xlabs.safetensors", 1.0)], fam.components)
    write_expected("flux_xlabs", "flux", "schnell", init, run(pipe, "flux", init), [["flux_xlabs", 1.0]],
                   base_final, summary, 0.0)

    stack = [(OUT / "flux_bfl_comfy.safetensors", 0.7), (OUT / "flux_xlabs.safetensors", 1.3)]
    write_safetensors(stack[0][0], bfl_as_comfy_kohya(files["bfl"]))
    pipe = fused_with(fam.load, fam.folder, stack, fam.components)
    stack[0][0].unlink()
    write_expected("flux_stack", "flux", "schnell", init, run(pipe, "flux", init), [["flux_bfl", 0.7], ["flux_xlabs", 1.3]],
                   base_final, summary, 0.0)


def unet_family(model: str, summary: list[str]) -> None:
    sdxl = model == "sdxl"
    cls = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
    comps = ["unet", "text_encoder", "text_encoder_2"] if sdxl else ["unet", "text_encoder"]
    fam = Family("unet", model, FIXTURES / "unet" / model, cls, comps, 4, 1.0)
    base = fam.load()
    unet = base.unet
    # Every linear and conv layer of the UNet: convs 3x3 (resnets, samplers) and 1x1 (SD1.5 proj_in/out).
    # (Not add_embedding: diffusers' kohya converter mangles its diffusers-style name.)
    names = [n for n in linear_names(unet, convs=True) if not n.startswith("add_embedding")]
    lora = {"unet": draw_lora(unet, names, 11, 0.3), "text_encoder": draw_lora(base.text_encoder, clip_names(base.text_encoder), 12, 0.3)}
    if sdxl:
        lora["text_encoder_2"] = draw_lora(base.text_encoder_2, clip_names(base.text_encoder_2), 13, 0.3)
    init = torch.randn(1, 4, HEIGHT // 8, WIDTH // 8, generator=torch.Generator().manual_seed(811))
    base_final = run(base, "unet", init)
    te = {"text_encoder": "lora_te1_" if sdxl else "lora_te_", "text_encoder_2": "lora_te2_"}
    files = {"peft": write_peft(lora), "kohya": write_kohya_sd(lora, te)}
    if sdxl:
        files["kohya_ldm"] = write_kohya_sd(lora, te, lambda m: sdxl_ldm_name(m, unet.config))
    final = check_formats(fam, files, lora, init, summary)
    write_expected(f"{model}_scale1", "unet", model, init, final, [[f"{model}_peft", 1.0]], base_final, summary, 1.0)

    pipe = fused_with(fam.load, fam.folder, [(OUT / f"{model}_kohya.safetensors", 0.5)], fam.components)
    check_fused(pipe, expected_weights(fam.load(), lora, 0.5), f"{model} kohya at 0.5", summary)
    write_expected(f"{model}_scale05", "unet", model, init, run(pipe, "unet", init), [[f"{model}_kohya", 0.5]],
                   base_final, summary, 1.0)


def sd3(summary: list[str]) -> None:
    fam = Family("sd3", "sd3", FIXTURES / "sd3" / "medium", StableDiffusion3Pipeline,
                 ["transformer", "text_encoder", "text_encoder_2"], 16, 1.0)
    base = fam.load()
    tr = base.transformer
    lora = {"transformer": draw_lora(tr, linear_names(tr), 21, 0.3),
            "text_encoder": draw_lora(base.text_encoder, clip_names(base.text_encoder), 22, 0.3),
            "text_encoder_2": draw_lora(base.text_encoder_2, clip_names(base.text_encoder_2), 23, 0.3)}
    init = torch.randn(1, 16, HEIGHT // 8, WIDTH // 8, generator=torch.Generator().manual_seed(821))
    base_final = run(base, "sd3", init)
    # PEFT with alphas in the adapter metadata, as diffusers' save_lora_weights writes them:
    # lora_alpha = 8 for the transformer (its B stored times rank / 8), alpha = rank for the text
    # encoders through alpha_pattern; rank_pattern names the rank-4 modules.
    peft_alpha = write_peft(lora)
    packed = {}
    for comp, mods in lora.items():
        rank4 = {m: 4 for m, (a, _) in mods.items() if a.shape[0] == 4}
        alpha = 8 if comp == "transformer" else 2
        cfg = {"r": 2, "lora_alpha": alpha, "rank_pattern": rank4, "alpha_pattern": {} if alpha == 8 else rank4,
               "target_modules": sorted(mods), "use_rslora": False, "use_dora": False, "lora_bias": False}
        packed.update({f"{comp}.{k}": v for k, v in cfg.items()})
        for m, (a, b) in mods.items():
            module_alpha = alpha if alpha == 8 else a.shape[0]
            peft_alpha[f"{comp}.{spelled(comp, m)}.lora_B.weight"] = b * a.shape[0] / module_alpha
    meta = {"lora_adapter_metadata": json.dumps(packed, sort_keys=True)}
    files = {"peft": write_peft(lora), "peft_alpha": peft_alpha}
    final = check_formats(fam, files, lora, init, summary, metadata={"peft_alpha": meta})
    write_expected("sd3_scale1", "sd3", "medium", init, final, [["sd3_peft", 1.0]], base_final, summary, 1.0)


def main() -> None:
    assert sys.byteorder == "little"
    OUT.mkdir(parents=True, exist_ok=True)
    summary: list[str] = []
    only = set(sys.argv[1:])
    for name, fn in [("flux", flux), ("sdxl", lambda s: unet_family("sdxl", s)),
                     ("sd15", lambda s: unet_family("sd15", s)), ("sd3", sd3)]:
        if not only or name in only:
            fn(summary)
    print("\n".join(summary))


if __name__ == "__main__":
    main()
