"""
Training EzAudio: the waveform VAE, then the paper's three DiT stages, on a CPU, one GPU or many.

Paper: J. Hai et al., "EzAudio: Enhancing Text-to-Audio Generation with Efficient Diffusion Transformer",
arXiv 2409.10819, Sec. II-C and III; the VAE follows the released recipe (SPEC §3).

  python train.py --stage vae --manifest clips.csv                               # the waveform VAE
  torchrun --standalone --nproc_per_node=8 train.py --stage 1 --manifest audioset.csv     # masked diffusion, no text
  torchrun ... train.py --stage 2 --manifest scored.csv --init-from runs/stage1/ckpt.pt     # + text, synthetic captions
  torchrun ... train.py --stage 3 --manifest audiocaps.csv --init-from runs/stage2/ckpt.pt  # human captions

Read top to bottom: 1. settings  2. distributed set-up  3. the VAE stage's losses  4. the DiT stages' pieces
5. optimiser, EMA and random states  6. the two kinds of stage  7. the training loop.
"""

import argparse
import contextlib
import copy
import fcntl
import math
import os
import random
import re
import signal
import threading
import time
from dataclasses import asdict, replace

import numpy as np
import soundfile as sf
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data
import ezaudio as E

# -----------------------------------------------------------------------------
# 1. Settings: each stage's defaults (paper Sec. III, SPEC §5; the released VAE config), every one a flag
#
# The global batch is batch-size x accum x GPUs: 16 x 1 x 8 = 128, the paper's, on 8 GPUs; on 4 GPUs pass
# --accum 2. Stage 2 trains on "more fully-masked samples" (paper Sec. II-C), without a number: we take mae_prob
# 0.1 there. Stages 1 and 3 keep 0.25, the value in the config released with the stage-3 models (SPEC §5).

SAMPLE_PROMPTS = ["a dog barks twice", "rain falls on a tin roof", "a man speaks while birds chirp",
                  "a car engine revs up and drives away"]
COMMON = dict(
    config="XL", manifest=None, data_root=None, split="train", cache=None, init_from=None, vae=None,
    vae_config=None, text_encoder=None, segment=10.0, flip=0.5, min_clap=0.0, batch_size=16, accum=1,
    betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, warmup=5000, clip=1.0, ema=0.0, mae_prob=0.25,
    min_timestep=0, text_dropout=0.1, disc_lr=3e-4, disc_filters=64, wave_weight=0.0, autoencoder=False,
    envelope_channels=0, stft_floor=0.0, a_weighting=True, device=None, dtype="auto", compile=False,
    grad_checkpointing=False, workers=4, seed=0, log_every=50, save_every=5000, sample_every=5000, sample_steps=50,
    sample_prompts=SAMPLE_PROMPTS, max_nonfinite=20)
STAGES = {
    "vae": dict(max_steps=1_000_000, lr=1.5e-4, betas=(0.8, 0.99), weight_decay=1e-3, warmup=1000, clip=0.0,
                segment=0.5),
    "1": dict(max_steps=100_000, lr=1e-4),
    "2": dict(max_steps=50_000, lr=5e-5, mae_prob=0.1, min_clap=0.40),
    "3": dict(max_steps=30_000, lr=1e-5),
    # ours: the published code trains no ControlNet. Controlled generation masks the whole latent (mae_prob 0)
    "control": dict(max_steps=30_000, lr=1e-5, mae_prob=0.0),
}
TEXT_STAGES = ("2", "3", "control")  # the stages that read captions
# the T5 each preset was released with; a callable builds a small encoder that checkpoints carry inside
DEFAULT_TEXT_ENCODERS = ({m["dit"]: m["text_encoder"] for m in E.MODELS.values() if "dit" in m}
                         | {"toy": E.toy_text_encoder, "toy-small": E.toy_text_encoder})


def parser():
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0], argument_default=argparse.SUPPRESS,
                                epilog="Defaults are the paper's, and the released recipe's for the VAE.")
    a = p.add_argument_group("what to train").add_argument
    a("--stage", choices=list(STAGES), help="vae: the waveform VAE; 1: masked diffusion on unlabeled audio; "
                                            "2: add text, CLAP-filtered synthetic captions; 3: human captions; "
                                            "control: an energy ControlNet beside the frozen DiT of --init-from")
    a("--config", help=f"model preset: {', '.join(E.DIT_PRESETS)} (for the VAE stage: {', '.join(E.VAE_PRESETS)}, "
                       "other names mean released); default XL, or the --init-from checkpoint's")
    a("--init-from", help="checkpoint to start from: stage 1's for stage 2, stage 2's for stage 3 (both required; "
                          "`scratch` for random weights), or a released EzAudio file; for the VAE stage a VAE file")
    a("--resume", action="store_true", help="continue the run in --run-dir exactly where its checkpoint stopped")
    a("--run-dir", help="where ckpt.pt, log.txt and samples/ go (default: runs/vae, runs/stage1, ...); one run "
                        "at a time: a second on the same folder is refused")
    a = p.add_argument_group("data").add_argument
    a("--manifest", help="training clips: CSV (audio_path,caption,split[,clap_score]) or JSON Lines")
    a("--data-root", help="folder that relative audio paths start from (default: the manifest's folder)")
    a("--split", help="train on the manifest rows of this split, when it has a split column (default: train)")
    a("--cache", help="folder made by `python data.py cache`: train on its latents and T5 outputs")
    a("--vae", help="VAE that makes the latents: released-format file or VAE-stage checkpoint "
                    "(default: --init-from's, else the released VAE, downloaded)")
    a("--vae-config", help="VAE preset of a released-format --vae file (default: --config's if it is one, "
                           "else released)")
    a("--text-encoder", help="T5 hub name or folder, stages 2 and 3 (default: --init-from's, else flan-t5-xl for XL, "
                             "flan-t5-large for L)")
    a("--segment", type=float, help="seconds of audio per example (default 10; VAE 0.5)")
    a("--flip", type=float, help="probability of flipping a clip's polarity (default 0.5)")
    a("--min-clap", type=float, help="train on rows with clap_score >= this, 0 = all (default 0.40 in stage 2, else 0)")
    a("--workers", type=int, help="data-loading processes per GPU (default 4)")
    a = p.add_argument_group("optimisation").add_argument
    a("--batch-size", type=int, help="examples per process per micro-batch (default 16)")
    a("--accum", type=int, help="micro-batches per optimiser step (default 1)")
    a("--max-steps", type=int, help="optimiser steps (default: 100K, 50K, 30K for stages 1-3; 1M for the VAE)")
    a("--lr", type=float, help="peak learning rate (default: 1e-4, 5e-5, 1e-5 for stages 1-3; VAE 1.5e-4)")
    a("--betas", type=float, nargs=2, help="AdamW betas (default 0.9 0.999; VAE 0.8 0.99)")
    a("--eps", type=float, help="AdamW epsilon (default 1e-8)")
    a("--weight-decay", type=float, help="AdamW weight decay, on Linear and Conv weights only (default 0.01; "
                                         "VAE 1e-3)")
    a("--warmup", type=int, help="steps of learning-rate warm-up: linear in the DiT stages (default 5000), "
                                 "exponential in the VAE stage (default 1000: 1 - 0.999^step)")
    a("--clip", type=float, help="gradient-norm clipping, 0 = off (default 1.0; VAE off)")
    a("--ema", type=float, help="decay of an EMA of the DiT's weights, 0 = none (default 0; e.g. 0.9999)")
    a("--seed", type=int, help="random seed; rank r draws from seed + r (default 0)")
    a("--max-nonfinite", type=int, help="stop after this many non-finite losses in a row (default 20)")
    a = p.add_argument_group("DiT stages").add_argument
    a("--mae-prob", type=float, help="probability that an example is span-masked rather than fully masked "
                                     "(default 0.25; 0.1 in stage 2)")
    a("--min-timestep", type=int, help="DiT stages: draw training timesteps from [this, 1000) only (default 0, the "
                                       "paper's: all); e.g. 600 fine-tunes the noisiest steps, where a clip's "
                                       "layout, such as how many events it has, is decided")
    a("--text-dropout", type=float, help="fraction of captions replaced by \"\" for classifier-free guidance "
                                         "(default 0.1)")
    a = p.add_argument_group("VAE stage").add_argument
    a("--disc-lr", type=float, help="VAE stage: the discriminator's learning rate (default 3e-4)")
    a("--disc-filters", type=int, help="VAE stage: channels of the discriminator's convolutions, 0 = no "
                                       "discriminator, hence no adversarial and feature-matching losses (default 64)")
    a("--wave-weight", type=float, help="VAE stage: weight of the squared error of the samples beside the spectral "
                                        "loss, which ties the phase (default 0, the released recipe)")
    a("--autoencoder", action=argparse.BooleanOptionalAction,
      help="VAE stage: train a plain autoencoder: decode the posterior mean, with the squared error of the samples "
           "as the only loss (no spectral loss, KL or critic); it learns each sound's phase, hence its exact pitch, "
           "which spectral losses leave free. A first step before the full objective (default off)")
    a("--envelope-channels", type=int,
      help="VAE stage: tie the first this many latent channels to each frame's loudness (-1 silent to 1 the clip's "
           "loudest), so that a DiT sees where sounds are while the latent is still mostly noise; the toy world's "
           "count needs it (default 0, the released recipe)")
    a("--stft-floor", type=float, help="VAE stage: added to the magnitudes before the spectral loss takes their log "
                                       "(default 0, the released recipe; 1 for digitally silent audio such as the "
                                       "toy world's, so that a faint hiss costs less than silence)")
    a("--a-weighting", action=argparse.BooleanOptionalAction,
      help="VAE stage: A-weight the audio before the spectral loss (default on, the released recipe; "
           "--no-a-weighting for audio whose low tones matter, such as the toy world's)")
    a = p.add_argument_group("speed and memory").add_argument
    a("--device", choices=["cuda", "cpu"], help="where to train (default: cuda when torch sees a GPU); under "
                                                "torchrun each process takes the GPU numbered by its LOCAL_RANK")
    a("--dtype", choices=["auto", "bf16", "fp16", "fp32"], help="autocast precision: auto = bf16 on GPUs that "
                                                                "have it, else fp16 with loss scaling; fp32 on CPUs")
    a("--compile", action=argparse.BooleanOptionalAction, help="torch.compile the model (default off)")
    a("--grad-checkpointing", action=argparse.BooleanOptionalAction,
      help="recompute each DiT block in the backward pass: less memory, about a third more time (default off)")
    a = p.add_argument_group("logging, checkpoints and previews").add_argument
    a("--log-every", type=int, help="steps between log lines (default 50)")
    a("--save-every", type=int, help="steps between checkpoints (default 5000; also at the end, and on SIGTERM or "
                                     "SIGINT, after which the run exits with status 143 or 130)")
    a("--sample-every", type=int, help="steps between preview samples in <run-dir>/samples, 0 = never (default 5000)")
    a("--sample-steps", type=int, help="DDIM steps of the preview samples (default 50)")
    a("--sample-prompts", nargs="+", help="prompts of the preview samples")
    return p


