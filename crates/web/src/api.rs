//! The HTTPS API: `POST /api/exec` runs one lobby command line and answers with exactly what
//! the lobby prints (so `--json` output is byte-identical to `ssh HOST CMD --json`), its exit
//! status in `X-Nook-Exit`, and with `Accept: text/event-stream` the steps of a long command
//! as they happen. `GET /api/vms` is `ls --json`.
//!
//! Who may call it: a bearer token (opaque `nookapi_...`, or `nooksig....` signed by one of
//! the account's SSH keys), or a signed-in dashboard page, whose request must prove it comes
//! from the dashboard itself (`Origin`), or a VM its owner allowed (`share api`), through the
//! metadata address, which the daemon serves with [`exec_response`].

use bytes::Bytes;

use http_body_util::BodyExt;
use hyper::body::Body;
use hyper::{HeaderMap, Method, Request, Response, StatusCode, header};
use serde_json::json;
use tokio::sync::mpsc;

use crate::{
    ExecEvent, Limits, Principal, Visitor, Web, WebBackend, WebBody, full, signed, unix_now,
};

/// The largest request body: a command line, or JSON with a setup script as its stdin.
pub const MAX_BODY: usize = 256 * 1024;
/// The longest command line, as over SSH.
const MAX_COMMAND: usize = 64 * 1024;

/// An error in the lobby's own shape: `{"error": {"code", "message"}}`.
pub fn error(status: StatusCode, code: &str, message: &str) -> Response<WebBody> {
    let body = format!(
        "{}\n",
        json!({ "error": { "code": code, "message": message } })
    );
    full(status, "application/json", body)
}

pub(crate) async fn handle<B: WebBackend>(
    web: &Web<B>,
    req: Request<hyper::body::Incoming>,
    visitor: &Visitor,
    rest: &str,
) -> Response<WebBody> {
    let method = req.method().clone();
    let (is_json, sse) = body_kind(req.headers());
    let headers = req.headers().clone();
    // Who it is comes from the headers, before the body is read in full. Either way the body
    // is read (bounded) before the answer: an HTTP/2 client still sending it when the answer
    // comes gets a reset stream, which curl reports as a framing error instead of the answer.
    let who = match authenticate(web, &headers, &method, visitor).await {
        Ok(who) => who,
        Err(resp) => {
            let _ = drain(req.into_body(), REFUSED_DRAIN).await;
            return resp;
        }
    };
    let body = match read_body(req.into_body()).await {
        Ok(b) => b,
        Err(resp) => return resp,
    };
    match (rest, method) {
        ("exec", Method::POST) => {
            exec_response(web.backend(), &web.ops, &who, &body, is_json, sse).await
        }
        ("vms", Method::GET) => {
            exec_response(web.backend(), &web.ops, &who, b"ls --json", false, false).await
        }
        (op, Method::GET) if op.starts_with("ops/") => {
            let id = &op["ops/".len()..];
            let after = headers
                .get("last-event-id")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            web.ops
                .stream(id, &who.account_id, after)
                .unwrap_or_else(|| {
                    error(
                        StatusCode::NOT_FOUND,
                        "not_found",
                        "No such operation: it ended more than 5 minutes ago, or is not yours",
                    )
                })
        }
        ("exec" | "vms", _) => error(
            StatusCode::METHOD_NOT_ALLOWED,
            "usage",
            "Use POST /api/exec with a command line as the body, or GET /api/vms",
        ),
        _ => error(
            StatusCode::NOT_FOUND,
            "not_found",
            "No such API endpoint: use POST /api/exec (see docs/api.md)",
        ),
    }
}

/// What a request to `/api/exec` asks for: whether its body is JSON (else a command line),
/// and whether it wants the answer as server-sent events.
pub fn body_kind(headers: &HeaderMap) -> (bool, bool) {
    let has = |name, what: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.contains(what))
    };
    (
        has(header::CONTENT_TYPE, "application/json"),
        has(header::ACCEPT, "text/event-stream"),
    )
}

/// Past [`MAX_BODY`], how much more is read and dropped so the client hears the 413 instead
/// of a reset connection; a client sending more than this is cut off.
const DRAIN_LIMIT: usize = 16 << 20;

