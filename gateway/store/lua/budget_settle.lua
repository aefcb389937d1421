#!lua flags=allow-oom
-- allow-oom: a charge is written even when Redis is full, or a spent budget
-- would read as unspent (reservations, in budget.lua, are refused instead).
--
-- Settle one model call: its reservation is dropped and its charge recorded,
-- atomically, into the charges and every window's running sum (see
-- budget.lua for the keys). A reservation already gone was charged when its
-- lease ended: the call is not charged twice.
--
-- KEYS[1] charges zset, KEYS[2] reservations hash, KEYS[3] sums hash
-- ARGV[1] call id  ARGV[2] session id  ARGV[3] input tokens  ARGV[4] cached
-- ARGV[5] output tokens  ARGV[6] micro-dollars  ARGV[7] model
-- ARGV[8] how long keys are kept, ms
--
-- Returns 1 when charged, 0 when the lease had already charged it.

if redis.call('HDEL', KEYS[2], ARGV[1]) == 0 then
  return 0
end
-- Nothing used (the model answered an error): the room is freed, no charge kept.
if ARGV[3] == '0' and ARGV[5] == '0' and tonumber(ARGV[6]) == 0 then
  return 1
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
redis.call('ZADD', KEYS[1], now, table.concat(
  {ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7]}, '|'))
-- Now is inside every window, so the charge counts in each sum. Without sums
-- (expired), the next reservation rebuilds them from the charges.
if redis.call('HEXISTS', KEYS[3], 'e86400') == 1 then
  local tokens = tonumber(ARGV[3]) + tonumber(ARGV[5])
  for _, window in ipairs({60, 3600, 86400}) do
    local w = tostring(window)
    redis.call('HINCRBYFLOAT', KEYS[3], 'u' .. w .. 't', tokens)
    redis.call('HINCRBYFLOAT', KEYS[3], 'u' .. w .. 'd', ARGV[6])
    redis.call('HINCRBYFLOAT', KEYS[3], 's' .. w .. '|' .. ARGV[2] .. 't', tokens)
    redis.call('HINCRBYFLOAT', KEYS[3], 's' .. w .. '|' .. ARGV[2] .. 'd', ARGV[6])
  end
end
for _, key in ipairs(KEYS) do
  redis.call('PEXPIRE', key, ARGV[8])
end
return 1
