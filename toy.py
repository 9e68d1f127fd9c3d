"""
The toy world: captioned sounds that a CPU learns in minutes and a program can check (our shakespeare_char).

EzAudio (arXiv 2409.10819) learns from millions of captioned clips; this world is small enough to train every stage
on a laptop, and simple enough that `measure` can tell whether a generated clip fits its caption.

    python toy.py make --out toy                   # 4200 training and 210 test clips with manifests
    python toy.py score samples/                   # how well WAVs fit the captions in their names
    python toy.py roundtrip toy                    # how well the toy VAE alone keeps them
    python toy.py spectrogram samples/ --out toy.png
    python toy.py pack --ckpt runs/toy3/ckpt.pt --out assets/toy.pt

Read top to bottom: 1. facts and captions  2. rendering  3. the judge  4. the data set  5. a VAE's round trip
6. following a reference  7. pictures  8. packing a trained model  9. the command line.
"""

import argparse
import math
import os
import zlib
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from tqdm import tqdm

import ezaudio as E
from data import AudioError, load_vae, read_audio, read_manifest, run_command, save_atomic, write_manifest


# -----------------------------------------------------------------------------
# 1. Facts and captions
#
# Clips of 2 s at 16 kHz, peak 0.5, silence between events, of 21 kinds: "{count} {pitch} {timbre}" tones
# (one/two/three; low 220-280 Hz, middle 440-560 Hz, high 880-1120 Hz; beep = sine, buzz = band-limited
# square), "a rising whistle" / "a falling whistle" (a sine glide between 300 and 1200 Hz) and "a burst of noise".
# A sound is described by its facts, a dict: kind ("tone", "whistle", "noise"), and count, pitch, timbre for
# tones or direction for whistles.

SAMPLE_RATE, SECONDS, PEAK = 16000, 2.0, 0.5

COUNTS = {"one": 1, "two": 2, "three": 3}

PITCHES = {"low": (220.0, 280.0), "middle": (440.0, 560.0), "high": (880.0, 1120.0)}  # fundamental, Hz

PLURALS = {"beep": "beeps", "buzz": "buzzes"}

PROPERTIES = ("kind", "count", "pitch", "timbre", "direction")

CLASSES = ([{"kind": "tone", "count": c, "pitch": p, "timbre": t}
            for c in COUNTS.values() for p in PITCHES for t in PLURALS]
           + [{"kind": "whistle", "direction": d} for d in ("rising", "falling")] + [{"kind": "noise"}])

TIMES = {1: "once", 2: "twice", 3: "three times"}

PARAPHRASES = {  # besides the canonical caption; {times} is once / twice / three times
    "tone": ("{pitch} {timbre}, {times}", "a {pitch}-pitched {timbre} {times}", "{times}, a {pitch} {timbre}"),
    "whistle": ("a whistle {goes}", "a {direction} whistling tone"),
    "noise": ("a short noise burst", "white noise"),
}


def canonical_caption(facts):
    """The canonical caption: "two high beeps", "one low buzz", "a rising whistle", "a burst of noise"."""
    if facts["kind"] == "tone":
        word = {v: k for k, v in COUNTS.items()}[facts["count"]]
        timbre = facts["timbre"] if facts["count"] == 1 else PLURALS[facts["timbre"]]
        return f"{word} {facts['pitch']} {timbre}"
    return f"a {facts['direction']} whistle" if facts["kind"] == "whistle" else "a burst of noise"


CAPTIONS = [canonical_caption(f) for f in CLASSES]


def paraphrase(facts, rng):
    """One of a few other phrasings of the same facts, picked by the numpy Generator `rng`."""
    template = PARAPHRASES[facts["kind"]][rng.integers(len(PARAPHRASES[facts["kind"]]))]
    return template.format(times=TIMES.get(facts.get("count")), pitch=facts.get("pitch"),
                           timbre=facts.get("timbre"), direction=facts.get("direction"),
                           goes="going up" if facts.get("direction") == "rising" else "going down")


