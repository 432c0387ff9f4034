#!/usr/bin/env python3
"""The coding agent's own overhead, each beside its baseline, from one run (bench/agent.sh):

1. A tool round trip: the model (tests/fake-llm/scripted_model.py, zero think time) answers
   with a `bash true` tool call; the time from its answer's last byte to the next request
   (carrying the tool's result) arriving at the model. That is nook's whole harness: reading
   the stream, keeping the events, running the command in the VM through the guest agent,
   building the next request, and the LLM gateway both ways. Baseline: `ssh VM@HOST true`
   with the real OpenSSH client (a new connection each time, as a user would run it).
2. Chat delivery: the time from the model sending a text delta to an SSE client of the chat
   (`/vm/NAME/agent/ID/events` through the HTTPS edge, what the browser's EventSource reads)
   receiving it. Both ends run on this machine, so their clocks are one.

Standard library only.
"""
import http.client
import json
import os
import socket
import ssl
import subprocess
import threading
import time

PORT = int(os.environ["BENCH_HTTPS_PORT"])
SSH_PORT = os.environ["BENCH_SSH_PORT"]
MODEL = int(os.environ["BENCH_MODEL_PORT"])
LOGIN = os.environ["BENCH_LOGIN_TOKEN"]
KEY = os.environ["BENCH_KEY"]
VM = os.environ.get("BENCH_VM", "bench")
CALLS = int(os.environ.get("BENCH_ROUNDS", "50"))
RUNS = 4
DELTAS = 300
HOST = "nook.localhost"
CTX = ssl.create_default_context(cafile=os.environ["BENCH_CA"])
CTX.set_alpn_protocols(["http/1.1"])
SSH = ["ssh", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
       "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes", "-o", "LogLevel=ERROR",
       "-i", KEY, "-p", SSH_PORT]


def model(method, path, body=None):
    c = http.client.HTTPConnection("127.0.0.1", MODEL)
    c.request(method, path, body=json.dumps(body) if body is not None else None)
    r = c.getresponse()
    return json.loads(r.read())


def script(steps):
    assert model("POST", "/__script", {"steps": steps})["ok"]


def lobby(*args):
    out = subprocess.run(SSH + ["lobby@127.0.0.1", *args], capture_output=True, text=True)
    assert out.returncode == 0, (args, out.stdout, out.stderr)
    return out.stdout


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def report(name, xs):
    print(f"  {name:<48} p50 {pct(xs, 50):8.2f} ms   p99 {pct(xs, 99):8.2f} ms   (n={len(xs)})")


def tool_round_trips():
    out = []
    conversation = None
    for _ in range(RUNS):
        script([{"reply": [{"tool": "bash", "input": {"command": "true"}}], "repeat": CALLS},
                {"reply": [{"text": "done"}]}])
        args = ["agent", "prompt", VM]
        if conversation:
            args += ["--conversation", conversation]
        args += ["--no-wait", "--json", "go"]
        conversation = json.loads(lobby(*args))["conversation"]
        deadline = time.time() + 600
        while model("GET", "/__log")["remaining"] > 0 or not lobby_idle(conversation):
            assert time.time() < deadline, "the agent never finished"
            time.sleep(0.2)
        log = model("GET", "/__log")
        assert not log["failures"], log["failures"]
        reqs = log["requests"]
        for a, b in zip(reqs, reqs[1:]):
            out.append((b["at"] - a["replied_at"]) * 1000)
    return out, conversation


def lobby_idle(conversation):
    convs = json.loads(lobby("agent", "ls", VM, "--json"))
    return any(c["id"] == conversation and c["state"] == "idle" for c in convs)


def ssh_true(n):
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        r = subprocess.run(SSH + [f"{VM}@127.0.0.1", "true"], capture_output=True)
        out.append((time.perf_counter() - t0) * 1000)
        assert r.returncode == 0, r.stderr
    return out


def conn():
    s = socket.create_connection(("127.0.0.1", PORT))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    c = http.client.HTTPSConnection("127.0.0.1", PORT, context=CTX)
    c.sock = CTX.wrap_socket(s, server_hostname=HOST)
    return c


def login_cookie():
    c = conn()
    c.request("POST", "/__nook/login", body=f"token={LOGIN}".encode(), headers={
        "Host": f"{HOST}:{PORT}", "Origin": f"https://{HOST}:{PORT}",
        "Content-Type": "application/x-www-form-urlencoded"})
    r = c.getresponse()
    r.read()
    cookies = [v.split(";")[0] for k, v in r.getheaders() if k.lower() == "set-cookie"]
    assert cookies, (r.status, r.getheaders())
    return "; ".join(cookies)


def chat_delivery(conversation):
    """Opens the chat's stream, then has the model stream DELTAS text deltas into it."""
    last = json.loads(lobby("agent", "ls", VM, "--json"))
    last = next(c["events"] for c in last if c["id"] == conversation)
    c = conn()
    c.request("GET", f"/vm/{VM}/agent/{conversation}/events", headers={
        "Host": f"{HOST}:{PORT}", "Cookie": login_cookie(), "Last-Event-ID": str(last)})
    r = c.getresponse()
    assert r.status == 200, (r.status, r.read())
    received = []
    done = threading.Event()

    def read():
        while not done.is_set():
            line = r.readline()
            if not line:
                return
            if line.startswith(b"data: "):
                e = json.loads(line[6:])
                if e["type"] == "text":
                    received.append((time.time(), e["delta"]))
                elif e["type"] == "turn_end":
                    done.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    script([{"reply": [{"text": " ".join(f"w{i}" for i in range(DELTAS * 3))}], "delta_delay_ms": 5}])
    lobby("agent", "prompt", VM, "--conversation", conversation, "--no-wait", "--json", "talk")
    assert done.wait(120), "the turn never ended on the stream"
    sent = model("GET", "/__log")["requests"][0]["deltas"]
    assert [t for _, t in sent] == [t for _, t in received], "the stream lost or reordered deltas"
    return [(rt - st) * 1000 for (st, _), (rt, _) in zip(sent, received)]


def main():
    print(f"Agent harness overhead ({RUNS} runs of {CALLS} `bash true` calls; model think time 0)")
    trips, conversation = tool_round_trips()
    ssh = ssh_true(CALLS)
    report("tool round trip: tool_use end -> result at model", trips)
    report("ssh VM@HOST true (OpenSSH, new connection)", ssh)
    print(f"  ratio (p50): {pct(trips, 50) / pct(ssh, 50):.2f}x of a plain ssh command")
    delays = chat_delivery(conversation)
    report("chat delivery: model delta -> SSE client", delays)


if __name__ == "__main__":
    main()
