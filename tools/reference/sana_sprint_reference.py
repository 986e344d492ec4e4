"""Golden fixtures for veto's SANA-Sprint parts (run after sana_reference.py, whose tiny
sana_1600m folder lends the text encoder, tokenizer and DC-AE).

Builds tests/fixtures/sana/sana_sprint/, a tiny random pipeline in the layout of
Efficient-Large-Model/Sana_Sprint_1.6B_1024px_diffusers: `SanaTransformer2DModel` with the Sprint
config's choices (guidance_embeds, guidance_embeds_scale 0.1, qk_norm rms_norm_across_heads) at
small widths, `SCMScheduler` (trigflow, sigma_data 0.5), and writes f32 fixtures:

- `sprint_transformer.safetensors`: one call (per-block outputs, output), plain and with NAG on
  the cross-attention (the official generic processor's semantics, pixart_reference.GuidedCrossAttn).
- `sprint_pipeline_{1step,2step,nag_2step}.safetensors`: stock diffusers `SanaSprintPipeline`
  (1 step: intermediate_timesteps None; 2 steps: its defaults 1.5708 / 1.3), the prompt embeds it
  used, the initial latents, each step's standard-normal noise (SCMScheduler's randn, before
  times sigma_data), the latents after each step, the timesteps and the final latents.

Usage: /work/venv/ref/bin/python tools/reference/sana_sprint_reference.py
"""

import json
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import diffusers.schedulers.scheduling_scm as scheduling_scm  # noqa: E402
from diffusers import SanaSprintPipeline, SanaTransformer2DModel, SCMScheduler  # noqa: E402
from flux_reference import NEGATIVE_PROMPT, PROMPT, randomize_, write_safetensors  # noqa: E402
from pixart_reference import NAG, Plan, install  # noqa: E402
from sana_reference import CAPTION_CHANNELS, FOLDER as SANA_FOLDER, LATENT_CHANNELS, OUT, save, transformer_call  # noqa: E402

FOLDER = OUT / "sana_sprint"
HEIGHT, WIDTH = 960, 1024  # ASPECT_RATIO_1024_BIN's 0.94 bin: no resize
GUIDANCE_SCALE = 4.5  # SanaSprintPipeline's default
MAX_SEQUENCE_LENGTH = 300

MODEL_INDEX = {
    "_class_name": "SanaSprintPipeline",
    "_diffusers_version": "0.42.1",
    "scheduler": ["diffusers", "SCMScheduler"],
    "text_encoder": ["transformers", "Gemma2Model"],
    "tokenizer": ["transformers", "GemmaTokenizerFast"],
    "transformer": ["diffusers", "SanaTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderDC"],
}


def build_transformer() -> SanaTransformer2DModel:
    # Sana_Sprint_1.6B_1024px transformer/config.json at the widths of sana_reference's tiny SANA.
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
        patch_size=1,
        norm_elementwise_affine=False,
        norm_eps=1e-6,
        interpolation_scale=None,
        guidance_embeds=True,
        guidance_embeds_scale=0.1,
        qk_norm="rms_norm_across_heads",
        timestep_scale=1.0,
    )
    randomize_(model, seed=431)
    return model.eval()


def write_folder():
    FOLDER.mkdir(parents=True, exist_ok=True)
    save(build_transformer(), FOLDER / "transformer")
    SCMScheduler(num_train_timesteps=1000, prediction_type="trigflow", sigma_data=0.5).save_pretrained(FOLDER / "scheduler")
    for part in ["text_encoder", "tokenizer", "vae"]:
        if (FOLDER / part).exists():
            shutil.rmtree(FOLDER / part)
        shutil.copytree(SANA_FOLDER / part, FOLDER / part)
    (FOLDER / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2, sort_keys=True) + "\n")


