//! Forking a running VM: its memory and device state stream live into a second QEMU while
//! the source keeps running (sound under TCG only thanks to the RAM's tail:
//! [`crate::ram::RAM_TAIL`]), and at the one instant the source is paused its disk moves onto
//! a fresh overlay, so the clone's disk and memory are of the same moment.
//!
//! The stream goes over a socket pair straight into the clone's QEMU (started with
//! `-incoming defer`), so loading overlaps saving and no state file is ever left behind. Each
//! QEMU is handed its end over QMP: jailed QEMUs can see no socket path of another VM.
//! `pause-before-switchover` stops the migration after the source is paused and before its
//! device state is sent: that is where the disk switch happens.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::{Qmp, VmmError};

/// How long a fork may take before it is abandoned (and the source resumed).
const FORK_TIMEOUT: Duration = Duration::from_secs(120);
/// The source's pause is budgeted at this much by QEMU's precopy: it keeps copying dirty
/// pages until the rest fits. Lower than QEMU's default (300 ms) since the link is local.
const DOWNTIME_LIMIT_MS: u64 = 20;

#[derive(Debug, Clone, Copy, Default)]
pub struct ForkTimings {
    /// From the start of the migration until the clone holds all of the state.
    pub total: Duration,
    /// How long the source's vCPUs were stopped.
    pub paused: Duration,
}

/// The name both QEMUs know their end of the stream by.
const STREAM_FD: &str = "nook-fork";

/// Connects the clone's QEMU (launched with `-incoming defer`), now listening, to the
/// source's, which [`send`] then streams into.
pub async fn connect(clone: &Qmp, source: &Qmp) -> Result<(), VmmError> {
    let (into_clone, from_source) = stream_pair()?;
    listen(clone, into_clone).await?;
    attach(source, from_source).await
}

/// A socket pair for a migration stream: one end for a QEMU, the other for the other QEMU or
/// for nook to carry elsewhere.
pub fn stream_pair() -> Result<(std::os::fd::OwnedFd, std::os::fd::OwnedFd), VmmError> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
    socketpair(
        AddressFamily::Unix,
        SockType::Stream,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(|e| VmmError::Qmp(format!("cannot make the migration stream: {e}")))
}

/// Has a QEMU launched with `-incoming defer` take its state from `stream`.
pub async fn listen(clone: &Qmp, stream: std::os::fd::OwnedFd) -> Result<(), VmmError> {
    clone.pass_fd(STREAM_FD, stream).await?;
    clone
        .execute(
            "migrate-incoming",
            Some(json!({ "uri": format!("fd:{STREAM_FD}") })),
        )
        .await?;
    Ok(())
}

/// Gives the source QEMU the stream [`send`] then writes its state into.
pub async fn attach(source: &Qmp, stream: std::os::fd::OwnedFd) -> Result<(), VmmError> {
    source.pass_fd(STREAM_FD, stream).await
}

/// What the source does once all of its state went out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Then {
    /// Runs on (a fork: both go on).
    Resume,
    /// Stays paused, its disks released, for its QEMU to be ended (a move: the other side
    /// is the VM now).
    StayPaused,
}

/// Streams the running `source` into the clone it was [`connect`]ed to. When the source is
/// paused, `switch_disk` is called with its QMP to move the disk onto a new overlay; its
/// error aborts the fork, leaving the source running as before. The source always ends up
/// running, whatever happens.
pub async fn send<F, Fut>(source: &Qmp, switch_disk: F, then: Then) -> Result<ForkTimings, VmmError>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<(), VmmError>>,
{
    send_with(source, switch_disk, then, false).await
}

