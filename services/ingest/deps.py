from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from services.ingest.config import IngestSettings
from services.ingest.service import IngestService


async def _service(request: Request) -> IngestService:
    return request.app.state.service


async def _settings(request: Request) -> IngestSettings:
    return request.app.state.settings


IngestServiceDep = Annotated[IngestService, Depends(_service)]
SettingsDep = Annotated[IngestSettings, Depends(_settings)]
