// The web terminal: xterm.js over a WebSocket to a pty in the VM. A dropped connection
// reconnects to the same shell (it waits for us a while), and the screen is redrawn from
// what the shell printed meanwhile.
"use strict";

(function () {
  const el = document.getElementById("terminal");
  const status = document.getElementById("term-status");
  const vm = el.dataset.vm;
  const term = new Terminal({ cursorBlink: true, fontSize: 14, scrollback: 5000 });
  const fit = new FitAddon.FitAddon();
  term.loadAddon(fit);
  term.open(el);
  fit.fit();
  window.nookTerm = term; // for tests and the curious

  const key = "nook-term-" + vm;
  let ws = null, exited = false, delay = 250;
  const enc = new TextEncoder();
  const PASTE_CHUNK = 256 * 1024;

  function setStatus(text) {
    status.textContent = text;
    status.dataset.state = text;
  }

  function send(obj) {
    if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify(obj));
  }

  function connect() {
    const session = sessionStorage.getItem(key);
    const q = new URLSearchParams({ cols: term.cols, rows: term.rows });
    if (session) q.set("session", session);
    const url = (location.protocol === "https:" ? "wss://" : "ws://") + location.host +
      "/vm/" + encodeURIComponent(vm) + "/terminal?" + q;
    ws = new WebSocket(url);
    ws.binaryType = "arraybuffer";
    ws.onmessage = (m) => {
      if (typeof m.data !== "string") {
        term.write(new Uint8Array(m.data));
        return;
      }
      const msg = JSON.parse(m.data);
      if (msg.session) {
        sessionStorage.setItem(key, msg.session);
        delay = 250;
        setStatus(msg.resumed ? "reconnected" : "connected");
        if (msg.resumed) term.reset();
        send({ r: [term.cols, term.rows] });
      } else if ("exit" in msg) {
        exited = true;
        sessionStorage.removeItem(key);
        setStatus("exited (" + msg.exit + ")");
      }
    };
    ws.onclose = (e) => {
      if (exited) return;
      if (e.code === 1006 && !sessionStorage.getItem(key) && delay > 8000) {
        setStatus("can't connect");
        return;
      }
      setStatus("reconnecting…");
      setTimeout(connect, delay);
      delay = Math.min(delay * 2, 10000);
    };
  }

  term.onData((data) => {
    // A big paste goes in pieces, each well under the server's frame limit.
    for (let i = 0; i < data.length; i += PASTE_CHUNK) send({ d: data.slice(i, i + PASTE_CHUNK) });
  });
  term.onResize(({ cols, rows }) => send({ r: [cols, rows] }));
  window.addEventListener("resize", () => fit.fit());
  for (const b of document.querySelectorAll("#term-keys [data-key]")) {
    b.addEventListener("click", () => {
      send({ d: JSON.parse('"' + b.dataset.key + '"') });
      term.focus();
    });
  }
  void enc;
  connect();
  term.focus();
})();
