//! Runs one parsed command and returns the process exit status.

use std::io::Write;

use anyhow::Context;
use hyper::Method;
use nook_api::{ApiError, ExecEvent, format_size};
use nook_daemon::{Config, Settings};

use crate::cli::{AccountCommand, Cli, Command, HostCommand, ImageCommand, ServeArgs, VmCommand};
use crate::client::{Client, Reply, body_bytes, each_line};

/// `println!` for results: a reader that stopped reading (`nook image list | grep -q`) ends
/// the command quietly, as SIGPIPE would, instead of panicking.
macro_rules! out {
    ($($arg:tt)*) => {{
        if let Err(err) = writeln!(std::io::stdout().lock(), $($arg)*) {
            if err.kind() == std::io::ErrorKind::BrokenPipe {
                std::process::exit(0);
            }
            eprintln!("error: cannot write the result: {err}");
            std::process::exit(1);
        }
    }};
}

pub async fn run(cli: Cli) -> i32 {
    match dispatch(cli).await {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            1
        }
    }
}

fn base_settings(cli: &Cli) -> Settings {
    Settings {
        data_dir: cli.data_dir.clone(),
        images_dir: cli.images_dir.clone(),
        ..Settings::default()
    }
}

async fn dispatch(cli: Cli) -> anyhow::Result<i32> {
    let base = base_settings(&cli);
    match cli.command {
        Command::Serve(args) => serve(base, args).await,
        Command::Image(cmd) => image(base, cmd).await,
        Command::Vm(cmd) => {
            let cfg = Config::validate(base)?;
            vm(&Client::new(&cfg.admin_socket()), cmd).await
        }
        Command::Ca(crate::cli::CaCommand::Path) => {
            let cfg = Config::validate(base)?;
            let path = cfg.ca_dir().join("ca.pem");
            if !path.is_file() {
                anyhow::bail!(
                    "No CA certificate at {} yet: `nook serve` makes it when its HTTPS edge starts",
                    path.display()
                );
            }
            out!("{}", path.display());
            Ok(0)
        }
        Command::FenceWatch { data_dir } => {
            tokio::task::spawn_blocking(move || nook_daemon::fence_watch::run(data_dir)).await??;
            Ok(0)
        }
        Command::Metrics => {
            let cfg = Config::validate(base)?;
            match Client::new(&cfg.admin_socket())
                .send(Method::GET, "/metrics", None)
                .await?
            {
                Reply::Ok(resp) => {
                    std::io::stdout().write_all(&body_bytes(resp).await?)?;
                    Ok(0)
                }
                Reply::Err(err) => Ok(fail(err, false)),
            }
        }
        Command::Account(cmd) => {
            let cfg = Config::validate(base)?;
            account(&Client::new(&cfg.admin_socket()), cmd).await
        }
        Command::Host(HostCommand::Ls { json }) => {
            let cfg = Config::validate(base)?;
            list_hosts(&Client::new(&cfg.admin_socket()), json).await
        }
        Command::Host(HostCommand::Drain { host }) => {
            let cfg = Config::validate(base)?;
            drain(&Client::new(&cfg.admin_socket()), &host).await
        }
        Command::Host(HostCommand::Cordon { host }) => {
            let cfg = Config::validate(base)?;
            cordon(&Client::new(&cfg.admin_socket()), &host, true).await
        }
        Command::Host(HostCommand::Uncordon { host }) => {
            let cfg = Config::validate(base)?;
            cordon(&Client::new(&cfg.admin_socket()), &host, false).await
        }
        Command::Host(HostCommand::Invite { ttl, store }) => {
            let cfg = Config::validate(base)?;
            invite_host(&Client::new(&cfg.admin_socket()), &ttl, store).await
        }
        Command::Host(HostCommand::Join {
            token,
            host_name,
            host_addr,
        }) => {
            let data_dir = Config::validate(base)?.data_dir;
            let joined = nook_daemon::join::join_fleet(
                &data_dir,
                &token,
                host_name.as_deref(),
                host_addr.as_deref(),
            )
            .await
            .map_err(anyhow::Error::msg)?;
            out!(
                "joined the fleet through host {} as host {}; {} now names the store. Start it with `nook serve`",
                joined.through,
                joined.host_name,
                joined.config.display()
            );
            Ok(0)
        }
    }
}

