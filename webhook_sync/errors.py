"""Every error raised on purpose; each class docstring is its default message."""

from __future__ import annotations


class WebhookSyncError(Exception):
    """webhook-sync failed."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())


class ConfigError(WebhookSyncError):
    """The configuration is incomplete or invalid."""


class MigrationError(WebhookSyncError):
    """A migration failed."""


class InvalidTrainingError(WebhookSyncError):
    """The payload is not a Replicate training object."""


class InvalidJSONError(InvalidTrainingError):
    """The input is not JSON that can be stored."""


class DatabaseUnavailableError(WebhookSyncError):
    """The database is unavailable."""


class HostTableRefusedError(WebhookSyncError):
    """The platform's bound table (HOST_TABLE) refused the status change; nothing was written."""


class HostBindingError(ConfigError):
    """A HOST_* setting names a table, a column or a value the database does not take."""


class SignatureError(WebhookSyncError):
    """The webhook signature is invalid."""


class MalformedHeadersError(SignatureError):
    """The webhook headers are missing or malformed."""


class StaleTimestampError(SignatureError):
    """The webhook timestamp is outside the tolerance."""


class NoMatchingSecretError(SignatureError):
    """No configured secret matches the webhook signature."""


class ReplicateError(WebhookSyncError):
    """Replicate's API answered with an error."""

    def __init__(self, message: str | None = None, *, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


class ReplicateAuthError(ReplicateError):
    """Replicate refused REPLICATE_API_TOKEN (401/403): check the token."""


class ReplicateNotFoundError(ReplicateError):
    """Replicate has no such training."""


class ReplicateUnavailableError(ReplicateError):
    """Replicate could not be reached or kept failing."""


class ReplayError(WebhookSyncError):
    """The replay input cannot be used."""
