"""train.py with tiny configs on a few generated WAVs, on the CPU: every stage, the stage hand-over, exact
resume, bad rows, the cache, non-finite losses, and (slow) torchrun with two ranks and a stop signal."""

import errno
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import data
import ezaudio as E
import train
from test_data import SR, write_clips

ROOT = Path(__file__).resolve().parent.parent
FAST = ["--segment", "0.05", "--batch-size", "2", "--workers", "0", "--log-every", "1", "--sample-every", "0",
        "--warmup", "0", "--device", "cpu"]  # the CPU even where there is a GPU: exact resume is a CPU promise


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    return write_clips(tmp_path_factory.mktemp("clips"))


@pytest.fixture(scope="module")
def stage1(clips, official_vae_ckpt, tmp_path_factory):
    """A stage-1 run of 3 steps, large enough a learning rate that every weight has moved."""
    run = tmp_path_factory.mktemp("runs") / "stage1"
    train.main(["--stage", "1", "--config", "tiny", "--manifest", str(clips), "--vae", str(official_vae_ckpt),
                "--vae-config", "tiny", "--run-dir", str(run), "--max-steps", "3", "--lr", "1e-2", *FAST])
    return run / "ckpt.pt"


def log_lines(run):
    """Each step's log line as {name: value}."""
    out = []
    for line in (Path(run) / "log.txt").read_text().splitlines():
        if line.startswith("step "):
            out.append({k: v for k, v in re.findall(r"(?:\| )?([a-z]+) ([-0-9.e+naif]+)", line.split(" | ", 1)[1])})
            out[-1]["step"] = int(line.split()[1].split("/")[0])
            out[-1]["line"] = line
    return out


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


# -----------------------------------------------------------------------------
# settings and pieces


def test_stage_defaults_and_flags():
    args, _, _ = train.settings(["--stage", "3", "--manifest", "m.csv", "--run-dir", "/nonexistent/run",
                                 "--init-from", "scratch"])
    assert (args.lr, args.max_steps, args.batch_size, args.accum, args.mae_prob) == (1e-5, 30_000, 16, 1, 0.25)
    assert (args.warmup, args.clip, args.betas, args.weight_decay, args.text_dropout) == (5000, 1.0, (0.9, 0.999),
                                                                                         0.01, 0.1)
    args, _, _ = train.settings(["--stage", "2", "--manifest", "m.csv", "--lr", "3e-4", "--init-from", "scratch"])
    assert (args.lr, args.max_steps, args.min_clap, args.mae_prob) == (3e-4, 50_000, 0.40, 0.1)
    assert args.run_dir == os.path.join("runs", "stage2")
    args, _, _ = train.settings(["--stage", "1", "--manifest", "m.csv"])
    assert (args.lr, args.max_steps, args.mae_prob, args.min_clap, args.segment) == (1e-4, 100_000, 0.25, 0.0, 10.0)
    args, _, _ = train.settings(["--stage", "vae", "--manifest", "m.csv"])
    assert (args.lr, args.disc_lr, args.betas, args.weight_decay, args.segment) == (1.5e-4, 3e-4, (0.8, 0.99),
                                                                                   1e-3, 0.5)
    with pytest.raises(SystemExit, match="--stage"):
        train.settings(["--manifest", "m.csv"])


@pytest.mark.parametrize("argv, message", [
    (["--stage", "2"], "stage 2 continues stage 1: pass its checkpoint with --init-from"),
    (["--stage", "3"], "stage 3 continues stage 2: pass its checkpoint with --init-from"),
    (["--stage", "1", "--accum", "0"], "--accum must be 1 or more"),
    (["--stage", "1", "--log-every", "0"], "--log-every must be 1 or more"),
    (["--stage", "1", "--min-timestep", "1000"], "--min-timestep must be 0 to 999"),
    (["--stage", "1", "--sample-steps", "0"], "--sample-steps must be 1 to 1000"),
    (["--stage", "1", "--segment", "0"], "--segment must be > 0"),
    (["--stage", "1", "--lr", "-1"], "--lr and --disc-lr must be > 0"),
    (["--stage", "1", "--ema", "1"], "--ema must be 0"),
    (["--stage", "1", "--workers", "-1"], "--workers, --sample-every, --disc-filters and --warmup must be 0 or more"),
])
def test_bad_settings_get_one_line(argv, message):
    with pytest.raises(SystemExit, match=f"^error: {message}"):
        train.settings([*argv, "--manifest", "m.csv"])


def test_resume_and_init_from_of_foreign_files_get_one_line(tmp_path):
    (tmp_path / "run").mkdir()
    torch.save({"state_dict": {}}, tmp_path / "run" / "ckpt.pt")
    with pytest.raises(SystemExit, match="^error: .*ckpt.pt was not written by train.py"):
        train.settings(["--resume", "--run-dir", str(tmp_path / "run"), "--manifest", "m.csv"])
    torch.save(torch.zeros(3), tmp_path / "t.pt")
    with pytest.raises(SystemExit, match="^error: .*t.pt: neither an EzAudio checkpoint"):
        train.settings(["--stage", "2", "--init-from", str(tmp_path / "t.pt"), "--manifest", "m.csv"])


def test_a_failed_start_leaves_no_run_folder(clips, tmp_path, official_vae_ckpt):
    common = ["--stage", "1", "--config", "tiny", "--manifest", str(clips), "--vae", str(official_vae_ckpt),
              "--vae-config", "tiny", "--run-dir", str(tmp_path / "run"), *FAST]
    with pytest.raises(SystemExit, match="fewer than --batch-size 64"):
        train.main([*common, "--batch-size", "64"])
    with pytest.raises(SystemExit, match="not a latent cache"):
        train.main([*common, "--cache", str(tmp_path)])
    assert not (tmp_path / "run").exists()