/// What is read and dropped of a refused (unauthenticated) request's body.
const REFUSED_DRAIN: usize = 64 * 1024;
/// How long a client has to send its request body.
const BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Reads and drops at most `limit` bytes of a body, for at most a second.
async fn drain<T>(body: T, limit: usize)
where
    T: Body<Data = Bytes> + Send,
{
    let mut body = std::pin::pin!(body);
    let mut seen = 0;
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), async {
        while let Some(Ok(frame)) = body.frame().await {
            seen += frame.data_ref().map_or(0, Bytes::len);
            if seen > limit {
                break;
            }
        }
    })
    .await;
}

/// Reads a request body of at most [`MAX_BODY`] bytes, within [`BODY_TIMEOUT`].
pub async fn read_body<T>(body: T) -> Result<Bytes, Response<WebBody>>
where
    T: Body<Data = Bytes> + Send,
    T::Error: std::error::Error + Send + Sync + 'static,
{
    match tokio::time::timeout(BODY_TIMEOUT, read_body_now(body)).await {
        Ok(result) => result,
        Err(_) => Err(error(
            StatusCode::REQUEST_TIMEOUT,
            "bad_request",
            "The request body did not arrive in time",
        )),
    }
}

async fn read_body_now<T>(body: T) -> Result<Bytes, Response<WebBody>>
where
    T: Body<Data = Bytes> + Send,
    T::Error: std::error::Error + Send + Sync + 'static,
{
    let mut body = std::pin::pin!(body);
    let mut kept = bytes::BytesMut::new();
    let mut seen = 0usize;
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else {
            return Err(error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                "The request body could not be read",
            ));
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        seen += data.len();
        if seen <= MAX_BODY {
            kept.extend_from_slice(&data);
        } else if seen > MAX_BODY + DRAIN_LIMIT {
            break;
        }
    }
    if seen > MAX_BODY {
        return Err(error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            &format!(
                "The request body is over {} KiB: send one command line (and at most that much stdin)",
                MAX_BODY >> 10
            ),
        ));
    }
    Ok(kept.freeze())
}

/// Who is calling: a bearer token, or the dashboard's session (same origin only for anything
/// but GET). A request with a token never uses the cookie, so a token can't be widened by it.
async fn authenticate<B: WebBackend>(
    web: &Web<B>,
    headers: &HeaderMap,
    method: &Method,
    visitor: &Visitor,
) -> Result<Principal, Response<WebBody>> {
    let unauthorized = |m: &str| error(StatusCode::UNAUTHORIZED, "unauthorized", m);
    let internal = |e: crate::BackendError| {
        tracing::error!(error = %e, "API authentication failed");
        error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "Internal error; try again",
        )
    };
    if let Some(auth) = headers.get(header::AUTHORIZATION) {
        let token = auth
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .ok_or_else(|| unauthorized("Send the token as Authorization: Bearer TOKEN"))?;
        if token.starts_with(signed::PREFIX) {
            let t = signed::verify(token, unix_now())
                .map_err(|e| unauthorized(&format!("Refused: {e}")))?;
            let who = web
                .backend()
                .account_for_key(&t.fingerprint)
                .await
                .map_err(internal)?
                .ok_or_else(|| {
                    unauthorized(&format!(
                        "Refused: the key {} that signed this token is not a key of any account (removed?)",
                        t.fingerprint
                    ))
                })?;
            return Ok(Principal {
                limits: Some(Limits {
                    cmds: t.permissions.cmds.join(","),
                    vms: t.permissions.vms,
                    what: "This token",
                }),
                ..who
            });
        }
        return web
            .backend()
            .exec_token(token)
            .await
            .map_err(internal)?
            .ok_or_else(|| {
                unauthorized("Refused: the token is unknown, revoked or expired (see token list)")
            });
    }
    let Some(user) = visitor.user.clone() else {
        return Err(unauthorized(
            "Sign in, or send Authorization: Bearer TOKEN (make one with `token create --api --cmds ls`; see docs/api.md)",
        ));
    };
    if *method != Method::GET && *method != Method::HEAD && !visitor.same_origin {
        return Err(error(
            StatusCode::FORBIDDEN,
            "cross_site",
            "Refused: a signed-in browser may call the API only from nook's own pages",
        ));
    }
    Ok(user)
}

