local w = ARGV[1]
if redis.call('EXISTS', 'sundara:hb:' .. w) == 1 then return -1 end
local wkey = 'sundara:worker:' .. w
if redis.call('HGET', wkey, 'state') == 'dead' then return -1 end
redis.call('HSET', wkey, 'state', 'dead')
local slices = redis.call('HGET', wkey, 'slices') or ''
for s in string.gmatch(slices, '[^,]+') do
  redis.call('HSET', 'sundara:slice:' .. s, 'state', 'dead')
  redis.call('ZREM', 'sundara:slicemem', s)
  for _, m in ipairs(redis.call('SMEMBERS', 'sundara:slice:' .. s .. ':models')) do
    redis.call('ZREM', 'sundara:cand:' .. m, s)
  end
end
local aids = redis.call('SMEMBERS', 'sundara:inflight:w:' .. w)
for _, aid in ipairs(aids) do
  redis.call('ZADD', 'sundara:inflight', 0, aid)
  redis.call('HSET', 'sundara:asg:' .. aid, 'handed', 1)
end
return #aids
