//! The one place where internal errors become what a user sees. Anything without a
//! user-facing meaning is logged here in full and shown as a generic internal error.

use nook_api::{ApiError, ErrorCode};
use nook_net::NetError;
use nook_storage::StorageError;
use nook_store::StoreError;
use nook_vmm::VmmError;

pub fn internal(context: &str, err: &dyn std::error::Error) -> ApiError {
    let mut chain = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        chain.push_str(": ");
        chain.push_str(&s.to_string());
        source = s.source();
    }
    tracing::error!(error = %chain, "{context}");
    ApiError::new(
        ErrorCode::Internal,
        format!("Internal error while trying to {context}; the daemon log has details"),
    )
}

pub fn from_store(context: &str, err: StoreError) -> ApiError {
    match err {
        StoreError::NameTaken(name) => ApiError::new(
            ErrorCode::NameTaken,
            format!("A VM named '{name}' already exists: choose another name"),
        ),
        StoreError::NotFound(name) => not_found(&name),
        StoreError::NoSpace => no_space("the data dir"),
        StoreError::Connect { .. } => ApiError::new(
            ErrorCode::HostMisconfigured,
            format!("{err}: check --store (NOOK_STORE) and that the database is up"),
        ),
        StoreError::Unavailable(e) => {
            tracing::error!(error = %e, "{context}: the store is unavailable");
            ApiError::new(
                ErrorCode::StoreUnavailable,
                "This host cannot reach its database right now: try again in a minute",
            )
        }
        StoreError::SlotsExhausted => ApiError::new(
            ErrorCode::InvalidArgument,
            "This host has no free network slot: remove a VM first",
        ),
        other => internal(context, &other),
    }
}

pub fn from_storage(context: &str, err: StorageError) -> ApiError {
    match err {
        StorageError::NotBuilt(_) | StorageError::Outdated(_) => {
            ApiError::new(ErrorCode::ImageNotBuilt, err.to_string())
        }
        StorageError::UnknownKind(_) => ApiError::new(ErrorCode::UnknownImage, err.to_string()),
        StorageError::NoSpace { .. } => no_space("the data dir"),
        StorageError::DiskTooSmall { .. } => {
            ApiError::new(ErrorCode::InvalidArgument, err.to_string())
        }
        StorageError::ToolMissing { .. } => ApiError::new(ErrorCode::QemuMissing, err.to_string()),
        StorageError::AgentUnusable { .. } => {
            ApiError::new(ErrorCode::HostMisconfigured, err.to_string())
        }
        // Which file a forged header names is for the operator's log, not the VM's owner.
        StorageError::UntrustedChain { .. } => {
            tracing::error!(error = %err, "refused to {context}: a disk names a file nook did not make");
            ApiError::new(
                ErrorCode::Internal,
                "This VM's disk names a backing file nook did not make, so nook will not use it; the daemon log has details",
            )
        }
        other => internal(context, &other),
    }
}

pub fn from_vmm(context: &str, err: VmmError) -> ApiError {
    match err {
        VmmError::QemuMissing(_) => ApiError::new(ErrorCode::QemuMissing, err.to_string()),
        VmmError::AgentClosed | VmmError::AgentMoved | VmmError::AgentVersion(..) => ApiError::new(
            ErrorCode::AgentUnavailable,
            format!("The VM's guest agent is not reachable ({err}); try again, or restart the VM"),
        ),
        VmmError::Agent(msg) => ApiError::new(ErrorCode::GuestError, msg),
        VmmError::AgentTimeout(waited) | VmmError::Timeout(waited) => ApiError::new(
            ErrorCode::AgentUnavailable,
            format!(
                "The VM's guest agent did not answer within {}s (trying to {context}); try again, or restart the VM",
                waited.as_secs()
            ),
        ),
        other => internal(context, &other),
    }
}

pub fn from_net(context: &str, err: NetError) -> ApiError {
    internal(context, &err)
}

pub fn not_found(name: &str) -> ApiError {
    let shown: String = name.chars().take(70).collect();
    ApiError::new(ErrorCode::NotFound, format!("No VM named '{shown}'"))
}

pub fn no_space(what: &str) -> ApiError {
    ApiError::new(
        ErrorCode::NoSpace,
        format!("No space left on {what}: free some space or remove VMs, then try again"),
    )
}
