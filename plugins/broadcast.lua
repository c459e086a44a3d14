-- broadcast: the seed's message to every connected client, for administrators only.
--
--   {"type":"broadcast", ...}  -> every other connected client gets the same object (its
--                                 strings cleaned), with the sender's userId and username.
--
-- Only a client whose token carries the admin role ([auth] admin_claim / admin_value) may
-- use it; everyone else gets `forbidden`. Guests never may.

rtgate.on("broadcast", function(client, event)
  if not client.admin then
    return "forbidden", "Only administrators may broadcast"
  end
  event.userId = client.userId
  event.clientId = client.id
  event.username = client.username
  rtgate.broadcast(event, { exclude = client.id })
end)