def fail(message):
    raise SystemExit(f"error: {message}")


RUN_SHAPE = ("config", "vae_config", "vae", "text_encoder", "init_from")  # the flags that decide what a run trains


def refuse_reshaping(given, resumed, path):
    """A resumed run keeps the model it was started with: a flag of RUN_SHAPE given now with another value would be
    ignored by the model yet written into the checkpoint, and the next stage would start from a wrong record."""
    changed = [k for k in RUN_SHAPE if k in given and given[k] != resumed.get(k)]
    if changed:
        flags = ", ".join(f"--{k.replace('_', '-')} {given[k]}" for k in changed)
        runs = ", ".join(f"--{k.replace('_', '-')} {resumed.get(k)}" for k in changed)
        fail(f"{path} is a run of {runs}; a resumed run keeps its model, so leave out {flags} (or start a new run "
             "with another --run-dir)")


def settings(argv=None):
    """Settings in layers: common defaults < the stage's < the starting checkpoint's VAE and text encoder < the
    resumed run's < flags given now. Returns (args, the resumed checkpoint or None, --init-from's or None)."""
    given = vars(parser().parse_args(argv))
    resume = given.pop("resume", False)
    stage = given.get("stage")
    run_dir = given.get("run_dir") or (stage and os.path.join("runs", f"stage{stage}" if stage.isdigit() else stage))
    path = run_dir and os.path.join(run_dir, "ckpt.pt")
    saved = init = None
    try:
        if resume:
            if not run_dir:
                fail("--resume needs the --run-dir to continue")
            saved = E.load_file(path)
            if not E.is_project_checkpoint(saved):
                fail(f"{path} was not written by train.py, so there is no run to resume")
            if stage and stage != str(saved["stage"]):
                fail(f"{path} is a stage-{saved['stage']} run, not stage {stage}")
            stage = str(saved["stage"])
        elif stage is None:
            fail("choose what to train with --stage (vae, 1, 2 or 3)")
        elif os.path.isfile(path):
            fail(f"{path} exists; pass --resume to continue that run, or another --run-dir")
        resumed = {k: v for k, v in (saved["config"]["train"] if saved else {}).items() if v is not None}
        if saved:
            refuse_reshaping(given, resumed, path)
        init_from = given.get("init_from", resumed.get("init_from"))
        if stage == "control" and init_from in (None, "scratch"):
            fail("a ControlNet trains beside a trained DiT: pass its checkpoint (or a released file) with --init-from")
        if stage in ("2", "3") and not init_from and not saved:  # a forgotten flag would cost a whole run, silently
            fail(f"stage {stage} continues stage {int(stage) - 1}: pass its checkpoint with --init-from "
                 f"(e.g. runs/stage{int(stage) - 1}/ckpt.pt), or --init-from scratch to start from random weights")
        if init_from not in (None, "scratch") and not saved:
            init = E.load_file(init_from)
            if not isinstance(init, dict):
                fail(f"{init_from}: neither an EzAudio checkpoint nor one of this project's")
    except E.CheckpointError as e:
        fail(e)
    source = saved or init
    inherited = {}
    if E.is_project_checkpoint(source) and stage != "vae":
        inherited = {"config": source["config"]["train"].get("config"), "vae": source["config"].get("vae_path"),
                     "vae_config": source["config"]["train"].get("vae_config"),
                     "text_encoder": source["config"].get("text_encoder")}
    elif isinstance(init, dict) and isinstance(init.get("model"), dict):  # a released EzAudio file
        released = E.guess_released_model(init["model"])
        inherited = {"config": E.MODELS[released]["dit"] if released else None}
    inherited = {k: v for k, v in inherited.items() if v is not None}
    args = argparse.Namespace(**{**COMMON, **STAGES[stage], **inherited, **resumed, **given, "stage": stage,
                                 "run_dir": run_dir})
    args.betas = tuple(args.betas)
    for name in ("batch_size", "accum", "log_every", "save_every", "max_nonfinite"):
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be 1 or more")
    steps = E.DiffusionConfig.num_train_timesteps
    for bad, message in [
            (not 0 <= args.min_timestep < steps, f"--min-timestep must be 0 to {steps - 1}"),
            (not 1 <= args.sample_steps <= steps, f"--sample-steps must be 1 to {steps}"),
            (args.segment <= 0, "--segment must be > 0"),
            (args.lr <= 0 or args.disc_lr <= 0, "--lr and --disc-lr must be > 0"),
            (not 0 <= args.ema < 1, "--ema must be 0 (none) or a decay below 1"),
            (min(args.workers, args.sample_every, args.disc_filters, args.warmup) < 0,
             "--workers, --sample-every, --disc-filters and --warmup must be 0 or more")]:
        if bad:
            fail(message)
    if args.vae_config and args.vae_config not in E.VAE_PRESETS:
        fail(f"unknown --vae-config {args.vae_config!r}; choose one of {', '.join(E.VAE_PRESETS)}")
    if stage != "vae" and args.config not in E.DIT_PRESETS and not init:
        fail(f"unknown --config {args.config!r}; choose one of {', '.join(E.DIT_PRESETS)}")
    if not args.manifest:
        fail("pass the training clips with --manifest (see README, Training)")
    return args, saved, init


