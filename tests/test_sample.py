"""sample.py and the pipeline behind it (ezaudio.EzAudio), end to end on tiny random models saved as users' files
are: a released-format DiT with its YAML config, a released-format VAE with config.json beside it, a T5 folder."""

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml
from transformers import BertConfig

import ezaudio as E
import sample

ROOT = Path(__file__).resolve().parent.parent
SR, HOP = 24000, 8  # the tiny VAE: 3000 latent frames a second


@pytest.fixture(scope="session")
def dit_yaml(tmp_path_factory):
    """The tiny DiT's official `model` block, as in the released ezaudio-xl.yml."""
    ref = torch.load(ROOT / "tests" / "fixtures" / "reference" / "dit_tiny.pt", weights_only=True)
    path = tmp_path_factory.mktemp("yml") / "dit_tiny.yml"
    path.write_text(yaml.safe_dump({"model": ref["config"]}))
    return path


@pytest.fixture(scope="session")
def model_flags(official_dit_ckpt, dit_yaml, official_vae_ckpt, text_encoder_dir):
    return ["--ckpt", str(official_dit_ckpt), "--dit-config", str(dit_yaml), "--vae", str(official_vae_ckpt),
            "--text-encoder", str(text_encoder_dir), "--device", "cpu"]


@pytest.fixture
def run(model_flags, tmp_path):
    """sample.py's main with the tiny models, 0.05 s and 3 steps unless overridden; returns the output folder."""
    def run(*argv, out="out"):
        sample.main([*argv, *model_flags, "--out", str(tmp_path / out), "--steps", "3",
                     *([] if "--edit" in argv or "--duration" in argv else ["--duration", "0.05"])])
        return tmp_path / out
    return run


@pytest.fixture(scope="session")
def model(official_dit_ckpt, dit_yaml, official_vae_ckpt, text_encoder_dir):
    return E.EzAudio.from_pretrained(ckpt=official_dit_ckpt, dit_config=dit_yaml, vae=official_vae_ckpt,
                                     text_encoder=text_encoder_dir, device="cpu")


def read(path):
    audio, sr = sf.read(path, dtype="float32")
    return audio, sr


def spy(monkeypatch, obj, name, calls):
    """Record the arguments and result of every call of obj.name."""
    original = getattr(obj, name)

    def wrapper(*args, **kwargs):
        result = original(*args, **kwargs)
        calls.append((args, result))
        return result
    monkeypatch.setattr(obj, name, wrapper)


# -----------------------------------------------------------------------------
# generation


def test_one_wav_per_prompt_and_sample_at_the_right_length_and_rate(run, capsys):
    out = run("a dog barks", "rain on a tin roof", "--num-samples", "2", "--batch-size", "2", "--seed", "5")
    names = sorted(os.listdir(out))
    assert names == ["a_dog_barks_s5.wav", "a_dog_barks_s6.wav", "rain_on_a_tin_roof_s5.wav",
                     "rain_on_a_tin_roof_s6.wav"]
    for name in names:
        info = sf.info(out / name)
        assert (info.samplerate, info.frames, info.channels, info.subtype) == (SR, 1200, 1, "FLOAT")  # 0.05 s
    printed = capsys.readouterr().out
    assert f"wrote 4 WAV file(s) (24000 Hz, FLOAT) to {out}{os.sep} in " in printed


def test_duration_is_rounded_to_whole_latent_frames(run):
    out = run("a dog barks", "--duration", "0.0101")  # 30.3 frames -> 30
    assert sf.info(out / "a_dog_barks_s0.wav").frames == 30 * HOP


def test_same_seed_gives_the_same_audio_and_another_seed_differs(run):
    first = run("a dog barks", "--seed", "3", "--num-samples", "2", out="a")
    again = run("a dog barks", "--seed", "4", out="b")
    batched = run("a dog barks", "--seed", "3", "--num-samples", "2", "--batch-size", "2", out="c")
    s3, s4 = read(first / "a_dog_barks_s3.wav")[0], read(first / "a_dog_barks_s4.wav")[0]
    assert np.array_equal(read(again / "a_dog_barks_s4.wav")[0], s4)  # the file name's seed regenerates it alone
    assert not np.allclose(s3, s4)
    for name, audio in (("a_dog_barks_s3.wav", s3), ("a_dog_barks_s4.wav", s4)):  # batching: only float rounding
        np.testing.assert_allclose(read(batched / name)[0], audio, rtol=0, atol=1e-5 * np.abs(audio).max())


