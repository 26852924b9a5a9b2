//! curl with `--aws-sigv4`: a second, independent signer.

use serde_json::Value;
use std::process::Command;

use super::*;

/// curl with `--aws-sigv4`, as in the spec's Appendix D. Returns (status, body).
pub fn curl(proxy: &Proxy, path: &str, body: &str, extra: &[&str]) -> (u16, Value) {
    let output = Command::new("curl")
        .args(["-sS", "--max-time", "10", "-X", "POST"])
        .arg("--cacert")
        .arg(proxy.setup.path("ca.pem"))
        .args(["--aws-sigv4", &format!("aws:amz:{REGION}:kms-xks-proxy")])
        .args([
            "--user",
            &format!("{}:{}", proxy.setup.access_key_id, proxy.setup.secret),
        ])
        .args([
            "-H",
            "Content-Type: application/json",
            "--data-binary",
            body,
        ])
        .args(["-w", "\n%{http_code}"])
        .args(extra)
        .arg(proxy.url(path))
        .output()
        .expect("curl must be installed (scripts/setup.sh installs it)");
    assert!(
        output.status.success(),
        "curl failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8(output.stdout).unwrap();
    let (body, status) = text.rsplit_once('\n').unwrap();
    (
        status.parse().unwrap(),
        serde_json::from_str(body).unwrap_or(Value::Null),
    )
}
