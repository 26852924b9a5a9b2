//! Cost of one secondary-authorization decision (`xks_proxy::authz`) with the example
//! policy set `config/policies/example.cedar` (five policies; one reads
//! `context.fields`, so its decisions are never cached), and with the same set minus
//! that policy, whose decisions are cached per (principal, operation, key, fields read).
//!
//! Run: `cargo bench --bench authz` (add `-- --quick` for a short run).

#![allow(missing_docs)]

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use xks_proxy::authz::{Authorizer, AuthzRequest};
use xks_proxy::operation::ApiOperation;

const EXAMPLE: &str = include_str!("../config/policies/example.cedar");

/// The string fields of `requestMetadata` as KMS sends them for an S3 Decrypt.
fn metadata(principal: &str) -> Vec<(&str, &str)> {
    vec![
        ("awsPrincipalArn", principal),
        ("awsSourceVpc", "vpc-0123456789abcdef0"),
        ("awsSourceVpce", "vpce-0a1b2c3d4e5f67890"),
        (
            "kmsKeyArn",
            "arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab",
        ),
        ("kmsOperation", "Decrypt"),
        ("kmsRequestId", "4112f4d6-db54-4af4-ae30-c55a22a8dfae"),
        ("kmsViaService", "s3.us-east-1.amazonaws.com"),
    ]
}

fn bench_authorize(c: &mut Criterion) {
    let authz = Authorizer::new(EXAMPLE).expect("the example policies load");
    let allowed_arn = "arn:aws:iam::111122223333:role/OrdersApp";
    let denied_arn = "arn:aws:iam::999988887777:role/OrdersApp";
    let allowed_md = metadata(allowed_arn);
    let denied_md = metadata(denied_arn);
    let request = |principal_arn, metadata| AuthzRequest {
        principal_arn,
        operation: ApiOperation::Decrypt,
        key_store: "prod",
        key_id: "orders-key",
        metadata,
    };
    let allowed = request(allowed_arn, &allowed_md);
    let denied = request(denied_arn, &denied_md);
    assert!(authz.authorize(&allowed).allowed);
    assert!(!authz.authorize(&denied).allowed);

    let mut group = c.benchmark_group("authz");
    group.bench_function("authorize_allowed", |b| {
        b.iter(|| authz.authorize(black_box(&allowed)));
    });
    group.bench_function("authorize_denied", |b| {
        b.iter(|| authz.authorize(black_box(&denied)));
    });
    // The example without its last policy (the one reading `context.fields`).
    let cut = EXAMPLE
        .find("// Fields the schema does not name")
        .expect("the example's last policy");
    let cacheable = Authorizer::new(&EXAMPLE[..cut]).expect("four example policies load");
    assert!(cacheable.authorize(&allowed).allowed);
    group.bench_function("authorize_cached", |b| {
        b.iter(|| cacheable.authorize(black_box(&allowed)));
    });
    group.bench_function("load_example", |b| {
        b.iter(|| Authorizer::new(black_box(EXAMPLE)).expect("loads"));
    });
    group.finish();
}

criterion_group!(benches, bench_authorize);
criterion_main!(benches);
