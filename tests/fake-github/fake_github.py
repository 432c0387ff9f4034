#!/usr/bin/env python3
"""Fake GitHub for nook's tests (Python 3.11 standard library only).

nook's gateway injects the GitHub token into outgoing requests so that VMs never
hold it; this fake checks that the token arrives, and serves just enough of
GitHub for real `git` and simple REST clients.

Usage:
    python3 fake_github.py --port PORT --token TOKEN --repos DIR
                           [--log FILE] [--host HOST] [--verbose]

On start it prints exactly one line, "listening PORT", to stdout (PORT 0 picks
a free port and prints the one chosen).  Nothing else is written to stdout or
stderr unless --verbose is given (then an access log, tracebacks and the
stderr of `git http-backend` go to stderr).

Served on the same port:

1. Git smart HTTP for bare repositories DIR/<owner>/<repo>.git, through
   `git http-backend` run as a CGI, for paths
       /<owner>/<repo>.git/<anything>
       /<owner>/<repo>/(info/refs|git-upload-pack|git-receive-pack|HEAD|objects/...)
   (".git" is added to PATH_INFO when the client omitted it).  Every git
   request needs `Authorization: Basic base64(USER:TOKEN)` (any USER, e.g.
   x-access-token); otherwise 401 with `WWW-Authenticate: Basic realm="GitHub"`.
   Pushes are allowed.  Chunked and gzip-encoded request bodies are accepted.

2. A slice of the REST API at the root, needing `Authorization: Bearer TOKEN`
   or `Authorization: token TOKEN` (else 401 {"message":"Bad credentials",...}):
       GET /repos/<owner>/<repo>          repository summary, or 404
       GET /repos/<owner>/<repo>/commits  [{"sha", "commit": {"message"}}, ...]
                                          for the default branch (?sha=REF
                                          picks another ref)
       GET /user                          {"login": "nook-test"}
       anything else                      404 {"message": "Not Found"}

Every request appends one JSON line to --log FILE (written before the answer
is sent): {"method", "path", "query", "authorization_ok", "headers"} where
headers maps lowercased names to values and authorization_ok is the result of
the Basic check (git paths) or the Bearer/token check (everything else).
"""

import argparse
import base64
import binascii
import gzip
import json
import os
import re
import subprocess
import sys
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

NAME = r"[A-Za-z0-9_.-]+"
GIT_SERVICE_REST = re.compile(r"^(info/refs|git-upload-pack|git-receive-pack|HEAD|objects/.+)$")
GIT_DOTGIT_PATH = re.compile(r"^/(" + NAME + r")/(" + NAME + r")\.git(/.*)$")
GIT_PLAIN_PATH = re.compile(r"^/(" + NAME + r")/(" + NAME + r")/(.+)$")
REST_REPO = re.compile(r"^/repos/(" + NAME + r")/(" + NAME + r")$")
REST_COMMITS = re.compile(r"^/repos/(" + NAME + r")/(" + NAME + r")/commits$")

BAD_CREDENTIALS = {"message": "Bad credentials", "documentation_url": "https://docs.github.com/rest"}
NOT_FOUND = {"message": "Not Found"}

# Headers of the request that are not passed to the CGI as HTTP_*.
CGI_SKIP_HEADERS = {
    "authorization",
    "proxy-authorization",
    "content-type",
    "content-length",
    "content-encoding",  # the body is decoded before it reaches http-backend
    "transfer-encoding",
    "connection",
    "proxy-connection",
    "keep-alive",
    "te",
    "trailer",
    "upgrade",
    "expect",
}
# Headers of the CGI answer that this server decides itself.
CGI_DROP_RESPONSE_HEADERS = {"status", "content-length", "transfer-encoding", "connection", "keep-alive"}

READ_SIZE = 65536


class BadRequest(Exception):
    pass


def valid_name(name):
    return name not in (".", "..") and not name.startswith(".")


def git_config_env(extra):
    """Config given to every git we run: receive-pack on, any repo owner ok."""
    pairs = [("http.receivepack", "true"), ("safe.directory", "*")]
    env = dict(extra)
    env["GIT_CONFIG_COUNT"] = str(len(pairs))
    for i, (k, v) in enumerate(pairs):
        env["GIT_CONFIG_KEY_%d" % i] = k
        env["GIT_CONFIG_VALUE_%d" % i] = v
    return env


