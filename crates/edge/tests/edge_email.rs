//! Email magic links against a tiny in-test SMTP sink.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use nook_edge::{Access, SmtpConfig, SmtpSecurity};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

/// Speaks just enough SMTP for lettre and hands every message body to the channel.
async fn smtp_sink() -> (u16, mpsc::UnboundedReceiver<String>) {
    smtp_sink_slow(Duration::ZERO).await
}

/// A sink that waits `greeting_delay` before greeting each connection, as a slow relay would.
async fn smtp_sink_slow(greeting_delay: Duration) -> (u16, mpsc::UnboundedReceiver<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let (r, mut w) = s.into_split();
                let mut lines = BufReader::new(r).lines();
                tokio::time::sleep(greeting_delay).await;
                w.write_all(b"220 sink ESMTP\r\n").await.unwrap();
                let mut data: Option<String> = None;
                while let Ok(Some(line)) = lines.next_line().await {
                    if let Some(d) = &mut data {
                        if line == "." {
                            tx.send(std::mem::take(d)).unwrap();
                            data = None;
                            w.write_all(b"250 queued\r\n").await.unwrap();
                        } else {
                            d.push_str(&line);
                            d.push('\n');
                        }
                        continue;
                    }
                    let verb = line
                        .split_whitespace()
                        .next()
                        .unwrap_or("")
                        .to_ascii_uppercase();
                    let reply: &[u8] = match verb.as_str() {
                        "EHLO" => b"250-sink\r\n250 8BITMIME\r\n",
                        "HELO" | "MAIL" | "RCPT" | "RSET" | "NOOP" => b"250 ok\r\n",
                        "DATA" => {
                            data = Some(String::new());
                            b"354 go on\r\n"
                        }
                        "QUIT" => {
                            let _ = w.write_all(b"221 bye\r\n").await;
                            return;
                        }
                        _ => b"502 no\r\n",
                    };
                    w.write_all(reply).await.unwrap();
                }
            });
        }
    });
    (port, rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn email_magic_link_logs_in_and_returns_to_the_vm() {
    let (smtp_port, mut mails) = smtp_sink().await;
    let h = Harness::start_with(|c| {
        c.smtp = Some(SmtpConfig {
            host: "127.0.0.1".into(),
            port: smtp_port,
            security: SmtpSecurity::None,
            credentials: None,
            from: "nook <nook@nook.localhost>".into(),
        })
    })
    .await;
    let up = start_upstream().await;
    h.backend.add_user("u1", "ann@example.com");
    h.backend.add_vm("blog", up, false);
    h.backend.grant("u1", "blog", Access::Owner);

    // The form is posted from the dashboard's own page.
    let origin = format!("Origin: https://nook.localhost:{}", h.port);
    // The login page offers the email form when SMTP is configured.
    let r = h.curl().get(&h.url("nook.localhost", "/")).await;
    assert!(r.body.contains("type=\"email\""), "{}", r.body);

    // Unknown addresses get the same page and no mail.
    let r = h
        .curl()
        .header(&origin)
        .arg("--data-urlencode")
        .arg("email=nobody@example.com")
        .get(&h.url("nook.localhost", "/__nook/email"))
        .await;
    assert_eq!(r.status, 200);
    let unknown_body = r.body.clone();

    let next = h.url("blog.nook.localhost", "/inbox");
    let r = h
        .curl()
        .header(&origin)
        .arg("--data-urlencode")
        .arg("email=ann@example.com")
        .arg("--data-urlencode")
        .arg(format!("next={next}"))
        .get(&h.url("nook.localhost", "/__nook/email"))
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.body, unknown_body,
        "the page must not reveal whether the address has an account"
    );

    let mail = tokio::time::timeout(Duration::from_secs(10), mails.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(mail.contains("To: ann@example.com"), "{mail}");
    assert!(mail.contains("Subject: Your nook sign-in link"), "{mail}");
    let mail = mail.replace("=\n", "").replace("=3D", "=");
    let start = mail.find("https://nook.localhost").unwrap();
    let link: String = mail[start..]
        .chars()
        .take_while(|c| !c.is_whitespace())
        .collect();
    assert!(link.contains("/__nook/login?token="), "{link}");
    assert!(
        tokio::time::timeout(Duration::from_millis(300), mails.recv())
            .await
            .is_err(),
        "no mail for unknown addresses"
    );

    let jar = tempfile::NamedTempFile::new().unwrap();
    let page = h.curl().jar(jar.path()).arg("-L").get(&link).await;
    let r = h.press_sign_in(jar.path(), &page, true).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["path"], "/inbox");
    assert_eq!(
        r.upstream_header("x-nook-user-email").as_deref(),
        Some("ann@example.com")
    );
}

/// Sign-in emails cannot be used to tell who has an account (the answer and its timing are
/// the same, even when the mail relay is slow), nor to flood an inbox or probe at speed:
/// limits per email and per source address answer 429.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_email_login_probes_accounts_or_floods_inboxes() {
    // The relay is far slower than any answer may take, so an answer that waited for the mail
    // is told from a slow one on a loaded host (a 2 s relay against a 1.5 s bound was close).
    const RELAY_DELAY: Duration = Duration::from_secs(10);
    let (smtp_port, mut mails) = smtp_sink_slow(RELAY_DELAY).await;
    let h = Harness::start_with(|c| {
        c.smtp = Some(SmtpConfig {
            host: "127.0.0.1".into(),
            port: smtp_port,
            security: SmtpSecurity::None,
            credentials: None,
            from: "nook <nook@nook.localhost>".into(),
        });
        c.email_limits = nook_edge::EmailLimits {
            per_source: 6,
            per_email: 2,
            window: Duration::from_secs(600),
        };
    })
    .await;
    h.backend.add_user("u1", "ann@example.com");
    let origin = format!("Origin: https://nook.localhost:{}", h.port);
    let ask = |email: &str| {
        h.curl()
            .header(&origin)
            .arg("--data-urlencode")
            .arg(format!("email={email}"))
    };
    let url = h.url("nook.localhost", "/__nook/email");

    // Known and unknown: the same page, and neither waits for the (slow) relay.
    let t = std::time::Instant::now();
    let known = ask("ann@example.com").get(&url).await;
    let known_took = t.elapsed();
    let t = std::time::Instant::now();
    let unknown = ask("nobody@example.com").get(&url).await;
    let unknown_took = t.elapsed();
    assert_eq!((known.status, unknown.status), (200, 200));
    assert_eq!(known.body, unknown.body);
    assert!(
        known_took < RELAY_DELAY / 2,
        "the answer waited for the mail: {known_took:?} (unknown: {unknown_took:?})"
    );
    let mail = tokio::time::timeout(RELAY_DELAY * 3, mails.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(mail.contains("To: ann@example.com"), "{mail}");

    // Per email (in any case): the third ask within the window is refused, known or not.
    let r = ask("ANN@example.com").get(&url).await;
    assert_eq!(r.status, 200);
    let r = ask("ann@example.com").get(&url).await;
    assert_eq!(r.status, 429, "{r:?}");
    assert!(r.body.contains("Too many sign-in emails"), "{}", r.body);
    let r = ask("nobody@example.com").get(&url).await;
    assert_eq!(r.status, 200);
    let r = ask("nobody@example.com").get(&url).await;
    assert_eq!(r.status, 429);

    // Per source: six asks in all got past the source's limit; the seventh does not, whatever
    // the address asked for.
    let r = ask("someone-new@example.com").get(&url).await;
    assert_eq!(r.status, 429, "{r:?}");
}
