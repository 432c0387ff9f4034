//! The scripted model server (tests/fake-llm/scripted_model.py) and a daemon whose coding
//! agent talks to it through the gateway: shared by the agent's system tests.
use std::process::{Child, Command};

use serde_json::{Value, json};

use super::Daemon;

const ANTHROPIC_KEY: &str = "sk-ant-agent-host-1c7e";
const OPENAI_KEY: &str = "sk-oai-agent-host-93ab";
const PRICES: &str = r#"
[llm_prices.anthropic.fake-claude]
input = 1.0
output = 2.0

[llm_prices.openai.fake-gpt]
input = 1.0
output = 3.0
"#;

/// The scripted model server.
pub struct ScriptedModel {
    child: Child,
    pub port: u16,
}

impl ScriptedModel {
    pub fn start() -> ScriptedModel {
        let (child, port) = super::spawn_listening(
            Command::new("python3")
                .arg(super::repo_root().join("tests/fake-llm/scripted_model.py"))
                .args(["--port", "0", "--anthropic-key", ANTHROPIC_KEY])
                .args(["--openai-key", OPENAI_KEY]),
            "scripted model",
        );
        ScriptedModel { child, port }
    }

    fn curl(&self, args: &[&str]) -> Value {
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "10"])
            .args(args)
            .output()
            .expect("curl");
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "scripted model answered {:?}: {e}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    pub fn script(&self, steps: Value) {
        let v = self.curl(&[
            "-X",
            "POST",
            "--data-binary",
            &json!({ "steps": steps }).to_string(),
            &format!("http://127.0.0.1:{}/__script", self.port),
        ]);
        assert_eq!(v["ok"], true, "script refused: {v}");
    }

    pub fn log(&self) -> Value {
        self.curl(&[&format!("http://127.0.0.1:{}/__log", self.port)])
    }
}

impl Drop for ScriptedModel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A daemon whose agent talks to `model` as `agent_model`.
pub fn daemon(model: &ScriptedModel, agent_model: &str) -> Daemon {
    let tmp = tempfile::Builder::new()
        .prefix("nook-sys")
        .tempdir_in("/tmp")
        .expect("tempdir");
    let data_dir = tmp.path().join("data");
    std::fs::create_dir_all(&data_dir).expect("data dir");
    let url = format!("http://127.0.0.1:{}", model.port);
    std::fs::write(
        data_dir.join("nook.toml"),
        format!(
            "llm_anthropic_base_url = \"{url}\"\nllm_anthropic_key = \"{ANTHROPIC_KEY}\"\n\
             llm_openai_base_url = \"{url}\"\nllm_openai_key = \"{OPENAI_KEY}\"\n\
             agent_model = \"{agent_model}\"\n{PRICES}"
        ),
    )
    .expect("nook.toml");
    Daemon::start_in(data_dir, Some(tmp), &[])
}
