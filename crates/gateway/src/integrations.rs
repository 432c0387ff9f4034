//! Integrations: a VM calls `http://NAME.int.VM_DOMAIN/...` (or
//! `http://169.254.169.254/gateway/int/NAME/...`) and the gateway passes the request on to
//! the integration's target with its credential added, streaming both ways. The VM never
//! holds the credential; which VM is calling is the daemon's proof, as for the LLM routes.

use std::net::SocketAddr;

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Body;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode};

use crate::body::GatewayBody;
use crate::config::BaseUrl;
use crate::reply::{self, Shape};
use crate::{Caller, Gateway};

/// The header a peer VM receives naming the calling VM. Only the gateway sets it.
pub const PEER_HEADER: &str = "x-nook-peer-vm";

/// Where an integration goes and what it adds.
#[derive(Clone)]
pub enum Route {
    /// Any HTTP API: these headers (a bearer token, an API key) are set on every request.
    HttpProxy {
        target: BaseUrl,
        headers: Vec<(String, String)>,
    },
    /// git smart HTTP at `web` and the REST API at `api` (reached as `/api/...`), with the
    /// token added as git and the API expect it; only `repositories` (`owner/repo`) when given.
    GitHub {
        web: BaseUrl,
        api: BaseUrl,
        token: String,
        repositories: Vec<String>,
    },
    /// Another VM of the same account, on its port; it learns the caller from
    /// [`PEER_HEADER`].
    Peer { upstream: SocketAddr },
}

impl std::fmt::Debug for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Route::HttpProxy { target, headers } => f
                .debug_struct("HttpProxy")
                .field("target", target)
                .field(
                    "headers",
                    &headers.iter().map(|(k, _)| k).collect::<Vec<_>>(),
                )
                .finish(),
            Route::GitHub {
                web,
                api,
                repositories,
                ..
            } => f
                .debug_struct("GitHub")
                .field("web", web)
                .field("api", api)
                .field("repositories", repositories)
                .finish(),
            Route::Peer { upstream } => f.debug_struct("Peer").field("upstream", upstream).finish(),
        }
    }
}

/// Why the gateway refuses a path of a GitHub integration.
fn github_target(path: &str, repositories: &[String]) -> Result<(bool, String), String> {
    let allowed = |owner: &str, repo: &str| {
        let repo = repo.strip_suffix(".git").unwrap_or(repo);
        repositories.is_empty()
            || repositories
                .iter()
                .any(|r| r.eq_ignore_ascii_case(&format!("{owner}/{repo}")))
    };
    let api = path
        .strip_prefix("/api/v3")
        .or_else(|| path.strip_prefix("/api"))
        .filter(|rest| rest.is_empty() || rest.starts_with('/'));
    if let Some(rest) = api {
        let rest = if rest.is_empty() { "/" } else { rest };
        if !repositories.is_empty() {
            let mut seg = rest.trim_start_matches('/').split('/');
            let ok = matches!(
                (seg.next(), seg.next(), seg.next()),
                (Some("repos"), Some(owner), Some(repo)) if allowed(owner, repo.split('?').next().unwrap_or(repo))
            );
            if !ok {
                return Err(format!(
                    "This integration reaches only {}: {rest} is outside them",
                    repositories.join(", ")
                ));
            }
        }
        return Ok((true, rest.to_string()));
    }
    let mut seg = path.trim_start_matches('/').split('/');
    match (seg.next(), seg.next()) {
        (Some(owner), Some(repo)) if !owner.is_empty() && !repo.is_empty() => {
            if allowed(owner, repo.split('?').next().unwrap_or(repo)) {
                Ok((false, path.to_string()))
            } else {
                Err(format!(
                    "This integration reaches only {}: {owner}/{repo} is not one of them",
                    repositories.join(", ")
                ))
            }
        }
        _ => Err("Use /OWNER/REPO.git for git, or /api/... for the REST API".into()),
    }
}

