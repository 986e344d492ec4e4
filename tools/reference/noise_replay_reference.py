#!/usr/bin/env python3
"""Replay fixtures for veto's stochastic samplers (LCM, TCD, DDIM with eta, DPM-Solver++ SDE).

Runs diffusers' stock `StableDiffusionXLPipeline` on the tiny SDXL folder that
`unet_reference.py` writes (`tests/fixtures/unet/sdxl/`), with its scheduler replaced by each
stochastic scheduler veto has, from given initial latents and a seeded torch generator. Every
tensor the scheduler draws from the generator is recorded (diffusers' `randn_tensor`, wrapped in
the scheduler's module). The run is then replayed with the recorded noise fed back through the
three lines the README documents (no generator at all), which must give bit-identical latents.

Writes `tests/fixtures/unet/noise_<case>.safetensors`: `latents` (the initial latents, as
`--init-latents` reads them), `step_noise` (the draws, stacked `[N, 1, 4, 8, 8]`),
`final_latents` (diffusers' output, `output_type="latent"`), `timesteps`, and metadata naming the
scheduler config, steps, eta and guidance. The Rust CLI test runs `veto generate` on a copy of
the SDXL folder with that scheduler config and `--init-latents noise_<case>.safetensors`, and
compares its saved latents with `final_latents`.

Deterministic (fixed seeds, one torch thread); developers run it, CI never does:

    /work/venv/ref/bin/python tools/reference/noise_replay_reference.py

Run `unet_reference.py` first if the SDXL folder changed. See tools/reference/README.md and
tests/fixtures/unet/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # before transformers is imported

import diffusers
import torch
import transformers
from diffusers import StableDiffusionXLPipeline

sys.path.insert(0, str(Path(__file__).resolve().parent))
from flux_reference import NEGATIVE_PROMPT, PROMPT, write_safetensors  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]
UNET_FIXTURES = REPO_ROOT / "tests" / "fixtures" / "unet"

HEIGHT = WIDTH = 64  # latents 4 x 8 x 8
INIT_SEED = 1501  # torch.Generator seed of the initial latents
NOISE_SEED = 1502  # torch.Generator seed passed to the pipeline (the scheduler's draws)


@dataclass(frozen=True)
class Case:
    name: str  # fixture noise_<name>.safetensors
    config: str  # tests/fixtures/unet/schedulers/<config>.json
    noise_steps: tuple[int, ...]  # the steps diffusers' scheduler draws noise at (checked)
    overrides: tuple[tuple[str, object], ...] = ()  # Class.from_config(config, **overrides)
    steps: int = 4
    timesteps: tuple[int, ...] | None = None  # pipeline `timesteps=` instead of num_inference_steps
    eta: float | None = None  # pipeline `eta=` (DDIM noise, TCD gamma)
    guidance_scale: float = 0.0  # > 1: CFG with the negative prompt (diffusers' rule)


CASES = [
    # DMD2's card: LCMScheduler, timesteps [999, 749, 499, 249], no CFG. LCM re-noises after every
    # step but the last.
    Case("lcm_dmd2", "dmd2_lcm", noise_steps=(0, 1, 2), timesteps=(999, 749, 499, 249)),
    # Hyper-SDXL / TCD: eta (gamma) 0.3, not after the last step.
    Case("tcd_hyper_sdxl", "hyper_sdxl_tcd", noise_steps=(0, 1, 2), eta=0.3),
    # DDIM with eta 1 (leading, set_alpha_to_one false: the last step's variance is not 0), CFG 5.
    Case("ddim_eta", "sd15_ddim", noise_steps=(0, 1, 2, 3), eta=1.0, guidance_scale=5.0),
    # DPM-Solver++ 2M SDE: a draw at every step, the last included (multiplied by sigma 0 there).
    Case(
        "dpmpp_sde",
        "sd15_dpmpp",
        noise_steps=(0, 1, 2, 3),
        overrides=(("algorithm_type", "sde-dpmsolver++"),),
        guidance_scale=5.0,
    ),
    # Euler Ancestral ("Euler a"): a draw at every step, the last included (times sigma_up 0 there).
    Case("euler_a", "sd15_euler_a", noise_steps=(0, 1, 2, 3), guidance_scale=5.0),
]


def scheduler_for(case: Case):
    config = json.loads((UNET_FIXTURES / "schedulers" / f"{case.config}.json").read_text())
    return getattr(diffusers, config["_class_name"]).from_config(config, **dict(case.overrides))


@contextlib.contextmanager
def recorded_draws(sched):
    """Records every tensor the scheduler draws through diffusers' randn_tensor."""
    module = sys.modules[type(sched).__module__]
    original = module.randn_tensor
    drawn: list[torch.Tensor] = []

    def recording(*args, **kwargs):
        t = original(*args, **kwargs)
        drawn.append(t.clone())
        return t

    module.randn_tensor = recording
    try:
        yield drawn
    finally:
        module.randn_tensor = original


