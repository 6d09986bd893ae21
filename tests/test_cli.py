"""The `churnguard` command line, driven as an operator would."""

from __future__ import annotations

import asyncio

from typer.testing import CliRunner

from services.cli import app
from shared.kafka import Publisher
from shared.settings import KafkaSettings
from shared.topics import CUSTOMER_EVENTS, dead_letter

runner = CliRunner()


def kafka_env(settings: KafkaSettings) -> dict[str, str]:
    return {"CHURNGUARD_KAFKA_BOOTSTRAP_SERVERS": settings.bootstrap_servers,
            "CHURNGUARD_KAFKA_TOPIC_PREFIX": settings.topic_prefix}


async def _poison(settings: KafkaSettings) -> None:
    publisher = Publisher(settings, "test")
    try:
        await publisher.publish(dead_letter(CUSTOMER_EVENTS), b"t/c-9", b'{"id": "evt-9"}',
                                [("reason", b"unprocessable: no features for evt-9")])
    finally:
        await publisher.close()


def test_dlq_list_and_replay(kafka_settings: KafkaSettings) -> None:
    asyncio.run(_poison(kafka_settings))
    env = kafka_env(kafka_settings)

    listed = runner.invoke(app, ["dlq", "list"], env=env)
    assert listed.exit_code == 0, listed.output
    assert "unprocessable: no features for evt-9" in listed.output
    assert "1 dead letters on customer-events.dlq, 1 not replayed" in listed.output

    replayed = runner.invoke(app, ["dlq", "replay"], env=env)
    assert "replayed 1 dead letters to customer-events" in replayed.output
    again = runner.invoke(app, ["dlq", "replay"], env=env)
    assert "replayed 0 dead letters" in again.output
    assert "0 not replayed" in runner.invoke(app, ["dlq", "list"], env=env).output


def test_every_command_has_help() -> None:
    for command in (["serve", "--help"], ["broker", "--help"], ["dev", "--help"], ["simulate", "--help"],
                    ["train", "--help"], ["tenant", "create", "--help"], ["dlq", "list", "--help"]):
        result = runner.invoke(app, command)
        assert result.exit_code == 0, (command, result.output)
