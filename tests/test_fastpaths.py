"""The fast paths compute what the plain paths compute: folded weight norm, the batched CFG pass, dropping an all-True
attention mask, cached rotary tables, no host synchronisation in the sampling loop, a sampling step captured once and
replayed (a CUDA graph), bf16 weights, autocast and torch.compile. Exact rewrites are held to equality or float
rounding; autocast and torch.compile are compared to float32 eager with the tolerance stated at each test. bench.py's
FLOP count is checked against PyTorch's counter. Speed itself is measured by bench.py, never asserted."""

import copy

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

import bench
import ezaudio as E
from conftest import random_dit, tiny_t5

TINY = E.DIT_PRESETS["tiny"]


def assert_close(ours, ref, rel):
    """max|ours - ref| <= rel * max|ref|"""
    err, scale = (ours.double() - ref.double()).abs().max().item(), ref.abs().max().item()
    assert err <= rel * scale, f"max error {err:.3g} > {rel:g} * {scale:.3g}"


def inputs(cfg, B=2, L=24, Lc=12, device=None):
    """Noisy latents, timesteps, text context and its mask, with padding in every sample but the first."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, cfg.latent_dim, L, generator=g).to(device)
    t = torch.arange(B, device=device) * 997 % 1000
    context = torch.randn(B, Lc, cfg.context_dim, generator=g).to(device)
    mask = torch.ones(B, Lc, dtype=torch.bool, device=device)
    mask[1:, Lc // 2:] = False
    return x, t, context, mask


def negative(cfg, B=2, Lc=5):
    """An unpadded negative prompt, shorter than the text, as T5 encodes "" for the released models."""
    return torch.randn(B, Lc, cfg.context_dim, generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module")
def dit():
    return random_dit(TINY).eval()


def test_folded_weight_norm_is_exact():
    torch.manual_seed(0)
    vae = E.WaveformVAE(E.VAE_PRESETS["tiny"]).eval()
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(0.1 * torch.randn_like(p))  # g != |v|, so the norm does work
    audio, latent = torch.randn(1, 1, 800), torch.randn(1, 8, 100)
    with torch.inference_mode():
        encoded, decoded = vae.encoder.layers(audio), vae.decode(latent)
        vae.fold_weight_norm()
        assert torch.equal(vae.encoder.layers(audio), encoded)
        assert torch.equal(vae.decode(latent), decoded)


def test_batched_cfg_matches_two_separate_passes(dit):
    """Diffusion.sample runs [text; negative] as one batch, the negative padded to the text's length."""
    x, _, context, mask = inputs(TINY)
    neg, steps, diffusion = negative(TINY), 3, E.Diffusion()
    batched = diffusion.sample(dit, context, mask, neg, None, steps=steps, guidance=5.0, rescale=0.75, eta=0.0,
                               noise=x)
    with torch.inference_mode():
        for t in diffusion.timesteps(steps).tolist():
            t_batch = torch.full((len(x),), t)
            v = E.classifier_free_guidance(dit(x, t_batch, context, mask), dit(x, t_batch, neg), 5.0, 0.75)
            x = diffusion.step(v, t, x, steps)
    assert_close(batched, x, 1e-6)


def test_all_true_mask_matches_no_mask(dit):
    """Why Diffusion.sample may drop a mask without padding (and take the faster unmasked attention kernel)."""
    x, t, context, _ = inputs(TINY)
    with torch.inference_mode():
        assert_close(dit(x, t, context, torch.ones(context.shape[:2], dtype=torch.bool)), dit(x, t, context), 1e-6)


def test_rotary_tables_made_once_per_length_and_shared(dit):
    blocks = [*dit.model.in_blocks, dit.model.mid_block, *dit.model.out_blocks]
    rotary = blocks[0].attn.rotary
    assert all(b.attn.rotary is rotary for b in blocks)
    cos, sin = rotary(24, torch.device("cpu"))
    assert rotary(24, torch.device("cpu"))[0] is cos
    assert rotary(25, torch.device("cpu"))[0].shape == (25, cos.shape[1])


def test_rotary_table_made_while_sampling_serves_training():
    dit = random_dit(TINY)
    x, t, context, mask = inputs(TINY)
    with torch.inference_mode():
        dit(x, t, context, mask)  # the table of this length is now cached
    dit(x, t, context, mask).pow(2).mean().backward()  # would fail on a table made as an inference tensor
    assert all(p.grad is not None for p in dit.model.in_blocks[0].attn.parameters())


