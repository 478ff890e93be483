// Login CSRF: a tab signed in as one client is sent to a sign-in link of another. The console
// must ask before it changes who the tab is signed in as; refusing keeps the session and leaves
// the link's code unused, accepting signs in with the link. The Rust test (hw-tests/tests/
// console.rs) gives the two other links on stdin and checks the refused code is still unused.
//
// Usage: PLAYWRIGHT_DIR=target/playwright node switch.mjs SIGN_IN_URL SCREENSHOT_DIR
import { createRequire } from "node:module";
import { createInterface } from "node:readline";

const { chromium } = createRequire(`${process.env.PLAYWRIGHT_DIR}/package.json`)("playwright-core");

const [url, shots] = process.argv.slice(2);
const lines = createInterface({ input: process.stdin })[Symbol.asyncIterator]();
const next = async () => (await lines.next()).value.trim();
const wait = { timeout: 30000 };

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-dev-shm-usage"],
});
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  page.on("pageerror", (e) => { console.error(`page error: ${e}`); process.exitCode = 1; });
  const who = page.locator("#who");
  await page.goto(url);
  await page.getByText("Signed in as admin (console)").waitFor(wait);
  console.log("READY");

  // Another page sends this tab to its own link (another path, so the page loads again).
  const refused = await next();
  await page.goto(refused);
  await page.getByRole("button", { name: "Stay signed in" }).waitFor(wait);
  if ((await who.innerText()) !== "Signed in as admin (console)") {
    throw new Error(`the tab changed identity before the question was answered: ${await who.innerText()}`);
  }
  await page.screenshot({ path: `${shots}/console-switch.png`, fullPage: true });
  await page.getByRole("button", { name: "Stay signed in" }).click();
  await page.getByText("Live:").waitFor(wait);
  if ((await who.innerText()) !== "Signed in as admin (console)") {
    throw new Error(`refusing the link changed the identity: ${await who.innerText()}`);
  }
  console.log("KEPT");

  // The person did ask for the link: it is used.
  const wanted = await next();
  await page.goto(wanted);
  await page.getByRole("button", { name: "Sign in with the link" }).click(wait);
  await page.getByText("Signed in as kiosk (console)").waitFor(wait);
  console.log("SWITCHED");
} catch (e) {
  // Said before the exit below, which would otherwise swallow it.
  console.error(`the flow failed: ${e.stack || e}`);
  process.exitCode = 1;
} finally {
  await browser.close();
  process.exit(process.exitCode ?? 0);
}