def test_min_timestep_reaches_the_loss(clips, tmp_path, official_vae_ckpt, monkeypatch):
    passed, loss = [], E.diffusion_loss
    monkeypatch.setattr(E, "diffusion_loss", lambda *a, **kw: passed.append(kw["min_timestep"]) or loss(*a, **kw))
    train.main(["--stage", "1", "--config", "tiny", "--manifest", str(clips), "--vae", str(official_vae_ckpt),
                "--vae-config", "tiny", "--run-dir", str(tmp_path / "run"), "--max-steps", "2", "--min-timestep",
                "990", *FAST])
    assert passed == [990, 990]


def test_a_run_folder_is_not_overwritten(stage1, clips):
    with pytest.raises(SystemExit, match="--resume"):
        train.settings(["--stage", "1", "--manifest", str(clips), "--run-dir", str(stage1.parent)])


def test_resume_refuses_flags_that_would_change_the_model(stage1):
    """They would be ignored by the model yet written into the checkpoint, where the next stage reads them."""
    run = str(stage1.parent)
    with pytest.raises(SystemExit, match=r"^error: .*ckpt.pt is a run of --config tiny, --vae-config tiny; a resumed "
                                         r"run keeps its model, so leave out --config XL, --vae-config released \("):
        train.settings(["--resume", "--run-dir", run, "--config", "XL", "--vae-config", "released"])
    args, saved, _ = train.settings(["--resume", "--run-dir", run, "--config", "tiny", "--max-steps", "4"])
    assert (args.config, args.max_steps, saved["step"]) == ("tiny", 4, 3)  # its own value, and other flags, pass


def test_one_run_per_folder_and_a_killed_runs_partial_checkpoint_removed(clips, tmp_path, official_vae_ckpt):
    run = tmp_path / "run"
    run.mkdir()
    (run / "ckpt.pt.tmp").write_bytes(b"half a checkpoint")  # as a run killed while saving leaves it
    message = f"^error: another run \\(process {os.getpid()}\\) is using {re.escape(str(run))}; wait for it to end"
    with train.claimed_run_dir(str(run)):
        assert not (run / "ckpt.pt.tmp").exists()
        with pytest.raises(SystemExit, match=message):
            with train.claimed_run_dir(str(run)):
                pass
        with pytest.raises(SystemExit, match=message):  # the whole run, before it writes anything
            train.main(["--stage", "1", "--config", "tiny", "--manifest", str(clips), "--vae",
                        str(official_vae_ckpt), "--vae-config", "tiny", "--run-dir", str(run), "--max-steps", "1",
                        *FAST])
        assert os.listdir(run) == ["lock"]
    with train.claimed_run_dir(str(run)):  # the holder's file closed, as when it ends, however it ends
        pass


def test_a_full_disk_while_saving_is_one_line(clips, tmp_path, official_vae_ckpt, monkeypatch):
    def full(obj, f):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(torch, "save", full)
    run = tmp_path / "run"
    with pytest.raises(SystemExit, match=f"^error: no room for {re.escape(str(run / 'ckpt.pt'))} on the disk mounted "
                                         "at .*: it needs about .* MB and .* MB are free; free some space and run"):
        train.main(["--stage", "1", "--config", "tiny", "--manifest", str(clips), "--vae", str(official_vae_ckpt),
                    "--vae-config", "tiny", "--run-dir", str(run), "--max-steps", "1", *FAST])
    assert sorted(os.listdir(run)) == ["lock", "log.txt"]  # no partial checkpoint


