"""EzAudio-ControlNet (SPEC §7): the released layout, a fresh ControlNet that changes nothing, the energy condition,
and sampling that follows a reference, from Python and from sample.py, on tiny random models. Parity with the
published implementation is in test_reference.py."""

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml

import ezaudio as E
import sample
from conftest import random_dit, tiny_t5

KEYS = json.loads((Path(__file__).parent / "fixtures" / "reference" / "official_keys.json").read_text())
RELEASED = KEYS["controlnet-energy-l"]
# the released VAE's hop (480) with a handful of channels, so that the released condition's framing fits it
VAE = E.VAEConfig(channels=2, c_mults=(1, 1, 1, 1), strides=(2, 4, 6, 10), latent_dim=8)
SR = 24000


def n_params(module):
    return sum(p.numel() for p in module.parameters())


def random_controlnet(dit, seed=1):
    torch.manual_seed(seed)
    net = E.ControlNet.from_dit(dit)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.05)
    return net


@pytest.fixture(scope="module")
def dit():
    return random_dit(E.DIT_PRESETS["tiny"]).eval()


@pytest.fixture(scope="module")
def pipe(dit):
    torch.manual_seed(0)
    tokenizer, t5 = tiny_t5()
    return E.EzAudio(dit, E.WaveformVAE(VAE), E.TextEncoder(tokenizer, t5), "cpu",
                     controlnet=random_controlnet(dit).eval())


def bursts(seconds=0.2, on=((0.05, 0.1),), sr=SR):
    """A tone that sounds only in the given spans (seconds), silent elsewhere."""
    t = torch.arange(round(seconds * sr)) / sr
    audio = 0.5 * torch.sin(2 * torch.pi * 440 * t)
    return audio * sum((t >= a) & (t < b) for a, b in on)


# ---- the model ------------------------------------------------------------------------------------------------------

def test_released_layout_loads_key_for_key():
    cfg = E.DiTConfig.from_official(RELEASED["config"]["model"])
    control = E.ControlConfig.from_official(RELEASED["config"])
    assert (cfg, control) == (E.DIT_PRESETS["L"], E.ControlConfig())  # what a released-format file is built with
    with torch.device("meta"):
        net = E.ControlNet(cfg, control)
    assert {k: list(v.shape) for k, v in net.state_dict().items()} == RELEASED["state_dict"]
    assert n_params(net) == RELEASED["num_parameters"] == 291_225_732
    state = {k: torch.empty(shape, device="meta") for k, shape in RELEASED["state_dict"].items()}
    E.load_weights(net, state, "controlnet-energy-l")  # raises on any missing, unexpected or misshapen key


def test_a_fresh_controlnet_copies_the_input_half_and_changes_nothing(dit):
    net = E.ControlNet.from_dit(dit)
    ours, theirs = net.state_dict(), dit.model.state_dict()
    copied = [k for k in ours if not k.startswith("controlnet_")]
    assert copied and all(torch.equal(ours[k], theirs[k]) for k in copied)
    x, t = torch.randn(2, 8, 20), torch.tensor([999, 10])
    context, mask = torch.randn(2, 5, 32), torch.tensor([[True] * 5, [True, True, False, False, False]])
    condition = torch.rand(2, 1, 40)
    residuals = net(dit.assemble_input(x), t, condition, context, mask)
    assert len(residuals) == 2 and all(r.shape == (2, 20, 64) and not r.any() for r in residuals)
    with torch.no_grad():
        plain = dit(x, t, context, mask)
        assert torch.equal(dit(x, t, context, mask, residuals=residuals), plain)
        # and the zero-initialised layers are all that keeps it so: once trained, the condition steers the DiT
        torch.nn.init.normal_(net.controlnet_zero_blocks[0].weight, std=0.1)
        torch.nn.init.normal_(net.controlnet_pre.conv_out.weight, std=0.1)
        assert not torch.allclose(dit(x, t, context, mask, residuals=net(dit.assemble_input(x), t, condition, context,
                                                                          mask)), plain)


