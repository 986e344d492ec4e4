#!/usr/bin/env python3
"""Golden fixtures for veto's Flux + NAG implementation.

Builds two tiny random Flux pipelines (schnell-like and dev-like) in the exact folder layout of the
real Hugging Face repos, a reference Flux transformer forward with the guidance methods veto
implements (none, NAG with L1 or L2 norm, NASA, true CFG, CFG+NAG, the NAG step window), a
reference text -> latents -> image pipeline, and writes small f32 safetensors fixtures that the
Rust tests compare against.

Everything runs on the CPU in f32 with fixed seeds; running the script twice writes identical
files. Developers run it; CI never does:

    /work/venv/ref/bin/python tools/reference/flux_reference.py

See tools/reference/README.md and tests/fixtures/flux/README.md.
"""

from __future__ import annotations

import argparse
import os
import copy
import io
import json
import math
import shutil
import struct
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # before transformers is imported: quiet import-time notices

import diffusers
import numpy as np
import regex
import sentencepiece as spm
import torch
import torch.nn.functional as F
import transformers
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from safetensors.torch import load_file, save_file
from sentencepiece import sentencepiece_model_pb2 as sp_pb2
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = REPO_ROOT / "tests" / "fixtures" / "flux"

PROMPT = "a photo of a cat wearing glasses"
NEGATIVE_PROMPT = "glasses, blurry"
HEIGHT = WIDTH = 64  # 8x8 latents -> 4x4 = 16 packed image tokens
MAX_SEQUENCE_LENGTH = 16  # T5 tokens
CLIP_MAX_LENGTH = 77
STEPS = 4
DEV_GUIDANCE_SCALE = 3.5
TRANSFORMER_TIMESTEP = 0.75  # as passed to the transformer (sigma, 0..1)

# The transformer weights are saved in shards this small so that both tiny models have several
# shards plus an index, as the real checkpoints do.
TRANSFORMER_SHARD_SIZE = "200KB"


# --------------------------------------------------------------------------------------------
# Deterministic safetensors writer.
#
# safetensors.torch.save_file serialises `__metadata__` from a Rust HashMap, so the key order (and
# hence the file bytes) changes from run to run. Fixtures must be byte-identical across runs, so we
# write the (simple) format ourselves: u64 LE header size, JSON header, raw little-endian data.
# --------------------------------------------------------------------------------------------

_ST_DTYPES = {torch.float32: "F32", torch.int64: "I64"}


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    header: dict = {"__metadata__": {k: str(metadata[k]) for k in sorted(metadata)}}
    blobs = []
    offset = 0
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        if t.dtype not in _ST_DTYPES:
            raise TypeError(f"{name}: unsupported dtype {t.dtype}")
        data = t.numpy().tobytes()  # native order; main() checks the machine is little-endian
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # keep the data 8-byte aligned, as the reference writer does
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for b in blobs:
            f.write(b)


# --------------------------------------------------------------------------------------------
# A small English corpus, written for this script, to learn the two toy tokenizers from.
# It repeats the words of the test prompts so that they become multi-character tokens.
# --------------------------------------------------------------------------------------------

CORPUS = """
a photo of a cat wearing glasses
a photo of a dog wearing a red hat
a cat sitting on a wooden chair near the window
a close up photo of an orange cat with green eyes
a black and white photo of a small cat sleeping in the sun
a cute dog playing with a ball in the garden
a portrait of a woman wearing round glasses and a blue scarf
a portrait of an old man with a long white beard
a painting of a mountain lake at sunrise, soft light
a watercolor painting of a city street in the rain
a blurry photo of a train station at night
glasses, blurry, low resolution, bad quality
low resolution, blurry, noisy, jpeg artifacts
a sharp detailed photo of a bird sitting on a branch
a red car parked in front of a yellow house
a bowl of fresh fruit on a kitchen table
a cat wearing sunglasses on the beach
a dog wearing glasses reading a book
two cats playing with a ball of yarn
the cat is sleeping on the sofa and the dog is sleeping on the floor
a photograph of a forest in autumn with orange and red leaves
an astronaut riding a horse on the moon
a robot cooking breakfast in a modern kitchen
a castle on a hill under a starry night sky
a cup of coffee on a wooden table in the morning light
a lighthouse on a rocky coast during a storm
a field of sunflowers under a clear blue sky
a small boat on a calm lake at sunset
a snowy mountain village with warm lights in the windows
a street market full of people and colorful fruit
a photo of a cat wearing a tiny crown
a photo of a puppy wearing glasses and a bow tie
a studio photo of a teapot, sharp focus, high quality
a drawing of a fox in the snow, pencil sketch
a photo of a city at night, long exposure, blurry lights
a happy child holding a balloon in the park
an oil painting of flowers in a glass vase
a cat looking out of the window at the rain
a dog running along the beach with the waves behind it
the glasses are on the table next to the book
she is wearing glasses and a green coat
he is wearing a hat and a warm jacket in the snow
a photo of three cats and two dogs on a green lawn
a photo of a tiger walking through tall grass
a realistic photo of a cyborg, metal and wires
a photo of a robot, metallic texture, studio light
a cartoon of a cat wearing a space helmet
a blurry photo, out of focus, low contrast
a bright photo, high resolution, sharp details, good quality
a bicycle leaning against a brick wall in an old town
a plate of pasta with tomato sauce and basil leaves
a jellyfish glowing in the deep blue ocean
a poster of a rocket launching into space, vintage style
a cozy library with tall shelves and a reading lamp
a penguin standing on the ice with its family
a macro photo of a butterfly on a purple flower
a desert road stretching to the horizon under a pink sky
an elephant walking slowly across the dry savanna
a bakery window full of bread, cakes and cookies
a knight in shining armor holding a sword and a shield
a waterfall in a tropical jungle, mist and green ferns
a skyscraper made of glass reflecting the clouds
a farmer driving a tractor through a wheat field
a jazz band playing music in a dark smoky club
a children's book illustration of a bear having a picnic
a minimalist logo of a mountain, flat design, vector art
a sculpture of a horse carved from white marble
a neon sign glowing above a busy street at midnight
a frog sitting on a lily pad in a quiet pond
a pair of running shoes on a wooden floor, product photo
a medieval map with dragons drawn at the edges
a hot air balloon floating over green hills at dawn
a kitten hiding inside a cardboard box
an owl perched on a branch under the full moon
a bowl of ramen with an egg, steam rising, food photography
a girl reading under an umbrella while it rains
a fisherman pulling a net onto his boat at sea
a vintage typewriter on a desk with scattered papers
a garden gnome standing among tulips and daisies
"""


