local function rescore(s)
  local key = 'sundara:slice:' .. s
  local h = redis.call('HMGET', key, 'state', 'slots_total', 'slots_free', 'lanes', 'memory_total', 'worker')
  local models = redis.call('SMEMBERS', key .. ':models')
  local free = tonumber(h[3])
  if h[1] ~= 'alive' or not free or free <= 0 then
    for _, m in ipairs(models) do redis.call('ZREM', 'sundara:cand:' .. m, s) end
    return
  end
  local in_use = math.max((tonumber(h[2]) or free) - free, 0)
  local lanes = math.max(tonumber(h[4]) or 1, 1)
  local gib = (tonumber(h[5]) or 0) / 1073741824
  local rep = h[6] and tonumber(redis.call('HGET', 'sundara:reputation', h[6])) or 1
  for _, m in ipairs(models) do
    -- Times are measured on the validator side (RELEASE). Service: this slice's own, else
    -- the fleet's, else 10 ms. A slice that does not report the model loaded (`warm`)
    -- pays a load first: its own measured load time, else the fleet's, else 1 s. So a
    -- cold load is chosen only when it beats the queues of the loaded copies.
    local service = tonumber(redis.call('HGET', key .. ':svc', m))
      or tonumber(redis.call('HGET', 'sundara:svc', m)) or 10000
    local cold = 0
    if redis.call('SISMEMBER', key .. ':warm', m) == 0 then
      cold = tonumber(redis.call('HGET', key .. ':load', m))
        or tonumber(redis.call('HGET', 'sundara:loadus', m)) or 1000000
    end
    local expected = cold + service * (1 + in_use / lanes)
    redis.call('ZADD', 'sundara:cand:' .. m, expected * (2 - rep) + gib, s)
  end
end

-- What a reservation on slice `s` keeps for RELEASE to measure times with (as HSET
-- field/value pairs), called once the slot is taken: the model (from the key
-- `sundara:cand:<model>`), when it was reserved (µs, Redis' clock), the queue ahead of it
-- in lanes ((in use - 1) / lanes), and `cold` where the slice does not report the model
-- loaded (its time then includes a load).
local function measure_fields(s, cand)
  local key = 'sundara:slice:' .. s
  local m = string.sub(cand, 14)
  local h = redis.call('HMGET', key, 'slots_total', 'slots_free', 'lanes')
  local ahead = math.max((tonumber(h[1]) or 0) - (tonumber(h[2]) or 0) - 1, 0)
  local t = redis.call('TIME')
  local queue = ahead / math.max(tonumber(h[3]) or 1, 1)
  local f = {'model', m, 'at', t[1] .. string.format('%06d', tonumber(t[2])), 'queue', string.format('%.4f', queue)}
  if redis.call('SISMEMBER', key .. ':warm', m) == 0 then
    table.insert(f, 'cold')
    table.insert(f, '1')
  end
  return f
end
