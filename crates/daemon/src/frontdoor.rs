//! The SSH front door's view of nook: accounts by key, where `user@HOST` leads, and lobby
//! commands. The SSH protocol itself lives in `nook-sshd`; this is the glue to the manager.

use std::sync::Arc;

use nook_api::{ErrorCode, lobby::COMMANDS};
use nook_sshd::{Account, Backend, Caller, LobbyIo, Route, VmEndpoint};

use crate::lobby::{self, LobbyOutput};
use crate::manager::{Manager, Scope};

pub struct FrontDoor {
    manager: Arc<Manager>,
}

impl FrontDoor {
    pub fn new(manager: Arc<Manager>) -> Self {
        Self { manager }
    }

    async fn account(&self, key_openssh: &str) -> Option<nook_store::Account> {
        let key = lobby::parse_public_key(key_openssh).ok()?;
        self.manager
            .store()
            .account_for_key(&key.fingerprint)
            .await
            .ok()
            .flatten()
    }
}

struct Io(LobbyIo);

impl LobbyOutput for Io {
    fn out(&self, bytes: &[u8]) {
        self.0.out(bytes);
    }
    fn err(&self, bytes: &[u8]) {
        self.0.err(bytes);
    }
    fn tty(&self) -> bool {
        self.0.tty()
    }
}

/// Only `new --setup-script -` reads stdin; nothing else may block waiting for it.
fn wants_stdin(argv: &[String]) -> bool {
    argv.windows(2)
        .any(|w| w[0] == "--setup-script" && w[1] == "-")
        || argv.iter().any(|a| a == "--setup-script=-")
}

impl Backend for FrontDoor {
    async fn account_for_key(&self, key_openssh: &str) -> Option<Account> {
        self.account(key_openssh).await.map(|a| Account {
            id: a.id,
            email: a.email,
        })
    }

    /// A user name that is one of the caller's VMs leads into it; anything else (including
    /// someone else's VM) leads to the lobby, so the two cannot be told apart.
    async fn route(&self, caller: &Caller) -> Route {
        let Some(account) = self.account(&caller.key_openssh).await else {
            return Route::Lobby;
        };
        if nook_api::validate_name(&caller.user).is_err() {
            return Route::Lobby;
        }
        // Collaborators a VM is shared with may SSH in like its owner.
        let store = self.manager.store();
        let scope = match store.get(&caller.user).await {
            Ok(vm)
                if vm.owner != account.id
                    && store.shared_role(&vm.id, &account).await.ok().flatten()
                        == Some(nook_store::Role::Collaborator) =>
            {
                Scope::Admin
            }
            _ => Scope::Account(&account.id),
        };
        match self.manager.ssh_target(&caller.user, scope).await {
            Ok(t) => Route::Vm(VmEndpoint {
                addr: t.addr,
                user: t.user,
                private_key_openssh: t.private_key_openssh,
            }),
            Err(e) if e.code == ErrorCode::NotFound => Route::Lobby,
            Err(e) => Route::Unavailable(format!("{}\r\n", e.message)),
        }
    }

    async fn lobby(&self, caller: &Caller, argv: Vec<String>, io: LobbyIo) -> u32 {
        let account = self.account(&caller.key_openssh).await;
        let who = lobby::Caller {
            account,
            key_openssh: caller.key_openssh.clone(),
            fingerprint: caller.fingerprint.clone(),
        };
        let stdin = if wants_stdin(&argv) {
            io.read_stdin().await
        } else {
            None
        };
        lobby::run(&self.manager, &who, argv, stdin, &Io(io)).await
    }

    async fn completions(&self, caller: &Caller) -> Vec<String> {
        let mut words: Vec<String> = COMMANDS.iter().map(|c| c.to_string()).collect();
        if let Some(account) = self.account(&caller.key_openssh).await
            && let Ok(vms) = self.manager.list(Scope::Account(&account.id)).await
        {
            words.extend(vms.into_iter().map(|vm| vm.name));
        }
        words
    }
}