def parse_caption(caption):
    """The facts a caption states (canonical or paraphrased), read from its words; None for a caption that
    names no toy sound."""
    words = set(caption.lower().replace("-", " ").replace("_", " ").replace(",", " ").split())
    if "noise" in words:
        return {"kind": "noise"}
    if words & {"whistle", "whistling", "whistles"}:
        rising, falling = words & {"rising", "up", "rises"}, words & {"falling", "down", "falls"}
        return {"kind": "whistle", "direction": "rising" if rising else "falling" if falling else None}
    if not words & {"beep", "beeps", "buzz", "buzzes", "tone", "tones"}:
        return None
    timbre = "beep" if words & {"beep", "beeps"} else "buzz" if words & {"buzz", "buzzes"} else None
    count = next((n for w, n in {**COUNTS, "once": 1, "twice": 2}.items() if w in words), None)
    pitch = next((p for p in PITCHES if p in words), None)
    return {"kind": "tone", "count": count, "pitch": pitch, "timbre": timbre}


# -----------------------------------------------------------------------------
# 2. Rendering: facts to a clip

def _fade(n, sr):
    """A gain curve of n samples with 10 ms raised-cosine fades in and out."""
    ramp = np.sin(np.linspace(0, np.pi / 2, int(0.01 * sr))) ** 2
    gain = np.ones(n)
    gain[: len(ramp)], gain[n - len(ramp):] = ramp, ramp[::-1]
    return gain


def _place(durations, gap, total, rng, margin=0.05):
    """Random start times (s) for events of the given durations, in order, at least `gap` s apart, inside
    [margin, total - margin]."""
    slack = total - 2 * margin - sum(durations) - gap * (len(durations) - 1)
    offsets = np.sort(rng.uniform(0, slack, len(durations)))
    before = np.concatenate([[0.0], np.cumsum(np.asarray(durations[:-1]) + gap)])
    return margin + offsets + before


def render(facts, rng, sr=SAMPLE_RATE):
    """One clip (T,) float32 of the sound the facts describe; all randomness comes from numpy Generator `rng`."""
    audio = np.zeros(int(SECONDS * sr))
    if facts["kind"] == "tone":
        f0 = rng.uniform(*PITCHES[facts["pitch"]])
        # a square wave is the odd harmonics at 1/k; only those below 7.2 kHz, so that nothing aliases
        harmonics = np.arange(1, int(0.45 * sr / f0) + 1, 2) if facts["timbre"] == "buzz" else np.ones(1)
        durations = list(rng.uniform(0.2, 0.3, facts["count"]))
        events = []
        for d in durations:
            t = np.arange(int(d * sr)) / sr
            events.append((np.sin(2 * np.pi * f0 * harmonics[:, None] * t) / harmonics[:, None]).sum(0))
    elif facts["kind"] == "whistle":
        d = rng.uniform(0.8, 1.5)
        lo, hi = rng.uniform(300, 400), rng.uniform(900, 1200)
        f_start, f_end = (lo, hi) if facts["direction"] == "rising" else (hi, lo)
        t = np.arange(int(d * sr)) / sr
        k = math.log(f_end / f_start) / d  # an exponential glide: f(t) = f_start e^(k t), phase its integral
        durations, events = [d], [np.sin(2 * np.pi * f_start * np.expm1(k * t) / k)]
    else:
        d = rng.uniform(0.3, 1.0)
        durations, events = [d], [rng.standard_normal(int(d * sr))]
    for start, event in zip(_place(durations, 0.15, SECONDS, rng), events):
        i = int(start * sr)
        audio[i: i + len(event)] = event * _fade(len(event), sr)
    return (audio * (PEAK / np.abs(audio).max())).astype(np.float32)


# -----------------------------------------------------------------------------
# 3. The judge: the facts a listener hears in a clip
#
# Written from `render`, never from a model's output: every sound lies in 100-7000 Hz and peaks at PEAK; noise is
# white (flat, about 70% of its energy above 2 kHz); a whistle glides more than an octave (from 300-400 Hz to
# 900-1200 Hz or back); a tone holds one pitch inside its caption's band. Loudness is absolute, as the world plays
# it: clips are not normalised first, so that near silence cannot pass for a sound.

