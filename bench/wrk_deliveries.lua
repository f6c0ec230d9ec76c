-- wrk feeds pre-signed webhook deliveries, each thread its own share, and reports as JSON.
-- Environment: BENCH_REQUESTS (file of "id<TAB>timestamp<TAB>signature<TAB>body" lines),
-- BENCH_THREADS (wrk -t), BENCH_PATH, BENCH_DELAY_MS (think time per connection, 0 = none).

local threads = {}
local counter = 0

function setup(thread)
  thread:set("index", counter)
  counter = counter + 1
  table.insert(threads, thread)
end

function init(args)
  local nthreads = tonumber(os.getenv("BENCH_THREADS"))
  local path = os.getenv("BENCH_PATH")
  requests = {}
  local line_no = 0
  for line in io.lines(os.getenv("BENCH_REQUESTS")) do
    -- Every thread gets a disjoint share, so no delivery is sent twice within one pass.
    if line_no % nthreads == index then
      local id, ts, sig, body = line:match("^([^\t]*)\t([^\t]*)\t([^\t]*)\t(.*)$")
      local headers = {
        ["Content-Type"] = "application/json",
        ["webhook-id"] = id,
        ["webhook-timestamp"] = ts,
        ["webhook-signature"] = sig,
      }
      table.insert(requests, wrk.format("POST", path, headers, body))
    end
    line_no = line_no + 1
  end
  position = 0
  wraps = 0
end

function request()
  position = position + 1
  if position > #requests then
    position = 1
    wraps = wraps + 1
  end
  return requests[position]
end

-- Defined only for a rate-limited run: wrk schedules every request through a timer once a
-- script has delay(), which would blur the unlimited runs.
local delay_ms = tonumber(os.getenv("BENCH_DELAY_MS") or "0")
if delay_ms > 0 then
  function delay()
    return delay_ms
  end
end

function done(summary, latency, requests)
  local wrapped = 0
  for _, thread in ipairs(threads) do
    wrapped = wrapped + (thread:get("wraps") or 0)
  end
  io.write(string.format(
    'BENCHJSON {"requests": %d, "duration_us": %d, "connect_errors": %d, "read_errors": %d,'
      .. ' "write_errors": %d, "status_errors": %d, "timeouts": %d, "p50_us": %d,'
      .. ' "p99_us": %d, "max_us": %d, "mean_us": %f, "wraps": %d}\n',
    summary.requests, summary.duration, summary.errors.connect, summary.errors.read,
    summary.errors.write, summary.errors.status, summary.errors.timeout,
    latency:percentile(50), latency:percentile(99), latency.max, latency.mean, wrapped))
end
