"""Configuration from the environment, reusing the app's variable names."""
from __future__ import annotations

from pathlib import Path

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_core import PydanticCustomError
from pydantic_settings import BaseSettings, SettingsConfigDict

from listener.instants import parse_duration


def _duration(value: object, name: str) -> int:
    if isinstance(value, int):
        return value
    try:
        return parse_duration(str(value))
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from None


def _config_error(message: str) -> PydanticCustomError:
    # Not ValueError: its message would gain a "Value error, " prefix.
    return PydanticCustomError("configuration", message)


MIN_LEASE_TTL = 1_000_000  # microseconds


class Settings(BaseSettings):
    # Inputs stay out of error messages: they may hold a secret.
    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True,
                                      hide_input_in_errors=True)

    database_url: str | None = None
    supabase_url: str | None = Field(
        None, validation_alias=AliasChoices("SUPABASE_URL", "NEXT_PUBLIC_SUPABASE_URL"))
    supabase_service_role_key: SecretStr | None = None

    resend_api_key: SecretStr | None = None
    resend_api_url: str | None = None
    # Requests per second: Resend's current default team limit. The mailer slows
    # down by itself when the server's ratelimit-limit says less.
    resend_rate_limit: float = Field(5.0, gt=0)
    email_max_attempts: int = Field(5, ge=1, le=20)
    email_from: str = "The Auto Doctor <noreply@theautodoctor.com>"
    support_email: str | None = None
    next_public_app_url: str = "http://localhost:3000"
    # Emails as files instead of Resend; required explicitly on Supabase.
    email_outbox: Path | None = None

    mqtt_url: str | None = None
    webhook_url: str | None = None
    webhook_secret: SecretStr | None = None
    log_level: str = "INFO"

    max_notify_lateness: int = 3600 * 1_000_000
    reconcile_interval: int = 60 * 1_000_000
    lease_ttl: int = 15 * 1_000_000
    ops_port: int | None = None
    ops_host: str = "127.0.0.1"
    # /report on the ops port is served only with this token (bearer or ?token=).
    ops_token: SecretStr | None = None
    listener_data_dir: Path = Path(".listener")
    instance_name: str | None = None

    @field_validator("max_notify_lateness", "reconcile_interval", "lease_ttl", mode="before")
    @classmethod
    def _durations(cls, value: object, info) -> int:  # type: ignore[no-untyped-def]
        return _duration(value, info.field_name.upper())

    @field_validator("lease_ttl")
    @classmethod
    def _lease_long_enough(cls, value: int) -> int:
        # Renewed every third of its life: a shorter lease lapses between two
        # round trips to a loaded database, and the instances would trade it.
        if value < MIN_LEASE_TTL:
            raise _config_error("LEASE_TTL must be at least 1s")
        return value

    @model_validator(mode="after")
    def _webhook_pair(self) -> Settings:
        # Either half alone is a mistake: unsigned calls, or a secret for nothing.
        url, secret = self.webhook_url or None, self.webhook_secret
        secret_text = secret.get_secret_value() if secret is not None else ""
        if bool(url) != bool(secret_text):
            missing = "WEBHOOK_SECRET" if url else "WEBHOOK_URL"
            raise _config_error(f"WEBHOOK_URL and WEBHOOK_SECRET go together: {missing} is not set")
        if url and not url.startswith(("http://", "https://")):
            raise _config_error("WEBHOOK_URL must start with http:// or https://")
        if secret_text and len(secret_text) < 16:
            raise _config_error("WEBHOOK_SECRET must be at least 16 characters "
                                "(for example: openssl rand -hex 32)")
        return self

    @field_validator("ops_token", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: object) -> object:
        # OPS_TOKEN= (set but empty) must not turn /report on with an empty token.
        return None if isinstance(value, str) and not value.strip() else value

    @property
    def backend(self) -> str:
        if self.supabase_url and self.supabase_service_role_key:
            return "supabase"
        if self.database_url:
            return "postgres"
        return "embedded"