def test_weight_decay_only_on_linear_and_conv_weights():
    dit = E.EzAudioDiT(E.DIT_PRESETS["tiny"])
    args, _, _ = train.settings(["--stage", "1", "--manifest", "m.csv"])
    decay, rest = train.adamw(dit, 1e-4, args).param_groups
    names = {id(p): n for n, p in dit.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.01 and rest["weight_decay"] == 0.0
    assert "model.in_blocks.0.attn.to_q.weight" in decayed and "model.patch_embed.proj.weight" in decayed
    assert "model.final_block.final_layer.weight" in decayed
    for n in ("mask_embed", "model.in_blocks.0.adaln.scale_shift_table", "model.in_blocks.0.norm1.weight",
              "model.in_blocks.0.attn.proj.bias"):
        assert n not in decayed
    vae = E.WaveformVAE(E.VAE_PRESETS["tiny"])
    names = {id(p): n for n, p in vae.named_parameters()}
    decayed = {names[id(p)] for p in train.adamw(vae, 1e-4, args).param_groups[0]["params"]}
    assert decayed and all(n.endswith("weight_v") for n in decayed)
    assert len(decayed) == sum(n.endswith("weight_v") for n in names.values())


def test_learning_rate_schedules():
    dit, _, _ = train.settings(["--stage", "1", "--manifest", "m.csv", "--warmup", "10"])
    assert [train.lr_factor(s, dit) for s in (0, 4, 9, 500)] == [0.1, 0.5, 1.0, 1.0]
    vae, _, _ = train.settings(["--stage", "vae", "--manifest", "m.csv"])
    assert train.lr_factor(0, vae) == pytest.approx(0.001)
    assert train.lr_factor(200_000, vae) == pytest.approx(2 ** -0.5, rel=1e-6)


def test_a_gpu_that_is_not_there_gets_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="^error: --device cuda, but torch sees no GPU"):
        train.setup_distributed("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(SystemExit, match="^error: process 2 of this node has no GPU of its own"):
        train.setup_distributed()


def test_replica_fingerprint_sees_any_weight():
    dit = E.EzAudioDiT(E.DIT_PRESETS["tiny"])
    before = data.fingerprint(dit.state_dict())
    assert data.fingerprint(dit.state_dict()) == before
    with torch.no_grad():
        dit.model.out_blocks[-1].mlp.net[2].bias[3] += 1e-7
    assert data.fingerprint(dit.state_dict()) != before


def test_overfitting_one_batch_drives_the_loss_down():
    """The same clean latents, timesteps, noise and mask every step: the DiT must learn to fit them."""
    torch.manual_seed(0)
    dit = E.EzAudioDiT(replace(E.DIT_PRESETS["tiny"], context_dim=0)).init_weights()
    objective = train.DiffusionObjective(dit)
    args, _, _ = train.settings(["--stage", "1", "--manifest", "m.csv"])
    opt = train.adamw(dit, 3e-3, args)
    x0 = torch.randn(2, 8, 16)
    losses = []
    for _ in range(60):
        loss, _ = objective(x0, None, None, torch.Generator().manual_seed(0))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 10, (losses[0], losses[-1])


def test_text_dropout_replaces_captions_by_the_empty_one():
    empty = torch.full((1, 4), 7.0)
    batch = {"caption": ["a", "b", "c"], "context": [torch.ones(3, 4), torch.ones(5, 4), torch.ones(2, 4)]}
    g = torch.Generator().manual_seed(0)
    context, mask = train.text_condition(batch, None, empty, 1.0, g, "cpu")
    assert context.shape == (3, 1, 4) and (context == 7).all() and mask.all()
    context, mask = train.text_condition(batch, None, empty, 0.0, g, "cpu")
    assert context.shape == (3, 5, 4) and mask.sum(1).tolist() == [3, 5, 2]


# -----------------------------------------------------------------------------
# the stages, end to end


def test_vae_stage_reconstruction_loss_falls(tmp_path):
    """One clip, unflipped, every step: what changes between steps is the VAE (and its posterior sample). The loss
    stays near its start for a number of steps that depends on the seed, then drops within a few: after 30 steps it
    had not yet for 4 of seeds 5-14, after 50 it had for all of seeds 0-14."""
    write_clips(tmp_path / "d", n_good=1, bad=False)
    (tmp_path / "d" / "one.csv").write_text("audio_path\naudio/clip0.wav\naudio/clip0.wav\n")
    run = tmp_path / "vae"
    train.main(["--stage", "vae", "--config", "tiny", "--manifest", str(tmp_path / "d" / "one.csv"),
                "--run-dir", str(run), "--max-steps", "50", "--lr", "3e-3", "--disc-lr", "3e-3",
                "--disc-filters", "4", *FAST, "--flip", "0"])
    stft = [float(line["stft"]) for line in log_lines(run)]
    assert len(stft) == 50
    assert sum(stft[-5:]) / 5 < 0.7 * sum(stft[:5]) / 5, stft
    ckpt = load(run / "ckpt.pt")
    assert (ckpt["format"], ckpt["stage"], ckpt["step"], ckpt["model"], ckpt["config"]["dit"]) == ("ezaudio", "vae",
                                                                                                 50, None, None)
    vae = E.vae_from_checkpoint(ckpt, name="vae stage")
    assert vae.cfg == E.VAE_PRESETS["tiny"]
    assert ckpt["discriminator"] and len(ckpt["optimizer"]) == 2


def test_the_waveform_loss_is_the_squared_error_of_the_samples():
    torch.manual_seed(0)
    vae = E.WaveformVAE(E.VAE_PRESETS["tiny"])
    audio = 0.1 * torch.randn(2, 1280)  # longer than the STFT loss's largest window
    loss, parts = train.VAEObjective(vae)(audio, torch.Generator().manual_seed(0))
    weighted, parts2 = train.VAEObjective(vae, wave_weight=2.0)(audio, torch.Generator().manual_seed(0))
    assert set(parts) == {"stft", "kl"} and set(parts2) == {"stft", "kl", "wave"}
    with torch.no_grad():
        mean, std = vae.posterior(audio[:, None])
        fake = vae.decode(mean + std * torch.randn(mean.shape, generator=torch.Generator().manual_seed(0)))
    assert float(parts2["wave"]) == pytest.approx(float((fake[..., :1280] - audio[:, None]).pow(2).mean()))
    assert float(weighted.detach()) == pytest.approx(float(loss.detach() + 2 * parts2["wave"]))


def test_the_autoencoder_objective_is_the_squared_error_of_the_posterior_mean():
    """--autoencoder: no draw (any generator gives the same loss), no spectral loss, KL or critic, and the error
    reaches the encoder; a tone a quarter period out of phase costs twice what silence does."""
    torch.manual_seed(0)
    vae = E.WaveformVAE(E.VAE_PRESETS["tiny"])
    audio = 0.1 * torch.randn(2, 1280)
    objective = train.VAEObjective(vae, autoencoder=True)
    loss, parts = objective(audio, torch.Generator().manual_seed(0))
    again = objective(audio, torch.Generator().manual_seed(1))[0]
    assert set(parts) == {"wave"} and float(loss.detach()) == float(again.detach())
    with torch.no_grad():
        expected = (vae.decode(vae.posterior(audio[:, None])[0])[..., :1280] - audio[:, None]).pow(2).mean()
    assert float(loss.detach()) == pytest.approx(float(expected))
    loss.backward()
    assert vae.encoder.layers[0].weight_v.grad.abs().sum() > 0
    t = torch.arange(1600) / 16000
    tone, shifted = (torch.sin(2 * torch.pi * 500 * t + phase)[None, None] for phase in (0, torch.pi / 2))
    assert float(train.squared_error(shifted, tone)) == pytest.approx(2 * float(train.squared_error(0 * tone, tone)),
                                                                       rel=0.01)


def test_envelope_channels_are_tied_to_the_clips_loudness():
    """--envelope-channels: the first K channels of the draw (of the mean, for an autoencoder) learn -1 where the clip
    is silent and 1 where it is loudest, by squared error added to the loss; without it, no such term."""
    torch.manual_seed(0)
    vae = E.WaveformVAE(E.VAE_PRESETS["tiny"])
    hop = vae.cfg.hop
    audio = torch.zeros(2, 200 * hop)  # longer than the spectral loss's largest window
    audio[:, 50 * hop: 100 * hop] = 0.5 * torch.sin(torch.arange(50 * hop) / 3.0)  # (B, T): a sound in frames 50-99
    target = train.loudness_target(audio, vae.cfg)[:, 0]  # (B, frames)
    assert target.shape == (2, 200) and target[:, 52:98].min() > 0.9
    assert target[:, 102:].max() == target[:, :48].max() == -1
    assert "envelope" not in train.VAEObjective(vae)(audio, torch.Generator().manual_seed(0))[1]
    for autoencoder in (False, True):
        loss, parts = train.VAEObjective(vae, autoencoder=autoencoder, envelope_channels=3)(
            audio, torch.Generator().manual_seed(0))
        free = train.VAEObjective(vae, autoencoder=autoencoder)(audio, torch.Generator().manual_seed(0))[0]
        with torch.no_grad():
            mean, std = vae.posterior(audio[:, None])
            noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(0))
            z = mean if autoencoder else mean + std * noise
        assert float(parts["envelope"]) == pytest.approx(float((z[:, :3] - target[:, None]).pow(2).mean()), rel=1e-5)
        assert float((loss - free).detach()) == pytest.approx(float(parts["envelope"]), rel=1e-4)
    args, _, _ = train.settings(["--stage", "vae", "--manifest", "m.csv", "--envelope-channels", "8"])
    assert args.envelope_channels == 8


