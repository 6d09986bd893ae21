"""Dependencies of the actions routes, read from the lifespan state (request.state)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy import Engine

from services.actions.config import ActionsSettings
from services.actions.delivery import DeliveryWorker
from services.actions.service import Rules
from shared.clock import Clock


def get_engine(request: Request) -> Engine:
    return request.state.engine


def get_clock(request: Request) -> Clock:
    return request.state.clock


def get_worker(request: Request) -> DeliveryWorker:
    return request.state.delivery_worker


EngineDep = Annotated[Engine, Depends(get_engine)]
ClockDep = Annotated[Clock, Depends(get_clock)]
WorkerDep = Annotated[DeliveryWorker, Depends(get_worker)]


def get_rules(request: Request) -> Rules:
    return request.state.rules


def get_settings(request: Request) -> ActionsSettings:
    return request.state.settings


RulesDep = Annotated[Rules, Depends(get_rules)]
SettingsDep = Annotated[ActionsSettings, Depends(get_settings)]
