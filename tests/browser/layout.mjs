// Scenario 6: a busy room, read on a desktop window, a narrower window and a phone. The
// page never grows past the window: the header, the rooms, the game panel and the message
// box stay in view and only the message list scrolls. It follows new messages while the
// reader is at the bottom and leaves the view alone once they have scrolled up to read.
// A 64-character room name can be read whole, in the room list and above the messages.
//
// Dana, a Node client using rtgate.js, fills the room before anyone opens the page.

import { createRequire } from 'node:module';
import WebSocket from 'ws';
import { BASE, check, log, message, openUser, scenario, signIn, until } from './lib.mjs';

const require = createRequire(import.meta.url);
const RtGate = require('../../web/rtgate.js');

const ROOM = 'busy';
const EARLIER = 30;
// As long as a room name may be (64 characters).
const LONG_ROOM = 'quarterly-planning-for-the-platform-and-infrastructure-team-2026';
const DESKTOP = { width: 1280, height: 800 };
const NARROW = { width: 900, height: 700 };
const PHONE = { width: 390, height: 844 };

// Where everything is, in viewport pixels, and how the message list is scrolled.
function measure(user) {
  return user.page.evaluate(() => {
    const box = (el) => {
      const r = el.getBoundingClientRect();
      return { top: r.top, bottom: r.bottom, left: r.left, right: r.right };
    };
    const timeline = document.getElementById('timeline');
    const shown = timeline.querySelector('ol.messages:not([hidden])');
    const items = shown ? shown.querySelectorAll('li.msg') : [];
    const newest = items[items.length - 1];
    return {
      viewport: { width: window.innerWidth, height: window.innerHeight },
      page: { height: document.documentElement.scrollHeight, width: document.documentElement.scrollWidth },
      boxes: {
        header: box(document.querySelector('.topbar')),
        rooms: box(document.querySelector('.rooms')),
        game: box(document.getElementById('game')),
        'message box': box(document.getElementById('message-input')),
        'send button': box(document.getElementById('send')),
        'message list': box(timeline),
      },
      list: { scrollTop: timeline.scrollTop, scrollHeight: timeline.scrollHeight, clientHeight: timeline.clientHeight },
      newest: newest ? { text: newest.querySelector('.text').textContent, ...box(newest) } : null,
    };
  });
}

// The page is exactly the window: nothing below the fold, every part whole and in view.
function assertFits(user, m, where) {
  const { width, height } = m.viewport;
  const at = `${user.name} (${width}x${height}, ${where})`;
  check(m.page.height === height, `${at}: the page is ${m.page.height}px tall in a ${height}px window`);
  check(m.page.width === width, `${at}: the page is ${m.page.width}px wide in a ${width}px window`);
  for (const [name, b] of Object.entries(m.boxes)) {
    const inside = b.top >= -0.5 && b.left >= -0.5 && b.bottom <= height + 0.5 && b.right <= width + 0.5;
    check(inside && b.bottom > b.top, `${at}: the ${name} is not wholly in view: ${JSON.stringify(b)}`);
  }
}

function assertAtNewest(user, m, text, where) {
  const at = `${user.name} (${m.viewport.width}x${m.viewport.height}, ${where})`;
  const list = m.boxes['message list'];
  check(m.newest && m.newest.text === text, `${at}: the newest message is ${JSON.stringify(m.newest)}`);
  check(
    m.newest.top >= list.top - 0.5 && m.newest.bottom <= list.bottom + 0.5,
    `${at}: "${text}" is outside the message list: ${JSON.stringify(m.newest)} vs ${JSON.stringify(list)}`
  );
  const below = m.list.scrollHeight - m.list.scrollTop - m.list.clientHeight;
  check(below <= 1, `${at}: the message list is ${below}px above its end`);
}

async function waitAtNewest(user, text, where) {
  await message(user, ROOM, text).waitFor();
  // The page scrolls in the same task that adds the message; one frame for the layout.
  await user.page.evaluate(() => new Promise((resolve) => requestAnimationFrame(() => resolve())));
  const m = await measure(user);
  assertFits(user, m, where);
  assertAtNewest(user, m, text, where);
  return m;
}

