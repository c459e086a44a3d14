-- chat: the seed's raw-WebSocket chat.
--
--   {"type":"chat","message":M,"room":R}
--     -> every member of R, the sender included:
--        {"type":"chat_message","clientId":id,"message":M,"timestamp":<ms>,"room":R}
--   without "room": every other connected client gets it (the sender excluded), if the
--   sender is an admin or limits.allow_global_chat allows it (rtgate.allow_global_chat);
--   otherwise the sender gets the error `room_required`.
--
-- Room messages are persisted (they carry "seq" and are replayable) unless
-- [plugins.settings.chat] persist = false.

local persist = rtgate.config.persist ~= false
local REFUSED = "Messages to everyone are turned off on this server: send to a room"

rtgate.on("chat", function(client, event)
  local message = event.message
  if type(message) ~= "string" then
    return "invalid_message", "\"message\" must be a string"
  end
  local out = {
    type = "chat_message",
    clientId = client.id,
    message = message,
    timestamp = rtgate.now_ms(),
    room = event.room,
    username = client.username,
  }
  if event.room == nil then
    if not (rtgate.allow_global_chat or client.admin) then
      return "room_required", REFUSED
    end
    rtgate.broadcast(out, { exclude = client.id })
    return
  end
  if type(event.room) ~= "string" then
    return "invalid_room", "\"room\" must be a string"
  end
  local ok, code, why = rtgate.publish(event.room, out, { persist = persist })
  if not ok then
    return code, why
  end
end)