# -----------------------------------------------------------------------------
# 2. Distributed set-up: torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; plain python is rank 0 of 1


def setup_distributed(kind=None):
    """(rank, world size, device) on `kind` (cuda or cpu; default cuda when there is a GPU). Joins the process
    group under torchrun: NCCL on GPUs, one GPU per process on each node, gloo on CPUs."""
    kind = kind or ("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda" and not torch.cuda.is_available():
        fail("--device cuda, but torch sees no GPU; leave out --device to train on the CPU")
    if "RANK" not in os.environ:
        return 0, 1, torch.device(kind)
    rank, local_rank, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    device = torch.device("cpu")
    if kind == "cuda":
        if local_rank >= torch.cuda.device_count():
            fail(f"process {local_rank} of this node has no GPU of its own ({torch.cuda.device_count()} here); "
                 "lower torchrun's --nproc_per_node")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)  # before NCCL starts, so that each process talks from its own GPU
    dist.init_process_group("nccl" if kind == "cuda" else "gloo")
    return rank, world, device


def gather(obj, world):
    """Every rank's `obj`, in rank order, on every rank."""
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


# -----------------------------------------------------------------------------
# 3. The VAE stage (SPEC §3): spectral reconstruction, KL, and a multi-scale STFT critic
#
# The released VAE's losses (official_keys.json, vae.config.training): multi-resolution STFT loss on
# A-weighted audio (1.0), KL (1e-4), hinge adversarial loss (0.1) and feature matching (5.0) against EnCodec's
# multi-scale STFT discriminator. Both players update every step from the same state.

STFT_RESOLUTIONS = [(1280, 320), (640, 160), (320, 80), (160, 40), (80, 20), (40, 10), (20, 5)]  # (FFT, hop)
DISC_RESOLUTIONS = [(1280, 320), (640, 160), (320, 80), (160, 40), (80, 20)]
VAE_LOSS_WEIGHTS = {"stft": 1.0, "kl": 1e-4, "adv": 0.1, "fm": 5.0}


