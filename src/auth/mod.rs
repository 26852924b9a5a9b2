//! Request authentication: SigV4 (spec: Authentication, Appendix A).
//!
//! Authentication is per key store: each key store has its region and its credentials,
//! and a request is verified with the credentials of the key store its path routed to.
//! [`sign`] is the other side, for tools that call a proxy (the load generator).

pub mod replay;
pub mod sign;
pub mod sigv4;

pub use replay::ReplayCache;
pub use sign::{SignOptions, SignRequest, Signed, Signer};
pub use sigv4::{AuthError, Credential, RequestParts, Verifier};
