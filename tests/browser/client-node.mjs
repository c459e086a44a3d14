// rtgate.js outside the browser: the Node example of docs/client.md runs as written, and
// the library's promises hold against the real gateway (send queue, catch-up after a
// reconnect with nothing missed or repeated, duplicate dropping, history paging, a seq
// forged by another member ignored) and against a scripted server (which close codes
// stop reconnecting, the queue bound, a forged seq again).

import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import WebSocket, { WebSocketServer } from 'ws';

const require = createRequire(import.meta.url);
const RtGate = require('../../web/rtgate.js');
const BASE = (process.argv[2] || '').replace(/\/$/, '');
const WS_URL = BASE.replace(/^http/, 'ws') + '/ws';
const TIMEOUT = 20_000;
const started = Date.now();

function log(...args) {
  console.log(`[${new Date().toISOString().slice(11, 23)}]`, ...args);
}

async function until(description, predicate, timeout = TIMEOUT) {
  const deadline = Date.now() + timeout;
  while (!predicate()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${description}`);
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

/** Records every event a client emits, in order. */
function record(client, types) {
  const seen = [];
  for (const type of types) client.on(type, (payload) => seen.push({ type, payload }));
  return seen;
}

async function docsExample() {
  const doc = readFileSync(fileURLToPath(new URL('../../docs/client.md', import.meta.url)), 'utf8');
  const match = doc.match(/<!-- example: node -->\s*```js\n([\s\S]*?)```/);
  assert.ok(match, 'docs/client.md has a Node example marked <!-- example: node -->');
  const library = fileURLToPath(new URL('../../web/rtgate.js', import.meta.url));
  const source = match[1]
    .replace("require('./rtgate.js')", `require(${JSON.stringify(library)})`)
    .replaceAll('ws://127.0.0.1:3000/ws', WS_URL);
  const dir = mkdtempSync(join(tmpdir(), 'rtgate-example-'));
  const file = join(dir, 'example.cjs');
  writeFileSync(file, source);
  try {
    const nodeModules = fileURLToPath(new URL('./node_modules', import.meta.url));
    const output = await new Promise((resolve, reject) => {
      execFile(process.execPath, [file], { env: { ...process.env, NODE_PATH: nodeModules }, timeout: TIMEOUT }, (err, stdout, stderr) =>
        err ? reject(new Error(`the example failed: ${err.message}\n${stdout}\n${stderr}`)) : resolve(stdout)
      );
    });
    assert.match(output, /connected as node-example/, output);
    assert.match(output, /node-example: Hello from Node!/, output);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
  log('the Node example in docs/client.md runs as written');
}

// A WebSocket whose connections fail while `gate.closed` is set (they go to a path the
// gateway answers with 404), so a test decides when a reconnect may succeed.
function gatedWebSocket(gate) {
  return class GatedWebSocket extends WebSocket {
    constructor(url, protocols) {
      const u = new URL(url);
      if (gate.closed) u.pathname = '/closed-for-this-test';
      super(u.toString(), protocols);
      gate.sockets.push(this);
    }
  };
}

async function catchUpAfterReconnect() {
  const room = 'node-lab';
  const gate = { closed: false, sockets: [] };
  const lib = RtGate.connect(WS_URL, { name: 'lib', WebSocket: gatedWebSocket(gate), initialDelay: 50, maxDelay: 200 });
  const events = record(lib, ['open', 'close', 'reconnecting', 'new_message']);
  const chats = () => events.filter((e) => e.type === 'new_message').map((e) => e.payload);

  // Queued before the socket is open; sent after the join.
  lib.join(room);
  assert.equal(lib.send({ type: 'chat_message', room, message: 'queued before open' }), 'queued');
  await until('the queued message', () => chats().length === 1);
  assert.equal(chats()[0].seq, 1);

  const other = RtGate.connect(WS_URL, { name: 'other', WebSocket });
  const otherChats = record(other, ['new_message']);
  other.join(room);
  await until('the other client to join', () => other.lastSeq(room) !== null);
  other.send({ type: 'chat_message', room, message: 'm2' });
  await until('m2', () => chats().length === 2);

  // Drop the connection and keep reconnects failing until two attempts have failed.
  gate.closed = true;
  gate.sockets.at(-1).close(4000, 'test: dropped');
  await until('two failed reconnects', () => events.filter((e) => e.type === 'reconnecting').length >= 3);
  assert.equal(lib.state, 'reconnecting');
  assert.equal(lib.send({ type: 'chat_message', room, message: 'queued while away' }), 'queued');
  other.send({ type: 'chat_message', room, message: 'm3' });
  other.send({ type: 'chat_message', room, message: 'm4' });
  await until('the other client to see m4', () => otherChats.length === 3);

  gate.closed = false;
  await until('the catch-up and the queued message', () => chats().length === 5);
  assert.deepEqual(
    chats().map((m) => [m.seq, m.message]),
    [[1, 'queued before open'], [2, 'm2'], [3, 'm3'], [4, 'm4'], [5, 'queued while away']]
  );
  const opens = events.filter((e) => e.type === 'open').map((e) => e.payload.reconnected);
  assert.deepEqual(opens, [false, true]);
  assert.equal(lib.lastSeq(room), 5);
  log('catch-up after a reconnect: every message once, then the queue');

  // Re-joining with an older `since` replays 3..5; the client drops them as seen.
  lib.join(room, { since: 2 });
  other.send({ type: 'chat_message', room, message: 'm6' });
  await until('m6', () => chats().length >= 6);
  assert.deepEqual(chats().map((m) => m.seq), [1, 2, 3, 4, 5, 6]);
  log('replayed duplicates are dropped');

  const page = await lib.history(room, { limit: 2 });
  assert.deepEqual(page.messages.map((m) => m.message), ['queued while away', 'm6']);
  assert.equal(page.prev, 5);
  const older = await lib.history(room, { before: page.prev, limit: 10 });
  assert.deepEqual(older.messages.map((m) => m.seq), [1, 2, 3, 4]);
  assert.equal(older.prev, null);
  await assert.rejects(lib.history('bad room!'), (err) => err.status === 400 && err.code === 'bad_request');
  log('history pages');

  lib.close();
  other.close();
  await until('both closed', () => lib.state === 'closed' && other.state === 'closed');
  assert.equal(lib.send({ type: 'chat_message', room, message: 'after close' }), 'dropped');
}

// A raw WebSocket that records what it receives.
async function rawClient(url) {
  const socket = new WebSocket(url);
  const received = [];
  socket.on('message', (data) => received.push(JSON.parse(String(data))));
  await until('the raw client\'s welcome', () => received.some((m) => m.type === 'welcome'));
  return { socket, received, send: (msg) => socket.send(JSON.stringify(msg)) };
}

const FORGED_SEQ = Number.MAX_SAFE_INTEGER;

// Another member sends a game_move, outside any game, carrying a seq of its own: the
// tic-tac-toe plugin relays it as opponent_move. The client must not take that seq as
// the room's position, or it would drop every later message as already seen. Only the
// types in `persistedTypes` (chat_message and new_message by default) move it.
async function forgedSeqThroughTheRelay() {
  const room = 'forge-lab';
  const lib = RtGate.connect(WS_URL, { name: 'lib', WebSocket });
  const narrow = RtGate.connect(WS_URL, { name: 'narrow', WebSocket, persistedTypes: ['new_message'] });
  const seen = new Map();
  for (const client of [lib, narrow]) {
    const events = [];
    for (const type of ['opponent_move', 'chat_message', 'new_message']) {
      client.on(type, (msg) => events.push([type, msg.seq, client.lastSeq(room)]));
    }
    seen.set(client, events);
    client.join(room);
    await until('the join', () => client.lastSeq(room) === 0);
  }
  const mallory = await rawClient(`${WS_URL}?name=Mallory`);
  mallory.send({ type: 'join_room', room });
  await until('Mallory\'s join', () => mallory.received.some((m) => m.type === 'room_joined'));
  mallory.send({ type: 'game_move', room, seq: FORGED_SEQ, username: 'Bob' });
  mallory.send({ type: 'chat', room, message: 'one' });
  mallory.send({ type: 'chat_message', room, message: 'two' });
  await until('Mallory\'s own new_message', () => mallory.received.some((m) => m.type === 'new_message'));
  for (const client of [lib, narrow]) {
    await until('the relayed move and both chat messages', () => seen.get(client).length === 3);
  }
  // [type, seq as received, lastSeq after it]. The relay passes the forged seq through
  // unless the gateway strips it; either way it does not move the client.
  const relayed = seen.get(lib)[0][1];
  assert.ok(relayed === FORGED_SEQ || relayed === undefined, `relayed seq: ${relayed}`);
  assert.deepEqual(seen.get(lib), [['opponent_move', relayed, 0], ['chat_message', 1, 1], ['new_message', 2, 2]]);
  // persistedTypes: ['new_message'] leaves chat_message's seq alone too.
  assert.deepEqual(seen.get(narrow), [['opponent_move', relayed, 0], ['chat_message', 1, 0], ['new_message', 2, 2]]);
  log(`a forged seq (${relayed === undefined ? 'stripped by the gateway' : 'relayed as sent'}) does not move the client`);
  lib.close();
  narrow.close();
  mallory.socket.close();
}

// A scripted server: each connection gets a welcome, then is closed with the next code.
async function closeCodes() {
  const codes = [];
  const server = new WebSocketServer({
    host: '127.0.0.1',
    port: 0,
    verifyClient: (info) => !info.req.url.startsWith('/closed'),
  });
  await new Promise((resolve) => server.on('listening', resolve));
  let connections = 0;
  server.on('connection', (socket) => {
    connections += 1;
    socket.send(JSON.stringify({ type: 'welcome', clientId: `client_${connections}`, userId: `client_${connections}` }));
    const code = codes.shift();
    if (code) socket.close(code, 'scripted');
  });
  const url = `ws://127.0.0.1:${server.address().port}/ws`;
  try {
    // 1001 (going away) and 1013 (try again later) reconnect; 1008 (policy) ends it.
    codes.push(1001, 1013, 1008);
    const client = RtGate.connect(url, { WebSocket, initialDelay: 10, maxDelay: 20 });
    const events = record(client, ['open', 'close', 'reconnecting']);
    await until('the policy close', () => client.state === 'closed');
    assert.deepEqual(
      events.filter((e) => e.type === 'close').map((e) => [e.payload.code, e.payload.willReconnect]),
      [[1001, true], [1013, true], [1008, false]]
    );
    assert.equal(connections, 3);
    assert.equal(events.filter((e) => e.type === 'reconnecting').length, 2);

    // A deliberate close() while reconnecting stops it too (here every attempt is
    // refused, so the client is always either waiting or connecting).
    const gate = { closed: true, sockets: [] };
    const leaving = RtGate.connect(url, { WebSocket: gatedWebSocket(gate), initialDelay: 10, maxDelay: 20 });
    const leavingEvents = record(leaving, ['close', 'reconnecting']);
    await until('two refused attempts', () => leavingEvents.filter((e) => e.type === 'reconnecting').length >= 2);
    leaving.close();
    await until('the close', () => leaving.state === 'closed');
    assert.deepEqual(leavingEvents.at(-1).payload.willReconnect, false);
    const attempts = leavingEvents.filter((e) => e.type === 'reconnecting').length;
    assert.equal(leaving._timer, null, 'no reconnect is scheduled after close()');
    assert.equal(leaving.send({ type: 'chat', message: 'late' }), 'dropped');
    assert.equal(leavingEvents.filter((e) => e.type === 'reconnecting').length, attempts);

    // The queue is bounded: past queueLimit, send() refuses the new message.
    const bounded = RtGate.connect(url, { WebSocket, queueLimit: 2 });
    assert.deepEqual(
      [1, 2, 3].map((n) => bounded.send({ type: 'chat', message: String(n) })),
      ['queued', 'queued', 'dropped']
    );
    bounded.close();
    log('close codes: 1001 and 1013 reconnect, 1008 and close() stop; the queue is bounded');

    // Whatever a server sends, a seq on a type that is not persisted is not a position.
    const forger = RtGate.connect(url, { WebSocket });
    const chats = record(forger, ['chat_message']);
    forger.join('r');
    await until('the scripted welcome', () => forger.state === 'open');
    const serverSide = [...server.clients].at(-1);
    const frames = [
      { type: 'room_joined', room: 'r', members: [], seq: 4 },
      { type: 'opponent_move', room: 'r', seq: FORGED_SEQ },
      { type: 'user_typing', room: 'r', seq: FORGED_SEQ },
      { type: 'chat_message', room: 'r', seq: 5, message: 'still delivered' },
    ];
    for (const frame of frames) serverSide.send(JSON.stringify(frame));
    await until('the chat message after the forged seqs', () => chats.length === 1);
    assert.equal(forger.lastSeq('r'), 5);
    forger.close();

    // A room the server took the client out of (room_left: its refreshed token no longer
    // allows it) is not rejoined after a reconnect; the others are.
    const joins = [];
    server.on('connection', (socket) =>
      socket.on('message', (data) => {
        const msg = JSON.parse(String(data));
        if (msg.type === 'join_room') joins.push(msg.room);
      })
    );
    const evicted = RtGate.connect(url, { WebSocket, initialDelay: 10, maxDelay: 20 });
    const left = record(evicted, ['room_left']);
    evicted.join('kept');
    evicted.join('revoked');
    await until('both joins', () => joins.length === 2);
    const side = [...server.clients].at(-1);
    side.send(JSON.stringify({ type: 'room_left', room: 'revoked', reason: 'forbidden', message: 'no longer allowed' }));
    await until('room_left', () => left.length === 1);
    assert.deepEqual(evicted.rooms(), ['kept']);
    joins.length = 0;
    side.close(1001, 'scripted');
    await until('the rejoin after the reconnect', () => joins.length >= 1);
    await until('the reconnected client to settle', () => evicted.state === 'open');
    assert.deepEqual(joins, ['kept']);
    evicted.close();
    log('room_left: the room is forgotten, the rest rejoined');
  } finally {
    server.close();
  }
}

try {
  assert.ok(BASE.startsWith('http://127.0.0.1:'), 'usage: node client-node.mjs http://127.0.0.1:PORT');
  await docsExample();
  await catchUpAfterReconnect();
  await forgedSeqThroughTheRelay();
  await closeCodes();
  log(`client-node: passed in ${((Date.now() - started) / 1000).toFixed(1)} s`);
  process.exit(0);
} catch (err) {
  console.error(`client-node: FAILED: ${err && err.stack ? err.stack : err}`);
  process.exit(1);
}
