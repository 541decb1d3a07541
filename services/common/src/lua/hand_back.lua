-- Only the current holder of a live assignment (reserved, not yet answered or released)
-- can hand it back: a miner cannot make another's assignment due, nor hand back one it
-- already answered (the gateway also refuses one whose outcome is stored). The worker
-- gave no outcome for it, so it is eligible again for the replica on another of its
-- slices; should it answer the handed-back ticket anyway and hold another replica too,
-- the verifier counts one worker once.
local key = 'sundara:asg:' .. ARGV[1]
local h = redis.call('HMGET', key, 'worker', 'handed')
if h[1] ~= ARGV[2] then return 0 end
if not redis.call('ZSCORE', 'sundara:inflight', ARGV[1]) then return 0 end
if h[2] then return 1 end
redis.call('ZADD', 'sundara:inflight', 'XX', 0, ARGV[1])
redis.call('HSET', key, 'handed', 1)
redis.call('SREM', 'sundara:taskw:' .. string.match(ARGV[1], '^[^.]+'), ARGV[2])
return 1
