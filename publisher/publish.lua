-- Atomic publish: issue one id from the per-Redis clock, append the frame body to each topic's
-- stream (trimmed by count and age, and set to expire once the topic has been quiet for the
-- retention age), then PUBLISH the finished frame on each topic's channel.
--
-- Each entry also records the id of the entry before it in the same stream ('p'), read before
-- anything is trimmed. A reader resuming after X knows history is complete when the first entry
-- after X points back at or before X, and each later entry points at the one before it; any
-- trimmed or deleted entry breaks that chain. (Redis 7.0 does not move max-deleted-entry-id
-- when it trims, so that field cannot tell.)
--
-- A publish carries an idempotency key: the id it was given is remembered under that key for a
-- while, so a retry (after a lost reply) returns the original id and stores nothing twice. The
-- key's name is a digest of the publisher's scope, the topic set and the caller's key, made by
-- the caller, so one publisher's key never answers for another's.
--
-- Redis does not roll a script back: everything is checked before the first write, and a
-- refusal writes nothing. Lua numbers are doubles, so an id's milliseconds must stay below 2^53
-- and its sequence (up to 2^64-1) is handled as a decimal string.
--
-- KEYS[1] clock, KEYS[2] origin, KEYS[3] idempotency key, KEYS[4..] one stream per topic
-- ARGV[1] frame body (no id line), ARGV[2] max events per topic, ARGV[3] max age in ms (0: none),
-- ARGV[4] how long the idempotency key is remembered (ms; 0: not at all), ARGV[5] the id an earlier attempt of
-- this publish was given, or '', ARGV[6..] one channel per topic, in the same order as the streams
-- Returns the id. Refusals: 'WRONGTYPE ...' (a key of another type), 'CLOCK ...' (an id this
-- script cannot advance past), 'ERR ...' (bad arguments).

local TWO53 = 9007199254740992
local U64 = '18446744073709551615'

local function show(text)
  return string.format('%q', string.sub(text, 1, 60))
end

