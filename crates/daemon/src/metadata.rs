//! The metadata service at 169.254.169.254:80, the one host address VMs may reach. It knows
//! the caller by source address, which the network layer guarantees cannot be spoofed.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::{ConnectInfo, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{any, get};

use crate::manager::Manager;

pub fn router(manager: Arc<Manager>) -> Router {
    Router::new()
        .route("/", get(metadata))
        .route("/metadata", get(metadata))
        .route("/gateway/llm/{*rest}", any(crate::gateway::llm))
        .route("/gateway/int/{*rest}", any(crate::integrations::by_path))
        .route("/api/exec", axum::routing::post(crate::webapp::from_vm))
        .layer(axum::middleware::from_fn_with_state(
            manager.clone(),
            crate::integrations::by_host,
        ))
        .with_state(manager)
}

/// The running VM a request on the metadata address comes from, as its source address proves;
/// else the 403 to answer.
pub(crate) async fn calling_vm(
    m: &Manager,
    peer: SocketAddr,
) -> Result<nook_api::VmInfo, axum::response::Response> {
    let std::net::IpAddr::V4(ip) = peer.ip() else {
        return Err((StatusCode::FORBIDDEN, "IPv4 only\n").into_response());
    };
    m.by_guest_ip(ip)
        .await
        .ok_or_else(|| (StatusCode::FORBIDDEN, "Unknown VM\n").into_response())
}

async fn metadata(
    State(m): State<Arc<Manager>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
) -> impl IntoResponse {
    match calling_vm(&m, peer).await {
        Ok(vm) => {
            let models = m.gateway().models();
            let providers: Vec<serde_json::Value> = m
                .config()
                .gateway
                .providers
                .iter()
                .map(|p| {
                    serde_json::json!({
                        "name": p.name,
                        "base_url": format!("http://{}{}{}", nook_net::METADATA_ADDR, nook_gateway::PREFIX, p.name),
                        "configured": p.key.is_some(),
                    })
                })
                .collect();
            let integrations = crate::integrations::of_vm(&m, &vm.id, &vm.owner).await;
            axum::Json(serde_json::json!({
                "integrations": integrations,
                "name": vm.name,
                "id": vm.id,
                "owner": vm.owner,
                "image": vm.image,
                "url": m.config().web_origin(Some(&vm.name)),
                "llm": {
                    "providers": providers,
                    "models": format!("http://{}{}models", nook_net::METADATA_ADDR, nook_gateway::PREFIX),
                    "model_ids": models["data"].as_array().map(|d| d.iter().filter_map(|m| m["id"].as_str().map(str::to_string)).collect::<Vec<_>>()).unwrap_or_default(),
                },
            }))
            .into_response()
        }
        Err(refused) => refused,
    }
}
