// The coding agent's chat. Prompts and stop are lobby commands (`agent prompt`, `agent stop`)
// sent with exec() from app.js; what the agent does arrives as numbered server-sent events,
// which EventSource resumes by itself (Last-Event-ID) after a dropped connection.
"use strict";

(() => {
  const root = document.getElementById("agent");
  if (!root) return;
  const vm = root.dataset.vm;
  let conversation = root.dataset.conversation || "";
  const log = document.getElementById("chat-log");
  const form = document.getElementById("chat-form");
  const prompt = document.getElementById("chat-prompt");
  const send = document.getElementById("chat-send");
  const stop = document.getElementById("chat-stop");
  const status = document.getElementById("chat-status");
  const todo = document.getElementById("todo");
  let source = null;
  let answer = null; // the assistant bubble text is streaming into
  const tools = new Map(); // tool call id -> its <details>
  const seen = new Set();

  function setRunning(running) {
    root.dataset.state = running ? "running" : "idle";
    stop.hidden = !running;
    send.disabled = running;
    status.textContent = running ? "working…" : "";
    status.className = running ? "progress" : "";
    document.querySelectorAll(".convs a.current .state").forEach((b) => { b.textContent = root.dataset.state; b.className = "state " + root.dataset.state; });
  }

  function item(cls) {
    const li = document.createElement("li");
    li.className = cls;
    log.appendChild(li);
    return li;
  }

  function nearBottom() {
    return window.innerHeight + window.scrollY >= document.body.scrollHeight - 120;
  }

  function summary(name, input) {
    for (const k of ["command", "path", "action", "url", "pattern", "unit", "selector"]) {
      if (input && typeof input[k] === "string") {
        const extra = k === "action" && input.url ? " " + input.url : "";
        return input[k].split("\n")[0].slice(0, 140) + extra;
      }
    }
    return "";
  }

  function render(e) {
    switch (e.type) {
      case "user": {
        answer = null;
        const li = item("msg user");
        const who = document.createElement("div");
        who.className = "who";
        who.textContent = e.by;
        const p = document.createElement("div");
        p.className = "text";
        p.textContent = e.text;
        li.append(who, p);
        setRunning(true);
        break;
      }
      case "text": {
        if (!answer) answer = item("msg assistant");
        answer.textContent += e.delta;
        break;
      }
      case "tool_call": {
        answer = null;
        const li = item("tool running");
        const d = document.createElement("details");
        const s = document.createElement("summary");
        const name = document.createElement("b");
        name.textContent = e.name;
        const what = document.createElement("span");
        what.textContent = " " + summary(e.name, e.input);
        s.append(name, what);
        const input = document.createElement("pre");
        input.className = "input";
        input.textContent = JSON.stringify(e.input, null, 2);
        d.append(s, input);
        li.appendChild(d);
        tools.set(e.id, li);
        break;
      }
      case "tool_result": {
        let li = tools.get(e.id);
        if (!li) li = item("tool");
        li.classList.remove("running");
        li.classList.add(e.ok ? "ok" : "failed");
        const d = li.querySelector("details") || li;
        const out = document.createElement("pre");
        out.className = "output";
        out.textContent = e.output;
        const ms = document.createElement("span");
        ms.className = "ms muted";
        ms.textContent = " " + (e.ms / 1000).toFixed(1) + " s" + (e.ok ? "" : " · failed");
        const s = d.querySelector("summary");
        if (s) s.appendChild(ms);
        d.appendChild(out);
        if (e.png) {
          // Inline, outside the collapsed part: the screenshot is the point.
          const img = document.createElement("img");
          img.className = "shot";
          img.alt = "screenshot";
          img.src = "data:image/png;base64," + e.png;
          li.appendChild(img);
        }
        break;
      }
      case "todo": {
        todo.hidden = false;
        todo.textContent = "";
        const h = document.createElement("b");
        h.textContent = "Checklist";
        const ul = document.createElement("ul");
        for (const t of e.items) {
          const li = document.createElement("li");
          li.className = t.done ? "done" : "";
          li.textContent = (t.done ? "☑ " : "☐ ") + t.text;
          ul.appendChild(li);
        }
        todo.append(h, ul);
        break;
      }
      case "compacted":
        item("note").textContent = "Older turns were compacted to fit the model's context (" + e.messages + " messages summarized).";
        break;
      case "notice":
        item("note").textContent = e.message;
        break;
      case "error":
        answer = null;
        item("error").textContent = e.message;
        break;
      case "usage":
        break;
      case "turn_end":
        answer = null;
        // A call the turn ended during (Stop) gets no result; it is not running any more.
        for (const li of log.querySelectorAll("li.tool.running")) li.classList.replace("running", "failed");
        if (e.reason === "stopped") item("note").textContent = "Stopped.";
        setRunning(false);
        break;
    }
  }

  function listen() {
    if (!conversation || source) return;
    source = new EventSource("/vm/" + encodeURIComponent(vm) + "/agent/" + encodeURIComponent(conversation) + "/events");
    source.onmessage = (m) => {
      // EventSource resumes from the last id it saw; the set is a second guard.
      if (seen.has(m.lastEventId)) return;
      seen.add(m.lastEventId);
      const stick = nearBottom();
      render(JSON.parse(m.data));
      if (stick) window.scrollTo(0, document.body.scrollHeight);
    };
    source.addEventListener("gone", (m) => {
      item("error").textContent = JSON.parse(m.data).message;
      source.close();
    });
  }

  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const text = prompt.value.trim();
    if (!text) return;
    send.disabled = true;
    status.className = "progress";
    status.textContent = "sending…";
    const argv = ["agent", "prompt", vm, "--no-wait", "--json"];
    if (conversation) argv.push("--conversation", conversation);
    argv.push("--", text);
    const r = await exec(argv, () => {});
    if (r.exit !== 0) {
      send.disabled = false;
      status.className = "error";
      status.textContent = errorOf(r.stderr);
      return;
    }
    prompt.value = "";
    const v = JSON.parse(r.stdout);
    if (!conversation) {
      conversation = v.conversation;
      root.dataset.conversation = conversation;
      const url = "/vm/" + encodeURIComponent(vm) + "/agent?c=" + encodeURIComponent(conversation);
      history.replaceState(null, "", url);
      // The new conversation joins the list, as the current one.
      const list = document.querySelector(".convs ul");
      if (list) {
        for (const a of list.querySelectorAll("a.current")) a.classList.remove("current");
        const li = document.createElement("li");
        const a = document.createElement("a");
        a.href = url;
        a.className = "current";
        const title = document.createElement("span");
        title.className = "title";
        title.textContent = text.split("\n")[0].slice(0, 80);
        const badge = document.createElement("span");
        badge.className = "state running";
        badge.textContent = "running";
        a.append(title, " ", badge);
        li.appendChild(a);
        list.appendChild(li);
      }
    }
    setRunning(true);
    listen();
  });

  prompt.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) form.requestSubmit();
  });

  stop.addEventListener("click", async () => {
    stop.disabled = true;
    const r = await exec(["agent", "stop", vm, conversation, "--json"], () => {});
    stop.disabled = false;
    if (r.exit !== 0) {
      status.className = "error";
      status.textContent = errorOf(r.stderr);
    }
  });

  setRunning(root.dataset.state === "running");
  listen();
})();
