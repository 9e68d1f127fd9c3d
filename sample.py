"""
Sample from EzAudio (arXiv 2409.10819) with the released weights: text to audio, editing, and ControlNet.

    python sample.py "a dog barks"                                  # EzAudio-XL, 10 s, the paper's defaults
    python sample.py "rain on a tin roof" "a cat meows" --num-samples 4 --seed 7
    python sample.py "a man speaks" --edit in.wav --mask-start 3 --mask-length 2   # regenerate 3 s to 5 s
    python sample.py "a dog barks" --control ref.wav                # EzAudio-L following ref.wav's loudness

One WAV per prompt and sample goes into --out, named <prompt>_s<seed>.wav (edits: <input>_<prompt>_s<seed>.wav).
Sample k of each prompt uses seed --seed + k, with a generator of its own, so `--seed S` regenerates the file
named _sS alone; the batch size changes nothing but float rounding.
"""

import argparse
import os
import re
import sys
import time
from collections import Counter

from huggingface_hub.utils import logging as hub_logging
import soundfile as sf
import torch

import ezaudio as E
from data import AudioError, read_audio

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, like every other error here
        raise SystemExit(f"error: {message} (see --help)")


def parse_args(argv=None):
    p = Parser(description=__doc__.strip().splitlines()[0], epilog=__doc__.split("\n\n", 1)[1],
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompts", nargs="+", metavar="PROMPT", help='what to hear; "" generates unconditionally')
    g = p.add_argument_group("model")
    g.add_argument("--model", choices=list(E.MODELS), help=f"downloaded from the hub repo {E.HUB_REPO} on first "
                   "use, then cached (default: s3_xl; with --control s3_l, whose ControlNet is released)")
    g.add_argument("--ckpt", metavar="PATH", help="a local DiT instead: one of this project's checkpoints, or a "
                   "released-format file (EzAudio-L and XL are recognised; others need --dit-config)")
    g.add_argument("--dit-config", metavar="FILE.yml", help="EzAudio YAML config of a released-format --ckpt")
    g.add_argument("--vae", metavar="PATH", help="a local VAE: released-format (like 1m.pt) or a project checkpoint "
                   "(default: the checkpoint's own or the one it names, else the released one)")
    g.add_argument("--vae-config", metavar="FILE.json", help="JSON config of a released-format --vae (default: "
                   "config.json beside it, else the released config)")
    g.add_argument("--text-encoder", metavar="NAME_OR_DIR", help="hub name or local folder of the T5 encoder "
                   "(default: the model's, google/flan-t5-xl for s3_xl)")
    g = p.add_argument_group("sampling (defaults: the paper's)")
    g.add_argument("--duration", type=float, help="seconds of audio (default: 10, the toy model's 2; edits keep "
                   "the input's length)")
    g.add_argument("--steps", type=int, help="DDIM steps, 1 to 1000 (default: 100, with --control 50)")
    g.add_argument("--cfg", type=float, help="classifier-free guidance scale, >= 0 (default: 5, edits and --control "
                   "3.5, toy 1); 0 or 1: the text alone, no guidance")
    g.add_argument("--rescale", type=float, help="guidance rescale, 0 to 1 (default: 0.75, edits and --control 0)")
    g.add_argument("--eta", type=float, default=1.0, help="DDIM eta, 0 to 1: 0 deterministic, 1 ancestral "
                   "(default: 1)")
    g.add_argument("--seed", type=int, default=0, help="sample k of each prompt uses seed + k (default: 0)")
    g.add_argument("--negative", default="", help='negative prompt for guidance (default: "")')
    g.add_argument("--num-samples", type=int, default=1, help="samples per prompt (default: 1)")
    g.add_argument("--batch-size", type=int, default=1, help="samples of a prompt per forward pass (default: 1; "
                   "edits run one at a time)")
    g.add_argument("--device", help="cuda, mps, cpu, ... (default: cuda, then mps, then cpu)")
    g.add_argument("--dtype", default="fp32", choices=list(DTYPES), help="the DiT's precision: bf16 and fp16 run "
                   "it under autocast, fp16 on a GPU only; text encoder and VAE stay fp32 (default: fp32)")
    g.add_argument("--compile", action="store_true", help="torch.compile the DiT: the first steps wait for the "
                   "compiler, the rest run faster; pays off for long or many samples")
    g.add_argument("--fast", action="store_true", help="the DiT's weights in --dtype rather than autocast, and on "
                   "CUDA each step replayed as one CUDA graph; with --dtype bf16 the quickest on a GPU, its numbers "
                   "within bf16 rounding of autocast's")
    g = p.add_argument_group("editing: regenerate [start, start + length) of a clip; past its end extends it")
    g.add_argument("--edit", metavar="INPUT.wav", help="the clip (any rate: resampled to the model's)")
    g.add_argument("--mask-start", type=float, metavar="S", help="where the span to regenerate starts, in seconds")
    g.add_argument("--mask-length", type=float, metavar="S", help="how long the span is, in seconds")
    g.add_argument("--boundary", type=float, default=2.0, metavar="S", help="seconds of context each side, at "
                   "most half the mask length (default: 2)")
    g = p.add_argument_group("control: audio whose loudness follows a reference clip's (EzAudio-ControlNet)")
    g.add_argument("--control", metavar="REF.wav", help="the reference (any rate and channels); the output is cut to "
                   "its length")
    g.add_argument("--control-scale", type=float, metavar="S", help="strength of the ControlNet (default: 1)")
    g.add_argument("--gate", type=float, metavar="G", help="reference samples at or below G, after peak "
                   "normalisation, count as silence (the published surpass_noise; default: 0)")
    g.add_argument("--controlnet", metavar="PATH", help="a local ControlNet: released-format, or a run of train.py "
                   "--stage control (default: the model's own, downloaded on first use)")
    g = p.add_argument_group("output")
    g.add_argument("--out", default="samples", metavar="DIR", help="folder for the WAVs (default: samples)")
    g.add_argument("--subtype", default="FLOAT", choices=["FLOAT", "PCM_16", "PCM_24"],
                   help="WAV sample format; the PCM ones clip at +-1 (default: FLOAT, 32-bit float)")
    args = p.parse_args(argv)
    editing, control = args.edit is not None, args.control is not None
    args.model = args.model or ("s3_l" if control else "s3_xl")
    # the paper's, the published pipelines' for editing and control, or the model's own
    defaults = {**E.SAMPLING, **(E.CONTROL_SAMPLING if control else {}),
                **(dict(guidance=3.5, rescale=0.0) if editing else {}), "control_scale": 1.0, "gate": 0.0}
    if args.ckpt is None and not editing:
        defaults.update(E.MODELS[args.model].get("sampling", {}))
    defaults["cfg"] = defaults.pop("guidance")
    given = {k: getattr(args, k) for k in ("steps", "cfg", "rescale", "control_scale", "gate")}
    for k, v in given.items():
        setattr(args, k, v if v is not None else defaults[k])
    problems = [
        (editing and args.duration is not None, "--duration does not apply to --edit: the output keeps the "
                                                "input's length (a mask past its end extends it)"),
        (not 1 <= args.steps <= 1000, "--steps must be 1 to 1000"),
        (args.gate < 0, "--gate must be >= 0"),
        (editing and control, "--control does not apply to --edit"),
        (not control and (args.controlnet, given["control_scale"], given["gate"]) != (None, None, None),
         "--controlnet, --control-scale and --gate need --control REF.wav"),
        (not 0 <= args.rescale <= 1, "--rescale must be 0 to 1"),
        (not 0 <= args.eta <= 1, "--eta must be 0 to 1: above 1 the DDIM step's variance would exceed the "
                                  "noise the schedule leaves, and the sample would leave the schedule"),
        (not args.cfg >= 0, "--cfg must be >= 0: below 0 guidance steers away from the prompt"),
        (args.num_samples < 1 or args.batch_size < 1, "--num-samples and --batch-size must be >= 1"),
        (not 0 <= args.seed <= 2 ** 63 - args.num_samples, "--seed must be 0 to 2^63 - 1, and so must the last "
                                                              "sample's, --seed + --num-samples - 1"),
        (editing and (args.mask_start is None or args.mask_length is None),
         "--edit needs --mask-start and --mask-length"),
        (not editing and (args.mask_start, args.mask_length) != (None, None), "--mask-start and --mask-length "
                                                                              "need --edit INPUT.wav"),
        (os.path.isfile(args.out), f"--out {args.out} is a file; name a folder (it is made if missing)"),
    ]
    names = Counter(file_name(prompt, args.seed + k, args.edit) for prompt in args.prompts
                    for k in range(args.num_samples))
    twice = next((name for name, n in names.items() if n > 1), None)
    problems.append((twice, f"two prompts would both write {twice}; make them differ (--num-samples gives more "
                            "samples of one prompt)"))
    for bad, message in problems:
        if bad:
            p.error(message)
    args.duration = args.duration if args.duration is not None else defaults["duration"]
    return args


def file_name(prompt, seed, edit=None):
    slug = re.sub(r"\W+", "_", prompt.lower()).strip("_")[:80] or ("untitled" if prompt else "unconditional")
    if edit:
        slug = f"{os.path.splitext(os.path.basename(edit))[0]}_{slug}"
    return f"{slug}_s{seed}.wav"


def write_wav(path, audio, sample_rate, subtype):
    """Through a temporary file in the same folder, so that an interrupted run leaves no half-written WAV."""
    peak = audio.abs().max().item()
    if subtype != "FLOAT" and peak > 1:
        print(f"warning: {path} clips: its peak {peak:.2f} exceeds the {subtype} range; --subtype FLOAT keeps it",
              file=sys.stderr)
    sf.write(path + ".tmp", audio.numpy(), sample_rate, subtype=subtype, format="WAV")
    os.replace(path + ".tmp", path)


def clip_seconds(path):
    """Seconds of the --edit clip from its header alone, so that a bad file or a mask outside the clip fails before
    minutes of model loading. Where soundfile cannot open it, read_audio says why in one line."""
    try:
        info = sf.info(str(path))
    except sf.SoundFileError:
        info = None
    if info is None or info.frames == 0:
        read_audio(path, 1)  # raises an AudioError that says why
    return info.duration


def samples(model, args, prompt):
    """(seed, waveform) for every sample of one prompt."""
    seeds = range(args.seed, args.seed + args.num_samples)
    kw = dict(steps=args.steps, guidance=args.cfg, rescale=args.rescale, eta=args.eta, negative=args.negative,
              progress=True)
    if args.edit:
        clip = read_audio(args.edit, model.sample_rate)
        for seed in seeds:
            yield seed, model.edit(clip, prompt, args.mask_start, args.mask_length, args.boundary, seed=seed, **kw)
        return
    if args.control:
        kw.update(control=read_audio(args.control, model.sample_rate), control_scale=args.control_scale,
                  gate=args.gate)
    for i in range(0, len(seeds), args.batch_size):
        batch = seeds[i: i + args.batch_size]
        yield from zip(batch, model.generate([prompt] * len(batch), args.duration, seed=list(batch), **kw))


def main(argv=None):
    args = parse_args(argv)
    hub_logging.set_verbosity_error()  # no retry chatter offline: the error is one line
    start = time.time()
    try:
        # before minutes of loading, measured against the released VAE, the largest here (generate and edit check
        # again with the model's own)
        device, vae_cfg = E.usable_device(args.device, DTYPES[args.dtype]), E.VAE_PRESETS["released"]
        if args.edit:
            E.check_edit_mask(clip_seconds(args.edit), args.mask_start, args.mask_length, args.boundary, vae_cfg,
                              device)
        else:
            E.check_duration(args.duration, vae_cfg, device, min(args.batch_size, args.num_samples), what="--duration")
        if args.control:  # unreadable or silent: said before minutes of loading (at the released rate)
            E.gate_reference(read_audio(args.control, vae_cfg.sample_rate), args.gate)
        model = E.EzAudio.from_pretrained(args.model, args.ckpt, args.dit_config, args.vae, args.vae_config,
                                          args.text_encoder, args.device, DTYPES[args.dtype],
                                          args.controlnet or (True if args.control else None), args.fast)
        if args.compile:
            model.dit.compile()
        task = f"editing {args.edit}" if args.edit else f"{args.duration:g} s"
        if args.control:
            task += f" following {args.control} (scale {args.control_scale:g}, gate {args.gate:g})"
        guidance = (f"CFG {args.cfg:g}, rescale {args.rescale:g}" if model.guided(args.prompts, args.cfg)
                    else "no guidance")
        fast = ""
        if args.fast:  # the weights are in --dtype on any device; a CUDA graph needs a GPU
            graph = "CUDA graph" if model.device.type == "cuda" else f"no CUDA graph on {model.device.type}"
            fast = f", fast, {graph}"
        print(f"{args.ckpt or args.model} on {model.device} ({args.dtype}{fast}): {task}, {args.steps} steps, "
              f"{guidance}, eta {args.eta:g}")
        os.makedirs(args.out, exist_ok=True)
        for prompt in args.prompts:
            for seed, audio in samples(model, args, prompt):
                path = os.path.join(args.out, file_name(prompt, seed, args.edit))
                write_wav(path, audio, model.sample_rate, args.subtype)
                print(path)
    except (E.CheckpointError, AudioError, ValueError, OSError) as e:
        raise SystemExit(f"error: {e}")
    print(f"wrote {len(args.prompts) * args.num_samples} WAV file(s) ({model.sample_rate} Hz, {args.subtype}) "
          f"to {args.out}{os.sep} in {time.time() - start:.1f} s")


if __name__ == "__main__":
    main()
