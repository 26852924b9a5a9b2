//! `presign`: one signed request as a script for an external generator (wrk).
//!
//! `xks-loadtest` signs every request afresh, as KMS does, and pays for it (≈ 5 % of
//! its samples). A C generator replaying one pre-signed request costs less, so with it
//! on the same box more of the machine is left for the proxy: the setting of the
//! issue's reference numbers (the AWS sample and a bare hyper+rustls server, both
//! measured with wrk). A signature stays valid while the proxy accepts its date: five
//! minutes, so make the script just before the run.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::SystemTime;

use xks_proxy::auth::{SignOptions, SignRequest, Signer};

use crate::target::{Target, TargetArgs};
use crate::workload::{self, Op};

use crate::Error;

/// Flags of `presign`.
#[derive(Debug, Clone, clap::Args)]
pub struct PresignArgs {
    #[command(flatten)]
    target: TargetArgs,
    /// The operation: encrypt, metadata or health (a Decrypt needs a ciphertext first).
    #[arg(long, default_value = "encrypt", value_parser = parse_op)]
    op: Op,
    /// Plaintext bytes of the Encrypt.
    #[arg(long, default_value_t = 32)]
    plaintext_bytes: usize,
    /// AAD bytes of the Encrypt (0: none).
    #[arg(long, default_value_t = 100)]
    aad_bytes: usize,
    /// Ask for a CDIV.
    #[arg(long)]
    cdiv: bool,
    /// Write the wrk Lua script here.
    #[arg(long, short, value_name = "FILE")]
    output: PathBuf,
}

fn parse_op(name: &str) -> Result<Op, String> {
    match name {
        "encrypt" => Ok(Op::Encrypt),
        "metadata" => Ok(Op::Metadata),
        "health" => Ok(Op::Health),
        _ => Err(format!("{name:?}: one of encrypt, metadata, health")),
    }
}

/// Writes the script.
pub fn presign(args: &PresignArgs) -> Result<(), Error> {
    let target = Target::from_args(&args.target)?;
    let key = &target.key_ids[0];
    let body = match args.op {
        Op::Encrypt => workload::encrypt_body(
            &target.region,
            &random_bytes(args.plaintext_bytes),
            &random_bytes(args.aad_bytes),
            args.cdiv,
        ),
        op => workload::metadata_only_body(op, &target.region),
    };
    let path = workload::path(&target.api_root, args.op, key);
    let script = wrk_script(&target, &path, body.bytes(), SystemTime::now());
    std::fs::write(&args.output, script).map_err(|e| format!("{}: {e}", args.output.display()))?;
    eprintln!(
        "wrote {} ({} {}); valid for about five minutes",
        args.output.display(),
        args.op.name(),
        path
    );
    Ok(())
}

fn random_bytes(n: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; n];
    rand::RngExt::fill(&mut rand::rng(), &mut bytes[..]);
    bytes
}

/// The Lua script: method, path, headers and body of one request signed at `time`.
pub fn wrk_script(target: &Target, path: &str, body: &[u8], time: SystemTime) -> String {
    let signer = Signer::new(
        target.access_key_id.clone(),
        target.secret.clone(),
        target.region.clone(),
        SignOptions::default(),
    );
    let signed = signer.sign(
        &SignRequest {
            method: "POST",
            path,
            host: &target.authority,
            body,
        },
        time,
    );
    let mut script = String::new();
    let _ = writeln!(
        script,
        "-- xks-loadtest presign: signed at {} for https://{}; valid while the\n\
         -- proxy accepts that date (five minutes). Run: wrk -s THIS https://{}",
        signed.amz_date(),
        target.authority,
        target.authority
    );
    let _ = writeln!(script, "wrk.method = \"POST\"");
    let _ = writeln!(script, "wrk.path = {}", lua_string(path.as_bytes()));
    for (name, value) in [
        ("Host", target.authority.as_str()),
        ("Content-Type", "application/json"),
        ("x-amz-date", signed.amz_date()),
        ("Authorization", signed.authorization()),
    ] {
        let _ = writeln!(
            script,
            "wrk.headers[\"{name}\"] = {}",
            lua_string(value.as_bytes())
        );
    }
    let _ = writeln!(script, "wrk.body = {}", lua_string(body));
    script
}

/// A Lua string literal of `bytes`: printable ASCII as it is, everything else escaped.
fn lua_string(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() + 2);
    out.push('"');
    for &b in bytes {
        match b {
            b'"' | b'\\' => {
                out.push('\\');
                out.push(b as char);
            }
            0x20..=0x7e => out.push(b as char),
            _ => {
                let _ = write!(out, "\\{b:03}");
            }
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lua_strings_escape_quotes_backslashes_and_control_bytes() {
        assert_eq!(lua_string(b"a\"b\\c\n\x00~"), "\"a\\\"b\\\\c\\010\\000~\"");
    }
}
