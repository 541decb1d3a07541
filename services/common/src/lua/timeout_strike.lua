local h = redis.call('HMGET', 'sundara:asg:' .. ARGV[1], 'handed', 'worker')
if h[1] or h[2] ~= ARGV[2] then return 0 end
if redis.call('EXISTS', 'sundara:hb:' .. ARGV[2]) == 0 then return 0 end
-- Counted once, however often its reassignment is retried.
redis.call('HSET', 'sundara:asg:' .. ARGV[1], 'handed', 1)
return redis.call('HINCRBY', 'sundara:timeouts', ARGV[2], 1)
