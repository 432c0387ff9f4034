// End-to-end: the coding agent's chat page in a real browser (Playwright driving Debian's
// chromium), at a desktop size and at a 390x844 phone size. Run by
// crates/nook/tests/web_agent.rs, which starts nook with a scripted model playing the agent's
// side, and passes, in the environment:
//   NOOK_URL            https://nook.localhost:PORT
//   NOOK_LOGIN_DESKTOP  a one-time login link for alice (NOOK_LOGIN_PHONE for the phone run)
//   NOOK_CHAT           JSON: what the user types and the model answers, as scripted there
//                       ({build, firstWords, done, wait, goOn, continuing}), and the
//                       model's pause between the pieces of its last words (deltaDelayMs)
//   NOOK_SHOTS          where to write screenshots (docs/screenshots)
//   NOOK_PLAYWRIGHT     a node_modules holding playwright-core
// Exits non-zero, naming the step, on the first thing that does not work.
import { createRequire } from "node:module";
import path from "node:path";

const require = createRequire(path.join(process.env.NOOK_PLAYWRIGHT, "x.js"));
const { chromium } = require("playwright-core");

const CHAT = JSON.parse(process.env.NOOK_CHAT);
const SHOTS = process.env.NOOK_SHOTS;
// Every page opened, to show what each showed when something fails.
const pages = [];
const log = (...a) => console.log(new Date().toISOString().slice(11, 23), ...a);

function check(ok, what) {
  if (!ok) throw new Error(what);
}

// Runs in every page before its scripts: records each text the chat's last assistant
// message has had, and when. Words streamed in show as several texts over time; a message
// replayed from history all but at once.
function recordAssistantTexts() {
  window.nookTexts = [];
  document.addEventListener("DOMContentLoaded", () => {
    const chat = document.getElementById("chat-log");
    if (!chat) return;
    new MutationObserver(() => {
      const all = chat.querySelectorAll("li.msg.assistant");
      const text = all.length ? all[all.length - 1].textContent : "";
      const last = window.nookTexts[window.nookTexts.length - 1];
      if (text && (!last || last.text !== text)) window.nookTexts.push({ text, at: performance.now() });
    }).observe(chat, { childList: true, subtree: true, characterData: true });
  });
}

async function signIn(browser, link, options) {
  const context = await browser.newContext({ ignoreHTTPSErrors: true, ...options });
  await context.addInitScript(recordAssistantTexts);
  const page = await context.newPage();
  page.setDefaultTimeout(60_000);
  page.on("pageerror", (e) => log("page error:", e.message));
  page.on("console", (m) => { if (m.type() === "error") log("console:", m.text()); });
  pages.push(page);
  await page.goto(link);
  await page.click("#sign-in");
  await page.waitForSelector("text=Your VMs");
  return { context, page };
}

// Waits for `fn(arg)` to hold in the page; `what` names it when it never does.
async function waitUntil(page, what, fn, arg, timeout = 60_000) {
  try {
    await page.waitForFunction(fn, arg, { timeout });
  } catch (e) {
    throw new Error(`${what}: never happened (${e.message.split("\n")[0]})`);
  }
}

// The end of a turn whose last words are `text`.
async function waitTurnEnd(page, text, what) {
  await waitUntil(page, what, (t) =>
    document.getElementById("agent").dataset.state === "idle" &&
    [...document.querySelectorAll("#chat-log li.msg.assistant")].some((li) => li.textContent === t),
  text, 120_000);
}

// The chat as the user sees it, in order: each item's kind, text and whether it is open.
async function chatItems(page) {
  return page.$$eval("#chat-log > li", (lis) => lis.map((li) => {
    const s = li.querySelector("summary");
    const t = li.querySelector(".text");
    return {
      kind: li.className,
      text: (s || t || li).textContent.trim(),
      open: !!li.querySelector("details[open]"),
    };
  }));
}

// `text` arrived word by word while the page watched, rather than all at once.
async function checkStreamed(page, text, what) {
  const seen = await page.evaluate(() => window.nookTexts);
  const parts = seen.filter((s) => text.startsWith(s.text));
  const whole = parts.find((s) => s.text === text);
  const ms = whole ? Math.round(whole.at - parts[0].at) : 0;
  check(
    whole && parts.length >= 3 && ms >= 3 * CHAT.deltaDelayMs,
    `${what}: the reply did not stream in; the page showed ` +
      JSON.stringify(parts.map((s) => [Math.round(s.at), s.text.length])),
  );
  return `${parts.length} parts over ${ms} ms`;
}

