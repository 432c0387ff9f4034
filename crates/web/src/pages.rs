//! The dashboard's pages: server-rendered HTML from the JSON of lobby commands (`ls`, `stat`,
//! `share show`, ...), with forms that run lobby commands through `POST /api/exec`
//! (`static/app.js`). Works without a framework and on a phone.

use hyper::{Response, StatusCode};
use serde_json::Value;

use crate::{Principal, Web, WebBackend, WebBody, full};

/// Escapes text for HTML (element content and quoted attributes).
pub(crate) fn esc(s: &str) -> String {
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

const CSP: &str = "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; script-src 'self'; \
                   connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'";

pub(crate) fn page(title: &str, email: &str, body: &str, scripts: &[&str]) -> Response<WebBody> {
    let scripts: String = scripts
        .iter()
        .map(|s| format!("<script src=\"/static/{s}\" defer></script>"))
        .collect();
    let html = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
<title>{title} · nook</title><link rel=\"icon\" href=\"/static/favicon.svg\"><link rel=\"stylesheet\" href=\"/static/app.css\">{scripts}</head>\
<body><header><a class=\"brand\" href=\"/\">nook</a><nav><a href=\"/\">VMs</a>\
<a href=\"/account\">Account</a><form method=\"post\" action=\"/__nook/logout\">\
<button class=\"link\">Log out</button></form></nav></header>\
<main>{body}</main><footer class=\"muted\">Signed in as {email}</footer></body></html>",
        title = esc(title),
        email = esc(email),
    );
    let mut resp = full(StatusCode::OK, "text/html; charset=utf-8", html);
    if let Ok(v) = hyper::header::HeaderValue::from_str(CSP) {
        resp.headers_mut()
            .insert(hyper::header::CONTENT_SECURITY_POLICY, v);
    }
    resp
}

pub(crate) fn not_found() -> Response<WebBody> {
    full(
        StatusCode::NOT_FOUND,
        "text/html; charset=utf-8",
        "<!doctype html><meta name=\"viewport\" content=\"width=device-width\"><p>Not found. <a href=\"/\">Your VMs</a></p>",
    )
}

/// A page asked for by a browser that is not signed in: to the sign-in page, then back.
pub(crate) fn sign_in_first(path: &str) -> Response<WebBody> {
    let next: String =
        percent_encoding::utf8_percent_encode(path, percent_encoding::NON_ALPHANUMERIC).to_string();
    let mut resp = full(
        StatusCode::SEE_OTHER,
        "text/plain; charset=utf-8",
        "Sign in first\n",
    );
    if let Ok(v) = hyper::header::HeaderValue::from_str(&format!("/__nook/login?next={next}")) {
        resp.headers_mut().insert(hyper::header::LOCATION, v);
    }
    resp
}

fn error_box(message: &str) -> String {
    format!("<p class=\"error\" role=\"alert\">{}</p>", esc(message))
}

/// `ssh -p 2222 HOST` as `ssh -p 2222 NAME@HOST`.
fn ssh_to(base: &str, vm: &str) -> String {
    match base.rsplit_once(' ') {
        Some((head, host)) => format!("{head} {vm}@{host}"),
        None => format!("{base} {vm}@"),
    }
}

fn s<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key].as_str().unwrap_or("")
}

fn size(bytes: u64) -> String {
    const G: u64 = 1 << 30;
    const M: u64 = 1 << 20;
    if bytes >= G && bytes.is_multiple_of(G) {
        format!("{} GiB", bytes / G)
    } else if bytes >= G {
        format!("{:.1} GiB", bytes as f64 / G as f64)
    } else {
        format!("{} MiB", bytes / M)
    }
}

/// A form that runs a lobby command: `argv` is a JSON array whose `{field}` words are filled
/// from the form's inputs (a word whose field is empty is left out).
fn action(argv: &str, label: &str, fields: &str, extra: &str) -> String {
    format!(
        "<form class=\"cmd\" data-argv=\"{}\" {extra}>{fields}<button>{}</button><output></output></form>",
        esc(argv),
        esc(label)
    )
}