/// [`send`], leaving out RAM the source maps shared when `ignore_shared` (an instant fork).
async fn send_with<F, Fut>(
    source: &Qmp,
    switch_disk: F,
    then: Then,
    ignore_shared: bool,
) -> Result<ForkTimings, VmmError>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<(), VmmError>>,
{
    let started = Instant::now();
    source
        .execute(
            "migrate-set-capabilities",
            Some(json!({ "capabilities": [
                { "capability": "pause-before-switchover", "state": true },
                { "capability": "events", "state": true },
                // Left set by an instant fork, a later stream must carry all of the RAM.
                { "capability": "x-ignore-shared", "state": ignore_shared },
            ]})),
        )
        .await?;
    source
        .execute(
            "migrate-set-parameters",
            Some(json!({ "max-bandwidth": 1u64 << 40, "downtime-limit": DOWNTIME_LIMIT_MS })),
        )
        .await?;
    let mut events = source.events();
    source
        .execute("migrate", Some(json!({ "uri": format!("fd:{STREAM_FD}") })))
        .await?;
    let mut switch_disk = Some(switch_disk);
    let outcome = tokio::time::timeout(FORK_TIMEOUT, async {
        let mut paused_at: Option<Instant> = None;
        loop {
            // Events say when to act; the status poll backs them up, since an event can be
            // missed if the broadcast lags.
            let status = tokio::select! {
                ev = events.recv() => match ev {
                    Ok(ev) if ev.event == "STOP" => {
                        paused_at.get_or_insert_with(Instant::now);
                        continue;
                    }
                    Ok(ev) if ev.event == "MIGRATION" => ev.data.get("status").and_then(Value::as_str).unwrap_or_default().to_string(),
                    Ok(_) => continue,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => migration_status(source).await?,
                    Err(_) => return Err(VmmError::QmpClosed),
                },
                () = tokio::time::sleep(Duration::from_millis(50)) => migration_status(source).await?,
            };
            tracing::debug!(status, "fork: source migration");
            match status.as_str() {
                "pre-switchover" if switch_disk.is_some() => {
                    paused_at.get_or_insert_with(Instant::now);
                    if let Some(switch) = switch_disk.take() {
                        switch().await?;
                    }
                    source
                        .execute(
                            "migrate-continue",
                            Some(json!({ "state": "pre-switchover" })),
                        )
                        .await?;
                }
                "completed" => return Ok(paused_at),
                "failed" | "cancelled" => {
                    let why = source
                        .execute("query-migrate", None)
                        .await
                        .ok()
                        .and_then(|v| v.get("error-desc").and_then(Value::as_str).map(str::to_string))
                        .unwrap_or_else(|| status.clone());
                    return Err(VmmError::Qmp(format!("migration {status}: {why}")));
                }
                _ => {}
            }
        }
    })
    .await
    .unwrap_or(Err(VmmError::Timeout(FORK_TIMEOUT)));
    match outcome {
        Ok(paused_at) => {
            if then == Then::Resume {
                cont_after_migration(source).await?;
            }
            let paused = paused_at.map(|t| t.elapsed()).unwrap_or_default();
            Ok(ForkTimings {
                total: started.elapsed(),
                paused,
            })
        }
        Err(err) => {
            resume(source).await;
            Err(err)
        }
    }
}

/// The most device state a shared fork carries (its RAM is not in it): a VM's devices hold a
/// few hundred KB, so only a source whose RAM was not shared after all comes near it.
const DEVICE_STATE_MAX: u64 = 64 << 20;

/// Forks the running `source`, whose RAM is a memfd it maps shared, into `successor` and
/// `clone`: two QEMUs started with `-incoming defer` that map that memfd copy-on-write
/// ([`crate::RamMapping::Fork`]). The migration leaves the shared RAM out (`x-ignore-shared`),
/// so it pauses the source almost at once; `on_paused` then runs (it seals the memfd: from
/// then on the source's writes would reach both), and the device state goes out, nook copying
/// the one stream into both. The source stays paused with its disk released, for its
/// successor to take over; on an error it runs on. Returns when both hold the state.
pub async fn send_shared<F, Fut>(
    source: &Qmp,
    successor: &Qmp,
    clone: &Qmp,
    on_paused: F,
) -> Result<ForkTimings, VmmError>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<(), VmmError>>,
{
    // The destinations must leave the shared RAM out as the source does. (The source runs on
    // until the migration pauses it before its switchover: a source stopped beforehand hands
    // its successor a paused run state, and QEMU 7.2 then cannot release that successor's
    // disk when it is moved on later.)
    let ignore_shared = json!({ "capabilities": [
        { "capability": "x-ignore-shared", "state": true },
    ]});
    for qmp in [successor, clone] {
        qmp.execute("migrate-set-capabilities", Some(ignore_shared.clone()))
            .await?;
    }
    let (from_source, into_tee) = stream_pair()?;
    let (into_successor, from_tee_1) = stream_pair()?;
    let (into_clone, from_tee_2) = stream_pair()?;
    listen(successor, into_successor).await?;
    listen(clone, into_clone).await?;
    attach(source, from_source).await?;
    let tee = tokio::spawn(tee(into_tee, [from_tee_1, from_tee_2]));
    let sent = send_with(source, on_paused, Then::StayPaused, true).await;
    let outcome = async {
        let sent = sent?;
        tokio::time::timeout(FORK_TIMEOUT, async {
            tee.await
                .map_err(|e| VmmError::Qmp(format!("the fork's stream failed: {e}")))??;
            tokio::try_join!(received(successor), received(clone))
        })
        .await
        .unwrap_or(Err(VmmError::Timeout(FORK_TIMEOUT)))?;
        Ok(sent)
    }
    .await;
    if outcome.is_err() {
        resume(source).await;
    }
    outcome
}

