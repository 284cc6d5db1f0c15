"""`refiner serve` options override the REFINER_* environment, which overrides the defaults."""

from __future__ import annotations

import ctypes.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from app.cli import build_parser, main, settings_from_args, tcmalloc_environment


def test_options_override_environment(monkeypatch):
    monkeypatch.setenv("REFINER_PORT", "9000")
    monkeypatch.setenv("REFINER_MAX_QUEUE", "7")
    monkeypatch.setenv("REFINER_DEVICE", "cpu")
    args = build_parser().parse_args(["serve", "--port", "9100", "--host", "0.0.0.0", "--dtype", "float32"])
    settings = settings_from_args(args)
    assert settings.port == 9100  # option beats environment
    assert settings.host == "0.0.0.0"
    assert settings.dtype == "float32"
    assert settings.max_queue == 7  # environment beats default
    assert settings.device == "cpu"
    assert settings.model == "embedded:smollm2-135m-instruct"


def test_invalid_settings_exit_with_status_2(monkeypatch, capsys):
    monkeypatch.setenv("REFINER_MAX_INPUT_TOKENS", "4096")  # >= max_total_tokens (2048)
    assert main(["serve"]) == 2
    assert "max_input_tokens" in capsys.readouterr().err


def test_serve_is_required():
    with pytest.raises(SystemExit):
        build_parser().parse_args([])


def test_generator_option_overrides_the_environment(monkeypatch):
    monkeypatch.setenv("REFINER_GENERATOR", "tgi:http://tgi:80")
    assert settings_from_args(build_parser().parse_args(["serve"])).generator == "tgi:http://tgi:80"
    args = build_parser().parse_args(["serve", "--generator", "openai:http://vllm:8000/v1"])
    assert settings_from_args(args).generator == "openai:http://vllm:8000/v1"


@pytest.mark.parametrize("spec", ["http://vllm:8000/v1", "grpc:http://vllm:8000", "openai:vllm:8000"])
def test_invalid_generator_exits_with_status_2(spec, capsys):
    assert main(["serve", "--generator", spec]) == 2
    assert "PROTOCOL:URL" in capsys.readouterr().err


def test_tcmalloc_is_added_to_the_preload_once(monkeypatch):
    monkeypatch.setattr("ctypes.util.find_library", lambda name: f"lib{name}.so.4")
    assert tcmalloc_environment({"PATH": "/bin"}) == {
        "PATH": "/bin",
        "LD_PRELOAD": "libtcmalloc_minimal.so.4",
    }
    assert tcmalloc_environment({"LD_PRELOAD": "libx.so"})["LD_PRELOAD"] == "libtcmalloc_minimal.so.4 libx.so"
    assert tcmalloc_environment({"LD_PRELOAD": "/opt/libtcmalloc.so"}) is None  # there already: no loop
    monkeypatch.setattr("ctypes.util.find_library", lambda name: None)
    assert tcmalloc_environment({}) is None  # not on this system: the C library's allocator


@pytest.mark.skipif(
    ctypes.util.find_library("tcmalloc_minimal") is None, reason="no tcmalloc here (make tcmalloc)"
)
@pytest.mark.parametrize("wanted", [True, False])
def test_serve_runs_with_tcmalloc_where_the_system_has_it(wanted):
    """The real command: ``refiner serve`` runs itself again with tcmalloc preloaded (same process),
    unless REFINER_TCMALLOC=false; the allocator is in the process's memory map before any model loads."""
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    env["REFINER_TCMALLOC"] = str(wanted).lower()
    server = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "serve", "--port", "0", "--device", "cpu"],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = next(line for line in server.stderr if "memory allocator" in line)
        maps = Path(f"/proc/{server.pid}/maps").read_text()
    finally:
        server.kill()
        server.wait(timeout=30)
    assert ("libtcmalloc_minimal" in line) is wanted
    assert ("libtcmalloc_minimal" in maps) is wanted
