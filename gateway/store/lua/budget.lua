#!lua
-- A user's model-call budget in one workflow, atomically: reserve room for a
-- call, check that a turn has any room left, or settle a call's charge.
--
-- Spent amounts are running sums per window (1m, 1h, 1d), kept exact: each
-- charge is added once and subtracted once, when it leaves the window, so a
-- decision costs what changed since the last one, not the user's whole day.
-- No allow-oom flag: a full Redis refuses a reservation (the call gets 503);
-- a settle has its own script, budget_settle.lua, which may always write.
--
-- KEYS[1] charges zset  {p}:{b:<workflow>:<user hash>}:c
--         member "<call>|<sid>|<input>|<cached>|<output>|<usd>|<model>", score µs
-- KEYS[2] reservations hash, same tag, :r
--         field <call>, value "<sid>|<tokens>|<usd>|<lease end µs>|<input>|<output>|<model>"
-- KEYS[3] sums hash, same tag, :t
--         "e<L>": µs up to which charges have left window L (L in s: 60, 3600, 86400)
--         "u<L>t" / "u<L>d": the user's tokens / micro-dollars in window L
--         "s<L>|<sid>t" / "s<L>|<sid>d": one session's
-- ARGV[1] "reserve" or "check"
-- ARGV[2] this call's id        ARGV[3] its session id
-- ARGV[4] reserved input tokens  ARGV[5] reserved output tokens
-- ARGV[6] reserved micro-dollars ARGV[7] lease in µs
-- ARGV[8] the model (for the record)
-- ARGV[9] how long keys are kept, ms
-- ARGV[10..] windows, four values each: kind ("t" tokens | "d" dollars),
--         scope ("s" | "u"), length in seconds (60, 3600 or 86400),
--         limit (tokens | micro-dollars)
--
-- Returns {1} when admitted, else {0, index of the refusing window (1-based),
-- wait in ms until it could fit, or -1 if it never could}. With several
-- refusing windows, the longest wait is reported.
--
-- Time is Redis TIME, one clock for every replica. An expired lease (a
-- replica died mid-call) is charged its reservation at its lease's end.

local WINDOWS = {60, 3600, 86400}
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local mode, call, sid = ARGV[1], ARGV[2], ARGV[3]
local need_t, need_d = tonumber(ARGV[4]) + tonumber(ARGV[5]), tonumber(ARGV[6])
local lease, keep = tonumber(ARGV[7]), tonumber(ARGV[9])

local function split(s)
  local out, from = {}, 1
  while true do
    local bar = string.find(s, '|', from, true)
    if not bar then
      out[#out + 1] = string.sub(s, from)
      return out
    end
    out[#out + 1] = string.sub(s, from, bar - 1)
    from = bar + 1
  end
end

-- A charge's (session, tokens, micro-dollars) from its record.
local function amounts(member)
  local f = split(member)
  return f[2], tonumber(f[3]) + tonumber(f[5]), tonumber(f[6])
end

local function add(window, csid, tokens, usd, sign)
  local w = tostring(window)
  redis.call('HINCRBYFLOAT', KEYS[3], 'u' .. w .. 't', sign * tokens)
  redis.call('HINCRBYFLOAT', KEYS[3], 'u' .. w .. 'd', sign * usd)
  local st = 's' .. w .. '|' .. csid .. 't'
  local sd = 's' .. w .. '|' .. csid .. 'd'
  local left = tonumber(redis.call('HINCRBYFLOAT', KEYS[3], st, sign * tokens))
  redis.call('HINCRBYFLOAT', KEYS[3], sd, sign * usd)
  if sign < 0 and left <= 0 then
    -- The session's last charge left this window: its fields go too.
    redis.call('HDEL', KEYS[3], st, sd)
  end
end

-- Bring every window's sums up to now: rebuilt from the charges if they are
-- missing (first use, or expired), else what left each window subtracted.
if redis.call('HEXISTS', KEYS[3], 'e86400') == 0 then
  redis.call('DEL', KEYS[3])
  for _, window in ipairs(WINDOWS) do
    local edge = now - window * 1000000
    redis.call('HSET', KEYS[3], 'e' .. window, edge, 'u' .. window .. 't', 0, 'u' .. window .. 'd', 0)
    for _, member in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. edge, '+inf')) do
      local csid, tokens, usd = amounts(member)
      add(window, csid, tokens, usd, 1)
    end
  end
