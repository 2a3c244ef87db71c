-- wrk script: POST /v1/payment_intents with confirm=true and a unique
-- Idempotency-Key per request (the bench's create+confirm scenario).
local key = os.getenv("PAYMENTD_KEY")
local counter = 0
local thread_id = 0

function setup(thread)
  thread_id = thread_id + 1
  thread:set("tid", thread_id)
end

function init(args)
  math.randomseed(os.time() + (tid or 0))
  prefix = string.format("bench-%d-%d-", os.time(), math.random(1, 1000000000))
end

request = function()
  counter = counter + 1
  return wrk.format("POST", "/v1/payment_intents", {
    ["Authorization"] = "Bearer " .. key,
    ["Content-Type"] = "application/x-www-form-urlencoded",
    ["Idempotency-Key"] = prefix .. counter,
  }, "amount=2000&currency=usd&payment_method=pm_card_visa&confirm=true")
end

errors = 0
response = function(status, headers, body)
  if status ~= 200 then errors = errors + 1 end
end