/// The command line a body carries: plain text (`ls --json`), or JSON
/// `{"cmd": "ls --json"}` / `{"argv": ["ls", "--json"]}`, either with an optional `stdin`.
pub fn parse_body(body: &[u8], is_json: bool) -> Result<(Vec<String>, Option<Vec<u8>>), String> {
    let (argv, stdin) = if is_json || body.first() == Some(&b'{') {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Exec {
            cmd: Option<String>,
            argv: Option<Vec<String>>,
            stdin: Option<String>,
        }
        let e: Exec = serde_json::from_slice(body).map_err(|e| {
            format!("The body is not valid JSON of the form {{\"cmd\": \"ls --json\"}}: {e}")
        })?;
        let argv = match (e.cmd, e.argv) {
            (Some(cmd), None) => split_words(&cmd)?,
            (None, Some(argv)) => argv,
            _ => {
                return Err(
                    "Give exactly one of \"cmd\" (a command line) and \"argv\" (its words)".into(),
                );
            }
        };
        (argv, e.stdin.map(String::into_bytes))
    } else {
        let line =
            std::str::from_utf8(body).map_err(|_| "The command line is not UTF-8".to_string())?;
        (split_words(line.trim_end_matches(['\r', '\n']))?, None)
    };
    if argv.iter().map(String::len).sum::<usize>() > MAX_COMMAND {
        return Err(format!(
            "The command line is over {} KiB",
            MAX_COMMAND >> 10
        ));
    }
    if argv.is_empty() {
        return Err("The body is empty: send a command line such as `ls --json`".into());
    }
    Ok((argv, stdin))
}

/// Splits a command line into words as a shell would for simple quoting: '...', "..." and
/// backslash escapes; no expansion of any kind.
pub fn split_words(line: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            '\'' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => word.push(c),
                        None => return Err("The command line has an unterminated ' quote".into()),
                    }
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(c) => word.push(c),
                            None => {
                                return Err("The command line has an unterminated \" quote".into());
                            }
                        },
                        Some(c) => word.push(c),
                        None => return Err("The command line has an unterminated \" quote".into()),
                    }
                }
            }
            '\\' => {
                in_word = true;
                match chars.next() {
                    Some(c) => word.push(c),
                    None => return Err("The command line ends with a backslash".into()),
                }
            }
            c => {
                in_word = true;
                word.push(c);
            }
        }
    }
    if in_word {
        words.push(word);
    }
    Ok(words)
}

/// Runs the command a body carries as `who` and answers: the lobby's own output (stdout on
/// success; stdout then stderr on failure) with `X-Nook-Exit`, or, when `events`, an SSE
/// stream of `step`, `stdout`, `stderr` and a final `exit` event.
pub async fn exec_response<B: WebBackend>(
    backend: &std::sync::Arc<B>,
    ops: &crate::ops::Ops,
    who: &Principal,
    body: &[u8],
    is_json: bool,
    events: bool,
) -> Response<WebBody> {
    let (argv, stdin) = match parse_body(body, is_json) {
        Ok(v) => v,
        Err(message) => return error(StatusCode::BAD_REQUEST, "usage", &message),
    };
    if events {
        let Some((id, writer)) = ops.start(&who.account_id) else {
            return too_many();
        };
        let backend = backend.clone();
        let who_owned = who.clone();
        // The command runs to its end even if the client goes (a `new` stopped half way
        // would leave more behind than a finished one), so it runs in a task of its own.
        tokio::spawn(async move {
            let (tx, rx) = mpsc::unbounded_channel();
            let (exit, ()) = futures::join!(
                backend.exec(&who_owned, argv, stdin, tx),
                pump_events(rx, &writer)
            );
            writer.push("exit", &json!({ "exit": exit }));
        });
        return ops.stream(&id, &who.account_id, 0).unwrap_or_else(|| {
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "Internal error",
            )
        });
    }
    // A slot like a streamed command's, so one account runs a bounded number at once; and
    // its own task, so a client that goes away does not stop `new` or `cp` half way.
    let Some((_, slot)) = ops.start(&who.account_id) else {
        return too_many();
    };
    let (tx, rx) = mpsc::unbounded_channel();
    let task = {
        let backend = backend.clone();
        let who = who.clone();
        tokio::spawn(async move {
            let exit = backend.exec(&who, argv, stdin, tx).await;
            slot.push("exit", &json!({ "exit": exit }));
            exit
        })
    };
    let exit = task.await.unwrap_or(1);
    let (stdout, stderr, failed) = collect(rx);
    let status = match (exit, failed) {
        (0, _) => StatusCode::OK,
        (_, Some(status)) => {
            StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
        }
        (2, None) => StatusCode::BAD_REQUEST,
        (_, None) => StatusCode::INTERNAL_SERVER_ERROR,
    };
    let mut body = stdout;
    if exit != 0 {
        body.extend_from_slice(&stderr);
    }
    let content_type = if body.first().is_some_and(|b| *b == b'{' || *b == b'[') {
        "application/json"
    } else {
        "text/plain; charset=utf-8"
    };
    let mut resp = full(status, content_type, body);
    resp.headers_mut()
        .insert("x-nook-exit", header::HeaderValue::from(exit));
    resp
}

