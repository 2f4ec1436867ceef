//! The binary's own command line, run as a user would.

use std::process::Command;

fn colloquy() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_colloquy"));
    // Start from a clean slate: only what each test sets.
    for key in colloquy::config::KEYS {
        command.env_remove(key);
    }
    command.env_remove("COLLOQUY_CONFIG");
    command
}

#[test]
fn config_prints_the_effective_settings_with_secrets_redacted() {
    let output = colloquy()
        .arg("config")
        .env(
            "DATABASE_URL",
            "postgres://app:pg-secret-1@db:5432/colloquy",
        )
        .env("NATS_URL", "nats://127.0.0.1:4222")
        .env("COLLOQUY_JWT_SECRET", "jwt-secret-2")
        .env(
            "GEMINI_API_KEYS",
            "main=AIzaSecret3@project-a,spare=AIzaSecret4@project-b",
        )
        .env("COLLOQUY_BIND", "0.0.0.0:9000")
        .output()
        .unwrap();
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert!(output.status.success(), "{stdout}");
    for secret in ["pg-secret-1", "jwt-secret-2", "AIzaSecret3", "AIzaSecret4"] {
        assert!(!stdout.contains(secret), "{secret} leaked:\n{stdout}");
    }
    assert!(stdout.contains("COLLOQUY_BIND = 0.0.0.0:9000"), "{stdout}");
    assert!(
        stdout.contains("GEMINI_API_KEYS = main=[redacted]@project-a,spare=[redacted]@project-b")
    );
    assert!(stdout.contains("DATABASE_URL = postgres://app:[redacted]@db:5432/colloquy"));
}

#[test]
fn config_reads_the_file_and_the_environment_wins() {
    let dir = std::env::temp_dir().join(format!("colloquy-config-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("colloquy.toml");
    std::fs::write(
        &file,
        "COLLOQUY_BIND = \"127.0.0.1:7000\"\nGEMINI_MODEL = \"from-file\"\n",
    )
    .unwrap();
    let output = colloquy()
        .args(["--config", file.to_str().unwrap(), "config", "--json"])
        .env("GEMINI_MODEL", "from-env")
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(output.status.success());
    let shown: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(shown["COLLOQUY_BIND"], "127.0.0.1:7000");
    assert_eq!(shown["GEMINI_MODEL"], "from-env");
}

#[test]
fn a_bad_setting_fails_at_start_and_names_the_key() {
    let output = colloquy()
        .arg("serve")
        .env(
            "DATABASE_URL",
            "postgres://postgres@127.0.0.1:5432/postgres",
        )
        .env("NATS_URL", "nats://127.0.0.1:4222")
        .env("COLLOQUY_DUPLICATE_WINDOW", "forever")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(stderr.contains("COLLOQUY_DUPLICATE_WINDOW"), "{stderr}");
}

#[test]
fn external_mode_refuses_to_start_without_postgres() {
    let output = colloquy().args(["serve", "--external"]).output().unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(stderr.contains("DATABASE_URL"), "{stderr}");
}