def corpus_lines() -> list[str]:
    return [line.strip() for line in CORPUS.strip().splitlines() if line.strip()]


# --------------------------------------------------------------------------------------------
# CLIP tokenizer (byte-level BPE in the CLIP format: vocab.json + merges.txt, no tokenizer.json).
#
# Vocabulary layout as in openai/clip-vit-large-patch14: the 256 byte symbols, the same 256 with the
# end-of-word suffix "</w>", one entry per merge, then <|startoftext|> and <|endoftext|> as the last
# two ids (so EOS has the largest id; CLIPTextModel pools at argmax(input_ids)).
# --------------------------------------------------------------------------------------------

CLIP_NUM_MERGES = 400
CLIP_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)
CLIP_BOS = "<|startoftext|>"
CLIP_EOS = "<|endoftext|>"


def byte_symbols() -> list[tuple[int, str]]:
    """(byte, printable symbol) pairs in GPT-2/CLIP order: printable bytes map to themselves,
    the others to code points from 256 on, in byte order."""
    keep = set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1)) | set(range(ord("®"), ord("ÿ") + 1))
    printable = [(b, chr(b)) for b in range(256) if b in keep]
    others = [(b, chr(256 + i)) for i, b in enumerate(b for b in range(256) if b not in keep)]
    return printable + others


BYTE_TO_SYMBOL = dict(byte_symbols())


def clip_pretokenize(text: str) -> list[str]:
    """CLIP's text cleaning (collapse whitespace, lowercase) and regex split, each piece mapped to
    byte symbols."""
    text = " ".join(text.split()).lower()
    return ["".join(BYTE_TO_SYMBOL[b] for b in piece.encode("utf-8")) for piece in CLIP_PATTERN.findall(text)]


def clip_word(piece: str) -> tuple[str, ...]:
    """A pre-token as BPE symbols: one per character, the last one carrying "</w>"."""
    return tuple(piece[:-1]) + (piece[-1] + "</w>",)


def merge_word(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(word[i] + word[i + 1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def learn_clip_bpe(lines: list[str], num_merges: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Plain BPE counting: repeatedly merge the most frequent adjacent pair (ties broken by the pair
    itself, for determinism). A pair whose merged string is already a symbol is skipped, so every
    merge adds exactly one new vocabulary entry and ids stay contiguous."""
    words: dict[tuple[str, ...], int] = {}
    for line in lines:
        for piece in clip_pretokenize(line):
            w = clip_word(piece)
            words[w] = words.get(w, 0) + 1

    base = [s for _, s in byte_symbols()]
    vocab_list = base + [s + "</w>" for s in base]
    known = set(vocab_list)
    merges: list[tuple[str, str]] = []
    while len(merges) < num_merges:
        counts: dict[tuple[str, str], int] = {}
        for w, n in words.items():
            for pair in zip(w, w[1:]):
                counts[pair] = counts.get(pair, 0) + n
        candidates = [(n, p) for p, n in counts.items() if p[0] + p[1] not in known]
        if not candidates:
            break
        best_n = max(n for n, _ in candidates)
        best = min(p for n, p in candidates if n == best_n)
        merges.append(best)
        known.add(best[0] + best[1])
        vocab_list.append(best[0] + best[1])
        words = {merge_word(w, best): n for w, n in words.items()}
    vocab_list += [CLIP_BOS, CLIP_EOS]
    return {tok: i for i, tok in enumerate(vocab_list)}, merges


def clip_encode_reference(text: str, vocab: dict[str, int], merges: list[tuple[str, str]]) -> list[int]:
    """The original CLIP BPE encoder (lowest-rank pair first), written independently of the
    `tokenizers` library, to cross-check what transformers' CLIPTokenizer produces. Returns
    [BOS] + tokens + [EOS], truncated to 77 and padded with EOS (the Flux pad token)."""
    ranks = {p: i for i, p in enumerate(merges)}
    ids = []
    for piece in clip_pretokenize(text):
        word = clip_word(piece)
        while len(word) > 1:
            pairs = [p for p in zip(word, word[1:]) if p in ranks]
            if not pairs:
                break
            word = merge_word(word, min(pairs, key=ranks.__getitem__))
        ids += [vocab[s] for s in word]
    ids = [vocab[CLIP_BOS]] + ids[: CLIP_MAX_LENGTH - 2] + [vocab[CLIP_EOS]]
    return ids + [vocab[CLIP_EOS]] * (CLIP_MAX_LENGTH - len(ids))


def write_clip_tokenizer(folder: Path, vocab: dict[str, int], merges: list[tuple[str, str]]) -> None:
    """The four files of FLUX.1-*/tokenizer: vocab.json, merges.txt, tokenizer_config.json,
    special_tokens_map.json (no tokenizer.json)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, separators=(",", ":")), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")

    def special(content: str, normalized: bool) -> dict:
        return {"content": content, "lstrip": False, "normalized": normalized, "rstrip": False, "single_word": False}

    bos_id, eos_id = vocab[CLIP_BOS], vocab[CLIP_EOS]
    config = {
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(bos_id): {**special(CLIP_BOS, True), "special": True},
            str(eos_id): {**special(CLIP_EOS, False), "special": True},
        },
        "bos_token": CLIP_BOS,
        "clean_up_tokenization_spaces": True,
        "do_lower_case": True,
        "eos_token": CLIP_EOS,
        "errors": "replace",
        "model_max_length": CLIP_MAX_LENGTH,
        "pad_token": CLIP_EOS,
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": CLIP_EOS,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    specials = {
        "bos_token": special(CLIP_BOS, True),
        "eos_token": special(CLIP_EOS, False),
        "pad_token": CLIP_EOS,
        "unk_token": special(CLIP_EOS, False),
    }
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")


# --------------------------------------------------------------------------------------------
# T5 tokenizer (sentencepiece unigram; spiece.model + tokenizer.json + configs, as FLUX.1-*/tokenizer_2).
# --------------------------------------------------------------------------------------------

T5_VOCAB_SIZE = 400  # requested; the trainer may return fewer pieces for this small corpus


def t5_normalization_rules() -> str:
    """sentencepiece normalisation rules (TSV of hex code points). The real T5 model carries the
    ~240 KB nmt_nfkc table; this small subset (full-width ASCII and the ideographic space to ASCII,
    which NFKC also does) keeps the same machinery (a precompiled charsmap in spiece.model and a
    `Precompiled` normalizer in tokenizer.json) at ~1 KB."""
    rules = [f"{c:X}\t{c - 0xFF01 + 0x21:X}\n" for c in range(0xFF01, 0xFF5F)]
    return "".join(rules) + "3000\t20\n"


def train_t5_spiece(lines: list[str]) -> bytes:
    """A tiny unigram model with T5's special ids: <pad>=0, </s>=1, <unk>=2, no BOS. Single
    thread, no shuffling, seeded and trained from memory: the result is byte-identical across runs."""
    spm.set_random_generator_seed(1234)
    buf = io.BytesIO()
    with tempfile.TemporaryDirectory() as tmp:
        rules = Path(tmp) / "rules.tsv"
        rules.write_text(t5_normalization_rules())
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_writer=buf,
            normalization_rule_tsv=str(rules),
            model_type="unigram",
            vocab_size=T5_VOCAB_SIZE,
            hard_vocab_limit=False,
            character_coverage=1.0,
            pad_id=0,
            eos_id=1,
            unk_id=2,
            bos_id=-1,
            pad_piece="<pad>",
            eos_piece="</s>",
            unk_piece="<unk>",
            num_threads=1,
            shuffle_input_sentence=False,
            minloglevel=2,
        )
    # The trainer records the (temporary) rules path in the model; clear it for reproducibility.
    model = sp_pb2.ModelProto()
    model.ParseFromString(buf.getvalue())
    model.normalizer_spec.normalization_rule_tsv = ""
    return model.SerializeToString()


def write_t5_tokenizer(folder: Path, spiece: bytes) -> None:
    """Converts spiece.model with transformers' T5TokenizerFast and saves tokenizer.json, then writes
    the config files the way the real repo has them."""
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "spiece.model").write_bytes(spiece)
        tok = T5TokenizerFast.from_pretrained(tmp, extra_ids=0, model_max_length=512, legacy=True)
        folder.mkdir(parents=True, exist_ok=True)
        tok.save_pretrained(folder)  # before any call: encoding with padding would leak into tokenizer.json
    (folder / "spiece.model").write_bytes(spiece)
    tj = json.loads((folder / "tokenizer.json").read_text())
    assert tj["padding"] is None and tj["truncation"] is None, "tokenizer.json must not carry padding/truncation"

    def special(content: str) -> dict:
        return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}

    config = {
        "add_prefix_space": True,
        "added_tokens_decoder": {
            "0": {**special("<pad>"), "special": True},
            "1": {**special("</s>"), "special": True},
            "2": {**special("<unk>"), "special": True},
        },
        "additional_special_tokens": [],
        "clean_up_tokenization_spaces": True,
        "eos_token": "</s>",
        "extra_ids": 0,
        "legacy": True,
        "model_max_length": 512,
        "pad_token": "<pad>",
        "sp_model_kwargs": {},
        "tokenizer_class": "T5Tokenizer",
        "unk_token": "<unk>",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    specials = {"eos_token": special("</s>"), "pad_token": special("<pad>"), "unk_token": special("<unk>")}
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")


# --------------------------------------------------------------------------------------------
# Random weights.
#
# Default inits leave too much trivial (unit norm weights, zero biases, small embeddings). Every
# parameter gets a seeded random value instead: matrices/convs N(0, 1/fan_in) so activations stay
# O(1), biases N(0, 0.1^2), 1-D scales (norm weights) 1 + N(0, 0.1^2). That makes every weight the
# Rust side loads matter for the output (a missed bias or norm weight changes the result).
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
        if p.ndim >= 2:
            fan_in = p[0].numel()
            p.copy_(noise / math.sqrt(fan_in))
        elif name.endswith("bias"):
            p.copy_(0.1 * noise)
        else:
            p.copy_(1.0 + 0.1 * noise)


# --------------------------------------------------------------------------------------------
# Building and saving the two pipeline folders.
# --------------------------------------------------------------------------------------------


def transformer_config(guidance_embeds: bool) -> dict:
    return dict(
        patch_size=1,
        in_channels=64,
        out_channels=None,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 6, 6),
    )


