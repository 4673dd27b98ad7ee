-- Atomic publish: issue one id from the per-Redis clock, append the frame body to each topic's
-- stream (trimmed by count and age), then PUBLISH the finished frame on each topic's channel.
--
-- Each entry also records the id of the entry before it in the same stream ('p'), read before
-- anything is trimmed. A reader resuming after X knows history is complete when the first entry
-- after X points back at or before X, and each later entry points at the one before it; any
-- trimmed or deleted entry breaks that chain. (Redis 7.0 does not move max-deleted-entry-id
-- when it trims, so that field cannot tell.)
--
-- A publish carries an idempotency key: the id it was given is remembered under that key for a
-- while, so a retry (after a lost reply) returns the original id and stores nothing twice.
--
-- KEYS[1] clock, KEYS[2] origin, KEYS[3] idempotency key, KEYS[4..] one stream per topic
-- ARGV[1] frame body (no id line), ARGV[2] max events per topic, ARGV[3] max age in ms (0: none),
-- ARGV[4] how long the idempotency key is remembered (ms), ARGV[5] the id an earlier attempt of
-- this publish was given, or '', ARGV[6..] one channel per topic, in the same order as the streams
-- Returns the id.

local seen = redis.call('GET', KEYS[3])
if seen then
  return seen
end
-- Redis does not roll a script back: refuse before writing anything if a key is not a stream.
for i = 4, #KEYS do
  local kind = redis.call('TYPE', KEYS[i])['ok']
  if kind ~= 'stream' and kind ~= 'none' then
    return redis.error_reply('WRONGTYPE ' .. KEYS[i] .. ' is a ' .. kind .. ', not a stream')
  end
end

local function split(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end

local function above(ams, aseq, bms, bseq)
  return ams > bms or (ams == bms and aseq > bseq)
end

local t = redis.call('TIME')
local ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local seq = 0

-- The floor: the last id issued here. When the clock is new (first publish, or it was
-- deleted), never issue an id below what a surviving stream already holds.
local fms, fseq = 0, -1
local last = redis.call('GET', KEYS[1])
if last then
  fms, fseq = split(last)
else
  for i = 4, #KEYS do
    if redis.call('EXISTS', KEYS[i]) == 1 then
      local info = redis.call('XINFO', 'STREAM', KEYS[i])
      for j = 1, #info, 2 do
        if info[j] == 'last-generated-id' then
          local lms, lseq = split(info[j + 1])
          if above(lms, lseq, fms, fseq) then
            fms, fseq = lms, lseq
          end
        end
      end
    end
  end
end
if not above(ms, seq, fms, fseq) then
  ms, seq = fms, fseq + 1
end
-- A retry of a publish that another server gave an id but may not have kept (a failover, or
-- a restart that lost the last writes) takes that id again while it is still above the floor:
-- subscribers that saw it live then see it once.
if ARGV[5] ~= '' then
  local pms, pseq = split(ARGV[5])
  if above(pms, pseq, fms, fseq) then
    ms, seq = pms, pseq
  end
end

local id = string.format('%d-%d', ms, seq)
redis.call('SET', KEYS[1], id)
redis.call('SET', KEYS[2], id, 'NX')

local body = ARGV[1]
local max_events = tonumber(ARGV[2])
local max_age = tonumber(ARGV[3])
local frame = 'id: ' .. id .. '\n' .. body

for i = 4, #KEYS do
  local newest = redis.call('XREVRANGE', KEYS[i], '+', '-', 'COUNT', 1)
  local prev = newest[1] and newest[1][1] or '0-0'
  redis.call('XADD', KEYS[i], 'MAXLEN', '~', max_events, id, 'f', body, 'p', prev)
  if max_age > 0 and ms > max_age then
    -- Exact: '~' only drops whole stream nodes, so a small topic would never age out.
    redis.call('XTRIM', KEYS[i], 'MINID', string.format('%d-0', ms - max_age))
  end
end
for i = 6, #ARGV do
  redis.call('PUBLISH', ARGV[i], frame)
end
redis.call('SET', KEYS[3], id, 'PX', tonumber(ARGV[4]))
return id
