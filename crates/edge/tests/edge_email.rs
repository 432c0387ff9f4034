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
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let (r, mut w) = s.into_split();
                let mut lines = BufReader::new(r).lines();
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

    // The login page offers the email form when SMTP is configured.
    let r = h.curl().get(&h.url("nook.localhost", "/")).await;
    assert!(r.body.contains("type=\"email\""), "{}", r.body);

    // Unknown addresses get the same page and no mail.
    let r = h
        .curl()
        .arg("--data-urlencode")
        .arg("email=nobody@example.com")
        .get(&h.url("nook.localhost", "/__nook/email"))
        .await;
    assert_eq!(r.status, 200);
    let unknown_body = r.body.clone();

    let next = h.url("blog.nook.localhost", "/inbox");
    let r = h
        .curl()
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
    let r = h.curl().jar(jar.path()).arg("-L").get(&link).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["path"], "/inbox");
    assert_eq!(
        r.upstream_header("x-nook-user-email").as_deref(),
        Some("ann@example.com")
    );
}
