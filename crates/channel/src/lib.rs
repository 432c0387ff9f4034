//! The host channel: how the hosts of a fleet reach each other's VMs.
//!
//! Every connection is TLS with a certificate on both ends, issued by the fleet's CA
//! ([`FleetCa`]): a host accepts only hosts of its fleet and dials only them, checking the
//! name it meant to reach. The daemon keeps the CA in the shared store, sealed with the
//! fleet's secrets key, and issues itself a certificate for its host name at each start.
//!
//! One connection carries one request ([`Request`], a JSON line of at most
//! [`MAX_REQUEST`] bytes), one answer ([`Reply`], a JSON line), and then:
//! - for `Connect`, the bytes of a TCP connection the answering host opened to one of its
//!   VMs, so the edge of any host proxies to a VM on another host just as to its own;
//! - for `Shell`, a process the answering host started in one of its VMs through the guest
//!   agent: [`ShellIn`] lines one way and [`ShellOut`] lines the other (at most
//!   [`MAX_FRAME`] bytes each), so the SSH front door of any host opens shells anywhere;
//! - for `Lobby`, a lobby command about one of the answering host's VMs (or one placed
//!   there), run for the user the asking host authenticated: [`LobbyOut`] lines back;
//! - for `Move`, a VM the asking host hands over: [`MoveIn`] and [`MoveOut`] lines, and the
//!   disk's files as raw bytes after each `File` line; for `Memory`, the raw migration
//!   stream of a running VM that moves.
//!
//! The channel only carries; deciding who may reach a VM stays with the front door that
//! authenticated the user.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

mod join;
pub use join::{
    JOIN_ALPN, JoinGrant, JoinRequest, JoinToken, MAX_JOIN_LINE, fingerprint, join, secret_digest,
};

/// The longest request line a host reads from a peer: a lobby command with a setup script
/// on stdin (1 MiB) in base64, and room to spare. Only a peer that proved itself a host of
/// the fleet gets to send one.
pub const MAX_REQUEST: usize = 2 << 20;
/// How long a dialled host has to take the connection and answer the request.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a connecting peer has to prove itself (the TLS handshake with its certificate).
pub const PROVE_TIMEOUT: Duration = Duration::from_secs(3);
/// Connections still proving themselves at once: anyone who can reach the port can open
/// these, so they are few and short, and kept apart from the sessions of proven hosts.
pub const MAX_UNPROVEN: usize = 256;
/// Sessions of proven hosts served at once; more wait in the kernel's backlog.
pub const MAX_CONNECTIONS: usize = 4096;
/// A connection whose other end stops answering (a host that lost power, a cut link) is
/// given up after about this long, so no session waits on it for ever.
const DEAD_PEER: Duration = Duration::from_secs(30);
/// The channel's port when `--host-addr` names none.
pub const DEFAULT_PORT: u16 = 2280;
/// The most bytes one [`ShellIn::Data`] or [`ShellOut`] frame may carry; senders split.
pub const CHUNK: usize = 64 << 10;
/// The longest shell frame line: a [`CHUNK`] in base64, and room to spare. A longer line
/// ends the session.
pub const MAX_FRAME: usize = 128 << 10;

#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("certificate: {0}")]
    Certificate(#[from] rcgen::Error),
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
    #[error("the fleet CA is not valid PEM: {0}")]
    Pem(String),
    #[error("{0:?} is not a host name a certificate can carry")]
    BadName(String),
    #[error("cannot reach host {host} at {addr}: {source}")]
    Unreachable {
        host: String,
        addr: String,
        source: std::io::Error,
    },
    #[error("host {host} did not answer in time")]
    Timeout { host: String },
    #[error("host {host} refused: {why}")]
    Refused { host: String, why: String },
    #[error("host {host} answered with something that is not the channel's: {why}")]
    Protocol { host: String, why: String },
}

/// The fleet's certificate authority: a key and a self-signed certificate.
pub struct FleetCa {
    cert_pem: String,
    key: KeyPair,
}

impl std::fmt::Debug for FleetCa {
    // The key stays out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FleetCa").finish_non_exhaustive()
    }
}

fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "nook");
    dn.push(DnType::CommonName, "nook fleet CA");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = time::OffsetDateTime::now_utc() - time::Duration::days(1);
    params.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(3650);
    params
}

