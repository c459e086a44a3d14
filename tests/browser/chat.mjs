// Scenario 1: people chat in a room and see each other's messages, own messages marked,
// typing indicators that come and go, presence and file-share notices. Bob is on a
// phone-sized screen. With RTGATE_SCREENSHOTS=1 it saves docs/screenshot-chat.png.

import { check, log, message, messages, notice, openUser, say, scenario, screenshot, signIn, until } from './lib.mjs';

const ROOM = 'general';

await scenario('chat', async (ctx) => {
  const alice = await openUser(ctx, 'Alice');
  const bob = await openUser(ctx, 'Bob', { viewport: { width: 390, height: 844 } });
  await signIn(alice, ROOM);
  await signIn(bob, ROOM);
  await notice(alice, ROOM, 'Bob joined.').waitFor();
  log('both signed in');

  // Typing: Bob sees Alice typing while she types, and the indicator goes when she sends.
  const input = alice.page.locator('#message-input');
  await input.click();
  await input.pressSequentially('Morning! Did the deploy', { delay: 5 });
  await bob.page.locator('#typing').getByText('Alice is typing…', { exact: true }).waitFor();
  await input.pressSequentially(' go out?', { delay: 5 });
  await input.press('Enter');
  await message(bob, ROOM, 'Morning! Did the deploy go out?').waitFor();
  await until('Bob\'s typing line to clear', () => bob.page.locator('#typing').textContent(), (t) => t === '');
  log('typing indicator shown and cleared by the message');

  // Typing stopped without sending (the box emptied): the indicator clears too.
  const bobInput = bob.page.locator('#message-input');
  await bobInput.click();
  await bobInput.pressSequentially('hmm', { delay: 5 });
  await alice.page.locator('#typing').getByText('Bob is typing…', { exact: true }).waitFor();
  await bobInput.fill('');
  await until('Alice\'s typing line to clear', () => alice.page.locator('#typing').textContent(), (t) => t === '');
  log('typing indicator cleared by typing_stop');

  await say(bob, 'Yes, 20 minutes ago. Dashboards look green.');
  await message(alice, ROOM, 'Yes, 20 minutes ago. Dashboards look green.').waitFor();

  // Own messages are marked as such, on both sides.
  const seenByAlice = await messages(alice, ROOM);
  const seenByBob = await messages(bob, ROOM);
  check(
    JSON.stringify(seenByAlice.map((m) => [m.author, m.mine])) === JSON.stringify([['Alice', true], ['Bob', false]]),
    `Alice sees ${JSON.stringify(seenByAlice)}`
  );
  check(
    JSON.stringify(seenByBob.map((m) => [m.author, m.mine])) === JSON.stringify([['Alice', false], ['Bob', true]]),
    `Bob sees ${JSON.stringify(seenByBob)}`
  );

  // A third person, a file-share notice, and a few more lines.
  const carol = await openUser(ctx, 'Carol');
  await signIn(carol, ROOM);
  await notice(alice, ROOM, 'Carol joined.').waitFor();
  await say(carol, 'Nice work, both of you. I wrote up the <b>release notes</b>');
  // Formatting the gateway allows survives as formatting.
  const notes = message(alice, ROOM, 'Nice work, both of you. I wrote up the release notes');
  await notes.locator('.text b').getByText('release notes', { exact: true }).waitFor();

  await carol.page.locator('#file-share summary').click();
  await carol.page.locator('#file-name').fill('release-notes-2.4.pdf');
  await carol.page.locator('#file-size').fill('245760');
  await carol.page.locator('#file-type').fill('application/pdf');
  await carol.page.locator('#file-send').click();
  const fileNotice = 'Carol shared release-notes-2.4.pdf (240 KB, application/pdf).';
  await notice(alice, ROOM, fileNotice).waitFor();
  await notice(bob, ROOM, fileNotice).waitFor();
  await notice(carol, ROOM, 'You shared release-notes-2.4.pdf (240 KB, application/pdf).').waitFor();
  log('file-share notice delivered');

  await say(alice, 'Thanks Carol! Reading it now.');
  await say(bob, 'Lunch at 12:30? Usual place.');
  await message(alice, ROOM, 'Lunch at 12:30? Usual place.').waitFor();
  await message(carol, ROOM, 'Lunch at 12:30? Usual place.').waitFor();

  // Everyone sees the same conversation, in the same order.
  const expected = [
    'Morning! Did the deploy go out?',
    'Yes, 20 minutes ago. Dashboards look green.',
    'Nice work, both of you. I wrote up the release notes',
    'Thanks Carol! Reading it now.',
    'Lunch at 12:30? Usual place.',
  ];
  for (const user of [alice, bob]) {
    const texts = await until(
      `${user.name} to show the whole conversation`,
      async () => (await messages(user, ROOM)).map((m) => m.text),
      (t) => t.length === expected.length
    );
    check(JSON.stringify(texts) === JSON.stringify(expected), `${user.name} shows ${JSON.stringify(texts)}`);
  }

  // Phone width: nothing sticks out sideways; every control has a label.
  const overflow = await bob.page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  check(overflow <= 0, `Bob's phone-width page scrolls sideways by ${overflow}px`);
  const unlabelled = await alice.page.evaluate(() =>
    Array.from(document.querySelectorAll('input, textarea, button'))
      .filter((el) => {
        if (el.tagName === 'BUTTON') return !(el.textContent.trim() || el.getAttribute('aria-label'));
        return !(el.labels && el.labels.length) && !el.getAttribute('aria-label');
      })
      .map((el) => el.id || el.outerHTML.slice(0, 60))
  );
  check(unlabelled.length === 0, `controls without a label: ${unlabelled.join(', ')}`);

  // Carol is typing as the picture is taken: the indicator is part of the view.
  await carol.page.locator('#message-input').pressSequentially('Count me in', { delay: 5 });
  await alice.page.locator('#typing').getByText('Carol is typing…', { exact: true }).waitFor();
  check((await alice.page.locator('#room-members').textContent()) === '3 members', 'Alice should see 3 members');
  await screenshot(alice.page, 'screenshot-chat.png');

  // Leaving is announced.
  await bob.page.getByRole('button', { name: 'Leave general' }).click();
  await notice(alice, ROOM, 'Bob left.').waitFor();
  await until('the member count to drop', () => alice.page.locator('#room-members').textContent(), (t) => t === '2 members');
  log('leave announced');
  for (const user of [alice, bob, carol]) await user.assertNoCspViolations();
});