/// Copies the source's state stream into both destinations until it ends.
async fn tee(from: std::os::fd::OwnedFd, into: [std::os::fd::OwnedFd; 2]) -> Result<(), VmmError> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let stream = |fd: std::os::fd::OwnedFd| {
        let std = std::os::unix::net::UnixStream::from(fd);
        std.set_nonblocking(true)
            .and_then(|()| tokio::net::UnixStream::from_std(std))
            .map_err(|e| VmmError::Qmp(format!("cannot carry the fork's stream: {e}")))
    };
    let mut from = stream(from)?;
    let [a, b] = into;
    let (mut a, mut b) = (stream(a)?, stream(b)?);
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        let n = from
            .read(&mut buf)
            .await
            .map_err(|e| VmmError::Qmp(format!("reading the source's state: {e}")))?;
        if n == 0 {
            break;
        }
        total += n as u64;
        if total > DEVICE_STATE_MAX {
            return Err(VmmError::Qmp(format!(
                "the source's device state passed {} MiB: its memory was not shared",
                DEVICE_STATE_MAX >> 20
            )));
        }
        let (ra, rb) = tokio::join!(a.write_all(&buf[..n]), b.write_all(&buf[..n]));
        ra.and(rb)
            .map_err(|e| VmmError::Qmp(format!("handing over the source's state: {e}")))?;
    }
    let _ = tokio::join!(a.shutdown(), b.shutdown());
    Ok(())
}

/// `cont` on a source whose migration just completed: QEMU refuses it until its migration
/// thread has wound down ("not finalized yet"), a matter of a millisecond or so.
async fn cont_after_migration(source: &Qmp) -> Result<(), VmmError> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match source.execute("cont", None).await {
            Err(VmmError::Qmp(msg))
                if msg.contains("not finalized") && Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_micros(500)).await;
            }
            other => return other.map(|_| ()),
        }
    }
}

/// Waits for the clone to hold all of the state, then lets it run.
pub async fn finish(clone: &Qmp) -> Result<(), VmmError> {
    received(clone).await?;
    if !is_running(clone).await? {
        clone.execute("cont", None).await?;
    }
    Ok(())
}

