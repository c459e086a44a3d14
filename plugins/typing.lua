-- typing: "alice is typing…" indicators that never hang.
--
--   {"type":"typing_start","room":R} -> the other members of R:
--       {"type":"user_typing","userId":..,"clientId":..,"username":..,"room":R}
--   {"type":"typing_stop","room":R}  -> the other members of R:
--       {"type":"user_stop_typing","userId":..,"clientId":..,"room":R}
--
-- A typer who sends no typing_start for `timeout_ms` (config, default 5000; each
-- typing_start restarts it) is stopped by the server, and so is one who leaves the room or
-- disconnects. Only the change from "not typing" to "typing" is announced, so a client
-- sending typing_start on every keystroke costs the room one message, not one per key.

local timeout_ms = tonumber(rtgate.config.timeout_ms) or 5000

-- typers[clientId][room] = { timer = id, userId = .. }
local typers = {}

local function stop(client_id, user_id, room)
  local rooms = typers[client_id]
  local entry = rooms and rooms[room]
  if entry == nil then
    return false
  end
  rtgate.cancel(entry.timer)
  rooms[room] = nil
  if next(rooms) == nil then
    typers[client_id] = nil
  end
  rtgate.publish(room, {
    type = "user_stop_typing",
    userId = user_id,
    clientId = client_id,
    room = room,
  }, { exclude = client_id })
  return true
end

local function check_room(client, event)
  local code, why = rtgate.check_member(client.id, event.room)
  if code then
    return nil, code, why
  end
  return event.room
end

rtgate.on("typing_start", function(client, event)
  local room, code, why = check_room(client, event)
  if not room then
    return code, why
  end
  local rooms = typers[client.id]
  if rooms == nil then
    rooms = {}
    typers[client.id] = rooms
  end
  local entry = rooms[room]
  if entry then
    rtgate.cancel(entry.timer)
  else
    entry = { userId = client.userId }
    rooms[room] = entry
    rtgate.publish(room, {
      type = "user_typing",
      userId = client.userId,
      clientId = client.id,
      username = client.username,
      room = room,
    }, { exclude = client.id })
  end
  local id, user = client.id, client.userId
  entry.timer = rtgate.after(timeout_ms, function()
    stop(id, user, room)
  end)
end)

rtgate.on("typing_stop", function(client, event)
  local room, code, why = check_room(client, event)
  if not room then
    return code, why
  end
  if not stop(client.id, client.userId, room) then
    -- Not typing: still tell the room, as the seed does; a client that lost track of
    -- its own state can always clear its indicator.
    rtgate.publish(room, {
      type = "user_stop_typing",
      userId = client.userId,
      clientId = client.id,
      room = room,
    }, { exclude = client.id })
  end
end)

-- Leaving a room, or disconnecting (which leaves every room first), ends typing there.
rtgate.on_leave(function(client, room)
  stop(client.id, client.userId, room)
end)

-- Across a reload, timers do not survive: clear every indicator instead of leaving
-- them hanging, and start the new version with no typers.
rtgate.on_state(function()
  for client_id, rooms in pairs(typers) do
    for room, entry in pairs(rooms) do
      stop(client_id, entry.userId, room)
    end
  end
  return nil
end, function(_) end)
