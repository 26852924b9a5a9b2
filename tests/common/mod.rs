//! Test helpers shared by the integration tests: a real `xks-proxy` process on a real
//! soft token (made by `xks-proxy quickstart --setup-only` in a temporary folder; SoftHSM2,
//! or kryoptic with `XKS_TEST_PKCS11=kryoptic`: module.rs),
//! an HTTPS client whose requests are signed by the independent `aws-sigv4` crate, and
//! curl with `--aws-sigv4`.

#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

mod admin;
mod bodies;
mod client;
mod curl;
mod kubelet;
mod module;
mod proxy;
mod setup;
mod sigv4;

// Not every test crate uses every part.
#[allow(unused_imports)]
pub use admin::*;
#[allow(unused_imports)]
pub use bodies::*;
#[allow(unused_imports)]
pub use client::*;
#[allow(unused_imports)]
pub use curl::*;
#[allow(unused_imports)]
pub use kubelet::*;
#[allow(unused_imports)]
pub use module::*;
#[allow(unused_imports)]
pub use proxy::*;
#[allow(unused_imports)]
pub use setup::*;

pub const BIN: &str = env!("CARGO_BIN_EXE_xks-proxy");

pub const PREFIX: &str = "/example/uri/path/prefix/kms/xks/v1";

pub const REGION: &str = "us-east-1";
