#!/usr/bin/env python3
"""Tiny single-file checkpoints in the original key layouts, from the tiny diffusers fixtures.

Each file holds exactly the weights of a tiny diffusers pipeline folder under `tests/fixtures/`,
renamed (and fused, swapped, transposed, reshaped) into the layout the real distributions use:
Black Forest Labs' FLUX.1 files, ComfyUI all-in-one files, Stability's SD3/SD3.5 files, and the
A1111/ComfyUI SD1.5/SDXL checkpoints. The inverse mapping (diffusers -> original) is written here
by hand; diffusers' own single-file converters then read every file back (`from_single_file` with
`config=` the tiny folder's component, or the converter function for the text encoders), and the
result must equal the folder's state dict exactly. That proves each file is the real layout, so
the Rust tests (single file == diffusers folder, <= 1e-5) test veto's key maps against it.

Run: /work/venv/ref/bin/python tools/reference/single_file_reference.py [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import re
import struct
import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel
from diffusers.loaders import single_file_utils as sfu
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"


# --------------------------------------------------------------------------------------------
# Reading diffusers folders and writing deterministic safetensors files.
# --------------------------------------------------------------------------------------------


def folder_state(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a component folder (single file or shards)."""
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    if not out:
        raise FileNotFoundError(f"no safetensors in {folder}")
    return out


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """u64 LE header size, JSON header (sorted), raw data: byte-identical on every run."""
    header: dict = {"__metadata__": {k: str(metadata[k]) for k in sorted(metadata)}}
    blobs, offset = [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        assert t.dtype == torch.float32, (name, t.dtype)
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


def prefixed(prefix: str, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in sd.items()}


def swap_halves(t: torch.Tensor) -> torch.Tensor:
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def take(sd: dict[str, torch.Tensor], used: set[str], key: str) -> torch.Tensor:
    used.add(key)
    return sd[key]


def check_all_used(sd: dict[str, torch.Tensor], used: set[str], what: str) -> None:
    left = sorted(set(sd) - used)
    if left:
        raise AssertionError(f"{what}: diffusers tensors not written to the original layout: {left[:8]}")


def assert_same_state(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str) -> None:
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    if missing or extra:
        raise AssertionError(f"{what}: keys differ; missing {missing[:8]}, extra {extra[:8]}")
    for k in sorted(want):
        if got[k].shape != want[k].shape or not torch.equal(got[k].float(), want[k].float()):
            raise AssertionError(f"{what}: tensor {k} differs")
    print(f"  {what}: {len(want)} tensors identical")


# --------------------------------------------------------------------------------------------
# Inverse maps, diffusers -> original layouts.
# --------------------------------------------------------------------------------------------


def flux_to_bfl(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """FluxTransformer2DModel -> Black Forest Labs' layout."""
    used: set[str] = set()
    out: dict[str, torch.Tensor] = {}

    def layer(bfl: str, diff: str) -> None:
        for p in ("weight", "bias"):
            out[f"{bfl}.{p}"] = take(sd, used, f"{diff}.{p}")

    def fused(bfl: str, diffs: list[str]) -> None:
        for p in ("weight", "bias"):
            out[f"{bfl}.{p}"] = torch.cat([take(sd, used, f"{d}.{p}") for d in diffs], dim=0)

    layer("img_in", "x_embedder")
    layer("txt_in", "context_embedder")
    for bfl, diff in [("time_in", "timestep_embedder"), ("vector_in", "text_embedder"), ("guidance_in", "guidance_embedder")]:
        if f"time_text_embed.{diff}.linear_1.weight" in sd:
            layer(f"{bfl}.in_layer", f"time_text_embed.{diff}.linear_1")
            layer(f"{bfl}.out_layer", f"time_text_embed.{diff}.linear_2")
    n_double = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("transformer_blocks."))
    n_single = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("single_transformer_blocks."))
    for i in range(n_double):
        b, d = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        layer(b + "img_mod.lin", d + "norm1.linear")
        layer(b + "txt_mod.lin", d + "norm1_context.linear")
        fused(b + "img_attn.qkv", [d + "attn.to_q", d + "attn.to_k", d + "attn.to_v"])
        fused(b + "txt_attn.qkv", [d + "attn.add_q_proj", d + "attn.add_k_proj", d + "attn.add_v_proj"])
        for bfl, diff in [("img_attn.norm.query_norm", "norm_q"), ("img_attn.norm.key_norm", "norm_k"),
                          ("txt_attn.norm.query_norm", "norm_added_q"), ("txt_attn.norm.key_norm", "norm_added_k")]:
            out[f"{b}{bfl}.scale"] = take(sd, used, f"{d}attn.{diff}.weight")
        layer(b + "img_attn.proj", d + "attn.to_out.0")
        layer(b + "txt_attn.proj", d + "attn.to_add_out")
        for mlp, ff in [("img_mlp", "ff"), ("txt_mlp", "ff_context")]:
            layer(f"{b}{mlp}.0", f"{d}{ff}.net.0.proj")
            layer(f"{b}{mlp}.2", f"{d}{ff}.net.2")
    for i in range(n_single):
        b, d = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        layer(b + "modulation.lin", d + "norm.linear")
        fused(b + "linear1", [d + "attn.to_q", d + "attn.to_k", d + "attn.to_v", d + "proj_mlp"])
        out[b + "norm.query_norm.scale"] = take(sd, used, d + "attn.norm_q.weight")
        out[b + "norm.key_norm.scale"] = take(sd, used, d + "attn.norm_k.weight")
        layer(b + "linear2", d + "proj_out")
    for p in ("weight", "bias"):
        out[f"final_layer.adaLN_modulation.1.{p}"] = swap_halves(take(sd, used, f"norm_out.linear.{p}"))
    layer("final_layer.linear", "proj_out")
    check_all_used(sd, used, "flux transformer")
    return out


