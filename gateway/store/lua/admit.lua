#!lua
-- The shebang (no allow-oom flag) makes a full Redis refuse this script
-- before it runs: under maxmemory with noeviction an admission must not
-- write (its first write is not deny-OOM otherwise), so room stays for
-- revocations, which may always write.
--
-- Admission for one request, atomically: revocation, session, expiry, and
-- every exact sliding window the request counts in: the session's limit (if
-- it counts this request's class), the optional per-user cap, and the
-- windows the session's policy sets for the request's class, per session and
-- per user.
--
-- KEYS[1] session hash  {p}:{h}:s  fields lim, exp, uh, sid, user, wf, wv,
--                                   cnt (the class lim counts, absent: all),
--                                   c:<class> (that class's windows, a spec
--                                   "<s|u><seconds>:<limit>,..."), and the
--                                   session's chatkit_configuration: hist,
--                                   up ("0": disabled), mfs (largest file,
--                                   bytes), mf (most files), cfg (its JSON);
--                                   mdl ("1": the workflow lists models) and
--                                   m:<model> ("1") for each model listed;
--                                   app (the issuer app that created it)
-- KEYS[2] window zset   {p}:{h}:w  one member per admitted request, score = µs;
--                                   a class window C of L s is KEYS[2]:C:L
-- KEYS[3] revoked flag  {p}:{h}:r
-- ARGV[1] the session limit's window length in µs
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
-- ARGV[8] the request's class, "" when it has none (counted by lim only)
-- ARGV[9] the user class window prefix, in KEYS[1]'s slot (a tagged secret);
--         the user hash and ":<class>:<seconds>" complete it. "" for none.
-- ARGV[10] what of the configuration the request needs: "history",
--          "upload" (file bytes), "attach" (attachments.create), ""
-- ARGV[11] the size an attachments.create declares, bytes
-- ARGV[12] "m:" and the model a turn names, "" when it names none
-- ARGV[13] a model token's grant key, in KEYS[1]'s slot (absent: none): when
--          a registered session's request is admitted, the grant is written
--          (fields h, sid, user, wf, rid, exp; it expires with the session)
-- ARGV[14] the request id for the grant   ARGV[15] the secret's hash
--
-- Returns {outcome} when no window was read (revoked, expired, unknown), else
--   {outcome, s_limit, s_remaining, s_wait_ms, s_reset_ms,
--    u_limit, u_remaining, u_wait_ms, u_reset_ms,
--    c_window, c_limit, c_remaining, c_wait_ms, c_reset_ms,
--    sid, user, workflow_id, workflow_version, expires_at, max_file_bytes,
--    configuration, app}
-- s_limit 0: the session limit does not count this class; u_limit 0: no user
-- cap; c_window "" : no class window, else "<s|u><seconds>", the window that
-- refused or, when admitted, the class window with the fewest remaining.
-- sid "" : an unknown secret admitted under the default limit.
-- A refusal reports the refusing window with the longest wait: the real time
-- until this request could be admitted. Rejected requests add nothing.
-- Outcome codes are gateway.ratelimit.Outcome. The configuration refuses
-- before any window counts (7-9), and so does a model the workflow's policy
-- does not list (11): the workflow is known only from the session's record,
-- and a refused request must count nowhere. max_files is a window over the
-- session's whole life (10), so it is exact across replicas and costs
-- nothing refused.
--
-- Time is the server's TIME, one clock for every replica. Redis 7 replicates
-- scripts by effects, so reading TIME before writing is allowed.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local deadline = tonumber(ARGV[6])
if deadline > 0 and now > deadline then
  return redis.error_reply('LATE the admission reached Redis after its deadline')
end

if redis.call('EXISTS', KEYS[3]) == 1 then
  return {3}
end

local class = ARGV[8]
local s = redis.call('HMGET', KEYS[1], 'lim', 'exp', 'uh', 'sid', 'user', 'wf', 'wv',
  'cnt', 'c:' .. class, 'hist', 'up', 'mfs', 'mf', 'cfg',
  'app')
local limit = tonumber(s[1])
if not limit then
  if ARGV[2] ~= '1' then
    return {5}
  end
  limit = tonumber(ARGV[3])
elseif tonumber(s[2]) * 1000000 <= now then
  return {4}
end

local need = ARGV[10]
if need ~= '' then
  if need == 'history' and s[10] == '0' then
    return {7}
  end
  if need ~= 'history' and s[11] == '0' then
    return {8}
  end
  if need == 'attach' and s[12] and tonumber(ARGV[11]) > tonumber(s[12]) then
    return {9}
  end
end

-- A field lookup, not a scan: exact for any model name, and nothing read
-- for turns that name no model.
if ARGV[12] ~= '' and s[1] then
  local m = redis.call('HMGET', KEYS[1], 'mdl', ARGV[12])
  if m[1] and not m[2] then
    return {11}
  end
