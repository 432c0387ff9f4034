//! The guest-agent protocol, spoken over one virtio-serial port between the host daemon and
//! `nook-guest-agent` inside every VM.
//!
//! This crate is the only place that knows the framing and the message set. It does no I/O of
//! its own, so the static guest binary and the async host client share one definition.
//!
//! Framing: `MAGIC` (4 bytes), a big-endian `u32` body length, then a JSON body. The magic lets a
//! reader resynchronise after the host end of the port reconnects mid-frame (virtio-serial drops
//! bytes written while nobody listens), instead of misreading a stray length forever.

use serde::{Deserialize, Serialize};

/// Bumped on any incompatible change. The host refuses an agent with another major version.
pub const PROTOCOL_VERSION: u32 = 1;
/// The virtserialport name the agent looks for under `/sys/class/virtio-ports/*/name`.
pub const PORT_NAME: &str = "org.nook.agent.0";
/// Frames larger than this are rejected; file transfers are chunked below it.
pub const MAX_FRAME: usize = 8 * 1024 * 1024;
/// Largest data payload a sender should put in one frame (base64 grows it by a third).
pub const CHUNK: usize = 1024 * 1024;
const MAGIC: [u8; 4] = *b"NOOK";
const HEADER: usize = 8;

/// A message from the host, tagged with a request id chosen by the host.
/// Follow-up messages for a spawned process (`Stdin`, `Resize`, ...) reuse the spawn's id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostFrame {
    pub id: u64,
    #[serde(flatten)]
    pub msg: HostMsg,
}

/// A message from the guest, answering (or streaming for) the host request with the same id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GuestFrame {
    pub id: u64,
    #[serde(flatten)]
    pub msg: GuestMsg,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum HostMsg {
    /// Readiness probe; answered with `GuestMsg::Hello`.
    Hello { version: u32 },
    /// Start a process. Answered with `Spawned`, then `Output`* and finally `Exit`.
    Spawn(SpawnRequest),
    /// Bytes for the stdin (or pty) of the process started by the spawn with this id.
    Stdin {
        #[serde(with = "b64")]
        data: Vec<u8>,
    },
    /// Close the stdin of the process with this id.
    CloseStdin,
    /// New terminal size for a process started with a pty.
    Resize { cols: u16, rows: u16 },
    /// Send a signal (a number, as in `kill -l`) to the process with this id.
    Signal { signal: i32 },
    /// The host has passed on `bytes` more of this process's output; with a flow-control
    /// window (`SpawnRequest::window`) the guest may send that much more.
    OutputAck { bytes: u64 },
    /// The user of the process with this id went away (a dropped SSH connection): as sshd does,
    /// SIGHUP its process group, close its stdin and stop reading its output (later writes get
    /// EPIPE). Its `Exit` still follows.
    Hangup,
    /// The host end is a new host that started only the processes in `started` (the VM moved
    /// here from another host, whose connection went with it, though the guest's port never
    /// closed). Every other process runs free, as when the host end closes: nobody will
    /// acknowledge its output. Answered with `Ok`.
    NewHost { started: Vec<u64> },
    /// Read up to `len` bytes from `offset`; answered with `FileData` (empty data means end of file).
    ReadFile { path: String, offset: u64, len: u32 },
    /// Write `data` at the end (`append`) or replace the file; answered with `Ok`.
    WriteFile {
        path: String,
        #[serde(with = "b64")]
        data: Vec<u8>,
        append: bool,
        mode: Option<u32>,
    },
    /// Answered with `Metrics`.
    Metrics,
    /// Flush disks and power off (or reboot); answered with `Ok` before the guest goes down.
    Shutdown { reboot: bool },
    /// Who this machine is; sent after every boot and after a fork. Answered with `Identified`.
    Identify(Identity),
}

