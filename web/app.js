// rtgate's bundled page: chat rooms with history, typing indicators, file-share notices
// and tic-tac-toe, on top of rtgate.js (window.RtGate).
//
// Rules this file keeps:
// - Nothing a user sent is ever parsed as live markup. The gateway delivers every string
//   as safe HTML; message text is rebuilt node by node from an inert parse, keeping only
//   the gateway's own allow-list (see renderSafeHtml), and names are shown as plain text.
// - No inline styles or scripts (the gateway's CSP forbids them): looks are CSS classes.
(function () {
  'use strict';

  var RtGate = window.RtGate;

  var ROOM_NAME = /^[A-Za-z0-9_.:-]{1,64}$/;
  // While the user types we re-announce every 2 s: the server drops a typer it has not
  // heard from for 5 s. After 3 s without a keystroke we say we stopped.
  var TYPING_REFRESH_MS = 2000;
  var TYPING_IDLE_MS = 3000;
  // The server always ends indicators itself (stop, timeout, leave, disconnect); this is
  // only a last resort should a stop notice be lost.
  var TYPING_STALE_MS = 30000;
  var AVATAR_COLOURS = 8;
  // After a reconnect, people who were in a room before the outage and rejoin within this
  // time are not announced as joining (they were there all along).
  var RETURN_WINDOW_MS = 60000;

  var $ = function (id) {
    return document.getElementById(id);
  };
  var ui = {
    session: $('session'),
    status: $('conn-status'),
    myName: $('my-name'),
    disconnect: $('disconnect'),
    login: $('login'),
    loginForm: $('login-form'),
    loginName: $('login-name'),
    loginRoom: $('login-room'),
    loginToken: $('login-token'),
    workspace: $('workspace'),
    roomList: $('room-list'),
    joinForm: $('join-form'),
    joinRoom: $('join-room'),
    roomTitle: $('room-title'),
    roomMembers: $('room-members'),
    timeline: $('timeline'),
    loadOlder: $('load-older'),
    empty: $('empty-state'),
    typing: $('typing'),
    composer: $('composer'),
    input: $('message-input'),
    send: $('send'),
    fileForm: $('file-form'),
    filePick: $('file-pick'),
    fileName: $('file-name'),
    fileSize: $('file-size'),
    fileType: $('file-type'),
    game: $('game'),
    gamePlayers: $('game-players'),
    gameStatus: $('game-status'),
    board: $('board'),
    findGame: $('find-game'),
    rematch: $('rematch'),
    leaveGame: $('leave-game'),
  };

  var state = {
    client: null,
    // Every id this page has had: clientId changes on each reconnect, and our earlier
    // messages (still on screen, or loaded from history) must stay marked as ours.
    myIds: new Set(),
    myName: '',
    rooms: new Map(), // name -> Room (see newRoom)
    active: null,
    typing: { room: null, lastSent: 0, idleTimer: null },
    // Whether the reader was at the newest message when they last scrolled: then the list
    // stays at the bottom when it changes size. (New messages check the live position.)
    pinned: true,
    // The connection was lost and has not come back yet: failed attempts say nothing more.
    outage: false,
    game: newGame(),
  };

  // ---- Safe rendering ---------------------------------------------------------------

  // The gateway's sanitizer keeps exactly these tags (docs/security.md). Re-checking on
  // this side costs little and keeps the page safe even behind a misconfigured gateway.
  var ALLOWED_TAGS = { B: 1, I: 1, EM: 1, STRONG: 1, U: 1, S: 1, CODE: 1, BR: 1, A: 1 };
  var DROPPED_WITH_CONTENT = { SCRIPT: 1, STYLE: 1, TEMPLATE: 1, NOSCRIPT: 1 };
  var parser = new DOMParser();

  // A DOMParser document is inert: nothing in it runs or loads. We copy from it into the
  // live page only text nodes and allowed elements, created fresh, without attributes
  // except a checked href. An <a> without an allowed href (the gateway removes any other)
  // is not a link at all: only its text is kept.
  function renderSafeHtml(target, html) {
    var doc = parser.parseFromString(String(html), 'text/html');
    copyAllowed(doc.body, target);
  }

  function copyAllowed(from, to) {
    for (var node = from.firstChild; node; node = node.nextSibling) {
      if (node.nodeType === Node.TEXT_NODE) {
        to.appendChild(document.createTextNode(node.data));
      } else if (node.nodeType === Node.ELEMENT_NODE && !DROPPED_WITH_CONTENT[node.tagName]) {
        var href = node.tagName === 'A' ? safeHref(node.getAttribute('href')) : null;
        if (ALLOWED_TAGS[node.tagName] && (node.tagName !== 'A' || href)) {
          var copy = document.createElement(node.tagName.toLowerCase());
          if (href) {
            copy.href = href;
            copy.rel = 'noopener noreferrer nofollow';
            copy.target = '_blank';
          }
          copyAllowed(node, copy);
          to.appendChild(copy);
        } else {
          copyAllowed(node, to); // an unexpected element: keep its text only
        }
      }
    }
  }

  // The address, when it is an absolute http, https or mailto URL; otherwise null. No base
  // URL: a relative or missing address must not turn into a link into this page.
  function safeHref(href) {
    if (!href) return null;
    try {
      var url = new URL(href);
      var allowed = url.protocol === 'http:' || url.protocol === 'https:' || url.protocol === 'mailto:';
      return allowed ? url.href : null;
    } catch (e) {
      return null; // not an absolute URL
    }
  }

  // Names, file names and types are safe HTML too; we show them as text, so entities
  // are decoded ("a &lt; b" reads "a < b") and tags dropped. The result only ever goes
  // into textContent.
  function plainText(html) {
    if (html === null || html === undefined) return '';
    return parser.parseFromString(String(html), 'text/html').body.textContent || '';
  }

  function make(tag, className, text) {
    var node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  // ---- Signing in and the connection ------------------------------------------------

  function start(event) {
    event.preventDefault();
    var name = ui.loginName.value.trim();
    var token = ui.loginToken.value.trim();
    var room = ui.loginRoom.value.trim();
    if (!ROOM_NAME.test(room)) {
      ui.loginRoom.setCustomValidity('1–64 letters, digits, or _ - . :');
      ui.loginRoom.reportValidity();
      return;
    }
    try {
      localStorage.setItem('rtgate.name', name);
    } catch (e) {
      // storage may be disabled; the name is only a convenience
    }
    state.client = RtGate.connect(undefined, token ? { token: token } : { name: name });
    wireClient(state.client);
    ui.login.hidden = true;
    ui.workspace.hidden = false;
    ui.session.hidden = false;
    setStatus('pending', 'Connecting…');
    joinRoom(room);
    ui.input.focus();
  }

  // Handlers run only while `client` is the page's current one: after "Disconnect" and a
  // new sign-in, late events of the old connection must not touch the new session.
  function wireClient(client) {
    var on = function (type, fn) {
      client.on(type, function (msg) {
        if (state.client === client) fn(msg);
      });
    };
    on('open', onOpen);
    on('close', onClose);
    on('reconnecting', onReconnecting);
    on('name_set', function (msg) {
      state.myName = plainText(msg.username);
      ui.myName.textContent = state.myName;
    });
    on('room_joined', onRoomJoined);
    on('user_joined', onUserJoined);
    on('user_left', onUserLeft);
    on('new_message', onChatMessage);
    on('chat_message', onChatMessage); // the raw-WebSocket chat, from other clients
    on('history_gap', onHistoryGap);
    on('room_left', function (msg) {
      // Removed by the server (the token no longer allows this room): say so, then drop
      // the room as if the reader had left it.
      if (!state.rooms.has(msg.room)) return;
      leaveRoom(msg.room);
      noticeEverywhere('You were removed from #' + msg.room + ': ' + (msg.message || 'no longer allowed') + '.', 'error');
    });
    on('user_typing', onUserTyping);
    on('user_stop_typing', onUserStopTyping);
    on('file_received', onFileReceived);
    on('error', onServerError);
    wireGame(on);
  }

  function onOpen(info) {
    state.myIds.add(info.clientId);
    state.myIds.add(info.userId);
    state.myName = plainText(info.username);
    ui.myName.textContent = state.myName;
    setStatus('online', 'Connected');
    setComposerEnabled(true);
    state.outage = false;
    noticeEverywhere(info.reconnected ? 'Reconnected.' : 'Connected as ' + state.myName + '.');
  }

  function onClose(info) {
    state.typing.room = null;
    state.rooms.forEach(clearTypers);
    endGameOnDisconnect();
    if (!info.willReconnect) {
      state.outage = false;
      setStatus('offline', 'Disconnected');
      setComposerEnabled(false);
      noticeEverywhere('Disconnected' + describeClose(info) + '.', 'error');
      return;
    }
    setStatus('pending', 'Reconnecting…');
    // One notice per outage: each failed attempt closes again, and only the status shows it.
    if (state.outage) return;
    state.outage = true;
    state.rooms.forEach(rememberMembers);
    noticeEverywhere('Disconnected' + describeClose(info) + '. Reconnecting…');
  }

  function onReconnecting(info) {
    var seconds = (info.delay / 1000).toFixed(1);
    setStatus('pending', 'Reconnecting in ' + seconds + ' s…');
  }

  function describeClose(info) {
    var known = { 1001: 'the server is restarting', 1006: 'connection lost', 1008: 'refused by policy' };
    var why = info.reason || known[info.code];
    return why ? ' (' + why + ')' : info.code ? ' (code ' + info.code + ')' : '';
  }

  function disconnect() {
    var client = state.client;
    state.client = null; // first: the close it causes is not an outage to report
    if (client) client.close();
    resetWorkspace();
  }

  function resetWorkspace() {
    state.rooms.forEach(function (room) {
      room.list.remove();
    });
    state.rooms.clear();
    state.active = null;
    state.myIds.clear();
    state.outage = false;
    state.game = newGame();
    ui.roomList.textContent = '';
    renderActiveRoom();
    renderGame('Play a quick game against another visitor.');
    ui.workspace.hidden = true;
    ui.session.hidden = true;
    ui.login.hidden = false;
    ui.loginName.focus();
  }

  function setStatus(kind, text) {
    ui.status.className = 'status ' + kind;
    ui.status.textContent = text;
  }

  function setComposerEnabled(on) {
    ui.input.disabled = !on || !state.active;
    ui.send.disabled = !on || !state.active;
  }

  // ---- Rooms ------------------------------------------------------------------------

  function newRoom(name) {
    var list = make('ol', 'messages');
    list.dataset.room = name;
    list.hidden = true;
    ui.timeline.appendChild(list);
    return {
      name: name,
      list: list,
      seqs: new Set(), // messages shown, by seq and by id: never show one twice
      ids: new Set(),
      oldest: null, // smallest seq shown: the `before` of "load older"
      hasOlder: false,
      loadingOlder: false,
      members: new Map(), // clientId -> display name ('' until we learn it)
      returning: null, // names of the others in the room when the connection was lost
      returningUntil: 0,
      joinedOnce: false,
      unread: 0,
      typers: new Map(), // clientId -> {name, timer}
      tab: null,
    };
  }

  // History first, then the live join with `since` = the newest stored seq we got: the
  // gateway replays whatever was published in between, so nothing falls in the gap.
  function joinRoom(name) {
    if (!ROOM_NAME.test(name)) {
      notice(activeRoom(), 'Room names are 1–64 letters, digits, or _ - . :', 'error');
      return;
    }
    if (state.rooms.has(name)) {
      setActive(name);
      return;
    }
    var room = newRoom(name);
    state.rooms.set(name, room);
    renderRoomTab(room);
    setActive(name);
    var client = state.client;
    client
      .history(name)
      .then(function (page) {
        // Above any notice already shown ("Connected as …"): it is older than them.
        addMessages(room, page.messages, 'start');
        if (room === activeRoom()) scrollToBottom(); // the newest message, not the oldest
        room.hasOlder = page.prev !== null && page.prev !== undefined;
        var last = page.messages.length ? page.messages[page.messages.length - 1].seq : 0;
        return { since: typeof last === 'number' ? last : 0 };
      })
      .catch(function (err) {
        notice(room, 'Earlier messages are unavailable (' + err.message + ').', 'error');
        return {};
      })
      .then(function (opts) {
        if (state.client !== client || state.rooms.get(name) !== room) return; // left meanwhile
        client.join(name, opts);
        if (room === activeRoom()) renderActiveRoom();
      });
  }

  function leaveRoom(name) {
    var room = state.rooms.get(name);
    if (!room) return;
    if (state.typing.room === name) stopTyping();
    state.client.leave(name);
    clearTypers(room);
    room.list.remove();
    room.tab.remove();
    state.rooms.delete(name);
    if (state.active === name) {
      var next = state.rooms.keys().next();
      state.active = null;
      if (!next.done) setActive(next.value);
      else renderActiveRoom();
    }
  }

  function activeRoom() {
    return state.active ? state.rooms.get(state.active) : null;
  }

  function setActive(name) {
    if (state.active && state.active !== name && state.typing.room) stopTyping();
    state.active = name;
    var room = state.rooms.get(name);
    room.unread = 0;
    state.rooms.forEach(function (r) {
      r.list.hidden = r !== room;
      renderRoomTab(r);
    });
    renderActiveRoom();
    scrollToBottom();
  }

  function renderRoomTab(room) {
    if (!room.tab) {
      room.tab = make('li', 'room-tab');
      var open = make('button', 'room-open');
      open.type = 'button';
      open.addEventListener('click', function () {
        setActive(room.name);
        ui.input.focus();
      });
      var leave = make('button', 'room-leave', '×');
      leave.type = 'button';
      leave.setAttribute('aria-label', 'Leave ' + room.name);
      leave.title = 'Leave ' + room.name;
      leave.addEventListener('click', function () {
        leaveRoom(room.name);
      });
      room.tab.append(open, leave);
      ui.roomList.appendChild(room.tab);
    }
    var button = room.tab.firstChild;
    button.textContent = roomLabel(room.name);
    if (room.unread > 0) button.appendChild(make('span', 'badge', String(room.unread)));
    var current = room.name === state.active;
    room.tab.classList.toggle('active', current);
    if (current) button.setAttribute('aria-current', 'true');
    else button.removeAttribute('aria-current');
  }

  // A no-break space: a long name wraps within itself, never leaving "#" alone on a line.
  function roomLabel(name) {
    return '#\u00a0' + name;
  }

  function renderActiveRoom() {
    var room = activeRoom();
    ui.empty.hidden = !!room;
    ui.roomTitle.textContent = room ? roomLabel(room.name) : 'No room';
    var count = room ? room.members.size : 0;
    ui.roomMembers.textContent = count ? count + (count === 1 ? ' member' : ' members') : '';
    ui.loadOlder.hidden = !room || !room.hasOlder;
    ui.loadOlder.disabled = !!room && room.loadingOlder;
    ui.loadOlder.textContent = room && room.loadingOlder ? 'Loading…' : 'Load older messages';
    // Also while reconnecting: rtgate.js queues what is sent meanwhile.
    setComposerEnabled(!!state.client && state.client.state !== 'closed');
    renderTyping();
  }

  // `members` lists ids only; names come from user_joined and from what people send.
  function onRoomJoined(msg) {
    var room = state.rooms.get(msg.room);
    if (!room) return;
    var before = room.members;
    room.members = new Map();
    (Array.isArray(msg.members) ? msg.members : []).forEach(function (id) {
      var name = before.get(id) || '';
      room.members.set(id, name);
      if (room.returning && !state.myIds.has(id)) cameBack(room, name);
    });
    if (room.returning) room.returningUntil = Date.now() + RETURN_WINDOW_MS;
    if (!room.joinedOnce) notice(room, 'You joined #' + room.name + '.');
    room.joinedOnce = true;
    if (room === activeRoom()) renderActiveRoom();
  }

  function onUserJoined(msg) {
    var room = state.rooms.get(msg.room);
    if (!room) return;
    var name = plainText(msg.username || msg.clientId);
    room.members.set(msg.clientId, name);
    var wasThere = room.returning && Date.now() < room.returningUntil && cameBack(room, name);
    if (!wasThere) notice(room, name + ' joined.');
    if (room === activeRoom()) renderActiveRoom();
  }

  function onUserLeft(msg) {
    var room = state.rooms.get(msg.room);
    if (!room) return;
    room.members.delete(msg.clientId);
    dropTyper(room, msg.clientId || msg.userId);
    notice(room, plainText(msg.username || msg.clientId) + ' left.');
    if (room === activeRoom()) renderActiveRoom();
  }

  // At the start of an outage: who else is here. After a restart everyone comes back with
  // a new id, so they are recognised by name; members whose name we never learned (they
  // were here before us and have said nothing) count as "someone we know".
  function rememberMembers(room) {
    room.returning = [];
    room.returningUntil = 0;
    room.members.forEach(function (name, id) {
      if (!state.myIds.has(id)) room.returning.push(name);
    });
  }

  // Ticks off one member from before the outage: the one with this name, else one whose
  // name we do not know. False when nobody is left to match.
  function cameBack(room, name) {
    var i = room.returning.indexOf(name);
    if (i === -1) i = room.returning.indexOf('');
    if (i === -1) return false;
    room.returning.splice(i, 1);
    return true;
  }

  // Messages, typing and file notices carry the sender's name: learn it for presence.
  function learnName(room, msg) {
    if (msg.clientId && room.members.has(msg.clientId) && msg.username) {
      room.members.set(msg.clientId, plainText(msg.username));
    }
  }

  function onHistoryGap(msg) {
    var room = state.rooms.get(msg.room);
    if (room) notice(room, 'Some messages could not be replayed while you were away.', 'error');
  }

  // ---- Messages ---------------------------------------------------------------------

  function isMine(msg) {
    return state.myIds.has(msg.clientId) || (msg.userId !== undefined && state.myIds.has(msg.userId));
  }

  function onChatMessage(msg) {
    var room = state.rooms.get(msg.room);
    if (!room) return; // a room-less broadcast, or one we just left
    learnName(room, msg);
    dropTyper(room, msg.clientId || msg.userId);
    var stick = nearBottom();
    var added = addMessages(room, [msg], 'end');
    if (!added) return;
    if (room === activeRoom()) {
      if (stick || isMine(msg)) scrollToBottom();
    } else {
      room.unread += 1;
      renderRoomTab(room);
    }
  }

  // Adds messages (ascending by seq) at the end or the start of a room's list, skipping
  // any already shown. Returns how many were added.
  function addMessages(room, messages, where) {
    var fragment = document.createDocumentFragment();
    var added = 0;
    messages.forEach(function (msg) {
      if (typeof msg.seq === 'number') {
        if (room.seqs.has(msg.seq)) return;
        room.seqs.add(msg.seq);
        room.oldest = room.oldest === null ? msg.seq : Math.min(room.oldest, msg.seq);
      }
      if (msg.id) {
        if (room.ids.has(msg.id)) return;
        room.ids.add(msg.id);
      }
      fragment.appendChild(messageNode(msg));
      added += 1;
    });
    if (where === 'start') room.list.insertBefore(fragment, room.list.firstChild);
    else room.list.appendChild(fragment);
    return added;
  }

  function messageNode(msg) {
    var name = plainText(msg.username) || 'someone';
    var li = make('li', isMine(msg) ? 'msg mine' : 'msg');
    if (typeof msg.seq === 'number') li.dataset.seq = String(msg.seq);
    var avatar = make('span', 'avatar c' + (hash(name) % AVATAR_COLOURS), name.charAt(0).toUpperCase());
    avatar.setAttribute('aria-hidden', 'true');
    var bubble = make('div', 'bubble');
    var meta = make('div', 'meta');
    meta.appendChild(make('span', 'author', name));
    var when = new Date(msg.timestamp);
    if (!isNaN(when.getTime())) {
      var time = make('time', '', when.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' }));
      time.dateTime = when.toISOString();
      time.title = when.toLocaleString();
      meta.appendChild(time);
    }
    var text = make('div', 'text');
    renderSafeHtml(text, msg.message);
    bubble.append(meta, text);
    li.append(avatar, bubble);
    return li;
  }

  function hash(text) {
    var h = 0;
    for (var i = 0; i < text.length; i++) h = (h * 31 + text.charCodeAt(i)) >>> 0;
    return h;
  }

  function notice(room, text, kind) {
    if (!room) return;
    var li = make('li', 'notice' + (kind ? ' ' + kind : ''), text);
    var stick = nearBottom();
    room.list.appendChild(li);
    if (room === activeRoom() && stick) scrollToBottom();
  }

  function noticeEverywhere(text, kind) {
    state.rooms.forEach(function (room) {
      notice(room, text, kind);
    });
  }

  function sendMessage(event) {
    event.preventDefault();
    var room = activeRoom();
    var text = ui.input.value;
    if (!room || !state.client || text.trim() === '') return;
    stopTyping();
    var result = state.client.send({ type: 'chat_message', room: room.name, message: text });
    if (result === 'dropped') {
      notice(room, 'Not sent: too many messages are waiting for the connection.', 'error');
      return;
    }
    if (result === 'queued') notice(room, 'Offline: your message will be sent when the connection is back.');
    ui.input.value = '';
  }

  function loadOlder() {
    var room = activeRoom();
    if (!room || room.loadingOlder || room.oldest === null) return;
    room.loadingOlder = true;
    renderActiveRoom();
    state.client
      .history(room.name, { before: room.oldest })
      .then(function (page) {
        // Keep the reader's place: the list grows above what they are looking at.
        var fromBottom = ui.timeline.scrollHeight - ui.timeline.scrollTop;
        addMessages(room, page.messages, 'start');
        room.hasOlder = page.prev !== null && page.prev !== undefined;
        ui.timeline.scrollTop = ui.timeline.scrollHeight - fromBottom;
      })
      .catch(function (err) {
        notice(room, 'Could not load older messages (' + err.message + ').', 'error');
      })
      .then(function () {
        room.loadingOlder = false;
        if (room === activeRoom()) renderActiveRoom();
      });
  }

  function nearBottom() {
    var t = ui.timeline;
    return t.scrollHeight - t.scrollTop - t.clientHeight < 80;
  }

  function scrollToBottom() {
    ui.timeline.scrollTop = ui.timeline.scrollHeight;
    state.pinned = true;
  }

  function onServerError(msg) {
    if (GAME_ERRORS[msg.code]) {
      ui.gameStatus.textContent = plainText(msg.message);
      return;
    }
    var room = (msg.room && state.rooms.get(msg.room)) || activeRoom();
    var extra = msg.retryAfterMs ? ' Try again in ' + Math.ceil(msg.retryAfterMs / 1000) + ' s.' : '';
    notice(room, plainText(msg.message || msg.code) + '.' + extra, 'error');
  }

  // ---- Typing indicators ------------------------------------------------------------

  // Ephemeral: worth sending only on a live connection, never queued for later.
  function sendIfOpen(message) {
    if (state.client && state.client.state === 'open') state.client.send(message);
  }

  function onInput() {
    var room = activeRoom();
    if (!room) return;
    if (ui.input.value.trim() === '') {
      stopTyping();
      return;
    }
    var t = state.typing;
    var now = Date.now();
    if (t.room !== room.name || now - t.lastSent > TYPING_REFRESH_MS) {
      sendIfOpen({ type: 'typing_start', room: room.name });
      t.room = room.name;
      t.lastSent = now;
    }
    clearTimeout(t.idleTimer);
    t.idleTimer = setTimeout(stopTyping, TYPING_IDLE_MS);
  }

  function stopTyping() {
    var t = state.typing;
    clearTimeout(t.idleTimer);
    if (t.room && state.rooms.has(t.room)) sendIfOpen({ type: 'typing_stop', room: t.room });
    t.room = null;
  }

  function onUserTyping(msg) {
    var room = state.rooms.get(msg.room);
    if (!room) return;
    learnName(room, msg);
    var key = msg.clientId || msg.userId;
    var entry = room.typers.get(key);
    if (entry) clearTimeout(entry.timer);
    room.typers.set(key, {
      name: plainText(msg.username) || 'Someone',
      timer: setTimeout(function () {
        dropTyper(room, key);
      }, TYPING_STALE_MS),
    });
    if (room === activeRoom()) renderTyping();
  }

  function onUserStopTyping(msg) {
    var room = state.rooms.get(msg.room);
    if (room) dropTyper(room, msg.clientId || msg.userId);
  }

  function dropTyper(room, key) {
    var entry = room.typers.get(key);
    if (!entry) return;
    clearTimeout(entry.timer);
    room.typers.delete(key);
    if (room === activeRoom()) renderTyping();
  }

  function clearTypers(room) {
    room.typers.forEach(function (entry) {
      clearTimeout(entry.timer);
    });
    room.typers.clear();
    if (room === activeRoom()) renderTyping();
  }

  function renderTyping() {
    var room = activeRoom();
    var names = room
      ? Array.from(room.typers.values()).map(function (e) {
          return e.name;
        })
      : [];
    var text = '';
    if (names.length === 1) text = names[0] + ' is typing…';
    else if (names.length === 2) text = names[0] + ' and ' + names[1] + ' are typing…';
    else if (names.length > 2) text = names[0] + ', ' + names[1] + ' and ' + (names.length - 2) + ' more are typing…';
    ui.typing.textContent = text;
  }

  // ---- File-share notices -----------------------------------------------------------

  function onFilePicked() {
    var file = ui.filePick.files && ui.filePick.files[0];
    if (!file) return;
    ui.fileName.value = file.name;
    ui.fileSize.value = String(file.size);
    ui.fileType.value = file.type || 'application/octet-stream';
  }

  function shareFile(event) {
    event.preventDefault();
    var room = activeRoom();
    if (!room || !state.client) return;
    var size = Number(ui.fileSize.value);
    var notice_ = {
      type: 'file_share',
      room: room.name,
      filename: ui.fileName.value.trim(),
      size: size,
      mimeType: ui.fileType.value.trim(),
    };
    state.client.send(notice_);
    // The gateway tells only the others; our own copy is shown here.
    notice(room, 'You shared ' + notice_.filename + ' (' + formatSize(size) + ', ' + notice_.mimeType + ').', 'file');
    ui.fileForm.reset();
    ui.fileType.value = 'application/octet-stream';
  }

  function onFileReceived(msg) {
    var room = state.rooms.get(msg.room);
    if (!room) return;
    learnName(room, msg);
    var text =
      plainText(msg.username) +
      ' shared ' +
      plainText(msg.filename) +
      ' (' +
      formatSize(msg.size) +
      ', ' +
      plainText(msg.mimeType) +
      ').';
    notice(room, text, 'file');
    if (room !== activeRoom()) {
      room.unread += 1;
      renderRoomTab(room);
    }
  }

  function formatSize(bytes) {
    var n = Number(bytes);
    if (!isFinite(n) || n < 0) return '? bytes';
    if (n < 1024) return n + (n === 1 ? ' byte' : ' bytes');
    var units = ['KB', 'MB', 'GB'];
    var i = -1;
    do {
      n /= 1024;
      i += 1;
    } while (n >= 1024 && i < units.length - 1);
    return n.toFixed(n < 10 ? 1 : 0) + ' ' + units[i];
  }

  // ---- Tic-tac-toe ------------------------------------------------------------------

  var LINES = [
    [0, 1, 2], [3, 4, 5], [6, 7, 8],
    [0, 3, 6], [1, 4, 7], [2, 5, 8],
    [0, 4, 8], [2, 4, 6],
  ];
  var GAME_ERRORS = {
    already_waiting: 1, already_in_game: 1, not_your_turn: 1, invalid_position: 1, cell_taken: 1,
    game_over: 1, not_in_game: 1, game_in_progress: 1, opponent_gone: 1,
  };

  // phase: idle (no game) | waiting (in the queue) | playing | over (awaiting a rematch)
  function newGame() {
    return { phase: 'idle', mySymbol: null, opponent: '', board: emptyBoard(), turn: null, winLine: null };
  }

  function emptyBoard() {
    return [null, null, null, null, null, null, null, null, null];
  }

  function buildBoard() {
    for (var i = 0; i < 9; i++) {
      var cell = make('button', 'cell');
      cell.type = 'button';
      cell.dataset.pos = String(i);
      cell.addEventListener('click', onCellClick);
      ui.board.appendChild(cell);
    }
  }

  function wireGame(on) {
    on('waiting_for_opponent', function () {
      state.game = newGame();
      state.game.phase = 'waiting';
      renderGame('Waiting for an opponent…');
    });
    on('game_start', function (msg) {
      var me = msg.players.filter(function (p) {
        return p.id === state.client.clientId;
      })[0];
      var other = msg.players.filter(function (p) {
        return p !== me;
      })[0];
      state.game = newGame();
      state.game.phase = 'playing';
      state.game.mySymbol = me ? me.symbol : null;
      state.game.opponent = (other && other.data && plainText(other.data.name)) || 'Opponent';
      state.game.turn = msg.currentPlayer;
      renderGame();
    });
    on('game_move', function (msg) {
      if (!Array.isArray(msg.board)) return; // a relayed move (opponent_move) has no board
      state.game.board = msg.board;
      state.game.turn = msg.nextPlayer;
      renderGame();
    });
    on('game_end', function (msg) {
      var g = state.game;
      g.board = msg.board;
      g.phase = 'over';
      g.turn = null;
      g.winLine = msg.winner === 'draw' ? null : winningLine(msg.board, msg.winner);
      var text = msg.winner === 'draw' ? "It's a draw." : msg.winner === g.mySymbol ? 'You win!' : g.opponent + ' wins.';
      renderGame(text);
    });
    on('rematch_requested', function () {
      renderGame(state.game.opponent + ' wants a rematch.');
    });
    on('rematch_waiting', function () {
      renderGame('Waiting for ' + state.game.opponent + ' to accept the rematch…');
    });
    on('rematch_declined', function () {
      var who = state.game.opponent;
      state.game = newGame();
      renderGame(who + ' went looking for a new game.');
    });
    on('player_disconnected', function () {
      var g = state.game;
      g.phase = 'idle';
      g.turn = null;
      renderGame(g.opponent + ' left the game.');
    });
    on('game_left', function () {
      state.game = newGame();
      renderGame('You left the game.');
    });
  }

  function winningLine(board, symbol) {
    for (var i = 0; i < LINES.length; i++) {
      var l = LINES[i];
      if (board[l[0]] === symbol && board[l[1]] === symbol && board[l[2]] === symbol) return l;
    }
    return null;
  }

  function endGameOnDisconnect() {
    if (state.game.phase === 'idle') return;
    // The gateway ends a game whose player disconnects; a new connection starts afresh.
    var board = state.game.board;
    state.game = newGame();
    state.game.board = board;
    renderGame('Connection lost: the game ended.');
  }

  function onCellClick(event) {
    var pos = Number(event.currentTarget.dataset.pos);
    if (!myTurn() || state.game.board[pos]) return;
    sendIfOpen({ type: 'game_move', position: pos });
  }

  function myTurn() {
    return state.game.phase === 'playing' && !!state.client && state.game.turn === state.client.clientId;
  }

  function renderGame(statusText) {
    var g = state.game;
    var mine = myTurn();
    var cells = ui.board.children;
    for (var i = 0; i < 9; i++) {
      var cell = cells[i];
      var symbol = g.board[i];
      cell.textContent = symbol || '';
      cell.className = 'cell' + (symbol ? ' ' + symbol.toLowerCase() : '') + (g.winLine && g.winLine.indexOf(i) !== -1 ? ' win' : '');
      cell.disabled = !mine || !!symbol;
      var row = Math.floor(i / 3) + 1;
      var col = (i % 3) + 1;
      cell.setAttribute('aria-label', 'Row ' + row + ', column ' + col + ': ' + (symbol || 'empty'));
    }
    ui.board.classList.toggle('live', g.phase === 'playing');
    ui.game.dataset.phase = g.phase;
    ui.gamePlayers.textContent = g.mySymbol && g.phase !== 'idle' ? 'You (' + g.mySymbol + ') vs ' + g.opponent + ' (' + (g.mySymbol === 'X' ? 'O' : 'X') + ')' : '';
    if (statusText === undefined && g.phase === 'playing') {
      statusText = mine ? 'Your turn.' : 'Waiting for ' + g.opponent + '…';
    }
    if (statusText !== undefined) ui.gameStatus.textContent = statusText;
    ui.gameStatus.classList.toggle('result', g.phase === 'over');
    ui.findGame.hidden = g.phase === 'waiting' || g.phase === 'playing';
    ui.findGame.textContent = g.phase === 'over' ? 'New opponent' : 'Find a game';
    ui.rematch.hidden = g.phase !== 'over';
    ui.leaveGame.hidden = g.phase !== 'waiting' && g.phase !== 'playing';
    ui.leaveGame.textContent = g.phase === 'waiting' ? 'Cancel' : 'Leave game';
  }

  // ---- Start-up ---------------------------------------------------------------------

  function init() {
    buildBoard();
    renderGame();
    try {
      ui.loginName.value = localStorage.getItem('rtgate.name') || '';
    } catch (e) {
      // no storage: start empty
    }
    ui.loginRoom.addEventListener('input', function () {
      ui.loginRoom.setCustomValidity('');
    });
    ui.loginForm.addEventListener('submit', start);
    ui.disconnect.addEventListener('click', disconnect);
    ui.joinForm.addEventListener('submit', function (event) {
      event.preventDefault();
      var name = ui.joinRoom.value.trim();
      if (!name) return;
      joinRoom(name);
      ui.joinRoom.value = '';
      ui.input.focus();
    });
    ui.composer.addEventListener('submit', sendMessage);
    ui.input.addEventListener('input', onInput);
    ui.loadOlder.addEventListener('click', loadOlder);
    ui.timeline.addEventListener('scroll', function () {
      state.pinned = nearBottom();
    });
    // A resized window, or a phone's keyboard opening, must not hide the newest message.
    new ResizeObserver(function () {
      if (state.pinned) scrollToBottom();
    }).observe(ui.timeline);
    ui.filePick.addEventListener('change', onFilePicked);
    ui.fileForm.addEventListener('submit', shareFile);
    ui.findGame.addEventListener('click', function () {
      sendIfOpen({ type: 'find_game', playerData: { name: state.myName } });
    });
    ui.rematch.addEventListener('click', function () {
      sendIfOpen({ type: 'rematch' });
    });
    ui.leaveGame.addEventListener('click', function () {
      sendIfOpen({ type: 'leave_game' });
    });
    ui.loginName.focus();
  }

  init();
})();
