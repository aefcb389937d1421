#!lua flags=allow-oom
-- Undo one admission whose request the gateway refused with 503 (its batch
-- timed out or failed) although Redis may have run it, or may run it later.
--
-- KEYS[1] session hash  {p}:{h}:s  (field uh)
-- KEYS[2] window zset   {p}:{h}:w
-- ARGV[1] the admission's member (admit.lua ARGV[7])
-- ARGV[2] user window key prefix (as admit.lua ARGV[5])
-- ARGV[3] "1" when user windows are in use (standalone Redis only)
--
-- Idempotent: removing a member that is not there changes nothing.
-- allow-oom: it only frees memory.

redis.call('ZREM', KEYS[2], ARGV[1])
if ARGV[3] == '1' then
  local uh = redis.call('HGET', KEYS[1], 'uh')
  if uh then
    redis.call('ZREM', ARGV[2] .. uh .. '}:w', ARGV[1])
  end
end
return 1