/// A VM's identity as the host assigns it. A guest that finds a different `vm_id` from the
/// one it last saw was cloned: it takes the new name and address and makes itself a new
/// machine-id and SSH host keys.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Identity {
    pub vm_id: String,
    pub hostname: String,
    /// Address with prefix length, e.g. `10.200.0.6/30`.
    pub ip: Option<String>,
    pub gateway: Option<String>,
    pub dns: Option<String>,
    /// The NIC's MAC address; a running clone wakes up with its source's.
    pub mac: Option<String>,
    /// Fresh entropy from the host, mixed into the guest's pool.
    #[serde(with = "b64")]
    pub seed: Vec<u8>,
    /// The machine's SSH host keys, made by the host (making them in a guest without KVM took
    /// 20 s). The agent installs them when they differ from what `/etc/ssh` holds.
    #[serde(default)]
    pub ssh_host_keys: Vec<SshHostKey>,
    /// nook's own key for the guest's sshd (the relay for sftp, scp and forwarding), installed
    /// as the user's `authorized_keys` when the image runs sshd. Sent here rather than through
    /// guest commands: each cold exec under TCG cost the boot 0.2–0.8 s.
    #[serde(default)]
    pub authorized_key: Option<AuthorizedKey>,
}

/// A public key (one OpenSSH `authorized_keys` line) for `user`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuthorizedKey {
    pub user: String,
    pub public_openssh: String,
}

/// One SSH host key pair in OpenSSH format, installed as `/etc/ssh/ssh_host_{kind}_key{,.pub}`.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct SshHostKey {
    /// `ed25519`, `ecdsa` or `rsa`: the word in the file names sshd looks for.
    pub kind: String,
    pub private_openssh: String,
    pub public_openssh: String,
}

