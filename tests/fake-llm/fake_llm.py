#!/usr/bin/env python3
"""Fake LLM provider for nook's tests (Python 3.11 standard library only).

Speaks enough of the real Anthropic Messages API and OpenAI Chat Completions /
Responses APIs (streamed and not) for the official SDKs and the Claude Code /
Codex CLIs to accept its answers.

Usage:
    python3 fake_llm.py --port PORT [--anthropic-key KEY] [--openai-key KEY]
                        [--log FILE] [--host HOST] [--verbose]

On start it prints exactly one line, "listening PORT", to stdout (PORT 0 picks
a free port and prints the one chosen).  Nothing else is written to stdout;
with --verbose an access log goes to stderr.

Deterministic behaviour (so tests can check billing exactly):
  * input tokens = number of whitespace-separated words in every string value
    of a "text"/"content"/"system"/"input"/"instructions" key of the request
    body (recursively, tool definitions excluded), minimum 1.
  * the reply is "ok " repeated N times, N = min(max_tokens, 5) (max_tokens /
    max_completion_tokens / max_output_tokens; 5 when absent), output tokens = N.
  * "CACHEME" in the request text: Anthropic reports
    cache_creation_input_tokens=7 on the first such request and
    cache_read_input_tokens=7 on later ones; OpenAI reports cached_tokens=7 on
    later ones.  Seen-state is global per provider family (anthropic / openai).
Auth: Anthropic routes accept `x-api-key: KEY` or `Authorization: Bearer KEY`
(recent anthropic SDKs send the latter); OpenAI routes need
`Authorization: Bearer KEY`; GET /v1/models accepts either key.
Special words in the request text:
  SLOWSTART  sleep 2 s before the response headers
  SLOWSTREAM sleep 0.3 s between stream events
  RESETMID   in a stream, drop the connection after the first content event
  TOOLUSE    answer with a tool call (get_weather-style, input {"city":"Paris"})
  BIGSTREAM  in a stream, send 2000 "x " deltas (output tokens = 2000)
  HUGESTREAM in a stream, send 50000 deltas of 4 KiB each (200 MiB), as fast as the client reads
"""

import argparse
import json
import socket
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

MAX_REPLY_WORDS = 5
CACHE_TOKENS = 7
BIG_STREAM_DELTAS = 2000
TOOL_ARGS = {"city": "Paris"}
TOOL_ARGS_JSON = json.dumps(TOOL_ARGS, separators=(",", ":"))
DEFAULT_TOOL = "get_weather"
MODELS = [
    "claude-sonnet-4-5",
    "claude-haiku-4-5",
    "claude-opus-4-1",
    "gpt-4o",
    "gpt-4o-mini",
    "gpt-5",
    "gpt-5-codex",
]

TEXT_KEYS = {"text", "content", "system", "input", "instructions"}
SKIP_KEYS = {"tools", "tool_choice", "metadata", "response_format", "text_format"}


class Abort(Exception):
    """Raised to stop handling a request (connection dropped on purpose or by peer)."""


def new_id(prefix):
    return prefix + uuid.uuid4().hex[:24]


def collect_text(node, out, key=None):
    """Append every string under a text-ish key to `out`, recursively."""
    if isinstance(node, str):
        if key in TEXT_KEYS:
            out.append(node)
    elif isinstance(node, dict):
        for k, v in node.items():
            if k in SKIP_KEYS:
                continue
            collect_text(v, out, k)
    elif isinstance(node, list):
        for v in node:
            # list elements inherit the key of the list (e.g. "content": ["a", "b"])
            collect_text(v, out, key)


