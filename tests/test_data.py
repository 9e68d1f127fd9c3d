"""data.py's manifests, datasets, check, latent cache and CLAP scoring, on a few generated WAVs."""

import csv
import json
import os
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf
import torch

import data
import ezaudio as E
import train

SR = 24000  # the tiny VAE's rate
SEGMENT = 0.05  # seconds: 1200 samples, 150 tiny-VAE latent frames
BAD = {"missing.wav": "no such file", "corrupt.wav": "not a readable audio file", "silent.wav": "silent",
       "empty.wav": "holds no audio"}


def write_clips(folder, n_good=6, bad=True):
    """Good clips (tones in noise: 24 kHz mono, 16 kHz stereo, some longer than a segment, one exactly a segment
    long) and, with `bad`, a missing, a corrupt, a silent and an empty one; a manifest.csv listing all of them
    with captions and split train. Returns the manifest's path."""
    rng = np.random.default_rng(0)
    (folder / "audio").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n_good):
        sr = SR if i % 2 == 0 else 16000
        seconds = SEGMENT if i == 0 else 0.08
        t = np.arange(round(seconds * sr)) / sr
        x = 0.3 * np.sin(2 * np.pi * (300 + 150 * i) * t) + 0.02 * rng.standard_normal(t.size)
        if i % 3 == 1:
            x = np.stack([x, -0.5 * x], axis=1)
        sf.write(folder / "audio" / f"clip{i}.wav", x, sr)
        rows.append({"audio_path": f"audio/clip{i}.wav", "caption": f"a tone at {300 + 150 * i} hertz",
                     "split": "train"})
    if bad:
        sf.write(folder / "audio" / "silent.wav", np.zeros(2000), SR)
        sf.write(folder / "audio" / "empty.wav", np.zeros(0), SR)
        (folder / "audio" / "corrupt.wav").write_text("this is not audio")
        rows += [{"audio_path": f"audio/{name}", "caption": "nothing", "split": "train"} for name in BAD]
    path = folder / "manifest.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["audio_path", "caption", "split"])
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture
def clips(tmp_path):
    return write_clips(tmp_path)


# -----------------------------------------------------------------------------
# manifests and check


def test_csv_and_jsonl_manifests_read_the_same_rows(tmp_path):
    manifest = write_clips(tmp_path / "d")
    rows = data.read_manifest(manifest)
    jsonl = tmp_path / "m.jsonl"
    jsonl.write_text("".join(json.dumps({k: r[k] for k in ("audio_path", "caption", "split")}) + "\n"
                             for r in rows))
    again = data.read_manifest(jsonl, data_root=tmp_path / "d")
    assert [(r["path"], r["caption"], r["row"]) for r in again] == [(r["path"], r["caption"], r["row"]) for r in rows]
    assert rows[0]["path"] == str(tmp_path / "d" / "audio" / "clip0.wav")


