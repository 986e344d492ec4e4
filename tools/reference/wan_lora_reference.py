#!/usr/bin/env python3
"""Wan LoRA fixtures: tiny Wan transformers, tiny LoRA files in each Wan key layout, and the
weights diffusers fuses from them.

Builds two tiny random `WanTransformer3DModel`s in the real folder layout (T2V, and I2V with the
image k/v projections and image embedder), draws one random LoRA per linear layer, writes it in
the layouts Wan LoRAs come in, and records the transformer weights after diffusers'
`WanPipeline.load_lora_weights` + `fuse_lora` + `unload_lora_weights`:

- `wan_peft`: diffusers / PEFT names (`transformer.blocks.0.attn1.to_q.lora_A.weight`).
- `wan_comfy`: original Wan names as ComfyUI writes them (`diffusion_model.blocks.0.self_attn.q.
  lora_A.weight`), including the embedders (`time_embedding.0`, `text_embedding.2`,
  `time_projection.1`) and `head.head`.
- `wan_causvid`: the layout of Kijai's CausVid LoRA: `lora_down` / `lora_up`, bias deltas
  `.diff_b` on every linear, and full-weight `.diff` / `.diff_b` on the norms and modulation
  tables, zero here (diffusers drops norm diffs as "zeroed values" and ignores the rest, so it
  cannot judge nonzero ones; veto adds them, as ComfyUI does — tested in Rust on its own).
- `wan_kohya`: musubi-tuner / kohya (`lora_unet_blocks_0_self_attn_q.lora_down.weight`, `.alpha`).
- `wan_i2v_comfy` (I2V model): original names with `.alpha`, `cross_attn.k_img` / `v_img`,
  `img_emb.proj.1` / `.3`, and `.diff_b` on the image projections.

The script checks that diffusers' fused weights equal W + s·(alpha/rank)·B·A (+ s·diff_b on the
bias) computed here, so the recorded semantics are diffusers' and this script's alike.

Run: /work/venv/ref/bin/python tools/reference/wan_lora_reference.py
Writes tests/fixtures/wan_lora/.
"""

from __future__ import annotations

import json
import math
import shutil
import struct
from pathlib import Path

import torch
from diffusers import WanPipeline, WanTransformer3DModel

REPO_ROOT = Path(__file__).resolve().parents[2]
OUT = REPO_ROOT / "tests" / "fixtures" / "wan_lora"
torch.set_grad_enabled(False)

COMMON = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=8,
    in_channels=4,
    out_channels=4,
    text_dim=12,
    freq_dim=8,
    ffn_dim=24,
    num_layers=2,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=32,
)
MODELS = {
    "t2v": dict(COMMON, image_dim=None, added_kv_proj_dim=None),
    "i2v": dict(COMMON, image_dim=10, added_kv_proj_dim=16),
}
PIPELINES = {"t2v": "WanPipeline", "i2v": "WanImageToVideoPipeline"}


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


def build_model(kind: str, seed: int) -> WanTransformer3DModel:
    """A tiny Wan transformer with every parameter random (norm weights and biases included)."""
    torch.manual_seed(seed)
    model = WanTransformer3DModel(**MODELS[kind]).eval()
    gen = torch.Generator().manual_seed(seed)
    for _, p in sorted(model.named_parameters()):
        p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    folder = OUT / kind
    if folder.exists():
        shutil.rmtree(folder)
    model.save_pretrained(folder / "transformer", safe_serialization=True)
    index = {"_class_name": PIPELINES[kind], "_diffusers_version": "0.42.1", "transformer": ["diffusers", "WanTransformer3DModel"]}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return model


def original_names(model: WanTransformer3DModel) -> dict[str, str]:
    """Original Wan module name -> diffusers module name, for every linear layer of `model`."""
    names = {}
    for i in range(len(model.blocks)):
        for o, d in zip("qkvo", ["to_q", "to_k", "to_v", "to_out.0"]):
            names[f"blocks.{i}.self_attn.{o}"] = f"blocks.{i}.attn1.{d}"
            names[f"blocks.{i}.cross_attn.{o}"] = f"blocks.{i}.attn2.{d}"
        if model.config.added_kv_proj_dim is not None:
            names[f"blocks.{i}.cross_attn.k_img"] = f"blocks.{i}.attn2.add_k_proj"
            names[f"blocks.{i}.cross_attn.v_img"] = f"blocks.{i}.attn2.add_v_proj"
        names[f"blocks.{i}.ffn.0"] = f"blocks.{i}.ffn.net.0.proj"
        names[f"blocks.{i}.ffn.2"] = f"blocks.{i}.ffn.net.2"
    names.update(
        {
            "time_embedding.0": "condition_embedder.time_embedder.linear_1",
            "time_embedding.2": "condition_embedder.time_embedder.linear_2",
            "text_embedding.0": "condition_embedder.text_embedder.linear_1",
            "text_embedding.2": "condition_embedder.text_embedder.linear_2",
            "time_projection.1": "condition_embedder.time_proj",
            "head.head": "proj_out",
        }
    )
    if model.config.image_dim is not None:
        names["img_emb.proj.1"] = "condition_embedder.image_embedder.ff.net.0.proj"
        names["img_emb.proj.3"] = "condition_embedder.image_embedder.ff.net.2"
    return names


