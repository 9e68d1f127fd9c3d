"""
EzAudio in one file: text-to-audio generation with an efficient diffusion transformer.

Paper: J. Hai et al., "EzAudio: Enhancing Text-to-Audio Generation with Efficient Diffusion Transformer",
arXiv 2409.10819. Read top to bottom, this file builds every piece the paper describes:

  1. configuration            presets for the released EzAudio-L / XL and their waveform VAE (Sec. II-A, II-B)
  2. EzAudio-DiT              AdaLN-SOLA, long skips, RoPE, QK-norm, cross-attention, GEGLU (Sec. II-B)
  3. masked input assembly    generation, editing and span-masked training share one model input (Sec. II-C)
  4. EzAudio-ControlNet       audio that follows a reference clip's loudness (the released energy ControlNet)
  5. waveform VAE             Snake-beta Oobleck encoder/decoder with a VAE bottleneck (Sec. II-A)
  6. diffusion                zero-terminal-SNR v-prediction, DDIM (Song et al. 2021, eqs. 12 and 16),
                              CFG with rescale (Sec. II-D)
  7. training objective       span masking and the masked velocity loss (Sec. II-C, III)
  8. text encoder             frozen FLAN-T5 (Sec. II-B)
  9. checkpoints              the released state_dicts and this project's own files
 10. the pipeline             text to audio, audio editing, and audio that follows a reference, in a few lines

The released weights load into these modules unchanged, and with them the numbers match the published
implementation (see tests/test_reference.py).
"""

import json
import math
import os
import re
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

# -----------------------------------------------------------------------------
# 1. Configuration


@dataclass
class DiTConfig:
    latent_dim: int = 128  # C: latent channels; the model input has 2C + 1 (x_t, known latent, mask)
    dim: int = 1152  # D
    depth: int = 28  # depth // 2 in-blocks, one mid-block, depth // 2 out-blocks
    heads: int = 16
    mlp_ratio: float = 4.0
    sola_rank: int = 36  # r of the low-rank AdaLN-SOLA update
    sola_alpha: float = 36.0
    context_dim: int = 2048  # width of the text encoder; 0 = no text and no cross-attention (stage 1)
    mae_prob: float = 0.25  # training: probability that a sample is span-masked rather than fully masked
    mask_span: int = 10  # training: span length in latent frames (0.2 s)
    mask_ratio: tuple = (0.25, 1.0)  # training: range of the fraction of frames to mask

    @classmethod
    def from_official(cls, cfg):
        """Build from the `model` block of a released EzAudio YAML config."""
        expected = dict(patch_size=1, qk_norm="layernorm", act_layer="geglu", time_fusion="ada_sola_bias",
                        skip=True, skip_norm=True, use_conv=True, rope_mode="shared", pe_method="none")
        for k, v in expected.items():
            if cfg.get(k, v) != v:
                raise ValueError(f"unsupported DiT config: {k}={cfg[k]!r} (EzAudio uses {v!r})")
        if cfg["in_chans"] != 2 * cfg["out_chans"] + 1:
            raise ValueError(f"unsupported DiT config: in_chans={cfg['in_chans']} must be 2*out_chans+1")
        return cls(latent_dim=cfg["out_chans"], dim=cfg["embed_dim"], depth=cfg["depth"], heads=cfg["num_heads"],
                   mlp_ratio=cfg["mlp_ratio"], sola_rank=cfg["ada_sola_rank"], sola_alpha=cfg["ada_sola_alpha"],
                   context_dim=cfg["context_dim"] if cfg.get("context_fusion", "cross") == "cross" else 0,
                   mae_prob=cfg.get("mae_prob", 0.25), mask_span=cfg.get("mask_span", 10),
                   mask_ratio=tuple(cfg.get("mask_ratio", (0.25, 1.0))))


@dataclass
class VAEConfig:
    sample_rate: int = 24000
    channels: int = 128
    c_mults: tuple = (1, 2, 4, 8)
    strides: tuple = (2, 4, 6, 10)  # hop = product = 480 samples, i.e. 50 latent frames per second at 24 kHz
    latent_dim: int = 128

    @property
    def hop(self):
        return math.prod(self.strides)

    @classmethod
    def from_official(cls, cfg):
        """Build from a released stable-audio-style VAE JSON config."""
        enc, dec = cfg["model"]["encoder"]["config"], cfg["model"]["decoder"]["config"]
        if cfg["model"]["bottleneck"]["type"] != "vae" or dec.get("final_tanh", False) or not enc.get("use_snake"):
            raise ValueError("unsupported VAE config: expected an Oobleck VAE with Snake and no final tanh")
        if enc["latent_dim"] != 2 * dec["latent_dim"] or enc["c_mults"] != dec["c_mults"] \
                or enc["strides"] != dec["strides"] or enc["channels"] != dec["channels"]:
            raise ValueError("unsupported VAE config: encoder and decoder disagree")
        return cls(sample_rate=cfg["sample_rate"], channels=enc["channels"], c_mults=tuple(enc["c_mults"]),
                   strides=tuple(enc["strides"]), latent_dim=dec["latent_dim"])


@dataclass
class ControlConfig:
    """EzAudio-ControlNet's condition (SPEC §7): the energy envelope's framing, and the widths of the convolutions that
    bring it to the latent rate. The defaults are the released energy ControlNet's (10 ms hops at 24 kHz)."""
    cond_blocks: tuple = (65, 128)  # one stride-2 block per pair; the first width includes the condition-mask channel
    hop: int = 240  # samples per energy frame; times 2^(len(cond_blocks) - 1) it must be the VAE's hop
    window: int = 1920
    min_db: float = -60.0

    @classmethod
    def for_vae(cls, vae_cfg):
        """The envelope at twice the VAE's latent rate, as the released one: hop 240 and window 1920 at hop 480."""
        return cls(hop=vae_cfg.hop // 2, window=4 * vae_cfg.hop)

    @classmethod
    def from_official(cls, cfg):
        """Build from a released ControlNet YAML config (its `controlnet` and `conditioner` blocks)."""
        net, cond = cfg["controlnet"], cfg["conditioner"]
        expected = dict(condition_type="energy", padding="reflect", norm=True, cond_in=1, cond_mask=True)
        for k, v in expected.items():
            if {**net, **cond}.get(k, v) != v:
                raise ValueError(f"unsupported ControlNet config: {k}={({**net, **cond})[k]!r} (EzAudio uses {v!r})")
        return cls(cond_blocks=tuple(net["cond_blocks"]), hop=cond["hop_size"], window=cond["window_size"],
                   min_db=cond["min_db"])


@dataclass
class DiffusionConfig:
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012


DIT_PRESETS = {
    "L": DiTConfig(dim=1024, depth=24, heads=16, sola_rank=32, sola_alpha=32, context_dim=1024),
    "XL": DiTConfig(dim=1152, depth=28, heads=16, sola_rank=36, sola_alpha=36, context_dim=2048),
    "tiny": DiTConfig(latent_dim=8, dim=64, depth=4, heads=4, sola_rank=4, sola_alpha=8, context_dim=32),
    # the toy world (toy.py), trained on a CPU; their text encoder is toy_text_encoder (width 64)
    "toy": DiTConfig(latent_dim=64, dim=128, depth=4, heads=4, sola_rank=8, sola_alpha=8, context_dim=64),
    "toy-small": DiTConfig(latent_dim=16, dim=128, depth=4, heads=4, sola_rank=8, sola_alpha=8, context_dim=64),
}
VAE_PRESETS = {
    "released": VAEConfig(),
    "tiny": VAEConfig(channels=8, c_mults=(1, 2), strides=(2, 4), latent_dim=8),
    # 64 numbers per 320 samples (5x; the released VAE's 3.75x): at 16 the world's tones lose their exact pitch
    "toy": VAEConfig(sample_rate=16000, channels=16, c_mults=(1, 2, 4, 8), strides=(2, 4, 4, 10), latent_dim=64),
    # 8 wide and 16 latent channels: trains in the README's 15 minutes and the CI test, but hears neither noise
    # nor a tone's exact pitch
    "toy-small": VAEConfig(sample_rate=16000, channels=8, c_mults=(1, 2, 4, 8), strides=(2, 4, 4, 10), latent_dim=16),
}


def config_from_dict(cls, d):
    """Rebuild a config dataclass from the plain dict stored in a checkpoint (tuples come back as lists)."""
    kw = {f.name: d[f.name] for f in fields(cls) if f.name in d}
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in kw.items()})


# -----------------------------------------------------------------------------
# 2. EzAudio-DiT building blocks


def timestep_embedding(t, dim=256, max_period=10000.0, dtype=torch.float32):
    """Sinusoidal embedding of integer timesteps, cosines first. (B,) -> (B, dim). The released model computes it
    in float32, whose rounding of t * freq (t up to 999) is the largest in the model; float64 serves the parity
    tests, which measure that rounding."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=dtype) / half)
    args = t.to(dtype)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class RotaryEmbedding(nn.Module):
    """RoPE (Su et al.) over token positions. One instance is shared by every self-attention ("rope_mode: shared");
    the released checkpoint stores its `inv_freq` once per block, and loading writes the same values each time."""

    def __init__(self, head_dim, base=10000.0):
        super().__init__()
        self.register_buffer("inv_freq", base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self._cache = {}

    def forward(self, length, device):
        """cos and sin tables for positions 0..length-1, each (length, head_dim), in float32; the last length's kept.
        RoPE is applied in float32 whatever the model's dtype, so one table serves float32, bf16 and fp16."""
        key = (length, str(device))
        if key not in self._cache:
            with torch.inference_mode(False):  # a table first made while sampling must also serve training
                angles = torch.arange(length, device=device, dtype=torch.float32)[:, None] * self.inv_freq.to(device)
                angles = torch.cat([angles, angles], dim=-1)
                self._cache = {key: (angles.cos(), angles.sin())}  # one length at a time: sampling reuses it
        return self._cache[key]

    def _apply(self, fn, recurse=True):
        self._cache = {}  # .to() / .half() / load_state_dict invalidate the tables
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        self._cache = {}
        super()._load_from_state_dict(*args, **kwargs)