end

local function ms(us)
  return math.ceil(us / 1000)
end

-- The windows: {key, length µs, limit, kind, name}; kind 1 session limit,
-- 2 user cap, 6 class window (the outcome each refuses with).
local windows = {}
local counts = s[8]
if class == '' or not counts or counts == 'all' or counts == class then
  windows[#windows + 1] = {KEYS[2], tonumber(ARGV[1]), limit, 1, ''}
end
local user_limit = tonumber(ARGV[4])
if user_limit > 0 and s[3] then
  windows[#windows + 1] = {ARGV[5] .. s[3] .. '}:w', tonumber(ARGV[1]), user_limit, 2, ''}
end
if s[9] then
  for scope, seconds, lim in string.gmatch(s[9], '([su])(%d+):(%d+)') do
    local key = nil
    if scope == 's' then
      key = KEYS[2] .. ':' .. class .. ':' .. seconds
    elseif ARGV[9] ~= '' and s[3] then
      key = ARGV[9] .. s[3] .. ':' .. class .. ':' .. seconds
    end
    if key then
      windows[#windows + 1] = {key, tonumber(seconds) * 1000000, tonumber(lim), 6, scope .. seconds}
    end
  end
end

if need == 'attach' and s[13] then
  -- Longer than any session lives (at most 7 days): nothing leaves it.
  windows[#windows + 1] = {KEYS[2] .. ':files', 8 * 86400 * 1000000, tonumber(s[13]), 10, ''}
end

-- Prune what left each window; note count, µs until the oldest and newest leave.
local refused = nil
for _, w in ipairs(windows) do
  redis.call('ZREMRANGEBYSCORE', w[1], '-inf', now - w[2])
  local count = redis.call('ZCARD', w[1])
  local wait, reset = 0, 0
  if count > 0 then
    local oldest = redis.call('ZRANGE', w[1], 0, 0, 'WITHSCORES')
    local newest = redis.call('ZRANGE', w[1], -1, -1, 'WITHSCORES')
    wait = tonumber(oldest[2]) + w[2] - now
    reset = tonumber(newest[2]) + w[2] - now
  end
  w[6], w[7], w[8] = count, wait, reset
  if count >= w[3] and (refused == nil or wait > refused[7]) then
    refused = w
  end
end

local reply = {0, 0, 0, 0, 0, 0, 0, 0, 0, '', 0, 0, 0, 0, '', '', '', '', 0, 0, '',
  ''}
if refused then
  reply[1] = refused[4]
  for _, w in ipairs(windows) do
    w[9] = w[3] - w[6]
  end
else
  for _, w in ipairs(windows) do
    redis.call('ZADD', w[1], now, ARGV[7])
    redis.call('PEXPIRE', w[1], ms(w[2]) + 1000)
    if w[6] == 0 then w[7] = w[2] end
    w[8] = w[2]
    w[9] = w[3] - w[6] - 1
  end
  if ARGV[13] and s[1] then
    -- The turn's model token, in the same step: an absolute expiry, no
    -- replica's clock decides how long it lives.
    redis.call('HSET', ARGV[13], 'h', ARGV[15], 'sid', s[4] or '', 'user', s[5] or '',
      'wf', s[6] or '', 'rid', ARGV[14], 'exp', s[2])
    redis.call('PEXPIREAT', ARGV[13], tonumber(s[2]) * 1000)
  end
end
local class_window = nil
if refused and refused[4] == 6 then class_window = refused end
for _, w in ipairs(windows) do
  local v = {w[3], math.max(w[9], 0), ms(w[7]), ms(w[8])}
  if w == refused then v[2] = 0 end
  if w[4] == 1 then
    reply[2], reply[3], reply[4], reply[5] = v[1], v[2], v[3], v[4]
  elseif w[4] == 2 then
    reply[6], reply[7], reply[8], reply[9] = v[1], v[2], v[3], v[4]
  elseif w[4] == 6 and (class_window ~= refused or class_window == nil) then
    if class_window == nil or w[9] < class_window[9] then class_window = w end
  end
end
if class_window then
  local w = class_window
  local remaining = math.max(w[9], 0)
  if w == refused then remaining = 0 end
  reply[10], reply[11], reply[12], reply[13], reply[14] = w[5], w[3], remaining, ms(w[7]), ms(w[8])
end
if s[1] then
  reply[15] = s[4] or ''
  reply[16] = s[5] or ''
  reply[17] = s[6] or ''
  reply[18] = s[7] or ''
  reply[19] = tonumber(s[2])
  reply[20] = tonumber(s[12]) or 0
  reply[21] = s[14] or ''
  reply[22] = s[15] or ''
end
return reply