def test_noise_is_drawn_as_the_published_pipeline_draws_it(model, monkeypatch):
    """One generator per sample, seeded with its seed: first the initial noise (1, C, L), then one draw of that
    shape after every step's model call (eta > 0); CFG against the empty prompt in one batch [text; empty]."""
    decoded = []
    spy(monkeypatch, model.vae, "decode", decoded)
    model.generate(["a dog barks", "a cat"], duration=0.01, steps=4, seed=[7, 8])
    dit, diffusion = model.dit, model.diffusion
    for i, (prompt, seed) in enumerate([("a dog barks", 7), ("a cat", 8)]):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn((1, 8, 30), generator=g)
        (c, cm), (n, nm) = model.text_encoder([prompt]), model.text_encoder([""])
        for t in [999, 749, 499, 249]:
            v_pos, v_neg = dit(torch.cat([x, x]), torch.tensor([t, t]), torch.cat([c, n]), torch.cat([cm, nm])).chunk(2)
            v = E.classifier_free_guidance(v_pos, v_neg, 5.0, 0.75)
            x = diffusion.step(v, t, x, 4, 1.0, torch.randn((1, 8, 30), generator=g))
        torch.testing.assert_close(decoded[0][0][0][i: i + 1], x, rtol=0, atol=1e-5 * x.abs().max().item())


def dit_batch_sizes(model, **kw):
    sizes = []
    handle = model.dit.register_forward_pre_hook(lambda module, args: sizes.append(args[0].shape[0]))
    try:
        model.generate(duration=0.01, steps=2, **kw)
    finally:
        handle.remove()
    return set(sizes)


def test_empty_prompt_and_cfg_zero_run_without_guidance(model):
    assert dit_batch_sizes(model, prompts=["a dog barks"]) == {2}  # [text; empty text]
    assert dit_batch_sizes(model, prompts=[""]) == {1}
    assert dit_batch_sizes(model, prompts=["a dog barks"], guidance=0) == {1}


def test_cfg_one_encodes_no_negative_prompt(model, monkeypatch):
    calls = []
    spy(monkeypatch, model.text_encoder, "forward", calls)
    assert dit_batch_sizes(model, prompts=["a dog barks"], guidance=1) == {1}
    assert [args[0] for args, _ in calls] == [["a dog barks"]]


def test_empty_prompt_on_the_command_line(run, capsys):
    assert os.listdir(run("")) == ["unconditional_s0.wav"]
    assert ", no guidance, " in capsys.readouterr().out  # though --cfg is 5: there is no text to guide by


def test_bf16_autocast_on_cpu_changes_the_numbers_only_a_little(model):
    bf16 = E.EzAudio(model.dit, model.vae, model.text_encoder, "cpu", torch.bfloat16)
    fp32 = model.generate(["a dog barks"], duration=0.01, steps=3)
    low = bf16.generate(["a dog barks"], duration=0.01, steps=3)
    assert low.dtype == torch.float32 and torch.isfinite(low).all()
    assert not torch.equal(low, fp32)  # autocast took effect
    assert (low - fp32).abs().max() < 0.1 * fp32.abs().max()


def test_dtype_flag_reaches_the_dit(run, capsys):
    fp32 = read(run("a dog barks", out="fp32") / "a_dog_barks_s0.wav")[0]
    bf16 = read(run("a dog barks", "--dtype", "bf16", out="bf16") / "a_dog_barks_s0.wav")[0]
    assert "on cpu (bf16)" in capsys.readouterr().out
    assert not np.array_equal(bf16, fp32)
    assert np.abs(bf16 - fp32).max() < 0.1 * np.abs(fp32).max()