BAND = (100.0, 7000.0)  # Hz; every toy sound lies here, a decoder's hum or DC offset does not
SILENCE = PEAK / 5  # a clip whose peak within BAND is under this, 14 dB below the world's, is heard as silence
NOISE_PEAK = PEAK / 2  # the world's noise peaks at PEAK (about 0.45 within BAND); a fainter hiss is not it
NOISE_FLATNESS = 0.3  # median frame flatness within BAND: white noise about 0.55, a tone or a rumble under 0.05
NOISE_HIGH_SHARE = 0.4  # share of the energy within BAND above 2 kHz: white noise about 0.72, a low buzz 0.05
GLIDE = 0.5  # octaves a whistle moves at least, the right way; the world's glide 1.17 or more
PITCH_TOLERANCE = 0.03  # beyond each band's edges, for error of measurement only
PITCHED = 0.5  # share of a tone's energy within BAND at its first 9 harmonics: the world's 0.96 or more


def stft_power(audio, n_fft, hop):
    """(frames, n_fft // 2 + 1) power of a clip (T,) in Hann windows, frame i centred on sample i * hop."""
    frames = np.lib.stride_tricks.sliding_window_view(np.pad(np.asarray(audio, np.float64), n_fft // 2), n_fft)
    return np.abs(np.fft.rfft(frames[::hop] * np.hanning(n_fft), axis=-1)) ** 2


def loudness(audio, sr=SAMPLE_RATE):
    """The peak of a clip (T,) within BAND: its level as heard, without DC or hum (the world's clips: PEAK)."""
    spectrum = np.fft.rfft(np.asarray(audio, np.float64))
    freqs = np.fft.rfftfreq(len(audio), 1 / sr)
    return np.abs(np.fft.irfft(spectrum * ((freqs >= BAND[0]) & (freqs <= BAND[1])), len(audio))).max()


def _events(active):
    """(start, end) frame runs of a boolean (frames,) array, bridging dips under 50 ms and dropping blips under
    40 ms (10 ms frames), as a listener hears one beep through a decoder's flutter."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], active.astype(int), [0]])))
    merged = []
    for a, b in zip(edges[::2], edges[1::2]):
        if merged and a - merged[-1][1] < 5:
            merged[-1][1] = b
        else:
            merged.append([a, b])
    return [(a, b) for a, b in merged if b - a >= 4] or merged


def _glide(power, freqs, event):
    """Octaves the strongest frequency moves across an event: the rise of a straight line fitted to its track in
    octaves, as the world's glide is exponential (a straight line in octaves)."""
    a, b = event
    voiced = (freqs >= 150) & (freqs <= 4000)
    track = np.log2(freqs[voiced][power[a:b, voiced].argmax(1)])[2: max(3, b - a - 2)]  # its edges are smeared
    if len(track) < 2:
        return 0.0
    return np.polyfit(np.arange(len(track)), track, 1)[0] * len(track)


def _tone(audio, events, hop, sr):
    """Fundamental (Hz), timbre and harmonic share of the events of a tone: their spectra, zero-padded to 1 Hz bins
    or finer and summed; the strongest peak between 150 and 2000 Hz, refined by a parabola through its log power; a
    buzz has odd harmonics within 13 dB of it (the world's square wave: 7 dB), a beep none; the share of the energy
    within BAND that lies at its first 9 harmonics tells a pitched sound from a rumble."""
    segments = [audio[a * hop: b * hop] for a, b in events]
    n = max([2 ** 14] + [len(s) for s in segments])  # so that no event is cut short
    spectrum = sum(np.abs(np.fft.rfft((s - s.mean()) * np.hanning(len(s)), n)) ** 2 for s in segments)
    freqs = np.fft.rfftfreq(n, 1 / sr)
    lo, hi = np.searchsorted(freqs, [150, 2000])
    k = lo + spectrum[lo:hi].argmax()
    left, mid, right = np.log(spectrum[k - 1: k + 2] + 1e-20)
    f0 = (k + 0.5 * (left - right) / (left - 2 * mid + right)) * sr / n
    near = lambda f: spectrum[np.abs(freqs - f) <= max(20, 0.03 * f)].sum()
    odd = sum(near(h * f0) for h in (3, 5, 7, 9) if h * f0 < BAND[1])
    harmonic = sum(near(h * f0) for h in range(1, 10) if h * f0 < BAND[1])
    within = spectrum[(freqs >= BAND[0]) & (freqs <= BAND[1])].sum()
    return f0, "buzz" if odd > 0.05 * near(f0) else "beep", harmonic / within


def pitch_band(f0):
    """The caption's word for a fundamental (Hz): the band of PITCHES it lies in, give or take PITCH_TOLERANCE;
    None between or beyond them."""
    return next((p for p, (lo, hi) in PITCHES.items()
                 if lo * (1 - PITCH_TOLERANCE) <= f0 <= hi * (1 + PITCH_TOLERANCE)), None)


def measure(audio, sr=SAMPLE_RATE):
    """The facts a listener hears in a clip (T,), judged against the world's own sounds. Loudness is absolute, the
    clip's peak within BAND against the world's PEAK (generated clips are judged as they come, not normalised): under
    SILENCE, the clip is silence, {"kind": None}. Events are runs of 10 ms frames within 12 dB of the loudest. Noise
    is flat and broadband (NOISE_FLATNESS, NOISE_HIGH_SHARE) and peaks at NOISE_PEAK or more (a fainter hiss: kind
    None); a whistle's pitch moves GLIDE octaves or more across its longest event; else a tone of len(events)
    events, when PITCHED of its energy lies at the harmonics of its measured fundamental (else kind None), its
    pitch that fundamental's band (None outside every band). Tones also report "f0" (Hz), whistles "glide"
    (octaves)."""
    audio = np.asarray(audio, dtype=np.float64)
    if not np.isfinite(audio).all():  # a sampler gone wrong: nothing a listener could hear as the caption
        return {"kind": None}
    level = loudness(audio, sr)
    if level < SILENCE:
        return {"kind": None}
    n_fft, hop = 1024, sr // 100  # 64 ms windows, 10 ms hops
    power, freqs = stft_power(audio, n_fft, hop), np.fft.rfftfreq(n_fft, 1 / sr)
    band = (freqs >= BAND[0]) & (freqs <= BAND[1])
    energy = power[:, band].sum(1)
    active = energy > energy.max() * 10 ** -1.2
    events = _events(active)
    p = power[active][:, band] + 1e-20
    flatness = np.median(np.exp(np.log(p).mean(1)) / p.mean(1))
    high_share = p[:, freqs[band] >= 2000].sum() / p.sum()
    if flatness > NOISE_FLATNESS and high_share > NOISE_HIGH_SHARE:
        return {"kind": "noise"} if level >= NOISE_PEAK else {"kind": None}
    glide = _glide(power, freqs, max(events, key=lambda e: e[1] - e[0]))
    if abs(glide) >= GLIDE:
        return {"kind": "whistle", "direction": "rising" if glide > 0 else "falling", "glide": glide}
    f0, timbre, pitched = _tone(audio, events, hop, sr)
    if pitched < PITCHED:
        return {"kind": None}
    return {"kind": "tone", "count": len(events), "pitch": pitch_band(f0), "timbre": timbre, "f0": f0}


def score(pairs):
    """Per-property accuracy of (caption, measured facts) pairs: {property: (correct, total)}, each property
    counted over the clips whose caption states it."""
    tally = {p: [0, 0] for p in PROPERTIES}
    for caption, heard in pairs:
        for prop, value in (parse_caption(caption) or {}).items():
            if value is not None:
                tally[prop][0] += heard.get(prop) == value
                tally[prop][1] += 1
    return {p: tuple(v) for p, v in tally.items() if v[1]}


def score_folder(folder, split=None):
    """Score the WAVs of `folder`: captions from its manifest.csv (rows of `split` only, when given), or, without
    one, from the file names ("two_high_beeps_s0.wav", as sample.py names them). A clip that cannot be read is
    wrong on every property its caption states. Returns score's {property: (correct, total)} and the files whose
    caption names no toy sound, which are not scored."""
    folder = Path(folder)
    if (folder / "manifest.csv").is_file():
        items = [(r["path"], r["caption"]) for r in read_manifest(folder / "manifest.csv", split=split, captions=True)]
    else:
        items = [(p, p.stem) for p in sorted(folder.glob("*.wav"))]
    if not items:
        raise ValueError(f"{folder}: no clips to score; give a folder of WAVs, with a manifest.csv or with "
                         "captions as file names")
    heard = []
    for path, caption in items:
        try:
            heard.append((caption, measure(read_audio(path, SAMPLE_RATE).numpy())))
        except AudioError:
            heard.append((caption, {"kind": None}))
    return score(heard), [str(path) for path, caption in items if parse_caption(caption) is None]


def format_scores(scores, unscored=()):
    lines = [f"could not score {len(unscored)} file(s), whose captions name no toy sound: {', '.join(unscored)}"
             ] if unscored else []
    lines += [f"{'property':<10} {'clips':>6} {'accuracy':>9}"]
    lines += [f"{p:<10} {n:>6} {100 * c / n:>8.1f}%" for p, (c, n) in scores.items()]
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# 4. The data set: a world of clips, with clean and degraded captions

def degrade_caption(facts, rng):
    """A stand-in for the paper's synthetic captions (stage 2): each stated fact is kept (75%), dropped (15%) or
    swapped for a wrong value (10%). Returns the caption and a CLAP-like similarity, 0.15 + 0.5 (kept - 2 wrong) /
    facts, give or take 0.05, so that the paper's filter at 0.40 keeps captions with at most one fact missing
    (two of a tone's four, kind included, at the margin) and removes every caption that says something wrong."""
    options = {"count": list(COUNTS.values()), "pitch": list(PITCHES), "timbre": list(PLURALS),
               "direction": ["rising", "falling"]}
    said, kept, wrong = dict(facts), 1, 0  # the kind is always named
    for prop in [p for p in facts if p != "kind"]:
        fate = rng.choice(3, p=[0.75, 0.15, 0.10])
        if fate == 1:
            said[prop] = None
        elif fate == 2:
            said[prop] = rng.choice([v for v in options[prop] if v != facts[prop]]).item()
        kept, wrong = kept + (fate == 0), wrong + (fate == 2)
    if facts["kind"] == "tone":
        plural = said["count"] != 1
        noun = {None: "tones" if plural else "tone", **(PLURALS if plural else {t: t for t in PLURALS})}
        words = [{v: k for k, v in COUNTS.items()}.get(said["count"]), said["pitch"], noun[said["timbre"]]]
        caption = " ".join(w for w in words if w)
    elif facts["kind"] == "whistle":
        caption = f"a {said['direction']} whistle" if said["direction"] else "a whistle"
    else:
        caption = canonical_caption(facts)
    clap = 0.15 + 0.5 * (kept - 2 * wrong) / len(facts) + rng.uniform(-0.05, 0.05)
    return caption, round(float(np.clip(clap, 0, 1)), 3)


def make_world(out, n_train, n_test, seed=0, paraphrase_prob=0.3):
    """Render the toy world into `out`: audio/{split}_{i}.wav (16-bit, 16 kHz), manifest.csv (audio_path, caption,
    split; classes in turn, captions canonical or paraphrased), stage2.csv (the train clips again, with degraded
    captions and a clap_score column) and vae.csv (the train clips, then the high tones and the whistles twice more
    and the noise six times more: the toy VAE keeps high buzzes and noise only when it hears them that often).
    Every clip depends only on (seed, split, index)."""
    if n_train < 1 or n_test < 0:
        raise ValueError(f"a toy world needs 1 or more training clips and 0 or more test clips, not {n_train} and "
                         f"{n_test}")
    os.makedirs(os.path.join(out, "audio"), exist_ok=True)
    rows, stage2, extra = [], [], {"high": [], "noise": [], "whistle": []}
    for split, n in (("train", n_train), ("test", n_test)):
        for i in tqdm(range(n), desc=f"toy {split}", leave=False):
            facts = CLASSES[i % len(CLASSES)]
            rng = np.random.default_rng([seed, split == "test", i])
            path = f"audio/{split}_{i:05d}.wav"
            sf.write(os.path.join(out, path), render(facts, rng), SAMPLE_RATE, subtype="PCM_16")
            caption = paraphrase(facts, rng) if rng.random() < paraphrase_prob else canonical_caption(facts)
            rows.append({"audio_path": path, "caption": caption, "split": split})
            if split == "train":
                extra.get("high" if facts.get("pitch") == "high" else facts["kind"], []).append(rows[-1])
                caption, clap = degrade_caption(facts, rng)
                stage2.append({"audio_path": path, "caption": caption, "split": split, "clap_score": clap})
    write_manifest(rows, os.path.join(out, "manifest.csv"))
    write_manifest(stage2, os.path.join(out, "stage2.csv"))
    repeats = {"high": 2, "noise": 6, "whistle": 2}
    write_manifest(rows[:n_train] + [r for group, k in repeats.items() for r in extra[group] * k],
                   os.path.join(out, "vae.csv"))


# -----------------------------------------------------------------------------
# 5. A VAE's round trip: does the autoencoder alone keep what the judge hears?
#
# A diffusion model can only draw what its VAE decodes, so the VAE is judged first, on clips it never trained on.

def round_trip(vae, world):
    """Each test clip of a world made by `make`, peak-normalised as training sees it, encoded to its posterior mean,
    decoded and played back at the clip's own level, judged against its caption. Returns score's {property:
    (correct, total)} and, for each tone, the relative error of its reconstruction's fundamental against the
    original's (inf when it is heard as no tone)."""
    pairs, errors = [], []
    for row in tqdm(read_manifest(Path(world) / "manifest.csv", split="test", captions=True), desc="round trip",
                    unit="clip", leave=False):
        clip = read_audio(row["path"], vae.cfg.sample_rate)
        peak = clip.abs().max().clamp(min=1e-8)
        with torch.no_grad():
            heard = measure(peak * vae.decode(vae.encode(clip[None, None] / peak, sample=False))[0, 0, : len(clip)])
        pairs.append((row["caption"], heard))
        if parse_caption(row["caption"])["kind"] == "tone":
            errors.append(abs(heard["f0"] / measure(clip)["f0"] - 1) if heard["kind"] == "tone" else np.inf)
    return score(pairs), errors


def print_round_trip(scores, errors):
    print(format_scores(scores))
    heard = [e for e in errors if np.isfinite(e)]
    if heard:
        print(f"tones within 2% of their pitch: {sum(e <= 0.02 for e in heard)} of {len(errors)} (median error "
              f"{100 * np.median(heard):.1f}% over the {len(heard)} heard as tones)")
    elif errors:
        print(f"tones within 2% of their pitch: 0 of {len(errors)} (none heard as a tone)")


# -----------------------------------------------------------------------------
# 6. Following a reference: does a ControlNet's sample get louder and quieter where its reference does?


def envelope(audio, sr=SAMPLE_RATE, frame=0.02, floor_db=60.0):
    """Loudness of 20 ms frames in dB, floored `floor_db` under the clip's loudest frame. (T,) -> (T // 320,)"""
    n = int(sr * frame)
    audio = np.asarray(audio, np.float64)
    db = 10 * np.log10(np.square(audio[: len(audio) // n * n]).reshape(-1, n).mean(1) + 1e-20)
    return np.maximum(db, db.max() - floor_db)


def follows(sample, reference):
    """The correlation of a sample's 20 ms energy envelope with its reference's (over the shorter of the two):
    1 where they rise and fall together, 0 where the sample ignores the reference (or one of them is flat)."""
    a, b = envelope(sample), envelope(reference)
    n = min(len(a), len(b))
    a, b = a[:n] - a[:n].mean(), b[:n] - b[:n].mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum())) if a.any() and b.any() else 0.0


def follow_scores(pipe, world, clips, steps=50):
    """How well `pipe` follows references it never trained on: the first `clips` test clips of a world made by
    `make`, each sampled for its own caption with the clip as its control and, with the same seed, without.
    Returns the two lists of `follows`."""
    rows = read_manifest(Path(world) / "manifest.csv", split="test", captions=True)[:clips]
    with_control, without = [], []
    for k, row in enumerate(tqdm(rows, desc="follow", unit="clip", leave=False)):
        reference = read_audio(row["path"], pipe.sample_rate)
        kw = dict(duration=len(reference) / pipe.sample_rate, steps=steps, seed=k)
        with_control.append(follows(pipe.generate([row["caption"]], control=reference, **kw)[0], reference))
        without.append(follows(pipe.generate([row["caption"]], **kw)[0], reference))
    return with_control, without


# -----------------------------------------------------------------------------
# 7. Pictures: spectrograms of clips, as a PNG written with numpy and zlib
#
# Levels are absolute (0 dB: a sine at the world's peak), so that a quiet clip looks quiet.


def spectrogram(audio, sr=SAMPLE_RATE, n_fft=512, hop=128, rows=96, f_min=60.0, floor_db=70.0):
    """(rows, frames) brightness in [0, 1] of a clip (T,): power on a mel-spaced axis from `f_min` to Nyquist,
    high frequencies in the top row, 0 at `floor_db` below a full-level sine."""
    power = stft_power(audio, n_fft, hop)  # (frames, F)
    mel = lambda f: 2595 * np.log10(1 + f / 700)
    centres = 700 * (10 ** (np.linspace(mel(f_min), mel(sr / 2), rows) / 2595) - 1)  # (rows,) Hz
    power = np.stack([np.interp(centres, np.fft.rfftfreq(n_fft, 1 / sr), p) for p in power], 1)  # (rows, frames)
    level = 10 * np.log10(power / (PEAK * np.hanning(n_fft).sum() / 2) ** 2 + 1e-12)
    return np.clip(1 + level / floor_db, 0, 1)[::-1]


def colour(brightness):
    """(H, W) in [0, 1] -> (H, W, 3) uint8, from black through purple and orange to pale yellow."""
    anchors = np.array([[0, 0, 4], [80, 18, 123], [182, 54, 121], [251, 136, 97], [252, 253, 191]], float)
    x = brightness * (len(anchors) - 1)
    i = np.minimum(x.astype(int), len(anchors) - 2)
    return (anchors[i] + (x - i)[..., None] * (anchors[i + 1] - anchors[i])).astype(np.uint8)


def write_png(path, rgb):
    """An RGB image (H, W, 3) uint8 as a PNG file: the signature, then the IHDR (size, 8-bit RGB), IDAT (rows led
    by filter byte 0, deflated) and IEND chunks, each framed by its length and CRC-32."""
    h, w, _ = rgb.shape
    chunk = lambda kind, data: (len(data).to_bytes(4, "big") + kind + data
                                + zlib.crc32(kind + data).to_bytes(4, "big"))
    rows = np.concatenate([np.zeros((h, 1), np.uint8), rgb.reshape(h, 3 * w)], 1)
    header = w.to_bytes(4, "big") + h.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows.tobytes(), 9))
                + chunk(b"IEND", b""))