def draw_lora(model, names, seed: int, bias: bool):
    """{original name: (A, B, diff_b or None)}; ranks 4 and 2 alternate."""
    gen = torch.Generator().manual_seed(seed)
    modules = dict(model.named_modules())
    lora = {}
    for k, (orig, diff) in enumerate(sorted(names.items())):
        lin = modules[diff]
        rank = 4 if k % 2 == 0 else 2
        a = torch.randn(rank, lin.in_features, generator=gen) / math.sqrt(lin.in_features)
        b = torch.randn(lin.out_features, rank, generator=gen) * 0.3 / math.sqrt(rank)
        db = torch.randn(lin.out_features, generator=gen) * 0.1 if bias else None
        lora[orig] = (a, b, db)
    return lora


def expected_weights(model, names, lora, scale: float, alphas: dict[str, float]) -> dict[str, torch.Tensor]:
    """W + scale·(alpha/rank)·B·A, bias + scale·diff_b, by diffusers name."""
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    for orig, (a, b, db) in lora.items():
        d = names[orig]
        factor = alphas.get(orig, a.shape[0]) / a.shape[0]
        sd[f"{d}.weight"] += scale * factor * (b @ a)
        if db is not None:
            sd[f"{d}.bias"] += scale * db
    return sd


def zero_diffs(model, kind: str) -> dict[str, torch.Tensor]:
    """Zero full-weight diffs on norms and modulation tables, in CausVid's original names."""
    out = {}
    for i, block in enumerate(model.blocks):
        d = block.attn1.norm_q.weight.shape
        for n in ["self_attn.norm_q", "self_attn.norm_k", "cross_attn.norm_q", "cross_attn.norm_k"]:
            out[f"diffusion_model.blocks.{i}.{n}.diff"] = torch.zeros(d)
        out[f"diffusion_model.blocks.{i}.norm3.diff"] = torch.zeros(block.norm2.weight.shape)
        out[f"diffusion_model.blocks.{i}.norm3.diff_b"] = torch.zeros(block.norm2.bias.shape)
        out[f"diffusion_model.blocks.{i}.modulation.diff"] = torch.zeros(block.scale_shift_table.shape)
    out["diffusion_model.head.modulation.diff"] = torch.zeros(model.scale_shift_table.shape)
    return out


def write_layouts(kind: str, model, names, lora, alphas):
    files = {}
    if kind == "t2v":
        peft = {}
        for orig, (a, b, _) in lora.items():
            peft[f"transformer.{names[orig]}.lora_A.weight"] = a
            peft[f"transformer.{names[orig]}.lora_B.weight"] = b
        files["wan_peft"] = peft
        comfy = {}
        for orig, (a, b, _) in lora.items():
            comfy[f"diffusion_model.{orig}.lora_A.weight"] = a
            comfy[f"diffusion_model.{orig}.lora_B.weight"] = b
        files["wan_comfy"] = comfy
        kohya = {}
        for orig, (a, b, _) in lora.items():
            if not orig.startswith("blocks."):
                continue  # musubi LoRAs hold the blocks only (diffusers' converter reads nothing else)
            flat = "lora_unet_" + orig.replace(".", "_")
            kohya[f"{flat}.lora_down.weight"] = a
            # alpha: stored as trained; B scaled so that the merged delta is B·A.
            kohya[f"{flat}.lora_up.weight"] = b * a.shape[0] / alphas[orig]
            kohya[f"{flat}.alpha"] = torch.tensor(alphas[orig])
        files["wan_kohya"] = kohya
    else:
        i2v = {}
        for orig, (a, b, db) in lora.items():
            key = f"diffusion_model.{orig}"
            i2v[f"{key}.lora_down.weight"] = a
            if orig.startswith("blocks."):
                i2v[f"{key}.lora_up.weight"] = b * a.shape[0] / alphas[orig]
                i2v[f"{key}.alpha"] = torch.tensor(alphas[orig])
            else:
                i2v[f"{key}.lora_up.weight"] = b
            if db is not None:
                i2v[f"{key}.diff_b"] = db
        files["wan_i2v_comfy"] = i2v
    return files