class Plan:
    """What to answer for one parsed request."""

    def __init__(self, body, family, max_key_names, cache_state):
        texts = []
        collect_text(body, texts)
        joined = "\n".join(texts)
        self.text = joined
        self.input_tokens = max(1, len(joined.split()))
        self.model = body.get("model") if isinstance(body.get("model"), str) else "fake-model"
        self.stream = body.get("stream") is True

        limit = None
        for k in max_key_names:
            v = body.get(k)
            if isinstance(v, int) and not isinstance(v, bool):
                limit = v
                break
        if limit is None:
            self.n = MAX_REPLY_WORDS
            self.truncated = False
        else:
            self.n = max(0, min(limit, MAX_REPLY_WORDS))
            self.truncated = limit < MAX_REPLY_WORDS

        self.slow_start = "SLOWSTART" in joined
        self.slow_stream = "SLOWSTREAM" in joined
        self.reset_mid = "RESETMID" in joined
        self.tool_use = "TOOLUSE" in joined
        self.huge_stream = "HUGESTREAM" in joined and self.stream
        self.big_stream = ("BIGSTREAM" in joined and self.stream) or self.huge_stream

        self.cache_creation = 0
        self.cache_read = 0
        if "CACHEME" in joined and cache_state is not None:
            if cache_state.seen_before(family):
                self.cache_read = CACHE_TOKENS
            else:
                self.cache_creation = CACHE_TOKENS

        if self.huge_stream:
            self.deltas = ["x" * 4096] * 50000
        elif self.big_stream:
            self.deltas = ["x "] * BIG_STREAM_DELTAS
        else:
            self.deltas = ["ok "] * self.n
        self.reply = "".join(self.deltas)
        self.output_tokens = len(self.deltas)

        self.tool_name = DEFAULT_TOOL
        tools = body.get("tools")
        if isinstance(tools, list):
            for t in tools:
                if not isinstance(t, dict):
                    continue
                name = t.get("name")
                if not isinstance(name, str):
                    fn = t.get("function")
                    if isinstance(fn, dict) and isinstance(fn.get("name"), str):
                        name = fn["name"]
                if isinstance(name, str) and name:
                    self.tool_name = name
                    break
        if self.tool_use:
            # partial JSON pieces that concatenate to TOOL_ARGS_JSON
            self.arg_chunks = ['{"city":', '"Par', 'is"}']


class CacheState:
    def __init__(self):
        self.lock = threading.Lock()
        self.seen = set()

    def seen_before(self, family):
        with self.lock:
            if family in self.seen:
                return True
            self.seen.add(family)
            return False


# --------------------------------------------------------------------------- errors

def anthropic_error(etype, message):
    return {"type": "error", "error": {"type": etype, "message": message}}


def openai_error(message, etype="invalid_request_error", code=None, param=None):
    return {"error": {"message": message, "type": etype, "param": param, "code": code}}