def apply_rope(x, cos, sin):
    """Rotate query or key (B, H, L, d) by position, in float32 as the released model does (float64 stays float64,
    for the parity tests)."""
    x_hi = x.to(torch.promote_types(x.dtype, torch.float32))
    x1, x2 = x_hi.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x_hi * cos + rotated * sin).to(x.dtype)


class Attention(nn.Module):
    """Multi-head attention with QK-norm (LayerNorm over head_dim). Self-attention when no context is given
    (then RoPE applies), cross-attention otherwise (then `mask` marks the context tokens to attend)."""

    def __init__(self, dim, heads, rotary=None):
        super().__init__()
        self.heads, head_dim = heads, dim // heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.norm_q = nn.LayerNorm(head_dim)
        self.norm_k = nn.LayerNorm(head_dim)
        self.proj = nn.Linear(dim, dim)
        if rotary is not None:
            self.rotary = rotary

    def forward(self, x, context=None, mask=None, rope=None):
        B, L, D = x.shape
        kv = x if context is None else context
        split = lambda t: t.view(B, -1, self.heads, D // self.heads).transpose(1, 2)  # (B, H, L, d)
        q, k, v = split(self.to_q(x)), split(self.to_k(kv)), split(self.to_v(kv))
        q, k = self.norm_q(q), self.norm_k(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        q, k = q.to(v.dtype), k.to(v.dtype)  # under autocast the LayerNorms and RoPE return float32
        if mask is not None:
            mask = mask[:, None, None, :]  # (B, 1, 1, Lc): broadcast over heads and queries
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(x.transpose(1, 2).reshape(B, L, D))


class GEGLU(nn.Module):
    """One projection to twice the hidden width, split into value u and gate g: u * GELU(g) (Shazeer, 2020)."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * hidden)

    def forward(self, x):
        u, g = self.proj(x).chunk(2, dim=-1)
        return u * F.gelu(g)


class FeedForward(nn.Module):
    def __init__(self, dim, mlp_ratio):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        # index 1 held dropout in the released model; an Identity keeps the key names net.0 / net.2
        self.net = nn.Sequential(GEGLU(dim, hidden), nn.Identity(), nn.Linear(hidden, dim))

    def forward(self, x):
        return self.net(x)


class AdaLNSOLA(nn.Module):
    """AdaLN-SOLA (paper Sec. II-B): the six modulation vectors come from one projection of the timestep shared by
    all blocks (`time_ada`), plus a per-block low-rank update and a per-block learned bias table."""

    def __init__(self, dim, rank, alpha):
        super().__init__()
        self.scale_shift_table = nn.Parameter(torch.zeros(6, dim))
        self.lora_a = nn.Linear(dim, 6 * rank, bias=False)
        self.lora_b = nn.Linear(6 * rank, 6 * dim, bias=False)
        self.scaling = alpha / rank

    def forward(self, time_token, time_ada):
        """(B, D) timestep token and (B, 6D) shared modulation -> (B, 6, D): shift, scale, gate for attention, then
        for the MLP."""
        a = time_ada + self.lora_b(self.lora_a(time_token)) * self.scaling
        return a.view(a.shape[0], 6, -1) + self.scale_shift_table


def modulate(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
    """Self-attention, cross-attention to the text and a GEGLU MLP, modulated by AdaLN-SOLA. Out-blocks first fuse
    the long skip from their mirrored in-block (U-ViT, Bao et al.), normalised as the paper's skip-norm."""

    def __init__(self, cfg, rotary, skip=False):
        super().__init__()
        D = cfg.dim
        self.norm1 = nn.LayerNorm(D)
        self.attn = Attention(D, cfg.heads, rotary)
        if cfg.context_dim:
            self.cross_attn = Attention(D, cfg.heads)
            self.norm2 = nn.LayerNorm(D)
            self.norm_context = nn.LayerNorm(D)  # the context is already embedded to D
        self.norm3 = nn.LayerNorm(D)
        self.mlp = FeedForward(D, cfg.mlp_ratio)
        self.adaln = AdaLNSOLA(D, cfg.sola_rank, cfg.sola_alpha)
        if skip:
            self.skip_norm = nn.LayerNorm(2 * D)
            self.skip_linear = nn.Linear(2 * D, D)

    def forward(self, x, time_token, time_ada, context, context_mask, rope, skip=None):
        if skip is not None:
            x = self.skip_linear(self.skip_norm(torch.cat([x, skip], dim=-1)))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaln(time_token, time_ada).unbind(1)
        # the released model gates residuals with (1 - gate); kept so its weights compute what they were trained for
        x = x + (1 - gate_msa[:, None]) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rope=rope)
        if context is not None:
            x = x + self.cross_attn(self.norm2(x), self.norm_context(context), mask=context_mask)
        x = x + (1 - gate_mlp[:, None]) * self.mlp(modulate(self.norm3(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    def __init__(self, dim, out_dim):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.linear = nn.Linear(dim, out_dim)
        self.final_layer = nn.Conv1d(out_dim, out_dim, kernel_size=3, padding=1)  # smooths across neighbouring frames

    def forward(self, x, shift, scale):
        x = self.linear(modulate(self.norm(x), shift, scale))  # (B, L, C)
        return self.final_layer(x.transpose(1, 2))  # (B, C, L)


class PatchEmbed(nn.Module):
    def __init__(self, in_dim, dim):
        super().__init__()
        self.proj = nn.Conv1d(in_dim, dim, kernel_size=1)

    def forward(self, x):
        return self.proj(x).transpose(1, 2)  # (B, C_in, L) -> (B, L, D)


class TimestepEmbed(nn.Module):
    def __init__(self, dim, freq_dim=256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t):
        # at least float32: in bfloat16, t * freq for t near 999 would be off by up to 4 radians
        dtype = self.mlp[0].weight.dtype
        return self.mlp(timestep_embedding(t, self.freq_dim, dtype=torch.promote_types(dtype, torch.float32)).to(dtype))


class DiTTrunk(nn.Module):
    """The DiT's input half: embeddings of the latent frames, the timestep and the text, then the in-blocks. The DiT
    continues it; EzAudio-ControlNet is a trainable copy of it (section 4)."""

    def __init__(self, cfg, rotary, final_modulation=False):
        super().__init__()
        D = cfg.dim
        self.patch_embed = PatchEmbed(2 * cfg.latent_dim + 1, D)
        self.time_embed = TimestepEmbed(D)
        if final_modulation:  # the DiT's; registered here to keep the parameter order that saved optimisers have
            self.time_ada_final = nn.Linear(D, 2 * D)
        self.time_ada = nn.Linear(D, 6 * D)
        if cfg.context_dim:
            self.context_embed = nn.Sequential(nn.Linear(cfg.context_dim, D), nn.SiLU(), nn.Linear(D, D))
        self.in_blocks = nn.ModuleList([DiTBlock(cfg, rotary) for _ in range(cfg.depth // 2)])
        self.grad_checkpointing = False

    def embed(self, x, t, context, context_mask, rotary):
        """Tokens (B, L, D) of the model input x (B, 2C+1, L), and what every block takes besides them: the timestep
        token (B, D), the shared modulation (B, 6D), the embedded text (B, Lc, D), its mask and the RoPE tables."""
        time_token = F.silu(self.time_embed(t))  # computed once per step, shared by every block
        dtype = self.time_ada.weight.dtype  # the sampler's float32 latents meet weights cast to bfloat16 here
        if context is not None:
            context = self.context_embed(context.to(dtype))
        x = self.patch_embed(x.to(dtype))
        return x, (time_token, self.time_ada(time_token), context, context_mask, rotary(x.shape[1], x.device))

    def run(self, block, x, shared, skip=None):
        if self.grad_checkpointing and self.training:
            return checkpoint(block, x, *shared, skip, use_reentrant=False)
        return block(x, *shared, skip)


class DiT(DiTTrunk):
    """The transformer proper: latent frames in, velocity out. (B, 2C+1, L) -> (B, C, L)"""

    def __init__(self, cfg):
        rotary = RotaryEmbedding(cfg.dim // cfg.heads)  # one table for all blocks, registered (and saved) in each
        super().__init__(cfg, rotary, final_modulation=True)
        self.mid_block = DiTBlock(cfg, rotary)
        self.out_blocks = nn.ModuleList([DiTBlock(cfg, rotary, skip=True) for _ in range(cfg.depth // 2)])
        self.final_block = FinalLayer(cfg.dim, cfg.latent_dim)

    def forward(self, x, t, context=None, context_mask=None, residuals=None):
        """`residuals`: a ControlNet's, one (B, L, D) per in-block, in in-block order (section 4)."""
        x, shared = self.embed(x, t, context, context_mask, self.mid_block.attn.rotary)
        skips = []
        for block in self.in_blocks:
            x = self.run(block, x, shared)
            skips.append(x)
        if residuals is not None:  # SPEC §7: a ControlNet steers the DiT through its long skips only
            skips = [skip + residual for skip, residual in zip(skips, residuals, strict=True)]
        x = self.run(self.mid_block, x, shared)
        for block in self.out_blocks:
            x = self.run(block, x, shared, skips.pop())
        shift, scale = self.time_ada_final(shared[0]).view(x.shape[0], 2, -1).unbind(1)
        return self.final_block(x, shift, scale)


# -----------------------------------------------------------------------------
# 3. Masked input assembly: one model for generation, editing and span-masked training (paper Sec. II-C)


class EzAudioDiT(nn.Module):
    """The DiT plus the learned `mask_embed` that stands in for latent frames to be generated. Its state_dict has
    the released layout: `mask_embed` at the top, everything else under `model.`."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.mask_embed = nn.Parameter(torch.zeros(cfg.latent_dim))
        self.model = DiT(cfg)

    def assemble_input(self, x, gt=None, mask=None):
        """[x_t, known latent with mask_embed where frames are generated, mask as 0/1] on channels.
        x, gt: (B, C, L); mask: (B, 1, L) or (B, C, L) bool, True = generate. No gt means generate everything."""
        B, C, L = x.shape
        embed = self.mask_embed.to(x.dtype)[None, :, None]  # (1, C, 1)
        if gt is None:
            return torch.cat([x, embed.expand(B, C, L), x.new_ones(B, 1, L)], dim=1)
        mask = mask[:, :1]  # (B, 1, L)
        known = torch.where(mask, embed, gt.to(x.dtype))
        return torch.cat([x, known, mask.to(x.dtype)], dim=1)  # (B, 2C+1, L)

    def forward(self, x, t, context=None, context_mask=None, gt=None, mask=None, residuals=None):
        """Predicted velocity (B, C, L) for noisy latents x (B, C, L) at integer timesteps t (B,), steered by a
        ControlNet's `residuals` when given."""
        return self.model(self.assemble_input(x, gt, mask), t, context, context_mask, residuals)

    @torch.no_grad()
    def init_weights(self):
        """Initialisation for training from scratch (the released models were trained from this):
        - every Linear: xavier-uniform weight, zero bias; the 1x1 patch_embed conv likewise, as the Linear it is;
        - zero: time_ada, time_ada_final and every lora_b (so each block starts with the shared-free modulation
          1 - gate = 1, scale = shift = 0), every scale_shift_table, every cross-attention proj (text enters gently),
          and mask_embed;
        - lora_a: kaiming-uniform (a = sqrt(5)), as LoRA does, so that lora_b alone starts at zero;
        - LayerNorms: weight 1, bias 0; the final conv: PyTorch's default;
        - the rotary inv_freq buffer is a constant, not learned."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        dit = self.model
        nn.init.xavier_uniform_(dit.patch_embed.proj.weight.view(dit.patch_embed.proj.out_channels, -1))
        nn.init.zeros_(dit.patch_embed.proj.bias)
        dit.final_block.final_layer.reset_parameters()
        for lin in (dit.time_ada, dit.time_ada_final):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)
        for block in [*dit.in_blocks, dit.mid_block, *dit.out_blocks]:
            nn.init.zeros_(block.adaln.scale_shift_table)
            nn.init.kaiming_uniform_(block.adaln.lora_a.weight, a=math.sqrt(5))
            nn.init.zeros_(block.adaln.lora_b.weight)
            if hasattr(block, "cross_attn"):
                nn.init.zeros_(block.cross_attn.proj.weight)
                nn.init.zeros_(block.cross_attn.proj.bias)
        nn.init.zeros_(self.mask_embed)
        return self


# -----------------------------------------------------------------------------
# 4. EzAudio-ControlNet: audio that follows a reference clip's loudness (SPEC §7; ControlNet: Zhang et al., 2023)


def energy_envelope(audio, cfg):
    """Loudness of waveforms (B, N) in frames of cfg.hop samples: the mean power over a window centred on each
    frame, in dB with a floor at cfg.min_db, scaled per clip to [0, 1] from the floor to its loudest frame.
    -> (B, 1, N // hop)"""
    pad = (cfg.window - cfg.hop) // 2
    padded = F.pad(audio[:, None], (pad, pad), mode="reflect")[:, 0]  # (B, N + window - hop)
    power = padded.unfold(-1, cfg.window, cfg.hop).pow(2).mean(-1)  # (B, N // hop)
    db = 10 * torch.log10(power.clamp(min=10 ** (cfg.min_db / 10)))
    return ((db - cfg.min_db) / (db.amax(-1, keepdim=True) - cfg.min_db + 1e-8))[:, None]


class ControlNetPre(nn.Module):
    """The condition's embedding, added to the ControlNet's patch embedding: a 1x1 conv, the condition mask (frames
    hidden in training get a learned embedding and a 1 in an extra channel), stride-2 conv blocks down to the
    latent rate, and a zero-initialised 1x1 conv out to the model width. (B, 1, F) -> (B, F / 2^k, D)"""

    def __init__(self, cfg, dim):
        super().__init__()
        widths = cfg.cond_blocks
        self.mask_embed = nn.Parameter(torch.zeros(widths[0] - 1))
        self.conv_in = nn.Conv1d(1, widths[0] - 1, 1)
        self.blocks = nn.Sequential(*[nn.Sequential(  # blocks.i.0 and blocks.i.2, as the released keys are named
            nn.Conv1d(c, c, 3, padding=1), nn.SiLU(), nn.Conv1d(c, c_next, 3, padding=1, stride=2), nn.SiLU())
            for c, c_next in zip(widths, widths[1:])])
        self.conv_out = nn.Conv1d(widths[-1], dim, 1)

    def forward(self, condition, mask=None):
        """`mask` (B, 1, F) bool, True = hidden (training only; at inference nothing is)."""
        h = self.conv_in(condition)  # (B, c0 - 1, F)
        if mask is None:
            mask = torch.zeros_like(condition, dtype=torch.bool)
        h = torch.where(mask, self.mask_embed.to(h.dtype)[:, None], h)
        h = self.blocks(torch.cat([h, mask.to(h.dtype)], dim=1))  # (B, c_last, F / 2^k)
        return self.conv_out(h).transpose(1, 2)


class ControlNet(DiTTrunk):
    """A trainable copy of the DiT's input half that reads a condition beside the DiT's input, and returns one
    residual per in-block for the DiT's long skips, each through a zero-initialised Linear. Its state_dict has the
    released layout (ckpts/controlnet/s3_l_energy.pt)."""

    def __init__(self, cfg, control=None):
        super().__init__(cfg, RotaryEmbedding(cfg.dim // cfg.heads))
        self.cfg, self.control = cfg, control or ControlConfig()
        self.controlnet_pre = ControlNetPre(self.control, cfg.dim)
        self.controlnet_zero_blocks = nn.ModuleList([nn.Linear(cfg.dim, cfg.dim) for _ in self.in_blocks])

    @classmethod
    @torch.no_grad()
    def from_dit(cls, dit, control=None):
        """A ControlNet to train beside `dit` (an EzAudioDiT): its input half's weights copied, and conv_out and
        the residual Linears zeroed, so that it starts by changing nothing."""
        net = cls(dit.cfg, control).to(dit.mask_embed.device, dit.mask_embed.dtype)
        state = net.state_dict()
        state.update({k: v for k, v in dit.model.state_dict().items() if k in state})
        net.load_state_dict(state)
        for layer in [net.controlnet_pre.conv_out, *net.controlnet_zero_blocks]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        return net

    def forward(self, x, t, condition, context=None, context_mask=None, scale=1.0, condition_mask=None):
        """Residuals, one (B, L, D) per in-block in in-block order, for the DiT's input x (B, 2C+1, L) as
        EzAudioDiT.assemble_input makes it, and a condition (B, 1, F) at 2^k times the latent rate."""
        x, shared = self.embed(x, t, context, context_mask, self.in_blocks[0].attn.rotary)
        x = x + self.controlnet_pre(condition.to(x.dtype), condition_mask)
        residuals = []
        for block, zero in zip(self.in_blocks, self.controlnet_zero_blocks):
            x = self.run(block, x, shared)
            residuals.append(zero(x) * scale)
        return residuals


# -----------------------------------------------------------------------------
# 5. The waveform VAE (paper Sec. II-A): an Oobleck encoder/decoder (Stable Audio) with a VAE bottleneck


class SnakeBeta(nn.Module):
    """y = x + sin(a x)^2 / b with per-channel a, b stored in log scale (Ziyin et al., 2020; BigVGAN)."""

    def __init__(self, channels):
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(channels))
        self.beta = nn.Parameter(torch.zeros(channels))

    def forward(self, x):  # (B, C, T)
        a, b = self.alpha.exp()[:, None], self.beta.exp()[:, None]
        return x + torch.sin(a * x).pow(2) / (b + 1e-9)


def weight_norm(v, g):
    """w = g * v / |v|, the norm taken over every dim but the first (Salimans & Kingma, 2016)."""
    return v * (g / v.norm(dim=(1, 2), keepdim=True))


class WeightNormed:
    """Weight stored as weight_g and weight_v, the released checkpoint's weight-norm layout, for a conv layer.
    `fold()` computes the plain weight once for inference."""

    def split_weight(self):
        v = self.weight.detach()
        del self.weight
        self.weight_v = nn.Parameter(v.clone())
        self.weight_g = nn.Parameter(v.norm(dim=(1, 2), keepdim=True))
        self.register_buffer("folded", None, persistent=False)

    def weight_now(self):
        return self.folded if self.folded is not None else weight_norm(self.weight_v, self.weight_g)

    def fold(self):
        self.folded = weight_norm(self.weight_v, self.weight_g).detach()


class WNConv1d(WeightNormed, nn.Conv1d):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.split_weight()

    def forward(self, x):
        return self._conv_forward(x, self.weight_now(), self.bias)


class WNConvTranspose1d(WeightNormed, nn.ConvTranspose1d):
    """Its weight is (in, out, k), so the norm keeps dim 0 = in channels, as in the checkpoint."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.split_weight()

    def forward(self, x):
        return F.conv_transpose1d(x, self.weight_now(), self.bias, self.stride, self.padding)


class ResidualUnit(nn.Module):
    def __init__(self, channels, dilation):
        super().__init__()
        self.layers = nn.Sequential(
            SnakeBeta(channels), WNConv1d(channels, channels, 7, dilation=dilation, padding=3 * dilation),
            SnakeBeta(channels), WNConv1d(channels, channels, 1))

    def forward(self, x):
        return x + self.layers(x)


class EncoderBlock(nn.Module):
    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.layers = nn.Sequential(
            ResidualUnit(c_in, 1), ResidualUnit(c_in, 3), ResidualUnit(c_in, 9), SnakeBeta(c_in),
            WNConv1d(c_in, c_out, 2 * stride, stride=stride, padding=math.ceil(stride / 2)))

    def forward(self, x):
        return self.layers(x)


class DecoderBlock(nn.Module):
    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.layers = nn.Sequential(
            SnakeBeta(c_in), WNConvTranspose1d(c_in, c_out, 2 * stride, stride=stride, padding=math.ceil(stride / 2)),
            ResidualUnit(c_out, 1), ResidualUnit(c_out, 3), ResidualUnit(c_out, 9))

    def forward(self, x):
        return self.layers(x)


class WaveformVAE(nn.Module):
    """Mono waveform (B, 1, T) <-> latent (B, latent_dim, T / hop). The encoder emits mean and scale of a diagonal
    Gaussian posterior; std = softplus(scale) + 1e-4."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        widths = [cfg.channels * m for m in (1, *cfg.c_mults)]
        self.encoder = nn.Module()
        self.encoder.layers = nn.Sequential(
            WNConv1d(1, widths[0], 7, padding=3),
            *[EncoderBlock(widths[i], widths[i + 1], s) for i, s in enumerate(cfg.strides)],
            SnakeBeta(widths[-1]), WNConv1d(widths[-1], 2 * cfg.latent_dim, 3, padding=1))
        self.decoder = nn.Module()
        self.decoder.layers = nn.Sequential(
            WNConv1d(cfg.latent_dim, widths[-1], 7, padding=3),
            *[DecoderBlock(widths[i + 1], widths[i], s) for i, s in reversed(list(enumerate(cfg.strides)))],
            SnakeBeta(widths[0]), WNConv1d(widths[0], 1, 7, padding=3, bias=False))

    def posterior(self, audio):
        """(B, 1, T) -> mean, std, each (B, latent_dim, T / hop)."""
        mean, scale = self.encoder.layers(audio).chunk(2, dim=1)
        return mean, F.softplus(scale) + 1e-4

    def encode(self, audio, sample=True, generator=None):
        """Latent of a waveform: a draw from the posterior (as the released pipeline does) or its mean."""
        mean, std = self.posterior(audio)
        if not sample:
            return mean
        return mean + std * torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)

    def decode(self, z):
        """(B, latent_dim, L) -> (B, 1, hop * L) for even strides."""
        return self.decoder.layers(z)

    def fold_weight_norm(self):
        """Freeze g * v / |v| into plain weights for inference; training must not call this."""
        for m in self.modules():
            if isinstance(m, (WNConv1d, WNConvTranspose1d)):
                m.fold()
        return self


def kl_divergence(mean, std):
    """KL(q || N(0, I)) as the released VAE was trained: summed over channels, averaged over batch and time.
    (Twice the textbook KL; the factor is part of the recipe's weight 1e-4.)"""
    return (mean.pow(2) + std.pow(2) - 2 * std.log() - 1).sum(1).mean()


# -----------------------------------------------------------------------------
# 6. Diffusion: zero-terminal-SNR v-prediction with DDIM sampling and classifier-free guidance


def zero_snr_alphas_cumprod(cfg):
    """The "scaled_linear" betas of Stable Diffusion, rescaled so that the last step is pure noise (SNR 0), as in
    Lin et al., "Common Diffusion Noise Schedules and Sample Steps are Flawed" (2024), Algorithm 1. (T,) float32"""
    betas = torch.linspace(cfg.beta_start ** 0.5, cfg.beta_end ** 0.5, cfg.num_train_timesteps) ** 2
    s = torch.cumprod(1 - betas, dim=0).sqrt()
    s = (s - s[-1]) * s[0] / (s[0] - s[-1])  # shift the last to 0, keep the first
    alphas_bar = s ** 2
    alphas = torch.cat([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])  # per-step alphas, recovered
    return torch.cumprod(alphas, dim=0)  # alphas_cumprod[-1] is exactly 0


def classifier_free_guidance(v_pos, v_neg, scale, rescale=0.0):
    """v = v_neg + w (v_pos - v_neg) (Ho & Salimans, 2022), then blended with a copy rescaled to the standard
    deviation of v_pos by phi = `rescale`, which undoes the over-exposure of large w (Lin et al. 2024, Sec. 3.4)."""
    v = v_neg + scale * (v_pos - v_neg)
    if rescale > 0:
        dims = tuple(range(1, v.ndim))
        v_rescaled = v * (v_pos.std(dim=dims, keepdim=True) / v.std(dim=dims, keepdim=True))
        v = rescale * v_rescaled + (1 - rescale) * v
    return v


def randn(shape, generator, device):
    """Gaussian noise (B, ...) from one generator, or from a list of B generators, one per sample, so that a batch
    draws for each sample exactly what that sample draws alone."""
    if isinstance(generator, (list, tuple)):
        return torch.cat([torch.randn((1, *shape[1:]), generator=g, device=device) for g in generator])
    return torch.randn(shape, generator=generator, device=device)


class Diffusion(nn.Module):
    """Forward noising, the v-prediction target and the DDIM sampler. A module only so that .to(device) moves the
    schedule; it has no parameters and its state is not saved."""

    def __init__(self, cfg=None):
        super().__init__()
        self.cfg = cfg or DiffusionConfig()
        self.num_train_timesteps = self.cfg.num_train_timesteps
        self.register_buffer("alphas_cumprod", zero_snr_alphas_cumprod(self.cfg), persistent=False)

    def _coefficients(self, t, ndim):
        a = self.alphas_cumprod[t].view(-1, *[1] * (ndim - 1))  # (B, 1, 1)
        return a.sqrt(), (1 - a).sqrt()

    def add_noise(self, x0, noise, t):
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps   (DDPM, Ho et al. 2020, eq. 4)"""
        a, s = self._coefficients(t, x0.ndim)
        return a * x0 + s * noise

    def velocity(self, x0, noise, t):
        """v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0, the v-prediction target (Salimans & Ho, 2022)."""
        a, s = self._coefficients(t, x0.ndim)
        return a * noise - s * x0

    def x0_and_eps(self, x, v, t):
        """Clean sample and noise read off a noisy sample and its velocity (the v-parameterisation is a rotation)."""
        a, s = self._coefficients(t, x.ndim)
        return a * x - s * v, a * v + s * x

    def timesteps(self, steps):
        """The "trailing" schedule of Lin et al. (2024, Table 2): starts at T-1, so sampling begins at pure noise."""
        T = self.num_train_timesteps
        return (torch.arange(T, 0, -T / steps, dtype=torch.float64).round() - 1).long()

    def step(self, v, t, x, steps, eta=0.0, noise=None):
        """One DDIM update from integer timestep t to t - T // steps (Song et al., "Denoising Diffusion Implicit
        Models", 2021, eq. 12 with sigma from eq. 16), with x0 and eps read off the predicted velocity. t: an integer,
        or a tensor (1,) on the schedule's device, which keeps the step free of host reads, as a CUDA graph needs."""
        t = torch.as_tensor(t, device=self.alphas_cumprod.device).view(1)
        t_prev = t - self.num_train_timesteps // steps
        a_t = self.alphas_cumprod[t]
        a_prev = torch.where(t_prev >= 0, self.alphas_cumprod[t_prev.clamp(min=0)], 1.0)
        x0, eps = self.x0_and_eps(x, v, t)
        std = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
        # 1 - abar_prev - std^2 is 0 in exact arithmetic at the first step with eta = 1; float32 can dip below it
        x_prev = a_prev.sqrt() * x0 + (1 - a_prev - std ** 2).clamp(min=0).sqrt() * eps
        if eta > 0:
            x_prev = x_prev + std * noise
        return x_prev

    @torch.inference_mode()
    def sample(self, dit, context, context_mask, neg_context=None, neg_mask=None, *, length=None, steps=100,
               guidance=5.0, rescale=0.75, eta=1.0, gt=None, mask=None, generator=None, noise=None, batch=1,
               controlnet=None, condition=None, control_scale=1.0, progress=False, capture=None):
        """Generate latents (B, C, length) by DDIM from pure noise, guided by the text (classifier-free guidance
        against `neg_context` when given). Editing: pass the known latent `gt` (B, C, L) and `mask` (B, 1 or C, L),
        True where frames are to be generated; the known frames are copied back at the end. Without text (a
        stage-1 model) pass context=None and the `batch` size. Control: a `controlnet` (section 4) with its
        `condition` (B, 1, F), its residuals scaled by `control_scale`.

        Random numbers come from `generator` in the order of the released pipeline: first the initial noise,
        then, when eta > 0, one tensor of the same shape at every step. A list of generators, one per sample, gives
        each sample the numbers it would draw alone (see `randn`).

        `capture` turns one step, a function of tensors alone (x, t, noise) -> next x, into a faster one: `cuda_graph`
        replays it as one CUDA graph, torch.compile would fuse it. The noise is still drawn here, in the same order."""
        device = self.alphas_cumprod.device
        B = len(context) if context is not None else len(gt) if gt is not None else batch
        shape = (B, dit.cfg.latent_dim, length if gt is None else gt.shape[-1])
        x = randn(shape, generator, device) if noise is None else noise.to(device)
        guided = neg_context is not None and guidance != 1
        if guided:  # one forward pass carries both halves: [text; negative text]
            context, context_mask = pad_and_concat(context, context_mask, neg_context, neg_mask)
            if gt is not None:
                gt, mask = torch.cat([gt, gt]), torch.cat([mask, mask])
            if condition is not None:  # the negative half follows the reference too: guidance is by text alone
                condition = torch.cat([condition, condition])
        if context_mask is not None and bool(context_mask.all()):
            context_mask = None  # no padding: skip the attention mask and its slower kernel

        def step(x, t, z):
            x_in = torch.cat([x, x]) if guided else x
            t_batch = t.expand(len(x_in))
            residuals = None if controlnet is None else controlnet(
                dit.assemble_input(x_in, gt, mask), t_batch, condition, context, context_mask, control_scale)
            v = dit(x_in, t_batch, context, context_mask, gt, mask, residuals).float()
            if guided:
                v = classifier_free_guidance(*v.chunk(2), guidance, rescale)
            return self.step(v, t, x, steps, eta, z)

        step = step if capture is None else capture(step)
        timesteps = self.timesteps(steps).to(device)[:, None]  # each (1,): indexing with it reads nothing to the host
        for t in tqdm(timesteps, desc="sampling", disable=not progress, leave=False):
            z = randn(shape, generator, device) if eta > 0 else None
            x = step(x, t, z)
        if gt is not None:
            x = torch.where(mask[:B], x, gt[:B].float())
        return x


def cuda_graph(fn):
    """fn, captured in a CUDA graph at its first call and replayed at every later one. A sampling step launches
    hundreds of small kernels; at batch 1 launching them from Python takes longer than the GPU takes to run them,
    and a replay launches them all at once. Later calls pass tensors of the first call's shapes (None where it
    passed None), whose values are copied into the graph's inputs; whatever else fn reads is frozen at capture."""
    graph, inputs, output = torch.cuda.CUDAGraph(), None, None

    def replay(*args):
        nonlocal inputs, output
        if inputs is None:
            inputs = [a.clone() if a is not None else None for a in args]
            side = torch.cuda.Stream()  # capture needs a warm-up run off the default stream (cuBLAS, rotary tables)
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                fn(*inputs)
            torch.cuda.current_stream().wait_stream(side)
            with torch.cuda.graph(graph):
                output = fn(*inputs)
        for static, a in zip(inputs, args):
            if a is not None:
                static.copy_(a)
        graph.replay()
        return output.clone()  # the next replay overwrites `output`

    return replay


def pad_and_concat(a, a_mask, b, b_mask):
    """Stack two batches of context (B, Lc, D) with their masks along the batch, padding the shorter sequence."""
    masks = [m if m is not None else torch.ones(c.shape[:2], dtype=torch.bool, device=c.device)
             for c, m in ((a, a_mask), (b, b_mask))]
    n = max(a.shape[1], b.shape[1])
    ctx = [F.pad(c, (0, 0, 0, n - c.shape[1])) for c in (a, b)]
    masks = [F.pad(m, (0, n - m.shape[1])) for m in masks]
    return torch.cat(ctx), torch.cat(masks)


# -----------------------------------------------------------------------------
# 7. Training objective: span masking and the masked velocity loss (paper Sec. II-C)


def random_spans(batch, length, span, ratio, generator=None, device=None):
    """(B, L) bool: about r * length / span spans of `span` frames at random starts (overlaps allowed), r ~ U(ratio)
    per sample."""
    span, (lo, hi) = min(span, length), ratio
    rand = lambda *shape: torch.rand(shape, generator=generator, device=device)
    n_spans = ((lo + (hi - lo) * rand(batch)) * length / span).round().clamp(min=1).long()  # (B,)
    max_spans = math.ceil(hi * length / span)
    starts = (rand(batch, max_spans) * (length - span + 1)).long()  # (B, S)
    used = torch.arange(max_spans, device=device)[None] < n_spans[:, None]  # (B, S)
    frames = torch.arange(length, device=device)[None, None]  # (1, 1, L)
    return ((frames >= starts[..., None]) & (frames < starts[..., None] + span) & used[..., None]).any(1)


def span_mask(batch, length, cfg, generator=None, device=None, mae_prob=None):
    """Per sample, with probability `mae_prob`: random spans of cfg.mask_span frames covering about a ratio
    ~ U(cfg.mask_ratio) of them; otherwise every frame (plain generation).
    Returns (B, 1, L) bool, True = frames the model must generate (and the loss sees)."""
    mae_prob = cfg.mae_prob if mae_prob is None else mae_prob
    spans = random_spans(batch, length, cfg.mask_span, cfg.mask_ratio, generator, device)
    full = torch.rand(batch, generator=generator, device=device) >= mae_prob
    return (spans | full[:, None])[:, None]


def condition_mask(batch, frames, generator=None, device=None, prob=0.25, ratio=(0.25, 0.5), span=10):
    """Which condition frames a ControlNet in training does not see (SPEC §7): with probability `prob`, random spans
    of `span` frames covering a ratio ~ U(ratio) of them; otherwise none. (B, 1, F) bool, True = hidden."""
    spans = random_spans(batch, frames, span, ratio, generator, device)
    return (spans & (torch.rand(batch, generator=generator, device=device) < prob)[:, None])[:, None]


def masked_mse(pred, target, mask):
    """MSE over the frames where mask (B, 1, L) is True, averaged per sample, then over the batch."""
    per_frame = (pred.float() - target.float()).pow(2).mean(1)  # (B, L)
    m = mask[:, 0].float()
    return ((per_frame * m).sum(1) / m.sum(1).clamp(min=1)).mean()


def diffusion_loss(dit, diffusion, x0, context=None, context_mask=None, generator=None, mae_prob=None,
                   min_timestep=0, controlnet=None, condition=None, condition_mask=None):
    """The training loss of one batch of clean latents x0 (B, C, L): timesteps uniform on [min_timestep, T) (the
    paper's: all of them), span-masked input, v-prediction MSE on the masked frames. With a `controlnet` and its
    `condition` (B, 1, F), the DiT is steered by the ControlNet's residuals, as in sampling."""
    B, C, L = x0.shape
    t = torch.randint(min_timestep, diffusion.num_train_timesteps, (B,), generator=generator, device=x0.device)
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    mask = span_mask(B, L, dit.cfg, generator, x0.device, mae_prob)
    x_t = diffusion.add_noise(x0, noise, t)
    residuals = None if controlnet is None else controlnet(
        dit.assemble_input(x_t, x0, mask), t, condition, context, context_mask, condition_mask=condition_mask)
    v = dit(x_t, t, context, context_mask, gt=x0, mask=mask, residuals=residuals)
    return masked_mse(v, diffusion.velocity(x0, noise, t), mask)


# -----------------------------------------------------------------------------
# 8. Text encoder: frozen FLAN-T5 (paper Sec. II-B)


class TextEncoder(nn.Module):
    """Tokenizer + T5 encoder, frozen. Prompts -> context (B, max_length, D_ctx) and mask (B, max_length) bool."""

    def __init__(self, tokenizer, model, max_length=100):
        super().__init__()
        self.tokenizer, self.model, self.max_length = tokenizer, model.eval().requires_grad_(False), max_length
        self.dim = model.config.d_model

    @classmethod
    def from_pretrained(cls, name_or_path, max_length=100):
        """A hub name ("google/flan-t5-xl", downloaded and cached on first use) or a local save_pretrained folder."""
        from transformers import AutoConfig, AutoTokenizer, T5EncoderModel
        try:
            kind = AutoConfig.from_pretrained(name_or_path).model_type
            if kind not in ("t5", "mt5"):  # another model would load no weights and encode with random ones
                raise CheckpointError(f"{name_or_path!r} is a {kind} model, not a T5; EzAudio's text encoder is "
                                      "FLAN-T5 (e.g. google/flan-t5-xl)")
            model, info = T5EncoderModel.from_pretrained(name_or_path, output_loading_info=True)
            tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"cannot load the text encoder {name_or_path!r} ({str(e).splitlines()[0][:160]}); "
                                  "connect once to download it, or pass a local folder with --text-encoder") from None
        if info["missing_keys"]:
            raise CheckpointError(f"the text encoder {name_or_path!r} lacks {len(info['missing_keys'])} of its "
                                  f"weights (e.g. {info['missing_keys'][0]})")
        return cls(tokenizer, model, max_length)

    @classmethod
    def from_state(cls, state):
        """A small T5 stored inside a checkpoint (see `state()`), tokenised bytewise by ByT5, which needs no files."""
        from transformers import ByT5Tokenizer, T5Config, T5EncoderModel
        model = T5EncoderModel(T5Config(**state["t5_config"]))
        load_weights(model, state["state_dict"], "embedded text encoder")
        return cls(ByT5Tokenizer(), model, state["max_length"])

    def state(self):
        """Plain data for a checkpoint; only for ByT5-tokenised encoders (the released ones load by name)."""
        return {"t5_config": self.model.config.to_diff_dict(), "state_dict": self.model.state_dict(),
                "max_length": self.max_length}

    @torch.no_grad()
    def forward(self, prompts):
        tokens = self.tokenizer(list(prompts), max_length=self.max_length, padding="max_length", truncation=True,
                                return_tensors="pt").to(self.model.device)
        context = self.model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state
        return context, tokens.attention_mask.bool()


def toy_text_encoder(seed=0):
    """The toy world's text encoder (toy.py): a small random T5 over ByT5's bytes, frozen like FLAN-T5 in the
    paper, so that it needs no download; train.py stores it inside the checkpoint."""
    from transformers import ByT5Tokenizer, T5Config, T5EncoderModel
    cfg = T5Config(vocab_size=384, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                   feed_forward_proj="gated-gelu", is_encoder_decoder=False)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = T5EncoderModel(cfg)
    return TextEncoder(ByT5Tokenizer(), model, max_length=40)


# -----------------------------------------------------------------------------
# 9. Checkpoints: the released state_dicts, and this project's own files


class CheckpointError(Exception):
    """A checkpoint that is missing, unreadable, or does not fit its model; the message is one line for the user."""


def load_file(path):
    """torch.load with weights_only=True (plain data only), on the CPU."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({why_unloadable(e)})") from None


def why_unloadable(error):
    """The cause in torch.load's error as one whole sentence. Its messages run to paragraphs of advice about
    weights_only, with the cause after "WeightsUnpickler error:" or in the first sentence; a file cut short can
    end in an EOFError with no text at all."""
    text = str(error)
    _, found, cause = text.partition("WeightsUnpickler error:")
    sentence = re.split(r"(?<=\.)\s|\n", (cause if found else text).strip(), maxsplit=1)[0]
    return f"{type(error).__name__}: {sentence}" if sentence else f"{type(error).__name__}: the file ends early"


def load_weights(module, state_dict, what="checkpoint"):
    """load_state_dict that reports every missing, unexpected or misshapen key in one CheckpointError."""
    own = module.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    misshapen = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
                 if k in state_dict and state_dict[k].shape != v.shape]
    if missing or unexpected or misshapen:
        show = lambda keys: ", ".join(keys[:4]) + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")
        parts = [f"{name} {show(keys)}" for name, keys in
                 (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshapen)) if keys]
        raise CheckpointError(f"{what} does not match the model config: " + "; ".join(parts))
    module.load_state_dict(state_dict)
    return module


def unset_module(cls, *cfg):
    """`cls(*cfg)` with its weights allocated on the CPU but not initialised, for load_weights to fill (it checks
    that every key is there): the random initialisation of the XL DiT alone takes longer than reading its file."""
    with torch.device("meta"):
        module = cls(*cfg)
    return module.to_empty(device="cpu")


def is_project_checkpoint(ckpt):
    return isinstance(ckpt, dict) and ckpt.get("format") == "ezaudio"


def dit_from_checkpoint(ckpt, cfg=None, name="checkpoint"):
    """An EzAudioDiT from a loaded released checkpoint (state_dict under 'model'; give its `cfg`) or one of this
    project's checkpoints (which carries its config; EMA weights are used when present)."""
    if is_project_checkpoint(ckpt):
        if ckpt["config"].get("dit") is None:
            raise CheckpointError(f"{name}: a VAE checkpoint, not a DiT; pass it with --vae")
        cfg = config_from_dict(DiTConfig, ckpt["config"]["dit"])
        state = ckpt.get("ema") or ckpt["model"]
    elif isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict):
        state = ckpt["model"]
    else:
        raise CheckpointError(f"{name}: neither an EzAudio checkpoint nor an ezaudio training checkpoint")
    if cfg is None:
        raise CheckpointError(f"{name}: a released-format DiT checkpoint needs its config (--dit-config)")
    return load_weights(unset_module(EzAudioDiT, cfg), state, name)


def vae_from_checkpoint(ckpt, cfg=None, name="checkpoint"):
    """A WaveformVAE from the loaded released file (state_dict under 'state_dict', keys prefixed 'autoencoder.',
    other prefixes ignored) or from this project's checkpoints that hold a VAE."""
    if is_project_checkpoint(ckpt) and ckpt.get("vae") is not None:
        cfg, state = config_from_dict(VAEConfig, ckpt["config"]["vae"]), ckpt["vae"]
    elif isinstance(ckpt, dict) and isinstance(ckpt.get("state_dict"), dict):
        prefix = "autoencoder."
        state = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    else:
        raise CheckpointError(f"{name}: not a VAE checkpoint (expected 'state_dict' with 'autoencoder.' keys)")
    return load_weights(unset_module(WaveformVAE, cfg or VAE_PRESETS["released"]), state, name)


def check_controlnet_fits(latent_dim, dim, blocks, dit_cfg, name):
    """CheckpointError unless a ControlNet of this latent size, width and number of in-blocks can steer the DiT."""
    ours = (dit_cfg.latent_dim, dit_cfg.dim, dit_cfg.depth // 2)
    if (latent_dim, dim, blocks) != ours:
        raise CheckpointError(f"{name}: a ControlNet for latent size {latent_dim}, width {dim} and {blocks} in-blocks "
                              f"does not fit the DiT (latent size {ours[0]}, width {ours[1]}, {ours[2]} in-blocks); "
                              "pass the ControlNet trained for this DiT with --controlnet")


def controlnet_from_checkpoint(ckpt, dit_cfg, name="checkpoint"):
    """A ControlNet for the DiT of config `dit_cfg` from a loaded file: released ({'model': state_dict}, as
    ckpts/controlnet/s3_l_energy.pt, whose condition is ControlConfig's defaults) or train.py's control stage (its
    EMA when it kept one, and its own ControlConfig)."""
    control = None
    if is_project_checkpoint(ckpt) and ckpt.get("stage") == "control":
        control = config_from_dict(ControlConfig, ckpt["config"]["control"])
        ckpt = {"model": ckpt["ema"] or ckpt["model"]}
    state = ckpt.get("model") if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not {"patch_embed.proj.weight", "controlnet_pre.conv_in.weight"} <= state.keys():
        raise CheckpointError(f"{name}: not a ControlNet checkpoint (expected 'model' with controlnet_pre keys)")
    dim, channels = state["patch_embed.proj.weight"].shape[:2]  # channels: 2C + 1
    blocks = sum(k.startswith("controlnet_zero_blocks.") and k.endswith(".weight") for k in state)
    check_controlnet_fits((channels - 1) // 2, dim, blocks, dit_cfg, name)
    return load_weights(unset_module(ControlNet, dit_cfg, control), state, name)


# -----------------------------------------------------------------------------
# 10. The pipeline: text to audio, audio editing, and audio that follows a reference

HUB_REPO = "OpenSound/EzAudio"
MODELS = {  # the names --model takes: `hub_file`, a released DiT in HUB_REPO, with its preset and text encoder;
    # or `file`, one of this project's checkpoints (which carry their configs), relative to this folder; and a
    # `controlnet` of the same origin where the model has one
    "s3_xl": dict(hub_file="ckpts/s3/ezaudio_s3_xl.pt", dit="XL", text_encoder="google/flan-t5-xl"),
    "s3_l": dict(hub_file="ckpts/s3/ezaudio_s3_l.pt", dit="L", text_encoder="google/flan-t5-large",
                 controlnet="ckpts/controlnet/s3_l_energy.pt"),
    # the toy world's model (toy.py), trained on a CPU by the README's recipe; `sampling` replaces the paper's
    # defaults in sample.py: its clips are 2 s long, and its recipe was tuned at CFG 3 (on seeds 2000-2009)
    "toy": dict(file="assets/toy.pt", controlnet="assets/toy_control.pt", sampling=dict(duration=2.0, guidance=3.0)),
}
SAMPLING = dict(duration=10.0, steps=100, guidance=5.0, rescale=0.75, eta=1.0)  # the paper's (Sec. III)
CONTROL_SAMPLING = dict(steps=50, guidance=3.5, rescale=0.0)  # the published ControlNet pipeline's
RELEASED_VAE = "ckpts/vae/1m.pt"


def hub_file(filename, flag):
    """Local path of a file of the released repo: the Hugging Face cache's copy (used without asking the network),
    else downloaded into the cache. `flag` is the command-line option that gives a local file instead."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    cached = try_to_load_from_cache(HUB_REPO, filename)
    if isinstance(cached, str):
        return cached
    try:
        return hf_hub_download(HUB_REPO, filename)
    except Exception as e:
        raise CheckpointError(f"{filename} of the hub repo {HUB_REPO} is not in the Hugging Face cache and cannot be "
                              f"downloaded ({type(e).__name__}); connect to the internet once to download it, "
                              f"or pass a local file with {flag} ({flag[2:].replace('-', '_')}= in Python); "
                              "offline, --model toy (from_pretrained(\"toy\")) runs the small model that ships "
                              "with ezaudio") from None


def read_config(path, kind):
    """The config of a released-format file: kind "dit" reads the `model` block of an EzAudio YAML config
    (ezaudio-xl.yml), kind "vae" a VAE JSON config (ckpts/vae/config.json)."""
    try:
        with open(path) as f:
            return DiTConfig.from_official(yaml.safe_load(f)["model"]) if kind == "dit" else \
                VAEConfig.from_official(json.load(f))
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read it ({e.strerror})") from None
    except (yaml.YAMLError, LookupError, TypeError, ValueError) as e:  # json's errors are ValueErrors
        what = "an EzAudio YAML config with a `model` block" if kind == "dit" else "a VAE JSON config"
        raise CheckpointError(f"{path}: not {what} ({type(e).__name__}: {str(e).partition(chr(10))[0]})") from None


def model_controlnet(model, what):
    """The ControlNet file of MODELS[model], else a CheckpointError saying that `what` has none."""
    if model not in MODELS or "controlnet" not in MODELS[model]:
        fits = ", ".join(f"--model {name}" for name, spec in MODELS.items() if "controlnet" in spec)
        raise CheckpointError(f"{what} has no ControlNet of its own (there is one for {fits}); pass one with "
                              "--controlnet")
    return MODELS[model]["controlnet"]


def local_file(path):
    """A path relative to this file's folder, where the toy model ships."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), path)


def guess_released_model(state):
    """The name in MODELS of the released DiT whose shapes a released-format state_dict has, or None."""
    for name, spec in MODELS.items():
        if "dit" in spec:
            with torch.device("meta"):
                own = EzAudioDiT(DIT_PRESETS[spec["dit"]]).state_dict()
            if own.keys() == state.keys() and all(own[k].shape == state[k].shape for k in own):
                return name
    return None


def default_device():
    if torch.cuda.is_available():
        return "cuda"
    return "mps" if torch.backends.mps.is_available() else "cpu"


def usable_device(device, dtype):
    """torch.device(device or default_device()), checked to exist here and to support `dtype`."""
    name = device or default_device()
    try:
        device = torch.device(name)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:  # AssertionError: torch built without CUDA
        raise ValueError(f"device {str(name)!r} is not usable here ({str(e).partition(chr(10))[0]}); "
                         "leave --device out to take cuda, then mps, then cpu") from None
    if dtype == torch.float16 and device.type == "cpu":
        raise ValueError("float16 runs on a GPU only; on the CPU use bfloat16 or float32 (--dtype bf16 or fp32)")
    return device


def gate_reference(audio, gate=0.0):
    """A reference clip (T,) as the published ControlNet pipeline prepares it: peak-normalised, and samples at or
    below `gate` (its `surpass_noise`) set to 0. ValueError when nothing is left, since silence has no loudness to
    follow; sample.py calls this before minutes of model loading, too."""
    audio = audio / (audio.abs().max() + 1e-9)
    audio = torch.where(audio.abs() > gate, audio, 0.0)
    if not audio.any():
        raise ValueError("the reference is silent" + (f" (no sample above the gate {gate:g})" if gate > 0 else ""))
    return audio


def memory_of(device):
    """Bytes of memory on `device`: a GPU's own, else the machine's."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_duration(seconds, vae_cfg, device, batch=1, what="the duration"):
    """ValueError unless `batch` clips of `seconds` fit in the memory of `device`. The measure is the VAE decoder's
    widest layer, which holds channels x samples in float32 at least once: for the released VAE 128 channels at
    24 kHz, 12 MB per second of audio, so about 10 000 s per 128 GB. It needs no model, so that sample.py can refuse
    an impossible length before minutes of loading rather than after minutes of swapping."""
    if not 0 < seconds < math.inf:
        raise ValueError(f"{what} must be a finite number of seconds > 0, not {seconds:g}")
    widths = [vae_cfg.channels * m for m in (1, *vae_cfg.c_mults)]
    rates = [vae_cfg.sample_rate / math.prod(vae_cfg.strides[:i]) for i in range(len(widths))]
    channels, rate = max(zip(widths, rates), key=lambda wr: wr[0] * wr[1])
    need, memory = 4 * channels * rate * seconds * batch, memory_of(device)
    if need > memory:
        raise ValueError(f"{what} ({seconds:g} s{f' x {batch} samples' if batch > 1 else ''}) would need at least "
                         f"{need / 1e9:.4g} GB, more than the {memory / 1e9:.4g} GB of {device.type} memory here: "
                         f"the VAE decoder holds {channels} channels x {rate:g} samples a second in float32; at "
                         f"most {memory / need * seconds:.0f} s at a time")


def check_edit_mask(seconds, mask_start, mask_length, boundary, vae_cfg, device):
    """ValueError unless the mask starts within a clip of `seconds` (or at its end: outpainting) and is not empty,
    and the clip it makes fits in memory. It needs only the clip's length, so that sample.py can check it before
    minutes of model loading."""
    if not (0 <= mask_start <= seconds and mask_length > 0 and boundary >= 0):
        raise ValueError(f"the mask [{mask_start:g}, {mask_start + mask_length:g}) s must start within the "
                         f"{seconds:.2f} s clip (or at its end) and have a positive length, with a boundary >= 0")
    check_duration(max(seconds, mask_start + mask_length), vae_cfg, device, what="the edited clip's length")


def cast_parameters(module, dtype):
    """module with its parameters (None: kept) in dtype and its buffers as they were: RoPE's inverse frequencies in
    bfloat16 would turn the angle at frame 500 (10 s) by up to a radian."""
    if dtype is not None:
        for p in module.parameters():
            p.data = p.data.to(dtype)
    return module


class EzAudio:
    """Text encoder, DiT, VAE and sampler in one object: `generate` turns prompts into audio (following a reference
    clip's loudness when a ControlNet is given), `edit` regenerates a span of an existing clip. Waveforms are float32
    tensors at `sample_rate`. With `dtype` bfloat16 or float16 the DiT and ControlNet run under autocast, as the
    published pipeline runs them (float16); the text encoder and VAE stay float32. A DiT without text (stage 1,
    context_dim 0) takes no text encoder and only the empty prompt.
    `fast`: the DiT and ControlNet hold their weights in `dtype` instead (no casts at every step; the residual
    stream and LayerNorms then round to `dtype` too), and on a GPU each sampling step is one CUDA graph replay."""

    def __init__(self, dit, vae, text_encoder=None, device=None, dtype=torch.float32, sampling=None,
                 controlnet=None, fast=False):
        width = text_encoder.dim if text_encoder is not None else 0
        if dit.cfg.context_dim != width:
            raise CheckpointError(f"the text encoder's width {width} does not match the DiT's "
                                  f"context_dim {dit.cfg.context_dim}; pass the matching --text-encoder")
        if dit.cfg.latent_dim != vae.cfg.latent_dim:
            raise CheckpointError(f"the VAE's latent_dim {vae.cfg.latent_dim} does not match the DiT's "
                                  f"{dit.cfg.latent_dim}; pass the matching --vae")
        if controlnet is not None:
            check_controlnet_fits(controlnet.cfg.latent_dim, controlnet.cfg.dim, len(controlnet.in_blocks), dit.cfg,
                                  "the ControlNet")
            control = controlnet.control
            if control.hop * 2 ** (len(control.cond_blocks) - 1) != vae.cfg.hop:
                raise CheckpointError(f"the ControlNet's condition, in frames of {control.hop} samples brought to the "
                                      f"latent rate by {len(control.cond_blocks) - 1} halvings, does not fit the "
                                      f"VAE's hop of {vae.cfg.hop} samples")
        self.device, self.dtype, self.fast = usable_device(device, dtype), dtype, fast
        weights = dtype if fast else None
        self.dit = cast_parameters(dit.to(self.device).eval(), weights)
        self.controlnet = None if controlnet is None else cast_parameters(controlnet.to(self.device).eval(), weights)
        self.vae = vae.to(self.device).eval().fold_weight_norm()
        self.text_encoder = text_encoder.to(self.device) if text_encoder is not None else None
        self.diffusion = Diffusion().to(self.device)
        self.sample_rate, self.hop = vae.cfg.sample_rate, vae.cfg.hop
        self.sampling = sampling or {}  # the model's own defaults for generate(), over the paper's

    @classmethod
    def from_pretrained(cls, model="s3_xl", ckpt=None, dit_config=None, vae=None, vae_config=None,
                        text_encoder=None, device=None, dtype=torch.float32, controlnet=None, fast=False):
        """A model of MODELS by name (released files come from the hub and are cached), or local files, as
        sample.py's flags name them:
          ckpt          one of this project's checkpoints (it carries its configs) or a released-format DiT
          dit_config    of a released-format DiT: a DiTConfig or an EzAudio YAML file; EzAudio-L and XL shapes
                        are recognised without it
          vae           a released-format VAE or a project checkpoint holding one; by default the checkpoint's
                        own, else the one it names, else the released one
          vae_config    of a released-format VAE: a VAEConfig or its JSON file; by default a config.json beside
                        the --vae file, else the config the checkpoint holds, else the released one
          text_encoder  a hub name or a save_pretrained folder; by default the one the checkpoint holds or names
          controlnet    True: the model's own ControlNet (EzAudio-L's is downloaded on first use; the toy's ships
                        here), also of a --ckpt with a released model's shapes; or a local file, released-format or
                        a run of train.py --stage control (which, given as ckpt, brings the DiT it names)"""
        device = usable_device(device, dtype)  # before minutes of loading
        known = sampling = None  # the name in MODELS of the DiT, given or recognised by its shapes
        if ckpt is None:
            if model not in MODELS:
                raise CheckpointError(f"unknown model {model!r}; choose one of {', '.join(MODELS)}")
            known, spec, sampling = model, MODELS[model], MODELS[model].get("sampling")
            if controlnet is True:
                model_controlnet(model, f"the model {model}")  # before the DiT's download
            if "file" in spec:
                ckpt = local_file(spec["file"])
            else:
                ckpt, dit_config = hub_file(spec["hub_file"], "--ckpt"), dit_config or DIT_PRESETS[spec["dit"]]
                text_encoder = text_encoder or spec["text_encoder"]
        ck = load_file(ckpt)
        if is_project_checkpoint(ck) and ck.get("stage") == "control":  # train.py's ControlNet names the DiT it steers
            controlnet, ckpt = controlnet if isinstance(controlnet, (str, os.PathLike)) else ckpt, ck["config"]["base"]
            ck = load_file(ckpt)
        config = ck["config"] if is_project_checkpoint(ck) else {}
        if isinstance(dit_config, (str, os.PathLike)):
            dit_config = read_config(dit_config, "dit")
        if not config and isinstance(ck, dict) and isinstance(ck.get("model"), dict):
            known = guess_released_model(ck["model"])
            if known is not None and dit_config is None:
                dit_config = DIT_PRESETS[MODELS[known]["dit"]]
                text_encoder = text_encoder or MODELS[known]["text_encoder"]
        dit = dit_from_checkpoint(ck, dit_config, ckpt)
        if controlnet is True:
            name = model_controlnet(known, ckpt)
            controlnet = local_file(name) if "file" in MODELS[known] else hub_file(name, "--controlnet")
        if controlnet is not None:
            controlnet = controlnet_from_checkpoint(load_file(controlnet), dit.cfg, controlnet)
        if isinstance(vae_config, (str, os.PathLike)):
            vae_config = read_config(vae_config, "vae")
        if vae is not None:
            vae_ck, beside = load_file(vae), os.path.join(os.path.dirname(os.fspath(vae)), "config.json")
            if vae_config is None and not is_project_checkpoint(vae_ck) and os.path.isfile(beside):
                vae_config = read_config(beside, "vae")
            vae = vae_from_checkpoint(vae_ck, vae_config, vae)
        elif ck.get("vae") is not None:  # a project checkpoint carrying its own VAE
            vae = vae_from_checkpoint(ck, name=ckpt)
        else:
            path = config.get("vae_path") or hub_file(RELEASED_VAE, "--vae")
            if not os.path.isfile(path):
                raise CheckpointError(f"{path}, the VAE that {ckpt} names, is missing; pass the VAE with --vae")
            if vae_config is None and config.get("vae"):
                vae_config = config_from_dict(VAEConfig, config["vae"])
            vae = vae_from_checkpoint(load_file(path), vae_config, path)
        if text_encoder is not None:
            text_encoder = TextEncoder.from_pretrained(text_encoder)
        elif ck.get("text_encoder") is not None:  # a small text encoder saved inside the checkpoint (toy)
            text_encoder = TextEncoder.from_state(ck["text_encoder"])
        elif config.get("text_encoder"):
            text_encoder = TextEncoder.from_pretrained(config["text_encoder"])
        elif dit.cfg.context_dim:
            raise CheckpointError(f"{ckpt}: no text encoder is named; pass one with --text-encoder")
        return cls(dit, vae, text_encoder, device, dtype, sampling, controlnet, fast)

    def guided(self, prompts, guidance):
        """Whether these prompts are sampled with classifier-free guidance. As in the published pipeline, not an
        all-empty batch and not guidance 0; nor guidance 1, which is the text alone; nor a model without text."""
        return self.text_encoder is not None and any(prompts) and guidance not in (0, 1)

    def _sample(self, prompts, generators, negative, guidance, **kw):
        """Latents for a batch of prompts, sample i drawing its noise from generators[i]."""
        if self.text_encoder is None and any(prompts):
            raise ValueError('this model has no text conditioning (a stage-1 checkpoint); give the empty prompt ""')
        context = mask = neg_context = neg_mask = None
        if self.text_encoder is not None:
            context, mask = self.text_encoder(prompts)
            if self.guided(prompts, guidance):
                neg_context, neg_mask = self.text_encoder([negative] * len(prompts))
        return self.sample_latents(context, mask, neg_context, neg_mask, guidance=guidance, generator=generators,
                                   batch=len(prompts), **kw)

    def sample_latents(self, context, context_mask, neg_context=None, neg_mask=None, **kw):
        """Diffusion.sample with this model's DiT, in its precision: under autocast, or fast (see the class)."""
        capture = cuda_graph if self.fast and self.device.type == "cuda" else None
        with torch.autocast(self.device.type, self.dtype, enabled=self.dtype != torch.float32 and not self.fast):
            return self.diffusion.sample(self.dit, context, context_mask, neg_context, neg_mask, capture=capture, **kw)

    def control_condition(self, audio, length, gate):
        """The ControlNet's condition (1, 1, F) for `length` latent frames from a reference clip (T,) at
        `sample_rate`, prepared as the published pipeline prepares it: `gate_reference`, then padded with zeros or
        cut to the length. Also the number of output samples the reference covers."""
        if self.controlnet is None:
            raise ValueError("this model has no ControlNet; load one with EzAudio.from_pretrained(controlnet=...)")
        audio = torch.as_tensor(audio, dtype=torch.float32).flatten()
        if audio.numel() < self.hop:
            raise ValueError(f"the reference is shorter than one latent frame ({self.hop / self.sample_rate:g} s)")
        control, samples = self.controlnet.control, length * self.hop
        if samples <= (control.window - control.hop) // 2:  # the envelope's reflection padding needs that much
            raise ValueError(f"a controlled sample must be longer than {(control.window - control.hop) // 2} "
                             f"samples ({(control.window - control.hop) / 2 / self.sample_rate:g} s)")
        audio = gate_reference(audio, gate)
        padded = F.pad(audio, (0, max(samples - audio.numel(), 0)))[:samples]
        return energy_envelope(padded.to(self.device)[None], control), min(audio.numel(), samples)

    @torch.inference_mode()
    def generate(self, prompts, duration=None, steps=None, guidance=None, rescale=None, eta=None, seed=0,
                 negative="", control=None, control_scale=1.0, gate=0.0, progress=False):
        """Prompts (list of str) -> audio (B, T), T = duration * sample_rate rounded to whole latent frames.
        `seed` is one seed for every prompt or a list of one per prompt; a prompt and seed give the same audio
        alone as in a batch (up to float rounding).
        With a ControlNet, `control` is a reference clip (T,) at `sample_rate` whose loudness every prompt's audio
        follows, `control_scale` the strength, `gate` as in `gate_reference`; the audio is cut to the reference's
        length. What is left out is the paper's (10 s, 100 DDIM steps, CFG 5, rescale 0.75, eta 1), with a control
        the published ControlNet pipeline's (50 steps, CFG 3.5, rescale 0), unless the model has its own (the toy's:
        2 s, no guidance)."""
        given = dict(duration=duration, steps=steps, guidance=guidance, rescale=rescale, eta=eta)
        defaults = {**SAMPLING, **(CONTROL_SAMPLING if control is not None else {}), **self.sampling}
        duration, steps, guidance, rescale, eta = (given[k] if given[k] is not None else defaults[k] for k in given)
        seeds = [seed] * len(prompts) if isinstance(seed, int) else list(seed)
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        check_duration(duration, self.vae.cfg, self.device, len(prompts))
        length = max(1, round(duration * self.sample_rate / self.hop))
        kw, keep = {}, length * self.hop
        if control is not None:
            condition, keep = self.control_condition(control, length, gate)
            kw = dict(controlnet=self.controlnet, condition=condition.expand(len(prompts), -1, -1),
                      control_scale=control_scale)
        generators = [torch.Generator(self.device).manual_seed(s) for s in seeds]
        latents = self._sample(prompts, generators, negative, guidance, length=length, steps=steps,
                               rescale=rescale, eta=eta, progress=progress, **kw)
        return self.vae.decode(latents)[:, 0, :keep].cpu()

    @torch.inference_mode()
    def edit(self, audio, prompt, mask_start, mask_length, boundary=2.0, steps=100, guidance=3.5, rescale=0.0,
             eta=1.0, seed=0, negative="", progress=False):
        """Regenerate `mask_length` seconds of `audio` (T,) from `mask_start` on to fit `prompt`, keeping the rest,
        as the published editing pipeline does: the clip is peak-normalised; a window reaching `boundary` seconds
        (at most half the mask length) beyond the mask on each side is encoded, its masked latent frames are
        sampled anew and the known ones kept, and it is decoded back into place. A mask running past the end first
        pads the clip with silence (outpainting). Returns the whole edited clip (T',)."""
        sr, frame_rate = self.sample_rate, self.sample_rate / self.hop
        audio = torch.as_tensor(audio, dtype=torch.float32).flatten()
        seconds, mask_end = audio.numel() / sr, mask_start + mask_length
        check_edit_mask(seconds, mask_start, mask_length, boundary, self.vae.cfg, self.device)
        audio = audio / (audio.abs().max() + 1e-9)
        if mask_end > seconds:
            audio = F.pad(audio, (0, round((mask_end - seconds) * sr)))
            seconds = audio.numel() / sr
        boundary = min(boundary, mask_length / 2)
        w0, w1 = max(mask_start - boundary, 0), min(mask_end + boundary, seconds)  # the window, in seconds
        # samples s0:s1, in whole latent frames as far as the clip reaches (the published pipeline needs them whole)
        s0 = round(w0 * sr)
        s1 = min(s0 + math.ceil((round(w1 * sr) - s0) / self.hop) * self.hop, audio.numel())
        window = F.pad(audio[s0:s1], (0, -(s1 - s0) % self.hop)).to(self.device)[None, None]  # (1, 1, T)
        # one stream for the posterior sample, then the sampler: from two streams of one seed, the two would be the
        # same tensor
        generator = torch.Generator(self.device).manual_seed(seed)
        gt = self.vae.encode(window, generator=generator)  # (1, C, L)
        f0, f1 = round((mask_start - w0) * frame_rate), round((mask_end - w0) * frame_rate)
        if f1 <= f0:
            raise ValueError(f"the mask must cover at least one latent frame ({1 / frame_rate:g} s)")
        frames = torch.arange(gt.shape[-1], device=self.device)
        mask = ((frames >= f0) & (frames < f1))[None, None]  # (1, 1, L), True = regenerate
        latents = self._sample([prompt], [generator], negative, guidance, steps=steps, rescale=rescale, eta=eta,
                               gt=gt, mask=mask, progress=progress)
        audio[s0:s1] = self.vae.decode(latents)[0, 0, : s1 - s0].cpu()
        return audio