/// `nook host invite`: prints the token, and what to run with it on the new machine.
async fn invite_host(client: &Client, ttl: &str, store: Option<String>) -> anyhow::Result<i32> {
    let ttl_secs = nook_daemon::lobby::parse_age(ttl).ok_or_else(|| {
        anyhow::anyhow!("--ttl {ttl:?}: give a number and a unit, e.g. 30m, 2h or 7d")
    })?;
    let body = serde_json::json!({ "ttl_secs": ttl_secs, "store": store });
    let reply: serde_json::Value = match client
        .send(Method::POST, "/v1/hosts/invites", Some(body))
        .await?
    {
        Reply::Ok(resp) => serde_json::from_slice(&body_bytes(resp).await?)?,
        Reply::Err(err) => return Ok(fail(err, false)),
    };
    let token = reply["token"].as_str().unwrap_or_default();
    out!("{token}");
    eprintln!(
        "On the new machine, as root, within {ttl}: nook host join {token} --host-name NAME --host-addr ADDR\n\
         then `nook serve`. The token works once; it carries no secret of the fleet itself, but \
         whoever holds it can join, so pass it as you would a password."
    );
    Ok(0)
}

/// `nook host cordon|uncordon HOST`.
async fn cordon(client: &Client, host: &str, on: bool) -> anyhow::Result<i32> {
    let path = format!("/v1/hosts/{}/cordon", path_segment(host));
    let method = if on { Method::PUT } else { Method::DELETE };
    match client.send(method, &path, None).await? {
        Reply::Ok(_) if on => {
            out!(
                "host {host} is cordoned: new VMs go to other hosts (`nook host uncordon {host}` ends it)"
            );
            Ok(0)
        }
        Reply::Ok(_) => {
            out!("host {host} takes new VMs again");
            Ok(0)
        }
        Reply::Err(err) => Ok(fail(err, false)),
    }
}

/// Cordons `host`, then moves each VM off it in turn, through this host's admin lobby (each
/// move runs on `host`, which picks where each goes). Goes on past a VM that cannot move,
/// and says which. The host stays cordoned, so nothing lands on it after.
async fn drain(client: &Client, host: &str) -> anyhow::Result<i32> {
    let cordon_path = format!("/v1/hosts/{}/cordon", path_segment(host));
    if let Reply::Err(err) = client.send(Method::PUT, &cordon_path, None).await? {
        return Ok(fail(err, false));
    }
    let path = format!("/v1/hosts/{}/vms", path_segment(host));
    let names: Vec<String> = match client.send(Method::GET, &path, None).await? {
        Reply::Ok(resp) => serde_json::from_slice(&body_bytes(resp).await?)?,
        Reply::Err(err) => return Ok(fail(err, false)),
    };
    if names.is_empty() {
        out!("host {host} holds no VMs; it stays cordoned (`nook host uncordon {host}` ends it)");
        return Ok(0);
    }
    let mut stuck = Vec::new();
    for name in &names {
        if lobby(client, vec!["move".into(), name.clone()]).await? != 0 {
            stuck.push(name.as_str());
        }
    }
    if stuck.is_empty() {
        out!(
            "host {host} is drained: {} VMs moved; it stays cordoned (`nook host uncordon {host}` ends it)",
            names.len()
        );
        Ok(0)
    } else {
        eprintln!(
            "error: {} of {} VMs are still on host {host}: {}",
            stuck.len(),
            names.len(),
            stuck.join(", ")
        );
        Ok(1)
    }
}

async fn list_hosts(client: &Client, json: bool) -> anyhow::Result<i32> {
    match client.send(Method::GET, "/v1/hosts", None).await? {
        Reply::Ok(resp) => {
            let body = body_bytes(resp).await?;
            if json {
                std::io::stdout().write_all(&body)?;
                out!("");
                return Ok(0);
            }
            let hosts: Vec<serde_json::Value> = serde_json::from_slice(&body)?;
            out!(
                "{:<20} {:<13} {:<24} {:<8} {:>4} {:>6} {:>14} {:>6}",
                "HOST",
                "STATE",
                "ADDR",
                "VERSION",
                "VMS",
                "LEASES",
                "MEMORY",
                "BEAT"
            );
            for h in hosts {
                let mib = |k: &str| h[k].as_u64().unwrap_or(0);
                out!(
                    "{:<20} {:<13} {:<24} {:<8} {:>4} {:>6} {:>14} {:>5}s",
                    h["name"].as_str().unwrap_or(""),
                    match (h["up"].as_bool(), h["cordoned"].as_bool()) {
                        (Some(true), Some(true)) => "up, cordoned",
                        (Some(true), _) => "up",
                        (_, Some(true)) => "down, cordoned",
                        _ => "down",
                    },
                    h["addr"].as_str().unwrap_or(""),
                    h["version"].as_str().unwrap_or(""),
                    h["running_vms"].as_u64().unwrap_or(0),
                    h["leases"].as_u64().unwrap_or(0),
                    format!("{}/{} MiB", mib("memory_used_mib"), mib("memory_mib")),
                    h["since_heartbeat_ms"].as_i64().unwrap_or(0) / 1000
                );
            }
            Ok(0)
        }
        Reply::Err(err) => Ok(fail(err, false)),
    }
}

