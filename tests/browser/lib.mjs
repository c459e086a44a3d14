// Shared helpers for the browser scenarios. Each scenario is a script run by
// tests/browser.rs as `node <script>.mjs <page url>` against a real gateway; it exits 0
// when every check passed.
//
// Waiting is always on a condition in the page (Playwright's auto-waiting locators, or
// `until`, which polls), never a fixed sleep: a loaded CI machine is slow, not broken.

import { createInterface } from 'node:readline';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

/** How long any one condition may take to hold. */
export const TIMEOUT = 20_000;

/** The gateway's page, e.g. http://127.0.0.1:41234 */
export const BASE = (process.argv[2] || '').replace(/\/$/, '');

export const SCREENSHOTS = process.env.RTGATE_SCREENSHOTS === '1';

const CHROMIUM_ARGS = [
  '--headless',
  '--no-sandbox',
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
];

export function log(...args) {
  console.log(`[${new Date().toISOString().slice(11, 23)}]`, ...args);
}

export class Failure extends Error {}

export function check(condition, message) {
  if (!condition) throw new Failure(message);
}

/**
 * Runs a scenario: launches Chromium, hands it to `body`, and exits 0 only if `body`
 * resolved and no page broke a rule (see `openUser`).
 */
export async function scenario(name, body) {
  if (!BASE.startsWith('http://127.0.0.1:')) {
    console.error(`usage: node ${name}.mjs http://127.0.0.1:PORT`);
    process.exit(2);
  }
  const started = Date.now();
  const users = [];
  let browser;
  let code = 0;
  try {
    browser = await chromium.launch({
      executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
      headless: true,
      args: CHROMIUM_ARGS,
      timeout: 60_000,
    });
    await body({ browser, users });
    for (const user of users) user.assertClean();
    log(`${name}: passed in ${((Date.now() - started) / 1000).toFixed(1)} s`);
  } catch (err) {
    code = 1;
    console.error(`${name}: FAILED: ${err && err.stack ? err.stack : err}`);
    await describePages(name, users);
  } finally {
    if (browser) await browser.close().catch(() => {});
  }
  process.exit(code);
}

// What each page showed when a scenario failed: its problems, status, timeline text and a
// screenshot in the temp directory.
async function describePages(name, users) {
  for (const user of users) {
    try {
      const shot = join(tmpdir(), `rtgate-${name}-${user.name}.png`);
      await user.page.screenshot({ path: shot, timeout: 5000 });
      const status = await user.page.locator('#conn-status').textContent({ timeout: 5000 });
      const timeline = await user.page.locator('#timeline').innerText({ timeout: 5000 });
      const game = await user.page.locator('#game').innerText({ timeout: 5000 });
      console.error(`--- ${user.name}: status "${status}", screenshot ${shot}`);
      if (user.problems.length) console.error(`problems: ${user.problems.join('; ')}`);
      console.error(`timeline:\n${timeline}\ngame panel:\n${game}`);
    } catch (e) {
      console.error(`--- ${user.name}: page not readable (${e.message})`);
    }
  }
}

/**
 * A person: their own browser context (cookies, storage) and page, with guards that
 * fail the scenario on a page error, a CSP violation, an unexpected console error, or
 * any request to anything but this gateway (and `origins`).
 */
export async function openUser(ctx, name, { viewport, allowConsole, origins = [] } = {}) {
  const context = await ctx.browser.newContext({
    viewport: viewport || { width: 1280, height: 800 },
    deviceScaleFactor: 1,
    locale: 'en-GB',
    timezoneId: 'UTC',
  });
  context.setDefaultTimeout(TIMEOUT);
  const problems = [];
  const allowed = [BASE, ...origins].map((o) => new URL(o).origin + '/');
  await context.route('**/*', (route) => {
    const url = route.request().url();
    if (allowed.some((prefix) => url.startsWith(prefix))) return route.continue();
    problems.push(`request to ${url}`);
    return route.abort();
  });
  // Recorded from the very start, before any page script: the event fires for every
  // blocked inline script, style attribute or foreign resource.
  await context.addInitScript(() => {
    window.__cspViolations = [];
    document.addEventListener('securitypolicyviolation', (e) => {
      window.__cspViolations.push(`${e.violatedDirective} ${e.blockedURI}`);
    });
  });
  const page = await context.newPage();
  page.on('pageerror', (err) => problems.push(`page error: ${err.message}`));
  page.on('console', (msg) => {
    if (msg.type() !== 'error') return;
    const text = msg.text();
    if (allowConsole && allowConsole.test(text)) return;
    problems.push(`console error: ${text}`);
  });
  const user = {
    name,
    context,
    page,
    problems,
    assertClean() {
      check(problems.length === 0, `${name}'s page: ${problems.join('; ')}`);
    },
    async assertNoCspViolations() {
      const violations = await page.evaluate(() => window.__cspViolations);
      check(violations.length === 0, `${name}'s page violated its CSP: ${violations.join(', ')}`);
    },
  };
  ctx.users.push(user);
  return user;
}

