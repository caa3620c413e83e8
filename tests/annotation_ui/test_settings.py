from __future__ import annotations

from pathlib import Path

import pytest

from annotation_ui.settings import LabelStudioSettings, MlBackendSettings, load_settings
from storage.errors import ConfigError

SECRET = "tok-0123456789-secret"


def test_token_and_url_come_from_label_studio_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LABEL_STUDIO_URL", "http://ls.example:8080/")
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", SECRET)
    settings = load_settings(LabelStudioSettings)
    assert settings.url == "http://ls.example:8080"
    assert settings.token() == SECRET
    assert SECRET not in repr(settings)


def test_token_from_a_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("LABEL_STUDIO_API_KEY", raising=False)
    path = tmp_path / "token"
    path.write_text(f"{SECRET}\n")
    settings = load_settings(LabelStudioSettings, url="http://x", api_key_file=path)
    assert settings.token() == SECRET


@pytest.mark.parametrize("content", [None, ""])
def test_missing_or_empty_token_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, content: str | None
) -> None:
    monkeypatch.delenv("LABEL_STUDIO_API_KEY", raising=False)
    monkeypatch.delenv("LABEL_STUDIO_API_KEY_FILE", raising=False)
    path = tmp_path / "token"
    if content is not None:
        path.write_text(content)
    settings = load_settings(
        LabelStudioSettings, url="http://x", api_key_file=path if content is not None else None
    )
    with pytest.raises(ConfigError, match="token"):
        settings.token()


def test_bad_values_are_reported_without_echoing_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", SECRET)
    with pytest.raises(ConfigError) as err:
        load_settings(LabelStudioSettings, url="ftp://nope", timeout_s=-1)
    assert "url" in str(err.value) and "timeout_s" in str(err.value)
    assert SECRET not in str(err.value) and "ftp://nope" not in str(err.value)


def test_basic_auth_needs_both_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BASIC_AUTH_PASS", raising=False)
    monkeypatch.setenv("BASIC_AUTH_USER", "annotators")
    # One name alone must not leave the backend open while it looks protected.
    with pytest.raises(ConfigError, match="BASIC_AUTH_PASS"):
        load_settings(MlBackendSettings, root="/data")
    monkeypatch.setenv("BASIC_AUTH_PASS", SECRET)
    settings = load_settings(MlBackendSettings, root="/data")
    assert settings.basic_auth == ("annotators", SECRET)
    assert SECRET not in repr(settings)