def causvid_layout(model, lora_b) -> dict[str, torch.Tensor]:
    out = {}
    for orig, (a, b, db) in lora_b.items():
        key = f"diffusion_model.{orig}"
        out[f"{key}.lora_down.weight"] = a
        out[f"{key}.lora_up.weight"] = b
        out[f"{key}.diff_b"] = db
    out.update(zero_diffs(model, "t2v"))
    return out


def fuse(kind: str, loras: list[tuple[Path, float]]) -> dict[str, torch.Tensor]:
    """diffusers' fused transformer weights after loading `loras` one after another."""
    transformer = WanTransformer3DModel.from_pretrained(OUT / kind / "transformer").eval()
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=None, transformer=transformer)
    for k, (path, scale) in enumerate(loras):
        pipe.load_lora_weights(str(path), adapter_name=f"l{k}")
        pipe.fuse_lora(lora_scale=scale, components=["transformer"], adapter_names=[f"l{k}"])
        pipe.unload_lora_weights()
    return {k: v.detach().clone() for k, v in pipe.transformer.state_dict().items()}


def max_err(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), set(a) ^ set(b)
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    summary = []
    cases = []
    for kind, seed in [("t2v", 0), ("i2v", 1)]:
        model = build_model(kind, seed)
        names = original_names(model)
        lora = draw_lora(model, names, seed + 10, bias=(kind == "i2v"))
        if kind == "i2v":
            # Bias deltas on the image projections only; alphas on every block module.
            lora = {o: (a, b, db if ("_img" in o or "img_emb" in o) else None) for o, (a, b, db) in lora.items()}
        alphas = {o: float(1 + (k % 3)) for k, o in enumerate(sorted(lora)) if o.startswith("blocks.")}
        for name, tensors in write_layouts(kind, model, names, lora, alphas).items():
            write_safetensors(OUT / f"{name}.safetensors", tensors)
        if kind == "t2v":
            causvid = draw_lora(model, names, seed + 20, bias=True)
            write_safetensors(OUT / "wan_causvid.safetensors", causvid_layout(model, causvid))
            base_alphas = {}  # the PEFT / ComfyUI files carry no alpha: alpha = rank
            kohya_lora = {o: v for o, v in lora.items() if o.startswith("blocks.")}
            cases += [
                ("t2v_peft", kind, [("wan_peft", 1.0)], expected_weights(model, names, lora, 1.0, base_alphas)),
                ("t2v_comfy_half", kind, [("wan_comfy", 0.5)], expected_weights(model, names, lora, 0.5, base_alphas)),
                # alpha/rank is undone by B's scaling in the file, so the merged delta is B·A again.
                ("t2v_kohya", kind, [("wan_kohya", 1.0)], expected_weights(model, names, kohya_lora, 1.0, {})),
                ("t2v_causvid", kind, [("wan_causvid", 0.7)], expected_weights(model, names, causvid, 0.7, {})),
            ]
            stacked = expected_weights(model, names, causvid, 0.5, {})
            for orig, (a, b, _) in lora.items():
                stacked[f"{names[orig]}.weight"] += 0.8 * (b @ a)
            cases.append(("t2v_stack", kind, [("wan_causvid", 0.5), ("wan_peft", 0.8)], stacked))
        else:
            cases.append(("i2v_comfy", kind, [("wan_i2v_comfy", 1.0)], expected_weights(model, names, lora, 1.0, {})))

    for case, kind, loras, ours in cases:
        fused = fuse(kind, [(OUT / f"{n}.safetensors", s) for n, s in loras])
        err = max_err(fused, ours)
        base = WanTransformer3DModel.from_pretrained(OUT / kind / "transformer").state_dict()
        moved = sum(int(not torch.equal(fused[k], base[k])) for k in fused)
        assert err < 1e-5, f"{case}: diffusers' fused weights differ from W + s·B·A by {err}"
        meta = {"model": kind, "loras": json.dumps([[n, s] for n, s in loras])}
        write_safetensors(OUT / f"expected_{case}.safetensors", fused, meta)
        summary.append(f"{case}: {loras} -> {moved} of {len(fused)} tensors changed, |diffusers - ours| {err:.1e}")
    print("\n".join(summary))


if __name__ == "__main__":
    main()
