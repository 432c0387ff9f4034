// End-to-end: the dashboard in a real browser (Playwright driving Debian's chromium), at a
// desktop size and at a 390x844 phone size. Run by crates/nook/tests/web_dashboard.rs, which
// starts nook and passes, in the environment:
//   NOOK_URL          https://nook.localhost:PORT
//   NOOK_LOGIN_ALICE  a one-time login link for alice (NOOK_LOGIN_ALICE_PHONE for the phone run)
//   NOOK_LOGIN_BOB    the same for bob, who things are shared with (and _PHONE)
//   NOOK_SHOTS        where to write screenshots (docs/screenshots)
//   NOOK_PLAYWRIGHT   a node_modules holding playwright-core
// Exits non-zero, naming the step, on the first thing that does not work.
import { createRequire } from "node:module";
import path from "node:path";

const require = createRequire(path.join(process.env.NOOK_PLAYWRIGHT, "x.js"));
const { chromium } = require("playwright-core");

const URL_ = process.env.NOOK_URL;
// Every page opened, to show what each showed when something fails.
const pages = [];
const SHOTS = process.env.NOOK_SHOTS;
const log = (...a) => console.log(new Date().toISOString().slice(11, 23), ...a);

async function signIn(browser, link, options) {
  const context = await browser.newContext({ ignoreHTTPSErrors: true, ...options });
  const page = await context.newPage();
  page.setDefaultTimeout(60_000);
  page.on("dialog", (d) => d.accept());
  page.on("pageerror", (e) => log("page error:", e.message));
  page.on("console", (m) => { if (m.type() === "error") log("console:", m.text()); });
  pages.push(page);
  await page.goto(link);
  await page.click("#sign-in");
  await page.waitForSelector("text=Your VMs");
  return { context, page };
}

// The terminal's text, as xterm.js holds it.
async function screenText(page) {
  return page.evaluate(() => {
    const b = window.nookTerm.buffer.active;
    const lines = [];
    for (let i = 0; i < b.length; i++) lines.push(b.getLine(i).translateToString(true));
    return lines.join("\n");
  });
}

async function waitForScreen(page, needle, what) {
  const deadline = Date.now() + 60_000;
  for (;;) {
    const text = await screenText(page);
    if (text.includes(needle)) return text;
    if (Date.now() > deadline) throw new Error(`${what}: "${needle}" never appeared; screen:\n${text}`);
    await page.waitForTimeout(150);
  }
}

async function typeLine(page, line) {
  await page.locator("#terminal .xterm-helper-textarea").focus();
  await page.keyboard.type(line);
  await page.keyboard.press("Enter");
}

