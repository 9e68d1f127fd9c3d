"""
Data for EzAudio: reading audio, manifests, the latent/text cache, and the toy world.

The paper trains on AudioSet (stage 1, no captions), CLAP-filtered synthetic captions (stage 2) and AudioCaps
(stage 3) (arXiv 2409.10819, Sec. III). This file turns such collections into batches for train.py.
"""

import math

import numpy as np
import torch
import torch.nn.functional as F

COMMANDS = []  # the command line's subcommands: functions(subparsers) that add one each, with set_defaults(run=...)

# -----------------------------------------------------------------------------
# Reading and resampling audio


class AudioError(ValueError):
    """An audio file that is missing, unreadable or empty; the message is one line for the user."""


def resample(audio, sr_in, sr_out, zero_crossings=16, rolloff=0.99):
    """Band-limited resampling by windowed-sinc interpolation (J. O. Smith, "Digital Audio Resampling").
    Works on the last dim: (..., T) -> (..., ceil(T * sr_out / sr_in)).

    Both rates are reduced to coprime `up`/`down`; each of the `up` output phases gets its own filter: a sinc
    low-passed at `rolloff` times the lower Nyquist rate, under a Hann window `zero_crossings` lobes wide."""
    if sr_in == sr_out:
        return audio
    g = math.gcd(sr_in, sr_out)
    up, down = sr_out // g, sr_in // g
    cutoff = min(up, down) * rolloff  # in units of the reduced input rate `down`
    width = math.ceil(zero_crossings * down / cutoff)  # filter half-width, in input samples
    taps = torch.arange(-width, width + down, dtype=torch.float64) / down  # (K,) input offsets
    phases = -torch.arange(up, dtype=torch.float64)[:, None] / up  # (up, 1) output phase offsets
    t = ((taps[None] + phases) * cutoff).clamp(-zero_crossings, zero_crossings)  # (up, K), in sinc lobes
    window = torch.cos(t * math.pi / zero_crossings / 2) ** 2
    kernels = (torch.sinc(t) * window * cutoff / down).to(audio.dtype)  # (up, K)
    shape, T = audio.shape[:-1], audio.shape[-1]
    x = F.pad(audio.reshape(-1, 1, T), (width, width + down))
    y = F.conv1d(x, kernels[:, None].to(audio.device), stride=down)  # (N, up, frames)
    y = y.transpose(1, 2).reshape(*shape, -1)
    return y[..., : math.ceil(T * up / down)]


def read_audio(path, sample_rate):
    """A file as mono float32 (T,) at `sample_rate`: channels averaged, resampled when its rate differs."""
    import soundfile as sf
    try:
        audio, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except FileNotFoundError:
        raise AudioError(f"{path}: no such file") from None
    except Exception as e:
        raise AudioError(f"{path}: not a readable audio file ({str(e).splitlines()[0][:120]})") from None
    if audio.shape[0] == 0:
        raise AudioError(f"{path}: the file holds no audio")
    return resample(torch.from_numpy(np.ascontiguousarray(audio.mean(1))), sr, sample_rate)


# -----------------------------------------------------------------------------
# Command line: python data.py {check,cache,clap,toy,toy-score} ...


def main(argv=None):
    import argparse
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    # each subcommand registers its flags and its function in its own section above
    for register in COMMANDS:
        register(sub)
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except (AudioError, FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}")

if __name__ == "__main__":
    main()
