-- Argo CD health of SpeculatorDataGen and SpeculatorTraining (specops.dev), from the lifecycle
-- conditions the operator keeps on every resource. Register it for both kinds in argocd-cm:
--   resource.customizations.health.specops.dev_SpeculatorDataGen
--   resource.customizations.health.specops.dev_SpeculatorTraining
-- Order matters: a status written for an older spec says nothing about the current one.
local hs = {}

local function condition(conditions, kind)
  for _, c in ipairs(conditions) do
    if c.type == kind then
      return c
    end
  end
  return nil
end

local function is_true(conditions, kind)
  local c = condition(conditions, kind)
  return c ~= nil and c.status == "True"
end

local function describe(c, fallback)
  if c == nil then
    return fallback
  end
  if c.message ~= nil and c.message ~= "" then
    return c.reason .. ": " .. c.message
  end
  return c.reason or fallback
end

if obj.status == nil or obj.status.conditions == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to report status"
  return hs
end

local generation = obj.metadata.generation
local observed = obj.status.observedGeneration
if generation ~= nil and (observed == nil or observed < generation) then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. generation
  return hs
end

local conditions = obj.status.conditions
if is_true(conditions, "Failed") or is_true(conditions, "Stalled") then
  hs.status = "Degraded"
  hs.message = describe(condition(conditions, "Stalled"), "Failed")
elseif is_true(conditions, "Suspended") then
  hs.status = "Suspended"
  hs.message = describe(condition(conditions, "Suspended"), "Suspended")
elseif is_true(conditions, "Complete") and is_true(conditions, "Ready") then
  hs.status = "Healthy"
  hs.message = describe(condition(conditions, "Ready"), "Complete")
else
  hs.status = "Progressing"
  hs.message = describe(condition(conditions, "Reconciling"), "Reconciling")
end
return hs