impl FleetCa {
    /// A new CA, for the first host of a fleet.
    pub fn generate() -> Result<FleetCa, ChannelError> {
        let key = KeyPair::generate()?;
        let cert = ca_params().self_signed(&key)?;
        Ok(FleetCa {
            cert_pem: cert.pem(),
            key,
        })
    }

    /// The CA as the store keeps it: its certificate, then its key, PEM.
    pub fn to_pem(&self) -> String {
        format!("{}{}", self.cert_pem, self.key.serialize_pem())
    }

    /// The CA from [`FleetCa::to_pem`]'s text.
    pub fn from_pem(pem: &str) -> Result<FleetCa, ChannelError> {
        let split = pem
            .find("-----BEGIN PRIVATE KEY-----")
            .ok_or_else(|| ChannelError::Pem("no private key".into()))?;
        let (cert_pem, key_pem) = pem.split_at(split);
        CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| ChannelError::Pem(e.to_string()))?;
        Ok(FleetCa {
            cert_pem: cert_pem.to_string(),
            key: KeyPair::from_pem(key_pem)?,
        })
    }

    /// A certificate for host `name`, good for both ends of the channel.
    pub fn issue(&self, name: &str) -> Result<HostIdentity, ChannelError> {
        let key = KeyPair::generate()?;
        let mut leaf = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        leaf.distinguished_name = dn;
        leaf.subject_alt_names = vec![SanType::DnsName(
            name.to_string()
                .try_into()
                .map_err(|_| ChannelError::BadName(name.to_string()))?,
        )];
        leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        leaf.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        leaf.use_authority_key_identifier_extension = true;
        leaf.not_before = time::OffsetDateTime::now_utc() - time::Duration::days(1);
        leaf.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(365);
        let issuer = Issuer::new(ca_params(), &self.key);
        let cert = leaf.signed_by(&key, &issuer)?;
        let ca = CertificateDer::from_pem_slice(self.cert_pem.as_bytes())
            .map_err(|e| ChannelError::Pem(e.to_string()))?;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.clone())?;
        let roots = Arc::new(roots);
        let chain = vec![cert.der().clone()];
        let private = PrivateKeyDer::try_from(key.serialize_der())
            .map_err(|e| ChannelError::Pem(e.to_string()))?;
        let ca_sha256 = fingerprint(&ca);
        // A joining host has no certificate yet: it checks this one by the CA's hash
        // (`join.rs`), so the CA goes along.
        let mut join_server = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(vec![chain[0].clone(), ca.clone()], private.clone_key())?;
        join_server.alpn_protocols = vec![JOIN_ALPN.to_vec()];
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            roots.clone(),
            provider.clone(),
        )
        .build()
        .map_err(|e| ChannelError::Pem(e.to_string()))?;
        let server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), private.clone_key())?;
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, private)?;
        Ok(HostIdentity {
            name: name.to_string(),
            server: Arc::new(server),
            join_server: Arc::new(join_server),
            client: Arc::new(client),
            ca_sha256,
        })
    }
}

/// A host's side of the channel: its certificate, and the fleet's CA to check peers by.
#[derive(Clone)]
pub struct HostIdentity {
    name: String,
    server: Arc<rustls::ServerConfig>,
    /// For hosts joining (no client certificate; ALPN [`JOIN_ALPN`]).
    join_server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
    ca_sha256: [u8; 32],
}

impl HostIdentity {
    /// The SHA-256 of the fleet CA's certificate, which join tokens carry.
    pub fn ca_sha256(&self) -> [u8; 32] {
        self.ca_sha256
    }
}

impl std::fmt::Debug for HostIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostIdentity")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// What one host asks of another.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// A TCP connection to `port` of the VM `vm_id`, which runs on the answering host.
    Connect { vm_id: String, port: u16 },
    /// A shell or command in the VM `vm_id`, as its SSH front door would start it there.
    Shell { vm_id: String, shell: ShellRequest },
    /// A lobby command, run here for a caller the asking host authenticated and whose
    /// limits it checked.
    Lobby(LobbyRequest),
    /// Take over the VM `vm_id` from the asking host, which holds it: its disk comes as
    /// [`MoveIn`] frames and files, and, when `live`, its memory over a [`Request::Memory`]
    /// connection.
    Move { vm_id: String, live: bool },
    /// The memory stream of the live move that answered [`MoveOut::Listening`] with `token`.
    Memory { vm_id: String, token: String },
    /// Keep a replica of the disk of VM `vm_id`, which the asking host holds: its frozen
    /// layers come as in a move (`Offer`, the files asked for, `Commit`), with no top.
    Replica { vm_id: String },
}

