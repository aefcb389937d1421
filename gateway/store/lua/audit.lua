#!lua flags=allow-oom
-- Append one revocation to the audit stream, capped, with a TTL.
--
-- KEYS[1] audit stream {p}:audit
-- ARGV[1] approximate maximum length
-- ARGV[2] TTL, seconds (renewed at every append)
-- ARGV[3..] field, value, ...
--
-- The entry id is the server's time, the one clock every replica shares.
-- allow-oom: the record of a revocation goes in with the revocation.

local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', unpack(ARGV, 3))
redis.call('EXPIRE', KEYS[1], ARGV[2])
return id
