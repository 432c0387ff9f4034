//! The VM side: nook as an SSH client of the guest's sshd, relaying channels 1:1.
//!
//! Flow control: each direction of a channel is a loop that reads one message
//! and writes it on the other side, waiting for that side's SSH window. russh
//! stops reading a connection while a channel's queue is full, so a slow
//! reader slows its writer down instead of growing a buffer.
//!
//! Known limit (russh 0.65 grants window on receipt, not on consumption; see
//! russh PR #730): if a guest program stops reading stdin while the client
//! keeps sending *and* the program writes several MiB the client can't get
//! because the client connection is stalled on that input, the connection
//! hangs. Buffers are bounded (about 3 MiB per channel and direction) rather
//! than growing without limit. Ordinary traffic, including bulk data both ways
//! through `cat`, scp and sftp, is not affected.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use russh::keys::{PrivateKey, PrivateKeyWithHashAlg, PublicKeyOrCertificate};
use russh::{
    Channel, ChannelId, ChannelMsg, ChannelOpenFailure, ChannelReadHalf, ChannelWriteHalf,
    Disconnect, client, server,
};
use tracing::{Instrument, Span, debug};

use crate::server::{Ctx, Prelude, Start};
use crate::{Backend, SshdEndpoint, lobby};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// How often a refused connection to a guest's sshd is tried again, while its endpoint says
/// the sshd is restarting.
const REFUSED_RETRY: Duration = Duration::from_millis(25);

/// One SSH connection to a guest, shared by all channels of one client connection.
pub(crate) struct Upstream {
    handle: client::Handle<UpHandler>,
}

/// Connects and logs in to the guest's sshd. The error is a message for the user.
pub(crate) async fn connect(
    ep: &SshdEndpoint,
    down: server::Handle,
    agent_requested: Arc<AtomicBool>,
    span: Span,
) -> Result<Upstream, String> {
    let key = PrivateKey::from_openssh(&ep.private_key_openssh)
        .map_err(|_| "nook: the VM's SSH key is unusable".to_string())?;
    let config = Arc::new(client::Config {
        keepalive_interval: Some(Duration::from_secs(30)),
        keepalive_max: 4,
        // `dial` sets TCP_NODELAY: `connect_stream` is given a connected socket.
        ..Default::default()
    });
    let handler = UpHandler {
        down,
        agent_requested,
        span,
        host_keys: ep.host_keys.clone(),
    };
    let mut handle = match tokio::time::timeout(CONNECT_TIMEOUT, async {
        let tcp = dial(ep.addr, ep.refused_patience).await?;
        client::connect_stream(config, tcp, handler).await
    })
    .await
    {
        Ok(Ok(handle)) => handle,
        Ok(Err(e)) => {
            debug!(error = %e, addr = %ep.addr, "upstream connect failed");
            return Err("nook: the VM is not accepting SSH connections right now".to_string());
        }
        Err(_) => return Err("nook: timed out connecting to the VM".to_string()),
    };
    let hash = if key.algorithm().is_rsa() {
        handle
            .best_supported_rsa_hash()
            .await
            .ok()
            .flatten()
            .flatten()
    } else {
        None
    };
    let key = PrivateKeyWithHashAlg::new(Arc::new(key), hash);
    let auth = tokio::time::timeout(
        CONNECT_TIMEOUT,
        handle.authenticate_publickey(ep.user.clone(), key),
    )
    .await;
    match auth {
        Ok(Ok(result)) if result.success() => Ok(Upstream { handle }),
        other => {
            debug!(?other, "upstream login failed");
            Err("nook: the VM refused nook's login".to_string())
        }
    }
}

/// Opens the TCP connection to a guest's sshd. A fork's sshd restarts to take the clone's new
/// host keys, and `cp` returns without waiting for it: until it listens again its port refuses,
/// and the connection is tried again for up to `patience` (zero for a guest whose sshd should
/// be up: a refusal is then the answer at once).
async fn dial(
    addr: std::net::SocketAddr,
    patience: Duration,
) -> Result<tokio::net::TcpStream, russh::Error> {
    let give_up = tokio::time::Instant::now() + patience.min(CONNECT_TIMEOUT);
    let mut refused = 0u32;
    loop {
        match tokio::net::TcpStream::connect(addr).await {
            Ok(tcp) => {
                if refused > 0 {
                    debug!(%addr, refused, "the guest's sshd listens again");
                }
                if let Err(e) = tcp.set_nodelay(true) {
                    debug!(error = %e, "cannot set TCP_NODELAY towards the guest");
                }
                return Ok(tcp);
            }
            Err(e)
                if e.kind() == std::io::ErrorKind::ConnectionRefused
                    && tokio::time::Instant::now() < give_up =>
            {
                refused += 1;
                tokio::time::sleep(REFUSED_RETRY).await;
            }
            Err(e) => return Err(russh::Error::IO(e)),
        }
    }
}

