"""Settings of the Label Studio bridge, validated once at the edge (CLI, flow parameters).

Environment variables use the names Label Studio's own tools use:

- :class:`LabelStudioSettings`: ``LABEL_STUDIO_URL``, ``LABEL_STUDIO_API_KEY`` (or
  ``LABEL_STUDIO_API_KEY_FILE``, a file holding the token), ``LOCAL_FILES_DOCUMENT_ROOT``.
- :class:`MlBackendSettings`: ``BASIC_AUTH_USER`` and ``BASIC_AUTH_PASS``.

Secrets are :class:`pydantic.SecretStr`: their ``repr`` and every error message show ``**********``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import (
    AliasChoices,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from storage.errors import ConfigError

__all__ = ["LabelStudioSettings", "MlBackendSettings", "load_settings"]


class LabelStudioSettings(BaseSettings):
    """How to reach Label Studio.

    Attributes:
        url: base URL, e.g. ``http://localhost:8080``.
        api_key: the user's API token (legacy token or a personal access token).
        api_key_file: a file whose first line is the token, used when ``api_key`` is unset.
        document_root: Label Studio's ``LOCAL_FILES_DOCUMENT_ROOT``: local image folders must be
            under it, and task URLs are relative to it. None: local folders cannot be served.
        timeout_s: per-request timeout in seconds.
        max_retries: retries of a request that failed with 5xx, 408/409/429 or a connection
            error (exponential back-off, done by label-studio-sdk).
        page_size: tasks per page when reading annotations.
    """

    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True)

    url: str = Field(validation_alias=AliasChoices("url", "LABEL_STUDIO_URL"))
    api_key: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("api_key", "LABEL_STUDIO_API_KEY")
    )
    api_key_file: Path | None = Field(
        default=None, validation_alias=AliasChoices("api_key_file", "LABEL_STUDIO_API_KEY_FILE")
    )
    document_root: Path | None = Field(
        default=None, validation_alias=AliasChoices("document_root", "LOCAL_FILES_DOCUMENT_ROOT")
    )
    timeout_s: float = Field(default=60.0, gt=0)
    max_retries: int = Field(default=3, ge=0, le=10)
    page_size: int = Field(default=100, ge=1, le=1000)

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("expected an http:// or https:// URL")
        return value.rstrip("/")

    def token(self) -> str:
        """The API token, from ``api_key`` or ``api_key_file``; :class:`ConfigError` if neither."""
        if self.api_key is not None and self.api_key.get_secret_value():
            return self.api_key.get_secret_value()
        if self.api_key_file is not None:
            try:
                lines = self.api_key_file.read_text("utf-8").splitlines()
            except OSError as err:
                raise ConfigError(
                    f"cannot read the Label Studio token file {self.api_key_file}: {err.strerror}"
                ) from None
            token = lines[0].strip() if lines else ""
            if token:
                return token
            raise ConfigError(f"Label Studio token file {self.api_key_file} is empty")
        raise ConfigError(
            "no Label Studio token: set LABEL_STUDIO_API_KEY or LABEL_STUDIO_API_KEY_FILE "
            "(a file holding the token)"
        )


class MlBackendSettings(BaseSettings):
    """The ML backend server.

    Attributes:
        root: the mask store (folder or ``s3://bucket/prefix``) with images, models, embeddings.
        endpoint_url: S3-compatible endpoint (MinIO, moto), else AWS's.
        model: a registered model version to pin, or ``latest`` to follow the registry's
            promoted version (checked every ``model_check_interval_s`` seconds).
        host, port: where to listen.
        basic_auth_user, basic_auth_pass: when set, every route but ``/health`` requires these
            HTTP basic-auth credentials. Both or neither: one alone is a :class:`ConfigError`
            (it would otherwise leave the backend open while looking protected).
        embedding_cache_items: image embeddings kept in memory (each is 256x64x64 float32,
            4 MiB, for the ViT variants).
        model_check_interval_s: seconds between registry checks for a newly promoted model.
        retrain_every: annotation events (``/webhook``) after which to ask for retraining;
            None disables it.
        retrain_url: URL that receives a JSON POST when retraining is asked for (e.g. a Prefect
            deployment's ``create_flow_run`` endpoint).
        zoom_in: answer clicks on small objects again on a crop around them, re-encoded at the
            model's input size (``engine.zoom_in``; one crop encode per request).
    """

    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True)

    root: str
    endpoint_url: str | None = Field(
        default=None, validation_alias=AliasChoices("endpoint_url", "AWS_ENDPOINT_URL")
    )
    model: str = "latest"
    host: str = "127.0.0.1"
    port: int = Field(default=9090, ge=0, le=65535)
    basic_auth_user: str | None = Field(
        default=None, validation_alias=AliasChoices("basic_auth_user", "BASIC_AUTH_USER")
    )
    basic_auth_pass: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("basic_auth_pass", "BASIC_AUTH_PASS")
    )
    embedding_cache_items: int = Field(default=64, ge=1)
    model_check_interval_s: float = Field(default=30.0, ge=0)
    retrain_every: int | None = Field(default=None, ge=1)
    retrain_url: str | None = None
    zoom_in: bool = True

    @model_validator(mode="after")
    def _both_or_no_credentials(self) -> MlBackendSettings:
        has_user = bool(self.basic_auth_user)
        has_pass = self.basic_auth_pass is not None and bool(
            self.basic_auth_pass.get_secret_value()
        )
        if has_user != has_pass:
            given, missing = ("user", "password") if has_user else ("password", "user")
            raise ValueError(
                f"basic auth {given} is set but its {missing} is not: set both "
                "BASIC_AUTH_USER and BASIC_AUTH_PASS, or neither"
            )
        return self

    @property
    def basic_auth(self) -> tuple[str, str] | None:
        """``(user, password)`` when basic auth is configured, else None."""
        if self.basic_auth_user and self.basic_auth_pass is not None:
            password = self.basic_auth_pass.get_secret_value()
            if password:
                return self.basic_auth_user, password
        return None


def load_settings(cls: type[BaseSettings], **values: Any) -> Any:
    """Build settings from ``values`` (None values dropped) and the environment.

    Raises :class:`ConfigError` naming the bad fields; secret values are never echoed.
    """
    given = {k: v for k, v in values.items() if v is not None}
    try:
        return cls(**given)
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or cls.__name__}: {e['msg']}"
            for e in err.errors(include_input=False)
        )
        raise ConfigError(f"{cls.__name__}: {problems}") from None