async fn serve(base: Settings, args: ServeArgs) -> anyhow::Result<i32> {
    // Layers: defaults, then the file, then env and flags (clap merges those two).
    let data_dir = Config::validate(base.clone())?.data_dir;
    let file = match &args.config {
        Some(path) => Settings::from_file(path)?,
        None if data_dir.join("nook.toml").is_file() => {
            Settings::from_file(&data_dir.join("nook.toml"))?
        }
        None => Settings::default(),
    };
    let flags = Settings {
        qemu: args.qemu,
        agent: args.agent,
        accel: args.accel,
        net: args.net,
        ready_timeout_secs: args.ready_timeout,
        dns: args.dns,
        log: args.log,
        ssh_addr: args.ssh_addr,
        public_host: args.public_host,
        domain: args.domain,
        vm_domain: args.vm_domain,
        jail_uid_base: args.jail_uid_base,
        llm_anthropic_base_url: args.llm_anthropic_base_url,
        llm_anthropic_key: args.llm_anthropic_key,
        llm_openai_base_url: args.llm_openai_base_url,
        llm_openai_key: args.llm_openai_key,
        llm_initial_credit: args.llm_initial_credit,
        agent_model: args.agent_model,
        pack: args.pack,
        fork_memory: args.fork_memory,
        store: args.store,
        host_name: args.host_name,
        host_addr: args.host_addr,
        cgroup_top: args.cgroup_top,
        browser: args.browser,
        github_url: args.github_url,
        github_api_url: args.github_api_url,
        idle_after_secs: args.idle_after,
        tcg_cache_mib: args.tcg_cache_mib,
        replicate_every_secs: args.replicate_every_secs,
        metrics_addr: args.metrics_addr,
        https_addr: args.https_addr,
        vm_ports: args.vm_ports,
        dns_addr: args.dns_addr,
        public_ip: args.public_ip,
        acme_directory: args.acme_directory,
        acme_email: args.acme_email,
        acme_root_ca: args.acme_root_ca,
        signup: args.signup,
        host_memory: args.host_memory,
        host_disk: args.host_disk,
        host_memory_reserve: args.host_memory_reserve,
        host_max_vms: args.host_max_vms,
        smtp_host: args.smtp_host,
        smtp_port: args.smtp_port,
        smtp_security: args.smtp_security,
        smtp_from: args.smtp_from,
        smtp_user: None,
        smtp_password: None,
        ..base
    };
    let cfg = Config::validate(file.merge(flags))?;
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&cfg.log).context("parse the log filter")?,
        )
        .with_writer(std::io::stderr)
        .init();
    nook_daemon::serve(cfg).await?;
    Ok(0)
}

async fn image(base: Settings, cmd: ImageCommand) -> anyhow::Result<i32> {
    let cfg = Config::validate(base)?;
    let store = nook_storage::ImageStore::new(cfg.images_dir.clone());
    match cmd {
        ImageCommand::Build { name } => {
            let kind: nook_storage::ImageKind = name.parse()?;
            let started = std::time::Instant::now();
            let image = tokio::task::spawn_blocking(move || {
                let bar = progress_bar();
                // Off a terminal (CI logs) a spinner draws nothing: print the steps as lines.
                let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
                let built = store.build(kind, &mut |event| {
                    match (&event.detail, tty) {
                        (Some(detail), true) => {
                            bar.set_message(format!("{}: {}", event.step, truncate(detail, 100)))
                        }
                        (Some(_), false) => {}
                        (None, true) => {
                            bar.println(format!("==> {}", event.step));
                            bar.set_message(event.step.clone());
                        }
                        (None, false) => eprintln!("==> {}", event.step),
                    }
                    bar.tick();
                });
                bar.finish_and_clear();
                built
            })
            .await??;
            eprintln!(
                "Built image '{}' (kernel {}) in {:.0}s at {}",
                kind,
                image.kernel_version,
                started.elapsed().as_secs_f64(),
                image.dir.display()
            );
            Ok(0)
        }
        ImageCommand::List { json } => {
            let images: Vec<_> = store
                .list()
                .into_iter()
                .map(|i| nook_api::ImageInfo {
                    name: i.kind.to_string(),
                    kernel_version: i.kernel_version.clone(),
                    path: i.dir.display().to_string(),
                })
                .collect();
            if json {
                out!("{}", serde_json::to_string_pretty(&images)?);
            } else if images.is_empty() {
                eprintln!(
                    "No images built yet: run `nook image build tiny` or `nook image build default`"
                );
            } else {
                for i in images {
                    out!("{:<10} {:<24} {}", i.name, i.kernel_version, i.path);
                }
            }
            Ok(0)
        }
    }
}