def a_weighting_filter(sample_rate, taps=101):
    """A linear-phase FIR filter following the A-weighting curve (IEC 61672), gain 1 at 1 kHz: the released STFT
    loss's "perceptual weighting", which weighs errors by how loud the ear finds each frequency. (taps,)"""
    def response(f2):
        return 12194 ** 2 * f2 ** 2 / ((f2 + 20.6 ** 2) * ((f2 + 107.7 ** 2) * (f2 + 737.9 ** 2)).sqrt()
                                       * (f2 + 12194 ** 2))
    n = 4096
    f2 = torch.fft.rfftfreq(n, 1 / sample_rate, dtype=torch.float64) ** 2
    impulse = torch.fft.irfft(response(f2) / response(torch.tensor(1000.0 ** 2, dtype=torch.float64)), n)
    kernel = torch.roll(impulse, taps // 2)[:taps] * torch.hann_window(taps, periodic=False, dtype=torch.float64)
    return kernel.float()


def stft_magnitude(x, n_fft, hop):
    """(B, T) -> (B, n_fft // 2 + 1, frames), floored so that its log stays finite."""
    spec = torch.stft(x, n_fft, hop, window=torch.hann_window(n_fft, device=x.device), return_complex=True)
    return (spec.real ** 2 + spec.imag ** 2).clamp(min=1e-8).sqrt()


class MultiResolutionSTFTLoss(nn.Module):
    """Spectral convergence plus log-magnitude L1, averaged over FFT sizes (Yamamoto et al., "Parallel WaveGAN",
    2020), on A-weighted waveforms (unless a_weighting is off), in float32. The log term compares
    log(magnitude + floor): the released recipe's floor 0 suits recordings, which are never silent, but on digitally
    silent audio (the toy world's) it charges a hiss at -60 dB more than no sound at all, and a VAE learns to go
    quiet before it learns to reproduce anything."""

    def __init__(self, sample_rate, resolutions=STFT_RESOLUTIONS, floor=0.0, a_weighting=True):
        super().__init__()
        self.resolutions, self.floor = resolutions, floor
        weighting = a_weighting_filter(sample_rate)[None, None] if a_weighting else None
        self.register_buffer("weighting", weighting, persistent=False)

    def forward(self, fake, real):  # (B, 1, T) each
        with torch.autocast(fake.device.type, enabled=False):
            fake, real = fake.float(), real.float()
            if self.weighting is not None:
                fake, real = (F.conv1d(x, self.weighting, padding=self.weighting.shape[-1] // 2) for x in (fake, real))
            fake, real = fake[:, 0], real[:, 0]  # (B, T)
            total = 0.0
            for n_fft, hop in self.resolutions:
                f, r = stft_magnitude(fake, n_fft, hop), stft_magnitude(real, n_fft, hop)
                log_f, log_r = (f + self.floor).log(), (r + self.floor).log()
                total = total + (r - f).norm() / r.norm() + (log_f - log_r).abs().mean()
        return total / len(self.resolutions)


class STFTDiscriminator(nn.Module):
    """One scale of EnCodec's MS-STFT discriminator (Défossez et al., 2022, Sec. 3.4): 2-D convolutions over the
    complex STFT (real and imaginary parts as two channels), dilated in time and strided in frequency."""

    def __init__(self, filters, n_fft, hop):
        super().__init__()
        self.n_fft, self.hop = n_fft, hop
        self.convs = nn.ModuleList(
            [nn.Conv2d(2, filters, (3, 9), padding=(1, 4))]
            + [nn.Conv2d(filters, filters, (3, 9), stride=(1, 2), dilation=(d, 1), padding=(d, 4)) for d in (1, 2, 4)]
            + [nn.Conv2d(filters, filters, 3, padding=1)])
        self.out = nn.Conv2d(filters, 1, 3, padding=1)

    def forward(self, audio):
        """(B, 1, T) -> logits (B, 1, frames, F') and the feature maps of every layer."""
        with torch.autocast(audio.device.type, enabled=False):
            spec = torch.stft(audio[:, 0].float(), self.n_fft, self.hop, normalized=True, return_complex=True,
                              window=torch.hann_window(self.n_fft, device=audio.device))  # (B, F, frames)
        x = torch.stack([spec.real, spec.imag], dim=1).transpose(2, 3)  # (B, 2, frames, F)
        features = []
        for conv in self.convs:
            x = F.leaky_relu(conv(x), 0.2)
            features.append(x)
        return self.out(x), features


class MultiScaleSTFTDiscriminator(nn.Module):
    def __init__(self, filters=64, resolutions=DISC_RESOLUTIONS):
        super().__init__()
        self.scales = nn.ModuleList([STFTDiscriminator(filters, n_fft, hop) for n_fft, hop in resolutions])

    def forward(self, audio):
        return [scale(audio) for scale in self.scales]


def squared_error(fake, real):
    """Mean squared error of the samples, (B, 1, T) each: zero only when the phase is right too."""
    return (fake.float() - real.float()).pow(2).mean()


def loudness_target(audio, vae_cfg):
    """What --envelope-channels ties latent channels to: the energy envelope (as a ControlNet's condition) at the
    latent rate, from -1 (silent) to 1 (the clip's loudest frame). Not in the released recipe: in a latent that
    holds each sound's phase, a sound barely moves the frames' mean, so a DiT cannot see it at high noise, where
    how many sounds a clip has is decided (README, finding 5). (B, T) -> (B, 1, T // hop)"""
    return 2 * E.energy_envelope(audio, E.ControlConfig(hop=vae_cfg.hop, window=4 * vae_cfg.hop)) - 1


class VAEObjective(nn.Module):
    """Both players' losses in one forward, so that one backward serves both: the VAE's terms see the critic
    through detached weights (they train only the VAE), the critic's hinge loss sees a detached reconstruction
    (it trains only the critic). Without a critic, only the spectral loss and the KL; `wave_weight` adds the squared
    error of the samples (not in the released recipe; it ties the phase, which the spectra leave free). An
    `autoencoder` decodes the posterior mean and learns from that squared error alone. `envelope_channels` adds the
    squared error of that many latent channels against the clip's loudness (`loudness_target`)."""

    def __init__(self, vae, discriminator=None, wave_weight=0.0, stft_floor=0.0, a_weighting=True, autoencoder=False,
                 envelope_channels=0):
        super().__init__()
        self.vae, self.discriminator, self.wave_weight, self.autoencoder = vae, discriminator, wave_weight, autoencoder
        self.envelope_channels = envelope_channels
        self.stft = MultiResolutionSTFTLoss(vae.cfg.sample_rate, floor=stft_floor, a_weighting=a_weighting)

    def forward(self, audio, generator):
        real = audio[:, None]  # (B, 1, T)
        mean, std = self.vae.posterior(real)
        if self.autoencoder:
            z = mean
            parts = {"wave": squared_error(self.vae.decode(z)[..., : real.shape[-1]], real)}
        else:
            z = mean + std * torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            fake = self.vae.decode(z)[..., : real.shape[-1]]
            parts = {"stft": self.stft(fake, real), "kl": E.kl_divergence(mean.float(), std.float())}
            if self.wave_weight:
                parts["wave"] = squared_error(fake, real)
            if self.discriminator is not None:
                parts.update(self.adversarial(real, fake))
        if self.envelope_channels:
            target = loudness_target(audio, self.vae.cfg)
            frames = min(z.shape[-1], target.shape[-1])
            tied = z[:, : self.envelope_channels, :frames].float()  # the draw, so that its noise is tied down too
            parts["envelope"] = (tied - target[..., :frames]).pow(2).mean()
        weights = {**VAE_LOSS_WEIGHTS, "wave": 1.0 if self.autoencoder else self.wave_weight, "disc": 1.0,
                   "envelope": 1.0}
        loss = sum(weights[k] * v for k, v in parts.items())
        return loss, {k: v.detach() for k, v in parts.items()}

    def adversarial(self, real, fake):
        """The VAE's hinge and feature-matching losses against the critic, and the critic's own hinge loss."""
        frozen = {name: p.detach() for name, p in self.discriminator.named_parameters()}
        seen_by_vae = functional_call(self.discriminator, frozen, (fake,))
        seen_by_critic = self.discriminator(torch.cat([real, fake.detach()]))
        adv = fm = critic = 0.0
        for (fake_logits, fake_features), (logits, features) in zip(seen_by_vae, seen_by_critic):
            real_logits, fake_logits_critic = logits.chunk(2)
            adv = adv + F.relu(1 - fake_logits).mean()
            critic = critic + F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits_critic).mean()
            for f, both in zip(fake_features, features):
                r = both.chunk(2)[0].detach()
                fm = fm + (f - r).abs().mean() / r.abs().mean().clamp(min=1e-8)  # relative, as EnCodec's
        scales = len(seen_by_critic)
        return {"adv": adv / scales, "fm": fm / (scales * len(features)), "disc": critic / scales}


# -----------------------------------------------------------------------------
# 4. The DiT stages: the model, its start, its inputs, and preview samples


class DiffusionObjective(nn.Module):
    """The masked-diffusion loss (paper Sec. II-C) as one module, so that DDP wraps a single forward. With a
    ControlNet (SPEC §7), the DiT is steered by it, and random spans of each condition are hidden from it."""

    def __init__(self, dit, min_timestep=0, controlnet=None):
        super().__init__()
        self.dit, self.diffusion, self.min_timestep, self.controlnet = dit, E.Diffusion(), min_timestep, controlnet

    def forward(self, x0, context, context_mask, generator, condition=None):
        hidden = None if condition is None else E.condition_mask(len(x0), condition.shape[-1], generator, x0.device)
        loss = E.diffusion_loss(self.dit, self.diffusion, x0, context, context_mask, generator,
                                min_timestep=self.min_timestep, controlnet=self.controlnet, condition=condition,
                                condition_mask=hidden)
        return loss, {"loss": loss.detach()}


TEXT_PARTS = {"cross_attn", "norm2", "norm_context", "context_embed"}  # what stage 2 adds to a stage-1 model


def hand_over(dit, state, name):
    """Load a previous stage's weights into a freshly initialised `dit`. Parts that are new must be the text
    path (stage 1 -> 2), whose zero-initialised cross-attention output leaves the model's output unchanged."""
    own = dit.state_dict()
    unexpected = [k for k in state if k not in own or state[k].shape != own[k].shape]
    new = [k for k in own if k not in state]
    if unexpected or any(not TEXT_PARTS & set(k.split(".")) for k in new):
        wrong = unexpected or [k for k in new if not TEXT_PARTS & set(k.split("."))]
        fail(f"{name} does not fit the {dit.cfg.dim}-wide, {dit.cfg.depth}-deep model: {', '.join(wrong[:3])}"
             f"{' ...' if len(wrong) > 3 else ''} (a DiT checkpoint of this --config is needed)")
    dit.load_state_dict(state, strict=False)


def build_dit(args, context_dim, init, saved):
    """The DiT to train: the resumed run's shape, or --init-from's weights (its EMA when it has one) handed over,
    or the --config preset from scratch; with the text width of this stage (0 in stage 1)."""
    state = None
    if saved:
        cfg = E.config_from_dict(E.DiTConfig, saved["config"]["dit"])
    elif E.is_project_checkpoint(init):
        if init["config"].get("dit") is None:
            fail(f"{args.init_from} is a VAE checkpoint; a DiT stage starts from a DiT stage's checkpoint")
        cfg, state = E.config_from_dict(E.DiTConfig, init["config"]["dit"]), init.get("ema") or init["model"]
    elif init is not None:  # a released EzAudio file, of the --config preset
        if not isinstance(init.get("model"), dict):
            fail(f"{args.init_from}: neither an EzAudio checkpoint nor one of this project's")
        cfg, state = E.DIT_PRESETS[args.config], init["model"]
    else:
        cfg = E.DIT_PRESETS[args.config]
    dit = E.EzAudioDiT(replace(cfg, context_dim=context_dim, mae_prob=args.mae_prob)).init_weights()
    if state is not None:
        hand_over(dit, state, args.init_from)
    dit.model.grad_checkpointing = args.grad_checkpointing
    return dit


def text_encoder_source(args, source):
    """(hub name or folder, embedded state) of the stages 2-3 text encoder: --text-encoder (or the starting
    checkpoint's name), the starting checkpoint's embedded one, else the --config preset's."""
    if args.text_encoder:
        return args.text_encoder, None
    if source is not None and source.get("text_encoder") is not None:
        return None, source["text_encoder"]
    default = DEFAULT_TEXT_ENCODERS.get(args.config)
    if default is None:
        fail(f"--config {args.config} has no default text encoder; pass --text-encoder (a T5 hub name or folder)")
    return (None, default().state()) if callable(default) else (default, None)


def load_text_encoder(name, state):
    """(encoder, name, embedded state): a ByT5-tokenised encoder is carried inside checkpoints, others by name."""
    try:
        encoder = E.TextEncoder.from_state(state) if state is not None else E.TextEncoder.from_pretrained(name)
    except E.CheckpointError as e:
        fail(e)
    state = state or data.embedded_text_encoder(encoder)
    return encoder, None if state is not None else name, state


def posterior(batch, vae, device):
    """Mean and std (B, C, L) of each clip's latent: from the cache, or encoded now by the frozen VAE."""
    if "mean" in batch:
        return batch["mean"].to(device), batch["std"].to(device)
    with torch.no_grad():
        return vae.posterior(batch["audio"].to(device)[:, None])


def text_condition(batch, text_encoder, empty, dropout, generator, device):
    """Context (B, Lc, D) and mask (B, Lc) of the captions, `dropout` of them replaced by "" so that the model
    also learns the unconditional velocity that classifier-free guidance needs (paper Sec. III)."""
    drop = (torch.rand(len(batch["caption"]), generator=generator, device=generator.device) < dropout).tolist()
    if "context" in batch:  # T5 outputs from the cache
        context, mask = data.stack_contexts([empty if d else c for c, d in zip(batch["context"], drop)])
        return context.to(device), mask.to(device)
    with torch.no_grad():
        return text_encoder(["" if d else c for c, d in zip(batch["caption"], drop)])


def slug(text):
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:40] or "unconditional"


@torch.no_grad()
def write_samples(folder, dit, vae, text_encoder, prompts, frames, steps, amp, controlnet=None, condition=None):
    """Preview clips for fixed prompts (unconditional in stage 1): the paper's CFG, rescale and eta, and `steps`
    DDIM steps (--sample-steps); steered by a ControlNet's `condition` (B, 1, F) when given."""
    device, training = next(dit.parameters()).device, dit.training
    dit.eval()
    diffusion = E.Diffusion().to(device)
    generator = torch.Generator(device).manual_seed(0)
    if text_encoder is not None:
        context, mask = text_encoder(prompts)
        negative = text_encoder([""] * len(prompts))
    else:
        context = mask = None
        negative, prompts = (None, None), [""] * len(prompts)
    with amp:
        latents = diffusion.sample(dit, context, mask, *negative, length=frames, steps=steps, generator=generator,
                                   batch=len(prompts), controlnet=controlnet, condition=condition)
        audio = vae.decode(latents).float().cpu()[:, 0]
    os.makedirs(folder, exist_ok=True)
    for i, (clip, prompt) in enumerate(zip(audio, prompts)):
        sf.write(os.path.join(folder, f"{i}_{slug(prompt)}.wav"), clip.numpy(), vae.cfg.sample_rate)
    dit.train(training)


@torch.no_grad()
def write_reconstructions(folder, vae, audio):
    """The VAE stage's previews: fixed clips and their reconstructions through the posterior mean."""
    vae.eval()
    recon = vae.decode(vae.encode(audio[:, None], sample=False)).float().cpu()[:, 0]
    os.makedirs(folder, exist_ok=True)
    for i, (clip, out) in enumerate(zip(audio.cpu(), recon)):
        sf.write(os.path.join(folder, f"{i}_input.wav"), clip.numpy(), vae.cfg.sample_rate)
        sf.write(os.path.join(folder, f"{i}_reconstruction.wav"), out.numpy(), vae.cfg.sample_rate)
    vae.train()


# -----------------------------------------------------------------------------
# 5. Optimiser, learning rate, EMA, random states, stop signals and batches


def adamw(module, lr, args):
    """AdamW with weight decay on the weights of Linear and Conv layers only: not on biases, norms, Snake
    parameters, weight-norm gains, embeddings or modulation tables. Fused: one kernel for all parameters, on GPUs
    and CPUs alike (on a CPU a toy DiT's step takes 3 ms instead of 9)."""
    decay, rest = [], []
    for m in module.modules():
        for name, p in m.named_parameters(recurse=False):
            layer = isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))
            (decay if layer and name in ("weight", "weight_v") else rest).append(p)
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=args.betas, eps=args.eps, fused=True)


