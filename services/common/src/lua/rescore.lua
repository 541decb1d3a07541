local i = 1
while i <= #ARGV do
  local s, n = ARGV[i], tonumber(ARGV[i + 1])
  local key = 'sundara:slice:' .. s .. ':models'
  local serves = {}
  for j = 1, n do serves[ARGV[i + 1 + j]] = true end
  for _, m in ipairs(redis.call('SMEMBERS', key)) do
    if not serves[m] then redis.call('ZREM', 'sundara:cand:' .. m, s) end
  end
  redis.call('DEL', key)
  if n > 0 then redis.call('SADD', key, unpack(ARGV, i + 2, i + 1 + n)) end
  rescore(s)
  i = i + 2 + n
end
return 1
