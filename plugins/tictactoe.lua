-- tictactoe: the seed's game server: matchmaking, validated turns, wins and draws,
-- opponents leaving, and rematches. Also the seed's plain `game_move` relay.
--
--   {"type":"find_game","playerData":D}
--       -> {"type":"waiting_for_opponent"} while nobody else waits; when a second player
--          arrives, both get {"type":"game_start","gameId":G,"currentPlayer":id,
--          "players":[{"id":..,"data":..,"symbol":"X"},{"id":..,"data":..,"symbol":"O"}]}
--   {"type":"game_move","position":0..8}   (from a player in a game)
--       -> both: {"type":"game_move","gameId":G,"position":P,"symbol":S,"board":[..9],"nextPlayer":id}
--          or, when it wins or fills the board, only
--          {"type":"game_end","gameId":G,"winner":"X"|"O"|"draw","board":[..9],"winnerPlayer":id?}
--   {"type":"game_move","room":R,...}      (from a client in no game)
--       -> the other members of R: the same object, with type "opponent_move" and the
--          sender's userId (the seed's relay)
--   {"type":"rematch"}  after a game ended: the opponent gets rematch_requested; when both
--          asked, a new game starts with the symbols swapped.
--   {"type":"leave_game"} leaves the queue, or forfeits a running game.
-- A player who disconnects mid-game: the opponent gets {"type":"player_disconnected",
-- "playerId":id} and the game ends. Ids (players, currentPlayer, nextPlayer, playerId) are
-- connection ids. Game ids are unguessable. Games only ever message their two players.

local LINES = {
  { 1, 2, 3 }, { 4, 5, 6 }, { 7, 8, 9 },
  { 1, 4, 7 }, { 2, 5, 8 }, { 3, 6, 9 },
  { 1, 5, 9 }, { 3, 5, 7 },
}
local NULL = rtgate.null

-- The whole state, kept JSON-shaped so that it survives a reload (see on_state below).
local state = {
  waiting = nil,  -- { id = clientId, data = playerData } or nil
  games = {},     -- gameId -> game
  player_game = {}, -- clientId -> gameId (running or finished-awaiting-rematch)
}

local function new_board()
  local b = {}
  for i = 1, 9 do
    b[i] = NULL
  end
  return b
end

local function winner_of(board)
  for _, l in ipairs(LINES) do
    local a = board[l[1]]
    if a ~= NULL and a == board[l[2]] and a == board[l[3]] then
      return a
    end
  end
  return nil
end

local function full(board)
  for i = 1, 9 do
    if board[i] == NULL then
      return false
    end
  end
  return true
end

local function to_both(game, msg)
  for _, p in ipairs(game.players) do
    rtgate.send(p.id, msg)
  end
end

local function player_index(game, id)
  for i, p in ipairs(game.players) do
    if p.id == id then
      return i
    end
  end
  return nil
end

local function start_game(first, second)
  local id = rtgate.random_id("game_")
  local game = {
    id = id,
    players = {
      { id = first.id, data = first.data, symbol = "X" },
      { id = second.id, data = second.data, symbol = "O" },
    },
    board = new_board(),
    current = 1,
    status = "playing",
    rematch = {}, -- clientId -> true once that player asked for a rematch
  }
  state.games[id] = game
  state.player_game[first.id] = id
  state.player_game[second.id] = id
  to_both(game, {
    type = "game_start",
    gameId = id,
    players = game.players,
    currentPlayer = game.players[1].id,
  })
end

local function end_game(game)
  state.games[game.id] = nil
  for _, p in ipairs(game.players) do
    if state.player_game[p.id] == game.id then
      state.player_game[p.id] = nil
    end
  end
end

rtgate.on("find_game", function(client, event)
  local current = state.player_game[client.id]
  if current and state.games[current] and state.games[current].status == "playing" then
    return "already_in_game", "You are already playing a game"
  end
  if state.waiting and state.waiting.id == client.id then
    return "already_waiting", "You are already waiting for an opponent"
  end
  -- A finished game awaiting a rematch is abandoned by looking for a new one.
  if current and state.games[current] then
    local game = state.games[current]
    local other = game.players[3 - player_index(game, client.id)]
    rtgate.send(other.id, { type = "rematch_declined", gameId = game.id, playerId = client.id })
    end_game(game)
  end
  local data = event.playerData
  if data == nil then
    data = NULL
  end
  local me = { id = client.id, data = data }
  local opponent = state.waiting
  if opponent and rtgate.client(opponent.id) == nil then
    opponent = nil -- gone without our hearing yet; never pair with a ghost
  end
  if opponent then
    state.waiting = nil
    -- As in the seed: the newcomer is X and moves first.
    start_game(me, opponent)
  else
    state.waiting = me
    rtgate.send(client.id, { type = "waiting_for_opponent" })
  end
end)

