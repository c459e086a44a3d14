// JWT mode: people sign in by pasting a token (argv[3], argv[4]); their names come from
// the token, room history loads with the token, and they chat. A bad token (argv[5]) is
// refused: the page keeps trying and never shows "Connected".

import { BASE, check, log, message, messages, notice, openUser, say, scenario, until } from './lib.mjs';

const [, , , graceToken, linusToken, badToken] = process.argv;
const ROOM = 'general';

async function signInWithToken(user, token) {
  const { page } = user;
  await page.goto(BASE + '/');
  await page.locator('#login-room').fill(ROOM);
  await page.getByText('Gateway in JWT mode? Use a token').click();
  await page.getByLabel('Token').fill(token);
  const history = page.waitForResponse((res) => res.url().includes(`/rooms/${ROOM}/history`));
  await page.getByRole('button', { name: 'Connect' }).click();
  return history;
}

await scenario('jwt', async (ctx) => {
  check(graceToken && linusToken && badToken, 'usage: node jwt.mjs URL TOKEN TOKEN BAD_TOKEN');
  // A refused upgrade is reported on the console by Chromium, as is the refused history request.
  const allowConsole = /WebSocket connection to .* failed|Failed to load resource: the server responded with a status of 401/;
  const grace = await openUser(ctx, 'Grace');
  const linus = await openUser(ctx, 'Linus');
  const mallory = await openUser(ctx, 'Mallory', { allowConsole });

  const graceHistory = await signInWithToken(grace, graceToken);
  check((await graceHistory).status() === 200, 'history loads with the token');
  await grace.page.locator('#conn-status.online').waitFor();
  await until('the name from the token', () => grace.page.locator('#my-name').textContent(), (n) => n === 'Grace Hopper');
  await notice(grace, ROOM, 'You joined #general.').waitFor();
  await say(grace, 'Signed in with a token.');
  await message(grace, ROOM, 'Signed in with a token.').waitFor();

  await signInWithToken(linus, linusToken);
  await notice(linus, ROOM, 'You joined #general.').waitFor();
  await until('Linus to see the history', async () => (await messages(linus, ROOM)).length, (n) => n === 1);
  await say(linus, 'Me too.');
  await message(grace, ROOM, 'Me too.').waitFor();
  const seen = await messages(grace, ROOM);
  check(
    JSON.stringify(seen.map((m) => [m.author, m.mine])) ===
      JSON.stringify([['Grace Hopper', true], ['Linus Torvalds', false]]),
    `Grace sees ${JSON.stringify(seen)}`
  );
  log('two token holders chat');

  const refused = await signInWithToken(mallory, badToken);
  check((await refused).status() === 401, 'history refuses a bad token');
  await until(
    'the refusal notice',
    () => mallory.page.locator('li.notice.error').allTextContents(),
    (t) => t.some((line) => line.startsWith('Earlier messages are unavailable ('))
  );
  await until(
    'a second refused attempt',
    () => mallory.page.locator('#conn-status').textContent(),
    (s) => s.startsWith('Reconnecting')
  );
  check(!(await mallory.page.locator('#conn-status.online').count()), 'a bad token never connects');
  log('a bad token is refused');
});
