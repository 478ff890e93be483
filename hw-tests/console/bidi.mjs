// A card whose certificate names its holder with bidi controls, seen in a real browser: the
// console must show the controls as code points, isolate the holder's name, and draw the card
// id left to right, in the heading and in the revoke confirmation. The Rust test
// (hw-tests/tests/console.rs) inserts the card; this script reads the card id on stdin and
// prints DONE.
//
// Usage: PLAYWRIGHT_DIR=target/playwright node bidi.mjs SIGN_IN_URL SCREENSHOT_DIR
import { createRequire } from "node:module";
import { createInterface } from "node:readline";

const { chromium } = createRequire(`${process.env.PLAYWRIGHT_DIR}/package.json`)("playwright-core");

const [url, shots] = process.argv.slice(2);
const lines = createInterface({ input: process.stdin })[Symbol.asyncIterator]();
const next = async () => (await lines.next()).value.trim();
const wait = { timeout: 30000 };
const controls = /[\u061C\u200E\u200F\u202A-\u202E\u2066-\u2069]/;

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-dev-shm-usage"],
});
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  page.on("pageerror", (e) => { console.error(`page error: ${e}`); process.exitCode = 1; });
  await page.goto(url);
  await page.getByText("Live:").waitFor(wait);
  console.log("READY");
  const cardId = await next();
  const card = page.locator(`article[data-card-id="${cardId}"]`);
  await card.waitFor(wait);

  // What a person reads must hold no live control, and name the one the card carries.
  const heading = await card.locator("h4").innerText();
  if (controls.test(heading)) throw new Error(`a live bidi control in the heading: ${JSON.stringify(heading)}`);
  if (!heading.includes("[U+202E]")) throw new Error(`the control is not shown: ${heading}`);
  if (!heading.includes(cardId)) throw new Error(`the card id is not shown as read: ${heading}`);
  const id = card.locator("h4 bdi.id");
  if ((await id.getAttribute("dir")) !== "ltr" || (await id.innerText()) !== cardId) {
    throw new Error("the card id is not drawn left to right on its own");
  }
  // The holder's name is isolated: its direction ends with it.
  // Found and measured in one step in the page: the card is drawn again when its reconciliation
  // arrives, and a node measured after that is detached (no computed style).
  const isolation = await page.waitForFunction((id) => {
    const name = document.querySelector(`article[data-card-id="${id}"] h4 bdi`);
    const style = name && name.isConnected ? getComputedStyle(name).unicodeBidi : "";
    return style || null;
  }, cardId, wait).then((h) => h.jsonValue());
  if (isolation !== "isolate") throw new Error(`the holder's name is not isolated: ${isolation}`);
  const cells = await card.locator("tbody").innerText();
  if (controls.test(cells)) throw new Error(`a live bidi control in the certificates: ${JSON.stringify(cells)}`);

  await card.getByRole("button", { name: "Revoke certificates…" }).click();
  const confirmation = await page.locator("#revoke-confirm-label").innerText();
  if (controls.test(confirmation) || !confirmation.includes(`card ${cardId},`)) {
    throw new Error(`the confirmation: ${JSON.stringify(confirmation)}`);
  }
  await page.screenshot({ path: `${shots}/console-bidi.png`, fullPage: true });
  console.log("DONE");
} catch (e) {
  // Said before the exit below, which would otherwise swallow it.
  console.error(`the flow failed: ${e.stack || e}`);
  process.exitCode = 1;
} finally {
  await browser.close();
  process.exit(process.exitCode ?? 0);
}
