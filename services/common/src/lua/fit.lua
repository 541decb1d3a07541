-- Whether a model version (ARGV[1], `name@version`) fits a live slice, for admission.
-- Walks the live slices from the largest (at most ARGV[2] of them) and stops at the first
-- that does not itself report the model larger than its memory: returns {its own footprint
-- of the model (-1 when it reported none), its memory}. A slice's footprint only ever
-- rules out that slice, so no miner's claim can make the model too large for another's.
-- When every slice read rules itself out: {the largest one's footprint, its memory}, or {}
-- (admit) when there were more slices than the window read, or none.
local limit = tonumber(ARGV[2])
local slices = redis.call('ZREVRANGE', 'sundara:slicemem', 0, limit - 1, 'WITHSCORES')
local largest = nil
for i = 1, #slices, 2 do
  local s, mem = slices[i], tonumber(slices[i + 1])
  local fp = tonumber(redis.call('HGET', 'sundara:slice:' .. s .. ':footprint', ARGV[1]))
  if not fp or fp <= mem then return {fp or -1, mem} end
  if not largest then largest = {fp, mem} end
end
if largest and #slices < 2 * limit then return largest end
return {}
