"""EzAudio-ControlNet (SPEC §7): the released layout, a fresh ControlNet that changes nothing, the energy condition,
and sampling that follows a reference, from Python and from sample.py, on tiny random models. Parity with the
published implementation is in test_reference.py."""

import json
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import ezaudio as E
import sample
from conftest import random_dit, tiny_t5

KEYS = json.loads((Path(__file__).parent / "fixtures" / "reference" / "official_keys.json").read_text())
RELEASED = KEYS["controlnet-energy-l"]
# the released VAE's hop (480) with a handful of channels, so that the released condition's framing fits it
VAE = E.VAEConfig(channels=2, c_mults=(1, 1, 1, 1), strides=(2, 4, 6, 10), latent_dim=8)
SR, HOP = 24000, 480


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
