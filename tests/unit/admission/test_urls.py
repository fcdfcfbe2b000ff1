"""URL normalisation for MODEL_URL_PREFIXES."""

from __future__ import annotations

import pytest

from lm_eval_server.admission.urls import normalise_url, url_allowed

PREFIXES = [normalise_url("http://Models.Example:8000/v1", "test")]


@pytest.mark.parametrize(
    "url",
    [
        "http://models.example:8000/v1",
        "http://models.example:8000/v1/",
        "HTTP://MODELS.EXAMPLE:8000/v1/completions",
        "http://models.example:8000/v1/chat/completions",
    ],
)
def test_allowed(url: str) -> None:
    assert url_allowed(url, PREFIXES)


@pytest.mark.parametrize(
    "url",
    [
        "http://models.example:8000/v1evil",
        "http://models.example:8001/v1",
        "http://models.example/v1",
        "https://models.example:8000/v1",
        "http://models.example.evil:8000/v1",
        "http://evil:8000/v1",
    ],
)
def test_refused(url: str) -> None:
    assert not url_allowed(url, PREFIXES)


@pytest.mark.parametrize(
    "url",
    [
        "http://models.example:8000@evil/v1",
        "http://user:pw@models.example:8000/v1",
        "http://models.example:8000\\@evil/v1",
        "http://models.example:8000/v1/../admin",
        "http://models.example:8000/v1/%2e%2e/admin",
        "http://models.example:8000/v1?next=x",
        "http://models.example:8000/v1 ",
        "file:///etc/passwd",
        "//models.example:8000/v1",
        "http://models.example:99999/v1",
    ],
)
def test_tricks_are_errors(url: str) -> None:
    with pytest.raises(ValueError):
        url_allowed(url, PREFIXES)


def test_setting_is_normalised_and_checked_at_startup(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from pydantic import ValidationError

    from lm_eval_server.config import Settings

    settings = Settings(data_dir=tmp_path, model_url_prefixes="http://A.example/v1, https://b")
    assert settings.model_url_prefixes == ["http://a.example:80/v1/", "https://b:443/"]
    with pytest.raises(ValidationError, match="MODEL_URL_PREFIXES"):
        Settings(data_dir=tmp_path, model_url_prefixes="http://a@b/")