def base_env():
    env = {}
    for k, v in os.environ.items():
        # keep the environment of the test (PATH, HOME, ...) but nothing that
        # would point git at another repository or inject config
        if k.startswith("GIT_") or k in ("CONTENT_TYPE", "CONTENT_LENGTH", "QUERY_STRING", "PATH_INFO"):
            continue
        if k.startswith("HTTP_") or k in ("REQUEST_METHOD", "REMOTE_USER", "REMOTE_ADDR", "AUTH_TYPE"):
            continue
        env[k] = v
    return env


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "fake-github/1.0"
    sys_version = ""

    def version_string(self):
        return self.server_version

    # ---- plumbing -------------------------------------------------------------

    def log_message(self, fmt, *args):
        if self.server.verbose:
            sys.stderr.write("fake-github: %s - %s\n" % (self.address_string(), fmt % args))

    def finish(self):
        try:
            super().finish()
        except OSError:
            pass

    def read_body(self):
        te = (self.headers.get("Transfer-Encoding") or "").lower()
        if "chunked" in te:
            parts = []
            while True:
                line = self.rfile.readline(65537)
                if not line:
                    raise BadRequest("truncated chunked body")
                try:
                    size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                except ValueError:
                    raise BadRequest("bad chunk size")
                if size == 0:
                    while True:  # trailers up to the empty line
                        t = self.rfile.readline(65537)
                        if not t or t in (b"\r\n", b"\n"):
                            break
                    break
                data = self.rfile.read(size)
                if len(data) != size:
                    raise BadRequest("truncated chunk")
                parts.append(data)
                self.rfile.readline(65537)  # CRLF after the chunk
            return b"".join(parts)
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise BadRequest("bad Content-Length")
        if length <= 0:
            return b""
        data = self.rfile.read(length)
        if len(data) != length:
            raise BadRequest("truncated body")
        return data

    def write_log(self, path, query, auth_ok):
        log = self.server.log_path
        if not log:
            return
        entry = {
            "method": self.command,
            "path": path,
            "query": query,
            "authorization_ok": auth_ok,
            "headers": {k.lower(): v for k, v in self.headers.items()},
        }
        line = json.dumps(entry, ensure_ascii=False) + "\n"
        with self.server.log_lock:
            with open(log, "a", encoding="utf-8") as f:
                f.write(line)
                f.flush()

    def send_bytes(self, status, data, content_type, extra_headers=None):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for k, v in (extra_headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        self.wfile.flush()

    def send_json(self, status, obj, extra_headers=None):
        data = (json.dumps(obj) + "\n").encode("utf-8")
        self.send_bytes(status, data, "application/json; charset=utf-8", extra_headers)

    # ---- auth -----------------------------------------------------------------

    def auth_basic_ok(self):
        value = self.headers.get("Authorization") or ""
        scheme, _, cred = value.strip().partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            decoded = base64.b64decode(cred.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            return False
        _user, sep, password = decoded.partition(":")
        return bool(sep) and password == self.server.token

    def auth_token_ok(self):
        value = self.headers.get("Authorization") or ""
        scheme, _, cred = value.strip().partition(" ")
        return scheme.lower() in ("bearer", "token") and cred.strip() == self.server.token

    # ---- dispatch -------------------------------------------------------------

    def do_GET(self):
        self.dispatch()

    do_POST = do_GET
    do_HEAD = do_GET
    do_PUT = do_GET
    do_PATCH = do_GET
    do_DELETE = do_GET
    do_OPTIONS = do_GET

    def dispatch(self):
        parts = urlsplit(self.path)
        raw_path = parts.path or "/"
        query = parts.query
        path = unquote(raw_path)
        git = self.match_git(path)
        auth_ok = self.auth_basic_ok() if git else self.auth_token_ok()
        try:
            self.write_log(raw_path, query, auth_ok)
        except OSError as e:
            if self.server.verbose:
                sys.stderr.write("fake-github: cannot write log: %s\n" % e)
        try:
            if git:
                if not auth_ok:
                    self.read_body()  # keep the connection usable
                    self.send_bytes(
                        401,
                        b"Unauthorized\n",
                        "text/plain; charset=utf-8",
                        {"WWW-Authenticate": 'Basic realm="GitHub"'},
                    )
                    return
                self.serve_git(git, query)
            else:
                self.read_body()
                if not auth_ok:
                    self.send_json(401, BAD_CREDENTIALS)
                    return
                self.serve_rest(path, query)
        except BadRequest as e:
            self.close_connection = True
            self.send_bytes(400, ("%s\n" % e).encode(), "text/plain; charset=utf-8", {"Connection": "close"})

    def match_git(self, path):
        """(owner, repo, path_info) for a git path, else None."""
        m = GIT_DOTGIT_PATH.match(path)
        if m:
            owner, repo, rest = m.group(1), m.group(2), m.group(3)
        else:
            m = GIT_PLAIN_PATH.match(path)
            if not m or not GIT_SERVICE_REST.match(m.group(3)):
                return None
            owner, repo, rest = m.group(1), m.group(2), "/" + m.group(3)
        if not (valid_name(owner) and valid_name(repo)):
            return None
        return owner, repo, "/%s/%s.git%s" % (owner, repo, rest)

    # ---- git smart HTTP -------------------------------------------------------

    def serve_git(self, git, query):
        _owner, _repo, path_info = git
        body = self.read_body()
        enc = (self.headers.get("Content-Encoding") or "").strip().lower()
        if enc in ("gzip", "x-gzip"):
            try:
                body = gzip.decompress(body)
            except (OSError, EOFError, zlib.error):
                raise BadRequest("bad gzip body")
        elif enc == "deflate":
            try:
                body = zlib.decompress(body)
            except zlib.error:
                raise BadRequest("bad deflate body")
        elif enc not in ("", "identity"):
            raise BadRequest("unsupported Content-Encoding: %s" % enc)

        env = base_env()
        env.update(
            {
                "GIT_PROJECT_ROOT": self.server.repos,
                "GIT_HTTP_EXPORT_ALL": "1",
                "GATEWAY_INTERFACE": "CGI/1.1",
                "SERVER_SOFTWARE": self.server_version,
                "SERVER_PROTOCOL": self.request_version or "HTTP/1.1",
                "SERVER_NAME": str(self.server.server_address[0]),
                "SERVER_PORT": str(self.server.server_address[1]),
                "REQUEST_METHOD": self.command,
                "SCRIPT_NAME": "",
                "PATH_INFO": path_info,
                "PATH_TRANSLATED": os.path.join(self.server.repos, path_info.lstrip("/")),
                "QUERY_STRING": query,
                "REMOTE_ADDR": self.client_address[0],
                "REMOTE_USER": "x-access-token",
                "AUTH_TYPE": "Basic",
                "CONTENT_LENGTH": str(len(body)),
            }
        )
        ctype = self.headers.get("Content-Type")
        if ctype:
            env["CONTENT_TYPE"] = ctype
        for k, v in self.headers.items():
            lk = k.lower()
            if lk in CGI_SKIP_HEADERS:
                continue
            env["HTTP_" + lk.upper().replace("-", "_")] = v
        env = git_config_env(env)

        proc = subprocess.Popen(
            ["git", "http-backend"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=None if self.server.verbose else subprocess.DEVNULL,
            env=env,
            cwd=self.server.repos,
        )

        def feed():
            try:
                if body:
                    proc.stdin.write(body)
            except OSError:
                pass
            finally:
                try:
                    proc.stdin.close()
                except OSError:
                    pass

        feeder = threading.Thread(target=feed, daemon=True)
        feeder.start()
        try:
            self.relay_cgi(proc)
        except OSError:
            # the client went away
            self.close_connection = True
            proc.kill()
        finally:
            try:
                proc.stdout.close()
            except OSError:
                pass
            feeder.join(timeout=5)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def relay_cgi(self, proc):
        out = proc.stdout
        status, reason = 200, "OK"
        headers = []
        length = None
        saw_end = False
        while True:
            line = out.readline(65537)
            if not line:
                break
            line = line.rstrip(b"\r\n")
            if not line:
                saw_end = True
                break
            name, sep, value = line.decode("latin-1").partition(":")
            if not sep:
                continue
            name, value = name.strip(), value.strip()
            lname = name.lower()
            if lname == "status":
                code, _, why = value.partition(" ")
                try:
                    status = int(code)
                    reason = why.strip() or None
                except ValueError:
                    pass
            elif lname == "content-length":
                try:
                    length = int(value)
                except ValueError:
                    length = None
            elif lname not in CGI_DROP_RESPONSE_HEADERS:
                headers.append((name, value))
        if not saw_end:
            self.close_connection = True
            self.send_bytes(500, b"git http-backend failed\n", "text/plain; charset=utf-8", {"Connection": "close"})
            return

        self.send_response(status, reason)
        for name, value in headers:
            self.send_header(name, value)
        head = self.command == "HEAD"
        if length is not None:
            self.send_header("Content-Length", str(length))
            self.end_headers()
            if not head:
                remaining = length
                while remaining > 0:
                    data = out.read(min(READ_SIZE, remaining))
                    if not data:
                        break
                    self.wfile.write(data)
                    remaining -= len(data)
                if remaining > 0:  # backend lied about the length
                    self.close_connection = True
            self.wfile.flush()
            return
        if head:
            self.send_header("Content-Length", "0")
            self.end_headers()
            self.wfile.flush()
            return
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.flush()
        while True:
            data = out.read1(READ_SIZE)
            if not data:
                break
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    # ---- REST -----------------------------------------------------------------

    def repo_dir(self, owner, repo):
        if not (valid_name(owner) and valid_name(repo)):
            return None
        d = os.path.join(self.server.repos, owner, repo + ".git")
        return d if os.path.isdir(d) else None

    def run_git(self, repo_dir, *args):
        env = git_config_env(base_env())
        return subprocess.run(
            ["git", "-C", repo_dir] + list(args),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
        )

    def default_branch(self, repo_dir):
        r = self.run_git(repo_dir, "symbolic-ref", "--short", "HEAD")
        name = r.stdout.decode("utf-8", "replace").strip()
        return name if r.returncode == 0 and name else "main"

    def serve_rest(self, path, query):
        if self.command not in ("GET", "HEAD"):
            self.send_json(404, NOT_FOUND)
            return
        if path == "/user":
            self.send_json(200, {"login": "nook-test"})
            return
        m = REST_REPO.match(path)
        if m:
            owner, repo = m.group(1), m.group(2)
            d = self.repo_dir(owner, repo)
            if d is None:
                self.send_json(404, NOT_FOUND)
                return
            self.send_json(
                200,
                {
                    "id": 1,
                    "name": repo,
                    "full_name": "%s/%s" % (owner, repo),
                    "private": True,
                    "default_branch": self.default_branch(d),
                    "owner": {"login": owner},
                },
            )
            return
        m = REST_COMMITS.match(path)
        if m:
            d = self.repo_dir(m.group(1), m.group(2))
            if d is None:
                self.send_json(404, NOT_FOUND)
                return
            ref = (parse_qs(query).get("sha") or [None])[0] or self.default_branch(d)
            if ref.startswith("-"):
                self.send_json(404, NOT_FOUND)
                return
            r = self.run_git(d, "log", "--format=%H%x09%s", ref, "--")
            commits = []
            if r.returncode == 0:
                for line in r.stdout.decode("utf-8", "replace").splitlines():
                    sha, _, subject = line.partition("\t")
                    if sha:
                        commits.append({"sha": sha, "commit": {"message": subject}})
            self.send_json(200, commits)
            return
        self.send_json(404, NOT_FOUND)


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def handle_error(self, request, client_address):
        if self.verbose:
            super().handle_error(request, client_address)


def main(argv=None):
    ap = argparse.ArgumentParser(description="Fake GitHub (git smart HTTP + a slice of the REST API) for tests")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--token", required=True)
    ap.add_argument("--repos", required=True, help="directory holding OWNER/REPO.git bare repositories")
    ap.add_argument("--log", default=None)
    ap.add_argument("--verbose", action="store_true", help="access log, tracebacks and git stderr on stderr")
    args = ap.parse_args(argv)

    server = Server((args.host, args.port), Handler)
    server.token = args.token
    server.repos = os.path.abspath(args.repos)
    server.log_path = args.log
    server.log_lock = threading.Lock()
    server.verbose = args.verbose

    sys.stdout.write("listening %d\n" % server.server_address[1])
    sys.stdout.flush()
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
