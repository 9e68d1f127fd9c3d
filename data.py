"""
Data for EzAudio: reading audio, manifests, the latent/text cache and CLAP scores.

The paper trains on AudioSet (stage 1, no captions), CLAP-filtered synthetic captions (stage 2) and AudioCaps
(stage 3) (arXiv 2409.10819, Sec. III). This file turns such collections into batches for train.py.
"""

import argparse
import contextlib
import csv
import errno
import hashlib
import json
import math
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F
from tqdm import tqdm

import ezaudio as E

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
    if not os.path.isfile(path):  # libsndfile would call it a "System error"
        raise AudioError(f"{path}: no such file")
    try:
        audio, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as e:
        raise AudioError(f"{path}: not a readable audio file ({str(e).splitlines()[0][:120]})") from None
    if audio.shape[0] == 0:
        raise AudioError(f"{path}: the file holds no audio")
    return resample(torch.from_numpy(np.ascontiguousarray(audio.mean(1))), sr, sample_rate)


# -----------------------------------------------------------------------------
# Manifests: which clips, with which captions
#
# A CSV in the published layout (audio_path, caption, split, and clap_score once scored) or JSON Lines with the
# same keys, one object a line. Relative audio paths are read from a data root (default: the manifest's folder).
# Stage 1 needs only audio_path; stages 2 and 3 need captions; stage 2 keeps the rows whose CLAP score reaches
# 0.40 (paper Sec. III).

SILENT_PEAK = 1e-4  # a file whose samples all stay below this (-80 dBFS) holds nothing to learn from


