"""Configuration from the environment, reusing the app's variable names."""
from __future__ import annotations

from pathlib import Path

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from listener.instants import parse_duration


def _duration(value: object, name: str) -> int:
    if isinstance(value, int):
        return value
    try:
        return parse_duration(str(value))
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from None


class Settings(BaseSettings):
    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True)

    database_url: str | None = None
    supabase_url: str | None = Field(
        None, validation_alias=AliasChoices("SUPABASE_URL", "NEXT_PUBLIC_SUPABASE_URL"))
    supabase_service_role_key: SecretStr | None = None

    resend_api_key: SecretStr | None = None
    resend_api_url: str | None = None
    resend_rate_limit: float = Field(2.0, gt=0)  # requests per second, Resend's default
    email_max_attempts: int = Field(5, ge=1, le=20)
    email_from: str = "The Auto Doctor <noreply@theautodoctor.com>"
    support_email: str | None = None
    next_public_app_url: str = "http://localhost:3000"
    # Emails as files instead of Resend; required explicitly on Supabase.
    email_outbox: Path | None = None

    mqtt_url: str | None = None
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
