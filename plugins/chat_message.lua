-- chat_message: the seed's Socket.IO chat, in rtgate's JSON envelope.
--
--   {"type":"chat_message","message":M,"room":R}
--     -> every member of R, the sender included:
--        {"type":"new_message","id":..,"userId":..,"username":..,"message":M,
--         "timestamp":"<ISO 8601>","room":R}
--   without "room": every connected client, the sender included (the seed's io.emit), if
--   the sender is an admin or limits.allow_global_chat allows it (rtgate.allow_global_chat);
--   otherwise the sender gets the error `room_required`.
--
-- The username is the sender's identity, never a field the client sends. Room messages
-- are persisted unless [plugins.settings.chat_message] persist = false.

local persist = rtgate.config.persist ~= false
local REFUSED = "Messages to everyone are turned off on this server: send to a room"

rtgate.on("chat_message", function(client, event)
  local message = event.message
  if type(message) ~= "string" then
    return "invalid_message", "\"message\" must be a string"
  end
  local room = event.room
  if room ~= nil and type(room) ~= "string" then
    return "invalid_room", "\"room\" must be a string"
  end
  local out = {
    type = "new_message",
    id = rtgate.random_id("msg_"),
    userId = client.userId,
    clientId = client.id,
    username = client.username,
    message = message,
    timestamp = rtgate.now_iso(),
    room = room,
  }
  if room == nil then
    if not (rtgate.allow_global_chat or client.admin) then
      return "room_required", REFUSED
    end
    rtgate.broadcast(out)
    return
  end
  local ok, code, why = rtgate.publish(room, out, { persist = persist })
  if not ok then
    return code, why
  end
end)
