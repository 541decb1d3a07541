local key = 'sundara:asg:' .. ARGV[1]
local h = redis.call('HMGET', key, 'slice', 'worker', 'answer_by', 'model', 'at', 'queue', 'cold')
if not h[1] then return 0 end
if ARGV[2] and ARGV[2] ~= h[2] then return 0 end
if ARGV[3] and h[3] and tonumber(ARGV[3]) > tonumber(h[3]) then return 0 end
-- Its holder answered in time: its timeouts (TIMEOUT_STRIKE) count again from zero, so only
-- timeouts in a row quarantine, not a few spread over weeks of honest work under load.
if ARGV[2] then redis.call('HDEL', 'sundara:timeouts', ARGV[2]) end
redis.call('DEL', key)
redis.call('ZREM', 'sundara:inflight', ARGV[1])
redis.call('SREM', 'sundara:inflight:w:' .. h[2], ARGV[1])
local slice = 'sundara:slice:' .. h[1]
if redis.call('EXISTS', slice) == 1 then
  -- Its holder answered in time: the validator side's own measure (reserved -> answer
  -- stored), never the worker's claim. Moving averages of µs per model, per slice and,
  -- slower, the fleet's (the estimate where a slice has none of its own): the service time
  -- per task (`svc`, over the queue ahead and the task itself) from reservations made
  -- while the slice reported the model loaded, and from the others the load time (`load`,
  -- `loadus`): what the answer took per task of the queue beyond that service time. An
  -- answer no slower than the service time is no sample: the slice had the model loaded
  -- after all (it loaded it for an earlier task and had not reported it yet).
  -- A service time sample counts as at most twice the average so far: one answer that
  -- waited behind something else (another model's load on the slice, a pause) moves a
  -- slice's average up by at most α, not by its whole size, so an honest slice is not
  -- priced out of the work that would correct it. A slice that really slows down gets
  -- there in steps (×1.2 an answer); the first sample stands as measured.
  local function average(hash, alpha, us, capped)
    local old = tonumber(redis.call('HGET', hash, h[4]))
    if old and capped then us = math.min(us, 2 * old) end
    local new = old and old + alpha * (us - old) or us
    redis.call('HSET', hash, h[4], string.format('%d', math.max(math.floor(new + 0.5), 1)))
  end
  if ARGV[2] and h[4] and h[5] then
    local at = tonumber(h[5])
    local stored = tonumber(ARGV[4]) or tonumber(ARGV[3]) * 1000
    local took = stored - at
    local queue = 1 + (tonumber(h[6]) or 0)
    -- The last load measured on the slice (`cold_from`, `cold_to`: a cold reservation and
    -- its answer, µs): an answer that overlapped it may have waited for it, no sample.
    local last = redis.call('HMGET', slice, 'cold_from', 'cold_to')
    local behind_load = last[1] and tonumber(last[1]) < stored and tonumber(last[2]) > at
    if took > 0 and not h[7] and not behind_load then
      average(slice .. ':svc', 0.2, took / queue, true)
      average('sundara:svc', 0.05, took / queue, true)
    elseif took > 0 and h[7] then
      -- (With no service time measured yet, the load is counted with the task's own time.)
      local service = tonumber(redis.call('HGET', slice .. ':svc', h[4]))
        or tonumber(redis.call('HGET', 'sundara:svc', h[4])) or 0
      local load = took / queue - service
      if load > 0 then
        redis.call('HSET', slice, 'cold_from', h[5], 'cold_to', string.format('%d', stored))
        average(slice .. ':load', 0.2, load)
        average('sundara:loadus', 0.05, load)
      end
    end
  end
  local free = redis.call('HINCRBY', slice, 'slots_free', 1)
  local total = tonumber(redis.call('HGET', slice, 'slots_total'))
  if total and free > total then
    redis.call('HSET', slice, 'slots_free', total)
  end
  -- A dead, failed or quarantined slice stays out of the candidate sets.
  rescore(h[1])
end
return 1
