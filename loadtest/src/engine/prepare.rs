//! What every window of one command shares ([`Workload`]: target, TLS connector, signing
//! options, bodies, AAD and the Decrypt pool), and preparing it: one request of each
//! operation in the mix to each key, failing with the proxy's own answer if it refuses,
//! then the pool of ciphertexts Decrypt requests use.

use std::time::SystemTime;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use bytes::Bytes;
use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};
use xks_proxy::auth::SignOptions;

use super::Answer;
use crate::client::{Connector, RequestBuilder, Sender};
use crate::target::Target;
use crate::workload::{
    decrypt_body, encrypt_body, metadata_only_body, path, BodySettings, ErrorReply, Mix, Op,
    Sealed, Template,
};
use crate::Error;

/// Everything shared by the windows of one command: target, TLS, bodies, the pool.
#[derive(Debug)]
pub struct Workload {
    /// The target.
    pub target: Target,
    /// Opens connections.
    pub connector: Connector,
    /// Which headers to sign.
    pub sign_options: SignOptions,
    /// Body settings.
    pub bodies: BodySettings,
    /// The AAD of every Encrypt and Decrypt.
    pub aad: Vec<u8>,
    /// Ciphertexts made by Encrypt before the load, for Decrypt requests.
    pub(super) pool: Vec<PoolEntry>,
}

/// A pooled ciphertext: a Decrypt request ready to render, and what it must give back.
#[derive(Debug)]
pub(super) struct PoolEntry {
    /// Index of the key (in the target's key ids) that made it.
    pub(super) key: usize,
    /// The Decrypt body.
    pub(super) template: Template,
    /// The plaintext it was made from, Base64.
    pub(super) plaintext_b64: String,
}

impl Workload {
    /// Connects, checks each operation of `mix` once (failing with the proxy's answer if
    /// it refuses), and makes the pool of `pool_size` ciphertexts for Decrypt.
    pub async fn prepare(
        target: Target,
        http2: bool,
        sign_options: SignOptions,
        bodies: BodySettings,
        mix: Mix,
        pool_size: usize,
    ) -> Result<Self, Error> {
        let connector = Connector::new(&target, http2).await?;
        let mut rng = SmallRng::from_rng(&mut rand::rng());
        let mut aad = vec![0u8; bodies.aad_bytes];
        rng.fill(&mut aad[..]);
        let mut workload = Self {
            target,
            connector,
            sign_options,
            bodies,
            aad,
            pool: Vec::new(),
        };
        let mut sender = workload
            .connector
            .connect()
            .await
            .map_err(|e| format!("cannot reach {}: {e}", workload.connector_description()))?;
        let builder = RequestBuilder::new(&workload.target, http2, sign_options);
        for op in Op::ALL.into_iter().filter(|op| mix.uses(*op)) {
            if op == Op::Decrypt {
                continue; // checked by making the pool
            }
            let template = match op {
                Op::Encrypt => encrypt_body(
                    &workload.target.region,
                    &vec![7u8; bodies.plaintext_bytes],
                    &workload.aad,
                    bodies.cdiv,
                ),
                _ => metadata_only_body(op, &workload.target.region),
            };
            for key in 0..workload.target.key_ids.len() {
                workload
                    .send_expecting_ok(&mut sender, &builder, op, key, &template, &mut rng)
                    .await?;
                if op == Op::Health {
                    break;
                }
            }
        }
        if mix.uses(Op::Decrypt) {
            for i in 0..pool_size.max(1) {
                let key = i % workload.target.key_ids.len();
                let mut plaintext = vec![0u8; bodies.plaintext_bytes];
                rng.fill(&mut plaintext[..]);
                let template =
                    encrypt_body(&workload.target.region, &plaintext, &workload.aad, false);
                let body = workload
                    .send_expecting_ok(&mut sender, &builder, Op::Encrypt, key, &template, &mut rng)
                    .await?;
                let sealed: Sealed = serde_json::from_slice(&body)
                    .map_err(|e| format!("Encrypt answered 200 with an unreadable body: {e}"))?;
                workload.pool.push(PoolEntry {
                    key,
                    template: decrypt_body(&workload.target.region, &sealed, &workload.aad),
                    plaintext_b64: STANDARD.encode(&plaintext),
                });
            }
        }
        Ok(workload)
    }

    /// Sends `template` as `op` to key `key` and gives back the body of the answer, or an
    /// error naming what the proxy said if that is not a 200.
    async fn send_expecting_ok(
        &self,
        sender: &mut Sender,
        builder: &RequestBuilder,
        op: Op,
        key: usize,
        template: &Template,
        rng: &mut SmallRng,
    ) -> Result<Bytes, Error> {
        let route = self.route(builder, op, key);
        let answer = sender
            .send(builder.post(
                &route.uri,
                &route.path,
                template.render(rng),
                SystemTime::now(),
            ))
            .await;
        expect_ok(op, &self.target.key_ids[key], &answer)
    }

    fn connector_description(&self) -> String {
        format!("https://{}", self.target.authority)
    }

    /// The number of pooled ciphertexts.
    pub fn pool_size(&self) -> usize {
        self.pool.len()
    }

    pub(super) fn route(&self, builder: &RequestBuilder, op: Op, key: usize) -> Route {
        let path = path(&self.target.api_root, op, &self.target.key_ids[key]);
        Route {
            uri: builder.uri(&path),
            path,
        }
    }
}

/// The body of a 200 answer, or an error naming what the proxy said.
fn expect_ok(op: Op, key: &str, answer: &Answer) -> Result<Bytes, Error> {
    match answer {
        Ok((200, body)) => Ok(body.clone()),
        Ok((status, body)) => {
            let name = serde_json::from_slice::<ErrorReply<'_>>(body)
                .ok()
                .and_then(|e| e.error_name.map(|n| n.into_owned()))
                .unwrap_or_default();
            let hint = match *status {
                401 | 403 => " (check the access key id, secret and region)",
                404 => " (check --uri-prefix and --key-id)",
                _ => "",
            };
            Err(format!(
                "{} on key {key:?} answered HTTP {status} {name}{hint}: {}",
                op.name(),
                String::from_utf8_lossy(body)
                    .chars()
                    .take(200)
                    .collect::<String>()
            )
            .into())
        }
        Err(e) => Err(format!("{} on key {key:?} failed: {e}", op.name()).into()),
    }
}

/// A path and the URI it is sent as.
#[derive(Debug, Clone)]
pub(super) struct Route {
    pub(super) path: String,
    pub(super) uri: http::Uri,
}
