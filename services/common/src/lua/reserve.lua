local n = tonumber(ARGV[1])
local scan = tonumber(ARGV[2])
local timeout_at = ARGV[3]
local ttl = tonumber(ARGV[4])
local random = ARGV[5] == '1'
local used, usedop = {}, {}
-- Workers that hold or held a replica of the task, and their operators: a reassignment
-- keeps the task's replicas on distinct workers and operators across attempts.
for _, w in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  used[w] = true
  local op = redis.call('HGET', 'sundara:worker:' .. w, 'operator')
  if op and op ~= '' then usedop[op] = true end
end
local result, need = {}, {}
for i = 1, n do
  local aid = ARGV[5 + i]
  local held = redis.call('HMGET', 'sundara:asg:' .. aid, 'slice', 'worker')
  if held[1] then
    local op = redis.call('HGET', 'sundara:worker:' .. held[2], 'operator')
    result[i] = {held[1], held[2], (op and op ~= '') and op or held[2]}
  else
    table.insert(need, i)
  end
end
if #need > 0 then
  -- The candidate set holds only live slices with a free slot, ordered by expected
  -- completion time, so walking it in order and taking the first eligible slices picks
  -- the fastest: one look per replica when nothing is excluded (O(log N) for the range).
  -- At most 4 windows of `scan` are read (slices of workers that already hold the task,
  -- or of an operator already picked, or quarantined, are skipped).
  local picks = {}
  local seen = 0
  while #picks < #need and seen < scan * 4 do
    local cands
    if random then
      cands = redis.call('ZRANDMEMBER', KEYS[1], scan)
    else
      cands = redis.call('ZRANGE', KEYS[1], seen, seen + scan - 1)
    end
    if #cands == 0 then break end
    for _, s in ipairs(cands) do
      seen = seen + 1
      local h = redis.call('HMGET', 'sundara:slice:' .. s, 'worker', 'slots_free', 'state', 'operator')
      local w, free, op = h[1], tonumber(h[2]), h[4]
      local op_known = op and op ~= ''
      if w and h[3] == 'alive' and free and free > 0 and not used[w] and not (op_known and usedop[op])
          and redis.call('HEXISTS', 'sundara:quarantined', w) == 0
          and not (op_known and redis.call('HEXISTS', 'sundara:quarantined_ops', op) == 1) then
        used[w] = true
        if op_known then usedop[op] = true end
        table.insert(picks, {s, w, op_known and op or w})
        if #picks == #need then break end
      end
    end
  end
  if #picks < #need then return {} end
  for j, i in ipairs(need) do
    local s, w, aid = picks[j][1], picks[j][2], ARGV[5 + i]
    redis.call('HINCRBY', 'sundara:slice:' .. s, 'slots_free', -1)
    rescore(s)
    redis.call('HSET', 'sundara:asg:' .. aid, 'slice', s, 'worker', w, 'answer_by', timeout_at, unpack(measure_fields(s, KEYS[1])))
    redis.call('PEXPIRE', 'sundara:asg:' .. aid, ttl)
    redis.call('ZADD', 'sundara:inflight', timeout_at, aid)
    redis.call('SADD', 'sundara:inflight:w:' .. w, aid)
    redis.call('SADD', KEYS[2], w)
    redis.call('PEXPIRE', KEYS[2], ttl)
    result[i] = picks[j]
  end
end
local flat = {}
for i = 1, n do
  for _, v in ipairs(result[i]) do table.insert(flat, v) end
end
return flat
