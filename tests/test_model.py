"""Properties of ezaudio.py a reader should be able to trust, on tiny models (and the released sizes on `meta`)."""

import json
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch

import ezaudio as E
from conftest import random_dit

KEYS = json.loads((Path(__file__).parent / "fixtures" / "reference" / "official_keys.json").read_text())


def n_params(module):
    return sum(p.numel() for p in module.parameters())


# ---- the released models: key names, shapes and sizes -----------------------------------------------------------

@pytest.mark.parametrize("name,build", [
    ("ezaudio-l", lambda: E.EzAudioDiT(E.DIT_PRESETS["L"])),
    ("ezaudio-xl", lambda: E.EzAudioDiT(E.DIT_PRESETS["XL"])),
    ("vae", lambda: E.WaveformVAE(E.VAE_PRESETS["released"])),
])
def test_released_layout(name, build):
    with torch.device("meta"):
        model = build()
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert ours == KEYS[name]["state_dict"]
    assert n_params(model) == KEYS[name]["num_parameters"]


def test_parameter_counts():
    with torch.device("meta"):
        counts = [n_params(E.EzAudioDiT(E.DIT_PRESETS["L"])), n_params(E.EzAudioDiT(E.DIT_PRESETS["XL"])),
                  n_params(E.WaveformVAE(E.VAE_PRESETS["released"]))]
    assert counts == [596_830_080, 874_760_256, 43_846_785]


def test_configs_from_official_match_presets():
    assert E.DiTConfig.from_official(KEYS["ezaudio-l"]["config"]["model"]) == E.DIT_PRESETS["L"]
    assert E.DiTConfig.from_official(KEYS["ezaudio-xl"]["config"]["model"]) == E.DIT_PRESETS["XL"]
    assert E.VAEConfig.from_official(KEYS["vae"]["config"]) == E.VAE_PRESETS["released"]


def test_config_round_trips_through_a_plain_dict():
    cfg = E.DIT_PRESETS["XL"]
    assert E.config_from_dict(E.DiTConfig, json.loads(json.dumps(asdict(cfg)))) == cfg


# ---- diffusion ---------------------------------------------------------------------------------------------------

def test_zero_terminal_snr():
    abar = E.Diffusion().alphas_cumprod
    assert abar[-1].item() == 0.0
    assert (abar[1:] < abar[:-1]).all() and abar[0] < 1


def test_x0_and_eps_recovered_from_velocity():
    d = E.Diffusion()
    x0, eps = torch.randn(3, 8, 20), torch.randn(3, 8, 20)
    t = torch.tensor([0, 500, 998])
    x0_hat, eps_hat = d.x0_and_eps(d.add_noise(x0, eps, t), d.velocity(x0, eps, t), t)
    torch.testing.assert_close(x0_hat, x0, atol=1e-5, rtol=0)
    torch.testing.assert_close(eps_hat, eps, atol=1e-5, rtol=0)


def test_trailing_timesteps_start_at_pure_noise():
    assert E.Diffusion().timesteps(10).tolist() == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
    assert E.Diffusion().timesteps(100)[0] == 999 and len(E.Diffusion().timesteps(100)) == 100


def test_ddim_first_step_is_finite_with_eta_one():
    d = E.Diffusion()
    for steps in (25, 50, 500, 1000):  # where the published pipeline's sqrt of a tiny negative gives NaN
        x = d.step(torch.randn(2, 8, 50), 999, torch.randn(2, 8, 50), steps, eta=1.0, noise=torch.randn(2, 8, 50))
        assert torch.isfinite(x).all()


def test_cfg_without_rescale_is_plain_cfg_and_w1_is_v_pos():
    v_pos, v_neg = torch.randn(2, 8, 30), torch.randn(2, 8, 30)
    torch.testing.assert_close(E.classifier_free_guidance(v_pos, v_neg, 4.0, 0.0), v_neg + 4.0 * (v_pos - v_neg))
    torch.testing.assert_close(E.classifier_free_guidance(v_pos, v_neg, 1.0, 0.75), v_pos)


def test_cfg_full_rescale_matches_std_of_v_pos():
    v_pos, v_neg = torch.randn(2, 8, 30), torch.randn(2, 8, 30)
    v = E.classifier_free_guidance(v_pos, v_neg, 5.0, 1.0)
    torch.testing.assert_close(v.std(dim=(1, 2)), v_pos.std(dim=(1, 2)))


# ---- span masking and the loss -----------------------------------------------------------------------------------

def runs(row):
    """Lengths of the runs of True in a 1-D bool tensor."""
    padded = torch.cat([torch.tensor([False]), row, torch.tensor([False])]).int()
    edges = padded.diff()
    return ((edges == -1).nonzero() - (edges == 1).nonzero()).flatten().tolist()