-- An id as {ms = number, seq = decimal string}, or nil when it is not one.
local function parse(id)
  if type(id) ~= 'string' then
    return nil
  end
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  if not ms or #ms > 16 or #seq > 20 then
    return nil
  end
  seq = string.gsub(seq, '^0+', '')
  if seq == '' then
    seq = '0'
  end
  local m = tonumber(ms)
  if m >= TWO53 or (#seq == 20 and seq > U64) then
    return nil
  end
  return {ms = m, seq = seq}
end

local function above(a, b)
  if a.ms ~= b.ms then
    return a.ms > b.ms
  end
  if #a.seq ~= #b.seq then
    return #a.seq > #b.seq
  end
  return a.seq > b.seq
end

-- The id right after a, or nil past the last one this script can issue.
local function succ(a)
  if a.seq == U64 then
    if a.ms + 1 >= TWO53 then
      return nil
    end
    return {ms = a.ms + 1, seq = '0'}
  end
  local digits = {string.byte(a.seq, 1, -1)}
  local i = #digits
  while i >= 1 and digits[i] == 57 do
    digits[i] = 48
    i = i - 1
  end
  if i == 0 then
    return {ms = a.ms, seq = '1' .. string.char(unpack(digits))}
  end
  digits[i] = digits[i] + 1
  return {ms = a.ms, seq = string.char(unpack(digits))}
end

local function text(id)
  return string.format('%.0f', id.ms) .. '-' .. id.seq
end

local function whole(value, least)
  local n = tonumber(value)
  if n == nil or n ~= math.floor(n) or n < least or n >= TWO53 then
    return nil
  end
  return n
end

-- Arguments.
local max_events, max_age, ttl = whole(ARGV[2], 1), whole(ARGV[3], 0), whole(ARGV[4], 0)
if #KEYS < 4 or #ARGV - 5 ~= #KEYS - 3 or not max_events or not max_age or not ttl then
  return redis.error_reply('ERR publish: invalid arguments')
end

-- Key types, read with pcall so that a wrong type is refused here, by name, before any write.
local function string_key(key, what)
  local value = redis.pcall('GET', key)
  if type(value) == 'table' and value.err then
    local kind = redis.call('TYPE', key)['ok']
    return nil, 'WRONGTYPE the ' .. what .. ' key ' .. key .. ' is a ' .. kind .. ', not a string'
  end
  return value
end
local seen, wrong = string_key(KEYS[3], 'idempotency')
if wrong then
  return redis.error_reply(wrong)
end
if seen then
  return seen
end
local last, wrong_clock = string_key(KEYS[1], 'clock')
if wrong_clock then
  return redis.error_reply(wrong_clock)
end
local origin_kind = redis.call('TYPE', KEYS[2])['ok']
if origin_kind ~= 'string' and origin_kind ~= 'none' then
  return redis.error_reply('WRONGTYPE the origin key ' .. KEYS[2] .. ' is a ' .. origin_kind ..
    ', not a string')
end

-- The floor: no id at or below the clock, nor at or below any of these streams' last ids
-- (a clock that was deleted, restored or set back must not make XADD fail half way).
local floor = nil
if last then
  floor = parse(last)
  if not floor then
    return redis.error_reply('CLOCK the clock key ' .. KEYS[1] .. ' holds ' .. show(last) ..
      ', not an id below 2^53-0 that the next id can follow; repair or delete it')
  end
end
-- Each stream's type, its last id and its newest entry (the new entry's back-link).
local prevs = {}
for i = 4, #KEYS do
  prevs[i] = '0-0'
  local kind = redis.call('TYPE', KEYS[i])['ok']
  if kind ~= 'stream' and kind ~= 'none' then
    return redis.error_reply('WRONGTYPE ' .. KEYS[i] .. ' is a ' .. kind .. ', not a stream')
  end
  if kind == 'stream' then
    local info = redis.call('XINFO', 'STREAM', KEYS[i])
    for j = 1, #info, 2 do
      if info[j] == 'last-generated-id' then
        local top = parse(info[j + 1])
        if not top then
          return redis.error_reply('CLOCK the stream ' .. KEYS[i] .. ' has ids up to ' ..
            show(info[j + 1]) .. ', beyond what the clock can issue')
        end
        if floor == nil or above(top, floor) then
          floor = top
        end
      elseif info[j] == 'last-entry' and info[j + 1] then
        prevs[i] = info[j + 1][1]
      end
    end
  end
end

local t = redis.call('TIME')
local id = {ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000), seq = '0'}
if floor and not above(id, floor) then
  id = succ(floor)
  if not id then
    return redis.error_reply('CLOCK the clock key ' .. KEYS[1] .. ' is at the last id ' ..
      'that can be issued; repair or delete it')
  end
end
-- A retry of a publish that another server gave an id but may not have kept (a failover, or
-- a restart that lost the last writes) takes that id again while it is still above the floor:
-- subscribers that saw it live then see it once.
if ARGV[5] ~= '' then
  local prior = parse(ARGV[5])
  if not prior then
    return redis.error_reply('ERR publish: invalid earlier id ' .. show(ARGV[5]))
  end
  if floor == nil or above(prior, floor) then
    id = prior
  end
end

-- Writes, all checked above.
local event_id = text(id)
redis.call('SET', KEYS[1], event_id)
redis.call('SET', KEYS[2], event_id, 'NX')

local body = ARGV[1]
local frame = 'id: ' .. event_id .. '\n' .. body
for i = 4, #KEYS do
  redis.call('XADD', KEYS[i], 'MAXLEN', '~', max_events, event_id, 'f', body, 'p', prevs[i])
  if max_age > 0 then
    if id.ms > max_age then
      -- Exact: '~' only drops whole stream nodes, so a small topic would never age out.
      redis.call('XTRIM', KEYS[i], 'MINID', string.format('%.0f-0', id.ms - max_age))
    end
    -- Once the topic is quiet for max_age, every entry is past the retention age.
    redis.call('PEXPIRE', KEYS[i], max_age)
  end
end
for i = 6, #ARGV do
  redis.call('PUBLISH', ARGV[i], frame)
end
if ttl > 0 then
  redis.call('SET', KEYS[3], event_id, 'PX', ttl)
end
return event_id
