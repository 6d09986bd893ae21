"""A webhook receiver for trying churnguard locally: verifies each Standard Webhooks signature
and prints the offer. Marketing tools do the same on their side."""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request, Response
from standardwebhooks import Webhook, WebhookVerificationError

log = logging.getLogger("churnguard.receiver")


def create_receiver_app(secret: str) -> FastAPI:
    app = FastAPI(title="churnguard demo webhook receiver", docs_url=None, redoc_url=None)
    webhook = Webhook(secret)
    app.state.received = []

    @app.post("/webhooks")
    async def receive(request: Request) -> Response:
        body = await request.body()
        try:
            payload = webhook.verify(body, dict(request.headers))
        except WebhookVerificationError as exc:
            print(f"REJECTED webhook {request.headers.get('webhook-id')}: bad signature ({exc})", flush=True)
            return Response(status_code=401)
        app.state.received.append(payload)
        print(f"webhook {request.headers['webhook-id']} verified: {json.dumps(payload)}", flush=True)
        return Response(status_code=204)

    return app