fn progress_bar() -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new_spinner();
    bar.enable_steady_tick(std::time::Duration::from_millis(120));
    bar
}

fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        s.chars().take(max).collect::<String>() + "…"
    }
}

fn fail(err: ApiError, json: bool) -> i32 {
    if json {
        eprintln!("{}", serde_json::json!({ "error": err }));
    } else {
        eprintln!("error: {}", err.message);
    }
    1
}

/// `nook vm CMD ...`: a lobby command about VMs, run by the daemon as the host's admin. What
/// it prints arrives as it is written (NDJSON lines of stdout and stderr, then the status).
async fn lobby(client: &Client, argv: Vec<String>) -> anyhow::Result<i32> {
    use std::io::IsTerminal;
    // `--setup-script -` reads the script from our stdin, as over SSH.
    let wants_stdin = argv
        .windows(2)
        .any(|w| w[0] == "--setup-script" && w[1] == "-")
        || argv.iter().any(|a| a == "--setup-script=-");
    let stdin = if wants_stdin {
        let mut text = String::new();
        std::io::Read::read_to_string(
            &mut std::io::Read::take(std::io::stdin(), 1 << 20),
            &mut text,
        )
        .context("read the setup script from stdin")?;
        Some(text)
    } else {
        None
    };
    let body = serde_json::json!({
        "argv": argv,
        "tty": std::io::stderr().is_terminal(),
        "stdin": stdin,
    });
    let resp = match client.send(Method::POST, "/v1/lobby", Some(body)).await? {
        Reply::Ok(resp) => resp,
        Reply::Err(err) => return Ok(fail(err, false)),
    };
    #[derive(serde::Deserialize)]
    struct Line {
        out: Option<String>,
        err: Option<String>,
        exit: Option<i32>,
    }
    let mut status = None;
    each_line(resp, |line: Line| {
        if let Some(text) = line.out {
            let mut out = std::io::stdout().lock();
            out.write_all(text.as_bytes())?;
            out.flush()?;
        }
        if let Some(text) = line.err {
            std::io::stderr().write_all(text.as_bytes())?;
        }
        if line.exit.is_some() {
            status = line.exit;
        }
        Ok(())
    })
    .await?;
    status.context("the daemon closed the stream without an exit status")
}

async fn vm(client: &Client, cmd: VmCommand) -> anyhow::Result<i32> {
    match cmd {
        VmCommand::Lobby(argv) => lobby(client, argv).await,
        VmCommand::Console { name } => match client
            .send(
                Method::GET,
                &format!("/v1/vms/{}/console", path_segment(&name)),
                None,
            )
            .await?
        {
            Reply::Ok(resp) => {
                std::io::stdout().write_all(&body_bytes(resp).await?)?;
                Ok(0)
            }
            Reply::Err(err) => Ok(fail(err, false)),
        },
        VmCommand::Exec {
            name,
            user,
            command,
        } => {
            let req = nook_api::ExecRequest {
                argv: command,
                user,
                ..Default::default()
            };
            let reply = client
                .send(
                    Method::POST,
                    &format!("/v1/vms/{}/exec", path_segment(&name)),
                    Some(serde_json::to_value(req)?),
                )
                .await?;
            let resp = match reply {
                Reply::Ok(resp) => resp,
                Reply::Err(err) => return Ok(fail(err, false)),
            };
            let mut status = None;
            each_line(resp, |event: ExecEvent| {
                match event {
                    ExecEvent::Stdout { data } => {
                        let mut out = std::io::stdout().lock();
                        out.write_all(&data)?;
                        out.flush()?;
                    }
                    ExecEvent::Stderr { data } => std::io::stderr().write_all(&data)?,
                    ExecEvent::Exit { code, signal } => {
                        status = Some(code.unwrap_or(128 + signal.unwrap_or(0)))
                    }
                    ExecEvent::Error { error } => status = Some(fail(error, false)),
                }
                Ok(())
            })
            .await?;
            status.context("the command's output ended without an exit status")
        }
    }
}

