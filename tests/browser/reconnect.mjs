// Scenario 3: the gateway restarts mid-conversation. Both pages notice, reconnect by
// themselves, rejoin with `since`, and show what was said while they were away exactly
// once, with no earlier message repeated. A message typed while offline is queued and
// delivered after the reconnect. The outage is one notice however many attempts fail,
// the recovery one more, and people who were in the room before are not announced again
// as they come back.
//
// The Rust side does the restarts (see tests/browser.rs):
//   step "stop":    stops the gateway and starts it again on the same port and database,
//                   refusing this page's origin, so the pages stay outside; a Rust client
//                   (no Origin) then posts "while you were away 1..3".
//   step "restart": stops that gateway and starts one that lets the pages in again.

import { check, log, message, messages, notice, openUser, roomList, say, scenario, signIn, step, until } from './lib.mjs';

const ROOM = 'ops';
// Chromium reports each refused or failed WebSocket handshake on the console.
const allowConsole = /WebSocket connection to .* failed/;
const OUTAGE = 'Disconnected (server shutting down). Reconnecting…';

const notices = (user) => roomList(user, ROOM).locator('li.notice').allTextContents();

// How many WebSockets the page has opened, refused attempts included.
function countSockets(user) {
  const count = { opened: 0 };
  user.page.on('websocket', () => {
    count.opened += 1;
  });
  return count;
}

await scenario('reconnect', async (ctx) => {
  const alice = await openUser(ctx, 'Alice', { allowConsole });
  const bob = await openUser(ctx, 'Bob', { allowConsole });
  const sockets = new Map([alice, bob].map((user) => [user, countSockets(user)]));
  await signIn(alice, ROOM);
  await signIn(bob, ROOM);
  await say(alice, 'Rolling the gateway now.');
  await say(bob, 'Ok, watching the logs.');
  await message(alice, ROOM, 'Ok, watching the logs.').waitFor();
  await message(bob, ROOM, 'Rolling the gateway now.').waitFor();

  const before = new Map([alice, bob].map((user) => [user, sockets.get(user).opened]));
  await step('stop');
  for (const user of [alice, bob]) {
    await notice(user, ROOM, OUTAGE).waitFor();
    await user.page.locator('#conn-status.pending').waitFor();
    // A page opens attempt 3 only after attempts 1 and 2 were refused and reported.
    await until(
      `${user.name}'s third reconnect attempt`,
      async () => sockets.get(user).opened - before.get(user),
      (n) => n >= 3
    );
    const outages = (await notices(user)).filter((text) => text.startsWith('Disconnected'));
    check(outages.length === 1, `${user.name} announced the outage ${outages.length} times: ${JSON.stringify(outages)}`);
  }
  log('both pages saw the disconnect once, while their reconnect attempts failed');

  // Typed while offline: queued by rtgate.js, sent after the rejoin.
  await say(alice, 'Typed while offline.');
  await notice(alice, ROOM, 'Offline: your message will be sent when the connection is back.').waitFor();

  await step('restart');
  const expected = [
    'Rolling the gateway now.',
    'Ok, watching the logs.',
    'while you were away 1',
    'while you were away 2',
    'while you were away 3',
    'Typed while offline.',
  ];
  for (const user of [alice, bob]) {
    await user.page.locator('#conn-status.online').waitFor({ timeout: 40_000 });
    await notice(user, ROOM, 'Reconnected.').waitFor();
    await until(
      `${user.name} to show every message once`,
      async () => (await messages(user, ROOM)).map((m) => m.text),
      (texts) => texts.length >= expected.length,
      40_000
    );
  }
  log('both pages reconnected and caught up');

  // One more live message proves the rejoined rooms work, and anything duplicated
  // would have arrived before it.
  await say(bob, 'All green after the restart.');
  for (const user of [alice, bob]) {
    await message(user, ROOM, 'All green after the restart.').waitFor();
    const shown = await messages(user, ROOM);
    const texts = shown.map((m) => m.text);
    check(
      JSON.stringify(texts) === JSON.stringify([...expected, 'All green after the restart.']),
      `${user.name} shows ${JSON.stringify(texts)}`
    );
    const seqs = shown.map((m) => m.seq);
    check(JSON.stringify(seqs) === '[1,2,3,4,5,6,7]', `${user.name}'s seqs: ${JSON.stringify(seqs)}`);
    const away = shown.filter((m) => m.text.startsWith('while you were away'));
    check(away.every((m) => m.author === 'Ops bot' && !m.mine), `away messages: ${JSON.stringify(away)}`);
  }
  // Own messages stay marked across the new connection id.
  const alicesOwn = (await messages(alice, ROOM)).filter((m) => m.mine).map((m) => m.text);
  check(
    JSON.stringify(alicesOwn) === JSON.stringify(['Rolling the gateway now.', 'Typed while offline.']),
    `Alice's own messages: ${JSON.stringify(alicesOwn)}`
  );
  log('every message exactly once, in order');

  // One notice for the outage, one for the recovery; whoever came back second is not
  // announced as joining, and the member count is right.
  const expectedNotices = {
    Alice: ['Connected as Alice.', 'You joined #ops.', 'Bob joined.', OUTAGE,
      'Offline: your message will be sent when the connection is back.', 'Reconnected.'],
    Bob: ['Connected as Bob.', 'You joined #ops.', OUTAGE, 'Reconnected.'],
  };
  for (const user of [alice, bob]) {
    const shown = await notices(user);
    check(
      JSON.stringify(shown) === JSON.stringify(expectedNotices[user.name]),
      `${user.name}'s notices: ${JSON.stringify(shown)}`
    );
    await until(`${user.name}'s member count`, () => user.page.locator('#room-members').textContent(), (t) => t === '2 members');
  }
  log('one notice per outage and per recovery, no one announced twice');
  for (const user of [alice, bob]) await user.assertNoCspViolations();
});
