//! The coding agent's chat: `/vm/NAME/agent` (the page) and
//! `/vm/NAME/agent/ID/events` (its events as server-sent events, numbered, so the browser's
//! EventSource resumes with `Last-Event-ID` after a dropped connection and misses nothing).
//!
//! Served on the dashboard's origin only, never on the VM's: the VM's app shares its own
//! origin, and its scripts could otherwise drive the agent as whoever visits.

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response, StatusCode, header};
use serde_json::Value;

use crate::pages::{self, esc};
use crate::{Principal, Web, WebBackend, WebBody, text};

/// How often the stream re-checks that the viewer may still use the agent in the VM (and
/// sends a comment line, which keeps proxies from closing a quiet stream).
const HEARTBEAT: Duration = Duration::from_secs(15);

pub(crate) async fn page<B: WebBackend>(
    web: &Web<B>,
    user: &Principal,
    name: &str,
    query: Option<&str>,
) -> Response<WebBody> {
    let list = web.run(user, &["agent", "ls", name, "--json"]).await;
    let Some(Value::Array(convs)) = list.json() else {
        let body = format!(
            "<h1>{}</h1><p class=\"error\" role=\"alert\">{}</p>",
            esc(name),
            esc(&list.error())
        );
        let mut resp = pages::page(name, &user.email, &body, &[]);
        *resp.status_mut() = StatusCode::NOT_FOUND;
        return resp;
    };
    let wanted = query
        .and_then(|q| {
            form_urlencoded::parse(q.as_bytes())
                .find(|(k, _)| k == "c")
                .map(|(_, v)| v.into_owned())
        })
        .filter(|c| convs.iter().any(|v| v["id"].as_str() == Some(c.as_str())));
    let current = wanted.as_deref();
    let state = convs
        .iter()
        .find(|v| v["id"].as_str() == current)
        .and_then(|v| v["state"].as_str())
        .unwrap_or("idle");
    let n = esc(name);
    let mut list_html = format!(
        "<li><a href=\"/vm/{n}/agent\" class=\"{}\">+ New conversation</a></li>",
        if current.is_none() { "current" } else { "" }
    );
    for c in &convs {
        let id = c["id"].as_str().unwrap_or_default();
        list_html.push_str(&format!(
            "<li><a href=\"/vm/{n}/agent?c={id}\" class=\"{cur}\"><span class=\"title\">{t}</span> <span class=\"state {st}\">{st}</span></a></li>",
            id = esc(id),
            cur = if Some(id) == current { "current" } else { "" },
            t = esc(c["title"].as_str().unwrap_or_default()),
            st = esc(c["state"].as_str().unwrap_or_default()),
        ));
    }
    let body = format!(
        "<div class=\"agent-head\"><a href=\"/vm/{n}\">{n}</a> · agent <a class=\"url\" href=\"{url}\" target=\"_blank\" rel=\"noopener\">{url}</a></div>\
<div class=\"agent\" id=\"agent\" data-vm=\"{n}\" data-conversation=\"{c}\" data-state=\"{st}\">\
<details class=\"convs\" {open}><summary>Conversations ({count})</summary><ul>{list_html}</ul></details>\
<section class=\"chat\"><ol id=\"chat-log\" class=\"chat-log\" aria-live=\"polite\"></ol>\
<div id=\"todo\" class=\"todo\" hidden></div>\
<form id=\"chat-form\" class=\"chat-form\"><textarea name=\"prompt\" id=\"chat-prompt\" rows=\"3\" required \
placeholder=\"{ph}\"></textarea><div class=\"row\"><button id=\"chat-send\">Send</button>\
<button type=\"button\" id=\"chat-stop\" class=\"danger\" hidden>Stop</button><output id=\"chat-status\"></output></div></form>\
</section></div>",
        url = esc(&web.vm_url(name)),
        c = esc(current.unwrap_or_default()),
        st = esc(state),
        open = if convs.is_empty() { "" } else { "open" },
        count = convs.len(),
        ph = if current.is_some() {
            "Tell the agent what to do next"
        } else {
            "What should the agent build in this VM?"
        },
    );
    pages::page(
        &format!("{name} agent"),
        &user.email,
        &body,
        &["app.js", "agent.js"],
    )
}

/// The conversation's events from `Last-Event-ID` (or `?after=N`) on, for as long as the
/// browser listens.
pub(crate) async fn events<B: WebBackend>(
    web: &Web<B>,
    req: Request<Incoming>,
    user: Principal,
    vm: &str,
    conversation: &str,
) -> Response<WebBody> {
    let after = req
        .headers()
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .or_else(|| {
            req.uri().query().and_then(|q| {
                form_urlencoded::parse(q.as_bytes())
                    .find(|(k, _)| k == "after")
                    .and_then(|(_, v)| v.parse().ok())
            })
        })
        .unwrap_or(0);
    let stream = match web
        .backend()
        .agent_events(&user, vm, conversation, after)
        .await
    {
        Ok(s) => s,
        Err(message) => return text(StatusCode::NOT_FOUND, &message),
    };
    let backend = web.backend().clone();
    let vm = vm.to_string();
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(64);
    tokio::spawn(async move {
        let mut stream = stream;
        let _ = tx.send(Bytes::from_static(b"retry: 1000\n\n")).await;
        // Access is checked again on a clock, not only when the stream is quiet: a share taken
        // away ends a stream that is busy too.
        let mut recheck = tokio::time::interval(HEARTBEAT);
        recheck.tick().await;
        loop {
            let frame = tokio::select! {
                next = stream.next() => match next {
                    Some((seq, json)) => format!("id: {seq}\ndata: {json}\n\n"),
                    None => return,
                },
                _ = recheck.tick() => {
                    if !backend.may_use_agent(&user, &vm).await {
                        let _ = tx
                            .send(Bytes::from_static(
                                b"event: gone\ndata: {\"message\":\"You no longer have access to this VM\"}\n\n",
                            ))
                            .await;
                        return;
                    }
                    ": ping\n\n".to_string()
                }
            };
            if tx.send(Bytes::from(frame)).await.is_err() {
                return;
            }
        }
    });
    let body = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
    });
    let mut resp = Response::new(StreamBody::new(body).boxed_unsync());
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/event-stream"),
    );
    h.insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    h.insert("x-accel-buffering", header::HeaderValue::from_static("no"));
    resp
}