def test_residuals_reach_the_out_blocks_last_first(dit):
    """Each residual joins its own in-block's long skip, so the last in-block's reaches the first out-block."""
    x, t = torch.randn(1, 8, 12), torch.tensor([500])
    skips = []  # the skip each out-block fuses, in out-block order
    hooks = [b.register_forward_pre_hook(lambda m, args: skips.append(args[-1])) for b in dit.model.out_blocks]
    try:
        with torch.no_grad():
            dit(x, t)
            dit(x, t, residuals=[torch.zeros(1, 12, 64), torch.ones(1, 12, 64)])  # in-block order
    finally:
        for h in hooks:
            h.remove()
    plain, steered = skips[:2], skips[2:]
    torch.testing.assert_close(steered[0], plain[0] + 1)
    assert torch.equal(steered[1], plain[1])


def test_condition_mask_hides_frames():
    pre = E.ControlNetPre(E.ControlConfig(cond_blocks=(5, 8)), 16)
    torch.nn.init.normal_(pre.conv_out.weight)
    torch.nn.init.normal_(pre.mask_embed)
    a, b = torch.rand(1, 1, 20), torch.rand(1, 1, 20)
    hidden = torch.ones(1, 1, 20, dtype=torch.bool)
    assert pre(a).shape == (1, 10, 16)
    assert not torch.allclose(pre(a), pre(b))
    torch.testing.assert_close(pre(a, hidden), pre(b, hidden))  # nothing of the condition gets through
    assert not torch.allclose(pre(a, hidden), pre(a))


def test_energy_envelope_follows_loudness():
    audio = bursts(0.2, [(0.05, 0.1)])[None]  # 4800 samples -> 20 frames of 10 ms
    energy = E.energy_envelope(audio, E.ControlConfig())
    assert energy.shape == (1, 1, 20) and energy.max() == pytest.approx(1.0, abs=1e-6)
    assert energy[0, 0, 7] > 0.99 and energy[0, 0, 16] < 0.01  # inside the tone; 30 ms past it, below -60 dB
    assert (energy[0, 0, 1:5] < energy[0, 0, 2:6]).all()  # the window reaches into the tone as it nears


# ---- the pipeline -------------------------------------------------------------------------------------------------

def conditions(pipe, monkeypatch):
    """Record the condition of every ControlNet call."""
    seen = []
    original = pipe.controlnet.forward
    monkeypatch.setattr(pipe.controlnet, "forward", lambda x, t, condition, *args: seen.append(condition) or
                        original(x, t, condition, *args))
    return seen


def test_generate_follows_the_reference_prepared_as_published(pipe, monkeypatch):
    seen = conditions(pipe, monkeypatch)
    reference = 0.3 * bursts(0.1, [(0.02, 0.06)])  # 2400 samples: padded with zeros to 0.2 s
    audio = pipe.generate(["a dog barks", "a cat"], duration=0.2, steps=1, guidance=3.5, control=reference)
    assert audio.shape == (2, 2400)  # cut to the reference's length
    padded = torch.nn.functional.pad(reference / reference.abs().max(), (0, 2400))  # (4800,)
    expected = E.energy_envelope(padded[None], E.ControlConfig())  # (1, 1, 20)
    assert len(seen) == 1  # one step; its batch: [text; negative] of two prompts, each with the same condition
    torch.testing.assert_close(seen[0], expected.expand(4, -1, -1), rtol=0, atol=1e-6)
    assert pipe.generate(["a dog barks"], duration=0.06, steps=1, control=reference).shape == (1, 1440)  # cut to 0.06 s


def test_control_scale_scales_the_residuals(pipe):
    reference = bursts(0.2, [(0.05, 0.1)])
    kw = dict(duration=0.1, steps=1, seed=3, guidance=3.5, rescale=0.0)  # a control's defaults are not the paper's
    plain = pipe.generate(["a dog barks"], **kw)
    assert torch.equal(pipe.generate(["a dog barks"], control=reference, control_scale=0.0, **kw), plain)
    controlled = pipe.generate(["a dog barks"], control=reference, **kw)
    assert (controlled - plain).abs().max() > 1e-5  # a random tiny ControlNet moves the audio a little