def test_fast_flag_puts_the_dit_weights_in_dtype(run, capsys, monkeypatch):
    """Only that the flag is honoured; test_fastpaths.py shows that fast sampling computes what eager does."""
    calls = []
    spy(monkeypatch, E.EzAudio, "sample_latents", calls)
    fp32 = read(run("a dog barks", out="fp32") / "a_dog_barks_s0.wav")[0]
    fast = read(run("a dog barks", "--fast", "--dtype", "bf16", out="fast") / "a_dog_barks_s0.wav")[0]
    assert "on cpu (bf16, fast, no CUDA graph on cpu)" in capsys.readouterr().out
    pipes = [args[0] for args, _ in calls]
    assert [p.fast for p in pipes] == [False, True] and pipes[1].dit.mask_embed.dtype == torch.bfloat16
    assert not np.array_equal(fast, fp32)
    assert np.abs(fast - fp32).max() < 0.1 * np.abs(fp32).max()


def test_compile_flag_compiles_the_dit(run, monkeypatch):
    """Only that the flag is honoured; test_fastpaths.py shows that compiled sampling computes what eager does."""
    compiled = []
    monkeypatch.setattr(E.EzAudioDiT, "compile", lambda self, *args, **kwargs: compiled.append(self))
    run("a dog barks", "--compile")
    assert len(compiled) == 1 and isinstance(compiled[0], E.EzAudioDiT)


def test_pcm16_says_when_samples_clip(tmp_path, capsys):
    audio = torch.tensor([0.5, 1.5, -2.0])
    sample.write_wav(str(tmp_path / "loud.wav"), audio, SR, "PCM_16")
    assert "clips" in capsys.readouterr().err
    assert np.abs(read(tmp_path / "loud.wav")[0]).max() <= 1
    sample.write_wav(str(tmp_path / "float.wav"), audio, SR, "FLOAT")
    assert capsys.readouterr().err == ""
    assert np.array_equal(read(tmp_path / "float.wav")[0], audio.numpy())
    assert sorted(os.listdir(tmp_path)) == ["float.wav", "loud.wav"]  # no temporary files left


def test_a_project_checkpoint_registered_in_models_is_a_model_name(tmp_path, monkeypatch, capsys,
                                                                    text_encoder_dir):
    """How `--model toy` comes in: one MODELS line naming a checkpoint that carries its configs, VAE and T5."""
    dit_cfg, vae_cfg = E.DIT_PRESETS["tiny"], E.VAE_PRESETS["tiny"]
    torch.save({"format": "ezaudio", "stage": 3, "step": 1,
                "config": {"dit": asdict(dit_cfg), "vae": asdict(vae_cfg), "vae_path": None,
                           "text_encoder": str(text_encoder_dir), "train": {}},
                "model": E.EzAudioDiT(dit_cfg).state_dict(), "ema": None, "vae": E.WaveformVAE(vae_cfg).state_dict(),
                "text_encoder": None}, tmp_path / "mine.pt")
    monkeypatch.setitem(E.MODELS, "mine", dict(file=str(tmp_path / "mine.pt")))  # absolute here; relative in MODELS
    sample.main(["a dog barks", "--model", "mine", "--duration", "0.01", "--steps", "2", "--device", "cpu",
                 "--out", str(tmp_path / "out")])
    assert sf.info(tmp_path / "out" / "a_dog_barks_s0.wav").frames == 30 * HOP
    assert capsys.readouterr().out.startswith("mine on cpu (fp32): 0.01 s, 2 steps")


def test_released_models_are_recognised_by_their_shapes():
    released = {name: spec for name, spec in E.MODELS.items() if "hub_file" in spec}
    assert set(released) == {"s3_xl", "s3_l"}
    for name, spec in released.items():
        with torch.device("meta"):
            state = E.EzAudioDiT(E.DIT_PRESETS[spec["dit"]]).state_dict()
        assert E.guess_released_model(state) == name
    with torch.device("meta"):
        assert E.guess_released_model(E.EzAudioDiT(E.DIT_PRESETS["tiny"]).state_dict()) is None


# -----------------------------------------------------------------------------
# editing