# --------------------------------------------------------------------------- handler

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "fake-llm/1.0"
    sys_version = ""

    def version_string(self):
        return self.server_version

    # ---- plumbing -------------------------------------------------------------

    def log_message(self, fmt, *args):
        if self.server.verbose:
            sys.stderr.write("fake-llm: %s - %s\n" % (self.address_string(), fmt % args))

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
                    break
                size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    # trailers until empty line
                    while True:
                        t = self.rfile.readline(65537)
                        if not t or t in (b"\r\n", b"\n"):
                            break
                    break
                parts.append(self.rfile.read(size))
                self.rfile.readline(65537)  # CRLF after chunk
            return b"".join(parts)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def write_log(self, path, query, body):
        log = self.server.log_path
        if not log:
            return
        entry = {
            "method": self.command,
            "path": path,
            "query": query,
            "headers": {k.lower(): v for k, v in self.headers.items()},
            "body": body,
        }
        line = json.dumps(entry, ensure_ascii=False) + "\n"
        with self.server.log_lock:
            with open(log, "a", encoding="utf-8") as f:
                f.write(line)
                f.flush()

    def send_json(self, status, obj, extra_headers=None):
        data = json.dumps(obj).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (extra_headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()

    def start_stream(self, extra_headers=None):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        for k, v in (extra_headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.flush()

    def write_chunk(self, data):
        try:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()
        except OSError as e:  # client went away
            self.close_connection = True
            raise Abort() from e

    def end_stream(self):
        try:
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except OSError as e:
            self.close_connection = True
            raise Abort() from e

    def drop_connection(self):
        self.close_connection = True
        try:
            self.wfile.flush()
        except OSError:
            pass
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            self.connection.close()
        except OSError:
            pass
        raise Abort()

    def send_events(self, plan, events, named):
        """events: list of (event_name, data_obj_or_str, is_content)."""
        first = True
        for name, data, is_content in events:
            if plan.slow_stream and not first:
                time.sleep(0.3)
            first = False
            payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
            if named:
                frame = "event: %s\ndata: %s\n\n" % (name, payload)
            else:
                frame = "data: %s\n\n" % payload
            self.write_chunk(frame.encode("utf-8"))
            if is_content and plan.reset_mid:
                self.drop_connection()
        self.end_stream()

    # ---- dispatch -------------------------------------------------------------

    def do_GET(self):
        self.dispatch()

    def do_POST(self):
        self.dispatch()

    def do_PUT(self):
        self.dispatch()

    def do_DELETE(self):
        self.dispatch()

    def do_PATCH(self):
        self.dispatch()

    def dispatch(self):
        try:
            self._dispatch()
        except Abort:
            self.close_connection = True
        except Exception as e:  # pragma: no cover - safety net
            self.close_connection = True
            if self.server.verbose:
                import traceback
                traceback.print_exc()
            try:
                self.send_json(500, anthropic_error("api_error", "fake-llm internal error: %r" % (e,)))
            except Exception:
                pass

    def _dispatch(self):
        split = urlsplit(self.path)
        path = split.path.rstrip("/") or "/"
        query = split.query
        raw = self.read_body()
        body = None
        malformed = False
        if raw.strip():
            try:
                body = json.loads(raw.decode("utf-8"))
            except (ValueError, UnicodeDecodeError):
                malformed = True
        self.write_log(path, query, body)

        method = self.command
        if method == "POST" and path == "/v1/messages":
            return self.route_anthropic(body, malformed, count_only=False)
        if method == "POST" and path == "/v1/messages/count_tokens":
            return self.route_anthropic(body, malformed, count_only=True)
        if method == "POST" and path == "/v1/chat/completions":
            return self.route_openai(body, malformed, self.handle_chat)
        if method == "POST" and path == "/v1/responses":
            return self.route_openai(body, malformed, self.handle_responses)
        if method == "GET" and (path == "/v1/models" or path.startswith("/v1/models/")):
            return self.route_models(path)
        return self.send_json(
            404, anthropic_error("not_found_error", "Not found: %s %s" % (method, path))
        )

    # ---- auth -----------------------------------------------------------------

    def bearer(self):
        auth = self.headers.get("Authorization") or ""
        return auth[len("Bearer "):] if auth.startswith("Bearer ") else None

    def anthropic_auth_ok(self):
        # Real Anthropic clients send `x-api-key: KEY`; recent anthropic SDKs
        # send the API key as `Authorization: Bearer KEY` instead.  Accept both.
        key = self.server.anthropic_key
        return key is None or self.headers.get("x-api-key") == key or self.bearer() == key

    def openai_auth_ok(self):
        key = self.server.openai_key
        return key is None or (self.headers.get("Authorization") or "") == "Bearer " + key

    def anthropic_401(self):
        self.send_json(
            401,
            anthropic_error("authentication_error", "invalid x-api-key"),
            {"request-id": new_id("req_")},
        )

    def openai_401(self):
        self.send_json(
            401,
            openai_error("Incorrect API key provided", code="invalid_api_key"),
            {"x-request-id": new_id("req_")},
        )

    # ---- models ---------------------------------------------------------------

    def route_models(self, path):
        anthropic_style = (
            self.headers.get("x-api-key") is not None
            or self.headers.get("anthropic-version") is not None
        )
        keys = [k for k in (self.server.anthropic_key, self.server.openai_key) if k is not None]
        if keys and self.headers.get("x-api-key") not in keys and self.bearer() not in keys:
            return self.anthropic_401() if anthropic_style else self.openai_401()

        def model(mid):
            return {
                "id": mid,
                "object": "model",
                "created": 0,
                "owned_by": "fake",
                "type": "model",
                "display_name": mid,
                "created_at": "2025-01-01T00:00:00Z",
            }

        if path != "/v1/models":
            mid = path[len("/v1/models/"):]
            return self.send_json(200, model(mid))
        data = [model(m) for m in MODELS]
        return self.send_json(
            200,
            {
                "object": "list",
                "data": data,
                "has_more": False,
                "first_id": data[0]["id"],
                "last_id": data[-1]["id"],
            },
        )

    # ---- anthropic ------------------------------------------------------------

    def route_anthropic(self, body, malformed, count_only):
        req_id = new_id("req_")
        if not self.anthropic_auth_ok():
            return self.anthropic_401()
        if malformed or not isinstance(body, dict):
            return self.send_json(
                400,
                anthropic_error("invalid_request_error", "Request body is not valid JSON object"),
                {"request-id": req_id},
            )
        if count_only:
            plan = Plan(body, "anthropic", ("max_tokens",), None)
            return self.send_json(200, {"input_tokens": plan.input_tokens}, {"request-id": req_id})

        plan = Plan(body, "anthropic", ("max_tokens",), self.server.cache)
        if plan.slow_start:
            time.sleep(2)
        headers = {"request-id": req_id}
        msg_id = new_id("msg_")
        if plan.tool_use:
            stop_reason = "tool_use"
        elif plan.truncated and not plan.big_stream:
            stop_reason = "max_tokens"
        else:
            stop_reason = "end_turn"
        usage = {
            "input_tokens": plan.input_tokens,
            "cache_creation_input_tokens": plan.cache_creation,
            "cache_read_input_tokens": plan.cache_read,
            "output_tokens": plan.output_tokens,
        }

        if not plan.stream:
            if plan.tool_use:
                content = [
                    {"type": "tool_use", "id": "toolu_01", "name": plan.tool_name, "input": dict(TOOL_ARGS)}
                ]
            else:
                content = [{"type": "text", "text": plan.reply}]
            return self.send_json(
                200,
                {
                    "id": msg_id,
                    "type": "message",
                    "role": "assistant",
                    "model": plan.model,
                    "content": content,
                    "stop_reason": stop_reason,
                    "stop_sequence": None,
                    "usage": usage,
                },
                headers,
            )

        start_usage = dict(usage)
        start_usage["output_tokens"] = 1
        events = [
            (
                "message_start",
                {
                    "type": "message_start",
                    "message": {
                        "id": msg_id,
                        "type": "message",
                        "role": "assistant",
                        "model": plan.model,
                        "content": [],
                        "stop_reason": None,
                        "stop_sequence": None,
                        "usage": start_usage,
                    },
                },
                False,
            )
        ]
        if plan.tool_use:
            events.append(
                (
                    "content_block_start",
                    {
                        "type": "content_block_start",
                        "index": 0,
                        "content_block": {"type": "tool_use", "id": "toolu_01", "name": plan.tool_name, "input": {}},
                    },
                    False,
                )
            )
            events.append(("ping", {"type": "ping"}, False))
            for piece in plan.arg_chunks:
                events.append(
                    (
                        "content_block_delta",
                        {
                            "type": "content_block_delta",
                            "index": 0,
                            "delta": {"type": "input_json_delta", "partial_json": piece},
                        },
                        True,
                    )
                )
        else:
            events.append(
                (
                    "content_block_start",
                    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
                    False,
                )
            )
            events.append(("ping", {"type": "ping"}, False))
            for piece in plan.deltas:
                events.append(
                    (
                        "content_block_delta",
                        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": piece}},
                        True,
                    )
                )
        events.append(("content_block_stop", {"type": "content_block_stop", "index": 0}, False))
        events.append(
            (
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                    "usage": {"output_tokens": plan.output_tokens},
                },
                False,
            )
        )
        events.append(("message_stop", {"type": "message_stop"}, False))
        self.start_stream(headers)
        self.send_events(plan, events, named=True)

    # ---- openai ---------------------------------------------------------------

    def route_openai(self, body, malformed, handler):
        if not self.openai_auth_ok():
            return self.openai_401()
        if malformed or not isinstance(body, dict):
            return self.send_json(
                400,
                openai_error(
                    "We could not parse the JSON body of your request. (HINT: This likely means "
                    "you aren't using your HTTP library correctly. The OpenAI API expects a JSON "
                    "payload, but what was sent was not valid JSON.)"
                ),
                {"x-request-id": new_id("req_")},
            )
        return handler(body)

    @staticmethod
    def chat_usage(plan):
        return {
            "prompt_tokens": plan.input_tokens,
            "completion_tokens": plan.output_tokens,
            "total_tokens": plan.input_tokens + plan.output_tokens,
            "prompt_tokens_details": {"cached_tokens": plan.cache_read, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": 0,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        }

    def handle_chat(self, body):
        plan = Plan(body, "openai", ("max_completion_tokens", "max_tokens"), self.server.cache)
        if plan.slow_start:
            time.sleep(2)
        headers = {"x-request-id": new_id("req_")}
        cid = new_id("chatcmpl-")
        created = int(time.time())
        if plan.tool_use:
            finish = "tool_calls"
        elif plan.truncated and not plan.big_stream:
            finish = "length"
        else:
            finish = "stop"

        if not plan.stream:
            if plan.tool_use:
                message = {
                    "role": "assistant",
                    "content": None,
                    "refusal": None,
                    "annotations": [],
                    "tool_calls": [
                        {
                            "id": "call_01",
                            "type": "function",
                            "function": {"name": plan.tool_name, "arguments": TOOL_ARGS_JSON},
                        }
                    ],
                }
            else:
                message = {"role": "assistant", "content": plan.reply, "refusal": None, "annotations": []}
            return self.send_json(
                200,
                {
                    "id": cid,
                    "object": "chat.completion",
                    "created": created,
                    "model": plan.model,
                    "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
                    "usage": self.chat_usage(plan),
                    "service_tier": "default",
                    "system_fingerprint": "fp_fake",
                },
                headers,
            )

        so = body.get("stream_options")
        include_usage = isinstance(so, dict) and so.get("include_usage") is True

        def chunk(delta, finish_reason=None):
            c = {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": plan.model,
                "service_tier": "default",
                "system_fingerprint": "fp_fake",
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
            }
            if include_usage:
                c["usage"] = None
            return c

        events = []
        if plan.tool_use:
            events.append(
                (
                    None,
                    chunk(
                        {
                            "role": "assistant",
                            "content": None,
                            "refusal": None,
                            "tool_calls": [
                                {
                                    "index": 0,
                                    "id": "call_01",
                                    "type": "function",
                                    "function": {"name": plan.tool_name, "arguments": ""},
                                }
                            ],
                        }
                    ),
                    False,
                )
            )
            for piece in plan.arg_chunks:
                events.append(
                    (None, chunk({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}), True)
                )
        else:
            events.append((None, chunk({"role": "assistant", "content": "", "refusal": None}), False))
            for piece in plan.deltas:
                events.append((None, chunk({"content": piece}), True))
        events.append((None, chunk({}, finish), False))
        if include_usage:
            events.append(
                (
                    None,
                    {
                        "id": cid,
                        "object": "chat.completion.chunk",
                        "created": created,
                        "model": plan.model,
                        "service_tier": "default",
                        "system_fingerprint": "fp_fake",
                        "choices": [],
                        "usage": self.chat_usage(plan),
                    },
                    False,
                )
            )
        events.append((None, "[DONE]", False))
        self.start_stream(headers)
        self.send_events(plan, events, named=False)

    def handle_responses(self, body):
        plan = Plan(body, "openai", ("max_output_tokens",), self.server.cache)
        if plan.slow_start:
            time.sleep(2)
        headers = {"x-request-id": new_id("req_")}
        rid = new_id("resp_")
        created = int(time.time())
        usage = {
            "input_tokens": plan.input_tokens,
            "input_tokens_details": {"cached_tokens": plan.cache_read},
            "output_tokens": plan.output_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": plan.input_tokens + plan.output_tokens,
        }

        def response_obj(status, output, usage_obj):
            tools = body.get("tools") if isinstance(body.get("tools"), list) else []
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
                "max_tool_calls": None,
                "model": plan.model,
                "output": output,
                "parallel_tool_calls": body.get("parallel_tool_calls", True),
                "previous_response_id": body.get("previous_response_id"),
                "prompt_cache_key": body.get("prompt_cache_key"),
                "reasoning": {"effort": None, "summary": None},
                "safety_identifier": None,
                "service_tier": "default",
                "store": body.get("store", True),
                "temperature": body.get("temperature", 1.0),
                "text": {"format": {"type": "text"}, "verbosity": "medium"},
                "tool_choice": body.get("tool_choice", "auto"),
                "tools": tools,
                "top_logprobs": 0,
                "top_p": body.get("top_p", 1.0),
                "truncation": "disabled",
                "usage": usage_obj,
                "user": None,
                "metadata": body.get("metadata") or {},
            }

        item_id = new_id("msg_") if not plan.tool_use else "fc_01"
        if plan.tool_use:
            final_item = {
                "type": "function_call",
                "id": item_id,
                "call_id": "call_01",
                "name": plan.tool_name,
                "arguments": TOOL_ARGS_JSON,
                "status": "completed",
            }
        else:
            final_part = {"type": "output_text", "text": plan.reply, "annotations": [], "logprobs": []}
            final_item = {
                "type": "message",
                "id": item_id,
                "status": "completed",
                "role": "assistant",
                "content": [final_part],
            }

        if not plan.stream:
            return self.send_json(200, response_obj("completed", [final_item], usage), headers)

        seq = [0]

        def ev(etype, content=False, **fields):
            d = {"type": etype, "sequence_number": seq[0]}
            d.update(fields)
            seq[0] += 1
            return (etype, d, content)

        events = [
            ev("response.created", response=response_obj("in_progress", [], None)),
            ev("response.in_progress", response=response_obj("in_progress", [], None)),
        ]
        if plan.tool_use:
            added = dict(final_item, arguments="", status="in_progress")
            events.append(ev("response.output_item.added", output_index=0, item=added))
            for piece in plan.arg_chunks:
                events.append(
                    ev(
                        "response.function_call_arguments.delta",
                        content=True,
                        item_id=item_id,
                        output_index=0,
                        delta=piece,
                    )
                )
            events.append(
                ev(
                    "response.function_call_arguments.done",
                    item_id=item_id,
                    output_index=0,
                    name=plan.tool_name,
                    arguments=TOOL_ARGS_JSON,
                )
            )
        else:
            added = {"type": "message", "id": item_id, "status": "in_progress", "role": "assistant", "content": []}
            events.append(ev("response.output_item.added", output_index=0, item=added))
            events.append(
                ev(
                    "response.content_part.added",
                    item_id=item_id,
                    output_index=0,
                    content_index=0,
                    part={"type": "output_text", "text": "", "annotations": [], "logprobs": []},
                )
            )
            for piece in plan.deltas:
                events.append(
                    ev(
                        "response.output_text.delta",
                        content=True,
                        item_id=item_id,
                        output_index=0,
                        content_index=0,
                        delta=piece,
                        logprobs=[],
                    )
                )
            events.append(
                ev(
                    "response.output_text.done",
                    item_id=item_id,
                    output_index=0,
                    content_index=0,
                    text=plan.reply,
                    logprobs=[],
                )
            )
            events.append(
                ev(
                    "response.content_part.done",
                    item_id=item_id,
                    output_index=0,
                    content_index=0,
                    part=final_part,
                )
            )
        events.append(ev("response.output_item.done", output_index=0, item=final_item))
        events.append(ev("response.completed", response=response_obj("completed", [final_item], usage)))
        self.start_stream(headers)
        self.send_events(plan, events, named=True)


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def handle_error(self, request, client_address):
        if self.verbose:
            super().handle_error(request, client_address)


def main(argv=None):
    ap = argparse.ArgumentParser(description="Fake Anthropic/OpenAI provider for tests")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--anthropic-key", default=None)
    ap.add_argument("--openai-key", default=None)
    ap.add_argument("--log", default=None)
    ap.add_argument("--verbose", action="store_true", help="access log and tracebacks on stderr")
    args = ap.parse_args(argv)

    server = Server((args.host, args.port), Handler)
    server.anthropic_key = args.anthropic_key
    server.openai_key = args.openai_key
    server.log_path = args.log
    server.log_lock = threading.Lock()
    server.cache = CacheState()
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
