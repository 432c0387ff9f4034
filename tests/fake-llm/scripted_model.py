#!/usr/bin/env python3
"""Scripted fake LLM provider for nook's agent tests (Python 3.11 standard library only).

fake_llm.py answers every request the same canned way; this server instead
answers from a script of model turns that the test loads first, so a coding
agent can be driven through a deterministic conversation (text, tool calls,
errors), and the test can afterwards read back every request the agent sent.
It speaks the real Anthropic Messages API and OpenAI Responses API wire
formats, streamed (SSE) and not, closely enough for the official SDKs.

CLI
    python3 scripted_model.py --port PORT [--host 127.0.0.1]
                              [--anthropic-key KEY] [--openai-key KEY] [--verbose]

    Prints exactly one line, "listening PORT", to stdout once it accepts
    connections (PORT 0 picks a free port and prints the one chosen); nothing
    else goes to stdout.  --verbose writes an access log to stderr.
    With --anthropic-key, /v1/messages needs `x-api-key: KEY` or
    `Authorization: Bearer KEY`; with --openai-key, /v1/responses needs
    `Authorization: Bearer KEY`.  Otherwise the answer is a 401 in the
    provider's error format (and the request is neither logged nor scripted).

Model routes (each POST serves the next step of the script)
    POST /v1/messages                Anthropic Messages ("stream": true -> SSE)
    POST /v1/responses               OpenAI Responses   ("stream": true -> SSE)
    POST /v1/messages/count_tokens   {"input_tokens": N}; serves no step
    GET  /v1/models                  a small model list; serves no step

Control API (unauthenticated, test-only)
    POST /__script         {"steps": [STEP, ...]}  replace the script and clear
                           the log and failures; answers {"ok": true}.  Steps
                           are numbered from 1 in the order loaded.
    POST /__script/append  {"steps": [STEP, ...]}  append (numbering continues).
    GET  /__log            {"requests": [REQ, ...], "failures": ["..."],
                            "remaining": N}
        N is how many more model requests the script can serve (repeats count).
        An invalid script is refused with 400 {"ok": false, "error": "..."}.

    REQ = {"api": "anthropic"|"openai", "path": ..., "stream": bool,
           "step": K or null (the step that served it),
           "body": <the parsed JSON body>,
           "images": [{"media_type": ..., "bytes": N, "png": bool,
                       "width": W, "height": H}, ...],
           "tool_results": [{"id": ..., "text": "...", "is_error": bool}, ...],
           "last_user_text": "...", "at": <unix time, float>,
           "deltas": [[<unix time>, "text"], ...]  (streamed text deltas, as sent),
           "replied_at": <unix time>  (a streamed answer's last byte sent)}
      images: every image anywhere in the request -- Anthropic
        {"type":"image","source":{"type":"base64",...}} blocks (also inside
        tool_result content) and OpenAI {"type":"input_image","image_url":
        "data:...;base64,..."} parts (also inside function_call_output output
        arrays).  png is true when the decoded bytes carry the PNG signature
        and an IHDR chunk; width/height come from IHDR (null otherwise).  URL /
        file_id images are listed with "url" (and "file_id"), bytes 0 and png
        false; undecodable base64 adds "error": "invalid base64".
      tool_results: Anthropic tool_result blocks (id = tool_use_id) and OpenAI
        function_call_output / custom_tool_call_output items (id = call_id);
        text = their text content joined with "\\n"; is_error is always false
        for OpenAI, which has no such flag.
      last_user_text: text of the last user message that has plain text (a
        message holding only tool results or images is skipped); for OpenAI
        the last role "user" item's input_text / string content (or the whole
        `input` when it is a string).

STEP (every key optional except that exactly one of reply / error is needed)
    {
      "expect": {                          # each failed check is recorded as
        "last_user_contains": "text",      # "step K: ..." in failures and the
        "tool_result_contains": "text",    # request gets a 400 "script
        "has_image": true,                 # expectation failed: ..." (false:
                                           # the request carries no image)
        "tools_include": ["bash", ...],    # names in the request's `tools`
        "system_contains": "text",         # Anthropic `system`, OpenAI `instructions`
        "api": "anthropic" | "openai"
      },
      "reply": [{"text": "hello"},
                {"tool": "bash", "input": {"command": "ls"}, "id": "optional"}],
      "error": {"status": 529, "type": "overloaded_error", "message": "...",
                "headers": {"x-should-retry": "false"}},  # type, message and
                                           # headers optional; answered as the
                                           # provider's error JSON
      "usage": {"input": 120, "output": 30},  # default input = words in the
                                           # request text (min 1), output =
                                           # words in reply text + 10 per tool call
      "delay_ms": 0,                       # sleep before the response headers
      "delta_delay_ms": 0,                 # sleep before each stream delta but the first
      "repeat": 1                          # served this many times, then consumed
    }
    A request that arrives when the script is empty records the failure
    "unexpected request N (script exhausted)" (N counts model requests since
    the last POST /__script, from 1) and gets a 400 as well.
    Stop reason: "tool_use" when the reply has a tool call, else "end_turn"
    (OpenAI: status "completed").  Tool call ids default to toolu_<random>
    (Anthropic) / call_<random> (OpenAI).
"""

