//! What the gateway is told: its providers, their keys and the price of every model.

use std::collections::BTreeMap;

/// The wire format a provider speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApiKind {
    /// Anthropic Messages (`/v1/messages`, `/v1/messages/count_tokens`).
    Anthropic,
    /// OpenAI Chat Completions (`/v1/chat/completions`) and Responses (`/v1/responses`), and
    /// any provider with an OpenAI-compatible API.
    OpenAi,
}

/// What one model costs, in dollars per million tokens.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Price {
    pub input: f64,
    pub output: f64,
    pub cache_read: f64,
    pub cache_write: f64,
}

/// One upstream the VMs reach as `/gateway/llm/NAME/...`.
#[derive(Clone)]
pub struct Provider {
    /// The path segment, e.g. `anthropic`.
    pub name: String,
    pub kind: ApiKind,
    /// E.g. `https://api.anthropic.com`; a path prefix is kept (`https://host/openai`).
    pub base_url: String,
    /// The host's key, added to every request. Never logged, never sent to a VM.
    pub key: Option<String>,
    /// The models VMs may use, with their prices. A model not listed is refused, so every
    /// request the gateway passes on has a price.
    pub models: BTreeMap<String, Price>,
}

impl Provider {
    /// The price of `model`, which may carry a release date (`claude-sonnet-4-5-20250929`,
    /// as Claude Code sends) after a name the table has.
    pub fn price(&self, model: &str) -> Option<Price> {
        if let Some(p) = self.models.get(model) {
            return Some(*p);
        }
        let (name, date) = model.rsplit_once('-')?;
        (date.len() == 8 && date.bytes().all(|b| b.is_ascii_digit()))
            .then(|| self.models.get(name).copied())
            .flatten()
    }
}

impl std::fmt::Debug for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Provider")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("base_url", &self.base_url)
            .field("key", &self.key.as_ref().map(|_| "<set>"))
            .field("models", &self.models)
            .finish()
    }
}

/// Requests and tokens per minute. Zero means no limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RateLimits {
    pub account_rpm: u32,
    pub vm_rpm: u32,
    pub account_tpm: u64,
}

#[derive(Clone)]
pub struct GatewayConfig {
    /// Which addresses an http-proxy integration's target (named by a VM's owner) may
    /// resolve to and be reached at.
    pub target_policy: crate::resolve::AddressPolicy,
    pub providers: Vec<Provider>,
    pub limits: RateLimits,
    /// The largest request body passed on.
    pub max_body: usize,
    /// Output tokens reserved for a request that names no maximum.
    pub default_max_output: u64,
    /// How long the provider may take to send its response head, and then each chunk.
    pub upstream_timeout: std::time::Duration,
}

impl std::fmt::Debug for GatewayConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayConfig")
            .field("providers", &self.providers)
            .field("limits", &self.limits)
            .field("max_body", &self.max_body)
            .finish_non_exhaustive()
    }
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            target_policy: crate::resolve::public_only(|ip| {
                ip.is_private()
                    || ip.is_loopback()
                    || ip.is_link_local()
                    || ip.is_unspecified()
                    || ip.is_broadcast()
                    || ip.is_multicast()
            }),
            providers: Vec::new(),
            limits: RateLimits::default(),
            max_body: 8 << 20,
            default_max_output: 8192,
            upstream_timeout: std::time::Duration::from_secs(300),
        }
    }
}

impl GatewayConfig {
    pub fn provider(&self, name: &str) -> Option<&Provider> {
        self.providers.iter().find(|p| p.name == name)
    }
}

/// A base URL split for hyper: `http` or `https`, `host[:port]`, and a path prefix without
/// a trailing slash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseUrl {
    pub https: bool,
    pub authority: String,
    pub prefix: String,
}

impl BaseUrl {
    pub fn parse(url: &str) -> Result<BaseUrl, String> {
        let (https, rest) = if let Some(rest) = url.strip_prefix("https://") {
            (true, rest)
        } else if let Some(rest) = url.strip_prefix("http://") {
            (false, rest)
        } else {
            return Err(format!("{url:?} is not an http:// or https:// URL"));
        };
        let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        if authority.is_empty() || authority.contains(['@', ' ', '?', '#']) {
            return Err(format!("{url:?} has no usable host"));
        }
        Ok(BaseUrl {
            https,
            authority: authority.to_string(),
            prefix: path.trim_end_matches('/').to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_urls_keep_their_prefix() {
        assert_eq!(
            BaseUrl::parse("https://api.example.com/openai/"),
            Ok(BaseUrl {
                https: true,
                authority: "api.example.com".into(),
                prefix: "/openai".into()
            })
        );
        assert_eq!(
            BaseUrl::parse("http://127.0.0.1:9000").map(|b| (b.https, b.prefix)),
            Ok((false, String::new()))
        );
        assert!(BaseUrl::parse("ftp://x").is_err());
        assert!(BaseUrl::parse("http://user@x").is_err());
    }

    #[test]
    fn a_dated_model_id_takes_its_names_price() {
        let p = Provider {
            name: "anthropic".into(),
            kind: ApiKind::Anthropic,
            base_url: "https://api.anthropic.com".into(),
            key: None,
            models: [(
                "claude-sonnet-4-5".to_string(),
                Price {
                    input: 3.0,
                    ..Price::default()
                },
            )]
            .into(),
        };
        assert_eq!(p.price("claude-sonnet-4-5").map(|p| p.input), Some(3.0));
        assert_eq!(
            p.price("claude-sonnet-4-5-20250929").map(|p| p.input),
            Some(3.0)
        );
        assert_eq!(p.price("claude-sonnet-4-5-2025"), None);
        assert_eq!(p.price("claude-opus-4-5-20250929"), None);
    }
}
