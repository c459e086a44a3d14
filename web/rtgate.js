/**
 * rtgate.js: a small, dependency-free client for the rtgate WebSocket gateway.
 *
 * Works in browsers (a plain <script> defining `window.RtGate`) and in Node
 * (`require('./rtgate.js')`, with a WebSocket implementation such as the `ws` package
 * passed as `options.WebSocket`). Guide and examples: docs/client.md.
 *
 * What it adds to a bare WebSocket:
 * - automatic reconnect with capped exponential backoff and full jitter;
 * - rejoining every room after a reconnect with `since` = the last `seq` seen there, so
 *   the gateway replays exactly what was missed; messages already seen are dropped, so
 *   nothing arrives twice;
 * - a bounded send queue held while disconnected and flushed after the rejoin;
 * - `history()` for `GET /rooms/{room}/history`.
 *
 * It never renders anything: text from the gateway is safe HTML (see docs/security.md),
 * and how to display it is the application's choice (docs/client.md, "Rendering text").
 *
 * @license MIT
 */
(function (root, factory) {
  'use strict';
  var api = factory();
  if (typeof module === 'object' && module && module.exports) {
    module.exports = api;
  } else if (root) {
    root.RtGate = api;
  }
})(typeof globalThis !== 'undefined' ? globalThis : this, function () {
  'use strict';

  /**
   * Close codes after which the client does not reconnect: reconnecting would only be
   * refused again, or repeat the client's own mistake.
   * - 1002 protocol error, 1003 unsupported data, 1007 invalid payload: a client bug;
   * - 1008 policy violation: rtgate's "token expired" and "rate limit exceeded".
   * Everything else (1001 server shutting down, 1006 connection lost or refused, 1009
   * frame too big, 1011-1014 server trouble, …) is retried.
   */
  var STOP_CODES = Object.freeze([1002, 1003, 1007, 1008]);

  /**
   * Message types the bundled plugins persist (chat.lua, chat_message.lua): only their
   * `seq` is a position in the room's history. Other types may carry a `seq` too (a relay
   * can pass on whatever a member sent); it is not taken as the room's position.
   */
  var PERSISTED_TYPES = Object.freeze(['chat_message', 'new_message']);

  /** Event names the client emits itself; every other name is a server message `type`. */
  var LOCAL_EVENTS = Object.freeze(['open', 'close', 'reconnecting', 'message', 'socket_error']);

  var DEFAULTS = Object.freeze({
    initialDelay: 250,
    maxDelay: 10000,
    maxAttempts: Infinity,
    queueLimit: 100,
    tokenTransport: 'query',
    stopCodes: STOP_CODES,
    persistedTypes: PERSISTED_TYPES,
  });

  var OPEN = 1; // WebSocket.OPEN, the same in every implementation

  /**
   * @typedef {Object} ConnectOptions
   * @property {string|function():string} [token] JWT for gateways in jwt mode; a function is
   *   called before every (re)connect, so it can hand out a fresh token.
   * @property {string} [name] Display name for anonymous mode (`?name=`). Updated when the
   *   gateway answers `name_set`, so a reconnect keeps the chosen name.
   * @property {'query'|'protocol'} [tokenTransport='query'] Send the token as `?token=` or
   *   as the subprotocol pair `rtgate.bearer`, TOKEN (keeps it out of URLs and logs).
   * @property {Function} [WebSocket] WebSocket constructor; defaults to the global one
   *   (browsers, Node 22+). In older Node pass `require('ws')`.
   * @property {Function} [fetch] fetch implementation for `history()`; defaults to the global.
   * @property {number} [initialDelay=250] First reconnect backoff ceiling, in ms.
   * @property {number} [maxDelay=10000] Largest backoff ceiling, in ms.
   * @property {number} [maxAttempts=Infinity] Reconnect attempts in a row before giving up.
   * @property {number} [queueLimit=100] Messages `send()` holds while disconnected.
   * @property {number[]} [stopCodes] Close codes that end reconnecting (default STOP_CODES).
   * @property {string[]} [persistedTypes] Message types whose `seq` is the room's position
   *   (default PERSISTED_TYPES); list every type your gateway's plugins persist.
   */

  /**
   * Opens a connection to an rtgate gateway.
   *
   * @param {string} [url] `ws://host:port/ws`; `http(s)://` is turned into `ws(s)://`.
   *   In a browser it defaults to this page's origin, path `/ws`.
   * @param {ConnectOptions} [options]
   * @returns {Client}
   */
  function connect(url, options) {
    return new Client(url, options);
  }

  /**
   * One logical connection that survives reconnects. Create it with {@link connect}.
   * @param {string} [url]
   * @param {ConnectOptions} [options]
   */
  function Client(url, options) {
    this.options = Object.assign({}, DEFAULTS, options || {});
    this.url = socketUrl(url);
    var WS = this.options.WebSocket || (typeof WebSocket !== 'undefined' ? WebSocket : null);
    if (!WS) throw new Error('rtgate: no WebSocket implementation; pass options.WebSocket (e.g. require("ws"))');
    this._WebSocket = WS;
    /** 'connecting' | 'open' | 'reconnecting' | 'closed' */
    this.state = 'connecting';
    /** This connection's id from `welcome`; a new one after every reconnect. */
    this.clientId = null;
    /** @type {string|null} */
    this.userId = null;
    /** @type {string|null} */
    this.username = null;
    this._handlers = Object.create(null);
    this._persisted = new Set(this.options.persistedTypes);
    this._rooms = new Map(); // room -> last seq seen there (null: none yet)
    this._queue = [];
    this._attempt = 0;
    this._timer = null;
    this._ws = null;
    this._stopped = false;
    this._everOpened = false;
    this._open();
  }

  /**
   * Subscribes to a server message type (`'new_message'`, `'room_joined'`, `'error'`, …)
   * or to one of the client's own events:
   * - `'open'` `{clientId, userId, username, reconnected}`: after each `welcome`;
   * - `'close'` `{code, reason, willReconnect}`: the socket closed;
   * - `'reconnecting'` `{attempt, delay}`: the next attempt starts in `delay` ms;
   * - `'message'`: every server message, before its type's handlers;
   * - `'socket_error'`: the socket reported an error (a `'close'` follows).
   * @param {string} type
   * @param {function(Object):void} fn
   * @returns {function():void} call it to unsubscribe
   */
  Client.prototype.on = function (type, fn) {
    (this._handlers[type] || (this._handlers[type] = [])).push(fn);
    var self = this;
    return function () {
      self.off(type, fn);
    };
  };

  /** Removes a handler added with {@link Client#on}. */
  Client.prototype.off = function (type, fn) {
    var list = this._handlers[type];
    if (list) this._handlers[type] = list.filter(function (h) {
      return h !== fn;
    });
  };

  /**
   * Sends one message (an object with a `type`). While the socket is not open it is
   * queued and sent after the reconnect and rejoin, in order. The queue holds
   * `queueLimit` messages; past that the new message is refused (not the oldest), so the
   * caller learns at once that it was not sent.
   * @param {Object} message
   * @returns {'sent'|'queued'|'dropped'} 'dropped' also after {@link Client#close}
   */
  Client.prototype.send = function (message) {
    if (this._stopped) return 'dropped';
    if (this._ws && this._ws.readyState === OPEN) {
      this._ws.send(JSON.stringify(message));
      return 'sent';
    }
    if (this._queue.length >= this.options.queueLimit) return 'dropped';
    this._queue.push(message);
    return 'queued';
  };

  /**
   * Joins a room, now or as soon as the connection is open, and on every reconnect.
   * @param {string} room
   * @param {{since?: number}} [opts] `since`: the last `seq` you already have for this
   *   room (for example from {@link Client#history}); the gateway replays everything after
   *   it, and anything at or before it is dropped as a duplicate.
   */
  Client.prototype.join = function (room, opts) {
    var since = opts && typeof opts.since === 'number' ? opts.since : null;
    var known = this._rooms.has(room) ? this._rooms.get(room) : null;
    var seq = since === null ? known : known === null ? since : Math.max(known, since);
    this._rooms.set(room, seq);
    if (this._isOpen()) this._sendJoin(room);
  };

  /** Leaves a room and stops rejoining it. */
  Client.prototype.leave = function (room) {
    if (!this._rooms.delete(room)) return;
    if (this._isOpen()) this._ws.send(JSON.stringify({ type: 'leave_room', room: room }));
  };

  /** @returns {string[]} the rooms this client is in (or will rejoin). */
  Client.prototype.rooms = function () {
    return Array.from(this._rooms.keys());
  };

  /**
   * @param {string} room
   * @returns {number|null} the last `seq` seen in `room` (the `since` of the next rejoin)
   */
  Client.prototype.lastSeq = function (room) {
    return this._rooms.has(room) ? this._rooms.get(room) : null;
  };

  /** @returns {number} messages waiting in the send queue */
  Client.prototype.queued = function () {
    return this._queue.length;
  };

  /**
   * Fetches a page of a room's stored messages (`GET /rooms/{room}/history`), ascending by
   * `seq`. In jwt mode the token goes in an Authorization header.
   * @param {string} room
   * @param {{before?: number, after?: number, limit?: number}} [query]
   * @returns {Promise<{room: string, messages: Object[], next: ?number, prev: ?number}>}
   *   rejects with an Error carrying `status` and `code` on an HTTP error
   */
  Client.prototype.history = function (room, query) {
    var doFetch = this.options.fetch || (typeof fetch !== 'undefined' ? fetch : null);
    if (!doFetch) return Promise.reject(new Error('rtgate: no fetch implementation; pass options.fetch'));
    var u = new URL(this.url);
    u.protocol = u.protocol === 'wss:' ? 'https:' : 'http:';
    // Beside the socket's path: behind a proxy at /chat/ws, history is /chat/rooms/….
    u.pathname = u.pathname.replace(/\/(ws\/?)?$/, '') + '/rooms/' + encodeURIComponent(room) + '/history';
    u.search = '';
    ['before', 'after', 'limit'].forEach(function (key) {
      if (query && query[key] !== undefined && query[key] !== null) u.searchParams.set(key, String(query[key]));
    });
    var headers = { Accept: 'application/json' };
    var token = this._token();
    if (token) headers.Authorization = 'Bearer ' + token;
    return doFetch(u.toString(), { headers: headers }).then(function (res) {
      return res.json().then(
        function (body) {
          if (res.ok) return body;
          var err = new Error((body && body.message) || 'history request failed: ' + res.status);
          err.status = res.status;
          err.code = body && body.error;
          throw err;
        },
        function () {
          var err = new Error('history request failed: ' + res.status);
          err.status = res.status;
          throw err;
        }
      );
    });
  };

  /**
   * Closes the connection for good: no reconnect, the queue is discarded.
   * @param {number} [code=1000] 1000 or 3000-4999 (browsers refuse other codes)
   * @param {string} [reason]
   */
  Client.prototype.close = function (code, reason) {
    this._stopped = true;
    this._queue = [];
    clearTimeout(this._timer);
    this._timer = null;
    var ws = this._ws;
    if (ws && ws.readyState <= OPEN) {
      ws.close(code || 1000, reason || '');
    } else if (this.state !== 'closed') {
      this.state = 'closed';
      this._emit('close', { code: code || 1000, reason: reason || '', willReconnect: false });
    }
  };

  // ---- internals -------------------------------------------------------------------

  Client.prototype._isOpen = function () {
    return this._ws !== null && this._ws.readyState === OPEN;
  };

  Client.prototype._token = function () {
    var t = this.options.token;
    return typeof t === 'function' ? t() : t || null;
  };

  Client.prototype._open = function () {
    var u = new URL(this.url);
    var token = this._token();
    var protocols;
    if (token && this.options.tokenTransport === 'protocol') {
      protocols = ['rtgate.bearer', token];
    } else if (token) {
      u.searchParams.set('token', token);
    } else if (this.options.name) {
      u.searchParams.set('name', this.options.name);
    }
    var ws;
    try {
      ws = protocols ? new this._WebSocket(u.toString(), protocols) : new this._WebSocket(u.toString());
    } catch (e) {
      // A bad URL can never work: report it at once. Later failures are retried.
      if (!this._everOpened && this._attempt === 0) throw e;
      this._emit('socket_error', e);
      this._scheduleReconnect();
      return;
    }
    this._ws = ws;
    var self = this;
    ws.onopen = function () {
      if (self._ws !== ws) return;
      self._rejoinAndFlush();
    };
    ws.onmessage = function (ev) {
      if (self._ws !== ws || typeof ev.data !== 'string') return;
      var msg;
      try {
        msg = JSON.parse(ev.data);
      } catch (e) {
        return; // the gateway only sends JSON; ignore anything else
      }
      self._receive(msg);
    };
    ws.onerror = function (ev) {
      if (self._ws === ws) self._emit('socket_error', ev);
    };
    ws.onclose = function (ev) {
      if (self._ws !== ws) return;
      self._ws = null;
      self._closed(ev.code, ev.reason || '');
    };
  };

  // Joins come first so that queued messages for a room find us in it (the gateway
  // handles one connection's frames in order).
  Client.prototype._rejoinAndFlush = function () {
    var self = this;
    this._rooms.forEach(function (_seq, room) {
      self._sendJoin(room);
    });
    var queue = this._queue;
    this._queue = [];
    for (var i = 0; i < queue.length; i++) this._ws.send(JSON.stringify(queue[i]));
  };

  Client.prototype._sendJoin = function (room) {
    var seq = this._rooms.get(room);
    var msg = { type: 'join_room', room: room };
    if (typeof seq === 'number') msg.since = seq;
    this._ws.send(JSON.stringify(msg));
  };

  Client.prototype._receive = function (msg) {
    if (!msg || typeof msg.type !== 'string') return;
    var room = msg.room;
    if (msg.type === 'welcome') {
      var reconnected = this._everOpened;
      this._everOpened = true;
      this._attempt = 0;
      this.state = 'open';
      this.clientId = msg.clientId;
      this.userId = msg.userId || msg.clientId;
      this.username = msg.username || null;
    } else if (msg.type === 'name_set' && typeof msg.username === 'string') {
      this.username = msg.username;
      this.options.name = msg.username;
    } else if (msg.type === 'room_left') {
      // The server took us out (a refreshed token no longer allows the room): forget it,
      // or the next reconnect would try to rejoin.
      this._rooms.delete(room);
    } else if (msg.type === 'room_joined') {
      // Its `seq` is the room's position, not a message. Joined without `since`, we start
      // from there (0 when the room has no history yet), so a later rejoin replays exactly
      // what came after this join.
      if (this._rooms.get(room) === null) this._rooms.set(room, typeof msg.seq === 'number' ? msg.seq : 0);
    } else if (typeof msg.seq === 'number' && this._persisted.has(msg.type) && this._rooms.has(room)) {
      var last = this._rooms.get(room);
      if (last !== null && msg.seq <= last) return; // seen already: a replay overlap
      this._rooms.set(room, msg.seq);
    }
    this._emit('message', msg);
    this._emit(msg.type, msg);
    if (msg.type === 'welcome') {
      this._emit('open', {
        clientId: this.clientId,
        userId: this.userId,
        username: this.username,
        reconnected: reconnected,
      });
    }
  };

  Client.prototype._closed = function (code, reason) {
    var stop = this._stopped || this.options.stopCodes.indexOf(code) !== -1;
    if (!stop && this._attempt >= this.options.maxAttempts) stop = true;
    this.clientId = null;
    if (stop) {
      this._stopped = true;
      this._queue = [];
      this.state = 'closed';
      this._emit('close', { code: code, reason: reason, willReconnect: false });
      return;
    }
    this.state = 'reconnecting';
    this._emit('close', { code: code, reason: reason, willReconnect: true });
    this._scheduleReconnect();
  };

  // Full jitter (a uniform delay up to a ceiling that doubles per attempt) spreads out
  // clients that all lost the same server at once.
  Client.prototype._scheduleReconnect = function () {
    this._attempt += 1;
    var ceiling = Math.min(this.options.maxDelay, this.options.initialDelay * Math.pow(2, this._attempt - 1));
    var delay = Math.round(Math.random() * ceiling);
    this.state = 'reconnecting';
    var self = this;
    this._timer = setTimeout(function () {
      self._timer = null;
      if (!self._stopped) self._open();
    }, delay);
    this._emit('reconnecting', { attempt: this._attempt, delay: delay });
  };

  // A throwing handler must not break the client or the other handlers: its error is
  // rethrown on its own task, where it is reported as any uncaught error would be.
  Client.prototype._emit = function (type, payload) {
    var list = this._handlers[type];
    if (!list) return;
    list.slice().forEach(function (fn) {
      try {
        fn(payload);
      } catch (e) {
        setTimeout(function () {
          throw e;
        }, 0);
      }
    });
  };

  function socketUrl(url) {
    var base = typeof location !== 'undefined' ? location.href : undefined;
    if (!url) {
      if (!base) throw new Error('rtgate: connect() needs a URL outside a browser');
      url = '/ws';
    }
    var u = new URL(url, base);
    if (u.protocol === 'http:') u.protocol = 'ws:';
    if (u.protocol === 'https:') u.protocol = 'wss:';
    return u.toString();
  }

  return {
    connect: connect,
    Client: Client,
    STOP_CODES: STOP_CODES,
    PERSISTED_TYPES: PERSISTED_TYPES,
    LOCAL_EVENTS: LOCAL_EVENTS,
    version: '1.0.0',
  };
});