def test_edit_regenerates_the_masked_frames_and_keeps_the_rest(model, monkeypatch):
    encoded, decoded = [], []
    spy(monkeypatch, model.vae, "encode", encoded)
    spy(monkeypatch, model.vae, "decode", decoded)
    clip = 0.3 * torch.sin(torch.arange(4800) / 7.0)  # 0.2 s, peak 0.3
    out = model.edit(clip, "a cat", mask_start=0.05, mask_length=0.05, boundary=0.04, steps=3)
    gt, latents = encoded[0][1], decoded[0][0][0]
    # the boundary is cut to half the mask, 0.025 s: window 0.025 s to 0.125 s = samples 600:3000 = 300 frames;
    # mask: 0.025 s to 0.075 s into it = frames 75:225
    assert gt.shape == latents.shape == (1, 8, 300)
    known = torch.ones(300, dtype=torch.bool)
    known[75:225] = False
    assert torch.equal(latents[..., known], gt[..., known])
    assert not torch.isclose(latents[..., ~known], gt[..., ~known]).any()
    normalised = clip / (clip.abs().max() + 1e-9)
    assert out.shape == (4800,)
    assert torch.equal(out[:600], normalised[:600]) and torch.equal(out[3000:], normalised[3000:])
    assert not torch.equal(out[600:3000], normalised[600:3000])


def test_edit_draws_its_posterior_sample_apart_from_the_initial_noise(model, monkeypatch):
    """Both come from `seed`; drawn from one stream they would be the same tensor, which training never sees."""
    posteriors, encoded, noises = [], [], []
    spy(monkeypatch, model.vae, "posterior", posteriors)
    spy(monkeypatch, model.vae, "encode", encoded)
    spy(monkeypatch, E, "randn", noises)
    model.edit(0.3 * torch.sin(torch.arange(4800) / 7.0), "a cat", mask_start=0.05, mask_length=0.05, steps=2, seed=3)
    (mean, std), gt, first_noise = posteriors[0][1], encoded[0][1], noises[0][1]
    assert first_noise.shape == gt.shape
    assert not torch.allclose((gt - mean) / std, first_noise, atol=0.5)


def test_a_mask_past_the_end_extends_the_clip(model):
    clip = torch.sin(torch.arange(2400) / 5.0)  # 0.1 s
    out = model.edit(clip, "a cat", mask_start=0.1, mask_length=0.05, boundary=0.01, steps=2)
    assert out.shape == (3600,)  # 0.15 s
    assert torch.equal(out[:2160], clip[:2160] / (clip.abs().max() + 1e-9))  # before the window (0.09 s)


def test_edit_on_the_command_line_resamples_the_input(run, tmp_path):
    sf.write(tmp_path / "in.wav", 0.5 * np.sin(np.arange(1600) / 5.0), 16000)  # 0.1 s at 16 kHz
    out = run("a cat", "--edit", str(tmp_path / "in.wav"), "--mask-start", "0.03", "--mask-length", "0.04",
              "--num-samples", "2")
    assert sorted(os.listdir(out)) == ["in_a_cat_s0.wav", "in_a_cat_s1.wav"]
    info = sf.info(out / "in_a_cat_s0.wav")
    assert (info.samplerate, info.frames) == (SR, 2400)


# -----------------------------------------------------------------------------
# bad input: one line, non-zero exit


@pytest.fixture
def bad_files(tmp_path, dit_yaml, official_vae_ckpt):
    (tmp_path / "corrupt.pt").write_bytes(b"not a checkpoint at all")
    (tmp_path / "text.wav").write_text("hello")
    sf.write(tmp_path / "clip.wav", np.zeros(2400), SR)
    sf.write(tmp_path / "empty.wav", np.zeros(0), SR)
    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(
        tmp_path / "bert")
    config = yaml.safe_load(dit_yaml.read_text())
    config["model"]["depth"] = 6
    (tmp_path / "deeper.yml").write_text(yaml.safe_dump(config))
    return tmp_path