/// Waits for a QEMU with `-incoming` to hold all of the state; it stays paused.
pub async fn received(clone: &Qmp) -> Result<(), VmmError> {
    tokio::time::timeout(FORK_TIMEOUT, async {
        loop {
            match migration_status(clone).await?.as_str() {
                "completed" => break,
                s @ ("failed" | "cancelled") => {
                    return Err(VmmError::Qmp(format!("incoming migration {s}")));
                }
                _ => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
        Ok(())
    })
    .await
    .unwrap_or(Err(VmmError::Timeout(FORK_TIMEOUT)))
}

/// Cancels any migration of `vm` and makes sure its vCPUs run: after a fork that failed or
/// was interrupted (a daemon crash included), the source must not stay paused.
pub async fn resume(vm: &Qmp) {
    if let Ok(status) = migration_status(vm).await
        && matches!(
            status.as_str(),
            "setup" | "active" | "pre-switchover" | "device" | "wait-unplug"
        )
    {
        let _ = vm.execute("migrate_cancel", None).await;
        for _ in 0..200 {
            match migration_status(vm).await.as_deref() {
                Ok("cancelling" | "active" | "pre-switchover" | "device") => {
                    tokio::time::sleep(Duration::from_millis(10)).await
                }
                _ => break,
            }
        }
    }
    if matches!(is_running(vm).await, Ok(false)) {
        let _ = vm.execute("cont", None).await;
    }
}

async fn migration_status(vm: &Qmp) -> Result<String, VmmError> {
    let info = vm.execute("query-migrate", None).await?;
    Ok(info
        .get("status")
        .and_then(Value::as_str)
        .unwrap_or("none")
        .to_string())
}

async fn is_running(vm: &Qmp) -> Result<bool, VmmError> {
    let status = vm.execute("query-status", None).await?;
    Ok(status
        .get("running")
        .and_then(Value::as_bool)
        .unwrap_or(false))
}

/// The file QEMU currently writes the disk `device` to (the top of its chain).
pub async fn disk_top(vm: &Qmp, device: &str) -> Result<(String, String), VmmError> {
    let blocks = vm.execute("query-block", None).await?;
    blocks
        .as_array()
        .into_iter()
        .flatten()
        .find(|b| b.get("device").and_then(Value::as_str) == Some(device))
        .and_then(|b| b.get("inserted"))
        .and_then(|i| {
            let node = i.get("node-name")?.as_str()?.to_string();
            let file = top_file(i.get("file")?.as_str()?)?;
            Some((node, file))
        })
        .ok_or_else(|| VmmError::Qmp(format!("no disk named {device}")))
}

/// The top's own file from QEMU's name for a chain: a plain path, or (once the chain was
/// assembled at run time) a `json:` description whose `file.filename` is the top's file.
fn top_file(name: &str) -> Option<String> {
    match name.strip_prefix("json:") {
        Some(json) => serde_json::from_str::<Value>(json)
            .ok()?
            .pointer("/file/filename")?
            .as_str()
            .map(str::to_string),
        None => Some(name.to_string()),
    }
}

/// Moves the running `device` onto `overlay`, a new empty qcow2 file whose backing file is
/// the current top (under whatever name): from now on writes go to `overlay`, and the old
/// top is read only.
pub async fn switch_disk(vm: &Qmp, device: &str, overlay: &Path) -> Result<(), VmmError> {
    let (top, _) = disk_top(vm, device).await?;
    let node = format!("top-{}", hex_id());
    vm.execute(
        "blockdev-add",
        Some(json!({
            "driver": "qcow2",
            "node-name": node,
            "discard": "unmap",
            "detect-zeroes": "unmap",
            "file": { "driver": "file", "filename": overlay.display().to_string(), "locking": "off" },
            "backing": null,
        })),
    )
    .await?;
    if let Err(err) = vm
        .execute(
            "blockdev-snapshot",
            Some(json!({ "node": top, "overlay": node })),
        )
        .await
    {
        let _ = vm
            .execute("blockdev-del", Some(json!({ "node-name": node })))
            .await;
        return Err(err);
    }
    Ok(())
}

/// Copies into the running disk's top everything its chain holds above `base`, then drops
/// those layers from the chain (QEMU's block-stream). Returns once the job has finished.
pub async fn stream_to_base(vm: &Qmp, device: &str, base: &Path) -> Result<(), VmmError> {
    let nodes = vm.execute("query-named-block-nodes", None).await?;
    let base_name = base.display().to_string();
    let base_node = nodes
        .as_array()
        .into_iter()
        .flatten()
        .find(|n| {
            n.get("file").and_then(Value::as_str) == Some(base_name.as_str())
                && n.get("drv").and_then(Value::as_str) == Some("qcow2")
        })
        .and_then(|n| n.get("node-name").and_then(Value::as_str))
        .ok_or_else(|| VmmError::Qmp(format!("{base_name} is not in the disk's chain")))?
        .to_string();
    let (top, _) = disk_top(vm, device).await?;
    let job = format!("flatten-{}", hex_id());
    let mut events = vm.events();
    vm.execute(
        "block-stream",
        Some(json!({ "job-id": job, "device": top, "base-node": base_node, "auto-dismiss": true })),
    )
    .await?;
    loop {
        let ev = tokio::select! {
            ev = events.recv() => ev.ok(),
            () = tokio::time::sleep(Duration::from_millis(500)) => None,
        };
        if let Some(ev) = ev
            && ev.data.get("device").and_then(Value::as_str) == Some(job.as_str())
        {
            match ev.event.as_str() {
                "BLOCK_JOB_COMPLETED" => {
                    return match ev.data.get("error").and_then(Value::as_str) {
                        Some(e) => Err(VmmError::Qmp(format!("flattening failed: {e}"))),
                        None => Ok(()),
                    };
                }
                "BLOCK_JOB_CANCELLED" => {
                    return Err(VmmError::Qmp("flattening was cancelled".into()));
                }
                _ => continue,
            }
        }
        // No event: is the job still there? (Its completion event may have been missed.)
        let jobs = vm.execute("query-block-jobs", None).await?;
        let running = jobs
            .as_array()
            .into_iter()
            .flatten()
            .any(|j| j.get("device").and_then(Value::as_str) == Some(job.as_str()));
        if !running {
            return Ok(());
        }
    }
}

fn hex_id() -> String {
    format!("{:08x}", rand::random::<u32>())
}

#[cfg(test)]
mod tests {
    #[test]
    fn finds_the_top_file_in_qemu_names() {
        assert_eq!(
            super::top_file("/d/disk.qcow2").as_deref(),
            Some("/d/disk.qcow2")
        );
        let json = r#"json:{"backing": {"driver": "qcow2", "file": {"driver": "file", "filename": "/d/disk.qcow2"}}, "driver": "qcow2", "file": {"driver": "file", "filename": "/d/disk.next.qcow2"}}"#;
        assert_eq!(super::top_file(json).as_deref(), Some("/d/disk.next.qcow2"));
        assert_eq!(super::top_file("json:{nope"), None);
    }
}
