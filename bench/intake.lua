-- wrk script for bench/intake.py: POST one JSON ticket event per request, each with
-- its own ticket id, and count the answers by status.
-- Arguments (after --): <label> <secret>
-- At the end one line "BENCH_JSON {...}" carries the totals and latency percentiles (us).

local threads = {}
local thread_count = 0

function setup(thread)
  thread_count = thread_count + 1
  thread:set("thread_no", thread_count)
  table.insert(threads, thread)
end

function init(args)
  label = args[1] or "run"
  wrk.headers["Content-Type"] = "application/json"
  wrk.headers["X-Syncd-Secret"] = args[2] or ""
  sent = 0
  accepted = 0
  other = 0
end

function request()
  sent = sent + 1
  local body = string.format(
    '{"event":"ticket_created","ticket_id":"%s-%d-%d","subject":"Benchmark ticket",' ..
    '"status":"new","channel":"email","priority":"normal"}',
    label, thread_no, sent)
  return wrk.format("POST", nil, nil, body)
end

function response(status, headers, body)
  if status == 202 then
    accepted = accepted + 1
  else
    other = other + 1
  end
end

function done(summary, latency, requests)
  local s, a, o = 0, 0, 0
  for _, t in ipairs(threads) do
    s = s + t:get("sent")
    a = a + t:get("accepted")
    o = o + t:get("other")
  end
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"sent":%d,"accepted":%d,"other":%d,' ..
    '"connect_errors":%d,"read_errors":%d,"write_errors":%d,"status_errors":%d,' ..
    '"timeouts":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d,"mean_us":%.1f}\n',
    summary.requests, summary.duration, s, a, o,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max, latency.mean))
end
