"""`refiner serve` options override the REFINER_* environment, which overrides the defaults."""

from __future__ import annotations

import pytest

from app.cli import build_parser, main, settings_from_args


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
