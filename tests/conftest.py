"""Shared test fixtures: tiny random models saved the way users' files are (official-format checkpoints, a text
encoder folder), so that every path runs offline in well under a second."""

import json
from pathlib import Path

import pytest
import torch

import ezaudio as E


def tiny_t5(d_model=32, seed=0):
    """A random 2-layer T5 encoder with ByT5's byte vocabulary (384 ids), which needs no vocabulary file."""
    from transformers import ByT5Tokenizer, T5Config, T5EncoderModel
    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=384, d_model=d_model, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                   feed_forward_proj="gated-gelu", is_encoder_decoder=False)
    return ByT5Tokenizer(), T5EncoderModel(cfg).eval()


@pytest.fixture(scope="session")
def text_encoder_dir(tmp_path_factory):
    """A local folder holding a tiny T5 encoder and its tokenizer, as `save_pretrained` writes them."""
    path = tmp_path_factory.mktemp("t5")
    tokenizer, model = tiny_t5()
    tokenizer.save_pretrained(path)
    model.save_pretrained(path)
    return path


def random_dit(cfg, seed=0):
    torch.manual_seed(seed)
    dit = E.EzAudioDiT(cfg)
    with torch.no_grad():
        for p in dit.parameters():
            p.normal_(0, 0.05)
    return dit


@pytest.fixture(scope="session")
def official_dit_ckpt(tmp_path_factory):
    """A tiny DiT saved as the released files are: {'model': state_dict}, with its official YAML config beside it."""
    path = tmp_path_factory.mktemp("dit") / "dit_tiny.pt"
    torch.save({"model": random_dit(E.DIT_PRESETS["tiny"]).state_dict()}, path)
    return path


@pytest.fixture(scope="session")
def official_vae_ckpt(tmp_path_factory):
    """A tiny VAE saved as the released file is ({'state_dict': ...} with 'autoencoder.' keys), config.json beside."""
    folder = tmp_path_factory.mktemp("vae")
    torch.manual_seed(0)
    vae = E.WaveformVAE(E.VAE_PRESETS["tiny"])
    state = {"autoencoder." + k: v for k, v in vae.state_dict().items()}
    state["discriminator.dummy"] = torch.zeros(1)  # other prefixes are ignored
    torch.save({"state_dict": state}, folder / "vae.pt")
    ref = torch.load(Path(__file__).parent / "fixtures" / "reference" / "vae_tiny.pt", weights_only=True)
    (folder / "config.json").write_text(json.dumps(ref["config"]))
    return folder / "vae.pt"
