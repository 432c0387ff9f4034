//! Every page and message a browser or HTTP client sees from the edge itself. Nothing here
//! includes an internal error's text: only names the viewer typed (escaped) and fixed copy.

use bytes::Bytes;
use hyper::header::{CACHE_CONTROL, CONTENT_TYPE, HeaderValue};
use hyper::{Response, StatusCode};

/// Escapes text for HTML element content and attribute values.
pub(crate) fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;max-width:40rem;margin:4rem auto;padding:0 1rem;color:#222}\
h1{font-size:1.4rem}code{background:#f2f2f2;padding:.1rem .3rem;border-radius:3px}\
table{border-collapse:collapse;width:100%}td,th{text-align:left;padding:.3rem .5rem;border-bottom:1px solid #ddd}\
input,button{font-size:1rem;padding:.3rem .5rem}.muted{color:#777}";

fn layout(title: &str, body: &str) -> String {
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">\
<title>{t}</title><style>{STYLE}</style></head><body>{body}</body></html>",
        t = escape(title)
    )
}

/// An HTML response the edge generated itself. Never cached: it may depend on the session.
pub(crate) fn html<B: From<Bytes>>(status: StatusCode, title: &str, body: &str) -> Response<B> {
    let mut resp = Response::new(B::from(Bytes::from(layout(title, body))));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    h.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    resp
}

/// What kind of edge-generated page to show.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Page {
    /// A VM that does not exist, or that the viewer may not see: identical on purpose.
    NoSuchVm { name: String },
    /// A host name that is neither the dashboard nor one label under it.
    UnknownHost,
    /// A path the edge reserves on VM hosts (`/__nook/...`) or does not serve on the dashboard.
    NotFound,
    /// The VM refused or did not accept the connection.
    VmUnreachable { name: String, port: u16 },
    /// The VM accepted but did not answer in time.
    VmTimeout { name: String, port: u16 },
    /// Credentials were sent and are not valid for this VM.
    Unauthorized,
    /// A login link that is unknown, used or expired.
    LoginLinkInvalid,
    /// A login link for another account, opened where someone is signed in: never a silent
    /// switch of account (someone may have sent it to sign the viewer in as themselves).
    LoginLinkForAnotherAccount { signed_in: String, link_for: String },
    /// A handoff code that is unknown, used, expired or meant for another host.
    HandoffInvalid,
    /// The daemon's store failed.
    Internal,
    /// A port outside 3000–9999 was asked for.
    BadPort,
    /// Not a GET/POST where the edge expects one.
    MethodNotAllowed,
    /// An `Upgrade` to anything but a WebSocket.
    UpgradeNotSupported,
    /// A signed-in browser's request that changes something (or opens a WebSocket) came from
    /// another site: it may be that site acting as the viewer.
    CrossSite,
    /// Too many sign-in emails asked for from one address or for one email.
    TooManyEmails,
    /// A form body that was too large, too slow or not readable.
    BadForm,
}

impl Page {
    pub(crate) fn status(&self) -> StatusCode {
        match self {
            Page::NoSuchVm { .. } | Page::NotFound => StatusCode::NOT_FOUND,
            Page::UnknownHost => StatusCode::MISDIRECTED_REQUEST,
            Page::VmUnreachable { .. } => StatusCode::BAD_GATEWAY,
            Page::VmTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            Page::Unauthorized => StatusCode::UNAUTHORIZED,
            Page::LoginLinkInvalid | Page::HandoffInvalid | Page::BadPort => {
                StatusCode::BAD_REQUEST
            }
            Page::LoginLinkForAnotherAccount { .. } => StatusCode::CONFLICT,
            Page::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            Page::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Page::UpgradeNotSupported => StatusCode::BAD_REQUEST,
            Page::CrossSite => StatusCode::FORBIDDEN,
            Page::TooManyEmails => StatusCode::TOO_MANY_REQUESTS,
            Page::BadForm => StatusCode::BAD_REQUEST,
        }
    }

    fn title_and_body(&self) -> (String, String) {
        match self {
            Page::NoSuchVm { name } => (
                "No such VM".into(),
                format!(
                    "<h1>No such VM</h1><p>There is no VM called <code>{}</code> here, or you do not have access to it.</p>",
                    escape(name)
                ),
            ),
            Page::UnknownHost => (
                "Unknown host".into(),
                "<h1>Unknown host</h1><p>This server does not serve that host name.</p>".into(),
            ),
            Page::NotFound => ("Not found".into(), "<h1>Not found</h1><p>There is nothing at this address.</p>".into()),
            Page::VmUnreachable { name, port } => (
                format!("{name} is not answering"),
                format!(
                    "<h1>{n} is not answering</h1><p>The VM <code>{n}</code> did not accept a connection on port {port}. \
Is it running, and is a server listening on port {port}?</p>",
                    n = escape(name)
                ),
            ),
            Page::VmTimeout { name, port } => (
                format!("{name} timed out"),
                format!(
                    "<h1>{n} timed out</h1><p>The VM <code>{n}</code> accepted the request on port {port} but did not answer in time.</p>",
                    n = escape(name)
                ),
            ),
            Page::Unauthorized => (
                "Not authorized".into(),
                "<h1>Not authorized</h1><p>The credentials sent are not valid for this VM.</p>".into(),
            ),
            Page::LoginLinkInvalid => (
                "Login link expired".into(),
                "<h1>This login link is not valid</h1><p>Login links work once and expire after a few minutes. \
Ask for a new one.</p><p><a href=\"/\">Back to login</a></p>"
                    .into(),
            ),
            Page::LoginLinkForAnotherAccount {
                signed_in,
                link_for,
            } => (
                "Already signed in".into(),
                format!(
                    "<h1>You are signed in as {}</h1><p>This login link is for <code>{}</code>, so it was not used. If you meant to switch accounts, <a href=\"/__nook/logout\">sign out</a> first and ask for a new link; if you did not ask for it, ignore it.</p>",
                    escape(signed_in),
                    escape(link_for)
                ),
            ),
            Page::HandoffInvalid => (
                "Sign-in expired".into(),
                "<h1>Sign-in did not complete</h1><p>The sign-in step expired, was already used, or was started in another browser. Open the page you wanted again.</p>"
                    .into(),
            ),
            Page::Internal => (
                "Something went wrong".into(),
                "<h1>Something went wrong</h1><p>nook could not handle this request. Try again in a moment.</p>".into(),
            ),
            Page::BadPort => (
                "Port not available".into(),
                "<h1>Port not available</h1><p>Only ports 3000 to 9999 of a VM can be opened this way.</p>".into(),
            ),
            Page::MethodNotAllowed => (
                "Method not allowed".into(),
                "<h1>Method not allowed</h1>".into(),
            ),
            Page::UpgradeNotSupported => (
                "Upgrade not supported".into(),
                "<h1>Upgrade not supported</h1><p>nook passes on WebSocket upgrades only; other protocol upgrades are refused.</p>".into(),
            ),
            Page::CrossSite => (
                "Cross-site request refused".into(),
                "<h1>Cross-site request refused</h1><p>This request came from another site, which could be acting as you without your knowledge, so it was not carried out. \
If you meant to do this, open this site directly and try again from its own pages.</p>"
                    .into(),
            ),
            Page::TooManyEmails => (
                "Too many requests".into(),
                "<h1>Too many sign-in emails</h1><p>Too many sign-in links were asked for recently. Wait a few minutes before asking again, or sign in over SSH.</p>".into(),
            ),
            Page::BadForm => (
                "Form not received".into(),
                "<h1>Form not received</h1><p>The form could not be read. Go back and send it again.</p>".into(),
            ),
        }
    }

    pub(crate) fn response<B: From<Bytes>>(&self) -> Response<B> {
        let (title, body) = self.title_and_body();
        let mut resp = html(self.status(), &title, &body);
        if *self == Page::Unauthorized {
            // Lets git and curl retry with a token as the basic-auth password.
            resp.headers_mut().insert(
                hyper::header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"nook\""),
            );
        }
        resp
    }
}

