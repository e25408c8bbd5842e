-- Argo CD health check for finetune.dev/FineTuneJob.
--
-- Argo CD sets the global `obj` (the live object) and takes the table this chunk returns.
-- Only the Lua 5.1 base library is used: a check configured in argocd-cm runs without the
-- string, math, os and io libraries unless useOpenLibs is set, and numbers are printed with
-- tostring() only when they are whole and below 1e14 (Lua 5.1 and gopher-lua agree on those, not
-- on fractions or larger numbers). The tests run every case in both engines.
--
-- Order of the checks:
--   no status / status older than metadata.generation -> Progressing (waiting for the operator)
--   Validated=False, phase Failed or Failed=True        -> Degraded
--   phase Succeeded or Complete=True                    -> Healthy
--   phase Suspended, or spec.suspend and Suspended=True -> Suspended
--   anything else (queued in Kueue, waiting for a GPU,
--   running)                                            -> Progressing

local hs = {}

local function condition(status, wanted)
  if type(status.conditions) ~= "table" then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if type(c) == "table" and c.type == wanted then
      return c
    end
  end
  return nil
end

local function has(c, value)
  return c ~= nil and c.status == value
end

local function nonempty(value)
  return type(value) == "string" and value ~= ""
end

-- A condition's message, else its reason, else the fallback.
local function explain(c, fallback)
  if c ~= nil then
    if nonempty(c.message) then
      return c.message
    end
    if nonempty(c.reason) then
      return c.reason
    end
  end
  return fallback
end

-- Numbers as text, the same in Lua 5.1 and in gopher-lua (the engine Argo CD embeds): tostring()
-- is used only on whole numbers below 1e14, which both print as plain digits (from 1e14 on,
-- Lua 5.1 prints "1e+14" and gopher-lua "100000000000000"); larger values are written in
-- scientific notation here ("1.235e+15"), with + - * / % on small values only.
local PLAIN_LIMIT = 1e14
local DECIMALS_LIMIT = 1e9

local function digits(n) -- a whole n, 0 <= n < PLAIN_LIMIT
  return tostring(n - n % 1)
end

local function three_decimals(n) -- 0 <= n < DECIMALS_LIMIT: "12.346"
  local scaled = n * 1000 + 0.5
  scaled = scaled - scaled % 1
  local fraction = scaled % 1000
  local pad = ""
  if fraction < 10 then
    pad = "00"
  elseif fraction < 100 then
    pad = "0"
  end
  return digits((scaled - fraction) / 1000) .. "." .. pad .. digits(fraction)
end

local function scientific(n) -- a finite n >= 1: "1.235e+15"
  local exponent = 0
  while n >= 10 do
    n = n / 10
    exponent = exponent + 1
  end
  local mantissa = three_decimals(n)
  if mantissa == "10.000" then
    mantissa = "1.000"
    exponent = exponent + 1
  end
  return mantissa .. "e+" .. digits(exponent)
end

-- "nan" or "inf" for the values that are not finite numbers, else nil.
local function not_finite(n)
  if n ~= n then
    return "nan"
  end
  if n == 1 / 0 or n == -1 / 0 then
    return "inf"
  end
  return nil
end

-- A value as (magnitude, sign) for the formatters below, or (nil, text) when it is not a finite
-- number: nil for no number at all, the not_finite text otherwise.
local function magnitude(value)
  local n = tonumber(value)
  if n == nil then
    return nil, nil
  end
  if not_finite(n) ~= nil then
    return nil, not_finite(n)
  end
  if n < 0 then
    return -n, "-"
  end
  return n, ""
end

-- A whole number as text ("30"; "1.000e+15" from 1e14 on), or nil when the value is not a number.
local function whole(value)
  local n, sign = magnitude(value)
  if n == nil then
    return sign
  end
  n = n - n % 1
  if n == 0 then
    return "0"
  end
  if n < PLAIN_LIMIT then
    return sign .. digits(n)
  end
  return sign .. scientific(n)
end

-- A number with three decimals ("1.234"; "1.000e+15" from 1e9 on), or nil when not a number.
local function decimal3(value)
  local n, sign = magnitude(value)
  if n == nil then
    return sign
  end
  local text
  if n < DECIMALS_LIMIT then
    text = three_decimals(n)
  else
    text = scientific(n)
  end
  if text == "0.000" then
    sign = ""
  end
  return sign .. text
end

-- "step 30/100 (30%), loss 1.234", or nil when the trainer has reported nothing yet.
local function progress_text(progress)
  if type(progress) ~= "table" then
    return nil
  end
  local parts = nil
  local step = tonumber(progress.step)
  local total = tonumber(progress.totalSteps)
  if step ~= nil then
    parts = "step " .. whole(step)
    if total ~= nil and total > 0 then
      parts = parts .. "/" .. whole(total)
      local percent = tonumber(progress.percent)
      if percent == nil then
        percent = step * 100 / total
      end
      parts = parts .. " (" .. whole(percent) .. "%)"
    end
  end
  local loss = decimal3(progress.loss)
  if loss ~= nil then
    if parts == nil then
      parts = "loss " .. loss
    else
      parts = parts .. ", loss " .. loss
    end
  end
  return parts
