"""Settings shared by every service. Each service composes these in its own config.py.

Environment names: `CHURNGUARD_KAFKA_*` for the broker, `CHURNGUARD_DATABASE_URL`
as the default database, `CHURNGUARD_INTERNAL_TOKEN` for gateway-to-service trust.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class KafkaSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CHURNGUARD_KAFKA_", extra="ignore")

    # Comma-separated host:port list of brokers.
    bootstrap_servers: str = "127.0.0.1:9092"
    topic_prefix: str = Field("", description="Prepended to every topic name.")
    # Partitions and replicas of topics created by `churnguard topics` (on Kubernetes the
    # KafkaTopic resources decide instead).
    partitions: int = 3
    # Replicas of each topic created by `churnguard topics`.
    replication_factor: int = 1
    # aiokafka defaults to acks=1 and auto-commit every 5 s; neither is safe for us.
    acks: Literal["all"] = "all"
    # The embedded Tansu broker has no InitProducerId, so idempotence is opt-in (real Kafka: on).
    enable_idempotence: bool = Field(
        False, description="Idempotent producer; set true on Apache Kafka (Tansu has no InitProducerId)."
    )
    # read_committed hides records of aborted transactions; we write none yet, but on real Kafka
    # a producer may one day be transactional and consumers must not see what it rolled back.
    isolation_level: Literal["read_uncommitted", "read_committed"] = Field(
        "read_uncommitted", description="Consumers' isolation level; read_committed on Apache Kafka."
    )
    # Upper bound of one broker request (producer, admin; consumers use at least session + 5 s).
    request_timeout_ms: int = 5_000
    # Tansu holds a fetch for the full wait instead of answering when data arrives.
    fetch_max_wait_ms: int = 10
    # Tansu holds a first JoinGroup for half the session timeout, so a short session keeps
    # start-up quick; a SIGKILLed member is also replaced sooner.
    session_timeout_ms: int = 6_000
    # How long the group waits for members to rejoin during a rebalance.
    rebalance_timeout_ms: int = 10_000
    # Consumer heartbeats; well under the session timeout.
    heartbeat_interval_ms: int = 1_000
    # Largest batch one consumer fetch hands to the consume loop.
    max_poll_records: int = 200
    # How often a consumer tries a record that keeps failing (an error that is not an outage of
    # the database or broker) before it goes to the dead-letter topic with the last error.
    consumer_max_attempts: int = Field(3, ge=1)
    # Only records sent one by one wait for it (one larger than a whole batch): the publisher
    # builds its own batches (per call, and across concurrent callers) and sends them complete,
    # never lingering. A batch may hold many records (aiokafka's 16 KiB default fits ~48 of ours).
    linger_ms: int = 0
    # Bytes per producer batch (see linger_ms).
    max_batch_size: int = 262_144

    def topic(self, name: str) -> str:
        return f"{self.topic_prefix}{name}"


class DatabaseSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CHURNGUARD_", extra="ignore")

    database_url: str | None = Field(
        None, description="SQLAlchemy URL; unset means a SQLite file per service under var/."
    )
    # Log every SQL statement (debugging only: statements carry customer ids).
    database_echo: bool = False

    def url_for(self, service: str) -> str:
        return self.database_url or f"sqlite:///var/{service}.db"


class InternalAuthSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CHURNGUARD_", extra="ignore")

    # Shared by the gateway and the services; services refuse requests without it.
    internal_token: SecretStr = SecretStr("dev-internal-token-change-me")