BAD = [  # (flags replacing or adding to the tiny models' flags, what the message says)
    (["--ckpt", "{tmp}/missing.pt"], "missing.pt: no such file"),
    (["--ckpt", "{tmp}/corrupt.pt"], "not a readable PyTorch checkpoint"),
    (["--dit-config", "{tmp}/deeper.yml"], "does not match the model config"),
    (["--dit-config", "{tmp}/text.wav"], "not an EzAudio YAML config"),
    (["--dit-config", None], "needs its config (--dit-config)"),
    (["--vae-config", "{tmp}/missing.json"], "cannot read it"),
    (["--text-encoder", "{tmp}/no_t5"], "cannot load the text encoder"),
    (["--text-encoder", "{tmp}/bert"], "is a bert model, not a T5"),
    (["--model", "s3_xxl"], "invalid choice: 's3_xxl'"),
    (["--duration", "0"], "--duration must be a finite number of seconds > 0, not 0"),
    (["--duration", "-1"], "--duration must be a finite number of seconds > 0, not -1"),
    (["--duration", "inf"], "--duration must be a finite number of seconds > 0, not inf"),
    (["--duration", "nan"], "--duration must be a finite number of seconds > 0, not nan"),
    (["--duration", "1e300"], "--duration (1e+300 s) would need at least"),
    (["--duration", "1e8"], "GB of cpu memory here: the VAE decoder holds 128 channels x 24000 samples a second"),
    (["--eta", "2"], "--eta must be 0 to 1: above 1 the DDIM step's variance"),
    (["--eta", "-0.5"], "--eta must be 0 to 1"),
    (["--cfg", "-2"], "--cfg must be >= 0"),
    (["--cfg", "nan"], "--cfg must be >= 0"),
    (["--steps", "0"], "--steps must be 1 to 1000"),
    (["--rescale", "2"], "--rescale must be 0 to 1"),
    (["--num-samples", "0"], "--num-samples"),
    (["--seed", "-1"], "--seed must be 0 to 2^63"),
    (["--seed", str(2 ** 63 - 1), "--num-samples", "2"], "--seed must be 0 to 2^63"),
    (["--dtype", "fp16"], "float16 runs on a GPU only"),
    (["--device", "nonsense"], "device 'nonsense' is not usable here"),
    (["--edit", "{tmp}/text.wav", "--mask-start", "0", "--mask-length", "0.01"], "not a readable audio file"),
    (["--edit", "{tmp}/missing.wav", "--mask-start", "0", "--mask-length", "0.01"], "missing.wav: no such file"),
    (["--edit", "{tmp}/empty.wav", "--mask-start", "0", "--mask-length", "0.01"], "empty.wav: the file holds no audio"),
    (["--edit", "{tmp}/clip.wav", "--mask-start", "0.5", "--mask-length", "0.01"], "must start within the 0.10 s"),
    (["--edit", "{tmp}/clip.wav", "--mask-start", "0.01", "--mask-length", "-1"], "positive length"),
    (["--edit", "{tmp}/clip.wav", "--mask-start", "0.01", "--mask-length", "0.0001"], "at least one latent frame"),
    (["--edit", "{tmp}/clip.wav", "--mask-start", "0.05", "--mask-length", "1e9"],
     "the edited clip's length (1e+09 s) would need at least"),
    (["--edit", "{tmp}/clip.wav", "--mask-start", "0.05", "--mask-length", "inf"],
     "the edited clip's length must be a finite number of seconds > 0, not inf"),
    (["--edit", "{tmp}/clip.wav", "--mask-start", "nan", "--mask-length", "1"], "must start within the 0.10 s"),
    (["--edit", "{tmp}/clip.wav", "--mask-start", "0.05", "--mask-length", "nan"], "positive length"),
    (["--edit", "{tmp}/clip.wav"], "--edit needs --mask-start and --mask-length"),
    (["--mask-start", "1"], "need --edit"),
    (["--out", "{tmp}/clip.wav"], "is a file; name a folder"),
    (["--edit", "{tmp}/clip.wav", "--mask-start", "0", "--mask-length", "0.01", "--duration", "1"],
     "--duration does not apply to --edit"),
]


def error_of(model_flags, bad_files, flags):
    """The message sample.py exits with, given flags that replace or add to the tiny models' flags."""
    argv = ["a dog barks", *model_flags, "--out", str(bad_files / "out")]  # each fails before sampling
    for flag, value in zip(flags[::2], flags[1::2]):
        if flag in argv:
            i = argv.index(flag)
            del argv[i: i + 2]
        if value is not None:
            argv += [flag, value.format(tmp=bad_files)]
    with pytest.raises(SystemExit) as e:
        sample.main(argv)
    return str(e.value.code)


@pytest.mark.parametrize("flags, message", BAD, ids=[m for _, m in BAD])
def test_bad_input_gets_one_line(model_flags, bad_files, flags, message):
    error = error_of(model_flags, bad_files, flags)
    assert error.startswith("error: ") and "\n" not in error
    assert message in error


