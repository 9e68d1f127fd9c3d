"""
How fast EzAudio trains and samples, for one preset, device and dtype (in the manner of nanoGPT's bench.py):

  train    one DiT training step (forward, backward, AdamW, gradient clipping): ms/step, samples/s, latent
           frames/s, peak memory, model FLOP/s and, on a GPU, the model-FLOPs utilisation (MFU). The frozen text
           encoder is left out: the step gets a random context of 100 tokens, 20 of them unpadded;
  sample   generating a clip with CFG, split into text encoding, the DiT loop and the VAE decode: seconds and the
           real-time factor (RTF, seconds of compute per second of audio; below 1 is faster than real time);
  vae      VAE encode and decode of a clip, in multiples of real time.

Every model has random weights (speed does not depend on their values), so nothing is downloaded: the text encoder
is the toy's own for `toy`, a random T5 of FLAN-T5-large / -xl shape for L / XL, else a small random T5, over
ByT5's byte vocabulary and padded to the pipeline's 100 tokens (40 for toy) as the real tokenizer's output is.
Each number is the median of --iters runs after --warmup runs. The defaults are quick on a CPU; the paper's
setting is a 10 s clip with 100 steps:

    python bench.py --preset tiny
    python bench.py --preset XL --device cuda --duration 10 --steps 100
    python bench.py --preset XL --device cuda --duration 10 --steps 100 --what sample --fast
    python bench.py --preset L --device cuda --batch 16 --what train
"""

import platform
import resource
import statistics
import time

import torch

from ezaudio import (DIT_PRESETS, VAE_PRESETS, Diffusion, EzAudio, EzAudioDiT, TextEncoder, WaveformVAE,
                     default_device, diffusion_loss, toy_text_encoder, usable_device)
from sample import DTYPES, Parser

# -----------------------------------------------------------------------------
# FLOPs of the DiT, counted layer by layer


def dit_flops(cfg, length, context_length):
    """Forward FLOPs of the DiT for one sample of `length` latent frames and `context_length` text tokens: every
    matrix multiply (and the convolutions, which are matrix multiplies too) at 2 FLOPs per multiply-add, as
    torch.utils.flop_counter counts them. Training costs three times this (the backward pass does twice the work)."""
    D, L, Lc, C = cfg.dim, length, context_length, cfg.latent_dim
    hidden = int(D * cfg.mlp_ratio)
    block = (4 * D * D * L  # q, k, v and proj of self-attention
             + 2 * L * L * D  # attention scores and the weighted sum of values
             + 3 * D * hidden * L  # GEGLU: D -> 2 hidden, hidden -> D
             + 6 * cfg.sola_rank * 7 * D)  # AdaLN-SOLA's low-rank update, once per sample: D -> 6r -> 6D
    if cfg.context_dim:  # cross-attention: q and proj on the frames, k and v on the text, attention between them
        block += 2 * D * D * L + 2 * D * D * Lc + 2 * L * Lc * D
    n_blocks, n_skips = 2 * (cfg.depth // 2) + 1, cfg.depth // 2
    macs = n_blocks * block + n_skips * 2 * D * D * L  # each out-block fuses its long skip: 2D -> D
    macs += (2 * C + 1) * D * L + D * C * L + 3 * C * C * L  # patch embed, final linear, final conv (kernel 3)
    macs += 256 * D + D * D + 6 * D * D + 2 * D * D  # timestep MLP from the 256-dim sinusoid, time_ada, time_ada_final
    if cfg.context_dim:
        macs += (cfg.context_dim * D + D * D) * Lc  # context_embed
    return 2 * macs


# -----------------------------------------------------------------------------
# Timing


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn, device, warmup, iters):
    """Median wall time of fn() over `iters` runs, after `warmup` untimed runs; also returns fn's last result."""
    for _ in range(warmup):
        out = fn()
    times = []
    for _ in range(iters):
        synchronize(device)
        start = time.perf_counter()
        out = fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def reset_peak_memory(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device):
    """Peak memory since the last reset_peak_memory on a GPU; on a CPU, the process's peak resident size so far."""
    if device.type == "cuda":
        return f"peak memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"
    return f"peak RSS of the process {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB"


def autocast(device, dtype):
    return torch.autocast(device.type, dtype, enabled=dtype != torch.float32)


# -----------------------------------------------------------------------------
# Random models of the preset's shapes

FLAN_T5 = {  # width -> encoder shape of the FLAN-T5 that the released models use
    1024: dict(d_kv=64, d_ff=2816, num_layers=24, num_heads=16),  # google/flan-t5-large (EzAudio-L)
    2048: dict(d_kv=64, d_ff=5120, num_layers=24, num_heads=32),  # google/flan-t5-xl (EzAudio-XL)
}


