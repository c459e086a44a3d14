// Scenario 4: two people find each other for tic-tac-toe, play to a win by clicking the
// board, see the result, play a rematch with the symbols swapped, and one learns that
// the other left. With RTGATE_SCREENSHOTS=1 it saves docs/screenshot-game.png.

import { check, log, message, openUser, say, scenario, screenshot, signIn, until } from './lib.mjs';

const ROOM = 'games';

const board = (user) =>
  user.page.locator('#board .cell').evaluateAll((cells) => cells.map((c) => c.textContent || '.').join(''));
const status = (user) => user.page.locator('#game-status').textContent();

async function waitBoard(user, expected) {
  await until(`${user.name}'s board to read ${expected}`, () => board(user), (b) => b === expected);
}

async function waitStatus(user, expected) {
  await until(`${user.name}'s game status "${expected}"`, () => status(user), (s) => s === expected);
}

// Plays `position` as `user`, after checking the other player cannot.
async function play(user, other, position, expectedBoard) {
  const cell = user.page.locator(`#board .cell[data-pos="${position}"]`);
  await until(`${user.name}'s turn`, () => cell.isEnabled(), (on) => on);
  check(
    await other.page.locator(`#board .cell[data-pos="${position}"]`).isDisabled(),
    `${other.name} could click while it is ${user.name}'s turn`
  );
  await cell.click();
  await waitBoard(user, expectedBoard);
  await waitBoard(other, expectedBoard);
}

await scenario('game', async (ctx) => {
  const alice = await openUser(ctx, 'Alice');
  const bob = await openUser(ctx, 'Bob');
  await signIn(alice, ROOM);
  await signIn(bob, ROOM);
  await say(alice, 'Best of three?');
  await say(bob, "You're on. I'll even let you wait for me.");
  await message(alice, ROOM, "You're on. I'll even let you wait for me.").waitFor();

  // Alice waits; Bob arrives and, as the newcomer, is X and moves first.
  await alice.page.getByRole('button', { name: 'Find a game' }).click();
  await waitStatus(alice, 'Waiting for an opponent…');
  await alice.page.getByRole('button', { name: 'Cancel' }).waitFor();
  await bob.page.getByRole('button', { name: 'Find a game' }).click();
  await waitStatus(bob, 'Your turn.');
  await waitStatus(alice, 'Waiting for Bob…');
  check((await bob.page.locator('#game-players').textContent()) === 'You (X) vs Alice (O)', 'Bob is X against Alice');
  check((await alice.page.locator('#game-players').textContent()) === 'You (O) vs Bob (X)', 'Alice is O against Bob');
  log('game started');

  // The keyboard works too: Bob's first move is focus + Enter.
  await bob.page.locator('#board .cell[data-pos="4"]').focus();
  await bob.page.keyboard.press('Enter');
  await waitBoard(bob, '....X....');
  await waitBoard(alice, '....X....');
  await play(alice, bob, 0, 'O...X....');
  await play(bob, alice, 2, 'O.X.X....');
  await play(alice, bob, 6, 'O.X.X.O..');
  await say(alice, 'Not the corner again…');
  await play(bob, alice, 3, 'O.XXX.O..');
  await play(alice, bob, 5, 'O.XXXOO..');
  await play(bob, alice, 8, 'O.XXXOO.X');
  await play(alice, bob, 1, 'OOXXXOO.X');
  // The last free cell: no line for anyone.
  await bob.page.locator('#board .cell[data-pos="7"]').click();
  await waitStatus(bob, "It's a draw.");
  await waitStatus(alice, "It's a draw.");
  log('first game: a draw');

  // Rematch: symbols swap, so Alice is X and starts. She wins on the top row.
  await bob.page.getByRole('button', { name: 'Rematch' }).click();
  await waitStatus(bob, 'Waiting for Alice to accept the rematch…');
  await waitStatus(alice, 'Bob wants a rematch.');
  await alice.page.getByRole('button', { name: 'Rematch' }).click();
  await waitStatus(alice, 'Your turn.');
  check((await alice.page.locator('#game-players').textContent()) === 'You (X) vs Bob (O)', 'Alice is X in the rematch');
  await waitBoard(bob, '.........');
  await play(alice, bob, 0, 'X........');
  await play(bob, alice, 4, 'X...O....');
  await play(alice, bob, 1, 'XX..O....');
  await play(bob, alice, 8, 'XX..O...O');
  await alice.page.locator('#board .cell[data-pos="2"]').click();
  await waitStatus(alice, 'You win!');
  await waitStatus(bob, 'Alice wins.');
  await waitBoard(bob, 'XXX.O...O');
  const winCells = await bob.page.locator('#board .cell.win').evaluateAll((c) => c.map((e) => e.dataset.pos));
  check(JSON.stringify(winCells) === '["0","1","2"]', `winning line highlighted: ${winCells}`);
  const disabled = await alice.page.locator('#board .cell:not([disabled])').count();
  check(disabled === 0, 'the board is closed after the game');
  log('rematch: Alice wins');
  await say(bob, 'Well played. Rematch after lunch?');
  await message(alice, ROOM, 'Well played. Rematch after lunch?').waitFor();
  await screenshot(alice.page, 'screenshot-game.png');

  // A third game, which Bob abandons by closing his tab.
  await bob.page.getByRole('button', { name: 'Rematch' }).click();
  await alice.page.getByRole('button', { name: 'Rematch' }).click();
  await waitStatus(bob, 'Your turn.');
  await bob.context.close();
  ctx.users.splice(ctx.users.indexOf(bob), 1);
  await waitStatus(alice, 'Bob left the game.');
  await alice.page.getByRole('button', { name: 'Find a game' }).waitFor();
  log('opponent leaving is shown');
  await alice.assertNoCspViolations();
});