/// A hidden form field, or nothing without a value.
fn hidden(name: &str, value: Option<&str>) -> String {
    value
        .map(|v| {
            format!(
                "<input type=\"hidden\" name=\"{name}\" value=\"{}\">",
                escape(v)
            )
        })
        .unwrap_or_default()
}

/// The dashboard's login page.
pub(crate) fn login_page<B: From<Bytes>>(
    ssh_hint: &str,
    email_enabled: bool,
    next: Option<&str>,
) -> Response<B> {
    let next_field = hidden("next", next);
    let email = if email_enabled {
        format!(
            "<h2>Email</h2><form method=\"post\" action=\"/__nook/email\">{next_field}\
<input type=\"email\" name=\"email\" required placeholder=\"you@example.com\"> <button>Send me a link</button></form>\
<h2>SSH</h2>"
        )
    } else {
        String::new()
    };
    let body = format!(
        "<h1>Sign in to nook</h1>{email}<p>Run <code>{}</code> and open the link it prints in this browser.</p>",
        escape(ssh_hint)
    );
    html(StatusCode::OK, "Sign in to nook", &body)
}

/// Asks a browser with no session to confirm a login link before it is used: a link alone
/// (sent by someone else, or opened by a page) must not sign a browser in to whatever account
/// it is for. The token travels on in the form, never in a URL the browser keeps.
pub(crate) fn login_confirm_page<B: From<Bytes>>(
    token: &str,
    next: Option<&str>,
    state: Option<&str>,
) -> Response<B> {
    let body = format!(
        "<h1>Sign in to nook</h1><p>Continue only if you asked for this sign-in link yourself. \
If someone sent it to you, close this page: it would sign you in to their account.</p>\
<form method=\"post\" action=\"/__nook/login\">{}{}{}<button id=\"sign-in\">Sign in</button></form>",
        hidden("token", Some(token)),
        hidden("next", next),
        hidden("state", state),
    );
    html(StatusCode::OK, "Sign in to nook", &body)
}

