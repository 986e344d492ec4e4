#!/usr/bin/env python3
"""Tiny GGUF fixtures for veto's quantized loading.

Reads the tiny diffusers fixtures (the Flux schnell transformer, the SD3.5 medium and large
transformers, the SDXL UNet) and writes each as GGUF files, with the PyPI `gguf` package, at
F16, Q8_0, Q5_K and Q4_K — the types city96 publishes — into `tests/fixtures/gguf/`.

Which tensor gets which type follows city96's converter (ComfyUI-GGUF tools/convert.py) and the
llama.cpp quantizer it hands the F16 file to:
  - 1-D tensors and tensors of at most 1024 values stay F32;
  - other tensors get the file's type when their rows (last dimension) are whole blocks of it;
  - k-quants (blocks of 256) on rows that are not: llama.cpp's fallback, Q4_K -> Q5_0 and
    Q5_K -> Q5_1 (blocks of 32);
  - anything still not whole blocks (3x3 / 1x1 convolution kernels, odd widths): F16.
The tiny models are 32 to 64 wide, so most of their matrices take the fallback in the K files;
the 256-wide ones (timestep embedders) are real Q4_K / Q5_K blocks. The tiny SDXL UNet has no
256-wide row, so it gets F16 and Q8_0 files only.

Tensor names are diffusers' (a legitimate GGUF layout: the names the model has in diffusers).

gguf-py quantizes Q8_0/Q5_0/Q5_1 itself but not the k-quants; those are made by the small
quantizer below (per-32 scale and minimum, 6-bit sub-scales), and checked against gguf-py's own
Q4_K/Q5_K dequantizer before anything is written.

Original key layout (city96's real files): the tiny Flux schnell transformer is also written in
Black Forest Labs' layout (`double_blocks.N.img_attn.qkv`, `single_blocks.N.linear1`, the final
modulation's halves swapped), by the inverse map of `single_file_reference.py`, at Q8_0 (no
prefix) and F16 (under `model.diffusion_model.`), each tensor's type chosen on the ORIGINAL
(fused) tensor as city96 does. With it goes `flux_schnell_bfl_Q8_0_same_blocks.gguf`: the same
blocks under diffusers names, each diffusers tensor the rows of the original tensor it came
from (found by running the inverse map on row ids), asserted equal to quantizing that tensor on
its own (ggml quantizes each row by itself). veto must load both to the same model.
The tiny SD3.5 Medium transformer is written in Stability's MMDiT layout at Q8_0 with each
original tensor given the type its diffusers parts have in `sd35_medium_Q8_0.gguf` (its fused
tensors' parts all agree), so that file holds exactly the same blocks under diffusers names.

The script also writes a "foreign" and a "truncated" file for the error tests, and prints, for
each file, its size against the f32 weights and the largest weight error per type.

    /work/venv/ref/bin/python tools/reference/gguf_reference.py
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors.numpy import load_file

from single_file_reference import flux_to_bfl, sd3_to_original

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"
OUT = FIXTURES / "gguf"

QK_K = 256
T = gguf.GGMLQuantizationType
FILE_TYPES = {"F16": T.F16, "Q8_0": T.Q8_0, "Q5_K": T.Q5_K, "Q4_K": T.Q4_K}
K_FALLBACK = {T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1}

# (name, component folder, weights stem, general.architecture)
MODELS = [
    ("flux_schnell", FIXTURES / "flux" / "schnell" / "transformer", "flux"),
    ("sd35_medium", FIXTURES / "sd3" / "medium" / "transformer", "sd3"),
    ("sdxl", FIXTURES / "unet" / "sdxl" / "unet", "sdxl"),
]


def load_component(folder: Path) -> dict[str, np.ndarray]:
    single = folder / "diffusion_pytorch_model.safetensors"
    if single.is_file():
        return load_file(single)
    index = json.loads((folder / "diffusion_pytorch_model.safetensors.index.json").read_text())
    tensors: dict[str, np.ndarray] = {}
    for shard in sorted(set(index["weight_map"].values())):
        tensors.update(load_file(folder / shard))
    return tensors


def tensor_type(name: str, data: np.ndarray, file_type: T) -> T:
    """city96 + llama.cpp's choice for one tensor (see the module docstring)."""
    if data.ndim == 1 or data.size <= 1024:
        return T.F32
    if file_type == T.F16:
        return T.F16
    rows = data.shape[-1]
    block = gguf.GGML_QUANT_SIZES[file_type][0]
    if rows % block == 0:
        return file_type
    fallback = K_FALLBACK.get(file_type)
    if fallback is not None and rows % gguf.GGML_QUANT_SIZES[fallback][0] == 0:
        return fallback
    return T.F16