def sd3_to_original(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SD3Transformer2DModel -> Stability's MMDiT layout."""
    used: set[str] = set()
    out: dict[str, torch.Tensor] = {}

    def layer(orig: str, diff: str, swap: bool = False) -> None:
        for p in ("weight", "bias"):
            t = take(sd, used, f"{diff}.{p}")
            out[f"{orig}.{p}"] = swap_halves(t) if swap else t

    def fused(orig: str, diffs: list[str]) -> None:
        for p in ("weight", "bias"):
            out[f"{orig}.{p}"] = torch.cat([take(sd, used, f"{d}.{p}") for d in diffs], dim=0)

    out["pos_embed"] = take(sd, used, "pos_embed.pos_embed")
    layer("x_embedder.proj", "pos_embed.proj")
    layer("context_embedder", "context_embedder")
    for orig, diff in [("t_embedder", "timestep_embedder"), ("y_embedder", "text_embedder")]:
        layer(f"{orig}.mlp.0", f"time_text_embed.{diff}.linear_1")
        layer(f"{orig}.mlp.2", f"time_text_embed.{diff}.linear_2")
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("transformer_blocks."))
    for i in range(depth):
        d, x, c = f"transformer_blocks.{i}.", f"joint_blocks.{i}.x_block.", f"joint_blocks.{i}.context_block."
        last = i == depth - 1
        fused(x + "attn.qkv", [d + "attn.to_q", d + "attn.to_k", d + "attn.to_v"])
        fused(c + "attn.qkv", [d + "attn.add_q_proj", d + "attn.add_k_proj", d + "attn.add_v_proj"])
        if d + "attn.norm_q.weight" in sd:
            for orig, diff in [(x + "attn.ln_q", "norm_q"), (x + "attn.ln_k", "norm_k"),
                               (c + "attn.ln_q", "norm_added_q"), (c + "attn.ln_k", "norm_added_k")]:
                out[orig + ".weight"] = take(sd, used, f"{d}attn.{diff}.weight")
        layer(x + "attn.proj", d + "attn.to_out.0")
        if d + "attn2.to_q.weight" in sd:
            fused(x + "attn2.qkv", [d + "attn2.to_q", d + "attn2.to_k", d + "attn2.to_v"])
            if d + "attn2.norm_q.weight" in sd:
                out[x + "attn2.ln_q.weight"] = take(sd, used, d + "attn2.norm_q.weight")
                out[x + "attn2.ln_k.weight"] = take(sd, used, d + "attn2.norm_k.weight")
            layer(x + "attn2.proj", d + "attn2.to_out.0")
        layer(x + "adaLN_modulation.1", d + "norm1.linear")
        layer(c + "adaLN_modulation.1", d + "norm1_context.linear", swap=last)
        layer(x + "mlp.fc1", d + "ff.net.0.proj")
        layer(x + "mlp.fc2", d + "ff.net.2")
        if not last:
            layer(c + "attn.proj", d + "attn.to_add_out")
            layer(c + "mlp.fc1", d + "ff_context.net.0.proj")
            layer(c + "mlp.fc2", d + "ff_context.net.2")
    layer("final_layer.adaLN_modulation.1", "norm_out.linear", swap=True)
    layer("final_layer.linear", "proj_out")
    check_all_used(sd, used, "sd3 transformer")
    return out