// The whole chat, as in a window tall enough to hold it: a plain full-page capture keeps the
// sticky prompt box where it sits in the real window, over the middle of the chat.
async function screenshotWhole(page, file) {
  const size = page.viewportSize();
  const height = await page.evaluate(() => document.documentElement.scrollHeight);
  await page.setViewportSize({ width: size.width, height });
  await page.screenshot({ path: path.join(SHOTS, file), fullPage: true });
  await page.setViewportSize(size);
}

// The agent's screenshot, inline in the chat: the whole 1280-wide PNG, fitted to the chat.
async function checkScreenshot(page, what) {
  const shot = page.locator("#chat-log li.tool img.shot");
  check((await shot.count()) === 1, `${what}: ${await shot.count()} screenshots in the chat, not 1`);
  await shot.scrollIntoViewIfNeeded();
  await waitUntil(page, `${what}: the screenshot loads`, () => document.querySelector("img.shot").complete);
  const img = await shot.evaluate((i) => ({
    natural: i.naturalWidth,
    shown: i.getBoundingClientRect().width,
    chat: document.getElementById("chat-log").getBoundingClientRect().width,
  }));
  check(await shot.isVisible(), `${what}: the screenshot is not visible`);
  check(img.natural === 1280, `${what}: the screenshot is ${img.natural} px wide, not 1280`);
  check(img.shown > 0 && img.shown <= img.chat + 1, `${what}: the screenshot shows ${img.shown} px wide in a ${img.chat} px chat`);
}

// Nothing sticks out sideways: the page never scrolls horizontally (phones especially).
async function checkFits(page, what) {
  const w = await page.evaluate(() => [document.documentElement.scrollWidth, window.innerWidth]);
  check(w[0] <= w[1], `${what}: the page is ${w[0]} px wide in a ${w[1]} px window`);
}