pub(crate) async fn vm_list<B: WebBackend>(web: &Web<B>, user: &Principal) -> Response<WebBody> {
    let ls = web.run(user, &["ls", "--json"]).await;
    let stat = web.run(user, &["stat", "--json"]).await;
    let mut body = String::from("<h1>Your VMs</h1>");
    match ls.json() {
        Some(Value::Array(vms)) if !vms.is_empty() => {
            body.push_str("<ul class=\"vms\">");
            for vm in &vms {
                let name = s(vm, "name");
                let state = s(vm, "state");
                let url = web.vm_url(name);
                let ssh = ssh_to(web.ssh_command(), name);
                body.push_str(&format!(
                    "<li class=\"vm\" data-vm=\"{n}\"><a class=\"name\" href=\"/vm/{n}\">{n}</a> \
<span class=\"state {st}\" title=\"{why}\">{st}</span><a class=\"url\" href=\"{u}\">{u}</a>\
<span class=\"actions\"><button type=\"button\" data-copy=\"{ssh}\" title=\"{ssh}\">Copy SSH</button>\
<a class=\"button\" href=\"/vm/{n}/terminal\">Terminal</a> <a class=\"button\" href=\"/vm/{n}/agent\">Agent</a></span></li>",
                    n = esc(name),
                    st = esc(state),
                    why = esc(s(vm, "state_reason")),
                    u = esc(&url),
                    ssh = esc(&ssh),
                ));
            }
            body.push_str("</ul>");
        }
        Some(_) => {
            body.push_str("<p class=\"muted\" id=\"no-vms\">No VMs yet: make one below.</p>")
        }
        None => body.push_str(&error_box(&ls.error())),
    }
    let shared = web.backend().shared_vms(user).await;
    if !shared.is_empty() {
        body.push_str("<section><h2>Shared with you</h2><ul class=\"vms\">");
        for (name, role) in &shared {
            let url = web.vm_url(name);
            let terminal = if role == "collaborator" {
                format!(
                    "<a class=\"button\" href=\"/vm/{}/terminal\">Terminal</a>",
                    esc(name)
                )
            } else {
                String::new()
            };
            body.push_str(&format!(
                "<li class=\"vm\"><span class=\"name\">{n}</span><span class=\"state\">{r}</span>\
<a class=\"url\" href=\"{u}\">{u}</a><span class=\"actions\">{terminal}</span></li>",
                n = esc(name),
                r = esc(role),
                u = esc(&url),
            ));
        }
        body.push_str("</ul></section>");
    }
    body.push_str(&format!(
        "<section><h2>New VM</h2>{}</section>",
        action(
            r#"["new","--name={name}","--image={image}","--cpu={cpu}","--memory={memory}","--disk={disk}","--prompt={prompt}","--json"]"#,
            "Create",
            "<label>Name <input name=\"name\" placeholder=\"made up if empty\" pattern=\"[a-z][a-z0-9\\-]*\" autocapitalize=\"off\"></label>\
<label>Image <select name=\"image\"><option value=\"default\">default (Debian, systemd, dev tools)</option><option value=\"tiny\">tiny (busybox, boots in seconds)</option></select></label>\
<label>vCPU <input name=\"cpu\" inputmode=\"numeric\" size=\"3\"></label>\
<label>Memory <input name=\"memory\" placeholder=\"1G\" size=\"6\"></label>\
<label>Disk <input name=\"disk\" placeholder=\"10G\" size=\"6\"></label>\
<label class=\"wide\">Build it for me <textarea name=\"prompt\" rows=\"2\" placeholder=\"optional: what the coding agent should build in it\"></textarea></label>",
            "id=\"new-vm\" data-events data-go=\"/vm/{name}\""
        )
    ));
    if let Some(env) = stat.json() {
        body.push_str(&envelope_html(&env));
    }
    body.push_str(&format!(
        "<p class=\"muted\">The same from a terminal: <code>{} ls</code></p>",
        esc(web.ssh_command())
    ));
    page("Your VMs", &user.email, &body, &["app.js"])
}

