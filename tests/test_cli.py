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


def test_generator_option_overrides_the_environment(monkeypatch):
    monkeypatch.setenv("REFINER_GENERATOR", "tgi:http://tgi:80")
    assert settings_from_args(build_parser().parse_args(["serve"])).generator == "tgi:http://tgi:80"
    args = build_parser().parse_args(["serve", "--generator", "openai:http://vllm:8000/v1"])
    assert settings_from_args(args).generator == "openai:http://vllm:8000/v1"


@pytest.mark.parametrize("spec", ["http://vllm:8000/v1", "grpc:http://vllm:8000", "openai:vllm:8000"])
def test_invalid_generator_exits_with_status_2(spec, capsys):
    assert main(["serve", "--generator", spec]) == 2
    assert "PROTOCOL:URL" in capsys.readouterr().err