def read_manifest(path, data_root=None, split=None, min_clap=0.0, captions=False):
    """The manifest's rows as dicts, each with its own columns plus `path` (the audio file, resolved) and `row`
    (1-based). Keeps the rows of `split` when the manifest has a split column, and, when min_clap > 0, those whose
    clap_score reaches it. `captions`: every row must have a caption column (stages 2 and 3)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such manifest")
    try:
        if path.suffix in (".jsonl", ".json"):
            rows = []
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    row = None
                if not isinstance(row, dict):
                    raise ValueError(f"{path}:{n}: not a JSON object; a JSON Lines manifest holds one a line")
                rows.append(row)
        else:
            with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: spreadsheets start with a byte-order mark
                rows = list(csv.DictReader(f))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start}); save the manifest as UTF-8") from None
    if not rows:
        raise ValueError(f"{path}: the manifest has no rows")
    for column, needed in (("audio_path", True), ("caption", captions), ("clap_score", min_clap > 0)):
        if needed and any(column not in r for r in rows):
            hint = "; score it with `python data.py clap` or pass --min-clap 0" if column == "clap_score" else ""
            raise ValueError(f"{path}: the manifest has no {column} column{hint}")
    empty = next((n for n, r in enumerate(rows, 1) if not isinstance(r["audio_path"], str) or not r["audio_path"]),
                 None)
    if empty:
        raise ValueError(f"{path}: row {empty} has no audio_path")
    root = Path(data_root) if data_root else path.parent
    rows = [{**r, "path": str(root / r["audio_path"]), "row": n} for n, r in enumerate(rows, 1)]
    if split and any("split" in r for r in rows):
        rows = [r for r in rows if r.get("split") == split]
    if min_clap > 0:
        try:
            rows = [r for r in rows if r["clap_score"] not in (None, "") and float(r["clap_score"]) >= min_clap]
        except ValueError as e:
            raise ValueError(f"{path}: a clap_score is not a number ({e})") from None
    if not rows:
        raise ValueError(f"{path}: no rows left" + (f" of split {split!r}" if split else "")
                         + (f" with clap_score >= {min_clap}" if min_clap > 0 else ""))
    return rows


def write_manifest(rows, path):
    """Rows (dicts) to a CSV, or JSON Lines when `path` ends in .jsonl, atomically; `path` and `row` are left out."""
    rows = [{k: v for k, v in r.items() if k not in ("path", "row")} for r in rows]
    tmp = f"{path}.tmp"
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        if str(path).endswith(".jsonl"):
            f.writelines(json.dumps(r) + "\n" for r in rows)
        else:
            writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
            writer.writeheader()
            writer.writerows(rows)
    os.replace(tmp, path)


def load_clip(path, sample_rate):
    """read_audio, refusing silent files as well. (T,)"""
    audio = read_audio(path, sample_rate)
    if audio.abs().max() < SILENT_PEAK:
        raise AudioError(f"{path}: silent (every sample below -80 dBFS)")
    return audio


def check_manifest(rows, sample_rate):
    """(row, message) for every row whose audio is missing, unreadable, empty or silent."""
    bad = []
    for r in tqdm(rows, desc="checking", unit="clip", leave=False):
        try:
            load_clip(r["path"], sample_rate)
        except AudioError as e:
            bad.append((r["row"], str(e)))
    return bad


def add_manifest_flags(parser, what="CSV (audio_path,caption,split[,clap_score]) or .jsonl"):
    """--manifest and --data-root, for each subcommand that reads a manifest."""
    parser.add_argument("--manifest", required=True, help=what)
    parser.add_argument("--data-root", default=None, help="folder that relative audio paths start from "
                                                          "(default: the manifest's folder)")


def _check_command(sub):
    p = sub.add_parser("check", help="list the manifest rows whose audio is missing, unreadable, empty or silent")
    add_manifest_flags(p)
    p.add_argument("--sample-rate", type=int, default=24000, help="rate the audio is read at, as training does")

    def run(a):
        rows = read_manifest(a.manifest, a.data_root)
        bad = check_manifest(rows, a.sample_rate)
        for row, message in bad:
            print(f"row {row}: {message}")
        print(f"{len(bad)} of {len(rows)} rows unusable" + (" (training skips them)" if bad else ""))
        if bad:
            raise SystemExit(1)
    p.set_defaults(run=run)


COMMANDS.append(_check_command)


# -----------------------------------------------------------------------------
# Datasets: clips for training, read as the published data pipeline reads them
#
# Every random choice of an item (crop, polarity) comes from a generator seeded with (seed, epoch, index), and the
# sampler's order from (seed, epoch): a run resumed mid-epoch sees exactly the clips an uninterrupted one would,
# with any number of loader workers.


def item_generator(seed, epoch, index):
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 1_000_003 + index)


def fit_clip(audio, length, generator=None):
    """A `length`-sample window of `audio` (T,): random when a generator is given, else the start; zero-padded
    at the end when shorter; peak-normalised. (length,)"""
    if audio.numel() > length:
        start = 0 if generator is None else int(torch.randint(audio.numel() - length + 1, (), generator=generator))
        audio = audio[start:start + length]
    audio = F.pad(audio, (0, length - audio.numel()))
    return audio / audio.abs().max().clamp(min=SILENT_PEAK)


class Clips(torch.utils.data.Dataset):
    """Manifest rows as training items. A row that cannot be loaded (AudioError) is replaced by the next one
    that can, and reported in the item's `skipped` as (row, message), so that training never stops for a bad
    file and every batch keeps its size. Subclasses define `load(row, generator) -> dict`."""

    def __init__(self, rows, seed=0):
        self.rows, self.seed, self.epoch = rows, seed, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        generator, skipped = item_generator(self.seed, self.epoch, index), []
        for k in range(len(self.rows)):
            row = self.rows[(index + k) % len(self.rows)]
            try:
                item = self.load(row, generator)
            except AudioError as e:
                skipped.append((row["row"], str(e)))
                continue
            return {**item, "caption": row.get("caption") or "", "skipped": skipped}
        raise AudioError("no row of the manifest can be loaded; see `python data.py check --manifest ...`")


class AudioClips(Clips):
    """Waveforms: mono at `sample_rate`, a random `length`-sample window (zero-padded when shorter),
    peak-normalised, and polarity-flipped with probability `flip`, as the published data pipeline does."""

    def __init__(self, rows, sample_rate, length, seed=0, flip=0.5):
        super().__init__(rows, seed)
        self.sample_rate, self.length, self.flip = sample_rate, length, flip

    def load(self, row, generator):
        audio = fit_clip(load_clip(row["path"], self.sample_rate), self.length, generator)
        if float(torch.rand((), generator=generator)) < self.flip:
            audio = -audio
        return {"audio": audio}


def collate(items):
    """Items to a batch: audio (B, T) or cached posteriors (B, C, L), captions, cached contexts as a list (their
    lengths differ), and every skipped row."""
    batch = {"caption": [it["caption"] for it in items], "skipped": [s for it in items for s in it["skipped"]]}
    for key in ("audio", "mean", "std", "energy"):
        if key in items[0]:
            batch[key] = torch.stack([it[key] for it in items])
    if "context" in items[0]:
        batch["context"] = [it["context"] for it in items]
    return batch


class ShardSampler(torch.utils.data.Sampler):
    """This process's share of a fresh permutation each epoch (the ranks take turns through it, the tail wrapped
    around so that all get as many), from position `start` on, to resume mid-epoch."""

    def __init__(self, n, rank=0, world_size=1, seed=0, epoch=0, start=0):
        self.n, self.rank, self.world, self.seed, self.epoch, self.start = n, rank, world_size, seed, epoch, start

    def shard(self):
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch))
        total = math.ceil(self.n / self.world) * self.world
        return order.repeat(math.ceil(total / self.n))[:total][self.rank::self.world]

    def __iter__(self):
        return iter(self.shard()[self.start:].tolist())

    def __len__(self):
        return max(0, math.ceil(self.n / self.world) - self.start)


# -----------------------------------------------------------------------------
# The latent cache: VAE posteriors and T5 outputs computed once, so that training skips both encoders
#
# One file per clip, named by a hash of its audio path and caption, holding the posterior's mean and std (so that
# training still samples latents) of the clip's first `seconds`, read as training reads it but unflipped, and the
# caption's T5 output over its real tokens (the mask is all True up to that length). meta.pt records the VAE, the
# text encoder, the empty caption's T5 output (for classifier-free guidance dropout) and the shapes.


def load_vae(path=None, cfg=None):
    """A frozen VAE: a released-format file, built with the VAEConfig `cfg` (default: the released one), or one
    of this project's checkpoints holding a VAE (which carries its config); None fetches the released VAE.
    Returns (vae, path)."""
    path = os.path.abspath(path) if path else E.hub_file(E.RELEASED_VAE, "--vae")
    vae = E.vae_from_checkpoint(E.load_file(path), cfg, path)
    return vae.eval().requires_grad_(False).fold_weight_norm(), path


def embedded_text_encoder(text_encoder):
    """TextEncoder.state() for encoders that checkpoints carry inside (ByT5-tokenised ones, such as the toy's,
    which need no files), else None: those are loaded by name."""
    from transformers import ByT5Tokenizer
    return text_encoder.state() if isinstance(text_encoder.tokenizer, ByT5Tokenizer) else None


def fingerprint(state_dict):
    """A short hash of a state_dict's names and bytes: a cache is not resumed with other weights under the same file
    name (the README's recipes retrain runs/toy-vae/ckpt.pt in place), and DDP replicas that stayed in step agree."""
    h = hashlib.sha1()
    for name, tensor in state_dict.items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def cache_key(row):
    return hashlib.sha1(f"{row['audio_path']}\0{row.get('caption') or ''}".encode()).hexdigest()[:20]


def stack_contexts(contexts):
    """Contexts of different lengths (n_i, D) -> context (B, max n, D) zero-padded, and mask (B, max n) bool."""
    n = max(len(c) for c in contexts)
    context = torch.stack([F.pad(c, (0, 0, 0, n - len(c))) for c in contexts])
    mask = torch.arange(n)[None] < torch.tensor([len(c) for c in contexts])[:, None]
    return context, mask


class DiskFull(OSError):
    """No room on the disk for a file being saved; the message is one line for the user."""


def tensor_bytes(obj):
    """Bytes of the tensors in nested dicts, lists and tuples: about what torch.save writes of them."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    return sum(tensor_bytes(v) for v in obj) if isinstance(obj, (list, tuple)) else 0


def save_atomic(obj, path):
    """torch.save through a temporary file that reaches the disk before it replaces `path`: a crash, even of the
    machine, leaves the old file or the new one, never part of one. On a full disk the partial file is removed, so
    that it takes no room, and DiskFull names the disk and the room needed."""
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
    except (OSError, RuntimeError) as e:  # torch's zip writer reports a full disk as a RuntimeError, "unexpected pos"
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        disk = os.path.dirname(os.path.abspath(path))
        need, free = tensor_bytes(obj), shutil.disk_usage(disk).free
        if getattr(e, "errno", None) not in (errno.ENOSPC, errno.EDQUOT) and free >= need:
            raise
        while not os.path.ismount(disk):
            disk = os.path.dirname(disk)
        raise DiskFull(f"no room for {path} on the disk mounted at {disk}: it needs about {need / 1e6:,.0f} MB "
                       f"and {free / 1e6:,.0f} MB are free; free some space and run again") from None
    os.replace(tmp, path)


class CachedClips(Clips):
    """Items from a cache folder: the posterior's mean and std (C, L), a random `frames`-frame window when the
    cache holds more, the clip's energy envelope over the same window (1, 2L; a ControlNet's condition), and the
    caption's T5 output (n, D) when the cache has one."""

    def __init__(self, rows, folder, frames, seed=0):
        super().__init__(rows, seed)
        self.folder, self.frames = folder, frames
        self.meta = read_cache_meta(folder)
        if self.meta["frames"] < frames:
            raise ValueError(f"{folder} holds {self.meta['frames']}-frame clips, shorter than the {frames} frames "
                             "a training segment needs; lower --segment or cache with a longer --segment")

    def load(self, row, generator):
        path = os.path.join(self.folder, cache_key(row) + ".pt")
        if not os.path.isfile(path):
            raise AudioError(f"{row['path']}: not in the cache {self.folder}; run `python data.py cache` on this "
                             "manifest (it resumes)")
        item = read_cache_entry(path, self.meta)  # a broken one is skipped like a bad clip
        start = int(torch.randint(self.meta["frames"] - self.frames + 1, (), generator=generator))
        out = {k: item[k][:, start:start + self.frames].float() for k in ("mean", "std")}
        if "energy" in item:
            k = item["energy"].shape[-1] // self.meta["frames"]  # envelope frames per latent frame
            energy = item["energy"][:, k * start:k * (start + self.frames)].float()
            out["energy"] = energy / energy.amax().clamp(min=1e-8)  # normalised over the window, as E.energy_envelope
        if item.get("context") is not None:
            out["context"] = item["context"].float()
        return out


