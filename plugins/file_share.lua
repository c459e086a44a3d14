-- file_share: a notice that a user offers a file. No file content passes through.
--
--   {"type":"file_share","room":R,"filename":F,"size":N,"mimeType":T}
--     -> the other members of R:
--        {"type":"file_received","filename":F,"size":N,"mimeType":T,"userId":..,
--         "clientId":..,"username":..,"room":R}
--
-- Validated: the filename is reduced to a base name (no directories, no control
-- characters, at most 255 bytes), the size is a whole number from 0 to `max_size`
-- (config, default 100 MiB), and the MIME type must look like "type/subtype".

local max_size = tonumber(rtgate.config.max_size) or 100 * 1024 * 1024

local function base_name(name)
  if type(name) ~= "string" then
    return nil
  end
  -- Drop everything up to the last / or \ : "../../etc/passwd" is "passwd".
  name = name:match("([^/\\]*)$") or ""
  name = name:gsub("%c", "")
  name = name:match("^%s*(.-)%s*$")
  if name == "" or name == "." or name == ".." or #name > 255 then
    return nil
  end
  return name
end

local function mime_type(t)
  if type(t) ~= "string" or #t > 127 then
    return nil
  end
  t = t:lower()
  if not t:match("^[a-z0-9][a-z0-9!#$&^_.+-]*/[a-z0-9][a-z0-9!#$&^_.+-]*$") then
    return nil
  end
  return t
end

rtgate.on("file_share", function(client, event)
  local room = event.room
  local code, why = rtgate.check_member(client.id, room)
  if code then
    return code, why
  end
  local filename = base_name(event.filename)
  if not filename then
    return "invalid_filename", "\"filename\" must be a file name"
  end
  local size = event.size
  if type(size) ~= "number" or size ~= math.floor(size) or size < 0 or size > max_size then
    return "invalid_size", "\"size\" must be a whole number of bytes from 0 to " .. string.format("%d", max_size)
  end
  local mime = mime_type(event.mimeType)
  if not mime then
    return "invalid_mime_type", "\"mimeType\" must be a MIME type such as \"image/png\""
  end
  rtgate.publish(room, {
    type = "file_received",
    filename = filename,
    size = size,
    mimeType = mime,
    userId = client.userId,
    clientId = client.id,
    username = client.username,
    room = room,
  }, { exclude = client.id })
end)