def test_the_spectral_floor_forgives_a_faint_hiss_on_silence():
    """With the released floor, a hiss at -60 dB over digital silence costs more than no sound at all."""
    t = torch.arange(16000) / 16000
    real = torch.where(t < 0.5, 0.5 * torch.sin(2 * torch.pi * 440 * t), 0.0)[None, None]  # (1, 1, T)
    hiss = real + 1e-3 * torch.randn(real.shape, generator=torch.Generator().manual_seed(0))
    silence = torch.zeros_like(real)
    released, raised = train.MultiResolutionSTFTLoss(16000), train.MultiResolutionSTFTLoss(16000, floor=1.0)
    assert released(hiss, real) > released(silence, real)
    assert raised(hiss, real) < 0.1 * raised(silence, real)


def test_the_spectral_loss_can_leave_out_the_a_weighting():
    """A-weighting all but ignores a missing 200 Hz tone beside a 1 kHz one; --no-a-weighting charges for it."""
    t = torch.arange(16000) / 16000
    high = 0.3 * torch.sin(2 * torch.pi * 1000 * t)
    real, fake = (high + 0.3 * torch.sin(2 * torch.pi * 200 * t))[None, None], high[None, None]
    weighted, flat = train.MultiResolutionSTFTLoss(16000), train.MultiResolutionSTFTLoss(16000, a_weighting=False)
    assert flat.weighting is None and flat(fake, real) > 1.5 * weighted(fake, real)
    assert flat(real, real) == 0
    args, _, _ = train.settings(["--stage", "vae", "--manifest", "m.csv"])
    assert args.a_weighting
    args, _, _ = train.settings(["--stage", "vae", "--manifest", "m.csv", "--no-a-weighting"])
    assert not args.a_weighting


def test_vae_stage_without_a_critic(tmp_path):
    """--disc-filters 0: no discriminator, so no adversarial terms, one optimiser, and a run that resumes."""
    write_clips(tmp_path / "d", n_good=2, bad=False)
    run = tmp_path / "vae"
    common = ["--stage", "vae", "--config", "tiny", "--manifest", str(tmp_path / "d" / "manifest.csv"),
              "--run-dir", str(run), "--disc-filters", "0", "--wave-weight", "1", *FAST]
    train.main([*common, "--max-steps", "2"])
    assert set(log_lines(run)[-1]) >= {"stft", "kl", "wave"} and "adv" not in log_lines(run)[-1]
    ckpt = load(run / "ckpt.pt")
    assert ckpt["discriminator"] is None and len(ckpt["optimizer"]) == 1
    with pytest.raises(SystemExit, match="^error: .*ckpt.pt holds no discriminator; resume with the run's own"):
        train.main([*common, "--resume", "--max-steps", "3", "--disc-filters", "4"])
    train.main([*common, "--resume", "--max-steps", "3", "--dtype", "fp16"])  # a loss scale starts afresh
    assert load(run / "ckpt.pt")["step"] == 3
    with pytest.raises(SystemExit, match="^error: --envelope-channels must be 0 to the VAE's 8 latent channels$"):
        train.main([*common, "--run-dir", str(tmp_path / "wide"), "--envelope-channels", "9"])
    with pytest.raises(SystemExit, match=r"^error: --segment 0.02 is too short for the VAE stage's spectral loss"):
        train.main([*common, "--run-dir", str(tmp_path / "short"), "--segment", "0.02"])