impl std::fmt::Debug for SshHostKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SshHostKey")
            .field("kind", &self.kind)
            .field("public_openssh", &self.public_openssh)
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// The boot-time part of the identity, as the agent re-applies it after a restart.
    pub fn boot_config(&self) -> BootConfig {
        BootConfig {
            hostname: self.hostname.clone(),
            ip: self.ip.clone(),
            gateway: self.gateway.clone(),
            dns: self.dns.clone(),
            init: None,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SpawnRequest {
    pub argv: Vec<String>,
    #[serde(default)]
    pub env: Vec<(String, String)>,
    pub cwd: Option<String>,
    /// Run as this user (name); root when absent.
    pub user: Option<String>,
    /// Allocate a pseudo-terminal of this size; stdout and stderr are then one stream.
    pub pty: Option<PtySize>,
    /// When false, stdin is closed at once (for plain commands).
    #[serde(default)]
    pub stdin: bool,
    /// Run through the user's login shell, as sshd does: `argv` empty starts an interactive
    /// login shell, `argv == [command]` runs `SHELL -c command`.
    #[serde(default)]
    pub shell: bool,
    /// Flow control: at most this many output bytes are sent ahead of the host's `OutputAck`s,
    /// and stdin is acknowledged with `StdinAck` as the process takes it. `None` sends output
    /// as fast as it comes (for commands whose output the host collects at once).
    #[serde(default)]
    pub window: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PtySize {
    pub cols: u16,
    pub rows: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stream {
    Stdout,
    Stderr,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum GuestMsg {
    Hello {
        version: u32,
        agent_version: String,
        hostname: String,
        /// `/proc/sys/kernel/random/boot_id`: changes on every boot, so the host can tell a
        /// reboot from a reconnect.
        boot_id: String,
    },
    Spawned {
        pid: u32,
    },
    Output {
        stream: Stream,
        #[serde(with = "b64")]
        data: Vec<u8>,
    },
    /// `bytes` more of the stdin sent to this process (with a `window`) were written to it, so the
    /// host may send that much more.
    StdinAck {
        bytes: u64,
    },
    /// The process ended: `code` when it exited, `signal` when a signal killed it.
    Exit {
        code: Option<i32>,
        signal: Option<i32>,
    },
    FileData {
        #[serde(with = "b64")]
        data: Vec<u8>,
    },
    Ok,
    Metrics(GuestMetrics),
    /// `cloned`: the machine had another VM's identity and has now taken this one. `sshd`: the
    /// image runs sshd and the identity's `authorized_key` is in place for it.
    Identified {
        cloned: bool,
        #[serde(default)]
        sshd: bool,
    },
    Error {
        kind: ErrorKind,
        message: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    NotFound,
    PermissionDenied,
    InvalidRequest,
    Io,
    /// The id names no running process.
    NoSuchProcess,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GuestMetrics {
    pub uptime_secs: f64,
    pub load_avg_1m: f64,
    pub mem_total_kib: u64,
    pub mem_available_kib: u64,
    pub disk_total_kib: u64,
    pub disk_available_kib: u64,
    pub processes: u32,
}

/// What the host tells a guest at boot, on the kernel command line (`nook.KEY=VALUE` words).
/// The initramfs and the agent read it; the VM runtime writes it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BootConfig {
    /// The VM's name, used as its hostname.
    pub hostname: String,
    /// The guest's address with prefix length, e.g. `10.200.0.2/30`.
    pub ip: Option<String>,
    /// The host end of the VM's point-to-point link.
    pub gateway: Option<String>,
    pub dns: Option<String>,
    /// What the initramfs executes after `switch_root` (`/sbin/init`, or systemd).
    pub init: Option<String>,
}

impl BootConfig {
    pub fn to_cmdline(&self) -> String {
        let mut words = vec![format!("nook.hostname={}", self.hostname)];
        for (key, value) in [
            ("ip", &self.ip),
            ("gw", &self.gateway),
            ("dns", &self.dns),
            ("init", &self.init),
        ] {
            if let Some(v) = value {
                words.push(format!("nook.{key}={v}"));
            }
        }
        words.join(" ")
    }

    /// Reads the `nook.*` words of a kernel command line; other words are ignored.
    pub fn from_cmdline(cmdline: &str) -> Self {
        let mut cfg = Self::default();
        for word in cmdline.split_whitespace() {
            let Some((key, value)) = word.strip_prefix("nook.").and_then(|w| w.split_once('='))
            else {
                continue;
            };
            let value = value.to_string();
            match key {
                "hostname" => cfg.hostname = value,
                "ip" => cfg.ip = Some(value),
                "gw" => cfg.gateway = Some(value),
                "dns" => cfg.dns = Some(value),
                "init" => cfg.init = Some(value),
                _ => {}
            }
        }
        cfg
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("Frame of {0} bytes exceeds the limit")]
    TooLarge(usize),
    #[error("Malformed frame body")]
    Json(#[from] serde_json::Error),
}

/// Serialises one message into a complete frame.
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    let body = serde_json::to_vec(msg)?;
    if body.len() > MAX_FRAME {
        return Err(FrameError::TooLarge(body.len()));
    }
    let mut out = Vec::with_capacity(HEADER + body.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// Parses a frame body produced by [`FrameBuf::next_body`].
pub fn decode<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
    Ok(serde_json::from_slice(body)?)
}

/// Accumulates bytes from the port and yields whole frame bodies, skipping anything that is
/// not a frame (the tail of a frame cut by a reconnect, or noise).
///
/// Its memory is bounded: a header may announce at most [`MAX_FRAME`] bytes, so no more than
/// one frame's worth (plus the last push) is ever kept. Parsing is linear in the bytes pushed,
/// whatever they are: consumed bytes are passed over with a cursor and compacted away only
/// once per push, so a peer sending garbage at full speed cannot make it quadratic.
#[derive(Debug, Default)]
pub struct FrameBuf {
    buf: Vec<u8>,
    /// Where the unparsed bytes of `buf` begin; everything before it is consumed.
    start: usize,
    skipped: u64,
}

impl FrameBuf {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&mut self, bytes: &[u8]) {
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        } else if self.start >= self.buf.len() - self.start {
            // Moving the unparsed rest costs no more than the bytes consumed since the last
            // move, which keeps compaction linear overall.
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Drops any partial frame, as after a reconnect.
    pub fn clear(&mut self) {
        self.buf.clear();
        self.start = 0;
    }

    /// Bytes discarded while resynchronising, for diagnostics.
    pub fn skipped(&self) -> u64 {
        self.skipped
    }

    /// Bytes held that are not yet part of a yielded frame.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// The next complete frame body, if one is buffered.
    pub fn next_body(&mut self) -> Option<Vec<u8>> {
        loop {
            let at = find_magic(&self.buf[self.start..]);
            self.skipped += at as u64;
            self.start += at;
            let rest = &self.buf[self.start..];
            if rest.len() < HEADER {
                return None;
            }
            let len = u32::from_be_bytes([rest[4], rest[5], rest[6], rest[7]]) as usize;
            if len > MAX_FRAME {
                // Not a real header: skip this magic and look for the next one.
                self.skipped += 1;
                self.start += 1;
                continue;
            }
            if rest.len() < HEADER + len {
                return None;
            }
            let body = rest[HEADER..HEADER + len].to_vec();
            self.start += HEADER + len;
            return Some(body);
        }
    }
}

/// Index of the first possible frame start: a full magic, or a prefix of it at the very end.
fn find_magic(buf: &[u8]) -> usize {
    (0..buf.len())
        .find(|&i| {
            let rest = &buf[i..];
            let n = rest.len().min(MAGIC.len());
            rest[..n] == MAGIC[..n]
        })
        .unwrap_or(buf.len())
}

/// Serde helper for byte fields carried as base64 strings in JSON.
pub mod b64 {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(data: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(data))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = <&str>::deserialize(d)?;
        STANDARD.decode(s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(frames: &[HostFrame], noise: &[u8]) -> Vec<HostFrame> {
        let mut wire = noise.to_vec();
        for f in frames {
            wire.extend(encode(f).expect("encode"));
        }
        let mut fb = FrameBuf::new();
        let mut out = Vec::new();
        // Feed byte by byte to exercise partial frames.
        for b in wire {
            fb.push(&[b]);
            while let Some(body) = fb.next_body() {
                out.push(decode(&body).expect("decode"));
            }
        }
        out
    }

    #[test]
    fn frames_roundtrip_through_partial_reads() {
        let frames = vec![
            HostFrame {
                id: 1,
                msg: HostMsg::Hello {
                    version: PROTOCOL_VERSION,
                },
            },
            HostFrame {
                id: 2,
                msg: HostMsg::Stdin {
                    data: vec![0, 159, 146, 150, b'N'],
                },
            },
            HostFrame {
                id: 3,
                msg: HostMsg::Spawn(SpawnRequest {
                    argv: vec!["uname".into(), "-a".into()],
                    env: vec![],
                    cwd: None,
                    user: None,
                    pty: Some(PtySize { cols: 80, rows: 24 }),
                    stdin: false,
                    shell: false,
                    window: Some(1 << 20),
                }),
            },
        ];
        assert_eq!(roundtrip(&frames, b""), frames);
    }

    #[test]
    fn reader_resynchronises_after_garbage() {
        let frames = vec![HostFrame {
            id: 7,
            msg: HostMsg::Metrics,
        }];
        // A cut frame: magic plus a huge length, then junk that contains a partial magic.
        let mut noise = b"NOOK\xff\xff\xff\xffjunkNOO".to_vec();
        noise.extend_from_slice(b"x\n");
        assert_eq!(roundtrip(&frames, &noise), frames);
    }

    #[test]
    fn boot_config_roundtrips_through_cmdline() {
        let cfg = BootConfig {
            hostname: "blog".into(),
            ip: Some("10.200.0.2/30".into()),
            gateway: Some("10.200.0.1".into()),
            dns: Some("1.1.1.1".into()),
            init: None,
        };
        let line = format!("console=ttyS0 root=/dev/vda {} quiet", cfg.to_cmdline());
        assert_eq!(BootConfig::from_cmdline(&line), cfg);
    }

    #[test]
    fn oversized_body_is_refused() {
        let big = HostFrame {
            id: 1,
            msg: HostMsg::Stdin {
                data: vec![0; MAX_FRAME],
            },
        };
        assert!(matches!(encode(&big), Err(FrameError::TooLarge(_))));
    }
}
