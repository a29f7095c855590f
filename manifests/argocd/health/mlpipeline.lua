-- Argo CD health check for conveyor.dev/MLPipeline (resource.customizations.health.conveyor.dev_MLPipeline).
-- Reads the operator's status: observedGeneration, then the latest run's conditions DataValidated,
-- Trained, Evaluated, Registered and Succeeded. Lua 5.1 (Argo CD's gopher-lua).
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

if obj.spec ~= nil and obj.spec.suspend == true then
  hs.status = "Suspended"
  hs.message = "spec.suspend is true: no new runs start"
  return hs
end
if status == nil or status.observedGeneration == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the conveyor operator to observe the MLPipeline"
  return hs
end
if status.observedGeneration < generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. tostring(generation) ..
    " (observed " .. tostring(status.observedGeneration) .. ")"
  return hs
end

local conditions = status.conditions
local function current(c)
  return c ~= nil and (c.observedGeneration == nil or c.observedGeneration >= generation)
end

-- A stage that failed fails the run, whatever Succeeded says yet.
local stages = { "DataValidated", "Trained", "Evaluated", "Registered", "Succeeded" }
for _, kind in ipairs(stages) do
  local c = condition(conditions, kind)
  if current(c) and c.status == "False" then
    hs.status = "Degraded"
    hs.message = describe(c)
    return hs
  end
end

local succeeded = condition(conditions, "Succeeded")
if current(succeeded) and succeeded.status == "True" then
  hs.status = "Healthy"
  if status.latestVersion ~= nil then
    hs.message = "Latest version " .. status.latestVersion
    if status.latestMetric ~= nil then
      hs.message = hs.message .. " (" .. status.latestMetric .. ")"
    end
  else
    hs.message = describe(succeeded)
  end
  return hs
end

-- Running: name the first stage not passed yet.
hs.status = "Progressing"
hs.message = "Waiting for the first run"
for _, kind in ipairs(stages) do
  local c = condition(conditions, kind)
  if c ~= nil and c.status ~= "True" then
    hs.message = describe(c)
    return hs
  end
end
return hs
