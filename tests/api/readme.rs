//! The README's quickstart, run verbatim (only the port differs) against the real
//! binary in the embedded mode on a fresh data directory; then the server is stopped
//! and started again, and everything written before is still there.

use std::io::{BufRead as _, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

/// The shell lines between the README's quickstart markers.
fn quickstart() -> String {
    let readme = include_str!("../../README.md");
    let start = readme
        .find("<!-- quickstart -->\n```sh\n")
        .expect("the README has a quickstart block");
    let body = &readme[start..];
    let body = &body[body.find("```sh\n").unwrap() + "```sh\n".len()..];
    body[..body.find("```").unwrap()].to_owned()
}

/// `colloquy serve` in `dir` with nothing configured but the port; returns the child
/// and the first line it printed.
fn serve(dir: &Path, port: u16) -> (Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_colloquy"))
        .arg("serve")
        .current_dir(dir)
        .env("COLLOQUY_BIND", format!("127.0.0.1:{port}"))
        .env_remove("DATABASE_URL")
        .env_remove("NATS_URL")
        .env_remove("COLLOQUY_REQUIRE_EXTERNAL")
        .env_remove("COLLOQUY_DATA_DIR")
        .env_remove("COLLOQUY_JWT_SECRET")
        .env_remove("GEMINI_API_KEYS")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("the colloquy binary starts");
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    (child, first)
}

fn stop(mut child: Child) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = child.wait().unwrap();
    assert!(exit.success(), "serve exits cleanly on SIGTERM: {exit}");
}

fn bash(script: &str) -> String {
    let output = Command::new("bash")
        .args(["-euo", "pipefail", "-c", script])
        .output()
        .expect("bash runs");
    assert!(
        output.status.success(),
        "the script failed: {}\n{script}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn the_readme_quickstart_works_and_a_restart_keeps_the_data() {
    let dir =
        std::env::temp_dir().join(format!("colloquy-readme-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let port = free_port();
    let (server, first) = serve(&dir, port);
    assert!(first.contains("embedded mode"), "{first}");
    assert!(
        first.contains("data/colloquy.sqlite"),
        "the data path: {first}"
    );
    assert!(
        first.contains(&format!("http://127.0.0.1:{port}")),
        "{first}"
    );
    assert!(first.contains("/docs"), "the docs URL: {first}");

    let script = quickstart().replace("127.0.0.1:8080", &format!("127.0.0.1:{port}"));
    let out = bash(&format!(
        "{script}\necho\necho \"CONVERSATION=$CONVERSATION\""
    ));
    assert!(
        out.contains("\"text\":\"Hello, Colloquy!\""),
        "the message is read back: {out}"
    );
    let conversation = out
        .lines()
        .find_map(|l| l.strip_prefix("CONVERSATION="))
        .unwrap()
        .to_owned();
    stop(server);
    assert!(dir.join("data/colloquy.sqlite").exists());

    // Again, on the same directory: log in (the register line now answers 409) and
    // read the conversation back.
    let (server, _) = serve(&dir, port);
    let login: String = script
        .lines()
        .take_while(|l| !l.starts_with("CONVERSATION="))
        .collect::<Vec<_>>()
        .join("\n");
    let out = bash(&format!(
        "{login}\ncurl -s http://127.0.0.1:{port}/v1/conversations/{conversation}/messages -H \"authorization: Bearer $TOKEN\""
    ));
    assert!(
        out.contains("\"text\":\"Hello, Colloquy!\""),
        "kept across a restart: {out}"
    );
    stop(server);
    let _ = std::fs::remove_dir_all(&dir);
}