def lr_factor(step, args):
    """DiT stages: linear warm-up, then constant (paper Sec. III). VAE: the released InverseLR schedule, an
    exponential warm-up 1 - (1 - 1/warmup)^(step+1) (warmup 1000: 0.999) times a decay (1 + step / 200000)^-0.5."""
    if args.stage == "vae":
        warm = 1 - (1 - 1 / args.warmup) ** (step + 1) if args.warmup > 0 else 1.0
        return warm * (1 + step / 200_000) ** -0.5
    return min(1.0, (step + 1) / args.warmup) if args.warmup > 0 else 1.0


class EMA:
    """An exponential moving average of the weights, the model that previews and sampling prefer."""

    def __init__(self, model, decay):
        self.model, self.decay = copy.deepcopy(model).eval().requires_grad_(False), decay

    @torch.no_grad()
    def update(self, model):
        for ema, p in zip(self.model.parameters(), model.parameters()):
            ema.lerp_(p, 1 - self.decay)


def rng_state(generator):
    """This process's random states, as plain data."""
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "generator": generator.get_state(),
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
            "cuda": torch.cuda.get_rng_state(generator.device) if generator.device.type == "cuda" else None}


def set_rng_state(state, generator):
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    generator.set_state(state["generator"])
    np.random.set_state((state["numpy"][0], state["numpy"][1].numpy().astype(np.uint32), *state["numpy"][2:]))
    if state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], generator.device)


class StopSignal:
    """Remembers a SIGTERM or SIGINT so that the loop saves and exits after the current step; a second one
    acts at once."""

    def __enter__(self):
        self.received, self.previous = None, {}
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def handle(self, signum, frame):
        self.received = signal.Signals(signum).name
        signal.signal(signum, self.previous[signum])

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def stopped_by(signal_name):
    """The SystemExit of a run that a signal stopped after saving: the status a shell gives a process that signal
    ends, 128 + its number (SIGINT 130, SIGTERM 143), so that `train.py ... && train.py --stage 2 ...` stops there.
    A rank stopped by another rank's signal exits as by SIGTERM, the one torchrun passes on."""
    return SystemExit(128 + signal.Signals[signal_name or "SIGTERM"])


@contextlib.contextmanager
def claimed_run_dir(run_dir):
    """The run folder, made if missing and locked while the block runs, so that a second run on it stops at once
    instead of writing the same checkpoint. The lock is the kernel's (flock on run_dir/lock): it goes with the
    process however that ends, so a crash cannot leave it stuck. Holding it, the run removes a checkpoint that a
    killed run left half-written; leaving, it removes a folder it made that a failed start left empty."""
    made = not os.path.isdir(run_dir)
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "lock"), "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            fail(f"another run (process {lock.read().strip() or '?'}) is using {run_dir}; wait for it to end, or "
                 "pass another --run-dir")
        lock.truncate(0)
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(run_dir, "ckpt.pt.tmp"))
        try:
            yield
        finally:
            if made and os.listdir(run_dir) == ["lock"]:
                os.remove(lock.name)
                os.rmdir(run_dir)


