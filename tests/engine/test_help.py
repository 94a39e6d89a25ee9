"""--help: one default per flag, taken from engine/settings.py and mmgt/config.py; `engine serve --help` describes the
settings it will use on this machine (decided without torch)."""
import argparse
import re

import pytest

from engine.cli import build_parser
from engine.settings import LIVE, LIVE_CPU, OFFLINE
from mmgt.config import PRESETS


def _helps(parser: argparse.ArgumentParser, name: str = "engine"):
    """(command, flag, help text as printed) of every flag of every command."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub, p in action.choices.items():
                yield from _helps(p, f"{name} {sub}")
        elif action.option_strings and action.help not in (None, argparse.SUPPRESS):
            text = parser._get_formatter()._get_help_string(action)
            yield name, action.option_strings[-1], text % {**vars(action), "prog": name}


def test_every_flag_names_its_default_at_most_once():
    helps = list(_helps(build_parser()))
    assert len(helps) > 100
    twice = [(c, f, h) for c, f, h in helps if len(re.findall(r"default", h, re.I)) > 1]
    assert twice == [], twice
    assert not [h for _, _, h in helps if "(default: None)" in h or "(default: False)" in h]


def _flag_help(command: str, flag: str) -> str:
    return next(h for c, f, h in _helps(build_parser()) if c == f"engine {command}" and f == flag)


def test_settings_defaults_come_from_the_dataclasses():
    assert f"(default {OFFLINE.hop})" in _flag_help("render", "--hop")
    assert f"(default {OFFLINE.chunk})" in _flag_help("render", "--chunk")
    assert f"(default {OFFLINE.overlap})" in _flag_help("batch", "--overlap")
    steps = _flag_help("render", "--steps")  # OFFLINE leaves the steps to the preset: its sampler's, by preset
    for name, cfg in PRESETS.items():
        assert f"{name} {cfg.sampler.steps}" in steps, steps
    assert "(default: torch)" in _flag_help("render", "--backend")


@pytest.mark.parametrize("gpu", [True, False])
def test_serve_help_describes_this_machines_settings(monkeypatch, capsys, gpu):
    import engine.preflight as preflight

    monkeypatch.setattr(preflight, "gpu_present", lambda: (gpu, "a test says so"))
    name, base = ("LIVE", LIVE) if gpu else ("LIVE_CPU", LIVE_CPU)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"Scheduling on this machine: engine/settings.py {name} (hop {base.hop}," in text, text
    assert "because a test says so" in text
    assert f"--hop HOP frames between SMGA windows, <= --window (default {base.hop})" in text
    assert f"--chunk CHUNK Stage II frames per render chunk, <= 32 (default {base.chunk})" in text


def test_gpu_presence_is_decided_without_torch():
    import subprocess
    import sys

    code = ("import sys; from engine.preflight import gpu_present, live_settings; gpu_present(); live_settings(); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
