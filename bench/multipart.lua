-- wrk script: POST prepared request bodies in turn and print a JSON summary.
-- BENCH_BODIES: folder with body_0.bin ...; BENCH_COUNT: how many; BENCH_CONTENT_TYPE: the header.
-- A body_N.len beside a body holds its v2 Inference-Header-Content-Length.
-- BENCH_STATUSES set: count the answers by status code too (the overload scenario).
local dir = os.getenv("BENCH_BODIES")
local count = tonumber(os.getenv("BENCH_COUNT"))
local content_type = os.getenv("BENCH_CONTENT_TYPE")
local requests = {}
local n = 0

function init(args)
  for i = 0, count - 1 do
    local f = assert(io.open(dir .. "/body_" .. i .. ".bin", "rb"))
    local headers = {["Content-Type"] = content_type}
    local l = io.open(dir .. "/body_" .. i .. ".len", "r")
    if l then
      headers["Inference-Header-Content-Length"] = l:read("*a")
      l:close()
    end
    requests[i + 1] = wrk.format("POST", nil, headers, f:read("*a"))
    f:close()
  end
end

function request()
  n = n % count + 1
  return requests[n]
end

local threads = {}
function setup(thread)
  table.insert(threads, thread)
end

statuses = {}
if os.getenv("BENCH_STATUSES") then
  function response(status, headers, body)
    statuses[status] = (statuses[status] or 0) + 1
  end
end

local function statuses_json()
  local total = {}
  for _, thread in ipairs(threads) do
    for status, count in pairs(thread:get("statuses") or {}) do
      total[status] = (total[status] or 0) + count
    end
  end
  local parts = {}
  for status, count in pairs(total) do
    table.insert(parts, string.format('"%d": %d', status, count))
  end
  return "{" .. table.concat(parts, ", ") .. "}"
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests": %d, "duration_us": %d, "errors": %d, "non_2xx": %d, "timeouts": %d, "p50_us": %d, "p90_us": %d, ' ..
    '"p99_us": %d, "max_us": %d, "statuses": %s}\n',
    summary.requests, summary.duration, e.connect + e.read + e.write + e.timeout, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, statuses_json()))
end