def micro_batches(dataset, position, args, rank, world, pin, skipped):
    """Batches, epoch after epoch. `position` (epoch, batches taken in it) stays current, so that a checkpoint
    resumes mid-epoch at the very next batch; `skipped` gathers the unusable rows met, {row: why}."""
    while True:
        dataset.set_epoch(position["epoch"])
        sampler = data.ShardSampler(len(dataset), rank, world, args.seed, position["epoch"],
                                    position["batch"] * args.batch_size)
        loader = torch.utils.data.DataLoader(dataset, args.batch_size, sampler=sampler, drop_last=True,
                                             num_workers=args.workers, collate_fn=data.collate, pin_memory=pin)
        for batch in loader:
            position["batch"] += 1
            skipped.update(batch["skipped"])
            yield batch
        position.update(epoch=position["epoch"] + 1, batch=0)


# -----------------------------------------------------------------------------
# 6. The two kinds of stage
#
# The VAE stage trains the VAE (and its critic) on audio; a DiT stage trains the DiT on the latents of a frozen VAE,
# with a frozen text encoder from stage 2 on. The loop sees both alike: an `objective` whose forward gives (loss,
# parts) for `inputs(batch)`, the `models` it optimises at their `lrs`, `weights()` for the checkpoint, `load()` to
# resume, and `preview()` to write clips now and then.


def read_data(args):
    """The manifest's rows (with captions in stages 2 and 3) and the cache's meta.pt, or None without --cache."""
    try:
        meta = data.read_cache_meta(args.cache) if args.cache else None
        rows = data.read_manifest(args.manifest, args.data_root, args.split, args.min_clap,
                                  captions=args.stage in TEXT_STAGES)
    except ValueError as e:
        fail(e)
    if args.stage == "vae" and meta:
        fail("the VAE stage trains on audio; leave out --cache")
    if args.stage == "control" and meta and "control" not in meta:
        fail(f"{args.cache} holds no energy envelopes, which a ControlNet learns from; make it again with "
             "`python data.py cache`, or leave out --cache")
    if args.stage in TEXT_STAGES and meta and meta["empty"] is None:
        fail(f"{args.cache} holds no T5 outputs; make it with `python data.py cache --text-encoder ...`")
    return rows, meta


def vae_preset(args):
    return E.VAE_PRESETS[args.vae_config or (args.config if args.config in E.VAE_PRESETS else "released")]


class VAEStage:
    """The waveform VAE and, unless --disc-filters 0, its multi-scale STFT critic (SPEC §3), on audio."""

    def __init__(self, args, saved, init, device):
        try:  # a resumed run keeps its own shape (from --init-from, maybe, not --config); its weights load later
            self.vae = (E.WaveformVAE(E.config_from_dict(E.VAEConfig, saved["config"]["vae"])) if saved
                        else E.vae_from_checkpoint(init, vae_preset(args), args.init_from) if init is not None
                        else E.WaveformVAE(vae_preset(args)))
        except (E.CheckpointError, KeyError) as e:
            fail(e)
        self.vae_cfg = self.vae.cfg
        if not 0 <= args.envelope_channels <= self.vae_cfg.latent_dim:
            fail(f"--envelope-channels must be 0 to the VAE's {self.vae_cfg.latent_dim} latent channels")
        critic = args.disc_filters > 0 and not args.autoencoder
        self.discriminator = MultiScaleSTFTDiscriminator(args.disc_filters) if critic else None
        self.objective = VAEObjective(self.vae, self.discriminator, args.wave_weight, args.stft_floor,
                                      args.a_weighting, args.autoencoder, args.envelope_channels).to(device)
        self.models, self.lrs = [self.vae], [args.lr]
        if self.discriminator:
            self.models, self.lrs = [self.vae, self.discriminator], [args.lr, args.disc_lr]
        self.clips = None  # the clips that previews reconstruct, the same ones all run long

    def inputs(self, batch, generator, device):
        return batch["audio"].to(device, non_blocking=True), generator

    def after_step(self):
        pass

    def weights(self):
        return {"config": {"dit": None, "vae": asdict(self.vae_cfg), "vae_path": None, "text_encoder": None},
                "model": None, "ema": None, "vae": self.vae.state_dict(),
                "discriminator": self.discriminator.state_dict() if self.discriminator else None,
                "text_encoder": None}

    def load(self, saved, name):
        for key, m in zip(("vae", "discriminator"), self.models):
            if saved[key] is None:
                raise E.CheckpointError(f"{name} holds no {key}")
            E.load_weights(m, saved[key], name)

    def preview(self, folder, dataset, args, autocast):
        if self.clips is None:
            self.clips = data.collate([dataset[i] for i in range(min(4, len(dataset)))])["audio"]
        write_reconstructions(folder, self.vae, self.clips.to(next(self.vae.parameters()).device))


class DiTStage:
    """EzAudio-DiT on the latents of a frozen VAE (from the cache, or encoded as it goes), with the captions' T5
    outputs in stages 2 and 3; an EMA of its weights with --ema. Without previews, a cached run loads neither the VAE
    nor the text encoder."""

    def __init__(self, args, saved, init, meta, preview, device):
        if meta and args.vae and os.path.abspath(args.vae) != meta["vae_path"]:  # the cached latents are its VAE's
            fail(f"{args.cache} holds latents of the VAE {meta['vae_path']}, but this run's is {args.vae} (--vae, or "
                 "--init-from's); make a cache with that VAE, or train on this cache with its own")
        if meta and args.stage in TEXT_STAGES and args.text_encoder and args.text_encoder != meta["text_encoder"]:
            fail(f"{args.cache} holds T5 outputs of {meta['text_encoder'] or 'an embedded encoder'}, but this "
                 f"run's text encoder is {args.text_encoder}; make a cache with it, or train with the cache's own")
        self.vae = self.text_encoder = self.text_name = self.text_state = None
        self.vae_path = meta["vae_path"] if meta else args.vae
        if meta is None or preview:  # with a cache, the VAE only decodes previews
            try:
                self.vae, self.vae_path = data.load_vae(self.vae_path, E.config_from_dict(E.VAEConfig, meta["vae"])
                                                        if meta else vae_preset(args))
            except (E.CheckpointError, ValueError) as e:
                fail(e)
            self.vae = self.vae.to(device)
        self.vae_cfg = self.vae.cfg if self.vae is not None else E.config_from_dict(E.VAEConfig, meta["vae"])
        context_dim = 0
        if args.stage in TEXT_STAGES:
            source = saved or (init if E.is_project_checkpoint(init) else None)
            self.text_name, self.text_state = ((meta["text_encoder"], meta["text_encoder_state"]) if meta
                                               else text_encoder_source(args, source))
            if meta is None or preview:  # with a cache, the text encoder only prompts previews
                self.text_encoder, self.text_name, self.text_state = load_text_encoder(self.text_name, self.text_state)
                self.text_encoder = self.text_encoder.to(device)
            context_dim = self.text_encoder.dim if self.text_encoder is not None else meta["empty"].shape[-1]
        self.build(args, saved, init, context_dim, device)
        if self.dit.cfg.latent_dim != self.vae_cfg.latent_dim:
            fitting = [name for name, cfg in E.DIT_PRESETS.items() if cfg.latent_dim == self.vae_cfg.latent_dim]
            fail(f"the VAE's latent_dim {self.vae_cfg.latent_dim} does not match the DiT's {self.dit.cfg.latent_dim}; "
                 f"pass the matching --vae (and --vae-config), or a --config of that latent_dim "
                 f"({', '.join(fitting) or 'none'})")
        self.ema = EMA(self.models[0], args.ema) if args.ema > 0 else None
        self.empty = meta["empty"].float() if meta and meta["empty"] is not None else None
        self.text_dropout = args.text_dropout

    def build(self, args, saved, init, context_dim, device):
        """The model that trains, and its objective."""
        self.dit = build_dit(args, context_dim, init, saved)
        self.objective = DiffusionObjective(self.dit, args.min_timestep).to(device)
        self.models, self.lrs = [self.dit], [args.lr]

    def inputs(self, batch, generator, device):
        """x0 (B, C, L) sampled from each clip's posterior, and the captions' context (B, Lc, D) and mask."""
        mean, std = posterior(batch, self.vae, device)
        x0 = mean + std * torch.randn(mean.shape, generator=generator, device=device)
        context = mask = None
        if self.dit.cfg.context_dim:
            context, mask = text_condition(batch, self.text_encoder, self.empty, self.text_dropout, generator, device)
        return x0, context, mask, generator

    def after_step(self):
        if self.ema:
            self.ema.update(self.models[0])

    def weights(self):
        return {"config": {"dit": asdict(self.dit.cfg), "vae": asdict(self.vae_cfg), "vae_path": self.vae_path,
                           "text_encoder": self.text_name},
                "model": self.models[0].state_dict(), "ema": self.ema.model.state_dict() if self.ema else None,
                "vae": None, "discriminator": None, "text_encoder": self.text_state}

    def load(self, saved, name):
        E.load_weights(self.models[0], saved["model"], name)
        if self.ema:
            E.load_weights(self.ema.model, saved["ema"] or saved["model"], name)

    def preview(self, folder, dataset, args, autocast):
        write_samples(folder, self.ema.model if self.ema else self.dit, self.vae, self.text_encoder,
                      args.sample_prompts, dataset.frames, args.sample_steps, autocast())