def test_gate_silences_the_quiet_samples():
    reference = torch.tensor([0.5, -0.1, 0.05, -0.5, 0.2, 0.0])
    assert E.gate_reference(reference).tolist() == pytest.approx([1.0, -0.2, 0.1, -1.0, 0.4, 0.0], abs=1e-6)
    assert E.gate_reference(reference, 0.2).tolist() == pytest.approx([1.0, 0, 0, -1.0, 0.4, 0], abs=1e-6)
    with pytest.raises(ValueError, match="silent"):
        E.gate_reference(torch.zeros(100))
    with pytest.raises(ValueError, match="no sample above the gate 1"):
        E.gate_reference(reference, 1.0)


def test_gate_reaches_the_condition(pipe, monkeypatch):
    seen = conditions(pipe, monkeypatch)
    reference = bursts(0.2, [(0.02, 0.06)]) + 0.01 * bursts(0.2, [(0.1, 0.2)])  # a quiet hum after the burst
    pipe.generate([""], duration=0.2, steps=1, control=reference)
    pipe.generate([""], duration=0.2, steps=1, control=reference, gate=0.05)
    hum, gated = seen[0][0, 0, 12:18], seen[1][0, 0, 12:18]
    assert (hum > 0.25).all() and (gated == 0).all()  # -40 dB: a third of the way up from the -60 dB floor


@pytest.mark.parametrize("reference, duration, message", [
    (torch.zeros(4800), 0.2, "the reference is silent"),
    (bursts(0.01, [(0, 0.01)]), 0.2, "shorter than one latent frame (0.02 s)"),
    (bursts(0.2, [(0, 0.1)]), 0.02, "a controlled sample must be longer than 840 samples"),
])
def test_bad_reference(pipe, reference, duration, message):
    with pytest.raises(ValueError) as e:
        pipe.generate(["a dog barks"], duration=duration, steps=1, control=reference)
    assert message in str(e.value)


def test_a_model_without_controlnet_refuses_control(pipe):
    plain = E.EzAudio(pipe.dit, pipe.vae, pipe.text_encoder, "cpu")
    with pytest.raises(ValueError, match="this model has no ControlNet"):
        plain.generate(["a dog barks"], duration=0.2, steps=1, control=bursts())


@pytest.mark.parametrize("change, message", [
    (dict(dim=32, sola_rank=2), "width 32"),
    (dict(latent_dim=4), "latent size 4"),
    (dict(depth=2), "1 in-blocks"),
])
def test_controlnet_that_does_not_fit_the_dit(pipe, change, message):
    with torch.device("meta"):
        net = E.ControlNet(E.DiTConfig(**{**asdict(E.DIT_PRESETS["tiny"]), **change}))
    with pytest.raises(E.CheckpointError) as e:
        E.EzAudio(pipe.dit, pipe.vae, pipe.text_encoder, "cpu", controlnet=net)
    assert "does not fit the DiT" in str(e.value) and message in str(e.value)


def test_controlnet_condition_that_does_not_fit_the_vae(pipe):
    with pytest.raises(E.CheckpointError, match="does not fit the VAE's hop of 8"):
        E.EzAudio(pipe.dit, E.WaveformVAE(E.VAE_PRESETS["tiny"]), pipe.text_encoder, "cpu", controlnet=pipe.controlnet)