fn envelope_html(env: &Value) -> String {
    let mut out = String::from("<section id=\"usage\"><h2>Usage</h2><table>");
    let row = |what: &str, used: String, of: String| {
        format!(
            "<tr><th>{}</th><td>{} of {}</td></tr>",
            esc(what),
            esc(&used),
            esc(&of)
        )
    };
    let plan = &env["plan"];
    let num = |v: &Value| v.as_u64().unwrap_or(0);
    if plan.is_object() {
        out.push_str(&row(
            "VMs",
            format!("{} ({} running)", num(&env["vms"]), num(&env["running"])),
            num(&plan["max_vms"]).to_string(),
        ));
        out.push_str(&row(
            "Memory of running VMs",
            size(num(&env["running_memory_mib"]) << 20),
            size(num(&plan["memory_mib"]) << 20),
        ));
        if let Some(real) = env["memory_used_bytes"].as_u64() {
            out.push_str(&format!(
                "<tr><th>Memory really in use</th><td>{}</td></tr>",
                esc(&size(real))
            ));
        }
        out.push_str(&row(
            "Disk",
            size(num(&env["disk_bytes"])),
            size(num(&plan["disk_bytes"])),
        ));
        out.push_str(&format!(
            "<tr><th>vCPU</th><td>{}</td></tr>",
            num(&plan["cpu"])
        ));
    }
    if let Some(credit) = env["llm_credit"].as_str() {
        out.push_str(&format!(
            "<tr><th>LLM credit</th><td>{}</td></tr>",
            esc(credit)
        ));
    }
    out.push_str("</table></section>");
    out
}

