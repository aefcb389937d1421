-- A session about to be handed out: the user's ban and active-session cap,
-- checked and the session indexed in one atomic step.
--
-- KEYS[1] the user's sessions, sid -> expires_at  {p}:{u:U}:ix (zset)
-- KEYS[2] the user's session entries              {p}:{u:U}:ie (hash, JSON)
-- KEYS[3] the user's ban                          {p}:{u:U}:ban
-- ARGV[1] session id      ARGV[2] secret hash   ARGV[3] app ("" if learned)
-- ARGV[4] workflow id     ARGV[5] expires_at, unix seconds
-- ARGV[6] at most this many active sessions for the app and workflow (0: any)
-- ARGV[7] "1": refuse beyond it; else the oldest sessions make room
-- ARGV[8] retention after expiry, seconds
--
-- Returns {0, 0, sid, hash, ...}: opened, and the sessions to revoke;
-- {1, ms}: the user is banned for ms more; {2, ms}: too many sessions, one
-- expires in ms. Times come from the server's TIME, the one shared clock.

local t = redis.call('TIME')
local now = tonumber(t[1])
local now_ms = now * 1000 + math.floor(tonumber(t[2]) / 1000)
-- Fixed width, so that creation times compare as strings (cjson would
-- round a number of microseconds to 14 digits).
local created = t[1] .. '.' .. string.format('%06d', tonumber(t[2]))

local ban = redis.call('PTTL', KEYS[3])
if ban > 0 then
  return {1, ban}
end

local gone = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
if #gone > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
  redis.call('HDEL', KEYS[2], unpack(gone))
end

local reply = {0, 0}
local cap = tonumber(ARGV[6])
if cap > 0 then
  local mine = {}
  local all = redis.call('HGETALL', KEYS[2])
  for i = 1, #all, 2 do
    local entry = cjson.decode(all[i + 1])
    if entry.a == ARGV[3] and entry.w == ARGV[4] then
      mine[#mine + 1] = {all[i], entry}
    end
  end
  if #mine >= cap then
    if ARGV[7] == '1' then
      local soonest = nil
      for _, m in ipairs(mine) do
        if soonest == nil or m[2].e < soonest then soonest = m[2].e end
      end
      return {2, math.max(soonest * 1000 - now_ms, 1)}
    end
    table.sort(mine, function(x, y) return x[2].c < y[2].c end)
    for i = 1, #mine - cap + 1 do
      redis.call('ZREM', KEYS[1], mine[i][1])
      redis.call('HDEL', KEYS[2], mine[i][1])
      reply[#reply + 1] = mine[i][1]
      reply[#reply + 1] = mine[i][2].h
    end
  end
end

redis.call('ZADD', KEYS[1], ARGV[5], ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], cjson.encode({
  a = ARGV[3], w = ARGV[4], h = ARGV[2], c = created, e = tonumber(ARGV[5])
}))
local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
local keep_until = tonumber(last[2]) + tonumber(ARGV[8])
redis.call('EXPIREAT', KEYS[1], keep_until)
redis.call('EXPIREAT', KEYS[2], keep_until)
return reply
