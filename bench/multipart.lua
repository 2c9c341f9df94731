-- wrk script: POST prepared request bodies in turn and print a JSON summary.
-- BENCH_BODIES: folder with body_0.bin ...; BENCH_COUNT: how many; BENCH_CONTENT_TYPE: the header.
-- A body_N.len beside a body holds its v2 Inference-Header-Content-Length.
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

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests": %d, "duration_us": %d, "errors": %d, "non_2xx": %d, "p50_us": %d, "p90_us": %d, "p99_us": %d, "max_us": %d}\n',
    summary.requests, summary.duration, e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