await scenario('layout', async (ctx) => {
  const dana = RtGate.connect(BASE.replace(/^http/, 'ws') + '/ws', { name: 'Dana', WebSocket });
  const echoed = [];
  dana.on('new_message', (msg) => echoed.push(msg.message));
  dana.join(ROOM);
  const danaSays = (text) => dana.send({ type: 'chat_message', room: ROOM, message: text });
  for (let i = 1; i <= EARLIER; i++) danaSays(`message ${i}: ${'so much to say today. '.repeat(1 + (i % 3))}`.trim());
  await until('Dana\'s messages', async () => echoed.length, (n) => n === EARLIER);
  const newestEarlier = echoed[EARLIER - 1];
  log(`Dana posted ${EARLIER} messages`);

  // Late joiners land on the newest message, with the whole page in view.
  const alice = await openUser(ctx, 'Alice', { viewport: DESKTOP });
  const bob = await openUser(ctx, 'Bob', { viewport: PHONE });
  const readers = [alice, bob];
  for (const user of readers) {
    await signIn(user, ROOM);
    const m = await waitAtNewest(user, newestEarlier, 'after joining');
    check(
      m.list.scrollHeight > m.list.clientHeight + 400,
      `${user.name}: ${EARLIER} messages should overflow the list (${JSON.stringify(m.list)})`
    );
  }
  log('late joiners see the newest message, and the page fits the window');

  // A narrower window: two columns, still one screen, still at the newest message.
  await alice.page.setViewportSize(NARROW);
  await until(
    'Alice\'s page to lay out at 900 px',
    async () => (await measure(alice)).viewport.width,
    (w) => w === NARROW.width
  );
  await waitAtNewest(alice, newestEarlier, 'narrower window');
  await alice.page.setViewportSize(DESKTOP);
  await until('Alice\'s page at 1280 px again', async () => (await measure(alice)).viewport.width, (w) => w === DESKTOP.width);
  await waitAtNewest(alice, newestEarlier, 'window widened again');

  // At the bottom, the list follows what arrives.
  danaSays('message 31: still here');
  for (const user of readers) await waitAtNewest(user, 'message 31: still here', 'following new messages');
  log('the list follows new messages');

  // Scrolled up to read, a new message leaves the view where it is.
  const readingAt = new Map();
  for (const user of readers) {
    const top = await user.page.locator('#timeline').evaluate((t) => {
      t.scrollTop = t.scrollHeight - t.clientHeight - 400;
      return t.scrollTop;
    });
    readingAt.set(user, top);
  }
  danaSays('message 32: while you read');
  for (const user of readers) {
    await message(user, ROOM, 'message 32: while you read').waitFor({ state: 'attached' });
    await user.page.evaluate(() => new Promise((resolve) => requestAnimationFrame(() => resolve())));
    const m = await measure(user);
    assertFits(user, m, 'reading older messages');
    check(
      Math.abs(m.list.scrollTop - readingAt.get(user)) <= 1,
      `${user.name}: a new message moved the view from ${readingAt.get(user)} to ${m.list.scrollTop}`
    );
    check(
      m.newest.text === 'message 32: while you read' && m.newest.top >= m.boxes['message list'].bottom,
      `${user.name}: the new message should wait below the fold: ${JSON.stringify(m.newest)}`
    );
  }
  log('a reader who scrolled up is not pulled down');

  // Back at the bottom, it follows again; your own message always brings you down.
  await alice.page.locator('#timeline').evaluate((t) => {
    t.scrollTop = 0;
  });
  const aliceInput = alice.page.locator('#message-input');
  await aliceInput.fill('Catching up, one moment.');
  await aliceInput.press('Enter');
  await waitAtNewest(alice, 'Catching up, one moment.', 'after sending');
  await bob.page.locator('#timeline').evaluate((t) => {
    t.scrollTop = t.scrollHeight;
  });
  await waitAtNewest(bob, 'Catching up, one moment.', 'scrolled back down');
  log('sending, or scrolling back down, follows again');

  // A long room name is readable whole in the room list and above the messages.
  for (const user of readers) {
    await user.page.locator('#join-room').fill(LONG_ROOM);
    await user.page.locator('#join-room').press('Enter');
    await user.page.locator('#room-title').getByText(`# ${LONG_ROOM}`, { exact: true }).waitFor();
    const names = await user.page.evaluate(() => {
      const whole = (el) => {
        const r = el.getBoundingClientRect();
        const card = el.closest('.card').getBoundingClientRect();
        return {
          text: el.textContent.replace(/\s/g, ' '),
          clipped: el.scrollWidth > el.clientWidth || el.scrollHeight > el.clientHeight,
          inCard: r.left >= card.left && r.right <= card.right,
        };
      };
      const tab = document.querySelector('.room-tab.active .room-open');
      return { tab: whole(tab), title: whole(document.getElementById('room-title')) };
    });
    for (const [where, seen] of Object.entries(names)) {
      check(seen.text === `# ${LONG_ROOM}`, `${user.name}'s room ${where} reads "${seen.text}"`);
      check(!seen.clipped && seen.inCard, `${user.name}'s room ${where} is cut off: ${JSON.stringify(seen)}`);
    }
    assertFits(user, await measure(user), 'long room name');
  }
  log('long room names are shown whole');

  // A game beside the busy room: board and result in view without scrolling the page.
  for (const user of readers) await user.page.getByRole('button', { name: `# ${ROOM}` }).click();
  await alice.page.getByRole('button', { name: 'Find a game' }).click();
  await alice.page.locator('#game-status').getByText('Waiting for an opponent…', { exact: true }).waitFor();
  await bob.page.getByRole('button', { name: 'Find a game' }).click();
  await bob.page.locator('#game-status').getByText('Your turn.', { exact: true }).waitFor();
  await alice.page.locator('#game-status').getByText('Waiting for Bob…', { exact: true }).waitFor();
  for (const user of readers) {
    const m = await waitAtNewest(user, 'Catching up, one moment.', 'in a game');
    const board = await user.page.locator('#board').boundingBox();
    check(board && board.y >= 0 && board.y + board.height <= m.viewport.height, `${user.name}'s board: ${JSON.stringify(board)}`);
  }
  await bob.page.locator('#board .cell[data-pos="4"]').click();
  await until('the move on Alice\'s board', () => alice.page.locator('#board .cell[data-pos="4"]').textContent(), (t) => t === 'X');
  log('the game panel stays in view beside a busy room');

  dana.close();
  for (const user of readers) await user.assertNoCspViolations();
});
