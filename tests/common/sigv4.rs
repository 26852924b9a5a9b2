//! The reference SigV4 signer of the tests and the benches: the independent `aws-sigv4`
//! crate, so a request the proxy accepts was signed by code that is not the proxy's.
//!
//! Benches include this file by path (`benches/common/mod.rs`); keep it free of the
//! rest of `tests/common`.

use aws_credential_types::Credentials;
use aws_sigv4::http_request::{sign, SignableBody, SignableRequest, SigningSettings};
use aws_sigv4::sign::v4;
use std::time::SystemTime;

/// Who signs, where, and when.
#[derive(Clone, Debug)]
pub(crate) struct Signer<'a> {
    pub(crate) access_key_id: &'a str,
    pub(crate) secret: &'a str,
    pub(crate) region: &'a str,
    pub(crate) service: &'a str,
    pub(crate) time: SystemTime,
}

/// Signs `method url` with `headers` (each signed) and `body`; returns the request with
/// the signature's headers (`authorization`, `x-amz-date`, ...) added to `request`.
pub(crate) fn sign_into<B>(
    signer: &Signer<'_>,
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    request: &mut http::Request<B>,
) {
    let identity =
        Credentials::new(signer.access_key_id, signer.secret, None, None, "xks-tests").into();
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(signer.region)
        .name(signer.service)
        .time(signer.time)
        .settings(SigningSettings::default())
        .build()
        .expect("signing parameters")
        .into();
    let signable = SignableRequest::new(
        method,
        url,
        headers.iter().copied(),
        SignableBody::Bytes(body),
    )
    .expect("signable request");
    let (instructions, _) = sign(signable, &params)
        .expect("aws-sigv4 signs")
        .into_parts();
    instructions.apply_to_request_http1x(request);
}
