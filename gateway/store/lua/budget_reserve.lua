#!lua
-- Reserve room for one model call under a user's and a session's budgets,
-- atomically: spent (charges in the window) + reserved (calls in flight) +
-- this reservation must fit every window, or nothing is written. Also the
-- read-only check a turn is admitted by ("check": is any room left at all).
--
-- KEYS[1] charges zset  {p}:{b:<workflow>:<user hash>}:c
--         member "<call>|<sid>|<input>|<cached>|<output>|<usd>|<model>", score µs
-- KEYS[2] reservations hash, same tag, :r
--         field <call>, value "<sid>|<tokens>|<usd>|<lease end µs>|<input>|<output>|<model>"
-- ARGV[1] "reserve" or "check"
-- ARGV[2] this call's id        ARGV[3] its session id
-- ARGV[4] reserved input tokens  ARGV[5] reserved output tokens
-- ARGV[6] reserved micro-dollars ARGV[7] lease in µs
-- ARGV[8] the model (for the record)
-- ARGV[9] longest window in µs (how long charges are kept)
-- ARGV[10..] windows, four values each: kind ("t" tokens | "d" dollars),
--         scope ("s" | "u"), length in µs, limit (tokens | micro-dollars)
--
-- Returns {1} when admitted, else {0, index of the refusing window (1-based),
-- wait in ms until it could fit, or -1 if it never could}. With several
-- refusing windows, the longest wait is reported.
--
-- Time is Redis TIME, one clock for every replica. An expired lease (a
-- replica died mid-call) is charged its reservation at its lease's end.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local mode, call, sid = ARGV[1], ARGV[2], ARGV[3]
local need_t, need_d = tonumber(ARGV[4]) + tonumber(ARGV[5]), tonumber(ARGV[6])
local lease, longest = tonumber(ARGV[7]), tonumber(ARGV[9])

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

-- Calls in flight; leases that ended become charges.
local flight = {}
local raw = redis.call('HGETALL', KEYS[2])
for i = 1, #raw, 2 do
  local f = split(raw[i + 1])
  local ends = tonumber(f[4])
  if ends <= now then
    redis.call('HDEL', KEYS[2], raw[i])
    redis.call('ZADD', KEYS[1], ends,
      raw[i] .. '|' .. f[1] .. '|' .. f[5] .. '|0|' .. f[6] .. '|' .. f[3] .. '|' .. f[7])
  else
    flight[#flight + 1] = {sid = f[1], t = tonumber(f[2]), d = tonumber(f[3])}
  end
end

redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - longest)
local charges = {}
local rows = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
for i = 1, #rows, 2 do
  local f = split(rows[i])
  charges[#charges + 1] = {
    at = tonumber(rows[i + 1]), sid = f[2],
    t = tonumber(f[3]) + tonumber(f[5]), d = tonumber(f[6]),
  }
end

local refused, worst = 0, -2
for w = 10, #ARGV, 4 do
  local kind, scope = ARGV[w], ARGV[w + 1]
  local length, limit = tonumber(ARGV[w + 2]), tonumber(ARGV[w + 3])
  local need = kind == 't' and need_t or need_d
  local spent, reserved = 0, 0
  local mine = {}
  for _, c in ipairs(charges) do
    if c.at > now - length and (scope == 'u' or c.sid == sid) then
      local amount = kind == 't' and c.t or c.d
      spent = spent + amount
      mine[#mine + 1] = {at = c.at, amount = amount}
    end
  end
  for _, r in ipairs(flight) do
    if scope == 'u' or r.sid == sid then
      reserved = reserved + (kind == 't' and r.t or r.d)
    end
  end
  local fits
  if mode == 'check' then
    fits = spent + reserved < limit
  else
    fits = spent + reserved + need <= limit
  end
  if not fits then
    local wait = -1
    if need <= limit and (mode ~= 'check' or reserved < limit) then
      -- When enough of what was spent leaves the window; if the calls in
      -- flight alone leave no room, when they may have settled (1 s).
      local freed = 0
      for _, c in ipairs(mine) do
        freed = freed + c.amount
        local left = spent - freed + reserved
        if (mode == 'check' and left < limit) or (mode ~= 'check' and left + need <= limit) then
          wait = c.at + length - now
          break
        end
      end
      if wait < 0 then wait = 1000000 end
    end
    if worst ~= -1 and (wait == -1 or wait > worst) then
      refused, worst = (w - 10) / 4 + 1, wait
    end
  end
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
local keep = math.ceil((longest + lease) / 1000)
redis.call('PEXPIRE', KEYS[1], keep)
redis.call('PEXPIRE', KEYS[2], keep)
return {1}