class HostReads(TorchDispatchMode):
    """Counts the operations that copy a tensor's value to the host (on a GPU each waits for the queue to drain)."""
    OPS = {torch.ops.aten.item, torch.ops.aten.is_nonzero, torch.ops.aten._local_scalar_dense,
           torch.ops.aten.nonzero, torch.ops.aten.masked_select, torch.ops.aten.equal}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func.overloadpacket in self.OPS
        return func(*args, **(kwargs or {}))


def test_no_host_sync_inside_the_sampling_loop(dit):
    x, _, context, mask = inputs(TINY)

    def host_reads(steps):
        generators = [torch.Generator().manual_seed(s) for s in range(len(x))]
        with HostReads() as reads:
            E.Diffusion().sample(dit, context, mask, negative(TINY), None, length=x.shape[-1], steps=steps,
                                 eta=1.0, generator=generators)
        return reads.count

    assert host_reads(2) == host_reads(5)  # only what happens once, before the loop (the mask check)


def traced_once(fn):
    """What a CUDA graph does to fn, on a CPU: its Python runs once, at the first call (make_fx records the aten
    operations it launches), and every later call replays those operations on the new tensors."""
    graph = None

    def replay(*args):
        nonlocal graph
        graph = graph or make_fx(fn)(*args)
        return graph(*args)

    return replay


def guided_sample(dit, capture=None, device=None):
    """The paper's sampler (CFG 5 with rescale, eta 1: fresh noise each step) on the tiny DiT, one generator per
    sample."""
    x, _, context, mask = inputs(TINY, device=device)
    generators = [torch.Generator(device).manual_seed(s) for s in range(len(x))]
    return E.Diffusion().to(device).sample(dit, context, mask, negative(TINY).to(device), None, length=x.shape[-1],
                                           steps=4, eta=1.0, generator=generators, capture=capture)


def test_sampling_step_replayed_from_one_capture_matches_eager(dit):
    """The step that cuda_graph captures reads the timestep, the latents and the noise from its tensor arguments
    alone: replayed from a single trace it samples what eager sampling does. The noise is drawn outside the step,
    in the published order."""
    assert_close(guided_sample(dit, traced_once), guided_sample(dit), 1e-6)


def test_bf16_weights_sample_close_to_float32(dit):
    """EzAudio(fast=True): the DiT's parameters in bf16, no autocast; on a CPU no CUDA graph. The sampled latents
    measured 0.08% of max|x| from float32's (one forward: 0.5% of max|v|, as autocast), within the bf16 tolerance of
    test_autocast_close_to_float32."""
    vae, text = E.WaveformVAE(E.VAE_PRESETS["tiny"]), E.TextEncoder(*tiny_t5())
    fast = E.EzAudio(copy.deepcopy(dit), vae, text, "cpu", torch.bfloat16, fast=True)
    assert all(p.dtype == torch.bfloat16 for p in fast.dit.parameters())
    assert fast.dit.model.mid_block.attn.rotary.inv_freq.dtype == torch.float32  # RoPE's angles stay exact
    eager = E.EzAudio(dit, vae, text, "cpu")
    x, _, context, mask = inputs(TINY)
    run = lambda pipe: pipe.sample_latents(context, mask, negative(TINY), None, length=x.shape[-1], steps=4,
                                           eta=1.0, generator=[torch.Generator().manual_seed(s) for s in range(2)])
    assert_close(run(fast), run(eager), 2e-2)


def test_timestep_embedding_of_bf16_weights_computed_in_float32():
    """In bf16, t * freq near t = 999 would be off by up to 4 radians; the sinusoid is made in float32 and only then
    rounded."""
    embed = E.TimestepEmbed(64)
    t = torch.tensor([0, 500, 999])
    with torch.inference_mode():
        assert_close(E.cast_parameters(copy.deepcopy(embed), torch.bfloat16)(t), embed(t), 2e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU; "
                    "test_sampling_step_replayed_from_one_capture_matches_eager checks the same step on a CPU")