import argparse
import base64
import binascii
import collections
import json
import re
import struct
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
WORDS_PER_DELTA = 3
TOKENS_PER_TOOL_CALL = 10
MODELS = ["claude-sonnet-4-5", "claude-haiku-4-5", "gpt-5", "gpt-5-codex"]

# Keys whose string values count as request text for the default input usage
# (same rule as fake_llm.py, plus OpenAI's function_call_output "output").
TEXT_KEYS = {"text", "content", "system", "input", "instructions", "output"}
SKIP_KEYS = {"tools", "tool_choice", "metadata", "response_format", "text_format"}

STEP_KEYS = {"expect", "reply", "error", "usage", "delay_ms", "delta_delay_ms", "repeat"}
EXPECT_KEYS = {
    "last_user_contains": str,
    "tool_result_contains": str,
    "has_image": bool,
    "tools_include": list,
    "system_contains": str,
    "api": str,
}
DEFAULT_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}


class Abort(Exception):
    """The client went away mid-response; stop handling the request."""


def new_id(prefix):
    return prefix + uuid.uuid4().hex[:24]


def excerpt(text, limit=120):
    text = text if isinstance(text, str) else repr(text)
    return text if len(text) <= limit else text[:limit] + "..."


# --------------------------------------------------------------------------- script

def validate_step(step):
    """Return a problem description for a malformed step, or None.

    Validated at load time so a typo in a test's script fails at POST /__script
    rather than as a puzzling mismatch mid-conversation.
    """
    if not isinstance(step, dict):
        return "a step must be an object"
    unknown = set(step) - STEP_KEYS
    if unknown:
        return "unknown step keys %s" % sorted(unknown)
    if ("reply" in step) == ("error" in step):
        return "a step needs exactly one of reply / error"
    if "reply" in step:
        reply = step["reply"]
        if not isinstance(reply, list):
            return "reply must be a list"
        for item in reply:
            if not isinstance(item, dict):
                return "reply items must be objects"
            if "text" in item:
                if set(item) != {"text"} or not isinstance(item["text"], str):
                    return 'a text reply item is {"text": STRING}'
            elif "tool" in item:
                if set(item) - {"tool", "input", "id"} or not isinstance(item["tool"], str):
                    return 'a tool reply item is {"tool": NAME, "input": {...}, "id": ID}'
                if not isinstance(item.get("input", {}), dict):
                    return "tool input must be an object"
                if "id" in item and not isinstance(item["id"], str):
                    return "tool id must be a string"
            else:
                return "reply items need text or tool"
    else:
        err = step["error"]
        if not isinstance(err, dict) or set(err) - {"status", "type", "message", "headers"}:
            return 'error is {"status": N, "type": T, "message": M, "headers": {...}}'
        if not isinstance(err.get("status"), int) or not 400 <= err["status"] <= 599:
            return "error.status must be an HTTP error status"
        if not isinstance(err.get("headers", {}), dict):
            return "error.headers must be an object"
    expect = step.get("expect", {})
    if not isinstance(expect, dict):
        return "expect must be an object"
    for key, value in expect.items():
        if key not in EXPECT_KEYS:
            return "unknown expectation %r" % key
        if not isinstance(value, EXPECT_KEYS[key]):
            return "expect.%s must be a %s" % (key, EXPECT_KEYS[key].__name__)
    if "api" in expect and expect["api"] not in ("anthropic", "openai"):
        return 'expect.api must be "anthropic" or "openai"'
    if "usage" in step:
        usage = step["usage"]
        if not isinstance(usage, dict) or set(usage) - {"input", "output"}:
            return 'usage is {"input": N, "output": N}'
        if not all(isinstance(v, int) and v >= 0 for v in usage.values()):
            return "usage counts must be non-negative integers"
    for key in ("delay_ms", "delta_delay_ms"):
        if key in step and (not isinstance(step[key], (int, float)) or step[key] < 0):
            return "%s must be a non-negative number" % key
    if "repeat" in step and (not isinstance(step["repeat"], int) or step["repeat"] < 1):
        return "repeat must be a positive integer"
    return None


