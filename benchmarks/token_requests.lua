-- wrk script for benchmarks/bench.py: POST /token with a fresh subject token and DPoP proof per request.
--
--   wrk -t1 -c8 -d10s --latency -s token_requests.lua URL -- FILE AUDIENCE SCOPE [AUTHORIZATION] [LIMIT]
--
-- FILE holds one request per line, "<subject token>\t<DPoP proof>"; the script sends them in order,
-- each at most once (a single-use subject token and a DPoP jti are accepted once).  After the last
-- line it starts again from the first, and reports how many were sent again ("reused"): for the
-- exchange they are refused, so the file must hold more lines than the run sends.
-- AUTHORIZATION ("-" for none) is sent as the Authorization header.  LIMIT > 0 stops after that many
-- responses.  done() prints one line, "bench-lua sent=N ok=N failed=N reused=N first_failure=...".

local tokens, proofs = {}, {}
local count, index = 0, 0
local answered, limit = 0, 0
-- Globals, so that done() can read them from each thread (thread:get).
sent, ok, failed, reused = 0, 0, 0, 0
first_failure = ""
local prefix, suffix, authorization
local threads = {}

local GRANT = "urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Atoken-exchange"
local JWT = "urn%3Aietf%3Aparams%3Aoauth%3Atoken-type%3Ajwt"

local function form_escape(s)
  return (s:gsub("[^%w%-%._~]", function(c) return string.format("%%%02X", string.byte(c)) end))
end

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  for line in io.lines(args[1]) do
    local token, proof = line:match("^([^\t]+)\t([^\t]+)$")
    if token then
      count = count + 1
      tokens[count], proofs[count] = token, proof
    end
  end
  if count == 0 then error("no requests in " .. args[1]) end
  prefix = "grant_type=" .. GRANT .. "&subject_token_type=" .. JWT
    .. "&audience=" .. form_escape(args[2]) .. "&scope=" .. form_escape(args[3]) .. "&subject_token="
  authorization = args[4]
  if authorization == "-" then authorization = nil end
  limit = tonumber(args[5] or "0") or 0
end

function request()
  index = index + 1
  if index > count then
    index = 1
  end
  if sent >= count then reused = reused + 1 end
  sent = sent + 1
  local headers = {
    ["Content-Type"] = "application/x-www-form-urlencoded",
    ["DPoP"] = proofs[index],
  }
  if authorization then headers["Authorization"] = authorization end
  return wrk.format("POST", "/token", headers, prefix .. tokens[index])
end

function response(status, headers, body)
  answered = answered + 1
  if status == 200 then
    ok = ok + 1
  else
    failed = failed + 1
    if first_failure == "" then first_failure = status .. " " .. (body or ""):sub(1, 300):gsub("%s", " ") end
  end
  if limit > 0 and answered >= limit then wrk.thread:stop() end
end

function done(summary, latency, requests)
  local t = { sent = 0, ok = 0, failed = 0, reused = 0 }
  local failure = ""
  for _, thread in ipairs(threads) do
    for name, _ in pairs(t) do t[name] = t[name] + (thread:get(name) or 0) end
    local f = thread:get("first_failure")
    if failure == "" and f then failure = f end
  end
  io.write(string.format("bench-lua sent=%d ok=%d failed=%d reused=%d first_failure=%s\n",
    t.sent, t.ok, t.failed, t.reused, failure))
end
