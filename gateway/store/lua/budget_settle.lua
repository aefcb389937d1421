#!lua flags=allow-oom
-- allow-oom: a charge is written even when Redis is full, or a spent
-- budget would read as unspent (reservations, in budget_reserve.lua, are not).
--
-- Settle one model call: its reservation is dropped and its charge recorded,
-- atomically. A reservation already gone was charged when its lease ended
-- (budget_reserve.lua): the call is not charged twice.
--
-- KEYS[1] charges zset, KEYS[2] reservations hash (see budget_reserve.lua)
-- ARGV[1] call id  ARGV[2] session id  ARGV[3] input tokens  ARGV[4] cached
-- ARGV[5] output tokens  ARGV[6] micro-dollars  ARGV[7] model
-- ARGV[8] how long charges are kept, ms
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
redis.call('PEXPIRE', KEYS[1], ARGV[8])
return 1