def spectrogram_folder(folder, out, columns=3, gap=4):
    """The WAVs of `folder`, sorted by name, as a grid of spectrograms in one PNG (`columns` wide, white between
    them). Returns their names in the grid's order, left to right and top to bottom."""
    paths = sorted(Path(folder).glob("*.wav"))
    if not paths:
        raise ValueError(f"{folder}: no WAVs to draw")
    pictures = [spectrogram(read_audio(p, SAMPLE_RATE).numpy()) for p in paths]
    h, w = pictures[0].shape[0], max(p.shape[1] for p in pictures)
    grid_rows = math.ceil(len(pictures) / columns)
    canvas = np.full((grid_rows * (h + gap) - gap, min(columns, len(pictures)) * (w + gap) - gap), np.nan)
    for k, picture in enumerate(pictures):
        r, c = divmod(k, columns)
        canvas[r * (h + gap): r * (h + gap) + h, c * (w + gap): c * (w + gap) + picture.shape[1]] = picture
    rgb = colour(np.nan_to_num(canvas))
    rgb[np.isnan(canvas)] = 255
    write_png(out, rgb)
    return [p.name for p in paths]


# -----------------------------------------------------------------------------
# 8. Packing a trained model into one small file

def pack(path, out):
    """One file that samples with no other: a DiT-stage checkpoint's DiT (its EMA when it kept one), the VAE that
    its config names and its embedded text encoder, in half precision, without the training state. This is how
    assets/toy.pt was made; loading casts the weights back to float32. A control stage's checkpoint packs to its
    ControlNet alone (assets/toy_control.pt), to be loaded beside its DiT."""
    half = lambda state: {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    try:
        ckpt = E.load_file(path)
        if not E.is_project_checkpoint(ckpt) or ckpt["config"].get("dit") is None:
            raise E.CheckpointError(f"{path}: not a DiT-stage checkpoint of train.py")
        if ckpt["stage"] == "control":
            return save_atomic({"format": "ezaudio", "stage": "control", "step": ckpt["step"],
                                "config": {**ckpt["config"], "base": None, "vae_path": None},
                                "model": half(ckpt["ema"] or ckpt["model"]), "ema": None}, out)
        vae = ckpt["vae"]  # None in a DiT stage's: its config names the VAE file, maybe in the released format
        if vae is None:
            cfg = E.config_from_dict(E.VAEConfig, ckpt["config"]["vae"])
            vae = load_vae(ckpt["config"]["vae_path"], cfg)[0].state_dict()
    except E.CheckpointError as e:
        raise ValueError(str(e)) from None
    text = ckpt["text_encoder"] and {**ckpt["text_encoder"], "state_dict": half(ckpt["text_encoder"]["state_dict"])}
    save_atomic({"format": "ezaudio", "stage": ckpt["stage"], "step": ckpt["step"],
                 "config": {**ckpt["config"], "vae_path": None}, "model": half(ckpt["ema"] or ckpt["model"]),
                 "ema": None, "vae": half(vae), "text_encoder": text}, out)


# -----------------------------------------------------------------------------
# 9. Command line: python toy.py {make,score,roundtrip,follow,spectrogram,pack} ...


def print_follow(with_control, without):
    mean = lambda xs: sum(xs) / len(xs)
    better = sum(a > b for a, b in zip(with_control, without))
    print(f"envelope correlation with the reference over {len(without)} clips: {mean(with_control):.3f} with "
          f"control, {mean(without):.3f} without; control higher for {better} of {len(without)}")


def parser():
    cli = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0], epilog=__doc__.split("\n\n")[2],
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = cli.add_subparsers(dest="command", required=True)
    p = sub.add_parser("make", help="write the toy world: WAVs, manifest.csv and stage2.csv")
    p.add_argument("--out", required=True, help="folder to write into")
    p.add_argument("--train", type=int, default=4200, help="number of training clips (classes take turns)")
    p.add_argument("--test", type=int, default=210, help="number of test clips")
    p.add_argument("--seed", type=int, default=0, help="seed of the world: the same seed writes the same clips")
    p.set_defaults(run=lambda a: make_world(a.out, a.train, a.test, a.seed))
    p = sub.add_parser("score", help="measure clips and print per-property accuracy against their captions")
    p.add_argument("folder", help="folder of WAVs with a manifest.csv, or with captions as file names")
    p.add_argument("--split", default=None, help="score only the manifest rows of this split (e.g. test)")
    p.set_defaults(run=lambda a: print(format_scores(*score_folder(a.folder, a.split))))
    p = sub.add_parser("roundtrip", help="judge a VAE alone: the test clips of a world, encoded and decoded")
    p.add_argument("world", help="folder made by `make` whose test clips go through the VAE")
    p.add_argument("--vae", default=E.local_file(E.MODELS["toy"]["file"]),
                   help="a checkpoint holding a VAE (default: the toy model's)")
    p.set_defaults(run=lambda a: print_round_trip(*round_trip(load_vae(a.vae)[0], a.world)))
    p = sub.add_parser("follow", help="how well the toy model's ControlNet follows the loudness of test clips")
    p.add_argument("world", help="folder made by `make` whose test clips serve as references")
    p.add_argument("--clips", type=int, default=42, help="how many test clips (default: 42, two of each class)")
    p.add_argument("--controlnet", default=True, help="a ControlNet file (default: the toy model's own)")
    p.set_defaults(run=lambda a: print_follow(*follow_scores(E.EzAudio.from_pretrained(
        "toy", device="cpu", controlnet=a.controlnet), a.world, a.clips)))
    p = sub.add_parser("spectrogram", help="draw the WAVs of a folder as spectrograms in one PNG")
    p.add_argument("folder", help="folder of WAVs, drawn in the order of their names")
    p.add_argument("--out", required=True, help="PNG file to write (e.g. assets/toy.png)")
    p.add_argument("--columns", type=int, default=3, help="spectrograms per row (default: 3)")
    p.set_defaults(run=lambda a: print("\n".join(spectrogram_folder(a.folder, a.out, a.columns))))
    p = sub.add_parser("pack", help="pack a trained checkpoint, its VAE and text encoder into one fp16 file")
    p.add_argument("--ckpt", required=True, help="checkpoint of a DiT stage (e.g. runs/toy3/ckpt.pt)")
    p.add_argument("--out", required=True, help="file to write (e.g. assets/toy.pt)")
    p.set_defaults(run=lambda a: pack(a.ckpt, a.out))
    return cli


def main(argv=None):
    run_command(parser(), argv)


if __name__ == "__main__":
    main()