local function relay(client, event)
  local room = event.room
  if type(room) ~= "string" then
    return "not_in_game", "You are not in a game (a relayed move needs a \"room\")"
  end
  local code, why = rtgate.check_member(client.id, room)
  if code then
    return code, why
  end
  event.type = "opponent_move"
  event.userId = client.userId
  event.clientId = client.id
  local delivered, code, why = rtgate.publish(room, event, { exclude = client.id })
  if not delivered then
    return code, why
  end
end

rtgate.on("game_move", function(client, event)
  local game_id = state.player_game[client.id]
  local game = game_id and state.games[game_id]
  if not game then
    return relay(client, event)
  end
  if game.status ~= "playing" then
    return "game_over", "This game has ended"
  end
  local me = player_index(game, client.id)
  if me ~= game.current then
    return "not_your_turn", "It is not your turn"
  end
  local pos = event.position
  if type(pos) ~= "number" or pos ~= math.floor(pos) or pos < 0 or pos > 8 then
    return "invalid_position", "\"position\" must be a whole number from 0 to 8"
  end
  if game.board[pos + 1] ~= NULL then
    return "cell_taken", "That cell is already taken"
  end
  local symbol = game.players[me].symbol
  game.board[pos + 1] = symbol
  local winner = winner_of(game.board)
  if winner then
    game.status = "finished"
    to_both(game, {
      type = "game_end",
      gameId = game.id,
      winner = winner,
      board = game.board,
      winnerPlayer = client.id,
    })
  elseif full(game.board) then
    game.status = "finished"
    to_both(game, { type = "game_end", gameId = game.id, winner = "draw", board = game.board })
  else
    game.current = 3 - game.current
    to_both(game, {
      type = "game_move",
      gameId = game.id,
      position = pos,
      symbol = symbol,
      board = game.board,
      nextPlayer = game.players[game.current].id,
    })
  end
end)

rtgate.on("rematch", function(client, event)
  local game_id = state.player_game[client.id]
  local game = game_id and state.games[game_id]
  if not game then
    return "not_in_game", "There is no finished game to replay"
  end
  if game.status == "playing" then
    return "game_in_progress", "Finish this game first"
  end
  local me = player_index(game, client.id)
  local other = game.players[3 - me]
  if rtgate.client(other.id) == nil then
    end_game(game)
    return "opponent_gone", "Your opponent has left"
  end
  game.rematch[client.id] = true
  if game.rematch[other.id] then
    end_game(game)
    -- Symbols swap: whoever played O is now X and moves first.
    local x, o = game.players[1], game.players[2]
    start_game({ id = o.id, data = o.data }, { id = x.id, data = x.data })
  else
    rtgate.send(other.id, { type = "rematch_requested", gameId = game.id, playerId = client.id })
    rtgate.send(client.id, { type = "rematch_waiting", gameId = game.id })
  end
end)

local function leave(client_id)
  if state.waiting and state.waiting.id == client_id then
    state.waiting = nil
    return true
  end
  local game_id = state.player_game[client_id]
  local game = game_id and state.games[game_id]
  if not game then
    return false
  end
  local other = game.players[3 - player_index(game, client_id)]
  rtgate.send(other.id, { type = "player_disconnected", gameId = game.id, playerId = client_id })
  end_game(game)
  return true
end

rtgate.on("leave_game", function(client, event)
  if not leave(client.id) then
    return "not_in_game", "You are not waiting or playing"
  end
  rtgate.send(client.id, { type = "game_left" })
end)

rtgate.on_disconnect(function(client)
  leave(client.id)
end)

-- Running games survive a reload: the state is plain data, handed from the old version
-- to the new one.
rtgate.on_state(function()
  return state
end, function(saved)
  if type(saved) == "table" then
    state.waiting = saved.waiting
    state.games = saved.games or {}
    state.player_game = saved.player_game or {}
  end
end)