/// What the moving host sends the receiving one, in order: `Offer`; the files asked for,
/// each a `File` line followed by exactly `size` raw bytes; then `Commit` (a stopped VM), or
/// `Launch`, the top as a `File` while the source is paused, `Commit` (answered `Received`)
/// and `Released` once the sender's QEMU has ended (a running one).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum MoveIn {
    Offer(MoveOffer),
    /// `name` is `image/FILE`, `layer/FILE`, `vm/FILE` or `top`.
    File {
        name: String,
        size: u64,
    },
    Launch,
    Commit,
    /// The sender's QEMU has ended and its lease is released.
    Released,
}

/// What a moving VM's disk is made of, so the receiver can ask only for what it lacks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MoveOffer {
    /// The image build's directory name (e.g. `default-20261201T105847Z`) and its files.
    pub image: String,
    pub image_files: Vec<(String, u64)>,
    /// The frozen layers under the top, nearest first.
    pub layers: Vec<(String, u64)>,
    /// The VM's own small files (its SSH keys).
    pub vm_files: Vec<(String, u64)>,
    /// The size of the top (for a running VM, as it was when the move began).
    pub top: u64,
}

/// What the receiving host answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum MoveOut {
    /// The files it lacks: the image build (all of it) and these layers.
    Want {
        image: bool,
        layers: Vec<String>,
    },
    /// Its QEMU waits for the memory, over a [`Request::Memory`] with this token.
    Listening {
        token: String,
    },
    /// It holds the top.
    Took,
    /// It holds all of a running VM's state, paused: the sender may end its QEMU.
    Received,
    /// The VM is its now.
    Done,
    Failed {
        why: String,
    },
}

/// How long a file of `size` bytes may take to cross: a minute, and a second for every
/// 8 MiB (a link slower than that is given up on rather than holding the VM's lock).
fn file_time(size: u64) -> Duration {
    Duration::from_secs(60 + size / (8 << 20))
}

/// The longest [`MoveIn`] or [`MoveOut`] line.
const MAX_MOVE_LINE: usize = 1 << 20;

/// One end of a move: JSON lines, and raw file bytes after a [`MoveIn::File`].
pub struct MoveLink<S> {
    stream: S,
}

impl<S: AsyncRead + tokio::io::AsyncWrite + Unpin> MoveLink<S> {
    pub async fn send<T: Serialize>(&mut self, msg: &T) -> Result<(), String> {
        let mut line = serde_json::to_vec(msg).map_err(|e| e.to_string())?;
        line.push(b'\n');
        self.stream
            .write_all(&line)
            .await
            .map_err(|e| e.to_string())?;
        self.stream.flush().await.map_err(|e| e.to_string())
    }

    /// The next line; `None` when the other end closed.
    pub async fn recv<T: serde::de::DeserializeOwned>(&mut self) -> Result<Option<T>, String> {
        let mut line = Vec::new();
        let mut limited =
            BufReader::with_capacity(1, (&mut self.stream).take(MAX_MOVE_LINE as u64 + 1));
        let n = limited
            .read_until(b'\n', &mut line)
            .await
            .map_err(|e| e.to_string())?;
        if n == 0 {
            return Ok(None);
        }
        if line.pop() != Some(b'\n') {
            return Err(format!("a line over {MAX_MOVE_LINE} bytes, or cut short"));
        }
        serde_json::from_slice(&line)
            .map(Some)
            .map_err(|e| e.to_string())
    }

    /// Sends `file` whole as `name`: `size` is what it holds now, and exactly that much goes.
    pub async fn send_file(
        &mut self,
        name: &str,
        file: &mut tokio::fs::File,
        size: u64,
    ) -> Result<(), String> {
        self.send(&MoveIn::File {
            name: name.to_string(),
            size,
        })
        .await?;
        let copied = tokio::time::timeout(
            file_time(size),
            tokio::io::copy(&mut file.take(size), &mut self.stream),
        )
        .await
        .map_err(|_| format!("{name} did not go through in time"))?
        .map_err(|e| e.to_string())?;
        if copied != size {
            return Err(format!("{name} shrank while it was sent"));
        }
        self.stream.flush().await.map_err(|e| e.to_string())
    }

