local s, w = ARGV[1], ARGV[2]
redis.call('HSET', KEYS[1], 'state', 'failed', 'reason', ARGV[3])
redis.call('ZREM', 'sundara:slicemem', s)
for _, m in ipairs(redis.call('SMEMBERS', KEYS[1] .. ':models')) do
  redis.call('ZREM', 'sundara:cand:' .. m, s)
end
local n = 0
for _, aid in ipairs(redis.call('SMEMBERS', 'sundara:inflight:w:' .. w)) do
  if redis.call('HGET', 'sundara:asg:' .. aid, 'slice') == s then
    redis.call('ZADD', 'sundara:inflight', 0, aid)
    redis.call('HSET', 'sundara:asg:' .. aid, 'handed', 1)
    -- The worker gave no outcome for it: another of its slices may take the replica.
    redis.call('SREM', 'sundara:taskw:' .. string.match(aid, '^[^.]+'), w)
    n = n + 1
  end
end
return n