def test_span_mask_spans_have_the_configured_length():
    cfg = replace(E.DIT_PRESETS["tiny"], mae_prob=1.0, mask_span=7, mask_ratio=(0.07, 0.07))  # one span each
    mask = E.span_mask(64, 100, cfg, torch.Generator().manual_seed(0))
    assert mask.shape == (64, 1, 100) and mask.dtype == torch.bool
    assert all(runs(m[0]) == [7] for m in mask)


def test_span_mask_coverage_grows_with_ratio():
    g = torch.Generator().manual_seed(0)
    coverage = [E.span_mask(256, 500, replace(E.DIT_PRESETS["tiny"], mae_prob=1.0, mask_ratio=(r, r)), g)
                .float().mean().item() for r in (0.25, 0.5, 1.0)]
    assert coverage[0] < coverage[1] < coverage[2]
    assert 0.15 < coverage[0] < 0.3  # overlaps make it a little less than the ratio


def test_span_mask_mae_prob_zero_masks_everything():
    assert E.span_mask(16, 50, replace(E.DIT_PRESETS["tiny"], mae_prob=0.0)).all()


def test_masked_loss_ignores_unmasked_frames():
    pred, target = torch.randn(2, 8, 40), torch.randn(2, 8, 40)
    mask = torch.zeros(2, 1, 40, dtype=torch.bool)
    mask[:, :, 10:20] = True
    loss = E.masked_mse(pred, target, mask)
    pred2 = pred.clone()
    pred2[:, :, :10] += 100
    assert E.masked_mse(pred2, target, mask) == loss
    pred2[:, :, 15] += 1
    assert E.masked_mse(pred2, target, mask) != loss
    torch.testing.assert_close(loss, (pred - target)[:, :, 10:20].pow(2).mean())


def test_diffusion_loss_backpropagates():
    dit = E.EzAudioDiT(E.DIT_PRESETS["tiny"]).init_weights()
    loss = E.diffusion_loss(dit, E.Diffusion(), torch.randn(2, 8, 30), torch.randn(2, 5, 32))
    loss.backward()
    assert torch.isfinite(loss) and dit.model.patch_embed.proj.weight.grad.abs().sum() > 0


def test_diffusion_loss_draws_timesteps_from_min_timestep_on():
    dit = E.EzAudioDiT(E.DIT_PRESETS["tiny"]).init_weights()
    drawn = []
    dit.register_forward_pre_hook(lambda module, args: drawn.append(args[1]))
    for min_timestep in (0, 990):
        E.diffusion_loss(dit, E.Diffusion(), torch.randn(64, 8, 10), torch.randn(64, 5, 32),
                         generator=torch.Generator().manual_seed(0), min_timestep=min_timestep)
    assert drawn[0].min() < 990 and drawn[1].min() >= 990 and drawn[1].max() <= 999


# ---- the DiT -----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dit():
    return random_dit(E.DIT_PRESETS["tiny"]).eval()


@pytest.mark.parametrize("length", [1, 7, 50, 123])
def test_dit_accepts_any_length(dit, length):
    x, t = torch.randn(2, 8, length), torch.tensor([3, 900])
    with torch.no_grad():
        v = dit(x, t, torch.randn(2, 5, 32))
    assert v.shape == (2, 8, length) and torch.isfinite(v).all()


def test_rope_cache_follows_the_length(dit):
    x, t, c = torch.randn(1, 8, 20), torch.tensor([10]), torch.randn(1, 5, 32)
    with torch.no_grad():
        first = dit(x, t, c)
        dit(torch.randn(1, 8, 33), t, c)
        assert torch.equal(dit(x, t, c), first)


def test_padded_context_tokens_get_no_weight(dit):
    x, t, c = torch.randn(1, 8, 20), torch.tensor([500]), torch.randn(1, 6, 32)
    mask = torch.tensor([[True, True, True, False, False, False]])
    c2 = c.clone()
    c2[:, 3:] = torch.randn(1, 3, 32) * 10
    with torch.no_grad():
        torch.testing.assert_close(dit(x, t, c, mask), dit(x, t, c2, mask))
        assert not torch.allclose(dit(x, t, c, None), dit(x, t, c2, None))


def test_edit_input_keeps_known_frames_and_marks_the_mask(dit):
    x, gt = torch.randn(1, 8, 12), torch.randn(1, 8, 12)
    mask = torch.zeros(1, 1, 12, dtype=torch.bool)
    mask[..., 4:8] = True
    inp = dit.assemble_input(x, gt, mask)
    assert inp.shape == (1, 17, 12)
    assert torch.equal(inp[:, 8:16, :4], gt[..., :4]) and torch.equal(inp[:, 16], mask[:, 0].float())
    assert torch.equal(inp[0, 8:16, 5], dit.mask_embed.detach())
    assert torch.equal(dit.assemble_input(x, gt, mask.expand(1, 8, 12)), inp)  # (B, C, L) masks work too


