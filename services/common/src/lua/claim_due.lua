local due = redis.call('ZRANGEBYSCORE', 'sundara:inflight', '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
local lease = tonumber(ARGV[1]) + tonumber(ARGV[2])
for _, aid in ipairs(due) do redis.call('ZADD', 'sundara:inflight', lease, aid) end
return due