def build_vae() -> AutoencoderKL:
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        act_fn="silu",
        latent_channels=16,
        norm_num_groups=8,
        sample_size=HEIGHT,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        latents_mean=None,
        latents_std=None,
        force_upcast=True,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=True,
    )
    randomize_(vae, seed=101)
    with torch.no_grad():
        vae.decoder.conv_out.weight.mul_(0.3)  # keeps the decoded image roughly in [-1, 1], like a real one
    return vae.eval()


def build_clip(vocab_size: int) -> CLIPTextModel:
    # bos/eos/pad ids as in the real FLUX text_encoder/config.json (eos_token_id 2 is the legacy value
    # that makes CLIPTextModel pool at argmax(input_ids), i.e. at the first <|endoftext|>).
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        projection_dim=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=CLIP_MAX_LENGTH,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        attention_dropout=0.0,
        dropout=0.0,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    )
    model = CLIPTextModel(config)
    randomize_(model, seed=102)
    return model.eval()


def build_t5(vocab_size: int) -> T5EncoderModel:
    config = T5Config(
        vocab_size=vocab_size,
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
    randomize_(model, seed=103)
    return model.eval()


def build_scheduler(dev: bool) -> FlowMatchEulerDiscreteScheduler:
    # The real FLUX.1-schnell / FLUX.1-dev scheduler_config.json values.
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0 if dev else 1.0,
        use_dynamic_shifting=dev,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )


def build_transformer(dev: bool) -> FluxTransformer2DModel:
    model = FluxTransformer2DModel(**transformer_config(guidance_embeds=dev))
    randomize_(model, seed=202 if dev else 201)
    return model.eval()


def restore_clip_prefix(path: Path) -> None:
    """transformers 5 saves CLIPTextModel weights without the `text_model.` prefix that the real
    FLUX repos (saved by transformers 4) have; put it back. transformers 5 loads either form."""
    weights = load_file(path)
    save_file({f"text_model.{k}": v for k, v in weights.items()}, path, metadata={"format": "pt"})