def test_vae_stage_as_a_plain_autoencoder(tmp_path):
    """--autoencoder logs the squared error alone and builds no critic, even with --disc-filters; a later run
    starts the full objective from its weights."""
    write_clips(tmp_path / "d", n_good=2, bad=False)
    common = ["--stage", "vae", "--config", "tiny", "--manifest", str(tmp_path / "d" / "manifest.csv"), *FAST]
    train.main([*common, "--run-dir", str(tmp_path / "ae"), "--autoencoder", "--disc-filters", "4", "--max-steps", "2"])
    assert {"wave", "stft", "kl", "adv"} & set(log_lines(tmp_path / "ae")[-1]) == {"wave"}
    ckpt = load(tmp_path / "ae" / "ckpt.pt")
    assert ckpt["discriminator"] is None and len(ckpt["optimizer"]) == 1
    train.main([*common, "--run-dir", str(tmp_path / "vae"), "--init-from", str(tmp_path / "ae" / "ckpt.pt"),
                "--disc-filters", "4", "--max-steps", "1"])
    assert {"wave", "stft", "kl", "adv"} & set(log_lines(tmp_path / "vae")[-1]) == {"stft", "kl", "adv"}


def test_a_vae_run_started_from_another_resumes_exactly(tmp_path):
    """A VAE run started --init-from another (the toy recipe's second VAE run) has that run's shape, not
    --config's; --resume must rebuild that shape and land where an uninterrupted run does."""
    write_clips(tmp_path / "d", n_good=2, bad=False)
    common = ["--manifest", str(tmp_path / "d" / "manifest.csv"), "--disc-filters", "0", "--lr", "1e-2", *FAST]
    train.main(["--stage", "vae", "--config", "tiny", "--run-dir", str(tmp_path / "a"), "--max-steps", "1", *common])
    second = ["--stage", "vae", "--init-from", str(tmp_path / "a" / "ckpt.pt"), *common]
    train.main([*second, "--run-dir", str(tmp_path / "whole"), "--max-steps", "3"])
    train.main([*second, "--run-dir", str(tmp_path / "cut"), "--max-steps", "2"])
    train.main(["--resume", "--run-dir", str(tmp_path / "cut"), "--max-steps", "3", *common])
    whole, cut = load(tmp_path / "whole" / "ckpt.pt"), load(tmp_path / "cut" / "ckpt.pt")
    assert cut["step"] == 3 and E.vae_from_checkpoint(cut).cfg == E.VAE_PRESETS["tiny"]
    for key, value in whole["vae"].items():
        torch.testing.assert_close(cut["vae"][key], value, rtol=0, atol=0, msg=key)


def test_the_three_stages_chain_and_sample(stage1, clips, tmp_path, text_encoder_dir, official_vae_ckpt):
    ck1 = load(stage1)
    assert (ck1["stage"], ck1["step"], ck1["config"]["dit"]["context_dim"], ck1["text_encoder"]) == (1, 3, 0, None)
    assert ck1["config"]["vae_path"] == str(official_vae_ckpt)
    assert not any("cross_attn" in k for k in ck1["model"])
    run2, run3 = tmp_path / "s2", tmp_path / "s3"
    train.main(["--stage", "2", "--manifest", str(clips), "--init-from", str(stage1), "--min-clap", "0",
                "--text-encoder", str(text_encoder_dir), "--run-dir", str(run2), "--max-steps", "2", *FAST,
                "--sample-every", "2", "--sample-steps", "2", "--sample-prompts", "a tone", "rain"])
    assert sorted(p.name for p in (run2 / "samples" / "step0000002").iterdir()) == ["0_a_tone.wav", "1_rain.wav"]
    train.main(["--stage", "3", "--manifest", str(clips), "--init-from", str(run2 / "ckpt.pt"),
                "--run-dir", str(run3), "--max-steps", "2", *FAST])
    ck3 = load(run3 / "ckpt.pt")
    assert (ck3["stage"], ck3["step"], ck3["config"]["dit"]["context_dim"]) == (3, 2, 32)
    assert ck3["text_encoder"] is not None and ck3["config"]["text_encoder"] is None  # tiny ByT5 T5: embedded
    assert ck3["config"]["train"]["lr"] == 1e-5 and ck3["config"]["dit"]["mae_prob"] == 0.25
    assert load(run2 / "ckpt.pt")["config"]["dit"]["mae_prob"] == 0.1
    pipe = E.EzAudio.from_pretrained(ckpt=run3 / "ckpt.pt", device="cpu")
    audio = pipe.generate(["a tone"], duration=0.05, steps=2)
    assert audio.shape == (1, round(0.05 * SR)) and torch.isfinite(audio).all()


def test_stage_hand_over_leaves_the_output_unchanged(stage1, clips, tmp_path, text_encoder_dir):
    run = tmp_path / "s2"
    train.main(["--stage", "2", "--manifest", str(clips), "--init-from", str(stage1), "--min-clap", "0",
                "--text-encoder", str(text_encoder_dir), "--run-dir", str(run), "--max-steps", "0", *FAST])
    before = E.dit_from_checkpoint(load(stage1)).eval()
    after = E.dit_from_checkpoint(load(run / "ckpt.pt")).eval()
    new = set(after.state_dict()) - set(before.state_dict())
    assert new and all(train.TEXT_PARTS & set(k.split(".")) for k in new)
    context, mask = E.TextEncoder.from_pretrained(text_encoder_dir)(["a dog barks", "rain"])
    x, gt = torch.randn(2, 8, 40), torch.randn(2, 8, 40)
    t, span = torch.tensor([10, 900]), torch.zeros(2, 1, 40, dtype=torch.bool)
    span[:, :, 10:20] = True
    with torch.no_grad():
        assert torch.equal(after(x, t, context, mask, gt, span), before(x, t, None, None, gt, span))
        assert torch.equal(after(x, t, context, mask), before(x, t))