# ---- sample.py ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def files(tmp_path_factory, official_dit_ckpt):
    """Beside the tiny released-format DiT: its YAML config, a project-format VAE of the released hop, a
    released-format ControlNet for it and one for a wider DiT, a reference clip at 16 kHz in stereo, and bad clips."""
    folder = tmp_path_factory.mktemp("control")
    ref = torch.load(Path(__file__).parent / "fixtures" / "reference" / "dit_tiny.pt", weights_only=True)
    (folder / "dit.yml").write_text(yaml.safe_dump({"model": ref["config"]}))
    torch.manual_seed(0)
    torch.save({"format": "ezaudio", "config": {"dit": None, "vae": asdict(VAE)},
                "vae": E.WaveformVAE(VAE).state_dict()}, folder / "vae.pt")
    dit = E.dit_from_checkpoint(torch.load(official_dit_ckpt, weights_only=True), E.DIT_PRESETS["tiny"])
    torch.save({"model": random_controlnet(dit).state_dict()}, folder / "controlnet.pt")
    with torch.device("meta"):
        wide = E.ControlNet(E.DiTConfig(**{**asdict(E.DIT_PRESETS["tiny"]), "dim": 32, "sola_rank": 2}))
    torch.save({"model": wide.to_empty(device="cpu").state_dict()}, folder / "wide.pt")
    t = np.arange(1600) / 16000  # 0.1 s at 16 kHz: a tone in its first half, then silence
    tone = 0.5 * np.sin(2 * np.pi * 440 * t) * (t < 0.05)
    sf.write(folder / "ref.wav", np.stack([tone, 0.5 * tone], 1), 16000)
    sf.write(folder / "silent.wav", np.zeros(2400), SR)
    sf.write(folder / "short.wav", 0.5 * np.ones(100), SR)
    (folder / "text.wav").write_text("hello")
    return folder


@pytest.fixture(scope="module")
def flags(files, official_dit_ckpt, text_encoder_dir):
    return ["--ckpt", str(official_dit_ckpt), "--dit-config", str(files / "dit.yml"), "--vae", str(files / "vae.pt"),
            "--text-encoder", str(text_encoder_dir), "--device", "cpu", "--steps", "1"]


def test_published_defaults_with_control():
    args = sample.parse_args(["a dog barks", "--control", "ref.wav"])
    assert (args.model, args.steps, args.cfg, args.rescale, args.eta, args.duration, args.control_scale, args.gate) \
        == ("s3_l", 50, 3.5, 0.0, 1.0, 10.0, 1.0, 0.0)
    args = sample.parse_args(["a dog barks"])
    assert (args.model, args.steps, args.cfg, args.rescale) == ("s3_xl", 100, 5.0, 0.75)


def test_control_on_the_command_line(files, flags, tmp_path, capsys, monkeypatch):
    seen = []
    original = E.ControlNet.forward
    monkeypatch.setattr(E.ControlNet, "forward", lambda self, x, t, condition, *args: seen.append(condition) or
                        original(self, x, t, condition, *args))
    sample.main(["a dog barks", *flags, "--control", str(files / "ref.wav"), "--controlnet",
                 str(files / "controlnet.pt"), "--duration", "0.2", "--out", str(tmp_path)])
    assert "0.2 s following " in capsys.readouterr().out
    info = sf.info(tmp_path / "a_dog_barks_s0.wav")
    assert (info.samplerate, info.frames) == (SR, 2400)  # cut to the reference's 0.1 s
    energy = seen[0][0, 0]  # (20,): the tone's first 5 frames loud, the silence after it and the padding at the floor
    assert seen[0].shape == (2, 1, 20) and (energy[:4] > 0.9).all() and (energy[10:] == 0).all()