def random_text_encoder(preset, width, device):
    """The toy's own text encoder, a FLAN-T5-shaped random encoder for L / XL, else a small 2-layer T5."""
    if preset in ("toy", "toy-small"):
        return toy_text_encoder().to(device)
    from transformers import ByT5Tokenizer, T5Config, T5EncoderModel
    shape = FLAN_T5.get(width, dict(d_kv=width // 4, d_ff=2 * width, num_layers=2, num_heads=4))
    cfg = T5Config(vocab_size=384, d_model=width, feed_forward_proj="gated-gelu", is_encoder_decoder=False, **shape)
    with torch.device(device):
        return TextEncoder(ByT5Tokenizer(), T5EncoderModel(cfg))


def random_dit(cfg, device):
    with torch.device(device):
        return EzAudioDiT(cfg)


# -----------------------------------------------------------------------------
# The benchmarks


def bench_train(args, device, dtype):
    cfg = DIT_PRESETS[args.preset]
    dit = random_dit(cfg, device).train()
    dit.model.grad_checkpointing = args.grad_checkpointing
    diffusion = Diffusion().to(device)
    optimizer = torch.optim.AdamW(dit.parameters(), lr=1e-4, weight_decay=0.01, fused=device.type in ("cuda", "cpu"))
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    if args.compile:
        dit.compile()
    B, L, Lc = args.batch, args.length, 100
    x0 = torch.randn(B, cfg.latent_dim, L, device=device)
    context = torch.randn(B, Lc, cfg.context_dim, device=device) if cfg.context_dim else None
    # captions fill about 20 of the 100 tokens, so training attends with a padding mask
    context_mask = torch.arange(Lc, device=device)[None].expand(B, Lc) < 20 if cfg.context_dim else None

    def step():
        with autocast(device, dtype):
            loss = diffusion_loss(dit, diffusion, x0, context, context_mask)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(dit.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    reset_peak_memory(device)
    seconds, _ = median_seconds(step, device, args.warmup, args.iters)
    flops = 3 * dit_flops(cfg, L, Lc if cfg.context_dim else 0) * B / seconds
    mfu = ""
    if device.type == "cuda":
        mfu = f", MFU {flops / args.peak_flops:.1%} of {args.peak_flops / 1e12:.0f} TFLOP/s"
    print(f"train   batch {B} x {L} frames: {seconds * 1e3:.1f} ms/step, {B / seconds:.1f} samples/s, "
          f"{B * L / seconds:,.0f} latent frames/s, {flops / 1e12:.3f} model TFLOP/s{mfu}, {peak_memory(device)}")


def bench_sample(args, device, dtype):
    dit_cfg, vae_cfg = DIT_PRESETS[args.preset], VAE_PRESETS[args.vae]
    vae = WaveformVAE(vae_cfg)
    pipe = EzAudio(random_dit(dit_cfg, device), vae, random_text_encoder(args.preset, dit_cfg.context_dim, device),
                   device, dtype, fast=args.fast)
    if args.compile:
        pipe.dit.compile()
    length = max(1, round(args.duration * vae_cfg.sample_rate / vae_cfg.hop))
    prompts = ["a dog barks while a car passes by"] * args.sample_batch

    @torch.inference_mode()
    def encode_text():
        return pipe.text_encoder(prompts), pipe.text_encoder([""] * len(prompts))

    (context, mask), (neg_context, neg_mask) = encode_text()

    def dit_loop():
        return pipe.sample_latents(context, mask, neg_context, neg_mask, length=length, steps=args.steps,
                                   guidance=args.guidance)

    @torch.inference_mode()
    def decode():
        return pipe.vae.decode(latents)

    reset_peak_memory(device)
    t_text, _ = median_seconds(encode_text, device, args.warmup, args.iters)
    t_dit, latents = median_seconds(dit_loop, device, args.warmup, args.iters)
    t_vae, _ = median_seconds(decode, device, args.warmup, args.iters)
    total, audio_seconds = t_text + t_dit + t_vae, args.sample_batch * length * vae_cfg.hop / vae_cfg.sample_rate
    cfg_note = f"CFG {args.guidance:g}" if args.guidance != 1 else "no CFG"
    print(f"sample  {args.sample_batch} x {audio_seconds / args.sample_batch:.2f} s ({length} frames), {args.steps} "
          f"steps, {cfg_note}: text {t_text:.3f} s + DiT {t_dit:.3f} s ({t_dit / args.steps * 1e3:.1f} ms/step) + "
          f"VAE decode {t_vae:.3f} s = {total:.3f} s, RTF {total / audio_seconds:.3f}, {peak_memory(device)}")


def bench_vae(args, device):
    cfg = VAE_PRESETS[args.vae]
    with torch.device(device):
        vae = WaveformVAE(cfg).eval().fold_weight_norm()
    samples = max(1, round(args.duration * cfg.sample_rate / cfg.hop)) * cfg.hop
    audio = 0.1 * torch.randn(1, 1, samples, device=device)

    @torch.inference_mode()
    def encode():
        return vae.encode(audio)

    @torch.inference_mode()
    def decode():
        return vae.decode(latent)

    reset_peak_memory(device)
    t_enc, latent = median_seconds(encode, device, args.warmup, args.iters)
    t_dec, _ = median_seconds(decode, device, args.warmup, args.iters)
    seconds = samples / cfg.sample_rate
    print(f"vae     {seconds:.2f} s clip at {cfg.sample_rate} Hz: encode {seconds / t_enc:,.1f}x real time "
          f"({t_enc * 1e3:.1f} ms), decode {seconds / t_dec:,.1f}x real time ({t_dec * 1e3:.1f} ms), "
          f"{peak_memory(device)}")


# -----------------------------------------------------------------------------
# The command line


def machine(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:  # Linux names the CPU model here; platform.processor() often says only "x86_64"
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        name = platform.processor() or platform.machine()
    return f"{name} CPU, {torch.get_num_threads()} threads"


def parse_args(argv=None):
    p = Parser(description="Benchmark EzAudio's training step, sampling and VAE (random weights).")
    p.add_argument("--preset", default="tiny", choices=list(DIT_PRESETS), help="DiT preset (ezaudio.DIT_PRESETS)")
    p.add_argument("--vae", choices=list(VAE_PRESETS),
                   help="VAE preset (ezaudio.VAE_PRESETS); default: the one named like --preset, else 'released'")
    p.add_argument("--device", help="cpu, cuda, cuda:1, mps (default: cuda, then mps, then cpu)")
    p.add_argument("--dtype", choices=list(DTYPES),
                   help="autocast precision of the DiT (weights stay float32; the text encoder and VAE run in "
                        "float32, as in the pipeline); default: bf16 on cuda, fp32 elsewhere")
    p.add_argument("--what", nargs="+", default=["train", "sample", "vae"], choices=["train", "sample", "vae"],
                   help="which benchmarks to run")
    p.add_argument("--batch", type=int, default=16, help="training batch size (the released configs: 16 per GPU)")
    p.add_argument("--length", type=int, default=500, help="training clip length in latent frames (500 = 10 s)")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute each block in the backward pass")
    p.add_argument("--duration", type=float, default=1.0, help="seconds of audio to sample and to run the VAE on")
    p.add_argument("--steps", type=int, default=10, help="DDIM steps (the paper: 100)")
    p.add_argument("--guidance", type=float, default=5.0, help="CFG scale; 1 turns CFG (and its second half) off")
    p.add_argument("--sample-batch", type=int, default=1, help="clips generated at once")
    p.add_argument("--compile", action="store_true", help="torch.compile the DiT (compiling happens in the warm-up)")
    p.add_argument("--fast", action="store_true", help="sampling as sample.py --fast: the DiT's weights in --dtype, "
                   "and on CUDA each step one CUDA graph (captured anew in every timed run, so its cost is counted)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs before timing")
    p.add_argument("--iters", type=int, default=3, help="timed runs; the median is reported")
    p.add_argument("--peak-flops", type=float, default=312e12,
                   help="the GPU's peak FLOP/s at --dtype, for MFU (A100 bf16: 312e12; H100 SXM bf16: 989e12)")
    args = p.parse_args(argv)
    args.vae = args.vae or (args.preset if args.preset in VAE_PRESETS else "released")
    if min(args.batch, args.length, args.steps, args.sample_batch, args.iters) < 1 or args.duration <= 0 \
            or args.warmup < 0 or args.steps > 1000:
        p.error("--batch, --length, --steps, --sample-batch, --iters and --duration must be positive, --warmup >= 0, "
                "--steps at most 1000")
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        on_gpu = torch.device(args.device or default_device()).type == "cuda"
        args.dtype = args.dtype or ("bf16" if on_gpu else "fp32")
        dtype = DTYPES[args.dtype]
        device = usable_device(args.device, dtype)
    except (RuntimeError, ValueError) as e:  # RuntimeError: not a device name at all
        raise SystemExit(f"error: {str(e).partition(chr(10))[0]}") from None
    if DIT_PRESETS[args.preset].latent_dim != VAE_PRESETS[args.vae].latent_dim:
        raise SystemExit(f"error: the DiT preset {args.preset!r} and the VAE preset {args.vae!r} have different "
                         "latent widths; pick a matching --vae")
    torch.manual_seed(0)
    print(f"ezaudio bench: DiT {args.preset}, VAE {args.vae}, {args.dtype}, {machine(device)}, "
          f"torch {torch.__version__}" + (", compiled" if args.compile else "") + (", fast" if args.fast else ""))
    if "train" in args.what:
        bench_train(args, device, dtype)
    if "sample" in args.what:
        bench_sample(args, device, dtype)
    if "vae" in args.what:
        bench_vae(args, device)


if __name__ == "__main__":
    main()