def test_hand_over_refuses_a_checkpoint_that_does_not_fit(stage1, clips, tmp_path, text_encoder_dir):
    run2 = tmp_path / "s2"
    train.main(["--stage", "2", "--manifest", str(clips), "--init-from", str(stage1), "--min-clap", "0",
                "--text-encoder", str(text_encoder_dir), "--run-dir", str(run2), "--max-steps", "0", *FAST])
    with pytest.raises(SystemExit, match="does not fit"):  # stage 1 from a model that has text
        train.main(["--stage", "1", "--manifest", str(clips), "--init-from", str(run2 / "ckpt.pt"),
                    "--run-dir", str(tmp_path / "back"), "--max-steps", "1", *FAST])


def test_fine_tuning_released_weights(clips, tmp_path, official_dit_ckpt, official_vae_ckpt, text_encoder_dir):
    run = tmp_path / "s3"
    train.main(["--stage", "3", "--config", "tiny", "--manifest", str(clips), "--init-from", str(official_dit_ckpt),
                "--vae", str(official_vae_ckpt), "--vae-config", "tiny", "--text-encoder", str(text_encoder_dir),
                "--run-dir", str(run), "--max-steps", "0", *FAST])
    released = load(official_dit_ckpt)["model"]
    ours = load(run / "ckpt.pt")["model"]
    assert ours.keys() == released.keys() and all(torch.equal(ours[k], released[k]) for k in ours)


def test_activation_checkpointing_changes_nothing_but_memory(stage1, clips, tmp_path, text_encoder_dir,
                                                             monkeypatch):
    common = ["--stage", "2", "--manifest", str(clips), "--init-from", str(stage1), "--min-clap", "0",
              "--text-encoder", str(text_encoder_dir), "--max-steps", "2", "--lr", "1e-3", *FAST]
    train.main([*common, "--run-dir", str(tmp_path / "a")])
    checkpoint, calls = E.checkpoint, []
    monkeypatch.setattr(E, "checkpoint", lambda *a, **kw: calls.append(1) or checkpoint(*a, **kw))
    train.main([*common, "--run-dir", str(tmp_path / "b"), "--grad-checkpointing"])
    assert len(calls) == 2 * 5  # two steps, five blocks each
    a, b = load(tmp_path / "a" / "ckpt.pt")["model"], load(tmp_path / "b" / "ckpt.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_is_exact(stage1, clips, tmp_path, text_encoder_dir):
    """6 steps in one go, or 3, stop, and 3 more: the same losses, weights, EMA and optimiser state. Gradient
    accumulation, EMA, polarity flips, epochs (10 rows, 5 micro-batches each) and caption dropout all take part."""
    common = ["--stage", "2", "--manifest", str(clips), "--init-from", str(stage1), "--min-clap", "0",
              "--text-encoder", str(text_encoder_dir), "--accum", "2", "--ema", "0.9", "--lr", "1e-3",
              "--text-dropout", "0.5", *FAST]
    train.main([*common, "--run-dir", str(tmp_path / "a"), "--max-steps", "6"])
    train.main([*common, "--run-dir", str(tmp_path / "b"), "--max-steps", "3"])
    train.main(["--resume", "--run-dir", str(tmp_path / "b"), "--max-steps", "6"])
    a, b = log_lines(tmp_path / "a"), log_lines(tmp_path / "b")
    assert [(x["step"], x["loss"], x["grad"]) for x in a] == [(x["step"], x["loss"], x["grad"]) for x in b]
    ca, cb = load(tmp_path / "a" / "ckpt.pt"), load(tmp_path / "b" / "ckpt.pt")
    for key in ("model", "ema"):
        assert ca[key].keys() == cb[key].keys()
        assert all(torch.equal(ca[key][k], cb[key][k]) for k in ca[key]), key
    sa, sb = ca["optimizer"][0]["state"], cb["optimizer"][0]["state"]
    assert all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)
    assert ca["data"] == cb["data"] == {"epoch": 2, "batch": 2, "world_size": 1, "batch_size": 2}


def test_bad_rows_are_skipped_with_one_warning_each_and_counted(clips, tmp_path, official_vae_ckpt, capsys):
    run = tmp_path / "run"
    train.main(["--stage", "1", "--config", "tiny", "--manifest", str(clips), "--vae", str(official_vae_ckpt),
                "--vae-config", "tiny", "--run-dir", str(run), "--max-steps", "10", *FAST])  # two epochs
    out = capsys.readouterr().out
    for row in (7, 8, 9, 10):
        assert out.count(f"warning: skipping manifest row {row}:") == 1
    assert log_lines(run)[-1]["line"].endswith("skipped 4 rows, 0 steps")


def test_a_cached_run_needs_neither_encoder(clips, tmp_path, stage1, official_vae_ckpt, text_encoder_dir,
                                            monkeypatch):
    cache = tmp_path / "cache"
    data.main(["cache", "--manifest", str(clips), "--out", str(cache), "--vae", str(official_vae_ckpt),
               "--vae-config", "tiny", "--text-encoder", str(text_encoder_dir), "--segment", "0.05",
               "--workers", "0", "--device", "cpu"])

    def refuse(*args, **kwargs):
        raise AssertionError("a cached run loaded an encoder")
    monkeypatch.setattr(data, "load_vae", refuse)
    monkeypatch.setattr(E.TextEncoder, "from_pretrained", refuse)
    monkeypatch.setattr(E.TextEncoder, "from_state", refuse)
    run = tmp_path / "run"
    train.main(["--stage", "2", "--manifest", str(clips), "--cache", str(cache), "--init-from", str(stage1),
                "--min-clap", "0", "--run-dir", str(run), "--max-steps", "5", *FAST])  # one epoch
    ckpt = load(run / "ckpt.pt")
    assert ckpt["config"]["vae_path"] == str(official_vae_ckpt)
    assert ckpt["text_encoder"] is not None and ckpt["config"]["dit"]["context_dim"] == 32
    assert log_lines(run)[-1]["line"].endswith("skipped 4 rows, 0 steps")  # not in the cache: skipped alike
    other = ["--stage", "2", "--manifest", str(clips), "--cache", str(cache), "--init-from", str(stage1),
             "--min-clap", "0", "--max-steps", "1", *FAST]
    with pytest.raises(SystemExit, match="^error: .*holds latents of the VAE .*, but this run's is .*other.pt"):
        train.main([*other, "--run-dir", str(tmp_path / "r2"), "--vae", str(tmp_path / "other.pt")])
    with pytest.raises(SystemExit, match="^error: .*holds T5 outputs of .*, but this run's text encoder is t5-x"):
        train.main([*other, "--run-dir", str(tmp_path / "r3"), "--text-encoder", "t5-x"])
    with pytest.raises(SystemExit, match=r"^error: the VAE's latent_dim 8 does not match the DiT's 64; .*\(tiny\)$"):
        train.main(["--stage", "1", "--config", "toy", "--manifest", str(clips), "--cache", str(cache),
                    "--run-dir", str(tmp_path / "r4"), "--max-steps", "1", *FAST])