def load_pipeline():
    pipe = SanaSprintPipeline.from_pretrained(FOLDER, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def embeds_of(pipe, text: str, chi):
    embeds, mask = pipe.encode_prompt(text, max_sequence_length=MAX_SEQUENCE_LENGTH, complex_human_instruction=chi)
    return embeds, mask


@torch.no_grad()
def write_transformer(pipe):
    tr = pipe.transformer
    g = torch.Generator().manual_seed(21)
    x = torch.randn(2, LATENT_CHANNELS, 6, 4, generator=g)
    ctx = torch.randn(2, 7, CAPTION_CHANNELS, generator=g)
    mask = torch.ones(2, 7)
    mask[1, 5:] = 0
    t = torch.tensor([0.3, 0.3])
    guidance = torch.tensor([0.45, 0.45])
    tensors = {"hidden_states": x, "encoder_hidden_states": ctx, "encoder_attention_mask": mask, "timestep": t, "guidance": guidance}

    def call():
        blocks = {}
        hooks = [b.register_forward_hook(lambda m, i, o, k=k: blocks.__setitem__(k, o.clone())) for k, b in enumerate(tr.transformer_blocks)]
        out = tr(x, encoder_hidden_states=ctx, encoder_attention_mask=mask, timestep=t, guidance=guidance, return_dict=False)[0]
        for h in hooks:
            h.remove()
        return out, blocks

    out, blocks = call()
    tensors["none_output"] = out
    tensors.update({f"none_block_{k}": v for k, v in blocks.items()})
    neg = torch.randn(1, 7, CAPTION_CHANNELS, generator=g)
    neg_mask = torch.ones(1, 7)
    neg_mask[0, 6:] = 0
    holder, original = install(tr)
    holder.plan = Plan("nag", 1, tr.caption_norm(tr.caption_projection(neg)), neg_mask)
    try:
        out, blocks = call()
    finally:
        tr.set_attn_processor(original)
    tensors["negative_states"] = neg
    tensors["negative_mask"] = neg_mask
    tensors["nag_output"] = out
    tensors.update({f"nag_block_{k}": v for k, v in blocks.items()})
    meta = {"guided_row": "1", "nag_scale": repr(NAG.nag_scale), "nag_tau": repr(NAG.nag_tau), "nag_alpha": repr(NAG.nag_alpha)}
    write_safetensors(OUT / "sprint_transformer.safetensors", tensors, meta)


@torch.no_grad()
def run(pipe, name: str, steps: int, nag: bool):
    drawn = []
    original_randn = scheduling_scm.randn_tensor

    def recording_randn(*args, **kwargs):
        z = original_randn(*args, **kwargs)
        drawn.append(z.clone())
        return z

    after, timesteps = [], []

    def on_step(p, i, t, kwargs):
        after.append(kwargs["latents"].clone())
        timesteps.append(float(t))
        return {}

    init = torch.randn(1, LATENT_CHANNELS, HEIGHT // 32, WIDTH // 32, generator=torch.Generator().manual_seed(13))
    chi = None  # the pipeline's default instruction prefix is tested with SANA; plain prompts here
    embeds, mask = embeds_of(pipe, PROMPT, chi)
    kwargs = dict(
        prompt_embeds=embeds,
        prompt_attention_mask=mask,
        num_inference_steps=steps,
        intermediate_timesteps=1.3 if steps == 2 else None,
        height=HEIGHT,
        width=WIDTH,
        latents=init.clone(),
        guidance_scale=GUIDANCE_SCALE,
        output_type="latent",
        callback_on_step_end=on_step,
        generator=torch.Generator().manual_seed(14),
    )
    tensors, meta = {}, {"prompt": PROMPT, "steps": str(steps), "guidance_scale": repr(GUIDANCE_SCALE), "attention": "nag" if nag else "none"}
    original = None
    if nag:
        holder, original = install(pipe.transformer)
        neg, neg_mask = embeds_of(pipe, NEGATIVE_PROMPT, None)
        tr = pipe.transformer
        holder.plan = Plan("nag", 0, tr.caption_norm(tr.caption_projection(neg)), neg_mask)
        n = int(neg_mask.sum())
        tensors["negative_embeds"] = neg[:, :n]
        meta.update(negative_prompt=NEGATIVE_PROMPT, nag_scale=repr(NAG.nag_scale), nag_tau=repr(NAG.nag_tau), nag_alpha=repr(NAG.nag_alpha))
    scheduling_scm.randn_tensor = recording_randn
    try:
        out = pipe(**kwargs).images
    finally:
        scheduling_scm.randn_tensor = original_randn
        if original is not None:
            pipe.transformer.set_attn_processor(original)
    n = int(mask.sum())
    assert bool(mask[0, :n].all())
    tensors.update(
        prompt_embeds=embeds[:, :n],
        init_latents=init,
        timesteps=torch.tensor(timesteps, dtype=torch.float32),
        all_timesteps=pipe.scheduler.timesteps.clone().float(),
        step_noise=torch.stack([z[0] for z in drawn]),
        final_latents=out,
    )
    tensors.update({f"step_{k}_latents": a for k, a in enumerate(after)})
    assert len(drawn) == steps
    write_safetensors(OUT / f"sprint_pipeline_{name}.safetensors", tensors, meta)
    return out


def main():
    torch.manual_seed(0)
    write_folder()
    pipe = load_pipeline()
    write_transformer(pipe)
    one = run(pipe, "1step", 1, False)
    two = run(pipe, "2step", 2, False)
    nag = run(pipe, "nag_2step", 2, True)
    assert (one - two).abs().max() > 1e-3 and (nag - two).abs().max() > 1e-3
    print("wrote", FOLDER)


if __name__ == "__main__":
    main()