async function run(browser, { label, vm, viewport, loginAlice, loginBob }) {
  const device = viewport ? { viewport, isMobile: true, hasTouch: true, deviceScaleFactor: 2 } : { viewport: { width: 1280, height: 800 } };
  log(label, "sign in with a login link");
  const { context, page } = await signIn(browser, loginAlice, device);

  log(label, "create", vm);
  await page.fill("#new-vm input[name=name]", vm);
  await page.selectOption("#new-vm select[name=image]", "tiny");
  await page.click("#new-vm button");
  // Progress shows live, then the VM's own page.
  await page.waitForURL(`**/vm/${vm}`, { timeout: 120_000 });
  const state = await page.textContent("#vm-state");
  if (state.trim() !== "running") throw new Error(`${vm} is ${state} after create`);
  await page.screenshot({ path: path.join(SHOTS, `${label}-vm.png`), fullPage: true });

  log(label, "terminal: a command and its output");
  await page.click("#open-terminal");
  await page.waitForSelector("#term-status[data-state=connected]");
  await typeLine(page, "echo hello-$((6*7)) $$ > /tmp/pid; cat /tmp/pid");
  await waitForScreen(page, "hello-42", "command output");
  const pid = (await screenText(page)).match(/hello-42 (\d+)/)[1];

  log(label, "terminal: resize follows the window");
  const before = await page.evaluate(() => [window.nookTerm.cols, window.nookTerm.rows]);
  const size = page.viewportSize();
  await page.setViewportSize({ width: Math.round(size.width * 0.8), height: Math.round(size.height * 0.8) });
  await page.waitForFunction((b) => window.nookTerm.cols !== b[0] || window.nookTerm.rows !== b[1], before);
  const after = await page.evaluate(() => [window.nookTerm.cols, window.nookTerm.rows]);
  await typeLine(page, "clear; stty size");
  await waitForScreen(page, `${after[1]} ${after[0]}`, "stty size after the resize");
  await page.setViewportSize(size);

  log(label, "terminal: a reload reconnects to the same shell");
  await page.reload();
  await page.waitForSelector("#term-status[data-state=reconnected]");
  await typeLine(page, "echo same-$$");
  await waitForScreen(page, `same-${pid}`, "the same shell after a reconnect");

  log(label, "terminal: a large paste arrives whole");
  const lines = 2000;
  await typeLine(page, "cat > /tmp/paste");
  await page.evaluate((n) => {
    let text = "";
    for (let i = 0; i < n; i++) text += `line-${i}-${"x".repeat(40)}\r`;
    window.nookTerm.paste(text);
  }, lines);
  await page.keyboard.press("Control+D");
  await typeLine(page, "clear; wc -l < /tmp/paste | sed 's/^/count=/'");
  await waitForScreen(page, `count=${lines}`, "the pasted line count");
  // The app the VM serves, for sharing below: busybox httpd on 8000 (nook's default port
  // when 80 is closed).
  await typeLine(page, `mkdir -p /tmp/www && echo shared-${vm} > /tmp/www/index.html && httpd -p 8000 -h /tmp/www && clear`);
  await page.screenshot({ path: path.join(SHOTS, `${label}-terminal.png`) });

  log(label, "share by email and by link");
  await page.goto(`${URL_}/vm/${vm}`);
  await page.fill("#share-email input[name=email]", "bob@example.com");
  await page.click("#share-email button");
  await page.waitForSelector("ul.people >> text=bob@example.com");
  await page.click("#add-link button");
  const link = (await page.locator("#add-link output code").textContent()).trim();
  if (!link.includes("nook_share") && !link.includes("share")) throw new Error(`no share link: ${link}`);

  log(label, "bob opens it, by email share and by link, in a second browser");
  const bob = await signIn(browser, loginBob, device);
  await bob.page.goto(link);
  await bob.page.waitForSelector(`text=shared-${vm}`);
  await bob.page.goto(`${URL_}/`);
  await bob.page.waitForSelector(`text=${vm}`);
  await bob.context.close();

  log(label, "clone");
  await page.fill("#clone input[name=new]", `${vm}-copy`);
  await page.click("#clone button");
  await page.waitForSelector(`#clone output.done`, { timeout: 120_000 });
  await page.goto(`${URL_}/`);
  await page.waitForSelector(`li.vm[data-vm="${vm}-copy"]`);
  await page.screenshot({ path: path.join(SHOTS, `${label}-vms.png`), fullPage: true });

  log(label, "delete after confirming");
  for (let attempt = 1; ; attempt++) {
    await page.goto(`${URL_}/vm/${vm}-copy`);
    await page.click("#delete button");
    try {
      await page.waitForURL(`${URL_}/`, { timeout: 20_000 });
      break;
    } catch (err) {
      // This chromium runs on the nook host, where the deleted VM's tap going away is a
      // network change: chromium fails requests in flight then (ERR_NETWORK_CHANGED), so the
      // answer can be lost after the delete was done. What counts is the list; a delete that
      // never arrived is tried again.
      if (attempt === 3) throw err;
      log(label, "the delete's answer was lost; looking at the list");
      let gone = false;
      for (let look = 0; look < 10 && !gone; look++) {
        if (look) await page.waitForTimeout(1000);
        await page.goto(`${URL_}/`);
        gone = !(await page.locator(`li.vm[data-vm="${vm}-copy"]`).count());
      }
      if (gone) break;
    }
  }
  if (await page.locator(`li.vm[data-vm="${vm}-copy"]`).count()) throw new Error("the deleted VM is still listed");
  await context.close();
  log(label, "ok");
}

const browser = await chromium.launch({
  executablePath: process.env.NOOK_CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-dev-shm-usage"],
});
try {
  await run(browser, {
    label: "desktop", vm: "desk",
    loginAlice: process.env.NOOK_LOGIN_ALICE, loginBob: process.env.NOOK_LOGIN_BOB,
  });
  await run(browser, {
    label: "phone", vm: "phone", viewport: { width: 390, height: 844 },
    loginAlice: process.env.NOOK_LOGIN_ALICE_PHONE, loginBob: process.env.NOOK_LOGIN_BOB_PHONE,
  });
} catch (e) {
  console.error("FAILED:", e.stack || e);
  for (const p of pages) {
    if (p.isClosed()) continue;
    console.error(`--- ${p.url()} ---\n` + (await p.evaluate(() => document.body.innerText).catch(() => "?")));
  }
  process.exitCode = 1;
} finally {
  await browser.close();
}