def test_non_finite_losses_are_skipped_and_counted_then_stop_the_run(stage1, clips, tmp_path, official_vae_ckpt,
                                                                    monkeypatch):
    forward, calls = train.DiffusionObjective.forward, []

    def poisoned(self, *args):
        loss, parts = forward(self, *args)
        calls.append(1)
        if len(calls) in bad:
            loss = loss * float("nan")
        return loss, {"loss": loss.detach()}
    monkeypatch.setattr(train.DiffusionObjective, "forward", poisoned)
    common = ["--stage", "1", "--config", "tiny", "--manifest", str(clips), "--vae", str(official_vae_ckpt),
              "--vae-config", "tiny", "--max-nonfinite", "3", *FAST]
    bad = {2}
    train.main([*common, "--run-dir", str(tmp_path / "a"), "--max-steps", "3"])
    lines = log_lines(tmp_path / "a")
    assert lines[1]["loss"] == "nan" and lines[-1]["line"].endswith("1 steps")
    calls[:] = []  # the same run, logged once: its means are those of the two steps taken
    train.main([*common, "--run-dir", str(tmp_path / "c"), "--max-steps", "3", "--log-every", "3"])
    (line,) = log_lines(tmp_path / "c")
    for key in ("loss", "grad"):
        assert float(line[key]) == pytest.approx((float(lines[0][key]) + float(lines[2][key])) / 2, rel=1e-3)
    bad, calls[:] = set(range(1, 100)), []
    with pytest.raises(SystemExit, match="3 non-finite losses in a row"):
        train.main([*common, "--run-dir", str(tmp_path / "b"), "--max-steps", "10"])
    assert not (tmp_path / "b" / "ckpt.pt").exists()


# -----------------------------------------------------------------------------
# processes: torchrun, stop signals


def python_env():
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_torchrun_two_ranks_hold_identical_weights(clips, tmp_path, official_vae_ckpt):
    run = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "train.py"), "--stage", "1", "--config", "tiny", "--manifest", str(clips),
           "--vae", str(official_vae_ckpt), "--vae-config", "tiny", "--run-dir", str(run), "--max-steps", "3",
           "--accum", "2", *FAST]
    done = subprocess.run(cmd, capture_output=True, text=True, env=python_env(), timeout=300)
    assert done.returncode == 0, done.stderr[-20000:]  # a rank that aborts says why well before the summary
    log = (run / "log.txt").read_text()
    assert "2 x 2 x 2 examples per step" in log
    assert "saved" in log and "the 2 replicas hold identical weights" in log
    assert all(log.count(f"warning: skipping manifest row {row}:") == 1 for row in (7, 8, 9, 10))  # once, not per rank
    assert load(run / "ckpt.pt")["step"] == 3 and len(load(run / "ckpt.pt")["rng"]) == 2


@pytest.mark.slow
def test_a_killed_run_leaves_no_lock(tmp_path):
    """SIGKILL gives a process no time to clean up; the kernel drops its flock all the same."""
    code = (f"import train, time\nwith train.claimed_run_dir({str(tmp_path)!r}):\n    print('held', flush=True)\n"
            "    time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=python_env())
    assert proc.stdout.readline() == "held\n"
    with pytest.raises(SystemExit, match="another run"):
        with train.claimed_run_dir(str(tmp_path)):
            pass
    proc.kill()
    proc.wait(timeout=60)
    with train.claimed_run_dir(str(tmp_path)):
        pass


@pytest.mark.slow
@pytest.mark.parametrize("stop, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_stop_signal_saves_exits_as_shells_expect_and_the_run_resumes(clips, tmp_path, official_vae_ckpt, stop,
                                                                       status):
    """Non-zero, so that `train.py --stage 1 ... && train.py --stage 2 ...` does not go on from half a run."""
    run = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "train.py"), "--stage", "1", "--config", "tiny", "--manifest", str(clips),
           "--vae", str(official_vae_ckpt), "--vae-config", "tiny", "--run-dir", str(run), "--max-steps", "100000",
           *FAST]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=python_env())
    deadline = time.time() + 120
    while not ((run / "log.txt").exists() and "step 2/" in (run / "log.txt").read_text()):
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-2000:]
        time.sleep(0.1)
    proc.send_signal(stop)
    assert proc.wait(timeout=120) == status
    step = load(run / "ckpt.pt")["step"]
    assert step >= 2 and f"stopped by {stop.name} at step {step}" in (run / "log.txt").read_text()
    train.main(["--resume", "--run-dir", str(run), "--max-steps", str(step + 1)])
    assert load(run / "ckpt.pt")["step"] == step + 1


# -----------------------------------------------------------------------------
# the control stage: an energy ControlNet beside a frozen DiT


