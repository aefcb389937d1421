#!lua flags=allow-oom
-- Take every active session out of a user's index, and ban the user.
--
-- KEYS[1] the user's sessions  {p}:{u:U}:ix   KEYS[2] entries  {p}:{u:U}:ie
-- KEYS[3] the user's ban       {p}:{u:U}:ban
-- ARGV[1] ban length, seconds (0: no ban, only revoke what is active)
--
-- Returns {sid, entry JSON, ...} of the unexpired sessions; the caller
-- revokes each one (its keys live in other slots). allow-oom: like a
-- revocation, a ban protects, and gets in when Redis is full.

local now = tonumber(redis.call('TIME')[1])
local live = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. now, '+inf')
local reply = {}
for _, sid in ipairs(live) do
  local entry = redis.call('HGET', KEYS[2], sid)
  if entry then
    reply[#reply + 1] = sid
    reply[#reply + 1] = entry
  end
end
redis.call('DEL', KEYS[1], KEYS[2])
if tonumber(ARGV[1]) > 0 then
  redis.call('SET', KEYS[3], '1', 'EX', ARGV[1])
end
return reply