async function run(browser, { label, vm, device, login }) {
  log(label, "sign in with a login link");
  const { context, page } = await signIn(browser, login, device);

  log(label, "create", vm, "with a prompt: the chat opens");
  await page.fill("#new-vm input[name=name]", vm);
  await page.selectOption("#new-vm select[name=image]", "tiny");
  await page.fill("#new-vm textarea[name=prompt]", CHAT.build);
  await page.click("#new-vm button");
  await page.waitForURL((u) => u.pathname === `/vm/${vm}/agent` && u.searchParams.has("c"), { timeout: 120_000 });
  const conversation = new URL(page.url()).searchParams.get("c");
  const shown = await page.getAttribute("#agent", "data-conversation");
  check(shown === conversation, `the chat shows conversation ${shown}, the URL says ${conversation}`);

  log(label, "the first turn streams in");
  const user = page.locator("#chat-log li.msg.user").first();
  await user.waitFor();
  check((await user.locator(".text").textContent()) === CHAT.build, `the user's message reads ${await user.textContent()}`);
  check((await user.locator(".who").textContent()).includes("@"), "the user's message does not say who sent it");
  await page.locator("#chat-log li.msg.assistant", { hasText: CHAT.firstWords }).waitFor();
  await waitTurnEnd(page, CHAT.done, "the first turn's end");
  log(label, "its last words:", await checkStreamed(page, CHAT.done, "the first turn's last words"));

  const badge = (await page.textContent("#agent .convs a.current .state")).trim();
  check(badge === "idle", `the conversation list says the finished conversation is ${badge}`);

  log(label, "tool calls, collapsed, with what they did");
  const items = await chatItems(page);
  const kinds = items.map((i) => i.kind);
  const expected = ["msg user", "msg assistant", "tool ok", "tool ok", "tool ok", "tool ok", "tool ok", "msg assistant"];
  check(JSON.stringify(kinds) === JSON.stringify(expected), `the chat holds ${JSON.stringify(kinds)}`);
  const tools = items.filter((i) => i.kind.startsWith("tool"));
  const summaries = ["todo", "write www/index.html", "shell exec busybox httpd", "browser navigate http://localhost:8000/", "browser screenshot"];
  tools.forEach((t, i) => {
    check(t.text.startsWith(summaries[i]), `tool ${i + 1} is summarized as "${t.text}", not "${summaries[i]}…"`);
    check(!t.open, `tool ${i + 1} (${t.text}) is open; tool calls start collapsed`);
  });
  const write = page.locator("#chat-log li.tool", { hasText: "www/index.html" });
  await write.locator("summary").click();
  const output = write.locator("pre.output");
  await output.waitFor({ state: "visible" });
  check((await output.textContent()).includes("wrote www/index.html"), `write's output reads ${await output.textContent()}`);
  await write.locator("summary").click();
  await output.waitFor({ state: "hidden" });

  log(label, "the screenshot inline, and the checklist");
  await checkScreenshot(page, "after the first turn");
  const todo = page.locator("#todo");
  check(await todo.isVisible(), "the checklist is hidden");
  const todoText = await todo.textContent();
  for (const t of ["write the page", "serve it on port 8000", "look at it"]) {
    check(todoText.includes(t), `the checklist lacks "${t}": ${todoText}`);
  }
  check((await todo.locator("li.done").count()) === 1, "the checklist does not show the one item done");
  await checkFits(page, "after the first turn");
  await screenshotWhole(page, `${label}-agent.png`);

  log(label, "a reload replays the conversation");
  await page.reload();
  await waitTurnEnd(page, CHAT.done, "the replayed turn");
  await waitUntil(page, "the whole chat replayed", (n) => document.querySelectorAll("#chat-log > li").length >= n, items.length);
  const replayed = await chatItems(page);
  check(JSON.stringify(replayed) === JSON.stringify(items),
    `after a reload the chat holds\n${JSON.stringify(replayed)}\nnot\n${JSON.stringify(items)}`);
  await checkScreenshot(page, "after a reload");
  check(await page.locator("#todo").isVisible(), "the checklist is hidden after a reload");
  check(await page.locator("#chat-stop").isHidden(), "Stop shows while the agent is idle");

  log(label, "Stop during a long command");
  await page.fill("#chat-prompt", CHAT.wait);
  await page.click("#chat-send");
  await page.locator("#chat-log li.tool.running", { hasText: "sleep 60" }).waitFor();
  await page.locator("#chat-stop").waitFor({ state: "visible" });
  check((await page.inputValue("#chat-prompt")) === "", "the prompt box still holds the prompt sent");
  check(await page.isDisabled("#chat-send"), "Send is enabled while the agent works");
  await page.click("#chat-stop");
  await page.waitForSelector("#agent[data-state=idle]");
  await page.locator("#chat-log li.note", { hasText: "Stopped." }).waitFor();
  check(await page.locator("#chat-stop").isHidden(), "Stop still shows after the turn stopped");
  check(await page.isEnabled("#chat-send"), "Send is disabled after the turn stopped");
  const stuck = await page.locator("#chat-log li.tool.running").count();
  check(stuck === 0, `${stuck} stopped tool call(s) still show as running`);

  log(label, "a turn after the stop");
  await page.fill("#chat-prompt", CHAT.goOn);
  await page.click("#chat-send");
  await waitTurnEnd(page, CHAT.continuing, "the turn after the stop");
  log(label, "the reply:", await checkStreamed(page, CHAT.continuing, "the reply after the stop"));
  const errors = await page.locator("#chat-log li.error").allTextContents();
  check(errors.length === 0, `the chat shows errors: ${errors.join(" | ")}`);
  await checkFits(page, "at the end");
  await context.close();
  log(label, "ok");
}

const browser = await chromium.launch({
  executablePath: process.env.NOOK_CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-dev-shm-usage"],
});
try {
  await run(browser, {
    label: "desktop", vm: "hello-desk", login: process.env.NOOK_LOGIN_DESKTOP,
    device: { viewport: { width: 1280, height: 800 } },
  });
  await run(browser, {
    label: "phone", vm: "hello-phone", login: process.env.NOOK_LOGIN_PHONE,
    device: { viewport: { width: 390, height: 844 }, isMobile: true, hasTouch: true, deviceScaleFactor: 2 },
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
