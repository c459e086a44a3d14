-- chat_message: the seed's Socket.IO chat, in rtgate's JSON envelope.
--
--   {"type":"chat_message","message":M,"room":R}
--     -> every member of R, the sender included:
--        {"type":"new_message","id":..,"userId":..,"username":..,"message":M,
--         "timestamp":"<ISO 8601>","room":R}
--   without "room": every connected client, the sender included (the seed's io.emit).
--
-- The username is the sender's identity, never a field the client sends. Room messages
-- are persisted unless [plugins.settings.chat_message] persist = false.

local persist = rtgate.config.persist ~= false

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
    rtgate.broadcast(out)
    return
  end
  local ok, code, why = rtgate.publish(room, out, { persist = persist })
  if not ok then
    return code, why
  end
end)
