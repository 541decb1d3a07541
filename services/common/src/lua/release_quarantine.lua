-- Lifts a quarantine. ARGV[1] names an operator (or a worker: a worker is its own operator
-- when it names none). The operator leaves `quarantined_ops`, and every worker announced
-- with that operator (and a worker of that name) leaves `quarantined`, with its timeouts
-- forgotten (else its next one would quarantine it again). A live worker and its
-- quarantined slices become `alive` again (`dead` without a heartbeat); its next heartbeat
-- puts its slices back in the candidate sets. Returns {operator released (0/1), workers...}.
local op = ARGV[1]
local released = {}
local function lift(w)
  if redis.call('HDEL', 'sundara:quarantined', w) == 1 then table.insert(released, w) end
  redis.call('HDEL', 'sundara:timeouts', w)
  local key = 'sundara:worker:' .. w
  if redis.call('HGET', key, 'state') == 'quarantined' then
    local state = 'dead'
    if redis.call('EXISTS', 'sundara:hb:' .. w) == 1 then state = 'alive' end
    redis.call('HSET', key, 'state', state)
    for s in string.gmatch(redis.call('HGET', key, 'slices') or '', '[^,]+') do
      if redis.call('HGET', 'sundara:slice:' .. s, 'state') == 'quarantined' then
        redis.call('HSET', 'sundara:slice:' .. s, 'state', state, 'reason', '')
      end
    end
  end
end
local was_op = redis.call('HDEL', 'sundara:quarantined_ops', op)
lift(op)
for _, w in ipairs(redis.call('SMEMBERS', 'sundara:workers')) do
  if w ~= op and redis.call('HGET', 'sundara:worker:' .. w, 'operator') == op then lift(w) end
end
local out = {was_op}
for _, w in ipairs(released) do table.insert(out, w) end
return out
