#!lua flags=allow-oom
-- Undo one admission whose request the gateway refused with 503 (its batch
-- timed out or failed) although Redis may have run it, or may run it later.
--
-- KEYS[1] session hash  {p}:{h}:s  (fields uh, c:<class>)
-- KEYS[2] window zset   {p}:{h}:w
-- ARGV[1] the admission's member (admit.lua ARGV[7])
-- ARGV[2] user window key prefix (as admit.lua ARGV[5])
-- ARGV[3] "1" when user windows are in use (standalone Redis only)
-- ARGV[4] the admission's class (admit.lua ARGV[8])
-- ARGV[5] the user class window prefix (admit.lua ARGV[9])
-- ARGV[6] what the admission needed (admit.lua ARGV[10])
-- ARGV[7] the model token grant it wrote (admit.lua ARGV[13]), "" for none
--
-- Idempotent: removing a member that is not there changes nothing.
-- allow-oom: it only frees memory.

redis.call('ZREM', KEYS[2], ARGV[1])
local s = redis.call('HMGET', KEYS[1], 'uh', 'c:' .. ARGV[4])
local uh = s[1]
if ARGV[3] == '1' and uh then
  redis.call('ZREM', ARGV[2] .. uh .. '}:w', ARGV[1])
end
if ARGV[4] ~= '' and s[2] then
  for scope, seconds in string.gmatch(s[2], '([su])(%d+):%d+') do
    if scope == 's' then
      redis.call('ZREM', KEYS[2] .. ':' .. ARGV[4] .. ':' .. seconds, ARGV[1])
    elseif ARGV[5] ~= '' and uh then
      redis.call('ZREM', ARGV[5] .. uh .. ':' .. ARGV[4] .. ':' .. seconds, ARGV[1])
    end
  end
end
if ARGV[6] == 'attach' then
  redis.call('ZREM', KEYS[2] .. ':files', ARGV[1])
end
if ARGV[7] and ARGV[7] ~= '' then
  redis.call('DEL', ARGV[7])
end
return 1
