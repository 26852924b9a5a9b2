//! The proxy under test: endpoint, URI prefix, SigV4 credential, region, keys and CA,
//! from flags or from the quickstart's `test-client.env` (the variables of the public
//! aws-kms-xksproxy-test-client).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::Serialize;
use xks_proxy::router::API_ROOT;
use zeroize::Zeroizing;

use crate::Error;

/// Where and how to reach the proxy. Flags override the `--env` file.
#[derive(Debug, Clone, clap::Args)]
pub struct TargetArgs {
    /// A `test-client.env` file (as `xks-proxy quickstart` writes): XKS_PROXY_HOST,
    /// URI_PREFIX, SIGV4_ACCESS_KEY_ID, SIGV4_SECRET_ACCESS_KEY, KEY_ID, CACERT.
    #[arg(long, value_name = "FILE")]
    pub env: Option<PathBuf>,
    /// The proxy's endpoint, `https://host:port`.
    #[arg(long)]
    pub endpoint: Option<String>,
    /// The key store's URI path prefix (before `/kms/xks/v1`).
    #[arg(long)]
    pub uri_prefix: Option<String>,
    /// SigV4 access key id.
    #[arg(long)]
    pub access_key_id: Option<String>,
    /// SigV4 secret access key (visible in `ps`; prefer --secret-file).
    #[arg(long, conflicts_with = "secret_file")]
    pub secret: Option<String>,
    /// File holding the SigV4 secret access key.
    #[arg(long, value_name = "FILE")]
    pub secret_file: Option<PathBuf>,
    /// The key store's region (credential scope).
    #[arg(long)]
    pub region: Option<String>,
    /// External key id to use (repeat for several; requests spread over them).
    #[arg(long = "key-id", value_name = "ID")]
    pub key_ids: Vec<String>,
    /// PEM file of the CA that issued the proxy's certificate (default: public CAs).
    #[arg(long, value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
}

/// A resolved target.
#[derive(Clone)]
pub struct Target {
    /// `host:port` as signed and sent (Host / :authority).
    pub authority: String,
    /// The host name for TLS SNI and certificate verification.
    pub host: String,
    /// The TCP port.
    pub port: u16,
    /// `{prefix}/kms/xks/v1`.
    pub api_root: String,
    /// The credential scope's region.
    pub region: String,
    /// SigV4 access key id.
    pub access_key_id: String,
    /// SigV4 secret (never printed nor written to reports).
    pub secret: Zeroizing<String>,
    /// External key ids.
    pub key_ids: Vec<String>,
    /// The CA file, if any.
    pub ca_file: Option<PathBuf>,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("authority", &self.authority)
            .field("api_root", &self.api_root)
            .field("region", &self.region)
            .field("access_key_id", &self.access_key_id)
            .field("key_ids", &self.key_ids)
            .finish_non_exhaustive()
    }
}

/// What a report records about the target (no secret).
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct TargetInfo {
    /// `https://host:port`.
    pub endpoint: String,
    /// `{prefix}/kms/xks/v1`.
    pub api_root: String,
    /// Region.
    pub region: String,
    /// Access key id.
    pub access_key_id: String,
    /// Keys used.
    pub key_ids: Vec<String>,
}

