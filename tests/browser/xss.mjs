// Scenario 5: a hostile user sends script-injection payloads as messages, as a display
// name, in a file-share notice and in a typing indicator. In the other person's page
// (and the sender's own) nothing runs, no dangerous element or attribute exists, and the
// text reads as what was typed.

import { check, log, message, messages, notice, openUser, scenario, signIn, until } from './lib.mjs';

const ROOM = 'lobby';

// Each payload sets window.__xss if it ever runs.
const PAYLOADS = [
  '<img src=x onerror="window.__xss=1">',
  '<script>window.__xss=2</script>',
  '<a href="javascript:window.__xss=3">click me</a>',
  '<svg onload="window.__xss=4"><circle r=5></circle></svg>',
  '<iframe src="javascript:window.__xss=5"></iframe>',
  '<b onmouseover="window.__xss=6">hover me</b>',
  '"><img src=x onerror=window.__xss=7>',
  '<details open ontoggle="window.__xss=8">x</details>',
  '<a href="https://example.invalid/" onclick="window.__xss=9">a link</a>',
  '<math><mtext><table><mglyph><style><img src=x onerror=window.__xss=10>',
  '<body onload="window.__xss=11">',
  '<input autofocus onfocus="window.__xss=12">',
  '&lt;img src=x onerror=window.__xss=13&gt;',
  '<<img src=x onerror=window.__xss=14>',
  'javascript:window.__xss=15',
  '<form action="javascript:window.__xss=16"><button>go</button></form>',
  // The gateway keeps these <a> but removes the address: they must read as plain text.
  '<a href="/rooms/lobby/history">a relative link</a>',
  '<a>a link without an address</a>',
];
// Every <a> whose address the gateway removed, by its text.
const UNLINKED = ['click me', 'a relative link', 'a link without an address'];
// Plain text with markup characters must read exactly as typed.
const PLAIN = 'if a < b && c > d then "x" & \'y\'';
// The entity-encoded payload is text, and reads exactly as typed (never decoded into markup).
const ENCODED_AS_TEXT = '&lt;img src=x onerror=window.__xss=13&gt;';
// Markup that is not an allowed tag is text too, shown as typed.
const TAG_AS_TEXT = '<img src=x onerror="window.__xss=1">';

const DANGEROUS =
  'script, img, svg, iframe, object, embed, style, details, math, form, input, body, ' +
  '[onerror], [onload], [onclick], [onmouseover], [ontoggle], [onfocus], [style], [src]';

async function assertHarmless(user) {
  const found = await user.page.evaluate(
    (selector) => ({
      xss: window.__xss,
      dangerous: Array.from(document.querySelectorAll('#timeline, #typing, #game, #room-list'))
        .flatMap((root) => Array.from(root.querySelectorAll(selector)))
        .map((el) => el.outerHTML.slice(0, 80)),
      links: Array.from(document.querySelectorAll('#timeline a')).map((a) => a.getAttribute('href')),
    }),
    DANGEROUS
  );
  check(found.xss === undefined, `${user.name}'s page ran a payload: window.__xss = ${found.xss}`);
  check(found.dangerous.length === 0, `${user.name}'s page has ${found.dangerous.join(' | ')}`);
  // The one link with an allowed address stays a link; nothing links back into the page.
  check(
    JSON.stringify(found.links) === JSON.stringify(['https://example.invalid/']),
    `${user.name}'s page has links to ${JSON.stringify(found.links)}`
  );
}

await scenario('xss', async (ctx) => {
  const victim = await openUser(ctx, 'Victim');
  // 31 characters: display names are capped at 32.
  const MALLORY = '<img src=x onerror=__xss=99>Mal';
  const mallory = await openUser(ctx, MALLORY);
  await signIn(victim, ROOM);
  await signIn(mallory, ROOM);

  // Her name arrives cleaned: the tag is text, shown as she typed it.
  await notice(victim, ROOM, `${MALLORY} joined.`).waitFor();

  const input = mallory.page.locator('#message-input');
  for (const payload of [...PAYLOADS, PLAIN]) {
    await input.fill(payload);
    await input.press('Enter');
  }
  // Every payload arrives (as text, or with its allowed tags stripped of attributes);
  // wait for the last one.
  await message(victim, ROOM, PLAIN).waitFor();
  await message(mallory, ROOM, PLAIN).waitFor();
  const shown = (await messages(victim, ROOM)).map((m) => m.text);
  log(`${shown.length} of ${PAYLOADS.length + 1} delivered, shown as: ${JSON.stringify(shown)}`);

  await message(victim, ROOM, ENCODED_AS_TEXT).waitFor();
  await message(victim, ROOM, TAG_AS_TEXT).waitFor();
  await message(victim, ROOM, 'javascript:window.__xss=15').waitFor();
  const bold = message(victim, ROOM, 'hover me').locator('b');
  await bold.hover();
  await bold.click();
  // Links without a safe href are plain text: clicking them goes nowhere.
  for (const text of UNLINKED) {
    const shownAs = await message(victim, ROOM, text).locator('.text').innerHTML();
    check(shownAs === text, `"${text}" is shown as ${shownAs}`);
  }
  await message(victim, ROOM, 'click me').getByText('click me').click();
  const link = message(victim, ROOM, 'a link').locator('.text a');
  check((await link.getAttribute('href')) === 'https://example.invalid/', 'the https link stays a link');
  const authors = new Set((await messages(victim, ROOM)).map((m) => m.author));
  check(authors.size === 1 && authors.has(MALLORY), `authors shown: ${[...authors]}`);

  // The file-share notice and the typing indicator carry her strings too.
  await mallory.page.locator('#file-share summary').click();
  await mallory.page.locator('#file-name').fill('<img src=x onerror=window.__xss=20>.png');
  await mallory.page.locator('#file-size').fill('10');
  await mallory.page.locator('#file-type').fill('image/png');
  await mallory.page.locator('#file-send').click();
  await until(
    'the file notice',
    () => victim.page.locator('li.notice.file').allTextContents(),
    (t) => t.length === 1 && t[0].startsWith(`${MALLORY} shared `)
  );
  await input.fill('');
  await input.pressSequentially('typing…', { delay: 5 });
  await victim.page.locator('#typing').getByText(`${MALLORY} is typing…`, { exact: true }).waitFor();

  for (const user of [victim, mallory]) {
    await assertHarmless(user);
    await user.assertNoCspViolations();
  }
  log('nothing ran; no dangerous markup in either page');
});
