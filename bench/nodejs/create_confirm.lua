-- wrk script for the Node.js baseline (bench/nodejs): POST /v1/payment_intents
-- with confirm=true and a unique Idempotency-Key per request. The key comes
-- from NODEBENCH_KEY (what bench/nodejs/run printed), else PAYMENTD_KEY. Counts non-200 answers
-- and prints them at the end.
local key = os.getenv("NODEBENCH_KEY") or os.getenv("PAYMENTD_KEY")
local counter = 0
local threads = {}

function setup(thread)
  thread:set("tid", #threads + 1)
  table.insert(threads, thread)
end

function init(args)
  math.randomseed(os.time() + (tid or 0) * 7919)
  prefix = string.format("nodebench-%d-%d-%d-", os.time(), tid or 0, math.random(1, 1000000000))
  errors = 0
end

request = function()
  counter = counter + 1
  return wrk.format("POST", "/v1/payment_intents", {
    ["Authorization"] = "Bearer " .. key,
    ["Content-Type"] = "application/x-www-form-urlencoded",
    ["Idempotency-Key"] = prefix .. counter,
  }, "amount=2000&currency=usd&payment_method=pm_card_visa&confirm=true")
end

response = function(status, headers, body)
  if status ~= 200 then errors = errors + 1 end
end

function done(summary, latency, requests)
  local e = 0
  for _, t in ipairs(threads) do e = e + (t:get("errors") or 0) end
  io.write(string.format("non-200 answers: %d\n", e))
  io.write(string.format("latency p50 %.2f ms, p90 %.2f ms, p99 %.2f ms\n",
    latency:percentile(50) / 1000, latency:percentile(90) / 1000, latency:percentile(99) / 1000))
end
