#!lua
-- The shebang (no allow-oom flag) makes a full Redis refuse this script
-- before it runs: under maxmemory with noeviction an admission must not
-- write (its first write is not deny-OOM otherwise), so room stays for
-- revocations, which may always write.
--
-- Admission for one request, atomically: revocation, session, expiry, and the
-- exact sliding windows (session, then optional user).
--
-- KEYS[1] session hash  {p}:{h}:s  fields lim, exp, uh, sid, user, wf, wv
-- KEYS[2] window zset   {p}:{h}:w  one member per admitted request, score = µs
-- KEYS[3] revoked flag  {p}:{h}:r
-- ARGV[1] window length in µs
-- ARGV[2] "1" to admit unknown secrets under ARGV[3]
-- ARGV[3] default limit
-- ARGV[4] per-user limit, "0" for none
-- ARGV[5] user window key prefix; the user hash and "}:w" complete it
--         (standalone Redis only: the key lives in another slot)
-- ARGV[6] deadline, µs of Redis TIME, "0" for none: the gateway answers 503
--         when Redis takes longer, so a script that runs later (a paused
--         server runs what its socket holds when it resumes) must not count
-- ARGV[7] this admission's window member, unique, chosen by the gateway so
--         it can remove the member if it answered 503 anyway (void.lua)
--
-- Returns {outcome, s_limit, s_remaining, s_wait_ms, s_reset_ms,
--          u_limit, u_remaining, u_wait_ms, u_reset_ms,
--          sid, user, workflow_id, workflow_version, expires_at}, cut short
-- where the rest does not apply: 1 field when no window was read (revoked,
-- expired, unknown), 5 when the session window refused, 9 when the user
-- window refused or an unknown secret was admitted (u_limit 0: no user
-- window), all 14 when a registered session was admitted.
-- Outcome codes are gateway.ratelimit.Outcome. Rejected requests add nothing.
--
-- Time is the server's TIME, one clock for every replica. Redis 7 replicates
-- scripts by effects, so reading TIME before writing is allowed.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local window = tonumber(ARGV[1])
local deadline = tonumber(ARGV[6])
if deadline > 0 and now > deadline then
  return redis.error_reply('LATE the admission reached Redis after its deadline')
end

if redis.call('EXISTS', KEYS[3]) == 1 then
  return {3}
end

local s = redis.call('HMGET', KEYS[1], 'lim', 'exp', 'uh', 'sid', 'user', 'wf', 'wv')
local limit = tonumber(s[1])
if not limit then
  if ARGV[2] ~= '1' then
    return {5}
  end
  limit = tonumber(ARGV[3])
elseif tonumber(s[2]) * 1000000 <= now then
  return {4}
end

-- Prune what left the window; report count, µs until the oldest and newest leave.
local function state(key)
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
  local count = redis.call('ZCARD', key)
  if count == 0 then
    return 0, 0, 0
  end
  local oldest = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
  local newest = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
  return count, tonumber(oldest[2]) + window - now, tonumber(newest[2]) + window - now
end

local function ms(us)
  return math.ceil(us / 1000)
end

local count, wait, reset = state(KEYS[2])
if count >= limit then
  return {1, limit, 0, ms(wait), ms(reset)}
end

local user_limit = tonumber(ARGV[4])
local ukey = nil
local ucount, uwait, ureset = 0, 0, 0
if user_limit > 0 and s[3] then
  ukey = ARGV[5] .. s[3] .. '}:w'
  ucount, uwait, ureset = state(ukey)
  if ucount >= user_limit then
    return {2, limit, limit - count, ms(wait), ms(reset), user_limit, 0, ms(uwait), ms(ureset)}
  end
end

-- Admit.
local ttl = ms(window) + 1000
redis.call('ZADD', KEYS[2], now, ARGV[7])
redis.call('PEXPIRE', KEYS[2], ttl)
if count == 0 then wait = window end
local reply = {0, limit, limit - count - 1, ms(wait), ms(window), 0, 0, 0, 0}
if ukey then
  redis.call('ZADD', ukey, now, ARGV[7])
  redis.call('PEXPIRE', ukey, ttl)
  if ucount == 0 then uwait = window end
  reply[6], reply[7], reply[8], reply[9] =
    user_limit, user_limit - ucount - 1, ms(uwait), ms(window)
end
if not s[1] then
  -- An unknown secret admitted under the default limit: nobody to name.
  return reply
end
reply[10] = s[4] or ''
reply[11] = s[5] or ''
reply[12] = s[6] or ''
reply[13] = s[7] or ''
reply[14] = tonumber(s[2])
return reply