def read_cache_meta(folder):
    path = os.path.join(folder, "meta.pt")
    if not os.path.isfile(path):
        raise ValueError(f"{folder}: not a latent cache (no meta.pt); make one with `python data.py cache`")
    try:
        meta = E.load_file(path)
    except E.CheckpointError as e:
        raise ValueError(f"{e}; make the cache again") from None
    if not isinstance(meta, dict) or meta.get("format") != "ezaudio-cache":
        raise ValueError(f"{path}: not the meta.pt of a latent cache made by `python data.py cache`")
    return meta


def read_cache_entry(path, meta):
    """One clip's entry, checked against the cache's meta.pt: the posterior's mean and std (C, frames), and the
    caption's T5 output (n, D) where the cache holds text. An AudioError says what is wrong with it."""
    redo = "run `python data.py cache` on the manifest again, which redoes broken entries"
    try:
        item = E.load_file(path)
    except E.CheckpointError as e:  # cut short by a crash or a full disk, say
        raise AudioError(f"unreadable cache entry {e}; {redo}") from None
    latent = (meta["vae"]["latent_dim"], meta["frames"])
    width = None if meta["empty"] is None else meta["empty"].shape[-1]
    context = item.get("context") if isinstance(item, dict) else None
    if not (isinstance(item, dict) and all(isinstance(item.get(k), torch.Tensor) and item[k].shape == latent
                                           for k in ("mean", "std"))
            and (context is None if width is None else
                 isinstance(context, torch.Tensor) and context.ndim == 2 and context.shape[-1] == width)):
        raise AudioError(f"{path}: a cache entry without the mean and std {latent}"
                         + (f" and context (n, {width})" if width else "") + f" that meta.pt promises; {redo}")
    return item


