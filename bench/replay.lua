-- wrk script: the same Idempotency-Key again and again; every answer after
-- the first is a stored replay (the bench's replay scenario).
local key = os.getenv("PAYMENTD_KEY")
local idem = os.getenv("REPLAY_KEY")
request = function()
  return wrk.format("POST", "/v1/payment_intents", {
    ["Authorization"] = "Bearer " .. key,
    ["Content-Type"] = "application/x-www-form-urlencoded",
    ["Idempotency-Key"] = idem,
  }, "amount=2000&currency=usd&payment_method=pm_card_visa&confirm=true")
end