impl Upstream {
    pub(crate) async fn disconnect(&self) {
        let _ = self
            .handle
            .disconnect(Disconnect::ByApplication, "", "en")
            .await;
    }

    pub(crate) async fn open_direct_tcpip(
        &self,
        host: &str,
        port: u32,
        originator: &str,
        originator_port: u32,
    ) -> Result<Channel<client::Msg>, ChannelOpenFailure> {
        match self
            .handle
            .channel_open_direct_tcpip(host, port, originator, originator_port)
            .await
        {
            Ok(channel) => Ok(channel),
            Err(russh::Error::ChannelOpenFailure(reason)) => Err(reason),
            Err(_) => Err(ChannelOpenFailure::ConnectFailed),
        }
    }

    /// Asks the guest to listen; returns the bound port (0 when a fixed port was asked for).
    pub(crate) async fn tcpip_forward(&self, address: &str, port: u32) -> Option<u32> {
        self.handle.tcpip_forward(address, port).await.ok()
    }

    pub(crate) async fn cancel_tcpip_forward(&self, address: &str, port: u32) -> bool {
        self.handle
            .cancel_tcpip_forward(address, port)
            .await
            .is_ok()
    }
}

/// Handles what the guest's sshd opens towards us: `-R` connections and agent requests.
pub(crate) struct UpHandler {
    down: server::Handle,
    agent_requested: Arc<AtomicBool>,
    span: Span,
    /// The host keys nook made for the guest (`ALGO BASE64`); empty when it made none.
    host_keys: Vec<String>,
}

impl client::Handler for UpHandler {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        server_public_key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        // nook made the guest's host keys, so the guest must show one of them: anything else
        // on the VM's address is not that VM's sshd. (A VM of an older nook that made no keys
        // is taken on its private link.)
        if self.host_keys.is_empty() {
            return Ok(true);
        }
        let PublicKeyOrCertificate::PublicKey { key, .. } = server_public_key else {
            return Ok(false);
        };
        let Ok(shown) = key.to_openssh() else {
            return Ok(false);
        };
        let shown: Vec<&str> = shown.split_whitespace().take(2).collect();
        let known = self.host_keys.iter().any(|k| {
            let k: Vec<&str> = k.split_whitespace().take(2).collect();
            k == shown
        });
        if !known {
            debug!("the guest's sshd showed a host key nook did not make");
        }
        Ok(known)
    }

    async fn server_channel_open_forwarded_tcpip(
        &mut self,
        channel: Channel<client::Msg>,
        connected_address: &str,
        connected_port: u32,
        originator_address: &str,
        originator_port: u32,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        let down = self.down.clone();
        let connected_address = connected_address.to_string();
        let originator_address = originator_address.to_string();
        tokio::spawn(
            async move {
                match down
                    .channel_open_forwarded_tcpip(
                        connected_address,
                        connected_port,
                        originator_address,
                        originator_port,
                    )
                    .await
                {
                    Ok(client_side) => {
                        reply.accept().await;
                        relay_stream(client_side, channel).await;
                    }
                    Err(e) => {
                        debug!(error = %e, "client refused a forwarded connection");
                        reply.reject(ChannelOpenFailure::ConnectFailed).await;
                    }
                }
            }
            .instrument(self.span.clone()),
        );
        Ok(())
    }

    async fn server_channel_open_agent_forward(
        &mut self,
        channel: Channel<client::Msg>,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        if !self.agent_requested.load(Ordering::Relaxed) {
            reply
                .reject(ChannelOpenFailure::AdministrativelyProhibited)
                .await;
            return Ok(());
        }
        let down = self.down.clone();
        tokio::spawn(
            async move {
                match down.channel_open_agent().await {
                    Ok(client_side) => {
                        reply.accept().await;
                        relay_stream(client_side, channel).await;
                    }
                    Err(e) => {
                        debug!(error = %e, "client refused an agent channel");
                        reply.reject(ChannelOpenFailure::ConnectFailed).await;
                    }
                }
            }
            .instrument(self.span.clone()),
        );
        Ok(())
    }

    // Nothing else may be opened towards nook.

    async fn server_channel_open_session(
        &mut self,
        _channel: Channel<client::Msg>,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        reply
            .reject(ChannelOpenFailure::AdministrativelyProhibited)
            .await;
        Ok(())
    }

    async fn server_channel_open_direct_tcpip(
        &mut self,
        _channel: Channel<client::Msg>,
        _host_to_connect: &str,
        _port_to_connect: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        reply
            .reject(ChannelOpenFailure::AdministrativelyProhibited)
            .await;
        Ok(())
    }

    async fn server_channel_open_direct_streamlocal(
        &mut self,
        _channel: Channel<client::Msg>,
        _socket_path: &str,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        reply
            .reject(ChannelOpenFailure::AdministrativelyProhibited)
            .await;
        Ok(())
    }

    async fn server_channel_open_forwarded_streamlocal(
        &mut self,
        _channel: Channel<client::Msg>,
        _socket_path: &str,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        reply
            .reject(ChannelOpenFailure::AdministrativelyProhibited)
            .await;
        Ok(())
    }

    async fn server_channel_open_x11(
        &mut self,
        _channel: Channel<client::Msg>,
        _originator_address: &str,
        _originator_port: u32,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        reply
            .reject(ChannelOpenFailure::AdministrativelyProhibited)
            .await;
        Ok(())
    }
}