def test_controlnet_flags_reach_the_pipeline(files, flags, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(E.EzAudio, "generate", lambda self, prompts, *a, **kw: calls.append(kw) or
                        torch.zeros(len(prompts), 10))
    sample.main(["a dog barks", *flags, "--control", str(files / "ref.wav"), "--controlnet",
                 str(files / "controlnet.pt"), "--control-scale", "0.5", "--gate", "0.1", "--out", str(tmp_path)])
    kw = calls[0]
    assert (kw["control_scale"], kw["gate"], kw["guidance"], kw["rescale"], kw["steps"]) == (0.5, 0.1, 3.5, 0.0, 1)
    assert kw["control"].shape == (2400,)  # resampled from 16 kHz, channels averaged


BAD = [  # (flags added to the tiny models' and --control's, what the message says)
    (["--control", "{tmp}/text.wav"], "not a readable audio file"),
    (["--control", "{tmp}/missing.wav"], "missing.wav: no such file"),
    (["--control", "{tmp}/silent.wav"], "the reference is silent"),
    (["--gate", "1"], "no sample above the gate 1"),
    (["--gate", "-1"], "--gate must be >= 0"),
    (["--control", "{tmp}/short.wav"], "shorter than one latent frame"),
    (["--controlnet", "{tmp}/wide.pt"], "a ControlNet for latent size 8, width 32 and 2 in-blocks does not fit"),
    (["--controlnet", "{tmp}/vae.pt"], "not a ControlNet checkpoint"),
    (["--controlnet", "{tmp}/missing.pt"], "missing.pt: no such file"),
    (["--controlnet", None], "has no ControlNet of its own (there is one for --model s3_l, --model toy); pass one "
                             "with --controlnet"),
    (["--edit", "{tmp}/ref.wav", "--mask-start", "0", "--mask-length", "0.01"], "--control does not apply to --edit"),
]


def error_of(argv):
    with pytest.raises(SystemExit) as e:
        sample.main(argv)
    return str(e.value.code)


@pytest.mark.parametrize("extra, message", BAD, ids=[m for _, m in BAD])
def test_bad_control_gets_one_line(files, flags, extra, message):
    argv = ["a dog barks", *flags, "--control", str(files / "ref.wav"), "--controlnet", str(files / "controlnet.pt"),
            "--out", str(files / "out")]
    for flag, value in zip(extra[::2], extra[1::2]):
        if flag in argv:
            i = argv.index(flag)
            del argv[i: i + 2]
        if value is not None:
            argv += [flag, value.format(tmp=files)]
    error = error_of(argv)
    assert error.startswith("error: ") and "\n" not in error
    assert message in error


def test_control_with_a_model_that_has_none_fails_before_loading(files, monkeypatch):
    monkeypatch.setattr(E, "hub_file", lambda *a: pytest.fail("a download was started"))
    monkeypatch.setattr(E, "load_file", lambda *a: pytest.fail("a checkpoint was read"))
    message = error_of(["a dog barks", "--model", "s3_xl", "--control", str(files / "ref.wav"), "--device", "cpu"])
    assert "the model s3_xl has no ControlNet of its own" in message


def test_bad_reference_fails_before_the_model_loads(files, flags, monkeypatch):
    monkeypatch.setattr(E.EzAudio, "from_pretrained", lambda *a, **k: pytest.fail("the model was loaded"))
    for clip, message in (("text.wav", "not a readable audio file"), ("silent.wav", "the reference is silent")):
        assert message in error_of(["a dog barks", *flags, "--control", str(files / clip)])


def test_flags_that_need_control(flags):
    for extra in (["--controlnet", "x.pt"], ["--gate", "0.1"], ["--control-scale", "2"]):
        assert "need --control REF.wav" in error_of(["a dog barks", *flags, *extra])


def test_released_controlnet_offline_and_not_cached(files, flags, tmp_path, monkeypatch):
    """A DiT of a released model's shapes takes that model's ControlNet; offline and uncached, it fails in one line."""
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setitem(E.MODELS, "tiny_released", dict(hub_file="ckpts/s3/tiny.pt", dit="tiny",
                                                       text_encoder="x", controlnet="ckpts/controlnet/tiny.pt"))
    monkeypatch.setattr(E, "guess_released_model", lambda state: "tiny_released")
    error = error_of(["a dog barks", *flags, "--control", str(files / "ref.wav")])
    assert error.startswith("error: ckpts/controlnet/tiny.pt of the hub repo OpenSound/EzAudio is not in the Hugging "
                            "Face cache") and "--controlnet" in error and "\n" not in error


def test_control_offline_names_the_released_l_model(files, tmp_path, monkeypatch):
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    error = error_of(["a dog barks", "--control", str(files / "ref.wav"), "--device", "cpu"])
    assert error.startswith("error: ckpts/s3/ezaudio_s3_l.pt of the hub repo OpenSound/EzAudio is not in the Hugging "
                            "Face cache") and "\n" not in error
