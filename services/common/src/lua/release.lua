local key = 'sundara:asg:' .. ARGV[1]
local h = redis.call('HMGET', key, 'slice', 'worker', 'answer_by')
if not h[1] then return 0 end
if ARGV[2] and ARGV[2] ~= h[2] then return 0 end
if ARGV[3] and h[3] and tonumber(ARGV[3]) > tonumber(h[3]) then return 0 end
redis.call('DEL', key)
redis.call('ZREM', 'sundara:inflight', ARGV[1])
redis.call('SREM', 'sundara:inflight:w:' .. h[2], ARGV[1])
local slice = 'sundara:slice:' .. h[1]
if redis.call('EXISTS', slice) == 1 then
  local free = redis.call('HINCRBY', slice, 'slots_free', 1)
  local total = tonumber(redis.call('HGET', slice, 'slots_total'))
  if total and free > total then
    redis.call('HSET', slice, 'slots_free', total)
  end
  -- A dead, failed or quarantined slice stays out of the candidate sets.
  rescore(h[1])
end
return 1
