//! The nook host daemon as a library: [`serve`] wires the [`manager::Manager`] (VM lifecycle)
//! to its listeners. The `nook` binary only parses arguments and calls in here.
//!
//! It must not contain QEMU, SQL or nftables details: those belong to `nook-vmm`,
//! `nook-store` and `nook-net`.

pub mod admin;
pub mod agent;
pub mod config;
pub mod errors;
mod faults;
pub mod frontdoor;
pub mod gateway;
pub mod idle;
pub mod integrations;
pub mod join;
pub mod limits;
pub mod lobby;
pub mod manager;
pub mod metadata;
pub mod metrics;
mod names;
pub mod secrets;
pub mod web;
pub mod webapp;

use std::os::unix::fs::PermissionsExt;

pub use config::{Config, Settings};
pub use manager::Manager;
/// Run by `nook fence-watch`: the watch a fleet daemon leaves beside its QEMUs.
pub use nook_vmm::fence_watch;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("Cannot start: {0}")]
    Manager(nook_api::ApiError),
    #[error("Cannot listen on {0}")]
    Listen(String, #[source] std::io::Error),
    #[error("Another nook daemon is already serving {0}")]
    AlreadyRunning(String),
    #[error("Cannot start the HTTPS edge: {0}")]
    Web(String),
    #[error("{0}")]
    Agent(nook_storage::StorageError),
    #[error("Cannot make the data dir {0} private (mode 0700)")]
    DataDir(String, #[source] std::io::Error),
}

/// Runs the daemon until SIGINT or SIGTERM. Running VMs are left running, to be re-adopted.
pub async fn serve(cfg: Config) -> Result<(), ServeError> {
    let socket = cfg.admin_socket();
    if tokio::net::UnixStream::connect(&socket).await.is_ok() {
        return Err(ServeError::AlreadyRunning(socket.display().to_string()));
    }
    // Everything the daemon and its children (QEMU, qemu-img) make is its own alone: the
    // database, disks, keys and tokens in the data dir, and the sockets. The data dir itself is
    // closed to other local users whatever mode an older version left it with.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    std::fs::create_dir_all(&cfg.data_dir)
        .and_then(|()| {
            std::fs::set_permissions(&cfg.data_dir, std::fs::Permissions::from_mode(0o700))
        })
        .map_err(|e| ServeError::DataDir(cfg.data_dir.display().to_string(), e))?;
    // Before anything boots: a wrong agent would leave every new VM waiting out its ready
    // timeout with nothing but a loop on its console. (Running VMs are re-adopted once fixed.)
    nook_storage::check_agent(&cfg.agent).map_err(ServeError::Agent)?;
    let store_kind = cfg.store.kind();
    let manager = Manager::open(cfg).await.map_err(ServeError::Manager)?;
    tracing::info!(store = store_kind, "state store open");
    // Renewal and fencing first: recovery takes the leases of the VMs it re-adopts.
    manager.start_fleet().await.map_err(ServeError::Manager)?;
    manager.recover().await.map_err(ServeError::Manager)?;
    // Agent turns a stopped daemon cut short go on, now that their VMs are back.
    manager.agent_host().sweep_browsers(&manager);
    manager.agent_host().resume_all(&manager).await;
    {
        let m = manager.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(60));
            loop {
                tick.tick().await;
                m.agent_host().reap_browsers(&m).await;
            }
        });
    }

    // The admin socket appears last, so its presence means every listener is up.
    web::start(&manager).await?;
    let _ = std::fs::remove_file(&socket);
    let listener = tokio::net::UnixListener::bind(&socket)
        .map_err(|e| ServeError::Listen(socket.display().to_string(), e))?;
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| ServeError::Listen(socket.display().to_string(), e))?;
    tracing::info!(socket = %socket.display(), "admin API listening");

    if manager.net_mode() == nook_net::NetMode::Tap {
        let addr = std::net::SocketAddr::from((nook_net::METADATA_ADDR, 80));
        let md = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| ServeError::Listen(addr.to_string(), e))?;
        let app = metadata::router(manager.clone())
            .into_make_service_with_connect_info::<std::net::SocketAddr>();
        tokio::spawn(async move {
            if let Err(err) = axum::serve(md, app).await {
                tracing::error!(%err, "metadata service stopped");
            }
        });
        tracing::info!(%addr, "metadata service listening");
    }

    if let Some(addr) = manager.config().ssh_addr {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| ServeError::Listen(addr.to_string(), e))?;
        let cfg = nook_sshd::SshServerConfig {
            listen: addr,
            host_key_path: manager.config().ssh_host_key(),
            banner_host: manager.config().public_host.clone(),
        };
        let door = std::sync::Arc::new(frontdoor::FrontDoor::new(manager.clone()));
        tokio::spawn(async move {
            if let Err(err) =
                nook_sshd::serve_listener(listener, cfg, door, std::future::pending()).await
            {
                tracing::error!(%err, "SSH front door stopped");
            }
        });
        tracing::info!(%addr, "SSH front door listening");
    }

    idle::spawn(manager.clone(), manager.config().idle_after);
    if let Some(addr) = manager.config().metrics_addr {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| ServeError::Listen(addr.to_string(), e))?;
        let m = manager.clone();
        let app = axum::Router::new().route(
            "/metrics",
            axum::routing::get(move || {
                let m = m.clone();
                async move { metrics::render(&m).await }
            }),
        );
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        tracing::info!(%addr, "metrics listening (unauthenticated)");
    }

    let app = admin::router(manager.clone());
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown_signal())
        .await
        .map_err(|e| ServeError::Listen(socket.display().to_string(), e))?;
    let _ = std::fs::remove_file(&socket);
    manager.store().close().await;
    tracing::info!("stopped; running VMs keep running and will be re-adopted");
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