    /// Receives the `size` bytes of a file announced by [`MoveIn::File`] into `to`.
    pub async fn recv_file<W: tokio::io::AsyncWrite + Unpin>(
        &mut self,
        size: u64,
        to: &mut W,
    ) -> Result<(), String> {
        let copied = tokio::time::timeout(
            file_time(size),
            tokio::io::copy(&mut (&mut self.stream).take(size), to),
        )
        .await
        .map_err(|_| "a file did not come through in time".to_string())?
        .map_err(|e| e.to_string())?;
        if copied != size {
            return Err("the sending host went away mid-file".into());
        }
        to.flush().await.map_err(|e| e.to_string())
    }
}

/// A lobby command passed on to the host that holds its VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LobbyRequest {
    /// The caller's account (`None`: the host's admin, when `admin`).
    pub account_id: Option<String>,
    pub admin: bool,
    pub key_openssh: String,
    pub fingerprint: String,
    pub peer: Option<std::net::IpAddr>,
    /// Whether the caller's output is a terminal.
    pub tty: bool,
    pub argv: Vec<String>,
    /// What the command reads from stdin, read by the asking host.
    #[serde(default, with = "opt_b64")]
    pub stdin: Option<Vec<u8>>,
}

/// What a passed-on lobby command writes, in order, ending with `Exit`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum LobbyOut {
    /// At most [`CHUNK`] bytes, as is `Err`.
    Out(#[serde(with = "nook_proto::b64")] Vec<u8>),
    Err(#[serde(with = "nook_proto::b64")] Vec<u8>),
    /// A step of a long command.
    Step {
        step: String,
        json: bool,
    },
    /// The command failed with this error (already written).
    Failed {
        error: serde_json::Value,
    },
    Exit(u32),
}

mod opt_b64 {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(data: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        match data {
            Some(d) => nook_proto::b64::serialize(d, s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
        #[derive(Deserialize)]
        struct Wrap(#[serde(with = "nook_proto::b64")] Vec<u8>);
        Ok(Option::<Wrap>::deserialize(d)?.map(|w| w.0))
    }
}

/// What to start for [`Request::Shell`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShellRequest {
    /// `None`: the login shell; otherwise `SHELL -c COMMAND`.
    pub command: Option<String>,
    pub env: Vec<(String, String)>,
    pub pty: Option<ShellPty>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShellPty {
    pub term: String,
    pub cols: u32,
    pub rows: u32,
}

/// From the host with the user to the process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum ShellIn {
    /// At most [`CHUNK`] bytes.
    Data(#[serde(with = "nook_proto::b64")] Vec<u8>),
    Eof,
    Resize {
        cols: u32,
        rows: u32,
    },
    Signal(i32),
    Hangup,
}

/// From the process to the host with the user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum ShellOut {
    /// At most [`CHUNK`] bytes, as is `Stderr`.
    Stdout(#[serde(with = "nook_proto::b64")] Vec<u8>),
    Stderr(#[serde(with = "nook_proto::b64")] Vec<u8>),
    Exit {
        code: Option<i32>,
        signal: Option<i32>,
    },
}

/// A process started for a peer: what goes in, what comes out. Both channels are bounded,
/// so a slow end slows the other instead of growing a buffer.
pub struct ShellSession {
    pub input: tokio::sync::mpsc::Sender<ShellIn>,
    pub output: tokio::sync::mpsc::Receiver<ShellOut>,
}

/// The answer to a [`Request`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Reply {
    /// Done: from here on the connection carries the VM's bytes.
    Ok,
    /// Not done, and why, in words for the user.
    Refused { why: String },
}

/// What a host does for its peers.
pub trait Handler: Send + Sync + 'static {
    /// Opens a connection to `port` of a VM running here, or says why not.
    fn connect(
        &self,
        vm_id: &str,
        port: u16,
    ) -> impl Future<Output = Result<TcpStream, String>> + Send;

    /// Starts a shell or command in a VM running here, or says why not.
    fn shell(
        &self,
        vm_id: &str,
        shell: ShellRequest,
    ) -> impl Future<Output = Result<ShellSession, String>> + Send;

    /// Runs a lobby command, writing what it prints to `out` (bounded: a slow peer slows the
    /// command), ending with [`LobbyOut::Exit`].
    fn lobby(
        &self,
        request: LobbyRequest,
        out: tokio::sync::mpsc::Sender<LobbyOut>,
    ) -> impl Future<Output = ()> + Send;

    /// Takes over a VM `peer` moves here, talking over `link` until it is done or failed.
    fn take_vm(
        &self,
        peer: Peer,
        vm_id: &str,
        live: bool,
        link: MoveLink<PeerStream>,
    ) -> impl Future<Output = ()> + Send;

    /// Lets a new host join the fleet if `request` holds the secret of an invitation this
    /// host made: the grant, or why not (in words for the joining admin).
    fn join(&self, request: JoinRequest) -> impl Future<Output = Result<JoinGrant, String>> + Send;

    /// Keeps the replica `peer` sends over `link`, answering `Done` once it is whole.
    fn take_replica(
        &self,
        peer: Peer,
        vm_id: &str,
        link: MoveLink<PeerStream>,
    ) -> impl Future<Output = ()> + Send;

    /// Hands the memory stream of a live move to the move waiting for it, or says why not.
    fn memory(
        &self,
        vm_id: &str,
        token: &str,
        stream: PeerStream,
    ) -> impl Future<Output = Result<(), String>> + Send;
}

/// A proven peer's connection, as a host serves it.
pub type PeerStream = tokio_rustls::server::TlsStream<TcpStream>;

/// The host at the other end of a connection, as its certificate proves.
pub struct Peer {
    certificate: Option<CertificateDer<'static>>,
}

impl Peer {
    fn of(stream: &PeerStream) -> Peer {
        Peer {
            certificate: stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|c| c.clone().into_owned()),
        }
    }

    /// Whether the peer's certificate (from the fleet's CA, checked in the handshake) is
    /// issued to host `name`.
    pub fn is(&self, name: &str) -> bool {
        let (Some(der), Ok(name)) = (&self.certificate, ServerName::try_from(name)) else {
            return false;
        };
        webpki::EndEntityCert::try_from(der)
            .is_ok_and(|cert| cert.verify_is_valid_for_subject_name(&name).is_ok())
    }
}

/// A connection to a VM through another host.
pub type Stream = tokio_rustls::client::TlsStream<TcpStream>;

/// `ADDR` with the channel's default port added when it names none.
pub fn with_port(addr: &str) -> String {
    if let Ok(ip) = addr.parse::<std::net::IpAddr>() {
        return SocketAddr::new(ip, DEFAULT_PORT).to_string();
    }
    let has_port = match addr.rsplit_once(':') {
        Some((host, port)) => port.parse::<u16>().is_ok() && !host.ends_with(':'),
        None => false,
    };
    if has_port || addr.starts_with('[') && addr.contains("]:") {
        addr.to_string()
    } else {
        format!("{addr}:{DEFAULT_PORT}")
    }
}

/// Serves peers on `listener` for the daemon's life.
pub async fn serve<H: Handler>(listener: TcpListener, identity: HostIdentity, handler: Arc<H>) {
    let unproven = Arc::new(tokio::sync::Semaphore::new(MAX_UNPROVEN));
    let sessions = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(proving) = unproven.clone().acquire_owned().await else {
            return;
        };
        let (tcp, peer) = match listener.accept().await {
            Ok(conn) => conn,
            Err(err) => {
                tracing::warn!(%err, "host channel: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let identity = identity.clone();
        let handler = handler.clone();
        let sessions = sessions.clone();
        tokio::spawn(async move {
            if let Err(why) = serve_one(tcp, peer, &identity, proving, sessions, &*handler).await {
                tracing::debug!(%peer, why, "host channel: connection ended");
            }
        });
    }
}

/// TCP keepalive that notices a dead peer within [`DEAD_PEER`], and a limit on unacknowledged
/// data for the same, so neither an idle nor a busy session waits on one for ever.
fn watch_for_a_dead_peer(tcp: &TcpStream) {
    let _ = tcp.set_nodelay(true);
    let sock = socket2::SockRef::from(tcp);
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(DEAD_PEER / 2)
        .with_interval(DEAD_PEER / 6)
        .with_retries(3);
    let _ = sock.set_tcp_keepalive(&keepalive);
    let _ = sock.set_tcp_user_timeout(Some(DEAD_PEER));
}

async fn serve_one<H: Handler>(
    tcp: TcpStream,
    peer: SocketAddr,
    identity: &HostIdentity,
    proving: tokio::sync::OwnedSemaphorePermit,
    sessions: Arc<tokio::sync::Semaphore>,
    handler: &H,
) -> Result<(), String> {
    watch_for_a_dead_peer(&tcp);
    // Unproven, a connection holds one of few slots for a few seconds at most.
    let accepted = tokio::time::timeout(PROVE_TIMEOUT, async {
        let start =
            tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), tcp).await?;
        let joining = start
            .client_hello()
            .alpn()
            .is_some_and(|mut protocols| protocols.any(|p| p == JOIN_ALPN));
        let config = if joining {
            identity.join_server.clone()
        } else {
            identity.server.clone()
        };
        Ok::<_, std::io::Error>((joining, start.into_stream(config).await?))
    })
    .await
    .map_err(|_| "no handshake in time".to_string())?
    .map_err(|e| format!("handshake: {e}"))?;
    let (joining, mut tls) = accepted;
    if joining {
        // Still unproven: the join keeps its slot, and its time is bounded (`join.rs`).
        tracing::info!(%peer, "host channel: a host asks to join");
        let served = join::serve_join(&mut tls, handler).await;
        drop(proving);
        return served;
    }
    drop(proving);
    let _session = sessions
        .acquire_owned()
        .await
        .map_err(|_| "shutting down".to_string())?;
    let request = tokio::time::timeout(HANDSHAKE_TIMEOUT, read_line(&mut tls, MAX_REQUEST))
        .await
        .map_err(|_| "no request in time".to_string())??;
    let request: Request =
        serde_json::from_slice(&request).map_err(|e| format!("bad request: {e}"))?;
    match request {
        Request::Connect { vm_id, port } => match handler.connect(&vm_id, port).await {
            Ok(mut vm) => {
                let _ = vm.set_nodelay(true);
                write_reply(&mut tls, &Reply::Ok).await?;
                tracing::debug!(%peer, vm = %vm_id, port, "host channel: connected a peer to a VM");
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut vm).await;
                Ok(())
            }
            Err(why) => write_reply(&mut tls, &Reply::Refused { why }).await,
        },
        Request::Shell { vm_id, shell } => match handler.shell(&vm_id, shell).await {
            Ok(session) => {
                write_reply(&mut tls, &Reply::Ok).await?;
                tracing::debug!(%peer, vm = %vm_id, "host channel: a shell for a peer");
                pump(tls, session.output, session.input).await;
                Ok(())
            }
            Err(why) => write_reply(&mut tls, &Reply::Refused { why }).await,
        },
        Request::Lobby(request) => {
            write_reply(&mut tls, &Reply::Ok).await?;
            tracing::debug!(%peer, argv = ?request.argv.first(), "host channel: a lobby command for a peer");
            let (out, output) = tokio::sync::mpsc::channel(SHELL_QUEUE);
            // Nothing comes the other way; the peer closing ends the command's output.
            let (ignored, _) = tokio::sync::mpsc::channel::<ShellIn>(1);
            tokio::join!(handler.lobby(request, out), pump(tls, output, ignored));
            Ok(())
        }
        Request::Move { vm_id, live } => {
            write_reply(&mut tls, &Reply::Ok).await?;
            tracing::info!(%peer, vm = %vm_id, live, "host channel: a VM moves here");
            let from = Peer::of(&tls);
            handler
                .take_vm(from, &vm_id, live, MoveLink { stream: tls })
                .await;
            Ok(())
        }
        Request::Memory { vm_id, token } => {
            write_reply(&mut tls, &Reply::Ok).await?;
            handler.memory(&vm_id, &token, tls).await
        }
        Request::Replica { vm_id } => {
            write_reply(&mut tls, &Reply::Ok).await?;
            let peer = Peer::of(&tls);
            handler
                .take_replica(peer, &vm_id, MoveLink { stream: tls })
                .await;
            Ok(())
        }
    }
}

/// Starts moving VM `vm_id` to `host`, which answers over the returned link.
pub async fn start_move(
    identity: &HostIdentity,
    host: &str,
    addr: &str,
    vm_id: &str,
    live: bool,
) -> Result<MoveLink<Stream>, ChannelError> {
    let request = Request::Move {
        vm_id: vm_id.to_string(),
        live,
    };
    Ok(MoveLink {
        stream: open(identity, host, addr, &request).await?,
    })
}

/// Starts sending `host` a replica of VM `vm_id`'s disk, over the returned link.
pub async fn start_replica(
    identity: &HostIdentity,
    host: &str,
    addr: &str,
    vm_id: &str,
) -> Result<MoveLink<Stream>, ChannelError> {
    let request = Request::Replica {
        vm_id: vm_id.to_string(),
    };
    Ok(MoveLink {
        stream: open(identity, host, addr, &request).await?,
    })
}

/// Opens the memory stream of a live move to `host`, which answered `token`.
pub async fn memory(
    identity: &HostIdentity,
    host: &str,
    addr: &str,
    vm_id: &str,
    token: &str,
) -> Result<Stream, ChannelError> {
    let request = Request::Memory {
        vm_id: vm_id.to_string(),
        token: token.to_string(),
    };
    open(identity, host, addr, &request).await
}

/// Runs a lobby command on `host`; what it prints arrives on the receiver, ending with
/// [`LobbyOut::Exit`] (or the channel closing, if the host went away).
pub async fn lobby(
    identity: &HostIdentity,
    host: &str,
    addr: &str,
    request: LobbyRequest,
) -> Result<tokio::sync::mpsc::Receiver<LobbyOut>, ChannelError> {
    let stream = open(identity, host, addr, &Request::Lobby(request)).await?;
    let (_keep, from_local) = tokio::sync::mpsc::channel::<ShellIn>(1);
    let (to_local, output) = tokio::sync::mpsc::channel(SHELL_QUEUE);
    tokio::spawn(async move {
        // `_keep` lives as long as the pump, so the outbound side waits instead of closing.
        let _keep = _keep;
        pump::<_, ShellIn, LobbyOut>(stream, from_local, to_local).await;
    });
    Ok(output)
}

/// Carries frames both ways until either side ends: lines from `stream` go to `to_local`,
/// and what `from_local` yields goes out as lines.
async fn pump<S, Out, In>(
    stream: S,
    mut from_local: tokio::sync::mpsc::Receiver<Out>,
    to_local: tokio::sync::mpsc::Sender<In>,
) where
    S: AsyncRead + tokio::io::AsyncWrite + Send + Unpin,
    Out: Serialize,
    In: serde::de::DeserializeOwned,
{
    let (read, mut write) = tokio::io::split(stream);
    let inbound = async move {
        let mut lines = BufReader::new(read);
        // Once the local side stops taking frames (a process that exited stops reading its
        // input), the rest is read and dropped: ending here would cut off what is still on
        // its way out, such as the exit status.
        let mut taken = true;
        loop {
            match read_frame::<_, In>(&mut lines).await {
                Ok(Some(frame)) => {
                    if taken && to_local.send(frame).await.is_err() {
                        taken = false;
                    }
                }
                Ok(None) => return,
                Err(why) => {
                    tracing::debug!(why, "host channel: bad frame");
                    return;
                }
            }
        }
    };
    let outbound = async move {
        while let Some(frame) = from_local.recv().await {
            let Ok(mut line) = serde_json::to_vec(&frame) else {
                return;
            };
            line.push(b'\n');
            if write.write_all(&line).await.is_err() || write.flush().await.is_err() {
                return;
            }
        }
        let _ = write.shutdown().await;
    };
    // The session ends when the other end has closed (or failed), or when what goes out is
    // done: the other side then sees its channel close. In the second case the other end may
    // still be sending (input a process that exited never read). Closing with its bytes
    // unread would reset the connection, and a reset can destroy what was sent last before
    // the other end read it (the exit status), so the rest is read and dropped until the
    // other end closes, for a while.
    tokio::pin!(inbound, outbound);
    tokio::select! {
        () = &mut inbound => {}
        () = &mut outbound => {
            let _ = tokio::time::timeout(LINGER, inbound).await;
        }
    }
}

/// How long a session whose own side is done keeps reading what the other end still sends,
/// waiting for it to close.
const LINGER: Duration = Duration::from_secs(5);

/// The next frame line, `None` at a clean end; at most [`MAX_FRAME`] bytes.
async fn read_frame<R, T>(r: &mut BufReader<R>) -> Result<Option<T>, String>
where
    R: AsyncRead + Unpin,
    T: serde::de::DeserializeOwned,
{
    let mut line = Vec::new();
    let n = (&mut *r)
        .take(MAX_FRAME as u64 + 1)
        .read_until(b'\n', &mut line)
        .await
        .map_err(|e| e.to_string())?;
    if n == 0 {
        return Ok(None);
    }
    if line.pop() != Some(b'\n') {
        return Err(format!("a frame over {MAX_FRAME} bytes, or cut short"));
    }
    serde_json::from_slice(&line)
        .map(Some)
        .map_err(|e| e.to_string())
}

async fn write_reply<W: AsyncWriteExt + Unpin>(w: &mut W, reply: &Reply) -> Result<(), String> {
    let mut line = serde_json::to_vec(reply).map_err(|e| e.to_string())?;
    line.push(b'\n');
    w.write_all(&line).await.map_err(|e| e.to_string())?;
    w.flush().await.map_err(|e| e.to_string())
}

/// One line, without its newline, of at most `max` bytes. Reads byte by byte from a buffer
/// that never runs past the line, so what follows stays in the stream.
async fn read_line<R: AsyncRead + Unpin>(r: &mut R, max: usize) -> Result<Vec<u8>, String> {
    let mut line = Vec::new();
    let mut limited = BufReader::with_capacity(1, r.take(max as u64 + 1));
    let n = limited
        .read_until(b'\n', &mut line)
        .await
        .map_err(|e| e.to_string())?;
    if line.last() != Some(&b'\n') {
        return Err(if n > max {
            format!("a line over {max} bytes")
        } else {
            "the connection closed mid-line".to_string()
        });
    }
    line.pop();
    Ok(line)
}

/// Opens a connection to `port` of VM `vm_id` on `host`, reached at `addr` (HOST:PORT).
pub async fn connect(
    identity: &HostIdentity,
    host: &str,
    addr: &str,
    vm_id: &str,
    port: u16,
) -> Result<Stream, ChannelError> {
    let request = Request::Connect {
        vm_id: vm_id.to_string(),
        port,
    };
    open(identity, host, addr, &request).await
}

/// Starts a shell in VM `vm_id` on `host`, reached at `addr`; the session ends when either
/// side drops its end.
pub async fn shell(
    identity: &HostIdentity,
    host: &str,
    addr: &str,
    vm_id: &str,
    shell: ShellRequest,
) -> Result<ShellSession, ChannelError> {
    let request = Request::Shell {
        vm_id: vm_id.to_string(),
        shell,
    };
    let stream = open(identity, host, addr, &request).await?;
    let (input, from_local) = tokio::sync::mpsc::channel(SHELL_QUEUE);
    let (to_local, output) = tokio::sync::mpsc::channel(SHELL_QUEUE);
    tokio::spawn(pump::<_, ShellIn, ShellOut>(stream, from_local, to_local));
    Ok(ShellSession { input, output })
}

/// Frames queued between a shell's stream and its session, each way.
const SHELL_QUEUE: usize = 16;

/// Sends `request` to `host` and returns the stream once it said yes.
async fn open(
    identity: &HostIdentity,
    host: &str,
    addr: &str,
    request: &Request,
) -> Result<Stream, ChannelError> {
    let timeout = || ChannelError::Timeout {
        host: host.to_string(),
    };
    let name =
        ServerName::try_from(host.to_string()).map_err(|_| ChannelError::BadName(host.into()))?;
    let connector = tokio_rustls::TlsConnector::from(identity.client.clone());
    let mut tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|source| ChannelError::Unreachable {
                host: host.to_string(),
                addr: addr.to_string(),
                source,
            })?;
        watch_for_a_dead_peer(&tcp);
        connector
            .connect(name, tcp)
            .await
            .map_err(|source| ChannelError::Unreachable {
                host: host.to_string(),
                addr: addr.to_string(),
                source,
            })
    })
    .await
    .map_err(|_| timeout())??;
    let mut line = serde_json::to_vec(request).map_err(|e| ChannelError::Protocol {
        host: host.to_string(),
        why: e.to_string(),
    })?;
    line.push(b'\n');
    let protocol = |why: String| ChannelError::Protocol {
        host: host.to_string(),
        why,
    };
    let reply = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        tls.write_all(&line)
            .await
            .map_err(|e| protocol(e.to_string()))?;
        tls.flush().await.map_err(|e| protocol(e.to_string()))?;
        read_line(&mut tls, MAX_REQUEST).await.map_err(protocol)
    })
    .await
    .map_err(|_| timeout())??;
    match serde_json::from_slice::<Reply>(&reply).map_err(|e| protocol(e.to_string()))? {
        Reply::Ok => Ok(tls),
        Reply::Refused { why } => Err(ChannelError::Refused {
            host: host.to_string(),
            why,
        }),
    }
}

#[cfg(test)]
mod tests;
