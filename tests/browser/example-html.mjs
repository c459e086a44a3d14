// The web page example of docs/client.md runs as written: served from its own origin
// (argv[3], an address the gateway's allowed_origins lists) next to a copy of rtgate.js,
// it connects, shows its own message, and shows markup characters as text.

import { readFileSync } from 'node:fs';
import { createServer } from 'node:http';
import { fileURLToPath } from 'node:url';
import { BASE, check, openUser, scenario, until } from './lib.mjs';

const EXAMPLE_ORIGIN = (process.argv[3] || '').replace(/\/$/, '');
const read = (rel) => readFileSync(fileURLToPath(new URL(rel, import.meta.url)), 'utf8');

const doc = read('../../docs/client.md');
const match = doc.match(/<!-- example: html -->\s*```html\n([\s\S]*?)```/);
const wsUrl = BASE.replace(/^http/, 'ws') + '/ws';
const files = {
  '/': ['text/html', match ? match[1].replaceAll('ws://127.0.0.1:3000/ws', wsUrl) : ''],
  '/rtgate.js': ['text/javascript', read('../../web/rtgate.js')],
};

await scenario('example-html', async (ctx) => {
  check(match, 'docs/client.md has a web page example marked <!-- example: html -->');
  check(EXAMPLE_ORIGIN.startsWith('http://127.0.0.1:'), 'usage: node example-html.mjs GATEWAY_URL EXAMPLE_URL');
  const server = createServer((req, res) => {
    const file = files[req.url];
    res.writeHead(file ? 200 : 404, { 'Content-Type': file ? file[0] : 'text/plain' });
    res.end(file ? file[1] : 'not found');
  });
  await new Promise((resolve) => server.listen(Number(new URL(EXAMPLE_ORIGIN).port), '127.0.0.1', resolve));
  try {
    const user = await openUser(ctx, 'Reader', { origins: [EXAMPLE_ORIGIN] });
    await user.page.goto(EXAMPLE_ORIGIN + '/');
    const lines = () => user.page.locator('#log li').allTextContents();
    await until('the example to connect', lines, (l) => l.includes('connected as html-example'));
    await user.page.locator('#text').fill('is 1 < 2 && 3 > 2?');
    await user.page.locator('#text').press('Enter');
    await until('its own message', lines, (l) => l.includes('html-example: is 1 < 2 && 3 > 2?'));
  } finally {
    server.close();
  }
});