class Script:
    """The queue of steps plus the request log, shared by all handler threads."""

    def __init__(self):
        self.lock = threading.Lock()
        self.queue = collections.deque()  # [step number, step, servings left]
        self.next_number = 1
        self.requests = []
        self.failures = []
        self.count = 0

    def load(self, steps, replace):
        with self.lock:
            if replace:
                self.queue.clear()
                self.next_number = 1
                self.requests = []
                self.failures = []
                self.count = 0
            for step in steps:
                self.queue.append([self.next_number, step, step.get("repeat", 1)])
                self.next_number += 1

    def take(self, record):
        """Log `record` and pop the step that serves it.

        Returns (number, step), or (None, failure) when the script is exhausted.
        Logging and popping under one lock keeps the log in serving order.
        """
        with self.lock:
            self.count += 1
            self.requests.append(record)
            if not self.queue:
                failure = "unexpected request %d (script exhausted)" % self.count
                self.failures.append(failure)
                return None, failure
            entry = self.queue[0]
            entry[2] -= 1
            if entry[2] == 0:
                self.queue.popleft()
            record["step"] = entry[0]
            return entry[0], entry[1]

    def fail(self, messages):
        with self.lock:
            self.failures.extend(messages)

    def snapshot(self):
        with self.lock:
            return {
                "requests": list(self.requests),
                "failures": list(self.failures),
                "remaining": sum(entry[2] for entry in self.queue),
            }


# --------------------------------------------------------------------------- request analysis

def collect_text(node, out, key=None):
    """Append every string under a text-ish key to `out`, recursively."""
    if isinstance(node, str):
        if key in TEXT_KEYS:
            out.append(node)
    elif isinstance(node, dict):
        for k, v in node.items():
            if k not in SKIP_KEYS:
                collect_text(v, out, k)
    elif isinstance(node, list):
        for v in node:
            collect_text(v, out, key)  # list elements inherit the list's key


def describe_image(media_type, b64):
    info = {"media_type": media_type, "bytes": 0, "png": False, "width": None, "height": None}
    try:
        data = base64.b64decode(re.sub(r"\s+", "", b64 or ""), validate=True)
    except (binascii.Error, ValueError):
        info["error"] = "invalid base64"
        return info
    info["bytes"] = len(data)
    # A PNG starts with the 8-byte signature, then the IHDR chunk: 4-byte
    # length, "IHDR", 4-byte big-endian width, 4-byte big-endian height.
    if len(data) >= 24 and data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR":
        info["png"] = True
        info["width"], info["height"] = struct.unpack(">II", data[16:24])
    return info