impl Gateway {
    /// Passes `req` on through `integration`, for `caller`. `path` is what follows the
    /// integration's own prefix (with the query). `None` (no such integration, not
    /// attached to this VM, expired, another account's) is a 404, alike.
    pub async fn integrate<B>(
        &self,
        caller: &Caller,
        name: &str,
        integration: Option<Route>,
        path: &str,
        req: Request<B>,
    ) -> Response<GatewayBody>
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let Some(route) = integration else {
            return self.refuse(
                Shape::Generic,
                StatusCode::NOT_FOUND,
                "not_found",
                format!("No integration {name:?} is attached to this VM: its owner runs `integrations attach {name} VM`"),
            );
        };
        if let Some(refused) = self.over_limit(Shape::Generic, caller) {
            return refused;
        }
        let path = if path.starts_with('/') {
            path.to_string()
        } else {
            format!("/{path}")
        };
        let (parts, body) = req.into_parts();
        let mut headers = HeaderMap::new();
        copy_headers(&parts.headers, &mut headers);
        let uri = match &route {
            Route::HttpProxy {
                target,
                headers: add,
            } => {
                for (k, v) in add {
                    if let (Ok(k), Ok(v)) = (
                        HeaderName::from_bytes(k.as_bytes()),
                        HeaderValue::from_str(v),
                    ) {
                        headers.insert(k, v);
                    }
                }
                url(target, &path)
            }
            Route::GitHub {
                web,
                api,
                token,
                repositories,
            } => {
                let (is_api, rest) = match github_target(&path, repositories) {
                    Ok(t) => t,
                    Err(why) => {
                        return self.refuse(
                            Shape::Generic,
                            StatusCode::FORBIDDEN,
                            "forbidden",
                            why,
                        );
                    }
                };
                headers.remove(header::AUTHORIZATION);
                let auth = if is_api {
                    format!("Bearer {token}")
                } else {
                    let basic = base64::engine::general_purpose::STANDARD
                        .encode(format!("x-access-token:{token}"));
                    format!("Basic {basic}")
                };
                if let Ok(v) = HeaderValue::from_str(&auth) {
                    headers.insert(header::AUTHORIZATION, v);
                }
                url(if is_api { api } else { web }, &rest)
            }
            Route::Peer { upstream } => {
                if let Ok(v) = HeaderValue::from_str(&caller.vm_name) {
                    headers.insert(HeaderName::from_static(PEER_HEADER), v);
                }
                format!("http://{upstream}{path}")
            }
        };
        let mut upstream = Request::builder().method(parts.method).uri(&uri);
        if let Some(h) = upstream.headers_mut() {
            *h = headers;
        }
        let body = body.map_err(Into::into).boxed_unsync();
        let Ok(upstream) = upstream.body(body) else {
            return self.refuse(
                Shape::Generic,
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "Cannot pass this request on".into(),
            );
        };
        // A target the owner named goes through the guarded client (names resolve only to
        // allowed addresses); a literal address skips name resolution, so it is checked here.
        let owner_named = match &route {
            Route::HttpProxy { target, .. } => Some(target),
            _ => None,
        };
        let forbidden = || {
            self.refuse(
                Shape::Generic,
                StatusCode::FORBIDDEN,
                "forbidden",
                format!("The integration {name} targets an address VMs may not reach (the host, a private network or another VM)"),
            )
        };
        if let Some(target) = owner_named {
            let host = match target.authority.rsplit_once(':') {
                Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h,
                _ => target.authority.as_str(),
            };
            let literal = host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<std::net::IpAddr>();
            if literal.is_ok_and(|ip| !(self.cfg.target_policy)(ip)) {
                return forbidden();
            }
        }
        let request = match owner_named {
            Some(_) => self.guarded_client.request(upstream),
            None => self.stream_client.request(upstream),
        };
        match tokio::time::timeout(self.cfg.upstream_timeout, request).await {
            Ok(Ok(resp)) => {
                let (mut head, incoming) = resp.into_parts();
                crate::strip_response_headers(&mut head.headers, false);
                Response::from_parts(head, GatewayBody::Passthrough(incoming))
            }
            Ok(Err(err)) => {
                tracing::warn!(integration = %name, error = %err, "integration target unreachable");
                if format!("{err:?}").contains("addresses VMs may not reach") {
                    return forbidden();
                }
                self.refuse(
                    Shape::Generic,
                    StatusCode::BAD_GATEWAY,
                    "api_error",
                    format!("The integration {name} cannot reach its target; try again later"),
                )
            }
            Err(_) => reply::error(
                Shape::Generic,
                StatusCode::GATEWAY_TIMEOUT,
                "timeout_error",
                &format!("The integration {name}'s target did not answer in time"),
            ),
        }
    }
}

fn url(base: &BaseUrl, path: &str) -> String {
    format!(
        "{}://{}{}{path}",
        if base.https { "https" } else { "http" },
        base.authority,
        base.prefix
    )
}

/// Passes on what the client sent, less hop-by-hop headers, its host, nook's own headers
/// (which only the gateway sets) and any name with `_` (which some servers read as `-`).
fn copy_headers(from: &HeaderMap, to: &mut HeaderMap) {
    for (name, value) in from {
        let n = name.as_str();
        let dropped = matches!(
            n,
            "host" | "connection" | "keep-alive" | "te" | "trailer" | "upgrade" | "forwarded"
        ) || n.starts_with("proxy-")
            || n.starts_with("x-forwarded-")
            || n.starts_with("x-nook")
            || n.contains('_');
        if !dropped {
            to.append(name.clone(), value.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn github_paths_stay_within_the_named_repositories() {
        let only = vec!["acme/app".to_string()];
        assert_eq!(
            github_target("/acme/app.git/info/refs?service=git-upload-pack", &only).map(|t| t.0),
            Ok(false)
        );
        assert_eq!(
            github_target("/ACME/app/git-receive-pack", &only).map(|t| t.0),
            Ok(false)
        );
        assert!(github_target("/acme/other.git/info/refs", &only).is_err());
        assert_eq!(
            github_target("/api/repos/acme/app/commits", &only),
            Ok((true, "/repos/acme/app/commits".into()))
        );
        assert_eq!(
            github_target("/api/v3/repos/acme/app", &only),
            Ok((true, "/repos/acme/app".into()))
        );
        assert!(github_target("/api/repos/acme/other", &only).is_err());
        assert!(github_target("/api/user", &only).is_err());
        assert_eq!(github_target("/api/user", &[]), Ok((true, "/user".into())));
        assert!(github_target("/", &[]).is_err());
    }

    #[test]
    fn nooks_headers_and_underscored_names_never_pass() {
        let mut from = HeaderMap::new();
        from.insert(
            HeaderName::from_static(PEER_HEADER),
            HeaderValue::from_static("forged"),
        );
        from.insert(
            HeaderName::from_static("x_nook_peer_vm"),
            HeaderValue::from_static("forged"),
        );
        from.insert(
            HeaderName::from_static("accept"),
            HeaderValue::from_static("*/*"),
        );
        let mut to = HeaderMap::new();
        copy_headers(&from, &mut to);
        assert_eq!(
            to.keys().map(HeaderName::as_str).collect::<Vec<_>>(),
            ["accept"]
        );
    }
}