/** Loads the page and signs in with the keyboard alone: type, Tab, Enter. */
export async function signIn(user, room) {
  const { page } = user;
  const res = await page.goto(BASE + '/');
  check(res.ok(), `GET / answered ${res.status()}`);
  const csp = res.headers()['content-security-policy'] || '';
  check(csp.includes("script-src 'self'") && !csp.includes('unsafe-inline'), `unexpected CSP: ${csp}`);
  // The name field has focus on load.
  await page.waitForFunction(() => document.activeElement && document.activeElement.id === 'login-name');
  await page.keyboard.type(user.name);
  await page.keyboard.press('Tab');
  await page.keyboard.press('ControlOrMeta+A');
  await page.keyboard.type(room);
  await page.keyboard.press('Enter');
  await page.locator('#conn-status.online').waitFor();
  await notice(user, room, `You joined #${room}.`).waitFor();
  await user.assertNoCspViolations();
}

/** The list of a room's timeline entries. */
export function roomList(user, room) {
  return user.page.locator(`ol.messages[data-room="${room}"]`);
}

/** A chat message in `room` whose text is exactly `text`. */
export function message(user, room, text) {
  return roomList(user, room)
    .locator('li.msg')
    .filter({ has: user.page.locator('.text').getByText(text, { exact: true }) });
}

export function notice(user, room, text) {
  return roomList(user, room).locator('li.notice').getByText(text, { exact: true });
}

/** Sends a chat message the way a person does: type into the box, press Enter. */
export async function say(user, text) {
  const input = user.page.locator('#message-input');
  await input.click();
  await input.pressSequentially(text, { delay: 5 });
  await input.press('Enter');
}

/** Every message shown in `room`, in order: {author, text, mine, seq}. */
export async function messages(user, room) {
  return roomList(user, room)
    .locator('li.msg')
    .evaluateAll((items) =>
      items.map((li) => ({
        author: li.querySelector('.author').textContent,
        text: li.querySelector('.text').textContent,
        mine: li.classList.contains('mine'),
        seq: li.dataset.seq === undefined ? null : Number(li.dataset.seq),
      }))
    );
}

/** Polls `probe` until `accept(value)` holds; fails with the last value after `timeout`. */
export async function until(description, probe, accept, timeout = TIMEOUT) {
  const deadline = Date.now() + timeout;
  let last;
  for (;;) {
    last = await probe();
    if (accept(last)) return last;
    if (Date.now() > deadline) {
      throw new Failure(`timed out waiting for ${description}; last seen: ${JSON.stringify(last)}`);
    }
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
}

/** Saves a screenshot into docs/ when RTGATE_SCREENSHOTS=1. */
export async function screenshot(page, file) {
  if (!SCREENSHOTS) return;
  const path = fileURLToPath(new URL(`../../docs/${file}`, import.meta.url));
  await page.screenshot({ path });
  log(`wrote ${path}`);
}

let stdinLines;

/**
 * Asks the Rust side of the test to do something (restart the gateway, say) and waits
 * until it is done: prints `@@step NAME`, then reads `ok` from stdin.
 */
export async function step(name) {
  if (!stdinLines) stdinLines = createInterface({ input: process.stdin })[Symbol.asyncIterator]();
  console.log(`@@step ${name}`);
  const { value, done } = await stdinLines.next();
  check(!done && value.trim() === 'ok', `step ${name}: the test answered ${done ? 'nothing' : value}`);
}
