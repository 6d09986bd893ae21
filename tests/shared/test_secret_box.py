"""Secrets at rest: Fernet with keys from the environment, rotation, legacy rows, clear errors."""

from __future__ import annotations

import pytest
from cryptography.fernet import Fernet

from shared.secret_box import TOKEN_PREFIX, SecretBox


def test_round_trip_never_stores_the_plain_value_and_each_write_differs() -> None:
    box = SecretBox([Fernet.generate_key()])
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    first, second = box.encrypt(secret), box.encrypt(secret)
    assert first.startswith(TOKEN_PREFIX) and secret not in first and first != second
    assert box.decrypt(first) == box.decrypt(second) == secret


def test_a_new_key_first_still_reads_what_the_old_key_wrote() -> None:
    old, new = Fernet.generate_key(), Fernet.generate_key()
    written = SecretBox([old]).encrypt("s3cret")
    assert SecretBox([new, old]).decrypt(written) == "s3cret"
    with pytest.raises(ValueError, match="cannot be decrypted"):
        SecretBox([new]).decrypt(written)  # the old key was dropped too early: said, not guessed


def test_repeated_reads_are_remembered_per_box_and_failures_are_not() -> None:
    old, new = Fernet.generate_key(), Fernet.generate_key()
    written = SecretBox([old]).encrypt("s3cret")
    without_old = SecretBox([new])
    for _ in range(2):  # the refusal is not remembered as an answer
        with pytest.raises(ValueError, match="cannot be decrypted"):
            without_old.decrypt(written)
    box = SecretBox([new, old])
    assert [box.decrypt(written) for _ in range(3)] == ["s3cret"] * 3
    with pytest.raises(ValueError, match="cannot be decrypted"):
        SecretBox([new]).decrypt(written)  # what one box remembers, another box does not know


def test_rows_from_before_encryption_are_still_read() -> None:
    assert SecretBox([Fernet.generate_key()]).decrypt("whsec_legacy") == "whsec_legacy"


def test_keys_come_from_the_environment_and_bad_ones_are_named(monkeypatch: pytest.MonkeyPatch) -> None:
    key = Fernet.generate_key().decode()
    monkeypatch.setenv("CHURNGUARD_SECRETS_KEYS", key)
    assert SecretBox([key.encode()]).decrypt(SecretBox.from_environment().encrypt("x")) == "x"
    monkeypatch.setenv("CHURNGUARD_SECRETS_KEYS", "not-a-key")
    with pytest.raises(ValueError, match="CHURNGUARD_SECRETS_KEYS"):
        SecretBox.from_environment()
    monkeypatch.delenv("CHURNGUARD_SECRETS_KEYS")
    monkeypatch.setenv("CHURNGUARD_INTERNAL_TOKEN", "token-a")
    derived_a = SecretBox.from_environment()
    monkeypatch.setenv("CHURNGUARD_INTERNAL_TOKEN", "token-b")
    with pytest.raises(ValueError):
        SecretBox.from_environment().decrypt(derived_a.encrypt("x"))  # derived from the token
