// Scenario 2: someone who joins late sees the room's earlier messages, loaded over HTTP,
// and pages further back with "Load older". The gateway runs with history.page_limit = 5,
// so 12 earlier messages take three pages.

import { check, log, message, messages, openUser, say, scenario, signIn, until } from './lib.mjs';

const ROOM = 'standup';
const EARLIER = Array.from({ length: 12 }, (_, i) => `update ${i + 1}`);

const texts = async (user) => (await messages(user, ROOM)).map((m) => m.text);

await scenario('history', async (ctx) => {
  const alice = await openUser(ctx, 'Alice');
  await signIn(alice, ROOM);
  for (const text of EARLIER) {
    await say(alice, text);
    await message(alice, ROOM, text).waitFor();
  }
  log('Alice posted 12 messages');

  // Carol arrives late: the newest page comes over HTTP.
  const carol = await openUser(ctx, 'Carol');
  const fetched = carol.page.waitForResponse((res) => res.url().includes(`/rooms/${ROOM}/history`));
  await signIn(carol, ROOM);
  const page = await (await fetched).json();
  check(page.messages.length === 5 && page.prev === 8, `first page: ${JSON.stringify(page).slice(0, 200)}`);
  await until('the newest 5 messages', () => texts(carol), (t) => JSON.stringify(t) === JSON.stringify(EARLIER.slice(7)));
  const shown = await messages(carol, ROOM);
  check(shown.every((m) => m.author === 'Alice' && !m.mine), `history shown as Alice's: ${JSON.stringify(shown)}`);
  check(
    JSON.stringify(shown.map((m) => m.seq)) === '[8,9,10,11,12]',
    `seqs shown: ${JSON.stringify(shown.map((m) => m.seq))}`
  );

  // "Load older" twice reaches the start; then it goes away.
  const older = carol.page.getByRole('button', { name: 'Load older messages' });
  await older.click();
  await until('10 messages after one "load older"', () => texts(carol), (t) => t.length === 10);
  check(JSON.stringify(await texts(carol)) === JSON.stringify(EARLIER.slice(2)), 'second page goes first');
  await older.click();
  await until('all 12 messages', () => texts(carol), (t) => t.length === 12);
  check(JSON.stringify(await texts(carol)) === JSON.stringify(EARLIER), `all in order: ${await texts(carol)}`);
  await older.waitFor({ state: 'hidden' });
  log('load older paged back to the first message');

  // Live messages follow the history, once each, on both sides.
  await say(carol, 'Sorry I am late: reading back now.');
  await say(alice, 'update 13');
  await message(carol, ROOM, 'update 13').waitFor();
  await message(alice, ROOM, 'Sorry I am late: reading back now.').waitFor();
  const all = await until('Carol to show 14 messages', () => texts(carol), (t) => t.length === 14);
  check(
    JSON.stringify(all) === JSON.stringify([...EARLIER, 'Sorry I am late: reading back now.', 'update 13']),
    `Carol shows ${JSON.stringify(all)}`
  );
  const mine = (await messages(carol, ROOM)).filter((m) => m.mine).map((m) => m.text);
  check(JSON.stringify(mine) === JSON.stringify(['Sorry I am late: reading back now.']), `Carol's own: ${mine}`);
  check((await texts(alice)).length === 14, 'Alice shows 14 messages');

  // A reload is a new identity with the same history: Alice's old messages are not "mine".
  await alice.page.reload();
  await alice.page.locator('#login-name').fill('Alice');
  await alice.page.locator('#login-room').fill(ROOM);
  await alice.page.locator('#login-submit').click();
  await until('Alice to see the newest page again', () => texts(alice), (t) => t.length === 5);
  const reloaded = await messages(alice, ROOM);
  check(reloaded.every((m) => !m.mine), 'after a reload, earlier messages are not marked as mine');
  log('history after a reload');
});