def collect_images(node, out):
    """Find images anywhere in the request (they nest inside tool results)."""
    if isinstance(node, dict):
        kind = node.get("type")
        source = node.get("source")
        if kind == "image" and isinstance(source, dict):  # Anthropic
            if source.get("type") == "base64":
                out.append(describe_image(source.get("media_type"), source.get("data")))
            else:
                out.append(dict(describe_image(None, ""), url=source.get("url")))
        elif kind == "input_image":  # OpenAI
            url = node.get("image_url")
            if isinstance(url, dict):
                url = url.get("url")
            match = re.match(r"data:([^;,]*)(;[^,]*)?,(.*)\Z", url or "", re.S)
            if match and "base64" in (match.group(2) or ""):
                out.append(describe_image(match.group(1) or None, match.group(3)))
            else:
                info = dict(describe_image(None, ""), url=url)
                if node.get("file_id"):
                    info["file_id"] = node["file_id"]
                out.append(info)
        for key, value in node.items():
            if key not in SKIP_KEYS:
                collect_images(value, out)
    elif isinstance(node, list):
        for value in node:
            collect_images(value, out)


def part_texts(content):
    """Text of a string or of the text parts of a content list."""
    if isinstance(content, str):
        return [content]
    texts = []
    if isinstance(content, list):
        for part in content:
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, dict) and part.get("type") in ("text", "input_text", "output_text"):
                if isinstance(part.get("text"), str):
                    texts.append(part["text"])
    return texts


def anthropic_view(body):
    tool_results, last_user = [], ""
    messages = body.get("messages")
    for msg in messages if isinstance(messages, list) else []:
        if not isinstance(msg, dict) or msg.get("role") != "user":
            continue
        content = msg.get("content")
        if isinstance(content, list):
            for block in content:
                if isinstance(block, dict) and block.get("type") == "tool_result":
                    tool_results.append(
                        {
                            "id": block.get("tool_use_id"),
                            "text": "\n".join(part_texts(block.get("content"))),
                            "is_error": bool(block.get("is_error")),
                        }
                    )
        texts = part_texts(content)  # top-level text only, not tool_result content
        if texts:
            last_user = "\n".join(texts)
    system = body.get("system")
    system_text = "\n".join(part_texts(system)) if system is not None else ""
    return tool_results, last_user, system_text


def openai_view(body):
    tool_results, last_user = [], ""
    items = body.get("input")
    if isinstance(items, str):
        last_user = items
        items = []
    for item in items if isinstance(items, list) else []:
        if not isinstance(item, dict):
            continue
        kind = item.get("type")
        if kind in ("function_call_output", "custom_tool_call_output"):
            tool_results.append(
                {"id": item.get("call_id"), "text": "\n".join(part_texts(item.get("output"))), "is_error": False}
            )
        elif item.get("role") == "user" and kind in (None, "message"):
            texts = part_texts(item.get("content"))
            if texts:
                last_user = "\n".join(texts)
    instructions = body.get("instructions")
    return tool_results, last_user, instructions if isinstance(instructions, str) else ""


def tool_names(body):
    names = []
    tools = body.get("tools")
    for tool in tools if isinstance(tools, list) else []:
        if not isinstance(tool, dict):
            continue
        fn = tool.get("function") if isinstance(tool.get("function"), dict) else {}
        # built-in OpenAI tools (web_search, ...) have only a type
        name = tool.get("name") or fn.get("name") or tool.get("type")
        if isinstance(name, str):
            names.append(name)
    return names


def check_expectations(number, expect, api, record, system_text, tools):
    failures = []

    def fail(msg):
        failures.append("step %d: %s" % (number, msg))

    if "api" in expect and expect["api"] != api:
        fail("expected an %s request, got %s" % (expect["api"], api))
    want = expect.get("last_user_contains")
    if want is not None and want not in record["last_user_text"]:
        fail("last user text does not contain %r (got %r)" % (want, excerpt(record["last_user_text"])))
    want = expect.get("tool_result_contains")
    if want is not None and not any(want in r["text"] for r in record["tool_results"]):
        got = [excerpt(r["text"], 60) for r in record["tool_results"]]
        fail("no tool result contains %r (got %r)" % (want, got))
    if "has_image" in expect:
        valid = [i for i in record["images"] if i["png"] and i["width"] and i["height"]]
        if expect["has_image"] and not valid:
            fail("expected a valid PNG image, got %d image(s), none a valid PNG" % len(record["images"]))
        if not expect["has_image"] and record["images"]:
            fail("expected no image, got %d" % len(record["images"]))
    missing = [t for t in expect.get("tools_include", []) if t not in tools]
    if missing:
        fail("tools %r not offered (offered %r)" % (missing, tools))
    want = expect.get("system_contains")
    if want is not None and want not in system_text:
        fail("system prompt does not contain %r (got %r)" % (want, excerpt(system_text)))
    return failures