def build_cache(rows, folder, vae, vae_path, text_encoder=None, text_encoder_name=None, seconds=10.0,
                batch_size=8, workers=4, dtype=torch.float16):
    """Encode every row not yet in `folder` (an interrupted run resumes; an entry that does not read back as
    meta.pt promises, cut short by a crash, say, is redone); returns the rows that failed, as (row, message).
    A progress bar shows clips/s."""
    device = next(vae.parameters()).device
    sr, hop = vae.cfg.sample_rate, vae.cfg.hop
    frames = max(1, round(seconds * sr / hop))
    control = E.ControlConfig.for_vae(vae.cfg)
    meta = {"format": "ezaudio-cache", "vae_path": vae_path, "vae": asdict(vae.cfg), "frames": frames,
            "control": asdict(control),
            "text_encoder": text_encoder_name, "text_encoder_state": None, "empty": None,
            "weights": {"vae": fingerprint(vae.state_dict()), "text_encoder": None}}
    if text_encoder is not None:
        meta["text_encoder_state"] = embedded_text_encoder(text_encoder)
        meta["text_encoder"] = None if meta["text_encoder_state"] else text_encoder_name
        if meta["text_encoder_state"]:  # a hub T5 is known by its name; an embedded one by its weights
            meta["weights"]["text_encoder"] = fingerprint(meta["text_encoder_state"]["state_dict"])
        context, mask = text_encoder([""])
        meta["empty"] = context[0, : int(mask.sum())].to(dtype).cpu()
    os.makedirs(folder, exist_ok=True)
    if os.path.isfile(os.path.join(folder, "meta.pt")):
        old = read_cache_meta(folder)
        same = ("vae_path", "vae", "frames", "text_encoder", "weights")
        if any(old.get(k) != meta[k] for k in same):
            raise ValueError(f"{folder} was made with other settings or weights "
                             f"({', '.join(f'{k}={old.get(k)}' for k in same)}); pass another --out")
    else:
        save_atomic(meta, os.path.join(folder, "meta.pt"))

    def intact(row):
        try:
            read_cache_entry(os.path.join(folder, cache_key(row) + ".pt"), meta)
            return True
        except AudioError:
            return False
    todo = [r for r in tqdm(rows, desc="checking", unit="clip", leave=False) if not intact(r)]
    # unflipped and from the start of the clip: the cache holds one deterministic view of each clip
    reader = _StartOfClip(todo, sr, frames * hop)
    loader = torch.utils.data.DataLoader(reader, batch_size=batch_size, num_workers=workers,
                                         collate_fn=list)
    failed = []
    with tqdm(total=len(rows), initial=len(rows) - len(todo), desc="caching", unit="clip") as bar:
        for items in loader:
            failed += [(it["row"]["row"], it["error"]) for it in items if "error" in it]
            good = [it for it in items if "error" not in it]
            bar.update(len(items) - len(good))
            if not good:
                continue
            with torch.no_grad():
                audio = torch.stack([it["audio"] for it in good]).to(device)
                mean, std = vae.posterior(audio[:, None])
                energy = E.energy_envelope(audio, control)
                if text_encoder is not None:
                    context, mask = text_encoder([it["row"].get("caption") or "" for it in good])
            for i, it in enumerate(good):
                entry = {"mean": mean[i].to(dtype).cpu(), "std": std[i].to(dtype).cpu(),
                         "energy": energy[i].to(dtype).cpu(), "context": None}
                if text_encoder is not None:
                    entry["context"] = context[i, : int(mask[i].sum())].to(dtype).cpu()
                save_atomic(entry, os.path.join(folder, cache_key(it["row"]) + ".pt"))
                bar.update(1)
    return failed