def unet_to_ldm(sd: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """UNet2DConditionModel -> the LDM UNet layout (input/middle/output blocks numbered over
    all layers)."""
    per_block = config["layers_per_block"]
    resnet = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"), ("conv2", "out_layers.3"),
              ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection")]

    def resnet_name(rest: str) -> str:
        for diff, ldm in resnet:
            if rest.startswith(diff + "."):
                return ldm + rest[len(diff):]
        raise KeyError(rest)

    top = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
           "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
           "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        layer, param = k.rsplit(".", 1)
        if layer in top:
            out[f"{top[layer]}.{param}"] = v
            continue
        parts = k.split(".")
        if parts[0] == "down_blocks":
            b, kind = int(parts[1]), parts[2]
            if kind == "downsamplers":
                n = f"input_blocks.{1 + b * (per_block + 1) + per_block}.0.op.{param}"
            else:
                j, rest = int(parts[3]), ".".join(parts[4:])
                k_ldm = 1 + b * (per_block + 1) + j
                n = (f"input_blocks.{k_ldm}.0.{resnet_name(rest)}" if kind == "resnets"
                     else f"input_blocks.{k_ldm}.1.{rest}")
        elif parts[0] == "mid_block":
            j, rest = int(parts[2]), ".".join(parts[3:])
            n = f"middle_block.{2 * j}.{resnet_name(rest)}" if parts[1] == "resnets" else f"middle_block.1.{rest}"
        elif parts[0] == "up_blocks":
            b, kind = int(parts[1]), parts[2]
            if kind == "upsamplers":
                last = b * (per_block + 1) + per_block
                has_attn = any(x.startswith(f"up_blocks.{b}.attentions.") for x in sd)
                n = f"output_blocks.{last}.{2 if has_attn else 1}.conv.{param}"
            else:
                j, rest = int(parts[3]), ".".join(parts[4:])
                k_ldm = b * (per_block + 1) + j
                n = (f"output_blocks.{k_ldm}.0.{resnet_name(rest)}" if kind == "resnets"
                     else f"output_blocks.{k_ldm}.1.{rest}")
        else:
            raise KeyError(k)
        out[n] = v
    return out


def clip_to_open_clip(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIPTextModelWithProjection -> OpenCLIP's text tower (fused in_proj, x @ W projection)."""
    out: dict[str, torch.Tensor] = {}
    t = "text_model."
    fixed = {f"{t}embeddings.token_embedding.weight": "token_embedding.weight",
             f"{t}embeddings.position_embedding.weight": "positional_embedding",
             f"{t}final_layer_norm.weight": "ln_final.weight", f"{t}final_layer_norm.bias": "ln_final.bias"}
    layers = 1 + max(int(k.split(".")[3]) for k in sd if k.startswith(f"{t}encoder.layers."))
    used = set()
    for k, n in fixed.items():
        out[n] = take(sd, used, k)
    out["text_projection"] = take(sd, used, "text_projection.weight").T.contiguous()
    for i in range(layers):
        d, o = f"{t}encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for p in ("weight", "bias"):
            out[f"{o}attn.in_proj_{p}"] = torch.cat([take(sd, used, f"{d}self_attn.{x}_proj.{p}") for x in "qkv"])
            for diff, ldm in [("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
                              ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")]:
                out[f"{o}{ldm}.{p}"] = take(sd, used, f"{d}{diff}.{p}")
    check_all_used(sd, used, "open clip")
    return out


def vae_to_ldm(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """AutoencoderKL -> the LDM autoencoder layout (mid attention as 1x1 convolutions)."""
    n_up = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("decoder.up_blocks."))
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        n = k.replace("conv_norm_out", "norm_out")
        n = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2.", n)
        n = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", n)
        n = re.sub(r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.",
                   lambda m: f"decoder.up.{n_up - 1 - int(m[1])}.block.{m[2]}.", n)
        n = re.sub(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
                   lambda m: f"decoder.up.{n_up - 1 - int(m[1])}.upsample.", n)
        n = re.sub(r"\.mid_block\.resnets\.(\d+)\.", lambda m: f".mid.block_{int(m[1]) + 1}.", n)
        n = n.replace(".conv_shortcut.", ".nin_shortcut.")
        if ".mid_block.attentions.0." in n:
            n = n.replace(".mid_block.attentions.0.", ".mid.attn_1.")
            for diff, ldm in [("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")]:
                n = n.replace(f".attn_1.{diff}.", f".attn_1.{ldm}.")
            if v.dim() == 2:
                v = v[:, :, None, None]
        out[n] = v
    return out


# --------------------------------------------------------------------------------------------
# Proof: diffusers' own single-file loaders read the files back to the folders' weights.
# --------------------------------------------------------------------------------------------


def flux_from_single_file(path: Path, folder: Path) -> dict[str, torch.Tensor]:
    """`FluxTransformer2DModel.from_single_file`. diffusers' converter hard-codes FLUX.1's
    width (3072) to split the single blocks' fused `linear1`; for the tiny model that constant is
    swapped for the tiny width in a copy of the function's code (nothing else changes)."""
    config = json.loads((folder / "transformer" / "config.json").read_text())
    inner = config["num_attention_heads"] * config["attention_head_dim"]
    original = sfu.convert_flux_transformer_checkpoint_to_diffusers
    code = original.__code__
    consts = tuple(inner if c == 3072 else c for c in code.co_consts)
    patched = type(original)(code.replace(co_consts=consts), original.__globals__, original.__name__)
    registry = __import__("diffusers.loaders.single_file_model", fromlist=["SINGLE_FILE_LOADABLE_CLASSES"])
    entry = registry.SINGLE_FILE_LOADABLE_CLASSES["FluxTransformer2DModel"]
    saved = entry["checkpoint_mapping_fn"]
    entry["checkpoint_mapping_fn"] = patched
    try:
        model = FluxTransformer2DModel.from_single_file(str(path), config=str(folder), subfolder="transformer",
                                                        torch_dtype=torch.float32)
    finally:
        entry["checkpoint_mapping_fn"] = saved
    return model.state_dict()


def vae_from_single_file(path: Path, folder: Path) -> dict[str, torch.Tensor]:
    model = AutoencoderKL.from_single_file(str(path), config=str(folder), subfolder="vae", torch_dtype=torch.float32)
    return model.state_dict()


def sd3_from_single_file(path: Path, folder: Path) -> dict[str, torch.Tensor]:
    model = SD3Transformer2DModel.from_single_file(str(path), config=str(folder), subfolder="transformer",
                                                   torch_dtype=torch.float32)
    return model.state_dict()


def text_encoders_from_file(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """diffusers' converters for the ComfyUI text encoder prefixes (what `from_single_file`
    of SD3/FLUX pipelines runs on them)."""
    ckpt = load_file(path)
    out = {}
    for name, prefix in [("clip_l", "text_encoders.clip_l.transformer."), ("clip_g", "text_encoders.clip_g.transformer.")]:
        if any(k.startswith(prefix) for k in ckpt):
            only = {k: v for k, v in ckpt.items() if k.startswith(prefix)}
            out[name] = sfu.convert_ldm_clip_checkpoint(only, remove_prefix=prefix)
    if sfu.is_t5_in_single_file(ckpt):
        out["t5xxl"] = sfu.convert_sd3_t5_checkpoint_to_diffusers(ckpt)
    return out


def unet_from_single_file(path: Path, folder: Path) -> dict[str, torch.Tensor]:
    model = UNet2DConditionModel.from_single_file(str(path), config=str(folder), subfolder="unet",
                                                  torch_dtype=torch.float32)
    return model.state_dict()


# --------------------------------------------------------------------------------------------
# The files.
# --------------------------------------------------------------------------------------------


def write_flux(out: Path) -> list[str]:
    written = []
    schnell, dev = FIXTURES / "flux" / "schnell", FIXTURES / "flux" / "dev"

    # BFL transformer-only file, no prefix (flux1-schnell.safetensors).
    path = out / "flux_schnell_bfl.safetensors"
    want = folder_state(schnell / "transformer")
    write_safetensors(path, flux_to_bfl(want), {"layout": "bfl", "from": "tests/fixtures/flux/schnell/transformer"})
    assert_same_state(flux_from_single_file(path, schnell), want, path.name)
    written.append(path.name)

    # ComfyUI all-in-one: transformer under model.diffusion_model., VAE under vae.
    path = out / "flux_dev_comfy.safetensors"
    want_t = folder_state(dev / "transformer")
    want_v = folder_state(dev / "vae")
    tensors = prefixed("model.diffusion_model.", flux_to_bfl(want_t)) | prefixed("vae.", vae_to_ldm(want_v))
    write_safetensors(path, tensors, {"layout": "comfyui", "from": "tests/fixtures/flux/dev/{transformer,vae}"})
    assert_same_state(flux_from_single_file(path, dev), want_t, path.name + " transformer")
    assert_same_state(vae_from_single_file(path, dev), want_v, path.name + " vae")
    written.append(path.name)
    return written


def write_sd3(out: Path) -> list[str]:
    written = []
    large, medium = FIXTURES / "sd3" / "large", FIXTURES / "sd3" / "medium"

    # SD3.5 Large as ComfyUI / Stability ship it with everything inside.
    path = out / "sd35_large_all_in_one.safetensors"
    want_t = folder_state(large / "transformer")
    want_v = folder_state(large / "vae")
    encoders = {
        "clip_l": folder_state(large / "text_encoder"),
        "clip_g": folder_state(large / "text_encoder_2"),
        "t5xxl": folder_state(large / "text_encoder_3"),
    }
    tensors = prefixed("model.diffusion_model.", sd3_to_original(want_t)) | prefixed("first_stage_model.", vae_to_ldm(want_v))
    for name, sd in encoders.items():
        tensors |= prefixed(f"text_encoders.{name}.transformer.", sd)
    write_safetensors(path, tensors, {"layout": "sd3", "from": "tests/fixtures/sd3/large"})
    assert_same_state(sd3_from_single_file(path, large), want_t, path.name + " transformer")
    assert_same_state(vae_from_single_file(path, large), want_v, path.name + " vae")
    got = text_encoders_from_file(path)
    for name, sd in encoders.items():
        assert_same_state(got[name], sd, f"{path.name} {name}")
    written.append(path.name)

    # SD3.5 Medium (MMDiT-X: attn2 in the first blocks), transformer only.
    path = out / "sd35_medium_transformer.safetensors"
    want = folder_state(medium / "transformer")
    write_safetensors(path, prefixed("model.diffusion_model.", sd3_to_original(want)),
                      {"layout": "sd3", "from": "tests/fixtures/sd3/medium/transformer"})
    assert_same_state(sd3_from_single_file(path, medium), want, path.name)
    written.append(path.name)
    return written


def write_unet(out: Path) -> list[str]:
    from transformers import CLIPTextModelWithProjection

    written = []
    # SD1.5 as A1111 saves it: UNet, VAE and CLIP-L.
    sd15 = FIXTURES / "unet" / "sd15"
    path = out / "sd15_a1111.safetensors"
    want_u, want_v, want_c = (folder_state(sd15 / c) for c in ("unet", "vae", "text_encoder"))
    config = json.loads((sd15 / "unet" / "config.json").read_text())
    tensors = (prefixed("model.diffusion_model.", unet_to_ldm(want_u, config))
               | prefixed("first_stage_model.", vae_to_ldm(want_v))
               | prefixed("cond_stage_model.transformer.", want_c))
    write_safetensors(path, tensors, {"layout": "a1111", "from": "tests/fixtures/unet/sd15"})
    assert_same_state(unet_from_single_file(path, sd15), want_u, path.name + " unet")
    assert_same_state(vae_from_single_file(path, sd15), want_v, path.name + " vae")
    assert_same_state(sfu.convert_ldm_clip_checkpoint(load_file(path)), want_c, path.name + " text_encoder")
    written.append(path.name)

    # SDXL: UNet, CLIP-L and the OpenCLIP text tower (the VAE, the same LDM layout as above,
    # is left to the base model to keep the file small).
    sdxl = FIXTURES / "unet" / "sdxl"
    path = out / "sdxl_a1111.safetensors"
    want_u, want_c, want_g = (folder_state(sdxl / c) for c in ("unet", "text_encoder", "text_encoder_2"))
    config = json.loads((sdxl / "unet" / "config.json").read_text())
    tensors = (prefixed("model.diffusion_model.", unet_to_ldm(want_u, config))
               | prefixed("conditioner.embedders.0.transformer.", want_c)
               | prefixed("conditioner.embedders.1.model.", clip_to_open_clip(want_g)))
    write_safetensors(path, tensors, {"layout": "a1111", "from": "tests/fixtures/unet/sdxl"})
    assert_same_state(unet_from_single_file(path, sdxl), want_u, path.name + " unet")
    ckpt = load_file(path)
    clip_l = {k: v for k, v in ckpt.items() if k.startswith("conditioner.embedders.0.")}
    assert_same_state(sfu.convert_ldm_clip_checkpoint(clip_l), want_c, path.name + " text_encoder")
    model = CLIPTextModelWithProjection.from_pretrained(sdxl / "text_encoder_2")
    got = sfu.convert_open_clip_checkpoint(model, ckpt, prefix="conditioner.embedders.1.model.")
    assert_same_state(got, want_g, path.name + " text_encoder_2")
    written.append(path.name)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=FIXTURES / "single_file")
    args = parser.parse_args()
    torch.set_num_threads(1)
    written = write_flux(args.out) + write_sd3(args.out) + write_unet(args.out)
    for name in written:
        print(f"wrote {args.out / name} ({(args.out / name).stat().st_size} bytes)")


if __name__ == "__main__":
    main()