# --------------------------------------------------------------------------- reply helpers

def text_pieces(text):
    """Split text into deltas of a few words each; the pieces concatenate back exactly."""
    tokens = re.findall(r"\S+\s*|\s+", text)
    return ["".join(tokens[i:i + WORDS_PER_DELTA]) for i in range(0, len(tokens), WORDS_PER_DELTA)]


def delta_text(data):
    """The text a stream event adds to the answer (Anthropic or OpenAI), else None."""
    if not isinstance(data, dict):
        return None
    if data.get("type") == "content_block_delta" and data.get("delta", {}).get("type") == "text_delta":
        return data["delta"].get("text")
    if data.get("type") == "response.output_text.delta":
        return data.get("delta")
    return None


def json_pieces(data):
    """Split a JSON string into 2-4 partial pieces, like a model streaming arguments."""
    n = max(2, min(4, len(data) // 8))
    size = max(1, -(-len(data) // n))
    pieces = [data[i:i + size] for i in range(0, len(data), size)]
    return pieces if len(pieces) >= 2 else pieces + [""]


class Reply:
    """A step's reply resolved for one request: blocks with ids, usage, stop reason."""

    def __init__(self, step, api, input_words):
        self.blocks = []
        words = 0
        tools = 0
        for item in step["reply"]:
            if "text" in item:
                self.blocks.append({"kind": "text", "text": item["text"]})
                words += len(item["text"].split())
            else:
                tools += 1
                default_id = new_id("toolu_") if api == "anthropic" else new_id("call_")
                args = item.get("input", {})
                self.blocks.append(
                    {
                        "kind": "tool",
                        "name": item["tool"],
                        "input": args,
                        "json": json.dumps(args, separators=(",", ":"), ensure_ascii=False),
                        "id": item.get("id") or default_id,
                    }
                )
        usage = step.get("usage", {})
        self.input_tokens = usage.get("input", max(1, input_words))
        self.output_tokens = usage.get("output", words + TOKENS_PER_TOOL_CALL * tools)
        self.stop_reason = "tool_use" if tools else "end_turn"
        self.delta_delay = step.get("delta_delay_ms", 0) / 1000.0


def anthropic_error(etype, message):
    return {"type": "error", "error": {"type": etype, "message": message}}


def openai_error(etype, message):
    return {"error": {"message": message, "type": etype, "param": None, "code": etype}}


# --------------------------------------------------------------------------- handler

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "scripted-model/1.0"
    sys_version = ""

    # ---- plumbing -------------------------------------------------------------

    def log_message(self, fmt, *args):
        if self.server.verbose:
            sys.stderr.write("scripted-model: %s - %s\n" % (self.address_string(), fmt % args))

    def finish(self):
        try:
            super().finish()
        except OSError:
            pass

    def read_body(self):
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            parts = []
            while True:
                line = self.rfile.readline(65537)
                size = int(line.split(b";", 1)[0].strip() or b"0", 16) if line else 0
                if size == 0:
                    while line and line not in (b"\r\n", b"\n"):  # trailers
                        line = self.rfile.readline(65537)
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline(65537)  # CRLF after the chunk
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def send_json(self, status, obj, headers=None):
        data = json.dumps(obj).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, str(v))
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()

    def send_stream(self, events, delta_delay, headers):
        """events: (name, data, is_delta); sent as `event: NAME\\ndata: JSON\\n\\n` chunks."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        first_delta = True
        # When each text delta left, and when the answer ended: for benchmarks of what the
        # client adds (bench/agent.py reads them from /__log).
        record = getattr(self, "current_record", None)
        sent = record.setdefault("deltas", []) if record is not None else []
        try:
            for name, data, is_delta in events:
                if is_delta:
                    if delta_delay and not first_delta:
                        time.sleep(delta_delay)
                    first_delta = False
                frame = ("event: %s\ndata: %s\n\n" % (name, json.dumps(data, separators=(",", ":")))).encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(frame), frame))
                self.wfile.flush()
                text = delta_text(data)
                if text is not None:
                    sent.append([time.time(), text])
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
            if record is not None:
                record["replied_at"] = time.time()
        except OSError as e:
            raise Abort() from e

    # ---- dispatch -------------------------------------------------------------

    def do_GET(self):
        self.dispatch()

    def do_POST(self):
        self.dispatch()

    def dispatch(self):
        try:
            self.route()
        except (Abort, ConnectionError):  # the client hung up; nothing to answer
            self.close_connection = True
        except Exception as e:  # safety net: answer rather than hang the client
            self.close_connection = True
            if self.server.verbose:
                import traceback
                traceback.print_exc()
            self.server.script.fail(["internal error: %r" % (e,)])
            try:
                self.send_json(500, anthropic_error("api_error", "scripted-model internal error: %r" % (e,)))
            except Exception:
                pass

    def route(self):
        path = urlsplit(self.path).path.rstrip("/") or "/"
        raw = self.read_body()
        try:
            body = json.loads(raw.decode("utf-8")) if raw.strip() else None
        except (ValueError, UnicodeDecodeError):
            body = None
        method = self.command

        if path in ("/__script", "/__script/append"):
            if method != "POST":
                return self.send_json(405, {"ok": False, "error": "use POST"})
            steps = body.get("steps") if isinstance(body, dict) else None
            if not isinstance(steps, list):
                return self.send_json(400, {"ok": False, "error": 'body must be {"steps": [...]}'})
            for i, step in enumerate(steps):
                problem = validate_step(step)
                if problem:
                    return self.send_json(400, {"ok": False, "error": "steps[%d]: %s" % (i, problem)})
            self.server.script.load(steps, replace=path == "/__script")
            return self.send_json(200, {"ok": True})
        if path == "/__log":
            return self.send_json(200, self.server.script.snapshot())

        if method == "POST" and path == "/v1/messages":
            return self.model_request("anthropic", path, body)
        if method == "POST" and path == "/v1/responses":
            return self.model_request("openai", path, body)
        if method == "POST" and path == "/v1/messages/count_tokens":
            if not self.auth_ok("anthropic"):
                return self.unauthorized("anthropic")
            texts = []
            collect_text(body, texts)
            return self.send_json(200, {"input_tokens": max(1, len(" ".join(texts).split()))})
        if method == "GET" and path == "/v1/models":
            return self.models()
        return self.send_json(404, anthropic_error("not_found_error", "Not found: %s %s" % (method, path)))

    # ---- auth -----------------------------------------------------------------

    def bearer(self):
        auth = self.headers.get("Authorization") or ""
        return auth[len("Bearer "):] if auth.startswith("Bearer ") else None

    def auth_ok(self, api):
        if api == "anthropic":
            # Anthropic clients send `x-api-key`; recent anthropic SDKs send a Bearer token.
            key = self.server.anthropic_key
            return key is None or self.headers.get("x-api-key") == key or self.bearer() == key
        key = self.server.openai_key
        return key is None or self.bearer() == key

    def unauthorized(self, api):
        if api == "anthropic":
            return self.send_json(401, anthropic_error("authentication_error", "invalid x-api-key"))
        return self.send_json(401, openai_error("invalid_api_key", "Incorrect API key provided"))

    def send_error_json(self, api, status, etype, message, headers=None):
        headers = dict(headers or {})
        if api == "anthropic":
            headers.setdefault("request-id", new_id("req_"))
            return self.send_json(status, anthropic_error(etype, message), headers)
        headers.setdefault("x-request-id", new_id("req_"))
        return self.send_json(status, openai_error(etype, message), headers)

    # ---- models ---------------------------------------------------------------

    def models(self):
        keys = [k for k in (self.server.anthropic_key, self.server.openai_key) if k is not None]
        if keys and self.headers.get("x-api-key") not in keys and self.bearer() not in keys:
            return self.unauthorized("openai" if self.headers.get("anthropic-version") is None else "anthropic")
        data = [
            {"id": m, "object": "model", "created": 0, "owned_by": "scripted", "type": "model",
             "display_name": m, "created_at": "2025-01-01T00:00:00Z"}
            for m in MODELS
        ]
        return self.send_json(
            200, {"object": "list", "data": data, "has_more": False, "first_id": MODELS[0], "last_id": MODELS[-1]}
        )

    # ---- model requests -------------------------------------------------------

    def model_request(self, api, path, body):
        script = self.server.script
        if not self.auth_ok(api):
            return self.unauthorized(api)
        if not isinstance(body, dict):
            script.fail(["%s request to %s: body is not a JSON object" % (api, path)])
            return self.send_error_json(api, 400, "invalid_request_error", "body is not a JSON object")

        if api == "anthropic":
            tool_results, last_user, system_text = anthropic_view(body)
        else:
            tool_results, last_user, system_text = openai_view(body)
        images = []
        collect_images(body, images)
        record = {
            "api": api,
            "path": path,
            "stream": body.get("stream") is True,
            "step": None,
            "body": body,
            "images": images,
            "tool_results": tool_results,
            "last_user_text": last_user,
            "at": time.time(),
        }
        self.current_record = record
        number, step = script.take(record)
        if number is None:
            return self.send_error_json(api, 400, "invalid_request_error", "script expectation failed: " + step)

        failures = check_expectations(number, step.get("expect", {}), api, record, system_text, tool_names(body))
        if failures:
            script.fail(failures)
            msg = "script expectation failed: " + "; ".join(failures)
            return self.send_error_json(api, 400, "invalid_request_error", msg)

        if step.get("delay_ms"):
            time.sleep(step["delay_ms"] / 1000.0)

        if "error" in step:
            err = step["error"]
            status = err["status"]
            etype = err.get("type") or DEFAULT_ERROR_TYPES.get(status, "api_error")
            message = err.get("message") or "scripted %s (step %d)" % (etype, number)
            return self.send_error_json(api, status, etype, message, err.get("headers"))

        texts = []
        collect_text(body, texts)
        reply = Reply(step, api, len(" ".join(texts).split()))
        model = body.get("model") if isinstance(body.get("model"), str) else "scripted-model"
        if api == "anthropic":
            return self.anthropic_reply(reply, model, record["stream"])
        return self.openai_reply(reply, model, record["stream"], body)

    def anthropic_reply(self, reply, model, stream):
        headers = {"request-id": new_id("req_")}
        msg_id = new_id("msg_")
        usage = {
            "input_tokens": reply.input_tokens,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
            "output_tokens": reply.output_tokens,
        }
        message = {
            "id": msg_id,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": dict(usage, output_tokens=1),
        }
        if not stream:
            content = []
            for b in reply.blocks:
                if b["kind"] == "text":
                    content.append({"type": "text", "text": b["text"]})
                else:
                    content.append({"type": "tool_use", "id": b["id"], "name": b["name"], "input": b["input"]})
            message.update(content=content, stop_reason=reply.stop_reason, usage=usage)
            return self.send_json(200, message, headers)

        events = [("message_start", {"type": "message_start", "message": message}, False),
                  ("ping", {"type": "ping"}, False)]
        for index, b in enumerate(reply.blocks):
            if b["kind"] == "text":
                start = {"type": "text", "text": ""}
                deltas = [{"type": "text_delta", "text": p} for p in text_pieces(b["text"])]
            else:
                start = {"type": "tool_use", "id": b["id"], "name": b["name"], "input": {}}
                deltas = [{"type": "input_json_delta", "partial_json": p} for p in json_pieces(b["json"])]
            events.append(("content_block_start",
                           {"type": "content_block_start", "index": index, "content_block": start}, False))
            for d in deltas:
                events.append(("content_block_delta", {"type": "content_block_delta", "index": index, "delta": d}, True))
            events.append(("content_block_stop", {"type": "content_block_stop", "index": index}, False))
        events.append(("message_delta", {
            "type": "message_delta",
            "delta": {"stop_reason": reply.stop_reason, "stop_sequence": None},
            "usage": {"output_tokens": reply.output_tokens},
        }, False))
        events.append(("message_stop", {"type": "message_stop"}, False))
        self.send_stream(events, reply.delta_delay, headers)

    def openai_reply(self, reply, model, stream, body):
        headers = {"x-request-id": new_id("req_")}
        rid = new_id("resp_")
        created = int(time.time())
        usage = {
            "input_tokens": reply.input_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": reply.output_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": reply.input_tokens + reply.output_tokens,
        }

        def response_obj(status, output, usage_obj):
            return {
                "id": rid,
                "object": "response",
                "created_at": created,
                "status": status,
                "background": False,
                "error": None,
                "incomplete_details": None,
                "instructions": body.get("instructions"),
                "max_output_tokens": body.get("max_output_tokens"),
                "model": model,
                "output": output,
                "parallel_tool_calls": body.get("parallel_tool_calls", True),
                "previous_response_id": body.get("previous_response_id"),
                "reasoning": {"effort": None, "summary": None},
                "service_tier": "default",
                "store": body.get("store", True),
                "temperature": body.get("temperature", 1.0),
                "text": {"format": {"type": "text"}, "verbosity": "medium"},
                "tool_choice": body.get("tool_choice", "auto"),
                "tools": body.get("tools") if isinstance(body.get("tools"), list) else [],
                "top_p": body.get("top_p", 1.0),
                "truncation": "disabled",
                "usage": usage_obj,
                "user": None,
                "metadata": body.get("metadata") or {},
            }

        # Final (completed) form of every output item, in order.
        items = []
        for b in reply.blocks:
            if b["kind"] == "text":
                part = {"type": "output_text", "text": b["text"], "annotations": [], "logprobs": []}
                items.append({"type": "message", "id": new_id("msg_"), "status": "completed",
                              "role": "assistant", "content": [part]})
            else:
                items.append({"type": "function_call", "id": new_id("fc_"), "call_id": b["id"],
                              "name": b["name"], "arguments": b["json"], "status": "completed"})
        if not stream:
            return self.send_json(200, response_obj("completed", items, usage), headers)

        events = []

        def ev(etype, is_delta=False, **fields):
            events.append((etype, dict({"type": etype, "sequence_number": len(events)}, **fields), is_delta))

        ev("response.created", response=response_obj("in_progress", [], None))
        ev("response.in_progress", response=response_obj("in_progress", [], None))
        for index, item in enumerate(items):
            iid = item["id"]
            if item["type"] == "message":
                part = item["content"][0]
                ev("response.output_item.added", output_index=index,
                   item=dict(item, status="in_progress", content=[]))
                ev("response.content_part.added", item_id=iid, output_index=index, content_index=0,
                   part=dict(part, text=""))
                for piece in text_pieces(part["text"]):
                    ev("response.output_text.delta", True, item_id=iid, output_index=index, content_index=0,
                       delta=piece, logprobs=[])
                ev("response.output_text.done", item_id=iid, output_index=index, content_index=0,
                   text=part["text"], logprobs=[])
                ev("response.content_part.done", item_id=iid, output_index=index, content_index=0, part=part)
            else:
                ev("response.output_item.added", output_index=index,
                   item=dict(item, arguments="", status="in_progress"))
                for piece in json_pieces(item["arguments"]):
                    ev("response.function_call_arguments.delta", True, item_id=iid, output_index=index,
                       delta=piece)
                ev("response.function_call_arguments.done", item_id=iid, output_index=index,
                   name=item["name"], arguments=item["arguments"])
            ev("response.output_item.done", output_index=index, item=item)
        ev("response.completed", response=response_obj("completed", items, usage))
        self.send_stream(events, reply.delta_delay, headers)


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def handle_error(self, request, client_address):
        if self.verbose:
            super().handle_error(request, client_address)


def main(argv=None):
    ap = argparse.ArgumentParser(description="Scripted fake Anthropic/OpenAI provider for tests")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--anthropic-key", default=None)
    ap.add_argument("--openai-key", default=None)
    ap.add_argument("--verbose", action="store_true", help="access log and tracebacks on stderr")
    args = ap.parse_args(argv)

    server = Server((args.host, args.port), Handler)
    server.anthropic_key = args.anthropic_key
    server.openai_key = args.openai_key
    server.verbose = args.verbose
    server.script = Script()

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