pub(crate) async fn vm_page<B: WebBackend>(
    web: &Web<B>,
    user: &Principal,
    name: &str,
) -> Response<WebBody> {
    let stat = web.run(user, &["stat", name, "--json"]).await;
    let Some(vm) = stat.json().map(|v| v["vm"].clone()) else {
        let body = format!("<h1>{}</h1>{}", esc(name), error_box(&stat.error()));
        let mut resp = page(name, &user.email, &body, &["app.js"]);
        *resp.status_mut() = StatusCode::NOT_FOUND;
        return resp;
    };
    let share = web.run(user, &["share", "show", name, "--json"]).await;
    let n = esc(name);
    let state = s(&vm, "state");
    let ssh = ssh_to(web.ssh_command(), name);
    let mut body = format!(
        "<h1>{n} <span class=\"state {st}\" id=\"vm-state\">{st}</span></h1>\
<p><a class=\"button\" href=\"/vm/{n}/terminal\" id=\"open-terminal\">Terminal</a> \
<a class=\"button\" href=\"/vm/{n}/agent\" id=\"open-agent\">Agent</a> \
<button type=\"button\" data-copy=\"{ssh}\">Copy SSH command</button> <code>{ssh}</code></p>",
        st = esc(state),
        ssh = esc(&ssh),
    );
    let why = s(&vm, "state_reason");
    if !why.is_empty() {
        body.push_str(&format!(
            "<p class=\"reason\" id=\"vm-reason\">{}</p>",
            esc(why)
        ));
    }
    let facts = [
        ("vCPU", vm["cpu"].to_string()),
        ("Memory", size(vm["memory_mib"].as_u64().unwrap_or(0) << 20)),
        ("Disk", size(vm["disk_bytes"].as_u64().unwrap_or(0))),
        ("Image", s(&vm, "image").to_string()),
        ("Address", s(&vm, "guest_ip").to_string()),
    ];
    body.push_str("<table class=\"facts\">");
    for (k, v) in facts {
        if !v.is_empty() && v != "null" {
            body.push_str(&format!("<tr><th>{k}</th><td>{}</td></tr>", esc(&v)));
        }
    }
    body.push_str("</table><section><h2>Power</h2><div class=\"row\">");
    let argv = |cmd: &str| format!(r#"["{cmd}","{name}","--json"]"#);
    let running = state == "running";
    let power: &[(&str, &str)] = if running {
        &[("stop", "Stop"), ("restart", "Restart")]
    } else {
        &[("start", "Start")]
    };
    for &(cmd, label) in power {
        body.push_str(&action(
            &argv(cmd),
            label,
            "",
            &format!("id=\"{cmd}\" data-events data-then=\"reload\""),
        ));
    }
    body.push_str("</div></section><section><h2>Clone, rename, resize</h2>");
    body.push_str(&action(
        &format!(r#"["cp","{name}","{{new}}","--json"]"#),
        "Clone",
        "<label>New name <input name=\"new\" placeholder=\"made up if empty\" autocapitalize=\"off\"></label>",
        "id=\"clone\" data-events data-show",
    ));
    body.push_str(&action(
        &format!(r#"["rename","{name}","{{new}}","--json"]"#),
        "Rename",
        "<label>New name <input name=\"new\" required autocapitalize=\"off\"></label>",
        "id=\"rename\" data-go=\"/vm/{new}\"",
    ));
    body.push_str(&action(
        &format!(r#"["resize","{name}","--cpu={{cpu}}","--memory={{memory}}","--disk={{disk}}","--json"]"#),
        "Resize",
        "<label>vCPU <input name=\"cpu\" inputmode=\"numeric\" size=\"3\"></label>\
<label>Memory <input name=\"memory\" size=\"6\" placeholder=\"2G\"></label>\
<label>Disk <input name=\"disk\" size=\"6\" placeholder=\"20G\"></label>",
        "id=\"resize\" data-then=\"reload\"",
    ));
    body.push_str("</section>");
    body.push_str(&sharing_html(name, share.json().as_ref(), &share.error()));
    body.push_str(&format!(
        "<section class=\"danger\"><h2>Delete</h2>{}</section>",
        action(
            &format!(r#"["rm","{name}","--json"]"#),
            "Delete this VM and its disk",
            "",
            &format!("id=\"delete\" data-confirm=\"Delete {n} and everything on its disk? This cannot be undone.\" data-go=\"/\""),
        )
    ));
    page(name, &user.email, &body, &["app.js"])
}

fn sharing_html(name: &str, share: Option<&Value>, err: &str) -> String {
    let Some(share) = share else {
        return format!("<section><h2>Sharing</h2>{}</section>", error_box(err));
    };
    let public = share["public"].as_bool().unwrap_or(false);
    let url = s(share, "url");
    let mut out = format!(
        "<section id=\"sharing\"><h2>Sharing</h2><p><a href=\"{u}\">{u}</a> is <b id=\"access\">{}</b>.</p><div class=\"row\">",
        if public { "public" } else { "private" },
        u = esc(url),
    );
    let set = if public { "set-private" } else { "set-public" };
    out.push_str(&action(
        &format!(r#"["share","{set}","{name}","--json"]"#),
        if public {
            "Make private"
        } else {
            "Make public"
        },
        "",
        "id=\"toggle-public\" data-then=\"reload\"",
    ));
    out.push_str(&action(
        &format!(r#"["share","add-link","{name}","--json"]"#),
        "Make a share link",
        "",
        "id=\"add-link\" data-show=\"url\"",
    ));
    out.push_str("</div><ul class=\"people\">");
    if let Some(people) = share["people"].as_array() {
        for p in people {
            let email = s(p, "email");
            out.push_str(&format!(
                "<li>{} <span class=\"muted\">{}</span>{}</li>",
                esc(email),
                esc(s(p, "role")),
                action(
                    &serde_json::json!(["share", "remove", name, email, "--json"]).to_string(),
                    "Remove",
                    "",
                    "data-then=\"reload\"",
                )
            ));
        }
    }
    out.push_str("</ul>");
    out.push_str(&action(
        &format!(r#"["share","add","{name}","{{email}}","--role={{role}}","--json"]"#),
        "Share",
        "<label>Email <input name=\"email\" type=\"email\" required autocapitalize=\"off\"></label>\
<label>Role <select name=\"role\"><option>viewer</option><option>collaborator</option></select></label>",
        "id=\"share-email\" data-then=\"reload\"",
    ));
    let links = share["links"].as_u64().unwrap_or(0);
    if links > 0 {
        out.push_str(&format!(
            "<p class=\"muted\">{links} share link(s) live.</p>"
        ));
    }
    match share["api"].as_str() {
        Some(cmds) => {
            out.push_str(&format!(
                "<p>The VM may call the API for: <code>{}</code></p>",
                esc(cmds)
            ));
            out.push_str(&action(
                &format!(r#"["share","api","{name}","--off","--json"]"#),
                "Take API access away",
                "",
                "data-then=\"reload\"",
            ));
        }
        None => out.push_str(&action(
            &format!(r#"["share","api","{name}","--cmds={{cmds}}","--json"]"#),
            "Let the VM call the API",
            "<label>Commands <input name=\"cmds\" value=\"ls,cp\" required></label>",
            "data-then=\"reload\"",
        )),
    }
    out.push_str("</section>");
    out
}

pub(crate) async fn account<B: WebBackend>(web: &Web<B>, user: &Principal) -> Response<WebBody> {
    let keys = web.run(user, &["ssh-key", "list", "--json"]).await;
    let tokens = web.run(user, &["token", "list", "--json"]).await;
    let stat = web.run(user, &["stat", "--json"]).await;
    let mut body = String::from("<h1>Account</h1><section><h2>SSH keys</h2><ul class=\"keys\">");
    match keys.json() {
        Some(Value::Array(list)) => {
            for k in &list {
                let fp = s(k, "fingerprint");
                body.push_str(&format!(
                    "<li><code>{}</code> {}{}</li>",
                    esc(fp),
                    esc(s(k, "comment")),
                    action(
                        &serde_json::json!(["ssh-key", "remove", fp, "--json"]).to_string(),
                        "Remove",
                        "",
                        "data-confirm=\"Remove this key? Tokens it signed stop working.\" data-then=\"reload\"",
                    )
                ));
            }
        }
        _ => body.push_str(&error_box(&keys.error())),
    }
    body.push_str("</ul>");
    body.push_str(&action(
        r#"["ssh-key","add","{key}","--json"]"#,
        "Add key",
        "<label>Public key <input name=\"key\" placeholder=\"ssh-ed25519 AAAA… you@laptop\" required></label>",
        "data-show",
    ));
    body.push_str("</section><section><h2>Tokens</h2><ul class=\"tokens\">");
    match tokens.json() {
        Some(Value::Array(list)) => {
            for t in &list {
                let id = s(t, "id");
                let what = match s(t, "kind") {
                    "api" => format!(
                        "API: {} {}",
                        s(t, "cmds"),
                        t["vm"]
                            .as_str()
                            .map_or(String::new(), |v| format!("on {v}"))
                    ),
                    _ => format!("web: {}", s(t, "vm")),
                };
                body.push_str(&format!(
                    "<li><code>{}</code> {}{}</li>",
                    esc(id),
                    esc(&what),
                    action(
                        &serde_json::json!(["token", "revoke", id, "--json"]).to_string(),
                        "Revoke",
                        "",
                        "data-then=\"reload\"",
                    )
                ));
            }
        }
        _ => body.push_str(&error_box(&tokens.error())),
    }
    body.push_str("</ul>");
    body.push_str(&action(
        r#"["token","create","--api","--cmds={cmds}","--vm={vm}","--expires={expires}","--json"]"#,
        "Make an API token",
        "<label>Commands <input name=\"cmds\" value=\"ls\" required></label>\
<label>Only VM <input name=\"vm\" placeholder=\"any\" autocapitalize=\"off\"></label>\
<label>Expires <input name=\"expires\" placeholder=\"90d\" size=\"5\"></label>",
        "id=\"api-token\" data-show=\"token\"",
    ));
    body.push_str("</section>");
    if let Some(env) = stat.json() {
        body.push_str(&envelope_html(&env));
    }
    page("Account", &user.email, &body, &["app.js"])
}

pub(crate) fn terminal(user: &Principal, name: &str) -> Response<WebBody> {
    let body = format!(
        "<div class=\"term-head\"><a href=\"/vm/{n}\">{n}</a> <span id=\"term-status\" class=\"muted\">connecting…</span></div>\
<div id=\"terminal\" data-vm=\"{n}\"></div>\
<div class=\"keys\" id=\"term-keys\"><button data-key=\"\\u001b\">Esc</button><button data-key=\"\\t\">Tab</button>\
<button data-key=\"\\u0003\">^C</button><button data-key=\"\\u0004\">^D</button>\
<button data-key=\"\\u001b[A\">↑</button><button data-key=\"\\u001b[B\">↓</button>\
<button data-key=\"\\u001b[D\">←</button><button data-key=\"\\u001b[C\">→</button></div>",
        n = esc(name)
    );
    page(
        &format!("{name} terminal"),
        &user.email,
        &format!("<link rel=\"stylesheet\" href=\"/static/xterm.css\">{body}"),
        &["xterm.js", "addon-fit.js", "term.js"],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_and_ssh_commands() {
        assert_eq!(
            esc("<a href=\"x\">'&"),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;"
        );
        assert_eq!(
            ssh_to("ssh -p 2222 nook.example", "blog"),
            "ssh -p 2222 blog@nook.example"
        );
        assert_eq!(size(1 << 30), "1 GiB");
        assert_eq!(size(512 << 20), "512 MiB");
    }
}