def test_cuda_graph_sampling_matches_eager():
    """The captured graph launches the kernels eager launches: float32 to 1e-5 of max|x|, as torch.compile's."""
    dit = random_dit(TINY).eval().cuda()
    assert_close(guided_sample(dit, E.cuda_graph, "cuda"), guided_sample(dit, device="cuda"), 1e-5)


@pytest.mark.parametrize("dtype,rel", [(torch.bfloat16, 2e-2), (torch.float16, 5e-3)])
def test_autocast_close_to_float32(dit, dtype, rel):
    """bf16 keeps 8 significant bits (rounding 2^-9 = 0.2%), fp16 11 (0.03%); through the tiny DiT's matmuls the
    errors measured 0.5% and 0.07% of max|v|; the tolerances allow about four times that."""
    x, t, context, mask = inputs(TINY)
    with torch.inference_mode():
        ref = dit(x, t, context, mask)
        with torch.autocast("cpu", dtype):
            out = dit(x, t, context, mask)
    assert out.dtype == dtype
    assert_close(out, ref, rel)


@pytest.mark.slow  # inductor compiles C++ kernels: about a minute on two cores
def test_compiled_sampling_matches_eager():
    """fullgraph=True also proves that the DiT's forward has no graph break, so no host synchronisation either.
    Inductor fuses elementwise work and rounds in another order: 1e-5 of max|x| (measured 3e-7)."""
    dit = random_dit(TINY).eval()
    x, _, context, mask = inputs(TINY)
    run = lambda: E.Diffusion().sample(dit, context, mask, negative(TINY), None, steps=3, eta=0.0, noise=x)
    eager = run()
    dit.compile(fullgraph=True)
    assert_close(run(), eager, 1e-5)


@pytest.mark.slow  # about 10 s to trace
def test_compiled_training_step_matches_eager():
    """The training forward and backward trace into one graph (fullgraph) with the gradients of eager mode. The
    aot_eager backend runs the traced graph with PyTorch's own kernels: inductor's kernels for training would cost
    minutes to compile on two cores, and its numerics are checked on the sampling path above."""
    dit = random_dit(TINY).train()
    x0, _, context, mask = inputs(TINY)
    diffusion = E.Diffusion()

    def loss_and_grads():
        loss = E.diffusion_loss(dit, diffusion, x0, context, mask, generator=torch.Generator().manual_seed(3))
        return [loss, *torch.autograd.grad(loss, list(dit.parameters()))]

    eager = loss_and_grads()
    dit.compile(fullgraph=True, backend="aot_eager")
    for ours, ref in zip(loss_and_grads(), eager):
        assert_close(ours, ref, 1e-6)


@pytest.mark.parametrize("preset", sorted(E.DIT_PRESETS))
def test_bench_flop_count_matches_pytorch_counter(preset):
    """bench.dit_flops (used for MFU) counts what torch.utils.flop_counter counts in a forward pass; on the meta
    device, so the XL costs nothing."""
    cfg = E.DIT_PRESETS[preset]
    with torch.device("meta"):
        dit = E.EzAudioDiT(cfg)
    x, t, context, mask = inputs(cfg, B=1, L=50, Lc=13, device="meta")
    with FlopCounterMode(display=False) as counter:
        dit(x, t, context, mask)
    assert bench.dit_flops(cfg, 50, 13) == counter.get_total_flops()


def test_bench_runs(capsys):
    bench.main(["--preset", "tiny", "--device", "cpu", "--batch", "2", "--length", "16", "--duration", "0.01",
                "--steps", "2", "--warmup", "0", "--iters", "1"])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["ezaudio", "train", "sample", "vae"]
    assert "ms/step" in lines[1] and "RTF" in lines[2] and "real time" in lines[3]


def test_bench_fast_sampling_runs(capsys):
    bench.main(["--preset", "tiny", "--device", "cpu", "--dtype", "bf16", "--duration", "0.01", "--steps", "2",
                "--warmup", "0", "--iters", "1", "--what", "sample", "--fast"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith(", fast") and "RTF" in lines[1]


def test_bench_rejects_mismatched_presets():
    with pytest.raises(SystemExit, match="^error: .*latent widths"):
        bench.main(["--preset", "L", "--vae", "tiny"])


def test_bench_rejects_more_steps_than_timesteps():
    with pytest.raises(SystemExit, match="^error: .*--steps at most 1000"):
        bench.main(["--preset", "tiny", "--steps", "1001"])