class _StartOfClip(torch.utils.data.Dataset):
    def __init__(self, rows, sample_rate, length):
        self.rows, self.sample_rate, self.length = rows, sample_rate, length

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        try:
            return {"row": self.rows[i], "audio": fit_clip(load_clip(self.rows[i]["path"], self.sample_rate),
                                                           self.length)}
        except AudioError as e:
            return {"row": self.rows[i], "error": str(e)}


def _cache_command(sub):
    p = sub.add_parser("cache", help="store each clip's VAE posterior and T5 output, so training skips both")
    add_manifest_flags(p)
    p.add_argument("--out", required=True, help="cache folder; an interrupted run resumes into it")
    p.add_argument("--vae", default=None, help="VAE file: released format or a VAE-stage checkpoint "
                                               "(default: the released VAE, downloaded)")
    p.add_argument("--vae-config", default="released", help="VAE preset of a released-format --vae file")
    p.add_argument("--text-encoder", default=None, help="T5 hub name or folder whose outputs to store for the "
                                                        "captions (e.g. google/flan-t5-xl), or toy for the toy "
                                                        "world's own; none: latents only")
    p.add_argument("--segment", type=float, default=10.0, help="seconds stored per clip, from its start")
    p.add_argument("--batch-size", type=int, default=8, help="clips encoded at once")
    p.add_argument("--workers", type=int, default=4, help="processes reading audio")
    p.add_argument("--dtype", choices=["float16", "float32"], default="float16",
                   help="storage precision (float16 halves the disk)")
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")

    def run(a):
        device = a.device or E.default_device()
        if a.vae_config not in E.VAE_PRESETS:
            raise ValueError(f"unknown --vae-config {a.vae_config!r}; choose one of {', '.join(E.VAE_PRESETS)}")
        try:
            vae, vae_path = load_vae(a.vae, E.VAE_PRESETS[a.vae_config])
            text_encoder = (None if not a.text_encoder else E.toy_text_encoder().to(device) if a.text_encoder == "toy"
                            else E.TextEncoder.from_pretrained(a.text_encoder).to(device))
        except E.CheckpointError as e:
            raise ValueError(str(e)) from None
        rows = read_manifest(a.manifest, a.data_root, captions=text_encoder is not None)
        failed = build_cache(rows, a.out, vae.to(device), vae_path, text_encoder, a.text_encoder, a.segment,
                             a.batch_size, a.workers, getattr(torch, a.dtype))
        for row, message in failed:
            print(f"row {row}: {message}")
        print(f"cached {len(rows) - len(failed)} of {len(rows)} clips in {a.out}"
              + (f"; {len(failed)} unusable rows skipped" if failed else ""))
    p.set_defaults(run=run)