else
  for _, window in ipairs(WINDOWS) do
    local edge = tonumber(redis.call('HGET', KEYS[3], 'e' .. window))
    local new_edge = now - window * 1000000
    if new_edge > edge then
      for _, member in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. edge, new_edge)) do
        local csid, tokens, usd = amounts(member)
        add(window, csid, tokens, usd, -1)
      end
      redis.call('HSET', KEYS[3], 'e' .. window, new_edge)
    end
  end
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - 86400 * 1000000)

-- Calls in flight; leases that ended become charges, at their end.
local flight = {}
local raw = redis.call('HGETALL', KEYS[2])
for i = 1, #raw, 2 do
  local f = split(raw[i + 1])
  local ends = tonumber(f[4])
  if ends <= now then
    redis.call('HDEL', KEYS[2], raw[i])
    local member = table.concat({raw[i], f[1], f[5], '0', f[6], f[3], f[7]}, '|')
    redis.call('ZADD', KEYS[1], ends, member)
    for _, window in ipairs(WINDOWS) do
      if ends > now - window * 1000000 then
        add(window, f[1], tonumber(f[5]) + tonumber(f[6]), tonumber(f[3]), 1)
      end
    end
  else
    flight[#flight + 1] = {sid = f[1], t = tonumber(f[2]), d = tonumber(f[3])}
  end
end

local refused, worst = 0, -2
for w = 10, #ARGV, 4 do
  local kind, scope = ARGV[w], ARGV[w + 1]
  local window, limit = tonumber(ARGV[w + 2]), tonumber(ARGV[w + 3])
  local need = kind == 't' and need_t or need_d
  local field = scope == 'u' and ('u' .. window .. kind) or ('s' .. window .. '|' .. sid .. kind)
  local spent = tonumber(redis.call('HGET', KEYS[3], field) or '0')
  local reserved = 0
  for _, r in ipairs(flight) do
    if scope == 'u' or r.sid == sid then
      reserved = reserved + (kind == 't' and r.t or r.d)
    end
  end
  local function fits(used)
    if mode == 'check' then return used < limit end
    return used + need <= limit
  end
  if not fits(spent + reserved) then
    local wait = -1
    if need <= limit and (mode ~= 'check' or reserved < limit) then
      -- When enough of what was spent leaves the window (walked only when
      -- refusing); if the calls in flight alone leave no room, when they
      -- may have settled (1 s).
      local freed = 0
      local length = window * 1000000
      local rows = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. (now - length), '+inf', 'WITHSCORES')
      for i = 1, #rows, 2 do
        local csid, tokens, usd = amounts(rows[i])
        if scope == 'u' or csid == sid then
          freed = freed + (kind == 't' and tokens or usd)
          if fits(spent - freed + reserved) then
            wait = tonumber(rows[i + 1]) + length - now
            break
          end
        end
      end
      if wait < 0 then wait = 1000000 end
    end
    if worst ~= -1 and (wait == -1 or wait > worst) then
      refused, worst = (w - 10) / 4 + 1, wait
    end
  end
end
for _, key in ipairs(KEYS) do
  redis.call('PEXPIRE', key, keep)
end
if refused > 0 then
  if worst > 0 then worst = math.ceil(worst / 1000) end
  return {0, refused, worst}
end
if mode == 'check' then
  return {1}
end
redis.call('HSET', KEYS[2], call, table.concat(
  {sid, need_t, ARGV[6], now + lease, ARGV[4], ARGV[5], ARGV[8]}, '|'))
return {1}
