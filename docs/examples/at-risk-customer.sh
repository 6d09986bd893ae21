#!/usr/bin/env bash
# Sends the history of a customer at high risk of churning through the gateway:
# contract ending in 12 days without auto-renewal, few orders and a refund, three complaints,
# two open tickets, CSAT 1 and NPS 1.
# Usage: KEY=cg_... ./docs/examples/at-risk-customer.sh [customer-id]
set -euo pipefail
: "${KEY:?set KEY to the API key printed by make run}"
GATEWAY=${GATEWAY:-http://127.0.0.1:8000}
CUSTOMER=${1:-c-at-risk}
python3 - "$CUSTOMER" > /tmp/churnguard-at-risk.json <<'PY'
import json, sys, uuid
from datetime import datetime, timedelta, timezone
customer = sys.argv[1]
now = datetime.now(timezone.utc)
def ev(t, days_ago, data):
    return {"id": uuid.uuid4().hex, "type": t, "customer_id": customer,
            "occurred_at": (now - timedelta(days=days_ago)).isoformat(), "source": "example", "data": data}
today = now.date()
events = [ev("customer.consent_changed", 360, {"marketing": True}),
          ev("subscription.started", 350, {"contract_id": "k-" + customer, "plan": "basic", "price": "19.90",
             "currency": "EUR", "start_date": str(today - timedelta(days=350)),
             "end_date": str(today + timedelta(days=12)), "auto_renew": False, "notice_period_days": 30})]
events += [ev("order.completed", 300 - 60 * i, {"order_id": f"o-{customer}-{i}", "amount": "35.00", "currency": "EUR"}) for i in range(3)]
events += [ev("support.complaint", 20 - 5 * i, {"severity": "high"}) for i in range(3)]
events += [ev("order.refunded", 40, {"order_id": f"o-{customer}-2", "amount": "35.00", "currency": "EUR"}),
           ev("support.ticket_opened", 9, {"ticket_id": "t1-" + customer}),
           ev("support.ticket_opened", 8, {"ticket_id": "t2-" + customer}),
           ev("feedback.csat", 5, {"score": 1}),
           ev("feedback.nps", 4, {"score": 1, "comment": "never again"})]
print(json.dumps({"events": events}))
PY
curl -sS -X POST "$GATEWAY/v1/events/batch" -H "Authorization: Bearer $KEY" \
  -H 'Content-Type: application/json' --data-binary @/tmp/churnguard-at-risk.json
echo
echo "score:  curl -s $GATEWAY/v1/customers/$CUSTOMER/score -H \"Authorization: Bearer \$KEY\""
echo "offers: curl -s $GATEWAY/v1/customers/$CUSTOMER/offers -H \"Authorization: Bearer \$KEY\""
