#!lua flags=allow-oom
-- Revoke a session id (a cancel may come before, or without, its registration).
--
-- KEYS[1] session id revoked flag  {p}:{sid:S}:r
-- KEYS[2] session id -> secret hash {p}:{sid:S}:h
-- ARGV[1] TTL, seconds
--
-- Returns {1 if newly set else 0, the secret hash or nil}.
-- Always writes; allow-oom: see revoke_secret.lua.

local created = redis.call('SET', KEYS[1], '1', 'EX', ARGV[1], 'NX')
if not created then
  redis.call('SET', KEYS[1], '1', 'KEEPTTL')  -- always a write: see revoke_secret.lua
end
return {created and 1 or 0, redis.call('GET', KEYS[2])}
