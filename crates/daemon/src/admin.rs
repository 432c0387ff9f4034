//! The local admin API: HTTP/1.1 over a unix socket in the data dir (mode 0600), serving the
//! `nook` subcommands. VMs are managed with the lobby's own commands (`POST /v1/lobby`, the
//! host's admin acting on every VM); besides those, exec and the console, accounts, plans and
//! credit. Long operations answer with NDJSON streams.

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use nook_api::{ApiError, ErrorCode, ExecEvent, ExecRequest};
use nook_proto::{GuestMsg, Stream};
use tokio::sync::mpsc;

use crate::manager::{Manager, Scope};

pub fn router(manager: Arc<Manager>) -> Router {
    Router::new()
        .route("/v1/info", get(info))
        .route("/metrics", get(metrics))
        .route("/v1/lobby", post(lobby_command))
        .route("/v1/vms/{name}/exec", post(exec))
        .route("/v1/vms/{name}/console", get(console))
        .route("/v1/hosts", get(list_hosts))
        .route("/v1/hosts/{name}/vms", get(host_vms))
        .route(
            "/v1/hosts/{name}/cordon",
            axum::routing::put(cordon_host).delete(uncordon_host),
        )
        .route("/v1/hosts/invites", post(invite_host))
        .route("/v1/accounts", get(list_accounts).post(add_account))
        .route("/v1/accounts/{email}/verify", post(verify_account))
        .route("/v1/accounts/{email}/invite", post(invite_account))
        .route("/v1/accounts/{email}/plan", get(get_plan).put(set_plan))
        .route(
            "/v1/accounts/{email}/credit",
            get(get_credit).post(change_credit),
        )
        .with_state(manager)
}

struct Failure(ApiError);

impl From<ApiError> for Failure {
    fn from(e: ApiError) -> Self {
        Self(e)
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.0.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, axum::Json(self.0)).into_response()
    }
}

type Reply<T> = Result<T, Failure>;

fn ndjson(rx: mpsc::Receiver<Bytes>) -> Response {
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, std::io::Error>(b), rx))
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

fn line<T: serde::Serialize>(event: &T) -> Bytes {
    let mut v = serde_json::to_vec(event).unwrap_or_default();
    v.push(b'\n');
    Bytes::from(v)
}

async fn info(State(m): State<Arc<Manager>>) -> impl IntoResponse {
    axum::Json(serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "accel": m.accel().map(|a| a.qemu_arg()),
        "net": format!("{:?}", m.net_mode()).to_lowercase(),
        "data_dir": m.config().data_dir,
    }))
}

async fn metrics(State(m): State<Arc<Manager>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        crate::metrics::render(&m).await,
    )
}

fn parse_json<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, Failure> {
    serde_json::from_slice(body).map_err(|e| {
        Failure(ApiError::new(
            ErrorCode::InvalidArgument,
            format!("Malformed request: {e}"),
        ))
    })
}

/// A VM's serial console log.
async fn console(
    State(m): State<Arc<Manager>>,
    Path(name): Path<String>,
) -> Reply<impl IntoResponse> {
    Ok(m.console(&name, Scope::Admin).await?)
}

/// Streams the command's output as NDJSON `stdout`/`stderr` events and ends with `exit`.
async fn exec(
    State(m): State<Arc<Manager>>,
    Path(name): Path<String>,
    body: Bytes,
) -> Reply<Response> {
    let req: ExecRequest = parse_json(&body)?;
    let mut process = m.exec(&name, Scope::Admin, req).await?;
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let event = match process.next().await {
                Some(GuestMsg::Output {
                    stream: Stream::Stdout,
                    data,
                }) => ExecEvent::Stdout { data },
                Some(GuestMsg::Output {
                    stream: Stream::Stderr,
                    data,
                }) => ExecEvent::Stderr { data },
                Some(GuestMsg::Exit { code, signal }) => {
                    let _ = tx.send(line(&ExecEvent::Exit { code, signal })).await;
                    break;
                }
                Some(_) => continue,
                None => {
                    let error = ApiError::new(
                        ErrorCode::AgentUnavailable,
                        "The guest agent went away before the command finished",
                    );
                    let _ = tx.send(line(&ExecEvent::Error { error })).await;
                    break;
                }
            };
            if tx.send(line(&event)).await.is_err() {
                // The client left: stop the command rather than let it run unobserved.
                let _ = process.handle().signal(9).await;
                break;
            }
        }
    });
    Ok(ndjson(rx))
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PlanChange {
    cpu: Option<f64>,
    memory: Option<String>,
    disk: Option<String>,
    max_vms: Option<u32>,
}