def test_manifest_split_and_clap_filters(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("audio_path,caption,split,clap_score\na.wav,x,train,0.5\nb.wav,y,train,0.39\n"
                    "c.wav,z,test,0.9\nd.wav,w,train,0.40\n")
    assert [r["audio_path"] for r in data.read_manifest(path, split="train")] == ["a.wav", "b.wav", "d.wav"]
    assert [r["audio_path"] for r in data.read_manifest(path, split="train", min_clap=0.40)] == ["a.wav", "d.wav"]
    assert [r["audio_path"] for r in data.read_manifest(path)] == ["a.wav", "b.wav", "c.wav", "d.wav"]


def test_a_spreadsheet_csv_with_a_byte_order_mark_reads(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("audio_path,caption\na.wav,un chien aboie\n", encoding="utf-8-sig")
    assert [(r["audio_path"], r["caption"]) for r in data.read_manifest(path)] == [("a.wav", "un chien aboie")]


def test_manifest_errors_are_one_line(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("audio_path,split\na.wav,train\n")
    with pytest.raises(ValueError, match="no caption column"):
        data.read_manifest(path, captions=True)
    with pytest.raises(ValueError, match="no clap_score column.*data.py clap"):
        data.read_manifest(path, min_clap=0.4)
    with pytest.raises(ValueError, match="no such manifest"):
        data.read_manifest(tmp_path / "nope.csv")
    for name, text, message in [
            ("short.csv", "caption,audio_path\na dog,a.wav\nrain\n", "row 2 has no audio_path"),
            ("number.jsonl", '{"audio_path": "a.wav"}\n3\n', "number.jsonl:2: not a JSON object"),
            ("broken.jsonl", '{"audio_path": "a.wav"\n', "broken.jsonl:1: not a JSON object"),
            ("clap.csv", "audio_path,clap_score\na.wav,n/a\n", "a clap_score is not a number")]:
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=message):
            data.read_manifest(tmp_path / name, min_clap=0.4 if "clap" in name else 0)
    (tmp_path / "latin1.csv").write_bytes("audio_path,caption\na.wav,caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.csv: not UTF-8 text"):
        data.read_manifest(tmp_path / "latin1.csv")


def test_check_lists_and_counts_bad_rows(clips, capsys):
    with pytest.raises(SystemExit) as exit:
        data.main(["check", "--manifest", str(clips)])
    assert exit.value.code == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith(f"{len(BAD)} of {6 + len(BAD)} rows unusable")
    for row, (name, reason) in enumerate(BAD.items(), start=7):
        assert any(line.startswith(f"row {row}: ") and name in line and reason in line for line in out), (name, out)


def test_check_passes_a_clean_manifest(tmp_path, capsys):
    data.main(["check", "--manifest", str(write_clips(tmp_path, bad=False))])
    assert capsys.readouterr().out.strip() == "0 of 6 rows unusable"


# -----------------------------------------------------------------------------
# datasets


def test_clips_are_mono_resampled_cropped_normalised(clips):
    rows = data.read_manifest(clips)
    length = round(SEGMENT * SR)
    ds = data.AudioClips(rows[:6], SR, length, flip=0.0)
    for i in range(6):
        audio = ds[i]["audio"]
        assert audio.shape == (length,)
        assert audio.abs().max().item() == pytest.approx(1.0)
    stereo16k = data.read_audio(rows[1]["path"], SR)  # 16 kHz stereo, 0.08 s
    assert stereo16k.shape == (round(0.08 * SR),)


def test_clip_randomness_depends_on_seed_epoch_and_index_only(clips):
    rows = data.read_manifest(clips)[:6]
    ds = data.AudioClips(rows, SR, 600, seed=3)
    first = [ds[i]["audio"] for i in range(6)]
    assert all(torch.equal(a, ds[i]["audio"]) for i, a in enumerate(first))  # same epoch: same crops, flips
    ds.set_epoch(1)
    assert not all(torch.equal(a, ds[i]["audio"]) for i, a in enumerate(first))


def test_polarity_flip(clips):
    rows = data.read_manifest(clips)[:6]
    plain, flipped = data.AudioClips(rows, SR, 600, flip=0.0), data.AudioClips(rows, SR, 600, flip=1.0)
    assert torch.equal(flipped[2]["audio"], -plain[2]["audio"])
    length = round(SEGMENT * SR)  # clip0 exactly: only the polarity is random
    half = data.AudioClips(rows[:1] * 200, SR, length, flip=0.5)
    clip0 = data.AudioClips(rows, SR, length, flip=0.0)[0]["audio"]
    flips = [torch.equal(half[i]["audio"], -clip0) for i in range(200)]
    assert all(f or torch.equal(half[i]["audio"], clip0) for i, f in enumerate(flips))
    assert 70 < sum(flips) < 130


def test_bad_rows_are_replaced_by_the_next_good_one(clips):
    rows = data.read_manifest(clips)
    ds = data.AudioClips(rows, SR, round(SEGMENT * SR), flip=0.0)
    item = ds[7]  # corrupt.wav, then silent.wav and empty.wav, then wraps around to clip0
    assert [row for row, _ in item["skipped"]] == [8, 9, 10]
    assert torch.equal(item["audio"], ds[0]["audio"])  # clip0 is exactly one segment: no crop to differ
    assert item["caption"] == rows[0]["caption"]
    with pytest.raises(data.AudioError, match="data.py check"):
        data.AudioClips(rows[6:], SR, 600)[0]


def test_shard_sampler_splits_a_permutation_among_ranks_and_resumes():
    shards = [list(data.ShardSampler(10, r, 3, seed=1, epoch=0)) for r in range(3)]
    assert all(len(s) == 4 for s in shards)
    assert set(sum(shards, [])) == set(range(10))
    assert list(data.ShardSampler(10, 1, 3, seed=1, epoch=0, start=2)) == shards[1][2:]
    assert list(data.ShardSampler(10, 0, 1, seed=1, epoch=1)) != list(data.ShardSampler(10, 0, 1, seed=1, epoch=0))
    # fewer clips than ranks: the permutation wraps around as often as it takes, so that no rank waits on nothing
    assert [len(list(data.ShardSampler(1, r, 4))) for r in range(4)] == [1, 1, 1, 1]


# -----------------------------------------------------------------------------
# cache


def test_cache_resumes_and_training_sees_the_same_latents(clips, tmp_path, official_vae_ckpt, text_encoder_dir):
    out = tmp_path / "cache"
    rows = data.read_manifest(clips)
    args = ["cache", "--manifest", str(clips), "--out", str(out), "--vae", str(official_vae_ckpt),
            "--vae-config", "tiny", "--text-encoder", str(text_encoder_dir), "--segment", str(SEGMENT),
            "--workers", "0", "--batch-size", "4", "--dtype", "float32", "--device", "cpu"]
    data.main(args)
    files = {p.name: p.stat().st_mtime_ns for p in out.glob("*.pt") if p.name != "meta.pt"}
    assert len(files) == 6  # the four bad rows are reported, not cached
    victim = out / (data.cache_key(rows[3]) + ".pt")
    victim.unlink()  # as if the run had stopped before this clip
    data.main(args)
    again = {p.name: p.stat().st_mtime_ns for p in out.glob("*.pt") if p.name != "meta.pt"}
    assert again.keys() == files.keys()
    assert all(again[k] == files[k] for k in files if k != victim.name)  # done clips are not redone

    frames = round(SEGMENT * SR / 8)
    vae, _ = data.load_vae(official_vae_ckpt, E.VAE_PRESETS["tiny"])
    cached = data.collate([data.CachedClips(rows, str(out), frames)[0]])
    uncached = data.collate([data.AudioClips(rows, SR, frames * 8, flip=0.0)[0]])  # clip0: exactly a segment
    mean_c, std_c = train.posterior(cached, vae, "cpu")
    mean_u, std_u = train.posterior(uncached, vae, "cpu")
    assert mean_c.shape == (1, 8, frames)
    torch.testing.assert_close(mean_c, mean_u, rtol=1e-5, atol=1e-5 * mean_u.abs().max().item())
    torch.testing.assert_close(std_c, std_u, rtol=1e-5, atol=1e-5 * std_u.abs().max().item())
    t5 = E.TextEncoder.from_pretrained(text_encoder_dir)
    context, mask = t5([rows[0]["caption"]])
    n = int(mask.sum())
    torch.testing.assert_close(cached["context"][0], context[0, :n])
    (out / (data.cache_key(rows[0]) + ".pt")).write_bytes(b"cut short")  # a corrupt entry is skipped like a bad clip
    item = data.CachedClips(rows, str(out), frames)[0]
    assert item["skipped"][0][0] == 1 and "unreadable cache entry" in item["skipped"][0][1]
    (out / "meta.pt").write_bytes(b"cut short")
    with pytest.raises(ValueError, match="meta.pt: not a readable PyTorch checkpoint"):
        data.CachedClips(rows, str(out), frames)


def test_cache_redoes_entries_cut_short_or_of_other_shapes(clips, tmp_path, official_vae_ckpt):
    """Resuming checks what it resumes over: an entry a crash cut short, an empty one and one of other shapes are
    encoded again; sound entries are left alone."""
    out, rows = tmp_path / "cache", data.read_manifest(clips)
    args = ["cache", "--manifest", str(clips), "--out", str(out), "--vae", str(official_vae_ckpt),
            "--vae-config", "tiny", "--segment", str(SEGMENT), "--workers", "0", "--dtype", "float32",
            "--device", "cpu"]
    data.main(args)
    paths = [out / (data.cache_key(r) + ".pt") for r in rows[:6]]
    before = {p: p.stat().st_mtime_ns for p in paths}
    paths[0].write_bytes(paths[0].read_bytes()[:300])
    paths[1].write_bytes(b"")
    torch.save({"mean": torch.zeros(8, 3), "std": torch.ones(8, 3), "context": None}, paths[2])
    data.main(args)
    for p in paths:
        assert torch.load(p, weights_only=True)["mean"].shape == (8, round(SEGMENT * SR / 8))
    assert all(p.stat().st_mtime_ns == before[p] for p in paths[3:])
    paths[0].write_bytes(b"")  # training skips such an entry, saying how to mend it
    with pytest.raises(data.AudioError, match="^unreadable cache entry .*run `python data.py cache` on the manifest "
                                              "again, which redoes broken entries$"):
        data.read_cache_entry(paths[0], data.read_cache_meta(out))


def test_cache_stores_the_toy_text_encoder_inside(clips, tmp_path, official_vae_ckpt):
    """`--text-encoder toy` needs no folder: the cache carries the toy's encoder, as its checkpoints do."""
    out = tmp_path / "cache"
    data.main(["cache", "--manifest", str(clips), "--out", str(out), "--vae", str(official_vae_ckpt),
               "--vae-config", "tiny", "--text-encoder", "toy", "--segment", str(SEGMENT), "--workers", "0",
               "--dtype", "float32", "--device", "cpu"])
    meta = data.read_cache_meta(out)
    assert meta["text_encoder"] is None and meta["text_encoder_state"] is not None
    toy = E.TextEncoder.from_state(meta["text_encoder_state"])
    rows = data.read_manifest(clips)
    context, mask = toy([rows[0]["caption"]])
    cached = data.collate([data.CachedClips(rows, str(out), round(SEGMENT * SR / 8))[0]])
    torch.testing.assert_close(cached["context"][0], context[0, :int(mask.sum())])
    torch.testing.assert_close(toy([rows[0]["caption"]])[0], E.toy_text_encoder()([rows[0]["caption"]])[0])


def test_cache_refuses_other_settings(clips, tmp_path, official_vae_ckpt):
    out, vae = tmp_path / "cache", tmp_path / "vae.pt"
    shutil.copy(official_vae_ckpt, vae)
    common = ["cache", "--manifest", str(clips), "--out", str(out), "--vae", str(vae), "--vae-config", "tiny",
              "--workers", "0", "--device", "cpu", "--segment", "0.05"]
    data.main(common)
    with pytest.raises(SystemExit, match="other settings"):
        data.main([*common, "--segment", "0.1"])
    with pytest.raises(SystemExit, match="other settings"):  # the toy's T5 where there was none
        data.main([*common, "--text-encoder", "toy"])
    ckpt = torch.load(vae, weights_only=True)  # the VAE retrained in place: same file name, other weights
    torch.save({"state_dict": {k: v + 1e-3 for k, v in ckpt["state_dict"].items()}}, vae)
    with pytest.raises(SystemExit, match="other settings or weights"):
        data.main(common)


def test_a_full_disk_leaves_no_partial_file_and_names_the_disk_and_the_room_needed(tmp_path, monkeypatch):
    """torch's zip writer reports a full disk as a RuntimeError ("unexpected pos"); the old file stays whole."""
    path = tmp_path / "ckpt.pt"
    torch.save({"step": 1}, path)

    def write_then_fail(obj, f):
        f.write(b"x" * 1000)
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 1088 vs 1000")
    monkeypatch.setattr(torch, "save", write_then_fail)
    monkeypatch.setattr(shutil, "disk_usage", lambda folder: SimpleNamespace(free=3_000_000))
    disk = next(p for p in [tmp_path, *tmp_path.parents] if os.path.ismount(p))
    with pytest.raises(data.DiskFull) as e:
        data.save_atomic({"weights": torch.zeros(2_000_000)}, str(path))  # 8 MB
    assert str(e.value) == (f"no room for {path} on the disk mounted at {disk}: it needs about 8 MB and 3 MB are "
                            "free; free some space and run again")
    assert os.listdir(tmp_path) == ["ckpt.pt"] and torch.load(path, weights_only=True) == {"step": 1}
    monkeypatch.setattr(shutil, "disk_usage", lambda folder: SimpleNamespace(free=10 ** 12))
    with pytest.raises(RuntimeError, match="unexpected pos"):  # with room to spare, that is another fault: shown
        data.save_atomic({"weights": torch.zeros(2_000_000)}, str(path))
    assert os.listdir(tmp_path) == ["ckpt.pt"]


# -----------------------------------------------------------------------------
# CLAP


@pytest.fixture(scope="module")
def clap_dir(tmp_path_factory):
    """A tiny random CLAP (HTSAT audio tower, RoBERTa-shaped text tower with ByT5's byte vocabulary)."""
    from transformers import ByT5Tokenizer, ClapConfig, ClapFeatureExtractor, ClapModel
    torch.manual_seed(0)
    text = dict(vocab_size=384, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                max_position_embeddings=80, pad_token_id=0)
    audio = dict(spec_size=64, window_size=4, num_mel_bins=16, patch_size=4, patch_stride=(4, 4), hidden_size=32,
                 depths=[1, 1], num_attention_heads=[2, 2], patch_embeds_hidden_size=16, enable_fusion=False)
    path = tmp_path_factory.mktemp("clap")
    ClapModel(ClapConfig(text_config=text, audio_config=audio, projection_dim=8)).save_pretrained(path)
    ClapFeatureExtractor(feature_size=16, sampling_rate=8000, hop_length=160, max_length_s=1, fft_window_size=512,
                         frequency_max=4000, truncation="rand_trunc").save_pretrained(path)
    ByT5Tokenizer().save_pretrained(path)
    return path


def test_clap_scores_each_row_against_its_own_caption(clips, tmp_path, clap_dir):
    from transformers import AutoFeatureExtractor, AutoTokenizer, ClapModel
    out = tmp_path / "scored.csv"
    data.main(["clap", "--manifest", str(clips), "--out", str(out), "--model", str(clap_dir), "--batch-size", "4",
               "--device", "cpu"])
    scored = data.read_manifest(out)
    assert [r["audio_path"] for r in scored] == [f"audio/clip{i}.wav" for i in range(6)]  # bad rows left out
    model, tok = ClapModel.from_pretrained(clap_dir).eval(), AutoTokenizer.from_pretrained(clap_dir)
    features = AutoFeatureExtractor.from_pretrained(clap_dir)
    for r in scored[:2]:
        audio = data.load_clip(r["path"], features.sampling_rate).numpy()
        with torch.no_grad():
            o = model(**tok([r["caption"]], return_tensors="pt"),
                      **features([audio], sampling_rate=features.sampling_rate, return_tensors="pt"))
        assert float(r["clap_score"]) == pytest.approx(float((o.text_embeds * o.audio_embeds).sum()), abs=1e-4)