@contextlib.contextmanager
def replayed(pipe, step_noise: torch.Tensor):
    """Feeds `step_noise` to the pipeline's scheduler: the three lines of the README's
    "Replaying stochastic samplers", plus putting diffusers back afterwards."""
    original = sys.modules[type(pipe.scheduler).__module__].randn_tensor
    # --- the README's three lines (there `iter(f["step_noise"])`) ---
    noise = iter(step_noise)  # one tensor per draw, in order
    module = sys.modules[type(pipe.scheduler).__module__]  # e.g. diffusers.schedulers.scheduling_lcm
    module.randn_tensor = lambda shape, **kw: next(noise).to(device=kw.get("device"), dtype=kw.get("dtype"))
    # ---
    try:
        yield
        left = sum(1 for _ in noise)
        assert left == 0, f"{left} noise tensors were not used"
    finally:
        module.randn_tensor = original


def pipeline_kwargs(case: Case, init: torch.Tensor) -> dict:
    kwargs = dict(
        prompt=PROMPT,
        height=HEIGHT,
        width=WIDTH,
        latents=init.clone(),
        output_type="latent",
        guidance_scale=case.guidance_scale,
    )
    if case.timesteps is not None:
        kwargs["timesteps"] = list(case.timesteps)
    else:
        kwargs["num_inference_steps"] = case.steps
    if case.eta is not None:
        kwargs["eta"] = case.eta
    if case.guidance_scale > 1.0:
        kwargs["negative_prompt"] = NEGATIVE_PROMPT
    return kwargs


def scaled_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max|a - b| / max(1, max|b|): the parity measure of the Rust tests."""
    return (a - b).abs().max().item() / max(1.0, b.abs().max().item())


@torch.no_grad()
def write_case(out: Path, pipe, case: Case, init: torch.Tensor, summary: list[str]) -> None:
    pipe.scheduler = scheduler_for(case)
    sched = pipe.scheduler
    # 1. The stock pipeline with a seeded generator; record what the scheduler draws.
    with recorded_draws(sched) as drawn:
        final = pipe(**pipeline_kwargs(case, init), generator=torch.Generator().manual_seed(NOISE_SEED)).images
    assert len(drawn) == len(case.noise_steps), f"{case.name}: {len(drawn)} draws, expected {case.noise_steps}"
    step_noise = torch.stack(drawn)
    assert step_noise.shape == (len(drawn), 1, 4, HEIGHT // 8, WIDTH // 8), step_noise.shape
    timesteps = sched.timesteps.to(torch.float32)

    # 2. Replayed through the documented lines, without a generator: bit for bit.
    with replayed(pipe, step_noise):
        again = pipe(**pipeline_kwargs(case, init)).images
    assert torch.equal(again, final), f"{case.name}: the replay differs by {scaled_err(again, final)}"

    # 3. The noise matters: other noise gives other latents (so the Rust test can fail).
    with replayed(pipe, -step_noise):
        other = pipe(**pipeline_kwargs(case, init)).images
    moved = scaled_err(other, final)
    assert moved > 1e-2, f"{case.name}: negated step noise moves the latents by only {moved}"
    assert torch.isfinite(final).all()

    meta = {
        "prompt": PROMPT,
        "negative_prompt": NEGATIVE_PROMPT if case.guidance_scale > 1.0 else "",
        "guidance": "cfg" if case.guidance_scale > 1.0 else "none",
        "guidance_scale": repr(case.guidance_scale),
        "scheduler": type(sched).__name__,
        "scheduler_config": sched.to_json_string(),
        "config": f"schedulers/{case.config}.json",
        "overrides": json.dumps(dict(case.overrides)),
        "steps": str(len(timesteps)),
        "custom_timesteps": json.dumps(list(case.timesteps)) if case.timesteps else "",
        "eta": repr(case.eta) if case.eta is not None else "",
        "noise_steps": json.dumps(list(case.noise_steps)),
        "height": str(HEIGHT),
        "width": str(WIDTH),
        "init_seed": str(INIT_SEED),
        "noise_seed": str(NOISE_SEED),
        "pipeline": "StableDiffusionXLPipeline (diffusers " + diffusers.__version__ + ")",
    }
    tensors = {"latents": init, "step_noise": step_noise, "final_latents": final, "timesteps": timesteps}
    write_safetensors(out / f"noise_{case.name}.safetensors", tensors, meta)
    summary.append(
        f"noise {case.name:15s} {type(sched).__name__:28s} t = {[round(t, 2) for t in timesteps.tolist()]}"
        f" draws at {list(case.noise_steps)}; replay bit-identical; negated noise moves the latents {moved:.3f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=UNET_FIXTURES, help=f"fixture folder (default {UNET_FIXTURES})")
    args = parser.parse_args()
    assert sys.byteorder == "little", "safetensors data is little-endian"
    for logging in (diffusers.utils.logging, transformers.utils.logging):
        logging.set_verbosity_error()
        logging.disable_progress_bar()
    torch.set_num_threads(1)  # bit-for-bit reproducible reductions
    torch.use_deterministic_algorithms(True)

    pipe = StableDiffusionXLPipeline.from_pretrained(UNET_FIXTURES / "sdxl", dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    init = torch.randn(1, 4, HEIGHT // 8, WIDTH // 8, generator=torch.Generator().manual_seed(INIT_SEED))
    summary: list[str] = []
    for case in CASES:
        write_case(args.out, pipe, case, init, summary)
    print("\n".join(summary))


if __name__ == "__main__":
    sys.exit(main())
