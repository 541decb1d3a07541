-- Admits one task of a tenant, or says why not (services/common/src/admission.rs).
-- Per tenant: tenant:<t>:inflight (task -> deadline), tenant:<t>:tat (the rate's
-- theoretical arrival time, GCRA), tenant:<t>:stored (task -> when it leaves TASKS),
-- tenant:<t>:stored_bytes (task -> its bytes) and tenant:<t>:stored_total (their sum);
-- fleet-wide: inflight:tasks (task -> deadline).
-- ARGV: tenant, task, now_ms, deadline_ms, rate_per_s (0 = none), burst, tenant max in
-- flight, fleet max in flight, bytes, stored_until_ms, tenant max stored bytes.
-- Returns {0} when admitted (also when this task already was: a retry), {1,
-- retry_after_ms}, {2} (tenant in flight), {3} (fleet in flight) or {4} (tenant's stored
-- bytes).
local t, id, now, deadline = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local rate, burst, tmax, fmax = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local bytes, until_ms, smax = tonumber(ARGV[9]), tonumber(ARGV[10]), tonumber(ARGV[11])
local prefix = 'sundara:tenant:' .. t
local tkey, fkey = prefix .. ':inflight', 'sundara:inflight:tasks'
local skey, bkey, totkey = prefix .. ':stored', prefix .. ':stored_bytes', prefix .. ':stored_total'
redis.call('ZREMRANGEBYSCORE', tkey, '-inf', now)
redis.call('ZREMRANGEBYSCORE', fkey, '-inf', now)
-- Tasks that have left TASKS no longer take the tenant's bytes; at most 1000 a call, so
-- one call stays short (each admission frees more than it adds).
local gone = redis.call('ZRANGEBYSCORE', skey, '-inf', now, 'LIMIT', 0, 1000)
for _, task in ipairs(gone) do
  local b = tonumber(redis.call('HGET', bkey, task) or 0)
  redis.call('HDEL', bkey, task)
  redis.call('ZREM', skey, task)
  redis.call('DECRBY', totkey, b)
end
if redis.call('ZSCORE', tkey, id) then return {0} end
local rkey, tat, interval = prefix .. ':tat', now, 0
if rate > 0 then
  interval = 1000 / rate
  tat = math.max(tonumber(redis.call('GET', rkey) or now), now)
  local allowed_at = tat - (burst - 1) * interval
  if now < allowed_at then return {1, math.ceil(allowed_at - now)} end
end
if redis.call('ZCARD', tkey) >= tmax then return {2} end
if redis.call('ZCARD', fkey) >= fmax then return {3} end
local counted = redis.call('HEXISTS', bkey, id) == 1
if not counted and tonumber(redis.call('GET', totkey) or 0) + bytes > smax then return {4} end
if rate > 0 then
  redis.call('SET', rkey, tostring(tat + interval), 'PX', math.ceil(burst * interval) + 1000)
end
redis.call('ZADD', tkey, deadline, id)
redis.call('ZADD', fkey, deadline, id)
if not counted then
  redis.call('ZADD', skey, until_ms, id)
  redis.call('HSET', bkey, id, bytes)
  redis.call('INCRBY', totkey, bytes)
end
-- Sets of idle tenants expire after their last deadline (stored bytes: after their
-- tasks have left TASKS).
for _, key in ipairs({tkey, fkey}) do
  if redis.call('PTTL', key) < deadline - now + 1000 then redis.call('PEXPIRE', key, deadline - now + 1000) end
end
for _, key in ipairs({skey, bkey, totkey}) do
  if redis.call('PTTL', key) < until_ms - now + 1000 then redis.call('PEXPIRE', key, until_ms - now + 1000) end
end
return {0}
