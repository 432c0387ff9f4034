//! Integrations in the daemon: the lobby's `integrations` commands, the secrets they seal, the
//! routes VMs reach them by (`http://NAME.int.VM_DOMAIN/...` and
//! `http://169.254.169.254/gateway/int/NAME/...`), and the guest's /etc/hosts entries that
//! point those names at the gateway.

use std::net::SocketAddr;
use std::sync::Arc;

use crate::lobby::Reply;
use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use nook_api::lobby::{IntegrationKind, IntegrationsCommand};
use nook_api::{ApiError, ErrorCode, VmState};
use nook_gateway::{BaseUrl, Caller, Route};
use nook_store::{Account, IntegrationRow, VmRecord};
use serde_json::json;

use crate::manager::{Manager, Scope};

/// The marker on the /etc/hosts lines nook owns in a guest.
const HOSTS_MARK: &str = "# nook-integration";

fn store_err(context: &str) -> impl FnOnce(nook_store::StoreError) -> ApiError + '_ {
    move |e| crate::errors::from_store(context, e)
}

fn invalid(msg: String) -> ApiError {
    ApiError::new(ErrorCode::InvalidArgument, msg)
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 32
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

/// The URL a VM reaches an integration at.
pub fn url(m: &Manager, name: &str) -> String {
    format!("http://{name}.int.{}/", m.config().vm_domain)
}

pub(crate) async fn command(
    m: &Arc<Manager>,
    account: &Account,
    cmd: IntegrationsCommand,
) -> Result<Reply, ApiError> {
    // Each answer is one value, printed by the lobby as text or as JSON.
    let say = |text: String, value: serde_json::Value| Ok(Reply::new(value, text));
    match cmd {
        IntegrationsCommand::Add(kind) => {
            let (name, row) = new_integration(m, account, kind).await?;
            if !m
                .store()
                .add_integration(&row)
                .await
                .map_err(store_err("add the integration"))?
            {
                return Err(ApiError::new(
                    ErrorCode::IntegrationExists,
                    format!(
                        "You already have an integration named {name:?}: remove it first, or pick another name"
                    ),
                ));
            }
            tracing::info!(account = %account.id, integration = %name, kind = %row.kind, "integration added");
            let reach = if row.kind == "llm" {
                let config: serde_json::Value =
                    serde_json::from_str(&row.config).unwrap_or_default();
                config["target"].as_str().unwrap_or_default().to_string()
            } else {
                url(m, &name)
            };
            say(
                format!(
                    "Added {name} ({}). Attach it to a VM with `integrations attach {name} VM`; the VM then reaches it at {reach}",
                    row.kind
                ),
                json!({ "name": name, "kind": row.kind, "url": reach }),
            )
        }
        IntegrationsCommand::List => {
            let rows = m
                .store()
                .integrations(&account.id)
                .await
                .map_err(store_err("list integrations"))?;
            let mut out = Vec::new();
            let mut text = String::new();
            for row in &rows {
                let grants = m
                    .store()
                    .grants(&row.id)
                    .await
                    .map_err(store_err("list integrations"))?;
                let mut vms = Vec::new();
                for g in grants {
                    let name = match m.store().get_by_id(&g.vm_id).await {
                        Ok(vm) => vm.name,
                        Err(_) => continue,
                    };
                    vms.push(json!({ "vm": name, "expires_at": g.expires_at }));
                }
                let config: serde_json::Value =
                    serde_json::from_str(&row.config).unwrap_or_default();
                text.push_str(&format!(
                    "{:<16} {:<11} {:<40} {}\n",
                    row.name,
                    row.kind,
                    config["target"]
                        .as_str()
                        .or(config["peer"].as_str())
                        .unwrap_or("github"),
                    vms.iter()
                        .filter_map(|v| v["vm"].as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
                out.push(json!({ "name": row.name, "kind": row.kind, "config": config, "url": url(m, &row.name), "attached": vms }));
            }
            if rows.is_empty() {
                text.push_str("No integrations yet: `integrations add http-proxy|github ...`\n");
            }
            say(text.trim_end().to_string(), json!(out))
        }
        IntegrationsCommand::Remove { name } => {
            let Some(row) = m
                .store()
                .integration(&account.id, &name)
                .await
                .map_err(store_err("remove the integration"))?
            else {
                return Err(not_found(&name));
            };
            let grants = m
                .store()
                .grants(&row.id)
                .await
                .map_err(store_err("remove the integration"))?;
            m.store()
                .remove_integration(&account.id, &name)
                .await
                .map_err(store_err("remove the integration"))?;
            for g in grants {
                if let Ok(vm) = m.store().get_by_id(&g.vm_id).await {
                    sync_hosts(m, &vm).await;
                }
            }
            say(
                format!("Removed {name}"),
                json!({ "name": name, "removed": true }),
            )
        }
        IntegrationsCommand::Attach { name, vm, for_ } => {
            let row = m
                .store()
                .integration(&account.id, &name)
                .await
                .map_err(store_err("attach"))?
                .ok_or_else(|| not_found(&name))?;
            let vm = m.record(&vm, Scope::Account(&account.id)).await?;
            let expires_at = match for_.as_deref() {
                None => None,
                Some(text) => {
                    let secs = crate::lobby::parse_age(text).ok_or_else(|| {
                        invalid(format!(
                            "Invalid --for {text:?}: use a number with s, m, h or d, e.g. 2h"
                        ))
                    })?;
                    Some(unix_now_rounded_up() + secs)
                }
            };
            m.store()
                .grant_integration(&row.id, &vm.id, expires_at)
                .await
                .map_err(store_err("attach"))?;
            sync_hosts(m, &vm).await;
            say(
                format!(
                    "{} now reaches {name} at {}{}",
                    vm.name,
                    url(m, &name),
                    for_.map(|f| format!(" for {f}")).unwrap_or_default()
                ),
                json!({ "name": name, "vm": vm.name, "url": url(m, &name), "expires_at": expires_at }),
            )
        }
        IntegrationsCommand::Detach { name, vm } => {
            let row = m
                .store()
                .integration(&account.id, &name)
                .await
                .map_err(store_err("detach"))?
                .ok_or_else(|| not_found(&name))?;
            let vm = m.record(&vm, Scope::Account(&account.id)).await?;
            if !m
                .store()
                .revoke_integration(&row.id, &vm.id)
                .await
                .map_err(store_err("detach"))?
            {
                return Err(invalid(format!("{name} is not attached to {}", vm.name)));
            }
            sync_hosts(m, &vm).await;
            say(
                format!("{} no longer reaches {name}", vm.name),
                json!({ "name": name, "vm": vm.name, "detached": true }),
            )
        }
    }
}

fn not_found(name: &str) -> ApiError {
    ApiError::new(
        ErrorCode::IntegrationNotFound,
        format!("No integration named {name:?}: `integrations list` shows yours"),
    )
}

/// The time in whole seconds, rounded up: a grant "for 15s" ends 15 to 16 s later, never
/// sooner (grants are checked against the time rounded down, and rounding the start down too
/// ended them up to a second early).
fn unix_now_rounded_up() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64 + i64::from(d.subsec_nanos() > 0))
}

/// Checks an `add` and seals its secret.
async fn new_integration(
    m: &Arc<Manager>,
    account: &Account,
    kind: IntegrationKind,
) -> Result<(String, IntegrationRow), ApiError> {
    let id = hex::encode(rand::random::<[u8; 8]>());
    let (name, kind, config, secret) = match kind {
        IntegrationKind::HttpProxy {
            name,
            target,
            headers,
            bearer,
            peer,
            port,
        } => {
            if let Some(peer) = peer {
                if !headers.is_empty() || bearer.is_some() {
                    return Err(invalid(
                        "A --peer integration carries the caller's name, not headers or tokens"
                            .into(),
                    ));
                }
                let vm = m.record(&peer, Scope::Account(&account.id)).await?;
                (
                    name,
                    "http-proxy",
                    json!({ "peer": vm.name, "peer_id": vm.id, "port": port }),
                    None,
                )
            } else {
                let target = target.unwrap_or_default();
                BaseUrl::parse(&target)
                    .map_err(|why| invalid(format!("Invalid --target: {why}")))?;
                let mut pairs = Vec::new();
                for h in &headers {
                    let (k, v) = h.split_once(':').ok_or_else(|| {
                        invalid(format!(
                            "Invalid --header {:?}: use KEY:VALUE",
                            h.chars().take(40).collect::<String>()
                        ))
                    })?;
                    let (k, v) = (k.trim().to_ascii_lowercase(), v.trim().to_string());
                    let ok = axum::http::HeaderName::from_bytes(k.as_bytes()).is_ok()
                        && axum::http::HeaderValue::from_str(&v).is_ok()
                        && !k.starts_with("x-nook")
                        && k != "host";
                    if !ok {
                        return Err(invalid(format!(
                            "Invalid --header {k:?}: a header name and a printable value"
                        )));
                    }
                    pairs.push((k, v));
                }
                if let Some(token) = bearer {
                    pairs.push(("authorization".into(), format!("Bearer {token}")));
                }
                if pairs.is_empty() {
                    return Err(invalid("An http-proxy integration needs --header KEY:VALUE or --bearer TOKEN (or --peer VM)".into()));
                }
                let names: Vec<&String> = pairs.iter().map(|(k, _)| k).collect();
                let config = json!({ "target": target.trim_end_matches('/'), "headers": names });
                (
                    name,
                    "http-proxy",
                    config,
                    Some(json!({ "headers": pairs })),
                )
            }
        }
        IntegrationKind::Llm {
            name,
            provider,
            key,
        } => {
            if key.trim().is_empty() || key.contains(char::is_whitespace) {
                return Err(invalid("Invalid --key: give the key itself".into()));
            }
            let url = format!(
                "http://{}{}{provider}",
                nook_net::METADATA_ADDR,
                nook_gateway::PREFIX
            );
            (
                name,
                "llm",
                json!({ "provider": provider, "target": url }),
                Some(json!({ "key": key })),
            )
        }
        IntegrationKind::Github {
            name,
            token,
            repositories,
        } => {
            for r in &repositories {
                let ok = r
                    .split_once('/')
                    .is_some_and(|(o, n)| !o.is_empty() && !n.is_empty() && !n.contains('/'));
                if !ok {
                    return Err(invalid(format!(
                        "Invalid --repository {r:?}: use OWNER/REPO"
                    )));
                }
            }
            if token.trim().is_empty() || token.contains(char::is_whitespace) {
                return Err(invalid("Invalid --token: give the token itself".into()));
            }
            (
                name,
                "github",
                json!({ "repositories": repositories }),
                Some(json!({ "token": token })),
            )
        }
    };
    if !valid_name(&name) {
        return Err(invalid(format!(
            "Invalid --name {name:?}: lowercase letters, digits and '-', at most 32 (it becomes {name}.int.{})",
            m.config().vm_domain
        )));
    }
    let sealed = secret.map(|s| m.sealer().seal(&id, s.to_string().as_bytes()));
    Ok((
        name.clone(),
        IntegrationRow {
            id,
            account_id: account.id.clone(),
            name,
            kind: kind.into(),
            config: config.to_string(),
            secret: sealed,
            created_at: String::new(),
        },
    ))
}

/// The route for an integration row, with its secret unsealed (in memory only).
async fn route_of(m: &Manager, row: &IntegrationRow) -> Option<Route> {
    let config: serde_json::Value = serde_json::from_str(&row.config).ok()?;
    let secret: serde_json::Value = match &row.secret {
        Some(sealed) => {
            let Some(plain) = m.sealer().unseal(&row.id, sealed) else {
                tracing::error!(integration = %row.name, "an integration's secret does not open with this data dir's key");
                return None;
            };
            serde_json::from_slice(&plain).ok()?
        }
        None => serde_json::Value::Null,
    };
    match row.kind.as_str() {
        "http-proxy" if config.get("peer_id").is_some() => {
            let vm = m
                .store()
                .get_by_id(config["peer_id"].as_str()?)
                .await
                .ok()?;
            if vm.owner != row.account_id || vm.state != VmState::Running {
                return None;
            }
            let ip = nook_net::VmLink::for_slot(vm.slot).ok()?.guest_ip;
            let port = config["port"]
                .as_u64()
                .and_then(|p| u16::try_from(p).ok())?;
            Some(Route::Peer {
                upstream: SocketAddr::from((ip, port)),
            })
        }
        "http-proxy" => {
            let target = BaseUrl::parse(config["target"].as_str()?).ok()?;
            let headers = secret["headers"]
                .as_array()?
                .iter()
                .filter_map(|p| Some((p[0].as_str()?.to_string(), p[1].as_str()?.to_string())))
                .collect();
            Some(Route::HttpProxy { target, headers })
        }
        "github" => Some(Route::GitHub {
            web: BaseUrl::parse(&m.config().github_url).ok()?,
            api: BaseUrl::parse(&m.config().github_api_url).ok()?,
            token: secret["token"].as_str()?.to_string(),
            repositories: config["repositories"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|r| r.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default(),
        }),
        _ => None,
    }
}

/// Serves one request to integration `name` from the VM at `peer`.
async fn serve(
    m: &Arc<Manager>,
    peer: SocketAddr,
    name: &str,
    path: &str,
    req: Request,
) -> Response {
    let vm = match crate::metadata::calling_vm(m.as_ref(), peer).await {
        Ok(vm) => vm,
        Err(refused) => return refused,
    };
    let row = match m.store().integration_for_vm(&vm.id, &vm.owner, name).await {
        Ok(row) => row,
        Err(err) => {
            tracing::error!(%err, "integration lookup failed");
            return (StatusCode::SERVICE_UNAVAILABLE, "try again\n").into_response();
        }
    };
    let route = match &row {
        Some(row) => route_of(m, row).await,
        None => None,
    };
    let caller = Caller {
        account_id: vm.owner,
        vm_id: vm.id,
        vm_name: vm.name,
    };
    m.gateway()
        .integrate(&caller, name, route, path, req)
        .await
        .map(Body::new)
}

/// `/gateway/int/NAME/...` on the metadata address.
pub async fn by_path(
    State(m): State<Arc<Manager>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: Request,
) -> Response {
    let full = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_default();
    let rest = full.strip_prefix("/gateway/int/").unwrap_or_default();
    let (name, path) = rest.split_at(rest.find(['/', '?']).unwrap_or(rest.len()));
    let name = name.to_string();
    serve(&m, peer, &name, path, req).await
}

/// Requests for `NAME.int.VM_DOMAIN` go to the integration, whatever their path.
pub async fn by_host(
    State(m): State<Arc<Manager>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: Request,
    next: Next,
) -> Response {
    let host = req
        .headers()
        .get(axum::http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(|h| {
            h.rsplit_once(':')
                .map_or(h, |(name, port)| {
                    if port.bytes().all(|b| b.is_ascii_digit()) {
                        name
                    } else {
                        h
                    }
                })
                .to_ascii_lowercase()
        });
    let suffix = format!(".int.{}", m.config().vm_domain);
    match host.as_deref().and_then(|h| h.strip_suffix(&suffix)) {
        Some(name) if valid_name(name) => {
            let name = name.to_string();
            let path = req
                .uri()
                .path_and_query()
                .map(|p| p.as_str().to_string())
                .unwrap_or_else(|| "/".into());
            serve(&m, peer, &name, &path, req).await
        }
        _ => next.run(req).await,
    }
}

/// Points the names of the integrations attached to `vm` at the gateway in its /etc/hosts,
/// and drops those no longer attached. A VM that is not running gets them at its next boot.
pub async fn sync_hosts(m: &Manager, vm: &VmRecord) {
    if vm.state != VmState::Running {
        return;
    }
    let names = m
        .store()
        .integrations_of_vm(&vm.id, &vm.owner)
        .await
        .unwrap_or_default();
    let lines: String = names
        .iter()
        .filter(|n| valid_name(n))
        .map(|n| {
            format!(
                "{} {n}.int.{} {HOSTS_MARK}\n",
                nook_net::METADATA_ADDR,
                m.config().vm_domain
            )
        })
        .collect();
    let script = format!(
        "f=/etc/hosts; {{ grep -v '{HOSTS_MARK}$' $f; printf '%s' '{lines}'; }} > $f.nook && cat $f.nook > $f; rm -f $f.nook"
    );
    match m.guest_sh(vm, &script).await {
        Ok(0) => {}
        Ok(code) => tracing::warn!(vm = %vm.name, code, "could not update the guest's /etc/hosts"),
        Err(err) => {
            tracing::warn!(vm = %vm.name, error = %err.message, "could not update the guest's /etc/hosts")
        }
    }
}

/// The integrations attached to a VM, for its metadata.
pub async fn of_vm(m: &Manager, vm_id: &str, owner: &str) -> Vec<serde_json::Value> {
    m.store()
        .integrations_of_vm(vm_id, owner)
        .await
        .unwrap_or_default()
        .into_iter()
        .map(|n| json!({ "name": n, "url": url(m, &n) }))
        .collect()
}