fn too_many() -> Response<WebBody> {
    error(
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limited",
        "Too many commands running at once: wait for some to finish",
    )
}

/// Turns a command's output into an operation's events until it ends.
async fn pump_events(mut rx: mpsc::UnboundedReceiver<ExecEvent>, op: &crate::ops::OpWriter) {
    while let Some(event) = rx.recv().await {
        match event {
            ExecEvent::Step(step) => op.push("step", &json!({ "step": step })),
            ExecEvent::Stdout(b) => {
                op.push("stdout", &json!({ "text": String::from_utf8_lossy(&b) }))
            }
            ExecEvent::Stderr(b) => {
                op.push("stderr", &json!({ "text": String::from_utf8_lossy(&b) }))
            }
            ExecEvent::Failed(status) => op.push("failed", &json!({ "status": status })),
        }
    }
}

/// Everything a finished command printed, stdout and stderr apart, and the HTTP status of
/// its (last) error.
pub(crate) fn collect(
    mut rx: mpsc::UnboundedReceiver<ExecEvent>,
) -> (Vec<u8>, Vec<u8>, Option<u16>) {
    let (mut stdout, mut stderr, mut failed) = (Vec::new(), Vec::new(), None);
    while let Ok(event) = rx.try_recv() {
        match event {
            ExecEvent::Stdout(b) => stdout.extend_from_slice(&b),
            ExecEvent::Stderr(b) => stderr.extend_from_slice(&b),
            ExecEvent::Step(_) => {}
            ExecEvent::Failed(status) => failed = Some(status),
        }
    }
    (stdout, stderr, failed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_split_like_a_simple_shell() {
        assert_eq!(
            split_words("share add  blog 'a b' \"c\\\"d\" e\\ f").expect("split"),
            ["share", "add", "blog", "a b", "c\"d", "e f"]
        );
        assert_eq!(split_words("''").expect("empty word"), [""]);
        assert!(split_words("new 'x").is_err());
        assert!(split_words("new x\\").is_err());
    }

    #[test]
    fn bodies_are_lines_or_json() {
        let (argv, stdin) = parse_body(b"ls --json\n", false).expect("line");
        assert_eq!(argv, ["ls", "--json"]);
        assert!(stdin.is_none());
        let (argv, stdin) = parse_body(
            br#"{"argv": ["new", "--setup-script", "-"], "stdin": "echo hi"}"#,
            true,
        )
        .expect("json");
        assert_eq!(argv, ["new", "--setup-script", "-"]);
        assert_eq!(stdin.as_deref(), Some(&b"echo hi"[..]));
        assert!(parse_body(br#"{"cmd": "ls", "argv": ["ls"]}"#, true).is_err());
        assert!(parse_body(br#"{"cmd": "ls""#, true).is_err());
        assert!(parse_body(b"", false).is_err());
        assert!(parse_body(br#"{"cmd": "ls", "bogus": 1}"#, true).is_err());
    }
}
