"""Environment variables are read with one rule: a clear error for a value outside what the variable allows."""

import os
import subprocess
import sys

import pytest

from flatquant import envflags

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")


def test_switch_takes_0_and_1_and_defaults_when_unset_or_empty(monkeypatch):
    monkeypatch.delenv("FQ_TEST_SWITCH", raising=False)
    assert envflags.switch("FQ_TEST_SWITCH", True, "off", "on") is True
    assert envflags.switch("FQ_TEST_SWITCH", False, "off", "on") is False
    for raw, want in (("0", False), ("1", True), ("", True)):
        monkeypatch.setenv("FQ_TEST_SWITCH", raw)
        assert envflags.switch("FQ_TEST_SWITCH", True, "off", "on") is want
    for raw in ("yes", "true", "2", " 1"):
        monkeypatch.setenv("FQ_TEST_SWITCH", raw)
        with pytest.raises(ValueError) as err:
            envflags.switch("FQ_TEST_SWITCH", True, "eager steps", "graph replays")
        assert (
            str(err.value) == f"FQ_TEST_SWITCH must be 0 (eager steps) or 1 (graph replays, the default), got {raw!r}"
        )


def test_number_and_choice_check_their_range_and_options(monkeypatch):
    monkeypatch.delenv("FQ_TEST_NUMBER", raising=False)
    assert envflags.number("FQ_TEST_NUMBER", 128, int, 16, 1024, "an integer") == 128
    monkeypatch.setenv("FQ_TEST_NUMBER", "64")
    assert envflags.number("FQ_TEST_NUMBER", 128, int, 16, 1024, "an integer") == 64
    for raw in ("8", "2048", "1e3", "many"):
        monkeypatch.setenv("FQ_TEST_NUMBER", raw)
        with pytest.raises(ValueError, match=rf"FQ_TEST_NUMBER must be an integer in \[16, 1024\], got '{raw}'"):
            envflags.number("FQ_TEST_NUMBER", 128, int, 16, 1024, "an integer")
    monkeypatch.setenv("FQ_TEST_CHOICE", "rotate")
    assert envflags.choice("FQ_TEST_CHOICE", "graph", ("graph", "rotate")) == "rotate"
    monkeypatch.setenv("FQ_TEST_CHOICE", "cold")
    with pytest.raises(ValueError, match=r"must be one of 'graph' \(the default\), 'rotate', got 'cold'"):
        envflags.choice("FQ_TEST_CHOICE", "graph", ("graph", "rotate"))


SWITCHES = [
    ("FLATQUANT_AUTOTUNE", "flatquant.kernels.kron_quantize"),
    ("FLATQUANT_AUTOTUNE_CACHE", "flatquant.kernels.kron_quantize"),
    ("FLATQUANT_CALIB_GRAPH", "flatquant.calibrate"),
    ("FLATQUANT_PDL", "flatquant.kernels.pdl"),
    ("FLATQUANT_FUSE_KV_APPEND", "flatquant.kernels.kv_quant"),
]

_PROBE = """
import importlib, json, os, sys
sys.path.insert(0, sys.argv[1])
import torch, transformers  # the heavy imports once; flatquant is imported afresh for every switch
out = {}
for name, module in json.loads(sys.argv[2]):
    for m in [m for m in sys.modules if m == "flatquant" or m.startswith("flatquant.")]:
        del sys.modules[m]
    os.environ[name] = "off"
    try:
        importlib.import_module(module)
        out[name] = None
    except ValueError as err:
        out[name] = str(err)
    del os.environ[name]
print(json.dumps(out))
"""


def test_the_library_refuses_a_switch_it_would_have_misread():
    """A value such as "off" used to mean "on" for some switches (anything but 0) and "off" for others (anything
    but 1); importing the library with it now fails and says which variable and what it takes (one process,
    flatquant imported afresh for each switch)."""
    import json

    env = {k: v for k, v in os.environ.items() if not k.startswith("FLATQUANT_")}
    run = subprocess.run(
        [sys.executable, "-c", _PROBE, SRC, json.dumps(SWITCHES)], env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-2000:]
    errors = json.loads(run.stdout.strip().splitlines()[-1])
    for name, _ in SWITCHES:
        assert errors[name] is not None and errors[name].startswith(f"{name} must be 0 ("), (name, errors[name])
        assert errors[name].endswith("got 'off'")
