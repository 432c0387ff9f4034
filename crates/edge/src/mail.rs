//! Magic-link email over SMTP (lettre, rustls with aws-lc-rs).

use lettre::message::Mailbox;
use lettre::message::header::ContentType;
use lettre::transport::smtp::authentication::Credentials;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};

use crate::error::EdgeError;
use crate::pages;

/// How to reach the SMTP server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SmtpSecurity {
    /// Plain SMTP (a local relay or a test sink).
    None,
    /// STARTTLS upgrade (usually port 587).
    StartTls,
    /// Implicit TLS (usually port 465).
    Tls,
}

/// SMTP settings; when present, the login page offers an email form.
#[derive(Clone)]
pub struct SmtpConfig {
    pub host: String,
    pub port: u16,
    pub security: SmtpSecurity,
    /// Username and password, if the server wants them.
    pub credentials: Option<(String, String)>,
    /// The From address, e.g. `nook <nook@example.com>`.
    pub from: String,
}

impl std::fmt::Debug for SmtpConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmtpConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("security", &self.security)
            .field("from", &self.from)
            .finish_non_exhaustive()
    }
}

/// Sends nook's emails over one SMTP transport.
pub struct Mailer {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
}

impl Mailer {
    pub fn new(cfg: &SmtpConfig) -> Result<Self, EdgeError> {
        let mail_err = |e: lettre::transport::smtp::Error| EdgeError::Mail(Box::new(e));
        let builder = match cfg.security {
            SmtpSecurity::None => {
                AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&cfg.host)
            }
            SmtpSecurity::StartTls => {
                AsyncSmtpTransport::<Tokio1Executor>::starttls_relay(&cfg.host).map_err(mail_err)?
            }
            SmtpSecurity::Tls => {
                AsyncSmtpTransport::<Tokio1Executor>::relay(&cfg.host).map_err(mail_err)?
            }
        };
        let mut builder = builder.port(cfg.port);
        if let Some((user, pass)) = &cfg.credentials {
            builder = builder.credentials(Credentials::new(user.clone(), pass.clone()));
        }
        let from: Mailbox = cfg
            .from
            .parse()
            .map_err(|_| EdgeError::Config(format!("invalid SMTP from address {:?}", cfg.from)))?;
        Ok(Self {
            transport: builder.build(),
            from,
        })
    }

    pub(crate) async fn send_login_link(&self, to: &str, link: &str) -> Result<(), EdgeError> {
        self.send(
            to,
            pages::LOGIN_EMAIL_SUBJECT,
            pages::login_email_text(link),
        )
        .await
    }

    /// Mails the link that confirms `to` for the account that signed up with `key` (its
    /// fingerprint, so the reader can tell whether it was them).
    pub async fn send_confirm_link(
        &self,
        to: &str,
        link: &str,
        key: &str,
    ) -> Result<(), EdgeError> {
        self.send(
            to,
            pages::CONFIRM_EMAIL_SUBJECT,
            pages::confirm_email_text(link, key),
        )
        .await
    }

    async fn send(&self, to: &str, subject: &str, body: String) -> Result<(), EdgeError> {
        let to: Mailbox = to.parse().map_err(|e| EdgeError::Mail(Box::new(e)))?;
        let message = Message::builder()
            .from(self.from.clone())
            .to(to)
            .subject(subject)
            .header(ContentType::TEXT_PLAIN)
            .body(body)
            .map_err(|e| EdgeError::Mail(Box::new(e)))?;
        self.transport
            .send(message)
            .await
            .map_err(|e| EdgeError::Mail(Box::new(e)))?;
        Ok(())
    }
}