def save_pipeline_folder(folder: Path, dev: bool, shared: dict) -> FluxPipeline:
    """Writes one pipeline folder. Text encoders, tokenizers and VAE are shared between the two
    models (as in the real repos), so the files are byte-identical and git stores them once."""
    if folder.exists():
        shutil.rmtree(folder)
    pipe = FluxPipeline(
        scheduler=build_scheduler(dev),
        vae=shared["vae"],
        text_encoder=shared["clip"],
        tokenizer=shared["clip_tokenizer"],
        text_encoder_2=shared["t5"],
        tokenizer_2=shared["t5_tokenizer"],
        transformer=build_transformer(dev),
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    restore_clip_prefix(folder / "text_encoder" / "model.safetensors")

    # The transformer is sharded in the real repos; re-save it with a small shard size.
    shutil.rmtree(folder / "transformer")
    pipe.transformer.save_pretrained(folder / "transformer", safe_serialization=True, max_shard_size=TRANSFORMER_SHARD_SIZE)
    shards = sorted((folder / "transformer").glob("diffusion_pytorch_model-*.safetensors"))
    assert len(shards) >= 2 and (folder / "transformer" / "diffusion_pytorch_model.safetensors.index.json").exists()

    # Tokenizers exactly as the real repos ship them (transformers would add a CLIP tokenizer.json).
    shutil.rmtree(folder / "tokenizer")
    write_clip_tokenizer(folder / "tokenizer", shared["clip_vocab"], shared["clip_merges"])
    shutil.rmtree(folder / "tokenizer_2")
    write_t5_tokenizer(folder / "tokenizer_2", shared["spiece"])

    # model_index.json: transformers 5 aliases T5TokenizerFast to T5Tokenizer; the real repos name the
    # fast class, which still loads.
    index = json.loads((folder / "model_index.json").read_text())
    index["tokenizer"] = ["transformers", "CLIPTokenizer"]
    index["tokenizer_2"] = ["transformers", "T5TokenizerFast"]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return pipe


def build_shared_components(work: Path) -> dict:
    lines = corpus_lines()
    vocab, merges = learn_clip_bpe(lines, CLIP_NUM_MERGES)
    spiece = train_t5_spiece(lines)

    # Load the tokenizers from the files we write, as the pipeline will.
    write_clip_tokenizer(work / "tokenizer", vocab, merges)
    clip_tokenizer = CLIPTokenizer.from_pretrained(work / "tokenizer")
    write_t5_tokenizer(work / "tokenizer_2", spiece)
    t5_tokenizer = T5TokenizerFast.from_pretrained(work / "tokenizer_2")

    t5_vocab = len(t5_tokenizer)
    # The real T5 embedding has more rows (32128) than the tokenizer has ids (32100); do the same.
    t5_rows = 64 * math.ceil((t5_vocab + 1) / 64)
    return dict(
        clip_vocab=vocab,
        clip_merges=merges,
        spiece=spiece,
        clip_tokenizer=clip_tokenizer,
        t5_tokenizer=t5_tokenizer,
        vae=build_vae(),
        clip=build_clip(len(vocab)),
        t5=build_t5(t5_rows),
    )


# --------------------------------------------------------------------------------------------
# Reference Flux transformer forward, written out op by op on the weights of a diffusers
# FluxTransformer2DModel, with attention guidance.
#
# Layout of a guided call (official NAG Flux code, ChenDarYen/Normalized-Attention-Guidance):
#  * temb[h] = time/guidance embedding + pooled text embedding of half h (h = 0 positive, 1 negative);
#  * double blocks: one image stream, modulated by temb[0] only; one text stream per half,
#    modulated by its own temb; half h attends jointly over [text_h ; image] with the same image
#    q/k/v; the image rows of the attention output become guide(Z+, Z-) (Z+/Z- = image rows of
#    half 0/1), the text rows of each half stay their own;
#  * single blocks: each half is [text_h ; image_h], starting with image_0 = image_1 = the image
#    stream; each half has its own modulation, MLP, gate and residual; in attention the image
#    rows of both halves are replaced by guide(Z+, Z-);
#  * output: image rows of half 0 -> norm_out(temb[0]) -> proj_out.
# guide() acts on attention outputs with all heads merged, before the output projection.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttnGuidance:
    """Attention-space guidance of one transformer call."""

    mode: str = "none"  # none | nag | nasa
    nag_scale: float = 1.0  # s = phi + 1
    nag_tau: float = 2.5
    nag_alpha: float = 0.25
    nag_norm: str = "l2"  # l1 (the paper) | l2 (the official Flux code)
    nasa_scale: float = 0.0  # phi of NASA

    @property
    def guided(self) -> bool:
        return self.mode != "none"

    def metadata(self) -> dict[str, str]:
        return {
            "nag_scale": repr(self.nag_scale),
            "nag_tau": repr(self.nag_tau),
            "nag_alpha": repr(self.nag_alpha),
            "nag_norm": self.nag_norm,
            "nasa_scale": repr(self.nasa_scale),
        }


NO_GUIDANCE = AttnGuidance()


def guide(z_pos: torch.Tensor, z_neg: torch.Tensor, g: AttnGuidance) -> torch.Tensor:
    """Combines positive/negative attention outputs [..., tokens, heads*head_dim] per token."""
    if g.mode == "nasa":
        return z_pos - g.nasa_scale * z_neg  # NASA, eq. 5
    assert g.mode == "nag"
    s = g.nag_scale
    z_ext = s * z_pos - (s - 1.0) * z_neg  # eq. 7 with phi = s - 1
    if g.nag_norm == "l1":
        ratio = z_ext.abs().sum(-1, keepdim=True) / z_pos.abs().sum(-1, keepdim=True)  # eq. 8 (paper)
    elif g.nag_norm == "l2":
        ratio = z_ext.pow(2).sum(-1, keepdim=True).sqrt() / z_pos.pow(2).sum(-1, keepdim=True).sqrt()  # official
    else:
        raise ValueError(g.nag_norm)
    z_hat = z_ext * torch.clamp(ratio, max=g.nag_tau) / ratio  # eq. 9
    return g.nag_alpha * z_hat + (1.0 - g.nag_alpha) * z_pos  # eq. 10


def linear(x: torch.Tensor, layer: torch.nn.Linear) -> torch.Tensor:
    return F.linear(x, layer.weight, layer.bias)


def silu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def layer_norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """LayerNorm without affine parameters (all LayerNorms of the Flux transformer)."""
    mean = x.mean(-1, keepdim=True)
    var = (x - mean).pow(2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps)


def rms_norm(x: torch.Tensor, norm: torch.nn.RMSNorm) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight


def timestep_sinusoid(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """diffusers Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0): [cos | sin]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half).to(t.dtype)
    args = t[:, None] * freqs[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def mlp2(x: torch.Tensor, emb) -> torch.Tensor:
    """linear_1 -> SiLU -> linear_2 (TimestepEmbedding and PixArtAlphaTextProjection alike)."""
    return linear(silu(linear(x, emb.linear_1)), emb.linear_2)


def conditioning(tr: FluxTransformer2DModel, timestep, guidance, pooled) -> torch.Tensor:
    """temb = timestep_embedder(sin(1000 t)) [+ guidance_embedder(sin(1000 g))] + text_embedder(pooled)."""
    tte = tr.time_text_embed
    emb = mlp2(timestep_sinusoid(timestep * 1000), tte.timestep_embedder)
    if guidance is not None:
        emb = emb + mlp2(timestep_sinusoid(guidance * 1000), tte.guidance_embedder)
    return emb + mlp2(pooled, tte.text_embedder)


def rope_tables(ids: torch.Tensor, axes_dims, dtype, theta: float = 10000.0):
    """cos/sin [seq, head_dim]: per axis, angles pos * theta^(-2i/d) (computed in f64), each
    repeated twice (interleaved pairs), axes concatenated."""
    cos, sin = [], []
    for axis, d in enumerate(axes_dims):
        freqs = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
        angles = torch.outer(ids[:, axis].to(torch.float64), freqs)
        cos.append(angles.cos().repeat_interleave(2, dim=1))
        sin.append(angles.sin().repeat_interleave(2, dim=1))
    return torch.cat(cos, -1).to(dtype), torch.cat(sin, -1).to(dtype)


def apply_rope(x: torch.Tensor, rope) -> torch.Tensor:
    """x [B, heads, seq, head_dim]; rotates consecutive pairs (x0, x1) -> (x0 c - x1 s, x1 c + x0 s)."""
    cos, sin = rope
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    return x * cos + rotated * sin


def split_heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    b, s, _ = x.shape
    return x.reshape(b, s, -1, head_dim).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    b, h, s, d = x.shape
    return x.transpose(1, 2).reshape(b, s, h * d)


def attention(q, k, v) -> torch.Tensor:
    """Plain softmax attention over [B, heads, seq, head_dim]; returns heads merged."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    return merge_heads(scores.softmax(-1) @ v)


def modulate(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]


def double_block(blk, img, txts, tembs, rope, g: AttnGuidance):
    """One FluxTransformerBlock. img [B, Si, C]; txts/tembs: one entry per half (1 or 2)."""
    attn = blk.attn
    hd = attn.head_dim
    # Image stream: modulated by the positive temb only, never copied.
    i_shift, i_scale, i_gate, i_shift2, i_scale2, i_gate2 = linear(silu(tembs[0]), blk.norm1.linear).chunk(6, dim=-1)
    img_n = modulate(layer_norm(img), i_shift, i_scale)
    qi = rms_norm(split_heads(linear(img_n, attn.to_q), hd), attn.norm_q)
    ki = rms_norm(split_heads(linear(img_n, attn.to_k), hd), attn.norm_k)
    vi = split_heads(linear(img_n, attn.to_v), hd)

    st = txts[0].shape[1]
    img_outs, new_txts = [], []
    for txt, temb in zip(txts, tembs):
        t_shift, t_scale, t_gate, t_shift2, t_scale2, t_gate2 = linear(silu(temb), blk.norm1_context.linear).chunk(6, dim=-1)
        txt_n = modulate(layer_norm(txt), t_shift, t_scale)
        qt = rms_norm(split_heads(linear(txt_n, attn.add_q_proj), hd), attn.norm_added_q)
        kt = rms_norm(split_heads(linear(txt_n, attn.add_k_proj), hd), attn.norm_added_k)
        vt = split_heads(linear(txt_n, attn.add_v_proj), hd)
        q = apply_rope(torch.cat([qt, qi], dim=2), rope)
        k = apply_rope(torch.cat([kt, ki], dim=2), rope)
        out = attention(q, k, torch.cat([vt, vi], dim=2))
        img_outs.append(out[:, st:])
        # The text rows of every half keep their own attention output.
        txt = txt + t_gate[:, None] * linear(out[:, :st], attn.to_add_out)
        ff = blk.ff_context.net
        h = modulate(layer_norm(txt), t_shift2, t_scale2)
        txt = txt + t_gate2[:, None] * linear(gelu_tanh(linear(h, ff[0].proj)), ff[2])
        new_txts.append(txt)

    img_attn = guide(img_outs[0], img_outs[1], g) if g.guided else img_outs[0]
    img = img + i_gate[:, None] * linear(img_attn, attn.to_out[0])
    ff = blk.ff.net
    h = modulate(layer_norm(img), i_shift2, i_scale2)
    img = img + i_gate2[:, None] * linear(gelu_tanh(linear(h, ff[0].proj)), ff[2])
    return img, new_txts


def single_block(blk, xs, tembs, rope, st: int, g: AttnGuidance):
    """One FluxSingleTransformerBlock. xs: per half [B, St+Si, C] = [text_h ; image_h]."""
    attn = blk.attn
    hd = attn.head_dim
    parts = []
    for x, temb in zip(xs, tembs):
        shift, scale, gate = linear(silu(temb), blk.norm.linear).chunk(3, dim=-1)
        xn = modulate(layer_norm(x), shift, scale)
        mlp = gelu_tanh(linear(xn, blk.proj_mlp))
        q = apply_rope(rms_norm(split_heads(linear(xn, attn.to_q), hd), attn.norm_q), rope)
        k = apply_rope(rms_norm(split_heads(linear(xn, attn.to_k), hd), attn.norm_k), rope)
        v = split_heads(linear(xn, attn.to_v), hd)
        parts.append((attention(q, k, v), mlp, gate))

    if g.guided:
        # Image rows of both halves get the same guided output; text rows keep their own.
        img_attn = guide(parts[0][0][:, st:], parts[1][0][:, st:], g)
        parts = [(torch.cat([a[:, :st], img_attn], dim=1), m, gt) for a, m, gt in parts]

    return [x + gate[:, None] * linear(torch.cat([a, m], dim=-1), blk.proj_out) for x, (a, m, gate) in zip(xs, parts)]


@torch.no_grad()
def flux_forward(
    tr: FluxTransformer2DModel,
    hidden_states,
    encoder_hidden_states,
    pooled,
    timestep,
    img_ids,
    txt_ids,
    guidance=None,
    neg_encoder_hidden_states=None,
    neg_pooled=None,
    g: AttnGuidance = NO_GUIDANCE,
    record: dict | None = None,
) -> torch.Tensor:
    """The Flux transformer. With g.guided the negative text (T5 states + pooled CLIP) is a second
    text stream with its own temb; see the comment above. `record` collects per-block states."""
    dtype = hidden_states.dtype
    img = linear(hidden_states, tr.x_embedder)
    txts = [linear(encoder_hidden_states, tr.context_embedder)]
    tembs = [conditioning(tr, timestep, guidance, pooled)]
    if g.guided:
        txts.append(linear(neg_encoder_hidden_states, tr.context_embedder))
        tembs.append(conditioning(tr, timestep, guidance, neg_pooled))
    rope = rope_tables(torch.cat([txt_ids, img_ids], dim=0), tr.config.axes_dims_rope, dtype)

    for i, blk in enumerate(tr.transformer_blocks):
        img, txts = double_block(blk, img, txts, tembs, rope, g)
        if record is not None:
            record[f"double_{i}_img"] = img
            record[f"double_{i}_txt"] = txts[0]
            if g.guided:
                record[f"double_{i}_txt_neg"] = txts[1]

    st = txts[0].shape[1]
    xs = [torch.cat([txt, img], dim=1) for txt in txts]  # the image is tiled into every half
    for i, blk in enumerate(tr.single_transformer_blocks):
        xs = single_block(blk, xs, tembs, rope, st, g)
        if record is not None:
            record[f"single_{i}"] = torch.cat(xs, dim=0)

    img = xs[0][:, st:]
    scale, shift = linear(silu(tembs[0]), tr.norm_out.linear).chunk(2, dim=-1)  # note: scale first
    return linear(modulate(layer_norm(img), shift, scale), tr.proj_out)


# --------------------------------------------------------------------------------------------
# Reference pipeline (text -> latents -> image), as diffusers' FluxPipeline does it.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PipelineCase:
    name: str
    guidance: str  # none | nag | nasa | cfg | cfg+nag
    attn: AttnGuidance = NO_GUIDANCE
    nag_end: float = 1.0
    true_cfg_scale: float = 1.0
    save_image: bool = False


@dataclass
class TextEmbeddings:
    clip_ids: torch.Tensor  # [1, 77] int64
    pooled: torch.Tensor  # [1, 32]
    t5_ids: torch.Tensor  # [1, max_sequence_length] int64
    t5_hidden: torch.Tensor  # [1, max_sequence_length, 32]


@torch.no_grad()
def encode_text(pipe: FluxPipeline, text: str, max_sequence_length: int) -> TextEmbeddings:
    """CLIP pooled output (padded to 77 with <|endoftext|>) and T5 last hidden state (padded with
    <pad> to max_sequence_length), both truncating."""
    clip_ids = pipe.tokenizer(text, padding="max_length", max_length=CLIP_MAX_LENGTH, truncation=True, return_tensors="pt").input_ids
    pooled = pipe.text_encoder(clip_ids).pooler_output
    t5_ids = pipe.tokenizer_2(text, padding="max_length", max_length=max_sequence_length, truncation=True, return_tensors="pt").input_ids
    t5_hidden = pipe.text_encoder_2(t5_ids)[0]
    return TextEmbeddings(clip_ids.to(torch.int64), pooled, t5_ids.to(torch.int64), t5_hidden)


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/2)(W/2), C*4]: each 2x2 patch becomes one token, channels (c, dy, dx)."""
    b, c, h, w = x.shape
    return x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of pack_latents; h, w are the latent (unpacked) sizes."""
    b, _, d = x.shape
    c = d // 4
    return x.reshape(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def latent_image_ids(h2: int, w2: int) -> torch.Tensor:
    """[h2*w2, 3] = (0, row, col) per packed token, row-major."""
    ids = torch.zeros(h2, w2, 3)
    ids[..., 1] = torch.arange(h2)[:, None]
    ids[..., 2] = torch.arange(w2)[None, :]
    return ids.reshape(h2 * w2, 3)


def calculate_shift(image_seq_len, base_seq_len, max_seq_len, base_shift, max_shift) -> float:
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + base_shift - m * base_seq_len


def flux_sigmas(config, steps: int, image_seq_len: int) -> torch.Tensor:
    """FlowMatch Euler sigmas (steps + 1 values, last 0) as FluxPipeline + the scheduler compute them:
    linspace(1, 1/n, n) in f32, then the dynamic (exponential, mu from the image size) or the static
    shift."""
    sigmas = np.linspace(1.0, 1.0 / steps, steps).astype(np.float32)
    if config.use_dynamic_shifting:
        mu = calculate_shift(image_seq_len, config.base_image_seq_len, config.max_image_seq_len, config.base_shift, config.max_shift)
        sigmas = math.exp(mu) / (math.exp(mu) + (1.0 / sigmas - 1.0) ** 1.0)
    else:
        sigmas = config.shift * sigmas / (1.0 + (config.shift - 1.0) * sigmas)
    return torch.cat([torch.from_numpy(np.asarray(sigmas, dtype=np.float32)), torch.zeros(1)])


@torch.no_grad()
def reference_pipeline(pipe: FluxPipeline, case: PipelineCase, init_latents: torch.Tensor, guidance_scale: float):
    """Runs the denoising loop; returns (timesteps [K], per-step unpacked latents, final image or None)."""
    tr = pipe.transformer
    lh, lw = init_latents.shape[-2:]
    pos = encode_text(pipe, PROMPT, MAX_SEQUENCE_LENGTH)
    neg = encode_text(pipe, NEGATIVE_PROMPT, MAX_SEQUENCE_LENGTH)
    latents = pack_latents(init_latents)
    img_ids = latent_image_ids(lh // 2, lw // 2)
    txt_ids = torch.zeros(MAX_SEQUENCE_LENGTH, 3)
    sigmas = flux_sigmas(pipe.scheduler.config, STEPS, latents.shape[1])
    timesteps = sigmas[:-1] * 1000
    guidance = torch.full([1], guidance_scale, dtype=torch.float32) if tr.config.guidance_embeds else None

    steps = []
    for k, t in enumerate(timesteps):
        timestep = t.expand(1) / 1000
        attn_g = case.attn
        if t < (1.0 - case.nag_end) * 1000:  # the official window rule: off once t < (1 - nag_end) 1000
            attn_g = NO_GUIDANCE
        noise = flux_forward(
            tr, latents, pos.t5_hidden, pos.pooled, timestep, img_ids, txt_ids, guidance,
            neg_encoder_hidden_states=neg.t5_hidden, neg_pooled=neg.pooled, g=attn_g,
        )
        if case.true_cfg_scale > 1.0:
            # True CFG: a second, unguided pass on the negative prompt.
            neg_noise = flux_forward(tr, latents, neg.t5_hidden, neg.pooled, timestep, img_ids, txt_ids, guidance)
            noise = neg_noise + case.true_cfg_scale * (noise - neg_noise)
        latents = latents + (sigmas[k + 1] - sigmas[k]) * noise  # Euler step
        steps.append(unpack_latents(latents, lh, lw))

    image = decode(pipe.vae, steps[-1]) if case.save_image else None
    return timesteps, steps, image


@torch.no_grad()
def decode(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """Raw VAE decode output (before clamping/postprocessing) of unpacked latents."""
    return vae.decode(latents / vae.config.scaling_factor + vae.config.shift_factor).sample


# --------------------------------------------------------------------------------------------
# Checks against diffusers / transformers.
# --------------------------------------------------------------------------------------------


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||"""
    return ((a - b).norm() / b.norm()).item()


def check_loaded(loaded: FluxPipeline, built: FluxPipeline) -> None:
    """Every weight loaded back from the folder equals the one we built (a key that failed to load
    would silently be re-initialised)."""
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        a, b = getattr(loaded, name).state_dict(), getattr(built, name).state_dict()
        assert a.keys() == b.keys(), f"{name}: keys differ"
        for k in a:
            assert torch.equal(a[k], b[k]), f"{name}.{k} differs after loading"


def check_tokenizers(pipe: FluxPipeline, shared: dict) -> None:
    """transformers' tokenizers (as loaded from the saved folders) agree with our independent CLIP
    BPE encoder and with sentencepiece itself."""
    sp = spm.SentencePieceProcessor(model_proto=shared["spiece"])
    samples = [PROMPT, NEGATIVE_PROMPT, "A Photo of a CAT,  wearing glasses!!", "zebra 1234 quux", "it's the cat's hat", "ａ　ｃａｔ"]
    for text in samples:
        ids = pipe.tokenizer(text, padding="max_length", max_length=CLIP_MAX_LENGTH, truncation=True).input_ids
        assert ids == clip_encode_reference(text, shared["clip_vocab"], shared["clip_merges"]), text
        t5 = pipe.tokenizer_2(text).input_ids
        assert t5 == sp.encode(text) + [1], (text, t5, sp.encode(text))


@torch.no_grad()
def check_pipeline_encode(pipe: FluxPipeline) -> None:
    """Our encode_text equals FluxPipeline.encode_prompt."""
    ours = encode_text(pipe, PROMPT, MAX_SEQUENCE_LENGTH)
    embeds, pooled, text_ids = pipe.encode_prompt(PROMPT, prompt_2=None, max_sequence_length=MAX_SEQUENCE_LENGTH)
    assert torch.equal(embeds, ours.t5_hidden) and torch.equal(pooled, ours.pooled)
    assert torch.equal(text_ids, torch.zeros(MAX_SEQUENCE_LENGTH, 3))


# --------------------------------------------------------------------------------------------
# Fixtures.
# --------------------------------------------------------------------------------------------

SCHNELL_NAG = AttnGuidance(mode="nag", nag_scale=5.0, nag_tau=2.5, nag_alpha=0.25)
DEV_NAG = AttnGuidance(mode="nag", nag_scale=3.0, nag_tau=2.5, nag_alpha=0.25)
NASA = AttnGuidance(mode="nasa", nasa_scale=0.5)


def transformer_cases(dev: bool) -> dict[str, AttnGuidance]:
    nag = DEV_NAG if dev else SCHNELL_NAG
    return {
        "none": NO_GUIDANCE,
        "nag_l1": replace(nag, nag_norm="l1"),
        "nag_l2": replace(nag, nag_norm="l2"),
        "nasa": NASA,
    }


def pipeline_cases(dev: bool) -> list[PipelineCase]:
    if dev:
        return [
            PipelineCase("none", "none"),
            PipelineCase("nag_l1", "nag", replace(DEV_NAG, nag_norm="l1")),
            PipelineCase("cfg_nag", "cfg+nag", replace(DEV_NAG, nag_norm="l2"), true_cfg_scale=2.0),
        ]
    return [
        PipelineCase("none", "none", save_image=True),
        PipelineCase("nag_l1", "nag", replace(SCHNELL_NAG, nag_norm="l1"), save_image=True),
        PipelineCase("nag_l2", "nag", replace(SCHNELL_NAG, nag_norm="l2")),
        PipelineCase("nag_end", "nag", replace(SCHNELL_NAG, nag_norm="l2"), nag_end=0.5),
        PipelineCase("cfg", "cfg", true_cfg_scale=2.0),
        PipelineCase("cfg_nag", "cfg+nag", replace(SCHNELL_NAG, nag_norm="l2"), true_cfg_scale=2.0),
        PipelineCase("nasa", "nasa", NASA),
    ]


def transformer_inputs(dev: bool) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(303 if dev else 302)
    inputs = {
        "hidden_states": torch.randn(1, 16, 64, generator=gen),
        "encoder_hidden_states": torch.randn(1, MAX_SEQUENCE_LENGTH, 32, generator=gen),
        "neg_encoder_hidden_states": torch.randn(1, MAX_SEQUENCE_LENGTH, 32, generator=gen),
        "pooled": torch.randn(1, 32, generator=gen),
        "neg_pooled": torch.randn(1, 32, generator=gen),
        "timestep": torch.tensor([TRANSFORMER_TIMESTEP]),
        "img_ids": latent_image_ids(4, 4),
        "txt_ids": torch.zeros(MAX_SEQUENCE_LENGTH, 3),
    }
    if dev:
        inputs["guidance"] = torch.tensor([DEV_GUIDANCE_SCALE])
    return inputs


def call_reference(tr, inp: dict, g: AttnGuidance, record=None) -> torch.Tensor:
    return flux_forward(
        tr, inp["hidden_states"], inp["encoder_hidden_states"], inp["pooled"], inp["timestep"],
        inp["img_ids"], inp["txt_ids"], inp.get("guidance"),
        neg_encoder_hidden_states=inp["neg_encoder_hidden_states"], neg_pooled=inp["neg_pooled"], g=g, record=record,
    )


@torch.no_grad()
def write_transformer_fixtures(out: Path, model: str, pipe: FluxPipeline, summary: list[str]) -> None:
    tr = pipe.transformer
    dev = model == "dev"
    inp = transformer_inputs(dev)

    # The unguided reference forward must equal diffusers' own forward.
    expected = tr(
        hidden_states=inp["hidden_states"], encoder_hidden_states=inp["encoder_hidden_states"],
        pooled_projections=inp["pooled"], timestep=inp["timestep"], img_ids=inp["img_ids"],
        txt_ids=inp["txt_ids"], guidance=inp.get("guidance"), return_dict=False,
    )[0]
    ours = call_reference(tr, inp, NO_GUIDANCE)
    err = max_abs(ours, expected)
    assert err < 1e-5, f"{model}: reference forward differs from diffusers by {err}"
    summary.append(f"transformer {model}: reference vs diffusers forward max abs diff {err:.2e}")

    tr64 = copy.deepcopy(tr).double()
    inp64 = {k: v.double() for k, v in inp.items()}
    base = None
    for case, g in transformer_cases(dev).items():
        record: dict[str, torch.Tensor] = {}
        output = call_reference(tr, inp, g, record)
        base = output if case == "none" else base
        meta = {"model": model, "guidance": g.mode, **g.metadata()}
        write_safetensors(out / f"transformer_{model}_{case}.safetensors", {**inp, "output": output, **record}, meta)
        f32_noise = rel(output.double(), call_reference(tr64, inp64, g))
        line = f"transformer {model} {case:7s}: |out| {output.norm():8.3f}  f32-vs-f64 rel {f32_noise:.1e}"
        if case != "none":
            diff = rel(output, base)
            assert diff > 1e-2, f"{model} {case}: guidance changes the output by only {diff}"
            line += f"  rel diff vs none {diff:.3f}"
        summary.append(line)


@torch.no_grad()
def write_pipeline_fixtures(out: Path, model: str, pipe: FluxPipeline, init: torch.Tensor, summary: list[str]) -> None:
    dev = model == "dev"
    guidance_scale = DEV_GUIDANCE_SCALE if dev else 0.0
    check_pipeline_encode(pipe)
    sched = copy.deepcopy(pipe.scheduler)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1.0 / STEPS, STEPS), mu=calculate_shift(16, 256, 4096, 0.5, 1.15))
    assert torch.equal(sched.sigmas, flux_sigmas(pipe.scheduler.config, STEPS, 16)), "sigma schedule mismatch"

    base = None
    for case in pipeline_cases(dev):
        timesteps, steps, image = reference_pipeline(pipe, case, init, guidance_scale)
        final = steps[-1]
        if case.guidance in ("none", "cfg"):
            # diffusers' FluxPipeline, from the same initial latents, must agree.
            packed = pipe(
                prompt=PROMPT,
                negative_prompt=NEGATIVE_PROMPT if case.guidance == "cfg" else None,
                true_cfg_scale=case.true_cfg_scale,
                height=HEIGHT, width=WIDTH, num_inference_steps=STEPS, guidance_scale=DEV_GUIDANCE_SCALE,
                max_sequence_length=MAX_SEQUENCE_LENGTH, latents=pack_latents(init), output_type="latent",
            ).images
            err = max_abs(unpack_latents(packed, *init.shape[-2:]), final)
            assert err < 1e-5, f"{model} {case.name}: reference pipeline differs from FluxPipeline by {err}"
            summary.append(f"pipeline {model} {case.name}: reference vs FluxPipeline max abs diff {err:.2e}")

        tensors = {"init_latents": init, "timesteps": timesteps, "final_latents": final}
        tensors.update({f"step_{k}_latents": s for k, s in enumerate(steps)})
        if image is not None:
            tensors["image"] = image
        g = case.attn
        meta = {
            "prompt": PROMPT,
            "negative_prompt": NEGATIVE_PROMPT,
            "guidance": case.guidance,
            **g.metadata(),
            "nag_end": repr(case.nag_end),
            "true_cfg_scale": repr(case.true_cfg_scale),
            "guidance_scale": repr(guidance_scale),
            "steps": str(STEPS),
            "height": str(HEIGHT),
            "width": str(WIDTH),
            "max_sequence_length": str(MAX_SEQUENCE_LENGTH),
        }
        write_safetensors(out / f"pipeline_{model}_{case.name}.safetensors", tensors, meta)
        base = final if case.name == "none" else base
        line = f"pipeline {model} {case.name:8s}: t = {[round(x, 2) for x in timesteps.tolist()]}"
        if case.name != "none":
            diff = rel(final, base)
            assert diff > 1e-2, f"{model} {case.name}: guidance changes the latents by only {diff}"
            line += f"  final latents rel diff vs none {diff:.3f}"
        if image is not None:
            line += f"  image range [{image.min():.2f}, {image.max():.2f}]"
        summary.append(line)


@torch.no_grad()
def write_text_fixture(out: Path, pipe: FluxPipeline) -> None:
    pos = encode_text(pipe, PROMPT, MAX_SEQUENCE_LENGTH)
    neg = encode_text(pipe, NEGATIVE_PROMPT, MAX_SEQUENCE_LENGTH)
    tensors = {}
    for prefix, e in (("", pos), ("neg_", neg)):
        tensors.update({
            f"{prefix}clip_input_ids": e.clip_ids,
            f"{prefix}clip_pooled": e.pooled,
            f"{prefix}t5_input_ids": e.t5_ids,
            f"{prefix}t5_hidden": e.t5_hidden,
        })
    meta = {"prompt": PROMPT, "negative_prompt": NEGATIVE_PROMPT, "max_sequence_length": str(MAX_SEQUENCE_LENGTH), "pipeline": "schnell"}
    write_safetensors(out / "text.safetensors", tensors, meta)


@torch.no_grad()
def write_vae_fixture(out: Path, pipe: FluxPipeline) -> None:
    latents = torch.randn(1, 16, HEIGHT // 8, WIDTH // 8, generator=torch.Generator().manual_seed(401))
    image = decode(pipe.vae, latents)
    cfg = pipe.vae.config
    meta = {"scaling_factor": repr(cfg.scaling_factor), "shift_factor": repr(cfg.shift_factor), "pipeline": "schnell"}
    write_safetensors(out / "vae.safetensors", {"latents": latents, "image": image}, meta)


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
    for model in ("schnell", "dev"):
        built = save_pipeline_folder(out / model, dev=model == "dev", shared=shared)
        # Everything below runs on the pipeline as loaded back from the folder.
        pipes[model] = FluxPipeline.from_pretrained(out / model, dtype=torch.float32)
        pipes[model].set_progress_bar_config(disable=True)
        check_loaded(pipes[model], built)
        check_tokenizers(pipes[model], shared)

    summary: list[str] = []

    write_text_fixture(out, pipes["schnell"])
    write_vae_fixture(out, pipes["schnell"])
    init = torch.randn(1, 16, HEIGHT // 8, WIDTH // 8, generator=torch.Generator().manual_seed(501))
    for model, pipe in pipes.items():
        write_transformer_fixtures(out, model, pipe, summary)
        write_pipeline_fixtures(out, model, pipe, init, summary)

    print("\n".join(summary))
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"wrote {out} ({total / 1e6:.2f} MB on disk)")


if __name__ == "__main__":
    sys.exit(main())
