"""data.resample (windowed sinc) and data.read_audio, which sample.py uses to bring any clip to the model's rate."""

import math

import numpy as np
import pytest
import soundfile as sf
import torch

from data import AudioError, read_audio, resample

EDGE = 200  # output samples at each end, where the filter runs past the signal


def sine(freq, sr, n):
    return torch.sin(2 * math.pi * freq * torch.arange(n, dtype=torch.float64) / sr)


@pytest.mark.parametrize("sr_in", [16000, 22050, 44100, 48000])
@pytest.mark.parametrize("freq", [440.0, 5000.0])
def test_resampled_sine_matches_the_analytic_sine(sr_in, freq):
    y = resample(sine(freq, sr_in, sr_in // 2).float(), sr_in, 24000)
    assert y.dtype == torch.float32
    expected = sine(freq, 24000, y.numel())
    assert (y.double() - expected)[EDGE:-EDGE].abs().max() < 1e-3


@pytest.mark.parametrize("sr_in, n", [(16000, 1601), (44100, 4411), (48000, 7), (22050, 1000), (8000, 1)])
def test_length_is_ceil_of_the_rate_ratio(sr_in, n):
    assert resample(torch.zeros(2, n), sr_in, 24000).shape == (2, math.ceil(n * 24000 / sr_in))


def test_content_above_the_new_nyquist_is_removed():
    y = resample(sine(15000.0, 44100, 22050).float(), 44100, 24000)  # 15 kHz > 12 kHz: would alias to 9 kHz
    assert y[EDGE:-EDGE].pow(2).mean().sqrt() < 1e-2  # the input's rms is 0.71: at least 37 dB down


def test_same_rate_is_untouched():
    x = torch.randn(100)
    assert resample(x, 24000, 24000) is x


def test_read_audio_averages_channels_and_resamples(tmp_path):
    left, right = sine(440.0, 16000, 8000).numpy(), sine(440.0, 16000, 8000).numpy() * 0.5
    sf.write(tmp_path / "stereo.wav", np.stack([left, right], 1), 16000, subtype="FLOAT")
    audio = read_audio(tmp_path / "stereo.wav", 24000)
    assert audio.shape == (12000,) and audio.dtype == torch.float32
    assert (audio.double() - 0.75 * sine(440.0, 24000, 12000))[EDGE:-EDGE].abs().max() < 1e-3


@pytest.mark.parametrize("content, message", [(None, "no such file"), (b"hello", "not a readable audio file")])
def test_read_audio_errors_are_one_line(tmp_path, content, message):
    path = tmp_path / "x.wav"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(AudioError, match=message) as e:
        read_audio(path, 24000)
    assert "\n" not in str(e.value)