@pytest.fixture(scope="module")
def stage3(stage1, clips, text_encoder_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "stage3"
    train.main(["--stage", "3", "--manifest", str(clips), "--init-from", str(stage1), "--text-encoder",
                str(text_encoder_dir), "--run-dir", str(run), "--max-steps", "1", *FAST])
    return run / "ckpt.pt"


def test_the_control_stage_trains_a_controlnet_beside_the_frozen_dit_and_resumes_exactly(stage3, clips, tmp_path):
    common = ["--stage", "control", "--manifest", str(clips), "--init-from", str(stage3), "--lr", "1e-2",
              "--ema", "0.5", *FAST]
    train.main([*common, "--run-dir", str(tmp_path / "a"), "--max-steps", "4", "--sample-every", "4",
                "--sample-steps", "2"])
    train.main([*common, "--run-dir", str(tmp_path / "b"), "--max-steps", "2"])
    train.main(["--resume", "--run-dir", str(tmp_path / "b"), "--max-steps", "4"])
    a, b = load(tmp_path / "a" / "ckpt.pt"), load(tmp_path / "b" / "ckpt.pt")
    assert (a["stage"], a["step"], a["config"]["base"]) == ("control", 4, str(stage3))
    assert a["config"]["control"]["hop"] == 4 and a["config"]["control"]["window"] == 32  # the tiny VAE's hop 8
    dit_cfg = E.config_from_dict(E.DiTConfig, a["config"]["dit"])
    assert a["model"].keys() == E.ControlNet(dit_cfg).state_dict().keys()  # the ControlNet alone, not the DiT
    assert a["model"]["controlnet_zero_blocks.0.weight"].abs().max() > 0  # it learned from its zero start
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    assert len(a["optimizer"][0]["state"]) == sum(1 for _ in E.ControlNet(dit_cfg).parameters())  # the DiT is frozen
    assert len(list((tmp_path / "a" / "samples" / "step0000004").iterdir())) == 4  # previews of the first clips
    # sample.py takes the run as --ckpt: the DiT it names, steered by the ControlNet's EMA
    pipe = E.EzAudio.from_pretrained(ckpt=tmp_path / "a" / "ckpt.pt", device="cpu")
    assert pipe.controlnet is not None and pipe.controlnet.control.hop == 4
    torch.testing.assert_close(pipe.controlnet.controlnet_pre.conv_out.weight,
                               a["ema"]["controlnet_pre.conv_out.weight"])
    reference = torch.sin(torch.linspace(0, 300, 2400)) * (torch.arange(2400) < 1200)
    assert pipe.generate(["a tone"], duration=0.1, steps=2, control=reference).shape == (1, 2400)


def test_a_cached_control_stage_learns_from_the_cached_envelopes(stage3, clips, tmp_path, official_vae_ckpt,
                                                                 text_encoder_dir, monkeypatch):
    """The cache stores each clip's energy envelope beside its latents, so that a ControlNet trains without the VAE:
    the envelope a cached run sees is the one computed from the clip's audio."""
    cache = tmp_path / "cache"
    data.main(["cache", "--manifest", str(clips), "--out", str(cache), "--vae", str(official_vae_ckpt),
               "--vae-config", "tiny", "--text-encoder", str(text_encoder_dir), "--segment", "0.05",
               "--workers", "0", "--device", "cpu"])
    rows = data.read_manifest(clips)
    item = data.CachedClips(rows, str(cache), frames=150)[0]
    audio = data.fit_clip(data.load_clip(rows[0]["path"], SR), 150 * 8)
    expected = E.energy_envelope(audio[None], E.ControlConfig.for_vae(E.VAE_PRESETS["tiny"]))[0]
    torch.testing.assert_close(item["energy"], expected, atol=2e-3, rtol=0)  # stored in float16
    assert data.CachedClips(rows, str(cache), frames=50)[0]["energy"].shape == (1, 100)  # a window of it
    seen = []
    forward = train.DiffusionObjective.forward
    monkeypatch.setattr(train.DiffusionObjective, "forward", lambda self, *a: seen.append(a[-1]) or forward(self, *a))
    monkeypatch.setattr(data, "load_vae", lambda *a: (_ for _ in ()).throw(AssertionError("the VAE was loaded")))
    train.main(["--stage", "control", "--manifest", str(clips), "--cache", str(cache), "--init-from", str(stage3),
                "--run-dir", str(tmp_path / "run"), "--max-steps", "2", *FAST])
    assert len(seen) == 2 and seen[0].shape == (2, 1, 2 * 150) and seen[0].amax() == 1
    assert load(tmp_path / "run" / "ckpt.pt")["stage"] == "control"


def test_the_control_stage_needs_a_dit_and_runs_in_runs_control(stage3, clips, tmp_path):
    with pytest.raises(SystemExit, match="ControlNet trains beside a trained DiT: pass its checkpoint"):
        train.settings(["--stage", "control", "--manifest", str(clips), "--run-dir", str(tmp_path / "c")])
    args, _, _ = train.settings(["--stage", "control", "--manifest", str(clips), "--init-from", str(stage3)])
    assert args.run_dir == os.path.join("runs", "control")


@pytest.mark.slow
def test_torchrun_trains_a_controlnet_on_two_ranks(stage3, clips, tmp_path):
    run = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "train.py"), "--stage", "control", "--manifest", str(clips), "--init-from", str(stage3),
           "--run-dir", str(run), "--max-steps", "2", "--accum", "2", *FAST]
    done = subprocess.run(cmd, capture_output=True, text=True, env=python_env(), timeout=300)
    assert done.returncode == 0, done.stderr[-20000:]
    assert "the 2 replicas hold identical weights" in (run / "log.txt").read_text()
    assert load(run / "ckpt.pt")["stage"] == "control"
