"""The README is a tutorial that must stay true. Its commands are read from its code blocks (and table cells): those
that need no download and take seconds (the toy model's) run as written; the rest, which need the hub, a GPU or data,
are parsed by their script's own argparse (a `...` in a command stands for flags it leaves out). Its Python blocks run
on the toy model, or at least compile."""

import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

import bench
import data
import sample
import toy
import train

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
PARSERS = {"sample.py": sample.parse_args, "bench.py": bench.parse_args, "train.py": train.parser().parse_args,
           "data.py": data.parser().parse_args, "toy.py": toy.parser().parse_args}


def code_blocks(language):
    return re.findall(rf"```{language}\n(.*?)```", README, re.S)


def commands():
    """(script, argv) of every `python X.py ...` and `torchrun ... X.py ...` in the README, in order, with the shell
    variables its blocks set ($V, $C) expanded."""
    lines = []  # in the README's order: a block's lines, or a command quoted in the text or a table
    for block, span in re.findall(r"```bash\n(.*?)```|`([^`\n]+)`", README, re.S):
        lines += block.splitlines() if block else [span] if span.startswith(("python ", "torchrun ")) else []
    found, variables = [], {}
    for line in lines:
        line = re.sub(r"\$(\w+)", lambda m: variables[m.group(1)], line)
        words = shlex.split(line, comments=True)
        if len(words) == 1 and re.fullmatch(r"[A-Z]+=.*", words[0]):
            name, value = words[0].split("=", 1)
            variables[name] = value
        script = next((i for i, w in enumerate(words) if w in PARSERS), None)
        if words and words[0] in ("python", "torchrun") and script is not None and "..." not in words:
            found.append((words[script], words[script + 1:]))
    return found


def runs_offline(script, argv):
    """The toy model's commands: sampling and judging, seconds on a CPU with nothing to download."""
    return (script == "sample.py" and "--model" in argv and argv[argv.index("--model") + 1] == "toy") or \
        (script == "toy.py" and argv[0] in ("score", "spectrogram"))


def test_the_readme_names_every_script_and_its_recipes():
    scripts = {script for script, _ in commands()}
    assert scripts == set(PARSERS), scripts
    stages = {argv[argv.index("--stage") + 1] for script, argv in commands() if "--stage" in argv}
    assert stages == {"vae", "1", "2", "3", "control"}


@pytest.mark.parametrize("script", sorted(PARSERS))
def test_every_script_has_help(script, capsys):
    with pytest.raises(SystemExit) as e:
        PARSERS[script](["--help"])
    assert e.value.code == 0 and "usage:" in capsys.readouterr().out


def test_every_readme_command_parses():
    for script, argv in commands():
        if argv != ["--help"]:  # test_every_script_has_help runs those
            PARSERS[script](argv)  # a flag the README names but the script lost ends the test here


@pytest.mark.slow
def test_the_readme_toy_commands_and_python_run_as_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    facts = {"kind": "tone", "count": 3, "pitch": "low", "timbre": "buzz"}  # the reference a reader would bring
    sf.write(tmp_path / "ref.wav", toy.render(facts, np.random.default_rng(0)), toy.SAMPLE_RATE)
    ran = []
    for script, argv in commands():
        if runs_offline(script, argv):
            {"sample.py": sample.main, "toy.py": toy.main}[script](argv)
            ran.append(argv[0] if script == "toy.py" else script)
    assert ran == ["sample.py", "sample.py", "score", "spectrogram", "sample.py"]  # set-up, quick start, control
    assert (tmp_path / "samples" / "toy.png").is_file()
    assert "100.0%" in capsys.readouterr().out
    for block in code_blocks("python"):
        assert '"toy"' in block  # the README's Python runs offline
        namespace = {}
        exec(compile(block, "README.md", "exec"), namespace)
        assert namespace["audio"].shape == (1, 32000)  # the toy's own 2 s at 16 kHz
        assert namespace["edited"].shape == (32000,)