/// Relays a byte-stream channel (direct-tcpip, forwarded-tcpip, agent) both
/// ways until either side closes, then closes both.
pub(crate) async fn relay_stream<A, B>(a: Channel<A>, b: Channel<B>)
where
    A: From<(ChannelId, ChannelMsg)> + Send + Sync + 'static,
    B: From<(ChannelId, ChannelMsg)> + Send + Sync + 'static,
{
    let (mut a_read, a_write) = a.split();
    let (mut b_read, b_write) = b.split();
    tokio::select! {
        _ = pump(&mut a_read, &b_write) => {}
        _ = pump(&mut b_read, &a_write) => {}
    }
    let _ = a_write.close().await;
    let _ = b_write.close().await;
}

/// Copies data, extended data and EOF until the reading side closes or the
/// writing side fails.
async fn pump<S>(from: &mut ChannelReadHalf, to: &ChannelWriteHalf<S>)
where
    S: From<(ChannelId, ChannelMsg)> + Send + Sync + 'static,
{
    loop {
        let sent = match from.wait().await {
            Some(ChannelMsg::Data { data }) => to.data_bytes(data).await,
            Some(ChannelMsg::ExtendedData { data, ext }) => to.extended_data_bytes(ext, data).await,
            Some(ChannelMsg::Eof) => to.eof().await,
            Some(ChannelMsg::Close) | None => return,
            Some(_) => Ok(()),
        };
        if sent.is_err() {
            return;
        }
    }
}

/// Sends a set-up request (pty, env, agent, window size) to the guest.
/// Replies aren't asked for: the client has been answered already.
async fn forward_request(
    up: &ChannelWriteHalf<client::Msg>,
    msg: ChannelMsg,
) -> Result<(), russh::Error> {
    match msg {
        ChannelMsg::RequestPty {
            term,
            col_width,
            row_height,
            pix_width,
            pix_height,
            terminal_modes,
            ..
        } => {
            up.request_pty(
                false,
                &term,
                col_width,
                row_height,
                pix_width,
                pix_height,
                &terminal_modes,
            )
            .await
        }
        ChannelMsg::SetEnv {
            variable_name,
            variable_value,
            ..
        } => up.set_env(false, variable_name, variable_value).await,
        ChannelMsg::AgentForward { .. } => up.agent_forward(false).await,
        ChannelMsg::WindowChange {
            col_width,
            row_height,
            pix_width,
            pix_height,
        } => {
            up.window_change(col_width, row_height, pix_width, pix_height)
                .await
        }
        _ => Ok(()),
    }
}