class ControlStage(DiTStage):
    """EzAudio-ControlNet (SPEC §7), trained beside the frozen DiT of --init-from: a copy of the DiT's input half
    that learns to steer it by each clip's energy envelope (from the audio, or the cache), with random spans of it
    hidden so that the text still counts. Its checkpoint holds the ControlNet as `model` and names the DiT
    (`config["base"]`)."""

    def build(self, args, saved, init, context_dim, device):
        self.base = saved["config"]["base"] if saved else os.path.abspath(args.init_from)
        try:  # a resumed run reloads the DiT it names
            base = init if init is not None else E.load_file(self.base)
        except E.CheckpointError as e:
            fail(e)
        self.dit = build_dit(args, context_dim, base, None).to(device).eval().requires_grad_(False)
        self.control = E.ControlConfig.for_vae(self.vae_cfg)
        self.controlnet = E.ControlNet.from_dit(self.dit, self.control)
        self.objective = DiffusionObjective(self.dit, args.min_timestep, self.controlnet).to(device)
        self.models, self.lrs = [self.controlnet], [args.lr]
        self.clips = None  # the references and captions of the previews

    def inputs(self, batch, generator, device):
        """DiTStage's, and the clips' energy envelopes (B, 1, 2L)."""
        energy = batch["energy"] if "energy" in batch else E.energy_envelope(batch["audio"], self.control)
        return *super().inputs(batch, generator, device), energy.to(device)

    def weights(self):
        weights = super().weights()
        weights["config"].update(base=self.base, control=asdict(self.control))
        return weights

    def preview(self, folder, dataset, args, autocast):
        """Samples for the first clips' captions that follow the clips' loudness."""
        if self.clips is None:
            batch = data.collate([dataset[i] for i in range(min(4, len(dataset)))])
            energy = batch["energy"] if "energy" in batch else E.energy_envelope(batch["audio"], self.control)
            self.clips = energy.to(self.dit.mask_embed.device), batch["caption"]
        condition, captions = self.clips
        write_samples(folder, self.dit, self.vae, self.text_encoder, captions, dataset.frames, args.sample_steps,
                      autocast(), self.ema.model if self.ema else self.controlnet, condition)


def load_dataset(args, rows, meta, vae_cfg, world):
    """Examples of `--segment` seconds: cached posteriors, or audio clips; `frames` latent frames each."""
    frames = max(1, round(args.segment * vae_cfg.sample_rate / vae_cfg.hop))
    shortest = STFT_RESOLUTIONS[0][0] // 2 + 1  # the spectral loss pads its longest window by half, by reflection
    if args.stage == "vae" and frames * vae_cfg.hop < shortest:
        fail(f"--segment {args.segment:g} is too short for the VAE stage's spectral loss: it needs "
             f"{shortest / vae_cfg.sample_rate:.3f} s ({shortest} samples) or more")
    try:
        dataset = (data.CachedClips(rows, args.cache, frames, args.seed) if meta else
                   data.AudioClips(rows, vae_cfg.sample_rate, frames * vae_cfg.hop, args.seed, args.flip))
    except ValueError as e:
        fail(e)
    if math.ceil(len(dataset) / world) < args.batch_size:
        fail(f"{len(dataset)} clips are fewer than --batch-size {args.batch_size} per process x {world} processes")
    dataset.frames = frames
    return dataset


# -----------------------------------------------------------------------------
# 7. The training loop: precision, resume, one step, the log line, checkpoints


def precision(dtype, device):
    """(autocast factory, GradScaler) for --dtype: auto is bf16 on GPUs that have it, else fp16, and fp32 on CPUs.
    Only fp16 scales its loss: its range is too narrow for small gradients."""
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}.get(dtype)
    if dtype == "auto":
        amp_dtype = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if cuda else None
    autocast = lambda: torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)
    return autocast, torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16), amp_dtype


def resume(stage, optimizers, scaler, generator, saved, args, rank, world, log):
    """Weights, optimiser, loss scale, random states and data position exactly as they were saved. Returns (step,
    position)."""
    name = f"{args.run_dir}/ckpt.pt"
    try:
        stage.load(saved, name)
    except E.CheckpointError as e:
        fail(f"{e}; resume with the run's own model flags")
    for opt, state in zip(optimizers, saved["optimizer"]):
        opt.load_state_dict(state)
    if saved["scaler"]:  # empty when the run did not scale its loss (fp32, bf16)
        scaler.load_state_dict(saved["scaler"])
    position = dict(saved["data"])
    if rank < len(saved["rng"]):
        set_rng_state(saved["rng"][rank], generator)
    if (position.pop("world_size"), position.pop("batch_size")) != (world, args.batch_size):
        log(f"warning: resumed with another number of processes or --batch-size; the data order restarts "
            f"at the beginning of epoch {position['epoch']}")
        position["batch"] = 0
    return saved["step"], position


def train_step(model, stage, optimizers, scaler, batches, autocast, args, generator, device, world, stop):
    """One optimiser step: --accum micro-batches forward and backward (DDP averages the gradients on the last one
    only), one all-reduce of the losses and of whether any process was told to stop, then clipping, the optimisers
    and the EMA, all skipped when the loss is not finite. Returns (mean losses, gradient norm, finite, stopping)."""
    sums = {}
    for micro in range(args.accum):
        try:
            batch = next(batches)
        except data.AudioError:
            fail(f"no row of {args.manifest} can be loaded; see `python data.py check --manifest {args.manifest}`")
        last = micro == args.accum - 1
        with (model.no_sync() if world > 1 and not last else contextlib.nullcontext()), autocast():
            loss, parts = model(*stage.inputs(batch, generator, device))
        scaler.scale(loss / args.accum).backward()
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + v.float() / args.accum
    names = list(sums)
    shared = torch.stack([sums[k] for k in names] + [torch.tensor(float(stop.received is not None), device=device)])
    if world > 1:
        dist.all_reduce(shared)
        shared[:-1] /= world
    shared = shared.cpu()
    values = dict(zip(names, shared[:-1].tolist()))
    finite, grad = all(math.isfinite(v) for v in values.values()), float("nan")
    if finite:
        for i, opt in enumerate(optimizers):
            scaler.unscale_(opt)
            params = [p for group in opt.param_groups for p in group["params"]]
            norm = float(nn.utils.clip_grad_norm_(params, args.clip if args.clip > 0 else float("inf")))
            grad = norm if i == 0 else grad
            finite &= scaler.is_enabled() or math.isfinite(norm)  # fp16: the scaler skips inf steps itself
    if finite:
        for opt in optimizers:
            scaler.step(opt)
        scaler.update()
        stage.after_step()
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    return values, grad, finite, bool(shared[-1] > 0)