async fn account(m: &Manager, email: &str) -> Result<nook_store::Account, Failure> {
    m.store()
        .account_by_email(&email.to_ascii_lowercase())
        .await
        .map_err(|e| Failure(crate::errors::from_store("look up the account", e)))?
        .ok_or_else(|| {
            Failure(ApiError::new(
                ErrorCode::NotFound,
                format!("No account for {email}"),
            ))
        })
}

fn account_json(a: &nook_store::Account) -> serde_json::Value {
    serde_json::json!({
        "id": a.id,
        "email": a.email,
        "email_verified": a.email_verified,
        "owner": a.owner,
        "created_at": a.created_at,
    })
}

/// The names of the VMs living on one host (what `nook host drain` moves away).
async fn host_vms(
    State(m): State<Arc<Manager>>,
    axum::extract::Path(name): axum::extract::Path<String>,
) -> Reply<impl IntoResponse> {
    Ok(axum::Json(m.vms_on_host(&name).await?))
}

/// `nook host cordon HOST` (and `nook host drain`, first): no new VMs go there.
async fn cordon_host(
    State(m): State<Arc<Manager>>,
    Path(name): Path<String>,
) -> Reply<impl IntoResponse> {
    m.cordon_host(&name, true).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `nook host uncordon HOST`: new VMs may go there again.
async fn uncordon_host(
    State(m): State<Arc<Manager>>,
    Path(name): Path<String>,
) -> Reply<impl IntoResponse> {
    m.cordon_host(&name, false).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct HostInvite {
    ttl_secs: Option<u64>,
    /// The store URL the new host is given, when this host's own would not reach it.
    store: Option<String>,
}

/// `nook host invite`: a one-time token for `nook host join` on a new machine.
async fn invite_host(State(m): State<Arc<Manager>>, body: Bytes) -> Reply<impl IntoResponse> {
    let invite: HostInvite = parse_json(&body)?;
    let ttl = invite.ttl_secs.map_or(
        crate::manager::DEFAULT_INVITE_TTL,
        std::time::Duration::from_secs,
    );
    let token = m.invite_host(ttl, invite.store).await?;
    Ok(axum::Json(serde_json::json!({
        "token": token,
        "expires_in_secs": ttl.as_secs(),
    })))
}

/// The hosts sharing this host's store: each one's last heartbeat, whether it counts as up,
/// its load and the leases it holds. With SQLite: this host alone, from its own view.
async fn list_hosts(State(m): State<Arc<Manager>>) -> Reply<impl IntoResponse> {
    let hosts = m.hosts().await?;
    Ok(axum::Json(
        hosts
            .iter()
            .map(|h| {
                serde_json::json!({
                    "name": h.host.name,
                    "addr": h.host.addr,
                    "version": h.host.version,
                    "up": m.host_is_up(h),
                    "cordoned": h.cordoned,
                    "since_heartbeat_ms": h.since_heartbeat_ms,
                    "started_at_ms": h.host.started_at_ms,
                    "cpus": h.host.cpus,
                    "memory_mib": h.host.memory_mib,
                    "running_vms": h.host.running_vms,
                    "memory_used_mib": h.host.memory_used_mib,
                    "leases": h.leases,
                })
            })
            .collect::<Vec<_>>(),
    ))
}

async fn list_accounts(State(m): State<Arc<Manager>>) -> Reply<impl IntoResponse> {
    let accounts = m
        .store()
        .accounts()
        .await
        .map_err(|e| Failure(crate::errors::from_store("list accounts", e)))?;
    Ok(axum::Json(
        accounts.iter().map(account_json).collect::<Vec<_>>(),
    ))
}

#[derive(serde::Deserialize)]
struct NewAccount {
    email: String,
    /// An OpenSSH public key line.
    key: String,
}

/// `nook account add EMAIL --key FILE`: the admin vouches for the email, so it is verified.
async fn add_account(State(m): State<Arc<Manager>>, body: Bytes) -> Reply<impl IntoResponse> {
    let new: NewAccount = parse_json(&body)?;
    let email = new.email.trim().to_ascii_lowercase();
    if !crate::lobby::valid_email(&email) {
        return Err(Failure(ApiError::new(
            ErrorCode::InvalidArgument,
            format!("{:?} is not an email address", new.email),
        )));
    }
    let key = crate::lobby::parse_public_key(new.key.trim())?;
    let id = hex::encode(rand::random::<[u8; 8]>());
    let account = m
        .store()
        .create_account(&id, &email, &key, nook_store::Admission::Vouched)
        .await
        .map_err(|e| {
            Failure(match e {
                nook_store::StoreError::EmailTaken(_) => ApiError::new(
                    ErrorCode::EmailTaken,
                    format!("An account for {email} already exists: `nook account verify {email}` confirms its email"),
                ),
                nook_store::StoreError::KeyTaken => ApiError::new(
                    ErrorCode::KeyTaken,
                    "That key already belongs to an account",
                ),
                other => crate::errors::from_store("create the account", other),
            })
        })?;
    tracing::info!(account = %account.id, "account added by the admin");
    Ok(axum::Json(account_json(&account)))
}

/// `nook account verify EMAIL`: the admin vouches for an existing account's email.
async fn verify_account(
    State(m): State<Arc<Manager>>,
    Path(email): Path<String>,
) -> Reply<impl IntoResponse> {
    let account = account(&m, &email).await?;
    m.store()
        .verify_email(&account.id)
        .await
        .map_err(|e| Failure(crate::errors::from_store("verify the email", e)))?;
    tracing::info!(account = %account.id, "email verified by the admin");
    let account = self::account(&m, &email).await?;
    Ok(axum::Json(account_json(&account)))
}

/// `nook account invite EMAIL`: a one-time signup code for that email.
async fn invite_account(
    State(m): State<Arc<Manager>>,
    Path(email): Path<String>,
) -> Reply<impl IntoResponse> {
    let (email, code) = crate::lobby::make_invite(&m, &email).await?;
    Ok(axum::Json(serde_json::json!({
        "email": email,
        "code": code,
        "expires_in_secs": nook_store::INVITE_TTL_SECS,
        "signup": format!("{} signup {email} --invite {code}", m.config().ssh_command(None)),
    })))
}

fn credit_json(email: &str, micros: i64) -> serde_json::Value {
    serde_json::json!({
        "email": email,
        "balance_micros": micros,
        "balance": nook_gateway::dollars(micros),
    })
}

async fn get_credit(
    State(m): State<Arc<Manager>>,
    Path(email): Path<String>,
) -> Reply<impl IntoResponse> {
    let account = account(&m, &email).await?;
    let micros = m
        .ledger()
        .balance(&account.id)
        .await
        .map_err(|e| Failure(crate::errors::from_store("read the credit", e)))?;
    Ok(axum::Json(credit_json(&account.email, micros)))
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct CreditChange {
    add: Option<f64>,
    set: Option<f64>,
}

/// `nook account credit EMAIL --add|--set DOLLARS`.
async fn change_credit(
    State(m): State<Arc<Manager>>,
    Path(email): Path<String>,
    body: Bytes,
) -> Reply<impl IntoResponse> {
    let change: CreditChange = parse_json(&body)?;
    let account = account(&m, &email).await?;
    let micros = |dollars: f64, what: &str| -> Result<i64, Failure> {
        if !dollars.is_finite() || dollars.abs() > 1e9 {
            return Err(Failure(ApiError::new(
                ErrorCode::InvalidArgument,
                format!("Invalid --{what} {dollars}: give dollars, e.g. 10 or 2.50"),
            )));
        }
        Ok((dollars * 1e6).round() as i64)
    };
    let (delta, set) = match (change.add, change.set) {
        (Some(add), None) => (micros(add, "add")?, false),
        (None, Some(set)) => (micros(set, "set")?, true),
        _ => {
            return Err(Failure(ApiError::new(
                ErrorCode::InvalidArgument,
                "Give one of --add or --set",
            )));
        }
    };
    let balance = m
        .ledger()
        .change(&account.id, delta, set)
        .await
        .map_err(|e| Failure(crate::errors::from_store("change the credit", e)))?;
    tracing::info!(account = %account.id, delta, set, balance, "LLM credit changed");
    Ok(axum::Json(credit_json(&account.email, balance)))
}

fn plan_json(email: &str, plan: &nook_store::Plan) -> serde_json::Value {
    serde_json::json!({
        "email": email,
        "cpu": plan.cpu,
        "memory_mib": plan.memory_mib,
        "disk_bytes": plan.disk_bytes,
        "max_vms": plan.max_vms,
    })
}

async fn get_plan(
    State(m): State<Arc<Manager>>,
    Path(email): Path<String>,
) -> Reply<impl IntoResponse> {
    let account = account(&m, &email).await?;
    let plan = m.plan_for(&account.id).await?;
    Ok(axum::Json(plan_json(&account.email, &plan)))
}

/// Changes only the fields given; the rest keep their current (or default) values.
async fn set_plan(
    State(m): State<Arc<Manager>>,
    Path(email): Path<String>,
    body: Bytes,
) -> Reply<impl IntoResponse> {
    let change: PlanChange = parse_json(&body)?;
    let account = account(&m, &email).await?;
    let mut plan = m.plan_for(&account.id).await?;
    let invalid = |msg: String| Failure(ApiError::new(ErrorCode::InvalidArgument, msg));
    if let Some(cpu) = change.cpu {
        if !(0.1..=1024.0).contains(&cpu) {
            return Err(invalid(format!("Invalid --cpu {cpu}: use 0.1 to 1024")));
        }
        plan.cpu = cpu;
    }
    if let Some(memory) = change.memory {
        plan.memory_mib = (nook_api::parse_size(&memory)? >> 20) as u32;
        if plan.memory_mib < 128 {
            return Err(invalid("Invalid --memory: at least 128M".into()));
        }
    }
    if let Some(disk) = change.disk {
        plan.disk_bytes = nook_api::parse_size(&disk)?;
    }
    if let Some(max) = change.max_vms {
        if max == 0 {
            return Err(invalid("Invalid --max-vms 0: at least 1".into()));
        }
        plan.max_vms = max;
    }
    m.store()
        .set_plan(&account.id, &plan)
        .await
        .map_err(|e| Failure(crate::errors::from_store("set the plan", e)))?;
    m.apply_plan(&account.id).await;
    tracing::info!(account = %account.id, ?plan, "plan set");
    Ok(axum::Json(plan_json(&account.email, &plan)))
}

/// `POST /v1/lobby` `{"argv": [...], "tty": bool, "stdin": "..."}`: the admin runs a lobby
/// command about VMs (`nook vm new|ls|rm|start|stop|restart|rename|cp|resize|stat|share`), the
/// same grammar and the same output as `ssh HOST CMD`, on every VM. The answer streams NDJSON
/// lines `{"out": TEXT}`, `{"err": TEXT}` as the command writes, then `{"exit": STATUS}`.
async fn lobby_command(State(m): State<Arc<Manager>>, body: Bytes) -> Response {
    #[derive(serde::Deserialize)]
    struct Req {
        argv: Vec<String>,
        #[serde(default)]
        tty: bool,
        #[serde(default)]
        stdin: Option<String>,
    }
    let req: Req = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return Failure(ApiError::new(
                ErrorCode::InvalidArgument,
                format!("Invalid request: {e}"),
            ))
            .into_response();
        }
    };
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    tokio::spawn(async move {
        let io = AdminIo {
            tx: tx.clone(),
            tty: req.tty,
        };
        let caller = crate::lobby::Caller {
            account: None,
            key_openssh: String::new(),
            fingerprint: String::new(),
            peer: None,
            limits: None,
            admin: true,
        };
        let stdin = req.stdin.map(|s| Ok(s.into_bytes()));
        let status = crate::lobby::run(&m, &caller, req.argv, stdin, &io).await;
        let _ = tx.send(format!("{}\n", serde_json::json!({ "exit": status })));
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|line| (Ok::<_, std::convert::Infallible>(line), rx))
    });
    let mut resp = Response::new(axum::body::Body::from_stream(stream));
    resp.headers_mut().insert(
        axum::http::header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static("application/x-ndjson"),
    );
    resp
}

/// A lobby command's output as NDJSON lines for `nook vm`. The admin's own client reads it
/// as it comes, on a local socket: nothing a tenant can fill.
struct AdminIo {
    tx: tokio::sync::mpsc::UnboundedSender<String>,
    tty: bool,
}

impl crate::lobby::LobbyOutput for AdminIo {
    fn out(&self, bytes: &[u8]) {
        let text = String::from_utf8_lossy(bytes);
        let _ = self
            .tx
            .send(format!("{}\n", serde_json::json!({ "out": text })));
    }
    fn err(&self, bytes: &[u8]) {
        let text = String::from_utf8_lossy(bytes);
        let _ = self
            .tx
            .send(format!("{}\n", serde_json::json!({ "err": text })));
    }
    fn tty(&self) -> bool {
        self.tty
    }
    fn writable(&self) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>> {
        Box::pin(std::future::ready(()))
    }
}
