#!/usr/bin/env python3
"""The web's two latencies, each beside its baseline, from one run (called by bench/web.sh):

1. `ls` through the HTTPS API (POST /api/exec, an API token) against `ssh HOST ls` (the SSH
   lobby). Cold: a new connection per call, as `curl` and `ssh` each make. Warm: one
   keep-alive HTTPS connection, as an SDK or script would keep.
2. Keystroke echo in the web terminal (a WebSocket to a pty in the VM) against the same in
   `ssh -tt VM@HOST`: the time from sending one key to seeing it echoed.

Standard library only; the WebSocket client is the few lines RFC 6455 needs.
"""
import base64
import http.client
import json
import os
import pty
import select
import socket
import ssl
import statistics
import struct
import subprocess
import time

PORT = int(os.environ["BENCH_HTTPS_PORT"])
SSH_PORT = os.environ["BENCH_SSH_PORT"]
TOKEN = os.environ["BENCH_TOKEN"]
LOGIN = os.environ["BENCH_LOGIN_TOKEN"]
KEY = os.environ["BENCH_KEY"]
VM = os.environ.get("BENCH_VM", "bench")
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "50"))
KEYS = int(os.environ.get("BENCH_KEYS", "200"))
HOST = "nook.localhost"
CTX = ssl.create_default_context(cafile=os.environ["BENCH_CA"])
CTX.set_alpn_protocols(["http/1.1"])
SSH = ["ssh", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
       "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes", "-o", "LogLevel=ERROR",
       "-i", KEY, "-p", SSH_PORT]


def tcp():
    # As curl and browsers do: without it, a request whose head and body go in two writes
    # waits out the server's delayed ACK (40 ms) on every call.
    s = socket.create_connection(("127.0.0.1", PORT))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def conn():
    c = http.client.HTTPSConnection("127.0.0.1", PORT, context=CTX)
    c.sock = CTX.wrap_socket(tcp(), server_hostname=HOST)
    return c


def api_ls(c):
    c.request("POST", "/api/exec", body=b"ls --json",
              headers={"Host": f"{HOST}:{PORT}", "Authorization": f"Bearer {TOKEN}"})
    r = c.getresponse()
    body = r.read()
    assert r.status == 200, (r.status, body)
    return body


def timed(f, n):
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        f()
        out.append((time.perf_counter() - t0) * 1000)
    return out


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def report(name, xs):
    print(f"  {name:<44} p50 {pct(xs, 50):8.2f} ms   p99 {pct(xs, 99):8.2f} ms   (n={len(xs)})")


def ws_connect(cookie):
    s = CTX.wrap_socket(tcp(), server_hostname=HOST)
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall((f"GET /vm/{VM}/terminal?cols=80&rows=24 HTTP/1.1\r\nHost: {HOST}:{PORT}\r\n"
               f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
               f"Sec-WebSocket-Version: 13\r\nOrigin: https://{HOST}:{PORT}\r\nCookie: {cookie}\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += s.recv(1)
    assert b" 101 " in head.split(b"\r\n")[0], head
    return s


def ws_send_text(s, text):
    data = text.encode()
    mask = os.urandom(4)
    n = len(data)
    hdr = bytes([0x81]) + (bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + struct.pack(">H", n))
    s.sendall(hdr + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data)))


def ws_recv(s):
    def exact(n):
        b = b""
        while len(b) < n:
            chunk = s.recv(n - len(b))
            if not chunk:
                raise EOFError
            b += chunk
        return b
    b0, b1 = exact(2)
    n = b1 & 0x7F
    if n == 126:
        n = struct.unpack(">H", exact(2))[0]
    elif n == 127:
        n = struct.unpack(">Q", exact(8))[0]
    return b0 & 0x0F, exact(n)


def login_cookie():
    c = conn()
    body = f"token={LOGIN}".encode()
    c.request("POST", "/__nook/login", body=body, headers={
        "Host": f"{HOST}:{PORT}", "Origin": f"https://{HOST}:{PORT}",
        "Content-Type": "application/x-www-form-urlencoded"})
    r = c.getresponse()
    r.read()
    cookies = [v.split(";")[0] for k, v in r.getheaders() if k.lower() == "set-cookie"]
    assert cookies, (r.status, r.getheaders())
    return "; ".join(cookies)


def web_echo():
    s = ws_connect(login_cookie())
    op, hello = ws_recv(s)
    assert b"session" in hello, hello
    time.sleep(1.0)  # let the shell print its prompt
    s.setblocking(True)
    out = []
    for i in range(KEYS):
        ch = "a"
        t0 = time.perf_counter()
        ws_send_text(s, json.dumps({"d": ch}))
        while True:
            op, data = ws_recv(s)
            if op == 2 and b"a" in data:
                break
        out.append((time.perf_counter() - t0) * 1000)
        if i % 50 == 49:
            ws_send_text(s, json.dumps({"d": "\x15"}))  # ^U: clear the line
            time.sleep(0.05)
            s.settimeout(0.2)
            try:
                while True:
                    ws_recv(s)
            except (socket.timeout, ssl.SSLError, TimeoutError):
                pass
            s.settimeout(None)
    s.close()
    return out


def ssh_echo():
    pid, fd = pty.fork()
    if pid == 0:
        os.execvp("ssh", SSH + ["-tt", f"{VM}@127.0.0.1"])
    time.sleep(3.0)  # connect and print the prompt
    while select.select([fd], [], [], 0.2)[0]:
        os.read(fd, 65536)
    out = []
    for i in range(KEYS):
        t0 = time.perf_counter()
        os.write(fd, b"a")
        buf = b""
        while b"a" not in buf:
            select.select([fd], [], [])
            buf += os.read(fd, 65536)
        out.append((time.perf_counter() - t0) * 1000)
        if i % 50 == 49:
            os.write(fd, b"\x15")
            time.sleep(0.05)
            while select.select([fd], [], [], 0.2)[0]:
                os.read(fd, 65536)
    os.write(fd, b"\x15exit\r")
    time.sleep(0.3)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    return out


def main():
    print(f"ls: HTTPS API vs SSH lobby ({ROUNDS} calls each)")
    cold = timed(lambda: api_ls(conn()), ROUNDS)
    c = conn()
    api_ls(c)
    warm = timed(lambda: api_ls(c), ROUNDS)
    lobby = timed(lambda: subprocess.run(SSH + ["lobby@127.0.0.1", "ls", "--json"],
                                         check=True, capture_output=True), ROUNDS)
    report("API ls, new connection each (curl-like)", cold)
    report("API ls, one keep-alive connection", warm)
    report("lobby 'ssh HOST ls --json' (baseline)", lobby)
    print(f"  ratio API cold / lobby (p50): {pct(cold, 50) / pct(lobby, 50):.3f}")
    print(f"  ratio API warm / lobby (p50): {pct(warm, 50) / pct(lobby, 50):.3f}")
    print(f"keystroke echo: web terminal vs ssh -tt {VM}@HOST ({KEYS} keys each)")
    web = web_echo()
    ssh = ssh_echo()
    report("web terminal (WebSocket)", web)
    report("ssh -tt VM@HOST (baseline)", ssh)
    print(f"  ratio web / ssh: p50 {pct(web, 50) / pct(ssh, 50):.2f}, p99 {pct(web, 99) / pct(ssh, 99):.2f}")


if __name__ == "__main__":
    main()