class Log:
    """The log line (README), written by rank 0 to the console and <run-dir>/log.txt: the means over the finite
    steps since the last line (a skipped step is counted at the end, so that it does not hide the rest), the
    throughput, and rows and steps skipped. Rank 0 warns once about each bad row, whichever process met it."""

    def __init__(self, args, master, world, frames, device):
        self.args, self.master, self.world, self.frames, self.device = args, master, world, frames, device
        self.skipped, self.warned, self.nonfinite, self.in_a_row = {}, set(), 0, 0  # skipped: {row: why}, ours
        self.start, self.steps, self.losses, self.grads = time.time(), 0, [], []

    def __call__(self, line):
        if self.master:
            tqdm.write(line)
            with open(os.path.join(self.args.run_dir, "log.txt"), "a") as f:
                f.write(line + "\n")

    def record(self, step, values, grad, finite):
        self.steps += 1
        self.losses += [values] if finite else []
        self.grads += [grad] if math.isfinite(grad) else []  # fp16: inf while the loss scale settles
        self.nonfinite, self.in_a_row = self.nonfinite + (not finite), 0 if finite else self.in_a_row + 1
        if self.in_a_row >= self.args.max_nonfinite:
            fail(f"{self.in_a_row} non-finite losses in a row up to step {step}: the run diverged; resume "
                 "from the last checkpoint with a lower --lr (or --dtype fp32)")

    def report(self, step, names, lr):
        """The log line of the steps since the last one (which every process must call together)."""
        every = {row: why for part in gather(self.skipped, self.world) for row, why in part.items()}
        for row in sorted(every.keys() - self.warned):
            self(f"warning: skipping manifest row {row}: {every[row]}")
        self.warned |= every.keys()
        examples = self.steps * self.args.batch_size * self.args.accum * self.world / (time.time() - self.start)
        mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")
        line = (f"step {step}/{self.args.max_steps} | "
                + " | ".join(f"{k} {mean([v[k] for v in self.losses]):.5g}" for k in names)
                + f" | lr {lr:.3g} | grad {mean(self.grads):.4g}"
                + f" | {examples:.1f} samples/s | {examples * self.frames:.0f} frames/s"
                + (f" | mem {torch.cuda.max_memory_allocated(self.device) / 2 ** 30:.1f} GiB"
                   if self.device.type == "cuda" else "")
                + f" | skipped {len(self.warned)} rows, {self.nonfinite} steps")
        self(line)
        self.start, self.steps, self.losses, self.grads = time.time(), 0, [], []
        return line


def save(stage, optimizers, scaler, generator, step, position, args, rank, world, log):
    """<run-dir>/ckpt.pt, atomically: the stage's weights and configs, and all it takes to resume exactly. Under DDP
    the replicas must agree first: weights that drifted apart mean a broken run."""
    rngs = gather(rng_state(generator), world)
    if world > 1 and len(set(gather(data.fingerprint(stage.objective.state_dict()), world))) > 1:
        fail(f"the {world} replicas' weights differ at step {step}; the run is broken, resume from the last "
             "checkpoint")
    if rank != 0:
        return
    weights = stage.weights()
    weights["config"]["train"] = vars(args)
    ckpt = {"format": "ezaudio", "stage": int(args.stage) if args.stage.isdigit() else args.stage, "step": step,
            **weights, "optimizer": [o.state_dict() for o in optimizers], "scaler": scaler.state_dict(),
            "rng": rngs, "data": {**position, "world_size": world, "batch_size": args.batch_size}}
    path = os.path.join(args.run_dir, "ckpt.pt")
    data.save_atomic(ckpt, path)
    log(f"saved {path} at step {step}" + (f"; the {world} replicas hold identical weights" if world > 1 else ""))


def main(argv=None):
    args, saved, init = settings(argv)
    rank, world, device = setup_distributed(args.device)
    try:
        with claimed_run_dir(args.run_dir) if rank == 0 else contextlib.nullcontext():
            train(args, saved, init, rank, world, device)
    except data.DiskFull as e:
        fail(e)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def train(args, saved, init, rank, world, device):
    """Build the stage, resume it or start it, then step until --max-steps, logging, saving and previewing on the
    way; SIGTERM or Ctrl-C saves and stops after the current step."""
    master = rank == 0
    torch.manual_seed(args.seed + rank)
    np.random.seed(args.seed + rank)
    random.seed(args.seed + rank)
    generator = torch.Generator(device).manual_seed(args.seed + rank)  # timesteps, noise, masks, caption dropout
    autocast, scaler, amp_dtype = precision(args.dtype, device)
    rows, meta = read_data(args)
    preview = master and args.sample_every > 0
    if args.stage == "vae":
        stage = VAEStage(args, saved, init, device)
    else:
        stage = (ControlStage if args.stage == "control" else DiTStage)(args, saved, init, meta, preview, device)
    dataset = load_dataset(args, rows, meta, stage.vae_cfg, world)
    optimizers = [adamw(m, lr, args) for m, lr in zip(stage.models, stage.lrs)]
    log = Log(args, master, world, dataset.frames, device)
    step, position = 0, {"epoch": 0, "batch": 0}
    if saved:
        step, position = resume(stage, optimizers, scaler, generator, saved, args, rank, world, log)
    model = torch.compile(stage.objective) if args.compile else stage.objective
    if world > 1:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    if master:
        n = sum(p.numel() for m in stage.models for p in m.parameters())
        log(f"stage {args.stage}: {n:,} parameters, {len(dataset)} clips, {dataset.frames} latent frames per example, "
            f"{args.batch_size} x {args.accum} x {world} examples per step, {device.type}"
            f"{f' {amp_dtype}' if amp_dtype else ' fp32'}" + (f", resumed at step {step}" if saved else ""))
    batches = micro_batches(dataset, position, args, rank, world, device.type == "cuda", log.skipped)
    checkpoint = lambda: save(stage, optimizers, scaler, generator, step, position, args, rank, world, log)
    bar = tqdm(total=args.max_steps, initial=step, disable=not master, unit="step", dynamic_ncols=True)
    with StopSignal() as stop:
        while step < args.max_steps:
            for opt, base in zip(optimizers, stage.lrs):
                for group in opt.param_groups:
                    group["lr"] = base * lr_factor(step, args)
            values, grad, finite, stopping = train_step(model, stage, optimizers, scaler, batches, autocast, args,
                                                        generator, device, world, stop)
            step += 1
            bar.update(1)
            log.record(step, values, grad, finite)
            if step % args.log_every == 0 or step == args.max_steps:
                line = log.report(step, list(values), optimizers[0].param_groups[0]["lr"])
                bar.set_postfix_str(line.split(" | ", 1)[1][:60])
            if step % args.save_every == 0 or stopping:
                checkpoint()
            if preview and step % args.sample_every == 0:
                stage.preview(os.path.join(args.run_dir, "samples", f"step{step:07d}"), dataset, args, autocast)
            if stopping:
                log(f"stopped by {stop.received or 'another rank'} at step {step}; continue with --resume")
                raise stopped_by(stop.received)
        else:  # finished (or nothing left to do): the final checkpoint
            if step % args.save_every or step == 0:
                checkpoint()
    bar.close()


if __name__ == "__main__":
    main()