/// Relays a session channel (shell, exec, subsystem) to a new channel on the guest.
pub(crate) async fn session<B: Backend>(
    ctx: Ctx<B>,
    id: ChannelId,
    ep: SshdEndpoint,
    mut reader: ChannelReadHalf,
    writer: ChannelWriteHalf<server::Msg>,
    start: Start,
    prelude: Prelude,
) {
    let tty = prelude.pty.is_some();
    let up = match ctx.upstream(&ep).await {
        Ok(up) => up,
        Err(message) => return lobby::refuse(&writer, tty, &message).await,
    };
    let Ok(channel) = up.handle.channel_open_session().await else {
        let message = "nook: the VM refused to open a session";
        return lobby::refuse(&writer, tty, message).await;
    };
    let (mut up_read, up_write) = channel.split();

    let what = match &start {
        Start::Shell => "shell".to_string(),
        Start::Exec(_) => "command".to_string(),
        Start::Subsystem(name) => format!("{name:?} subsystem"),
    };
    let mut sent = Ok(());
    for msg in prelude.requests {
        if sent.is_ok() {
            sent = forward_request(&up_write, msg).await;
        }
    }
    if sent.is_ok() {
        sent = match start {
            Start::Shell => up_write.request_shell(true).await,
            Start::Exec(command) => up_write.exec(true, command).await,
            Start::Subsystem(name) => up_write.request_subsystem(true, name).await,
        };
    }
    for data in prelude.data {
        if sent.is_ok() {
            sent = up_write.data_bytes(data).await;
        }
    }
    if sent.is_ok() && prelude.eof {
        sent = up_write.eof().await;
    }
    if sent.is_err() {
        let _ = up_write.close().await;
        return lobby::refuse(&writer, tty, "nook: lost the connection to the VM").await;
    }

    let down = ctx.state.down.get().cloned();
    let to_vm = async {
        loop {
            let sent = match reader.wait().await {
                Some(ChannelMsg::Data { data }) => up_write.data_bytes(data).await,
                Some(ChannelMsg::ExtendedData { data, ext }) => {
                    up_write.extended_data_bytes(ext, data).await
                }
                Some(ChannelMsg::Eof) => up_write.eof().await,
                Some(ChannelMsg::Signal { signal }) => up_write.signal(signal).await,
                Some(
                    msg @ (ChannelMsg::WindowChange { .. }
                    | ChannelMsg::SetEnv { .. }
                    | ChannelMsg::RequestPty { .. }
                    | ChannelMsg::AgentForward { .. }),
                ) => forward_request(&up_write, msg).await,
                Some(ChannelMsg::Close) | None => return,
                Some(_) => Ok(()),
            };
            if sent.is_err() {
                return;
            }
        }
    };
    let to_client = async {
        let mut answered = false;
        loop {
            let sent = match up_read.wait().await {
                Some(ChannelMsg::Data { data }) => writer.data_bytes(data).await,
                Some(ChannelMsg::ExtendedData { data, ext }) => {
                    writer.extended_data_bytes(ext, data).await
                }
                Some(ChannelMsg::Eof) => writer.eof().await,
                Some(ChannelMsg::ExitStatus { exit_status }) => {
                    writer.exit_status(exit_status).await
                }
                Some(ChannelMsg::ExitSignal {
                    signal_name,
                    core_dumped,
                    error_message,
                    lang_tag,
                }) => {
                    if let Some(down) = &down {
                        let _ = down
                            .exit_signal_request(
                                id,
                                signal_name,
                                core_dumped,
                                error_message,
                                lang_tag,
                            )
                            .await;
                    }
                    Ok(())
                }
                Some(ChannelMsg::Success) => {
                    answered = true;
                    Ok(())
                }
                Some(ChannelMsg::Failure) if !answered => {
                    // Only the start request asked for a reply.
                    let message = format!("nook: the VM refused to start the {what}");
                    lobby::refuse(&writer, tty, &message).await;
                    return;
                }
                Some(ChannelMsg::Close) => return,
                None => {
                    let message = b"nook: lost the connection to the VM\n";
                    let message = if tty {
                        &b"\r\nnook: lost the connection to the VM\r\n"[..]
                    } else {
                        &message[..]
                    };
                    let _ = writer.extended_data_bytes(1, message.to_vec()).await;
                    return;
                }
                Some(_) => Ok(()),
            };
            if sent.is_err() {
                return;
            }
        }
    };
    tokio::select! {
        _ = to_vm => {}
        _ = to_client => {}
    }
    let _ = up_write.close().await;
    let _ = writer.close().await;
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A port held (bound, so nothing else takes it) but not listening: connections to it are
    /// refused.
    fn closed_port() -> (tokio::net::TcpSocket, std::net::SocketAddr) {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = socket.local_addr().unwrap();
        (socket, addr)
    }

    #[tokio::test]
    async fn a_refused_port_is_tried_again_until_it_listens() {
        let (socket, addr) = closed_port();
        let late = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let listener = socket.listen(16).unwrap();
            listener.accept().await.unwrap()
        });
        let tcp = dial(addr, Duration::from_secs(5)).await.unwrap();
        let (_, peer) = late.await.unwrap();
        assert_eq!(peer, tcp.local_addr().unwrap());
    }

    #[tokio::test]
    async fn a_port_that_stays_closed_is_refused_once_patience_runs_out() {
        let (_held, addr) = closed_port();
        let started = std::time::Instant::now();
        let err = dial(addr, Duration::from_millis(200)).await.unwrap_err();
        assert!(
            matches!(&err, russh::Error::IO(e) if e.kind() == std::io::ErrorKind::ConnectionRefused),
            "{err:?}"
        );
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(200) && waited < Duration::from_secs(3),
            "{waited:?}"
        );
    }
}