COMMANDS.append(_cache_command)


# -----------------------------------------------------------------------------
# CLAP scores: how well a caption fits its clip (stage 2 keeps clap_score >= 0.40, paper Sec. III)


def clap_scores(rows, model_name="laion/larger_clap_general", batch_size=16, device="cpu"):
    """Cosine similarity of CLAP's audio and text embeddings (Wu et al., 2023) for each row, None where the audio
    cannot be loaded."""
    from transformers import AutoFeatureExtractor, AutoTokenizer, ClapModel
    try:
        model = ClapModel.from_pretrained(model_name).to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(model_name)
        features = AutoFeatureExtractor.from_pretrained(model_name)
    except OSError as e:
        raise ValueError(f"cannot load the CLAP model {model_name!r} ({str(e).splitlines()[0][:160]}); connect "
                         "once to download it, or pass a local folder with --model") from None
    scores = []
    for i in tqdm(range(0, len(rows), batch_size), desc="CLAP", unit="batch"):
        chunk, audio, sims = rows[i:i + batch_size], {}, {}
        for j, r in enumerate(chunk):
            try:
                audio[j] = load_clip(r["path"], features.sampling_rate).numpy()
            except AudioError as e:
                print(f"row {r['row']}: {e}")
        if audio:
            inputs = features(list(audio.values()), sampling_rate=features.sampling_rate, return_tensors="pt")
            text = tokenizer([chunk[j]["caption"] for j in audio], padding=True, truncation=True, return_tensors="pt")
            with torch.no_grad():
                out = model(**text.to(device), **inputs.to(device))
            sims = dict(zip(audio, (out.text_embeds * out.audio_embeds).sum(-1).tolist()))
        scores += [sims.get(j) for j in range(len(chunk))]
    return scores


def _clap_command(sub):
    p = sub.add_parser("clap", help="add a clap_score column: how well each caption fits its audio")
    add_manifest_flags(p, "CSV (audio_path,caption,split) or .jsonl with captions")
    p.add_argument("--out", required=True, help="scored manifest to write (.csv, or .jsonl); unusable rows are "
                                                "left out")
    p.add_argument("--model", default="laion/larger_clap_general", help="CLAP model: hub name or local folder")
    p.add_argument("--batch-size", type=int, default=16, help="clips scored at once")
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")

    def run(a):
        rows = read_manifest(a.manifest, a.data_root, captions=True)
        scores = clap_scores(rows, a.model, a.batch_size, a.device or E.default_device())
        kept = [{**r, "clap_score": round(s, 4)} for r, s in zip(rows, scores) if s is not None]
        write_manifest(kept, a.out)
        print(f"scored {len(kept)} of {len(rows)} rows into {a.out}"
              + (f"; {len(rows) - len(kept)} unusable rows left out" if len(kept) < len(rows) else ""))
    p.set_defaults(run=run)


COMMANDS.append(_clap_command)


# -----------------------------------------------------------------------------
# Command line: python data.py {check,cache,clap} ...


def parser():
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    # each subcommand registers its flags and its function in its own section above
    for register in COMMANDS:
        register(sub)
    return p


def run_command(cli, argv=None):
    """Parse `argv` with `cli` and run the subcommand it names; what goes wrong is one line, as everywhere here."""
    args = cli.parse_args(argv)
    try:
        args.run(args)
    except (AudioError, DiskFull, E.CheckpointError, FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}")


def main(argv=None):
    run_command(parser(), argv)


if __name__ == "__main__":
    main()
