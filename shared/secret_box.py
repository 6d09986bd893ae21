"""Secrets at rest: webhook signing secrets and upstream sources' secrets are stored encrypted
(Fernet: AES-128-CBC + HMAC-SHA256) with keys from the environment, never in plain text.

`CHURNGUARD_SECRETS_KEYS`: comma-separated Fernet keys (`python -c "from cryptography.fernet
import Fernet; print(Fernet.generate_key().decode())"`); the first encrypts, all decrypt, so a key
is rotated by putting the new one first and dropping the old one once rows were re-written. Unset,
a key is derived from `CHURNGUARD_INTERNAL_TOKEN` (set that in production in any case): both come
from the environment, neither from the database it protects.
"""

from __future__ import annotations

import base64
import functools
import hashlib
from typing import Any

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy import Text
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator

from shared.settings import InternalAuthSettings

TOKEN_PREFIX = "gAAAAA"  # every Fernet token starts so (version byte 0x80, then the timestamp)


class SecretsSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CHURNGUARD_", extra="ignore")

    secrets_keys: SecretStr | None = Field(
        None, description="Comma-separated Fernet keys for secrets at rest; the first encrypts, all "
        "decrypt. Unset: a key derived from CHURNGUARD_INTERNAL_TOKEN.",
    )


class SecretBox:
    def __init__(self, keys: list[bytes]) -> None:
        if not keys:
            raise ValueError("at least one key is needed")
        self._fernet = MultiFernet([Fernet(key) for key in keys])
        # The webhook worker decrypts the secret of every delivery it claims (~8 us each, a tenth
        # of a delivery's CPU), mostly the same few: a token that decrypted once with this box's
        # keys always decrypts to the same text. Failures are not kept.
        self._decrypted = functools.lru_cache(maxsize=4096)(self._decrypt)

    @classmethod
    def from_environment(cls) -> SecretBox:
        configured = SecretsSettings().secrets_keys
        if configured is not None and configured.get_secret_value().strip():
            try:
                keys = [k.strip().encode() for k in configured.get_secret_value().split(",") if k.strip()]
                return cls(keys)
            except ValueError as exc:
                raise ValueError(f"CHURNGUARD_SECRETS_KEYS: not a list of Fernet keys ({exc})") from None
        token = InternalAuthSettings().internal_token.get_secret_value().encode()
        derived = base64.urlsafe_b64encode(hashlib.sha256(b"churnguard secrets at rest\0" + token).digest())
        return cls([derived])

    def encrypt(self, plain: str) -> str:
        return self._fernet.encrypt(plain.encode()).decode()

    def decrypt(self, stored: str) -> str:
        if not stored.startswith(TOKEN_PREFIX):
            return stored  # written before secrets were encrypted: readable once, re-encrypted on the next write
        return self._decrypted(stored)

    def _decrypt(self, stored: str) -> str:
        try:
            return self._fernet.decrypt(stored.encode()).decode()
        except InvalidToken:
            raise ValueError(
                "a stored secret cannot be decrypted with CHURNGUARD_SECRETS_KEYS (or the internal "
                "token it is derived from): was a key removed or changed?"
            ) from None


@functools.lru_cache(maxsize=1)
def box() -> SecretBox:
    """The process's box, from the environment (read once)."""
    return SecretBox.from_environment()


class EncryptedSecret(TypeDecorator[str]):
    """A text column whose value is encrypted on the way in and decrypted on the way out."""

    impl = Text
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> str | None:
        return None if value is None else box().encrypt(str(value))

    def process_result_value(self, value: Any, dialect: Dialect) -> str | None:
        return None if value is None else box().decrypt(value)
