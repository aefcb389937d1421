#!lua flags=allow-oom
-- Revoke one secret: set its flag for as long as its session can be used.
--
-- KEYS[1] session hash  {p}:{h}:s  (fields sid, exp; may be absent)
-- KEYS[2] revoked flag  {p}:{h}:r
-- ARGV[1] retention after expiry, seconds
-- ARGV[2] TTL in ms for a secret whose session is unknown
-- ARGV[3] shortest TTL in ms
--
-- Returns {1 if newly set else 0, sid or nil, exp or nil}. Always writes.
--
-- The TTL is computed here, from the server's TIME: a replica whose clock
-- runs fast would otherwise let the flag expire while the session lives.
-- allow-oom: a full Redis (maxmemory, noeviction) refuses admissions and
-- registrations, but a revocation protects a user and always gets in.

local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local s = redis.call('HMGET', KEYS[1], 'sid', 'exp')
local ttl = tonumber(ARGV[2])
if s[2] then
  ttl = math.max((tonumber(s[2]) + tonumber(ARGV[1])) * 1000 - now_ms, tonumber(ARGV[3]))
end
local created = redis.call('SET', KEYS[2], '1', 'PX', ttl, 'NX')
if not created then
  -- Written again all the same: the WAIT sent after this script measures
  -- the connection's last write, and a repeat after a WAIT that timed out
  -- must not be measured by an older write, or by none on a new connection
  -- (Redis versions differ in what they count when a command wrote nothing).
  redis.call('SET', KEYS[2], '1', 'KEEPTTL')
end
return {created and 1 or 0, s[1], s[2]}
