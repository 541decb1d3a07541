local w = ARGV[1]
if redis.call('HSETNX', 'sundara:quarantined', w, ARGV[2]) == 0 then return 0 end
redis.call('HSET', 'sundara:worker:' .. w, 'state', 'quarantined')
local slices = redis.call('HGET', 'sundara:worker:' .. w, 'slices') or ''
for s in string.gmatch(slices, '[^,]+') do
  redis.call('HSET', 'sundara:slice:' .. s, 'state', 'quarantined', 'reason', ARGV[2])
  redis.call('ZREM', 'sundara:slicemem', s)
  for _, m in ipairs(redis.call('SMEMBERS', 'sundara:slice:' .. s .. ':models')) do
    redis.call('ZREM', 'sundara:cand:' .. m, s)
  end
end
for _, aid in ipairs(redis.call('SMEMBERS', 'sundara:inflight:w:' .. w)) do
  redis.call('ZADD', 'sundara:inflight', 0, aid)
  redis.call('HSET', 'sundara:asg:' .. aid, 'handed', 1)
end
return 1