/// Asked before a signed-in user is handed on to a VM on which they have no role (a public
/// VM, or one they were lured to): another account's site, which should not get a session
/// for them without their say.
pub(crate) fn handoff_confirm_page<B: From<Bytes>>(
    site: &str,
    email: &str,
    next: &str,
    state: Option<&str>,
) -> Response<B> {
    let body = format!(
        "<h1>Continue to {site}?</h1><p>You are signed in to nook as {email}. \
You have no role on <b>{site}</b>: another account runs it, and nook tells it who you are \
only once its owner shares it with you. Continue only if you meant to open it.</p>\
<form method=\"post\" action=\"/__nook/continue\">{}{}\
<button id=\"continue\">Continue to {site}</button></form><p><a href=\"/\">Back to your dashboard</a></p>",
        hidden("next", Some(next)),
        hidden("state", state),
        site = escape(site),
        email = escape(email),
    );
    html(StatusCode::OK, "Continue?", &body)
}

pub(crate) fn email_sent_page<B: From<Bytes>>() -> Response<B> {
    html(
        StatusCode::OK,
        "Check your email",
        "<h1>Check your email</h1><p>If an account uses that address, a sign-in link is on its way. It works once, for a few minutes.</p>",
    )
}

/// The email body of a magic link.
pub(crate) fn login_email_text(link: &str) -> String {
    format!(
        "Open this link to sign in to nook:\n\n{link}\n\nIt works once and expires in a few minutes. \
If you did not ask for it, ignore this email.\n"
    )
}

pub(crate) const LOGIN_EMAIL_SUBJECT: &str = "Your nook sign-in link";

/// The email body that proves an address given at signup.
pub(crate) fn confirm_email_text(link: &str, key: &str) -> String {
    format!(
        "Someone signed up for nook with this address and the SSH key {key}.\n\n\
If that was you, open this link and press Sign in to confirm the address:\n\n{link}\n\n\
It works once and expires in a few minutes. If it was not you, ignore this email: the address \
grants that account nothing until it is confirmed.\n"
    )
}

pub(crate) const CONFIRM_EMAIL_SUBJECT: &str = "Confirm your email for nook";

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup() {
        assert_eq!(
            escape("<a href='x'>&\""),
            "&lt;a href=&#39;x&#39;&gt;&amp;&quot;"
        );
    }

    #[test]
    fn missing_and_forbidden_vm_look_the_same() {
        let a: Response<http_body_util::Full<Bytes>> =
            Page::NoSuchVm { name: "x".into() }.response();
        assert_eq!(a.status(), StatusCode::NOT_FOUND);
    }
}