impl Target {
    /// Resolves flags and the env file into a target.
    pub fn from_args(args: &TargetArgs) -> Result<Self, Error> {
        let env = match &args.env {
            Some(path) => read_env_file(path)?,
            None => HashMap::new(),
        };
        let var = |name: &str| env.get(name).cloned();
        let endpoint = args
            .endpoint
            .clone()
            .or_else(|| var("XKS_PROXY_HOST").map(|h| format!("https://{h}")))
            .ok_or("no target: give --endpoint (or --env FILE)")?;
        let uri: http::Uri = endpoint
            .parse()
            .map_err(|e| format!("--endpoint {endpoint:?}: {e}"))?;
        if uri.scheme_str() != Some("https") {
            return Err("--endpoint must be https://host:port (XKS is HTTPS only)".into());
        }
        let authority = uri
            .authority()
            .ok_or("--endpoint needs a host")?
            .as_str()
            .to_owned();
        let host = uri
            .host()
            .ok_or("--endpoint needs a host")?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = uri.port_u16().unwrap_or(443);
        let prefix = args
            .uri_prefix
            .clone()
            .or_else(|| var("URI_PREFIX"))
            .unwrap_or_default();
        let prefix = xks_proxy::router::normalize_prefix(&prefix)
            .map_err(|e| format!("--uri-prefix: {e}"))?;
        let access_key_id = args
            .access_key_id
            .clone()
            .or_else(|| var("SIGV4_ACCESS_KEY_ID"))
            .ok_or("no credential: give --access-key-id (or --env FILE)")?;
        let secret = match (&args.secret, &args.secret_file) {
            (Some(secret), _) => Zeroizing::new(secret.clone()),
            (None, Some(path)) => Zeroizing::new(
                std::fs::read_to_string(path)
                    .map_err(|e| format!("{}: {e}", path.display()))?
                    .trim()
                    .to_owned(),
            ),
            (None, None) => Zeroizing::new(
                var("SIGV4_SECRET_ACCESS_KEY")
                    .ok_or("no secret: give --secret-file (or --env FILE)")?,
            ),
        };
        let mut key_ids = args.key_ids.clone();
        if key_ids.is_empty() {
            key_ids.extend(var("KEY_ID"));
        }
        if key_ids.is_empty() {
            return Err("no key: give --key-id (or --env FILE)".into());
        }
        if let Some(bad) = key_ids
            .iter()
            .find(|k| !xks_proxy::router::is_valid_key_id(k))
        {
            return Err(format!("{bad:?} is not a valid external key id").into());
        }
        let ca_file = args
            .ca_file
            .clone()
            .or_else(|| var("CACERT").map(PathBuf::from));
        Ok(Self {
            authority,
            host,
            port,
            api_root: format!("{prefix}{API_ROOT}"),
            region: args
                .region
                .clone()
                .or_else(|| var("AWS_REGION"))
                .unwrap_or_else(|| xks_proxy::quickstart::REGION.to_owned()),
            access_key_id,
            secret,
            key_ids,
            ca_file,
        })
    }

    /// What a report says about this target.
    pub fn info(&self) -> TargetInfo {
        TargetInfo {
            endpoint: format!("https://{}", self.authority),
            api_root: self.api_root.clone(),
            region: self.region.clone(),
            access_key_id: self.access_key_id.clone(),
            key_ids: self.key_ids.clone(),
        }
    }
}

/// Reads `NAME="value"` lines (shell syntax as the quickstart writes it: optional
/// `export`, single or double quotes, `#` comments).
pub fn read_env_file(path: &Path) -> Result<HashMap<String, String>, Error> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(parse_env(&text))
}

fn parse_env(text: &str) -> HashMap<String, String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| {
            let l = l.strip_prefix("export ").unwrap_or(l);
            let (name, value) = l.split_once('=')?;
            let value = value.trim();
            let value = value
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .or_else(|| value.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
                .unwrap_or(value);
            Some((name.trim().to_owned(), value.to_owned()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_quickstart_env_file() {
        let env = parse_env(
            "# Source with: set -a; . ./test-client.env; set +a\n\
             XKS_PROXY_HOST=\"localhost:8443\"\n\
             URI_PREFIX=\"example/uri/path/prefix\"\n\
             export KEY_ID='foo'\n\
             SECURE=\"--cacert /q/ca.pem\"\n",
        );
        assert_eq!(env["XKS_PROXY_HOST"], "localhost:8443");
        assert_eq!(env["URI_PREFIX"], "example/uri/path/prefix");
        assert_eq!(env["KEY_ID"], "foo");
        assert_eq!(env["SECURE"], "--cacert /q/ca.pem");
    }

    #[test]
    fn flags_make_a_target() {
        let args = TargetArgs {
            env: None,
            endpoint: Some("https://xks.example.com:8443".into()),
            uri_prefix: Some("a/b".into()),
            access_key_id: Some("AKID".into()),
            secret: Some("s".into()),
            secret_file: None,
            region: None,
            key_ids: vec!["foo".into()],
            ca_file: None,
        };
        let t = Target::from_args(&args).unwrap();
        assert_eq!(t.authority, "xks.example.com:8443");
        assert_eq!(t.host, "xks.example.com");
        assert_eq!(t.port, 8443);
        assert_eq!(t.api_root, "/a/b/kms/xks/v1");
        assert_eq!(t.region, "us-east-1");
        let mut plain = args.clone();
        plain.endpoint = Some("http://x:1".into());
        assert!(Target::from_args(&plain).is_err());
        let mut bad_key = args;
        bad_key.key_ids = vec!["a/b".into()];
        assert!(Target::from_args(&bad_key).is_err());
    }
}
