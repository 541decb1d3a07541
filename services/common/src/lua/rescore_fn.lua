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
    local service = tonumber(redis.call('HGET', key .. ':svc', m))
    local cold = 0
    if not service then
      service = tonumber(redis.call('HGET', 'sundara:svc', m)) or 10000
      cold = tonumber(redis.call('HGET', 'sundara:loadus', m)) or 1000000
    end
    local expected = cold + service * (1 + in_use / lanes)
    redis.call('ZADD', 'sundara:cand:' .. m, expected * (2 - rep) + gib, s)
  end
end