EARLY = [(flags, message) for flags, message in BAD  # but a mask under one latent frame: that needs the model
         if {"--edit", "--duration", "--eta", "--cfg"} & set(flags) and "at least one latent frame" not in message]


@pytest.mark.parametrize("flags, message", EARLY, ids=[m for _, m in EARLY])
def test_bad_edit_clip_mask_or_duration_fails_before_the_model_loads(model_flags, bad_files, monkeypatch, flags,
                                                                    message):
    def load(*args, **kwargs):
        raise AssertionError("the model was loaded")
    monkeypatch.setattr(E.EzAudio, "from_pretrained", load)
    assert message in error_of(model_flags, bad_files, flags)


def test_vae_config_that_does_not_fit_the_vae(model_flags, bad_files):
    official = json.loads((ROOT / "tests" / "fixtures" / "reference" / "official_keys.json").read_text())
    (bad_files / "released.json").write_text(json.dumps(official["vae"]["config"]))
    with pytest.raises(SystemExit, match="does not match the model config"):
        sample.main(["x", *model_flags, "--vae-config", str(bad_files / "released.json"), "--out", str(bad_files)])


def test_two_prompts_writing_the_same_file(model_flags):
    with pytest.raises(SystemExit, match="two prompts would both write a_dog_s0.wav"):
        sample.main(["A dog!", "a dog?", *model_flags])


def test_many_samples_are_checked_for_clashing_names_at_once():
    start = time.perf_counter()
    assert sample.parse_args(["a dog", "a cat", "--num-samples", "100000"]).num_samples == 100000
    assert time.perf_counter() - start < 2  # comparing each name with every other took two minutes


def test_the_duration_is_bounded_by_the_memory_it_needs(model, monkeypatch):
    """In the Python API too, where the audio is allocated: the tiny VAE's widest layer holds 8 channels at 24 kHz,
    768 kB a second; with memory for 10 s of it, 11 s (or two samples of 6 s, or an edit out to 11 s) are refused."""
    monkeypatch.setattr(E, "memory_of", lambda device: 10 * 8 * SR * 4)
    with pytest.raises(ValueError, match=r"^the duration \(11 s\) would need at least 0.008448 GB, more than the "
                                         r"0.00768 GB of cpu memory here: the VAE decoder holds 8 channels x 24000 "
                                         r"samples a second in float32; at most 10 s at a time$"):
        model.generate(["a dog"], duration=11)
    with pytest.raises(ValueError, match=r"\(6 s x 2 samples\) would need at least"):
        model.generate(["a dog", "a cat"], duration=6)
    with pytest.raises(ValueError, match=r"^the edited clip's length \(11 s\) would need"):
        model.edit(torch.ones(2400), "a cat", mask_start=0.1, mask_length=10.9)
    with pytest.raises(ValueError, match="finite number of seconds > 0, not nan"):
        model.generate(["a dog"], duration=float("nan"))
    assert model.generate(["a dog"], duration=0.01, steps=1).shape == (1, 240)


def test_released_weights_offline_and_not_cached(tmp_path, monkeypatch):
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(SystemExit) as e:
        sample.main(["a dog barks", "--device", "cpu"])
    message = str(e.value.code)
    assert message.startswith("error: ckpts/s3/ezaudio_s3_xl.pt of the hub repo OpenSound/EzAudio is not in the "
                              "Hugging Face cache") and "\n" not in message
    assert "--ckpt (ckpt= in Python)" in message and "--model toy" in message  # what a newcomer can do offline


@pytest.mark.slow
def test_command_line_in_a_fresh_process(model_flags, tmp_path):
    """The real entry point: exit codes, and no traceback on bad input."""
    cmd = [sys.executable, str(ROOT / "sample.py"), "a dog barks", *model_flags, "--duration", "0.02",
           "--steps", "2", "--out", str(tmp_path), "--subtype", "PCM_16"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert sf.info(tmp_path / "a_dog_barks_s0.wav").subtype == "PCM_16"
    assert f"wrote 1 WAV file(s) (24000 Hz, PCM_16) to {tmp_path}{os.sep}" in done.stdout
    bad = subprocess.run(cmd + ["--steps", "0"], capture_output=True, text=True, cwd=tmp_path)
    assert bad.returncode != 0 and bad.stderr.strip().splitlines() == ["error: --steps must be 1 to 1000 (see --help)"]