/// VM names are validated by the daemon; escape anything odd so a bad name reaches it intact.
fn path_segment(name: &str) -> String {
    name.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

async fn account(client: &Client, cmd: AccountCommand) -> anyhow::Result<i32> {
    let (method, email, body) = match cmd {
        AccountCommand::List => return list_accounts(client).await,
        AccountCommand::Add { email, key } => {
            let key = std::fs::read_to_string(&key)
                .with_context(|| format!("cannot read the public key {}", key.display()))?;
            let body = serde_json::json!({ "email": email, "key": key });
            return account_action(client, Method::POST, "/v1/accounts".into(), Some(body)).await;
        }
        AccountCommand::Verify { email } => {
            let path = format!("/v1/accounts/{}/verify", path_segment(&email));
            return account_action(client, Method::POST, path, None).await;
        }
        AccountCommand::Invite { email } => {
            let path = format!("/v1/accounts/{}/invite", path_segment(&email));
            return account_action(client, Method::POST, path, None).await;
        }
        AccountCommand::Credit {
            email,
            add,
            set,
            show: _,
        } => return credit(client, &email, add, set).await,
        AccountCommand::SetPlan {
            email,
            cpu,
            memory,
            disk,
            max_vms,
        } => (
            Method::PUT,
            email,
            Some(
                serde_json::json!({ "cpu": cpu, "memory": memory, "disk": disk, "max_vms": max_vms }),
            ),
        ),
        AccountCommand::Plan { email } => (Method::GET, email, None),
    };
    match client
        .send(
            method,
            &format!("/v1/accounts/{}/plan", path_segment(&email)),
            body,
        )
        .await?
    {
        Reply::Ok(resp) => {
            let plan: serde_json::Value = serde_json::from_slice(&body_bytes(resp).await?)?;
            out!(
                "{}: {} vCPU, {} memory, {} disk, up to {} VMs",
                plan["email"].as_str().unwrap_or(""),
                plan["cpu"]
                    .as_f64()
                    .map(|c| format!("{c}"))
                    .unwrap_or_default(),
                format_size(plan["memory_mib"].as_u64().unwrap_or(0) << 20),
                format_size(plan["disk_bytes"].as_u64().unwrap_or(0)),
                plan["max_vms"]
            );
            Ok(0)
        }
        Reply::Err(err) => Ok(fail(err, false)),
    }
}

async fn list_accounts(client: &Client) -> anyhow::Result<i32> {
    match client.send(Method::GET, "/v1/accounts", None).await? {
        Reply::Ok(resp) => {
            let accounts: Vec<serde_json::Value> =
                serde_json::from_slice(&body_bytes(resp).await?)?;
            for a in accounts {
                let mut notes = Vec::new();
                if a["owner"].as_bool() == Some(true) {
                    notes.push("owner");
                }
                if a["email_verified"].as_bool() != Some(true) {
                    notes.push("unconfirmed");
                }
                let notes = if notes.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", notes.join(", "))
                };
                out!("{}{notes}", a["email"].as_str().unwrap_or(""));
            }
            Ok(0)
        }
        Reply::Err(err) => Ok(fail(err, false)),
    }
}

/// Runs an account command and prints what it answered.
async fn credit(
    client: &Client,
    email: &str,
    add: Option<f64>,
    set: Option<f64>,
) -> anyhow::Result<i32> {
    let path = format!("/v1/accounts/{}/credit", path_segment(email));
    let reply = match (add, set) {
        (None, None) => client.send(Method::GET, &path, None).await?,
        _ => {
            let body = serde_json::json!({ "add": add, "set": set });
            client.send(Method::POST, &path, Some(body)).await?
        }
    };
    match reply {
        Reply::Ok(resp) => {
            let answer: serde_json::Value = serde_json::from_slice(&body_bytes(resp).await?)?;
            out!(
                "{}: {} of LLM credit",
                answer["email"].as_str().unwrap_or(email),
                answer["balance"].as_str().unwrap_or("?")
            );
            Ok(0)
        }
        Reply::Err(err) => Ok(fail(err, false)),
    }
}

async fn account_action(
    client: &Client,
    method: Method,
    path: String,
    body: Option<serde_json::Value>,
) -> anyhow::Result<i32> {
    match client.send(method, &path, body).await? {
        Reply::Ok(resp) => {
            let answer: serde_json::Value = serde_json::from_slice(&body_bytes(resp).await?)?;
            let email = answer["email"].as_str().unwrap_or("");
            if let Some(signup) = answer["signup"].as_str() {
                out!("Invite for {email} (once, within 7 days). They sign up with:\n  {signup}");
            } else {
                out!("{email}: email confirmed");
            }
            Ok(0)
        }
        Reply::Err(err) => Ok(fail(err, false)),
    }
}
