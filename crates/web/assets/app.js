// nook's dashboard: every action is a lobby command sent to POST /api/exec, the same
// command language as `ssh HOST CMD`. Forms carry it as data-argv, a JSON array whose
// "{field}" words are filled from the form's inputs (a word whose field is empty is left out).
"use strict";

function fill(template, form) {
  const argv = [];
  for (const word of JSON.parse(template)) {
    let empty = false;
    const filled = word.replace(/\{(\w+)\}/g, (_, name) => {
      const el = form.elements[name];
      const v = el ? el.value.trim() : "";
      if (!v) empty = true;
      return v;
    });
    if (!empty) argv.push(filled);
  }
  return argv;
}

// Runs argv; calls onStep for each step of a long command; resolves to {exit, stdout, stderr}.
// The command is an operation on the server: if the connection drops (a phone changing
// networks, or Chromium dropping requests when the machine's network changes), this picks
// the stream up again where it stopped, from GET /api/ops/ID.
async function exec(argv, onStep) {
  const result = { exit: null, stdout: "", stderr: "" };
  let op = null, last = 0;
  const read = async (resp) => {
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buf += decoder.decode(value, { stream: true });
      let at;
      while ((at = buf.indexOf("\n\n")) >= 0) {
        const block = buf.slice(0, at);
        buf = buf.slice(at + 2);
        const event = (block.match(/^event: (.*)$/m) || [])[1];
        const id = (block.match(/^id: (\d+)$/m) || [])[1];
        const data = JSON.parse((block.match(/^data: (.*)$/m) || [, "{}"])[1]);
        if (id) last = Number(id);
        if (event === "op") op = data.id;
        else if (event === "step") onStep(data.step);
        else if (event === "stdout") result.stdout += data.text;
        else if (event === "stderr") result.stderr += data.text;
        else if (event === "exit") result.exit = data.exit;
      }
    }
  };
  let resp;
  try {
    resp = await fetch("/api/exec", {
      method: "POST",
      headers: { "Content-Type": "application/json", "Accept": "text/event-stream" },
      body: JSON.stringify({ argv }),
    });
    if (!resp.ok || !resp.body) return { exit: 1, stdout: "", stderr: await resp.text() };
    await read(resp);
  } catch (err) {
    if (!op) return { exit: 1, stdout: "", stderr: "The connection failed: " + err };
  }
  for (let tries = 0; result.exit === null && op && tries < 30; tries++) {
    onStep("reconnecting");
    await new Promise((r) => setTimeout(r, Math.min(250 * 2 ** tries, 3000)));
    try {
      resp = await fetch("/api/ops/" + op, { headers: { "Accept": "text/event-stream", "Last-Event-ID": String(last) } });
      if (resp.status === 404) break;
      if (resp.ok && resp.body) await read(resp);
    } catch (_) { /* try again */ }
  }
  if (result.exit === null) return { exit: 1, stdout: result.stdout, stderr: result.stderr + "\nLost track of the command; reload to see where it got." };
  return result;
}

function errorOf(stderr) {
  for (const line of stderr.split("\n").reverse()) {
    try {
      const e = JSON.parse(line);
      if (e.error) return e.error.message;
    } catch (_) { /* not JSON */ }
  }
  try {
    const e = JSON.parse(stderr);
    if (e.error) return e.error.message;
  } catch (_) { /* not JSON */ }
  return stderr.trim() || "failed";
}

function show(out, cls, text) {
  out.className = cls;
  out.textContent = text;
}

async function copy(text, button) {
  try {
    await navigator.clipboard.writeText(text);
  } catch (_) {
    // Without clipboard access (plain http, old browsers): select it for the user to copy.
    window.prompt("Copy this:", text);
  }
  const label = button.textContent;
  button.textContent = "Copied";
  setTimeout(() => { button.textContent = label; }, 1500);
}

document.addEventListener("click", (e) => {
  const b = e.target.closest("[data-copy]");
  if (b) copy(b.dataset.copy, b);
});

document.addEventListener("submit", async (e) => {
  const form = e.target.closest("form.cmd");
  if (!form) return;
  e.preventDefault();
  if (form.dataset.confirm && !window.confirm(form.dataset.confirm)) return;
  const out = form.querySelector("output");
  const button = form.querySelector("button");
  const argv = fill(form.dataset.argv, form);
  button.disabled = true;
  show(out, "progress", "…");
  let result;
  try {
    result = await exec(argv, (step) => show(out, "progress", step + "…"));
  } catch (err) {
    result = { exit: 1, stdout: "", stderr: String(err) };
  }
  button.disabled = false;
  if (result.exit !== 0) {
    show(out, "error", errorOf(result.stderr));
    return;
  }
  let value = null;
  try { value = JSON.parse(result.stdout); } catch (_) { /* text */ }
  if (value && value.agent && value.agent.url) {
    // `new --prompt`: the agent is at work; its chat is where to look.
    window.location.assign(new URL(value.agent.url).pathname + new URL(value.agent.url).search);
  } else if (form.dataset.go) {
    const go = form.dataset.go.replace(/\{(\w+)\}/g, (_, name) => {
      const el = form.elements[name];
      return encodeURIComponent((el && el.value.trim()) || (value && (value.name || (value.vm && value.vm.name))) || "");
    });
    window.location.assign(go);
  } else if (form.dataset.show !== undefined) {
    const key = form.dataset.show;
    const text = key && value && value[key] ? value[key] : summary(value, result.stdout);
    out.className = "done";
    out.textContent = "";
    const code = document.createElement("code");
    code.textContent = text;
    const copyButton = document.createElement("button");
    copyButton.type = "button";
    copyButton.textContent = "Copy";
    copyButton.dataset.copy = text;
    out.append(code, " ", copyButton);
  } else if (form.dataset.then === "reload") {
    window.location.reload();
  } else {
    show(out, "done", "Done");
  }
}, true);

function summary(value, raw) {
  if (value && value.vm && value.vm.name) {
    const t = value.timings_ms || value.timings || {};
    const total = t.total !== undefined ? ` in ${t.total} ms` : "";
    return `${value.vm.name} is ${value.vm.state}${total}`;
  }
  if (value && value.code) return value.message || raw;
  return raw.trim();
}
