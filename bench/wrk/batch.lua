-- wrk script: POST {"events": [...]} with CG_BENCH_BATCH events per request, every event with
-- an id of its own. Environment: CG_BENCH_RUN, CG_BENCH_OCCURRED_AT, CG_BENCH_BATCH.
local run = os.getenv("CG_BENCH_RUN") or "run"
local occurred = os.getenv("CG_BENCH_OCCURRED_AT") or "2026-01-01T00:00:00Z"
local size = tonumber(os.getenv("CG_BENCH_BATCH") or "500")
local next_thread = 0
counter = 0
thread_no = 0

function setup(thread)
  next_thread = next_thread + 1
  thread:set("thread_no", next_thread)
end

wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"

local template = '{"id":"%s","type":"order.completed","customer_id":"c-%d","occurred_at":"'
  .. occurred .. '","source":"bench","data":{"order_id":"o-%s","amount":"59.90","currency":"EUR"}}'

function request()
  local parts = {}
  for i = 1, size do
    counter = counter + 1
    local id = run .. "-" .. thread_no .. "-" .. counter
    parts[i] = string.format(template, id, counter % 1000, id)
  end
  return wrk.format(nil, nil, nil, '{"events":[' .. table.concat(parts, ",") .. ']}')
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH {"requests":%d,"duration_us":%d,"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d,'
      .. '"p50_us":%d,"p99_us":%d}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
