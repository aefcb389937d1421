-- Count one create against its app's exact sliding window, and record the
-- session among the app's sessions.
--
-- KEYS[1] the app's creates, sid -> µs                {p}:{app:A}:c (zset)
-- KEYS[2] the app's sessions, sid -> expires_at       {p}:{app:A}:a (zset)
-- ARGV[1] creates allowed per window (0: any)  ARGV[2] window, µs
-- ARGV[3] session id  ARGV[4] expires_at, unix seconds  ARGV[5] retention, seconds
--
-- Returns {1, 0} counted, or {0, ms until the oldest create leaves the window}.

local t = redis.call('TIME')
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
local window = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', string.format('%.0f', now_us - window))
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', t[1])
local limit = tonumber(ARGV[1])
if limit > 0 and redis.call('ZCARD', KEYS[1]) >= limit then
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return {0, math.max(math.ceil((tonumber(oldest[2]) + window - now_us) / 1000), 1)}
end
redis.call('ZADD', KEYS[1], string.format('%.0f', now_us), ARGV[3])
redis.call('PEXPIRE', KEYS[1], math.ceil(window / 1000))
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[3])
local last = redis.call('ZRANGE', KEYS[2], -1, -1, 'WITHSCORES')
redis.call('EXPIREAT', KEYS[2], tonumber(last[2]) + tonumber(ARGV[5]))
return {1, 0}
