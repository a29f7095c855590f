-- Argo CD health check for conveyor.dev/ModelDeployment (resource.customizations.health.conveyor.dev_ModelDeployment).
-- Reads the operator's status: observedGeneration, then the conditions Degraded, the rollout phase
-- (Paused: Suspended), Progressing, Ready (and Drifted, which is reported but leaves a serving model
-- Healthy). Lua 5.1 (Argo CD's gopher-lua).
local hs = {}

local function condition(conditions, kind)
  if conditions == nil then
    return nil
  end
  for _, c in ipairs(conditions) do
    if c.type == kind then
      return c
    end
  end
  return nil
end

local function describe(c)
  local text = c.type .. "=" .. tostring(c.status)
  if c.reason ~= nil and c.reason ~= "" then
    text = text .. " (" .. c.reason .. ")"
  end
  if c.message ~= nil and c.message ~= "" then
    text = text .. ": " .. c.message
  end
  return text
end

local generation = 0
if obj.metadata ~= nil and obj.metadata.generation ~= nil then
  generation = obj.metadata.generation
end
local status = obj.status

if status == nil or status.observedGeneration == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the conveyor operator to observe the ModelDeployment"
  return hs
end
if status.observedGeneration < generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. tostring(generation) ..
    " (observed " .. tostring(status.observedGeneration) .. ")"
  return hs
end

local conditions = status.conditions
local degraded = condition(conditions, "Degraded")
local progressing = condition(conditions, "Progressing")
local ready = condition(conditions, "Ready")
local drifted = condition(conditions, "Drifted")

-- A condition computed from an older spec says nothing about the current one.
local function current(c)
  return c ~= nil and (c.observedGeneration == nil or c.observedGeneration >= generation)
end

if current(degraded) and degraded.status == "True" then
  hs.status = "Degraded"
  hs.message = describe(degraded)
  return hs
end
-- A canary held at its weight (spec.rollout.paused, or the operator paused it for a person after
-- inconclusive analyses or analysis errors): Suspended, as Argo CD shows a paused Argo Rollout.
if status.rolloutPhase == "Paused" then
  hs.status = "Suspended"
  hs.message = "Rollout paused"
  if status.pauseReason ~= nil then
    hs.message = hs.message .. " (" .. status.pauseReason .. ")"
  end
  if status.pauseMessage ~= nil then
    hs.message = hs.message .. ": " .. status.pauseMessage
  end
  return hs
end
if current(progressing) and progressing.status == "True" then
  hs.status = "Progressing"
  hs.message = describe(progressing)
  return hs
end
if current(ready) and ready.status == "True" then
  hs.status = "Healthy"
  local version = status.stableVersion or "?"
  hs.message = "Serving " .. version
  if status.url ~= nil then
    hs.message = hs.message .. " at " .. status.url
  end
  if drifted ~= nil and drifted.status == "True" then
    hs.message = hs.message .. "; " .. describe(drifted)
  end
  return hs
end
if current(ready) and ready.status == "False" then
  hs.status = "Degraded"
  hs.message = describe(ready)
  return hs
end

hs.status = "Progressing"
if ready ~= nil then
  hs.message = describe(ready)
else
  hs.message = "Waiting for the InferenceService to report readiness"
end
return hs