end

-- Appended when the spec was edited after the training Job was created (the edit does not reach
-- the running or finished Job).
local function spec_changed_note(status)
  local changed = condition(status, "SpecChanged")
  if has(changed, "True") then
    return "; " .. explain(changed, "the spec changed after the training Job was created")
  end
  return ""
end

local status = obj.status
if type(status) ~= "table" then
  hs.status = "Progressing"
  hs.message = "waiting for the operator"
  return hs
end

local metadata = obj.metadata or {}
local generation = tonumber(metadata.generation)
local observed = tonumber(status.observedGeneration)
if generation ~= nil and (observed == nil or observed < generation) then
  hs.status = "Progressing"
  hs.message = "waiting for the operator: generation " .. whole(generation) .. " not observed yet"
  if observed ~= nil then
    hs.message = hs.message .. " (status is for generation " .. whole(observed) .. ")"
  end
  return hs
end

local spec = obj.spec or {}
local phase = status.phase
local validated = condition(status, "Validated")
local scheduled = condition(status, "Scheduled")
local running = condition(status, "Running")
local complete = condition(status, "Complete")
local failed = condition(status, "Failed")
local suspended = condition(status, "Suspended")

if has(validated, "False") then
  hs.status = "Degraded"
  hs.message = explain(validated, "the spec is invalid")
  return hs
end

if phase == "Failed" or has(failed, "True") then
  hs.status = "Degraded"
  hs.message = explain(failed, "training failed") .. spec_changed_note(status)
  return hs
end

if phase == "Succeeded" or has(complete, "True") then
  hs.status = "Healthy"
  local result = status.result
  if type(result) == "table" and nonempty(result.adapter) then
    hs.message = "adapter written to " .. result.adapter
  else
    hs.message = explain(complete, "training complete")
  end
  hs.message = hs.message .. spec_changed_note(status)
  return hs
end

if phase == "Suspended" or (spec.suspend == true and has(suspended, "True")) then
  hs.status = "Suspended"
  hs.message = explain(suspended, "suspended: spec.suspend is true")
  return hs
end

if spec.suspend == true then
  hs.status = "Progressing"
  hs.message = "suspending: " .. explain(suspended, "stopping the training pod")
  return hs
end

if phase == "Running" or has(running, "True") then
  hs.status = "Progressing"
  local done = progress_text(status.progress)
  if done ~= nil then
    hs.message = "training: " .. done
  elseif running ~= nil and nonempty(running.message) then
    hs.message = running.message
  else
    hs.message = "training: started, no progress reported yet"
  end
  hs.message = hs.message .. spec_changed_note(status)
  return hs
end

-- Kueue holds the job (its quota, or a preemption): the Admitted condition says why.
local admitted = condition(status, "Admitted")
if phase == "Queued" or has(admitted, "False") then
  hs.status = "Progressing"
  hs.message = "waiting for Kueue: " .. explain(admitted, "queued")
  return hs
end

-- A training pod failed and the Job starts another one (within spec.backoffLimit).
if has(running, "False") and running.reason == "Retrying" then
  hs.status = "Progressing"
  hs.message = explain(running, "retrying after a failed attempt")
  return hs
end

if has(scheduled, "False") then
  hs.status = "Progressing"
  if scheduled.reason == "NoCompatibleGPU" or scheduled.reason == "InsufficientGPUMemory" then
    hs.message = "waiting for a GPU: " .. explain(scheduled, scheduled.reason)
  else
    hs.message = explain(scheduled, "waiting to be scheduled")
  end
  return hs
end

hs.status = "Progressing"
local placement = status.placement
if type(placement) ~= "table" then
  placement = {}
end
if has(scheduled, "True") then
  if nonempty(placement.node) then
    hs.message = "scheduled on node " .. placement.node
    if nonempty(placement.gpuProduct) then
      hs.message = hs.message .. " (" .. placement.gpuProduct .. ")"
    end
    hs.message = hs.message .. "; waiting for the trainer to start"
  else
    hs.message = explain(scheduled, "scheduled; waiting for the trainer to start")
  end
elseif has(validated, "True") then
  if nonempty(placement.requiredComputeCapability) then
    hs.message = "validated; waiting for a node with compute capability >= "
      .. placement.requiredComputeCapability
    if nonempty(placement.architecture) then
      hs.message = hs.message .. " (" .. placement.architecture .. " or newer)"
    end
  else
    hs.message = "validated; waiting for the training pod to be scheduled"
  end
else
  hs.message = "waiting for the operator to validate the spec"
end
return hs