# --- k-quants ---------------------------------------------------------------------------------


def pack_scales(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """8 six-bit scales and mins per block -> the 12 bytes ggml stores (Q4_K and Q5_K)."""
    sc = sc.astype(np.uint8)
    mn = mn.astype(np.uint8)
    d = (sc[:, :4] & 0x3F) | ((sc[:, 4:] >> 4) << 6)
    m = (mn[:, :4] & 0x3F) | ((mn[:, 4:] >> 4) << 6)
    md = (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)
    return np.concatenate([d, m, md], axis=1).astype(np.uint8)


def quantize_k(data: np.ndarray, bits: int) -> np.ndarray:
    """Q4_K (bits=4) or Q5_K (bits=5) blocks of `data` (rows a multiple of 256 wide)."""
    x = data.astype(np.float32).reshape(-1, 8, 32)  # blocks x sub-blocks x values
    levels = (1 << bits) - 1
    lo = np.minimum(x.min(axis=2), 0.0)
    hi = x.max(axis=2)
    scale = (hi - lo) / levels  # per sub-block step
    minimum = -lo  # >= 0, subtracted on dequantization
    d = scale.max(axis=1) / 63.0
    dmin = minimum.max(axis=1) / 63.0
    d16 = d.astype(np.float16)
    dmin16 = dmin.astype(np.float16)
    d_eff = d16.astype(np.float32)[:, None]
    dmin_eff = dmin16.astype(np.float32)[:, None]
    sc = np.where(d_eff > 0, np.rint(scale / np.where(d_eff > 0, d_eff, 1)), 0).clip(0, 63)
    mn = np.where(dmin_eff > 0, np.rint(minimum / np.where(dmin_eff > 0, dmin_eff, 1)), 0).clip(0, 63)
    step = (d_eff * sc)[:, :, None]
    offset = (dmin_eff * mn)[:, :, None]
    q = np.where(step > 0, np.rint((x + offset) / np.where(step > 0, step, 1)), 0).clip(0, levels).astype(np.uint8)
    n = x.shape[0]
    head = np.concatenate([d16.view(np.uint8).reshape(n, 2), dmin16.view(np.uint8).reshape(n, 2), pack_scales(sc, mn)], 1)
    # 4-bit parts: sub-blocks 2g and 2g+1 share 32 bytes (low, high nibble).
    low = q & 0x0F
    qs = (low[:, 0::2, :] | (low[:, 1::2, :] << 4)).reshape(n, 128)
    if bits == 4:
        return np.concatenate([head, qs], axis=1)
    # 5th bits: bit j of byte i is value i of sub-block j.
    high = (q >> 4) & 1
    qh = np.zeros((n, 32), dtype=np.uint8)
    for j in range(8):
        qh |= (high[:, j, :] << j).astype(np.uint8)
    return np.concatenate([head, qh, qs], axis=1)


def quantize(data: np.ndarray, qtype: T) -> np.ndarray:
    if qtype in (T.Q4_K, T.Q5_K):
        blocks = quantize_k(data.reshape(-1, QK_K), 4 if qtype == T.Q4_K else 5)
        out = blocks.reshape(*data.shape[:-1], data.shape[-1] // QK_K * blocks.shape[-1])
        # gguf-py's dequantizer is the independent check of the block layout.
        back = gguf.quants.dequantize(out, qtype)
        err = np.abs(back - data).max() / max(np.abs(data).max(), 1e-12)
        assert err < (0.08 if qtype == T.Q4_K else 0.04), f"{qtype.name} round trip error {err}"
        return out
    return gguf.quants.quantize(data.astype(np.float32), qtype)


# --- files ------------------------------------------------------------------------------------


def write_gguf(path: Path, arch: str, tensors: dict[str, np.ndarray], file_type: T) -> dict[str, float]:
    writer = gguf.GGUFWriter(path=None, arch=arch)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    errors: dict[str, float] = {}
    for name in sorted(tensors):
        data = tensors[name].astype(np.float32)
        qtype = tensor_type(name, data, file_type)
        q = quantize(data, qtype)
        back = gguf.quants.dequantize(q, qtype).reshape(data.shape)
        rel = float(np.abs(back - data).max() / max(np.abs(data).max(), 1e-12))
        errors[qtype.name] = max(errors.get(qtype.name, 0.0), rel)
        writer.add_tensor(name, q, raw_dtype=qtype)
    writer.write_header_to_file(path=path)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return errors


# --- original key layouts ---------------------------------------------------------------------


def original_row_sources(tensors: dict[str, np.ndarray], to_original) -> dict[str, tuple[str, np.ndarray]]:
    """For each diffusers tensor, the original tensor holding it and the rows it occupies there:
    the inverse map run on tensors of row ids."""
    ids, owner, start = {}, {}, 0
    for name in sorted(tensors):
        n = tensors[name].shape[0]
        ids[name] = torch.arange(start, start + n)
        start += n
    where: dict[int, tuple[str, int]] = {}
    for orig, rows in to_original(ids).items():
        for pos, i in enumerate(rows.tolist()):
            where[i] = (orig, pos)
    for name, rows in ids.items():
        found = [where[i] for i in rows.tolist()]
        origs = {o for o, _ in found}
        assert len(origs) == 1, f"{name} spans {origs}"
        owner[name] = (origs.pop(), np.array([p for _, p in found]))
    return owner


def write_original_layout(name: str, tensors: dict[str, np.ndarray], to_original, arch: str, file_type: T,
                          prefix: str, same_blocks: str | None) -> None:
    """`tensors` in their original layout at `file_type`. Types are chosen on the original tensors
    (city96), or with `same_blocks="diffusers-named"` on their diffusers parts (all parts of a
    fused tensor must agree), which makes the blocks exactly those of the diffusers-named file.
    `same_blocks="write"` writes the same blocks under diffusers names next to it."""
    original = {k: v.numpy() for k, v in to_original({k: torch.from_numpy(v) for k, v in tensors.items()}).items()}
    sources = original_row_sources(tensors, to_original)
    blocks = {}
    for orig, data in original.items():
        qtype = tensor_type(orig, data, file_type)
        if same_blocks == "diffusers-named":
            types = {tensor_type(d, tensors[d], file_type) for d, (o, _) in sources.items() if o == orig}
            assert len(types) == 1, f"{orig}: its parts have types {types}"
            qtype = types.pop()
        blocks[orig] = (quantize(data.astype(np.float32), qtype), qtype)
    path = OUT / f"{name}_{file_type.name}.gguf"
    write_blocks(path, arch, {prefix + k: v for k, v in blocks.items()})
    print(f"{path.name}: {path.stat().st_size} bytes, original layout, prefix {prefix!r}")
    if same_blocks is None:
        return
    diffusers = {}
    for dname, (orig, rows) in sources.items():
        q, qtype = blocks[orig]
        part = q[rows]
        assert np.array_equal(part, quantize(tensors[dname].astype(np.float32), qtype)), f"{dname}: rows differ"
        diffusers[dname] = (part, qtype)
    if same_blocks == "diffusers-named":
        print(f"  its blocks are those of the diffusers-named {file_type.name} file")
        return
    path = OUT / f"{name}_{file_type.name}_same_blocks.gguf"
    write_blocks(path, arch, diffusers)
    print(f"{path.name}: {path.stat().st_size} bytes, the same blocks under diffusers names")


def write_blocks(path: Path, arch: str, blocks: dict[str, tuple[np.ndarray, T]]) -> None:
    writer = gguf.GGUFWriter(path=None, arch=arch)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for name in sorted(blocks):
        q, qtype = blocks[name]
        writer.add_tensor(name, q, raw_dtype=qtype)
    writer.write_header_to_file(path=path)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for name, folder, arch in MODELS:
        tensors = load_component(folder)
        f32_bytes = sum(t.size * 4 for t in tensors.values())
        for type_name, file_type in FILE_TYPES.items():
            if arch == "sdxl" and file_type in K_FALLBACK:
                continue  # no SDXL row is 256-wide in the tiny UNet: its K files would hold no k-quant
            path = OUT / f"{name}_{type_name}.gguf"
            errors = write_gguf(path, arch, tensors, file_type)
            size = path.stat().st_size
            print(f"{path.name}: {size} bytes ({size / f32_bytes:.2f} of f32), max weight error {errors}")

    flux = load_component(FIXTURES / "flux" / "schnell" / "transformer")
    write_original_layout("flux_schnell_bfl", flux, flux_to_bfl, "flux", T.Q8_0, "", "write")
    write_original_layout("flux_schnell_bfl", flux, flux_to_bfl, "flux", T.F16, "model.diffusion_model.", None)
    sd35 = load_component(FIXTURES / "sd3" / "medium" / "transformer")
    write_original_layout("sd35_medium_mmdit", sd35, sd3_to_original, "sd3", T.Q8_0, "", "diffusers-named")

    # Error cases: a file cut inside its tensor data, and a file that is not GGUF at all.
    full = (OUT / "flux_schnell_Q8_0.gguf").read_bytes()
    (OUT / "truncated.gguf").write_bytes(full[: len(full) - 1000])
    (OUT / "foreign.gguf").write_bytes(b'{"not": "a gguf file"}' + bytes(64))
    print("wrote", OUT)


if __name__ == "__main__":
    main()
