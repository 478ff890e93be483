// The helpdesk console in a real browser (Debian's chromium, driven by playwright-core), as a
// person uses it. The Rust test (hw-tests/tests/console.rs) runs this script and moves the
// virtual card when asked: the script prints READY, REVOKED and DONE on stdout, and reads the
// card id (after the insertion) and "removed" (after the removal) on stdin.
//
// Usage: PLAYWRIGHT_DIR=target/playwright node flow.mjs SIGN_IN_URL SCREENSHOT_DIR
// (playwright-core is installed there by hw-tests/run-tests; ES modules ignore NODE_PATH).
import { createRequire } from "node:module";
import { createInterface } from "node:readline";

const { chromium } = createRequire(`${process.env.PLAYWRIGHT_DIR}/package.json`)("playwright-core");

const [url, shots] = process.argv.slice(2);
const lines = createInterface({ input: process.stdin })[Symbol.asyncIterator]();
const next = async () => (await lines.next()).value.trim();
const step = (what) => console.error(`flow: ${what}`);
const wait = { timeout: 30000 };

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-dev-shm-usage"],
});
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  page.on("console", (m) => console.error(`page: ${m.text()}`));
  page.on("pageerror", (e) => { console.error(`page error: ${e}`); process.exitCode = 1; });

  step("sign in with the one-time link");
  await page.goto(url);
  await page.getByText("Signed in as").waitFor(wait);
  if (page.url().includes("code=")) throw new Error(`the sign-in code stayed in the address: ${page.url()}`);
  const stored = await page.evaluate(() => ({ local: localStorage.length, session: sessionStorage.length }));
  if (stored.local !== 0 || stored.session !== 1) throw new Error(`storage: ${JSON.stringify(stored)}`);
  await page.getByText("Live:").waitFor(wait);
  console.log("READY");

  step("a card appears on insertion, with its verdict in words");
  const cardId = await next();
  const card = page.locator(`article[data-card-id="${cardId}"]`);
  await card.waitFor(wait);
  await card.locator('.verdict[data-verdict="ok"]').waitFor(wait);
  const verdict = await card.locator(".verdict").innerText();
  if (!verdict.includes("OK") || !verdict.includes("✔")) throw new Error(`verdict shown as ${verdict}`);
  const rows = await card.locator("tbody tr").count();
  if (rows !== 4) throw new Error(`${rows} certificate rows`);
  const scepman = await card.locator("tbody tr td:nth-child(4)").allInnerTexts();
  if (!scepman.every((s) => s === "active")) throw new Error(`SCEPman column: ${scepman}`);
  await page.screenshot({ path: `${shots}/console-card.png`, fullPage: true });

  step("the revoke dialog, by keyboard and labels");
  await card.getByRole("button", { name: "Revoke certificates…" }).click();
  const focused = await page.evaluate(() => document.activeElement && document.activeElement.id);
  if (focused !== "revoke-reason") throw new Error(`focus went to ${focused}`);
  await page.getByLabel("Reason").selectOption("keyCompromise");
  await page.getByLabel("Comment").fill("reported lost at the helpdesk");
  const confirmation = await page.locator("#revoke-confirm-label").innerText();
  if (!confirmation.includes(cardId) || !confirmation.includes("held by Contoso user")) {
    throw new Error(`the confirmation does not name the card and its holder: ${confirmation}`);
  }
  await page.getByRole("button", { name: "Revoke", exact: true }).click();
  const refused = await page.locator("#revoke-error").innerText();
  if (!refused.includes("confirmation")) throw new Error("revoked without the confirmation");
  await page.getByLabel(/I confirm/).check();
  await page.screenshot({ path: `${shots}/console-revoke-dialog.png`, fullPage: true });
  await page.getByRole("button", { name: "Revoke", exact: true }).click();

  step("the revocation succeeds, and the card shows it");
  await page.locator('#audit-rows tr[data-status="succeeded"]').waitFor(wait);
  await card.locator('.verdict[data-verdict="critical"]').waitFor(wait);
  const findings = await card.locator(".findings li").allInnerTexts();
  if (!findings.some((f) => f.includes("revoked in SCEPman"))) throw new Error(`findings: ${findings}`);
  await page.screenshot({ path: `${shots}/console-revoked.png`, fullPage: true });

  step("the audit trail filters");
  await page.getByLabel("Status").selectOption("failed");
  await page.getByRole("button", { name: "Filter" }).click();
  await page.locator("#audit-rows tr").first().waitFor({ state: "detached", ...wait });
  await page.getByLabel("Status").selectOption("succeeded");
  await page.getByRole("button", { name: "Filter" }).click();
  await page.locator('#audit-rows tr[data-status="succeeded"]').waitFor(wait);
  console.log("REVOKED");

  step("a removed card disappears");
  if ((await next()) !== "removed") throw new Error("expected the removal");
  await card.waitFor({ state: "detached", ...wait });
  await page.screenshot({ path: `${shots}/console-removed.png`, fullPage: true });
  console.log("DONE");
} catch (e) {
  // Said before the exit below, which would otherwise swallow it.
  console.error(`the flow failed: ${e.stack || e}`);
  process.exitCode = 1;
} finally {
  await browser.close();
  // stdin stays open (the test holds it): end here rather than wait for it.
  process.exit(process.exitCode ?? 0);
}
