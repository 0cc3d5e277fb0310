"""Environment variables are read with one rule: a clear error for a value outside what the variable allows."""

import os
import subprocess
import sys

import pytest

from flatquant import envflags
from flatquant.kernels import pdl
from flatquant.kernels import rows_matmul as rm

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


@pytest.mark.parametrize(
    "read,name,bad",
    [
        (
            pdl._enabled_from_env,
            "FLATQUANT_PDL",
            r"FLATQUANT_PDL must be 0 \(off\) or 1 \(on, the default\), got 'yes'",
        ),
        (rm._use_kernel_from_env, "FLATQUANT_QUERY_KERNEL", "FLATQUANT_QUERY_KERNEL must be 0"),
    ],
)
def test_module_switches_read_0_1_and_unset(monkeypatch, read, name, bad):
    """The readers the modules call at import (the import itself: the probe below), both on by default."""
    for value, want in (("0", False), ("1", True), (None, True)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
        assert read() is want
    monkeypatch.setenv(name, "yes")
    with pytest.raises(ValueError, match=bad):
        read()


K, KV, G = "flatquant.kernels.kron_quantize", "flatquant.kernels.kv_quant", "flatquant.kernels.gemm_w4a4"
# (variable, value, module, attribute, the attribute's repr then; None: the import fails, naming both)
CASES = [
    ("FLATQUANT_AUTOTUNE", "off", K, "AUTOTUNE", None),
    ("FLATQUANT_AUTOTUNE", "0", K, "AUTOTUNE", "False"),
    ("FLATQUANT_AUTOTUNE_CACHE", "off", K, "AUTOTUNE_CACHE", None),
    ("FLATQUANT_CALIB_GRAPH", "true", "flatquant.calibrate", "CALIB_GRAPH", None),
    ("FLATQUANT_CALIB_GRAPH", "0", "flatquant.calibrate", "CALIB_GRAPH", "False"),
    ("FLATQUANT_PDL", "off", "flatquant.kernels.pdl", "ENABLED", None),
    ("FLATQUANT_PDL", "0", "flatquant.kernels.pdl", "ENABLED", "False"),
    ("FLATQUANT_PDL", None, "flatquant.kernels.pdl", "ENABLED", "True"),
    ("FLATQUANT_QUERY_KERNEL", "yes", "flatquant.kernels.rows_matmul", "USE_KERNEL", None),
    ("FLATQUANT_QUERY_KERNEL", "0", "flatquant.kernels.rows_matmul", "USE_KERNEL", "False"),
    ("FLATQUANT_QUERY_KERNEL", None, "flatquant.kernels.rows_matmul", "USE_KERNEL", "True"),
    ("FLATQUANT_KRON_PIECES", "no", "flatquant.kernels.kron_pieces", "PIECES", None),
    ("FLATQUANT_KRON_PIECES", "0", "flatquant.kernels.kron_pieces", "PIECES", "False"),
    ("FLATQUANT_FUSE_KV_APPEND", "off", KV, "APPEND_PAIR", None),
    ("FLATQUANT_FUSE_KV_APPEND", "0", KV, "APPEND_PAIR", "False"),
    ("FLATQUANT_DECODE_TUNE", "1", G, "DECODE_TUNE", None),
    ("FLATQUANT_DECODE_TUNE", "rotate", G, "DECODE_TUNE", "'rotate'"),
    ("FLATQUANT_MEDIUM_M", "4096", G, "MEDIUM_M", None),
    ("FLATQUANT_MEDIUM_M", "64", G, "MEDIUM_M", "64"),
    ("FLATQUANT_PDL_EARLY_TOKENS", "-3", "flatquant.kernels.kron_quantize", "PDL_EARLY_TOKENS", None),
    ("FLATQUANT_PDL_EARLY_TOKENS", "0", "flatquant.kernels.kron_quantize", "PDL_EARLY_TOKENS", "0"),
    ("FLATQUANT_PDL_EARLY_TOKENS", None, "flatquant.kernels.kron_quantize", "PDL_EARLY_TOKENS", "64"),
]

_PROBE = """
import importlib, json, os, sys
sys.path.insert(0, sys.argv[1])
import torch, transformers  # the heavy imports once; flatquant is imported afresh for every case
out = []
for name, value, module, attribute in json.loads(sys.argv[2]):
    for m in [m for m in sys.modules if m == "flatquant" or m.startswith("flatquant.")]:
        del sys.modules[m]
    os.environ.pop(name, None)
    if value is not None:
        os.environ[name] = value
    try:
        out.append(repr(getattr(importlib.import_module(module), attribute)))
    except ValueError as err:
        out.append("error " + str(err))
    os.environ.pop(name, None)
print(json.dumps(out))
"""


def test_each_module_reads_its_switch_at_import_and_refuses_a_value_it_would_have_misread():
    """What each module makes of its variable, imported afresh in one process per case: 0 / 1 / unset as
    documented, and a value such as "off" (which used to mean "on" for some switches, anything but 0, and "off"
    for others, anything but 1) stops the import with an error that names the variable and the value."""
    import json

    env = {k: v for k, v in os.environ.items() if not k.startswith("FLATQUANT_")}
    cases = [case[:4] for case in CASES]
    run = subprocess.run(
        [sys.executable, "-c", _PROBE, SRC, json.dumps(cases)], env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-2000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    for (name, value, _, _, want), seen in zip(CASES, got, strict=True):
        if want is None:
            assert seen.startswith(f"error {name} must be") and seen.endswith(f"got {value!r}"), (name, value, seen)
        else:
            assert seen == want, (name, value, seen)