def test_stage_one_model_has_no_text_path():
    dit = E.EzAudioDiT(replace(E.DIT_PRESETS["tiny"], context_dim=0)).init_weights()
    assert not any("cross_attn" in k or "context" in k for k in dit.state_dict())
    assert dit(torch.randn(2, 8, 10), torch.tensor([1, 2])).shape == (2, 8, 10)


def test_init_weights_zeroes_what_the_paper_zeroes():
    dit = E.EzAudioDiT(E.DIT_PRESETS["tiny"]).init_weights().model
    block = dit.out_blocks[0]
    for p in (dit.time_ada.weight, dit.time_ada_final.weight, block.adaln.lora_b.weight,
              block.adaln.scale_shift_table, block.cross_attn.proj.weight):
        assert p.abs().sum() == 0
    assert block.adaln.lora_a.weight.abs().sum() > 0 and block.attn.to_q.weight.abs().sum() > 0


def test_grad_checkpointing_gives_the_same_gradients(dit):
    x, t, c = torch.randn(2, 8, 10), torch.tensor([5, 600]), torch.randn(2, 4, 32)
    grads = []
    for flag in (False, True):
        dit.zero_grad()
        dit.train()
        dit.model.grad_checkpointing = flag
        dit(x, t, c).square().sum().backward()
        grads.append(dit.model.patch_embed.proj.weight.grad.clone())
    dit.model.grad_checkpointing = False
    dit.eval()
    torch.testing.assert_close(grads[0], grads[1])


# ---- the VAE -----------------------------------------------------------------------------------------------------

def test_vae_maps_24khz_to_50_frames_per_second_and_back():
    with torch.device("meta"):
        vae = E.WaveformVAE(E.VAE_PRESETS["released"])
        mean, std = vae.posterior(torch.zeros(1, 1, 24000))
        audio = vae.decode(mean)
    assert mean.shape == (1, 128, 50) and std.shape == (1, 128, 50) and audio.shape == (1, 1, 24000)


def test_vae_posterior_and_kl():
    torch.manual_seed(0)
    vae = E.WaveformVAE(E.VAE_PRESETS["tiny"])
    audio = torch.randn(2, 1, 160)
    raw = vae.encoder.layers(audio)
    mean, std = vae.posterior(audio)
    torch.testing.assert_close(std, torch.nn.functional.softplus(raw[:, 8:]) + 1e-4)
    assert torch.equal(vae.encode(audio, sample=False), mean)
    assert not torch.equal(vae.encode(audio), mean)
    assert E.kl_divergence(torch.zeros(1, 8, 5), torch.ones(1, 8, 5)) == 0


# ---- checkpoints -------------------------------------------------------------------------------------------------

def test_mismatched_checkpoint_names_the_keys():
    state = E.EzAudioDiT(E.DIT_PRESETS["tiny"]).state_dict()
    state.pop("mask_embed")
    state["model.extra.weight"] = torch.zeros(1)
    with pytest.raises(E.CheckpointError, match="missing mask_embed.*unexpected model.extra.weight"):
        E.load_weights(E.EzAudioDiT(E.DIT_PRESETS["tiny"]), state)


def test_wrong_config_is_one_line_error():
    state = E.EzAudioDiT(E.DIT_PRESETS["tiny"]).state_dict()
    with pytest.raises(E.CheckpointError) as err:
        E.dit_from_checkpoint({"model": state}, replace(E.DIT_PRESETS["tiny"], dim=32), "x.pt")
    assert "\n" not in str(err.value) and "wrong shape" in str(err.value)


def test_released_vae_file_ignores_other_prefixes(official_vae_ckpt):
    vae = E.vae_from_checkpoint(E.load_file(official_vae_ckpt), E.VAE_PRESETS["tiny"], "vae.pt")
    assert isinstance(vae, E.WaveformVAE)


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(E.CheckpointError, match="no such file"):
        E.load_file(tmp_path / "nope.pt")
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(E.CheckpointError, match="not a readable"):
        E.load_file(tmp_path / "bad.pt")


def test_unreadable_files_are_named_in_one_whole_sentence(tmp_path):
    """torch.load's own messages run to paragraphs; the cause comes out whole, on one line, never cut short."""
    import argparse
    torch.save({"x": torch.zeros(1000)}, tmp_path / "good.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "good.pt").read_bytes()[:2000])  # a copy that stopped early
    (tmp_path / "empty.pt").write_bytes(b"")
    torch.save({"args": argparse.Namespace(lr=1)}, tmp_path / "pickled.pt")  # not plain data
    expected = {"cut.pt": "RuntimeError: PytorchStreamReader failed reading zip archive: failed finding central "
                          "directory.",
                "empty.pt": "EOFError: the file ends early",
                "pickled.pt": "UnpicklingError: Unsupported global: GLOBAL argparse.Namespace was not an allowed "
                              "global by default."}
    for name, cause in expected.items():
        with pytest.raises(E.CheckpointError) as err:
            E.load_file(tmp_path / name)
        assert str(err.value) == f"{tmp_path / name}: not a readable PyTorch checkpoint ({cause})"
