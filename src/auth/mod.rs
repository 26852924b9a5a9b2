//! Request authentication: SigV4 (spec: Authentication, Appendix A).
//!
//! Authentication is per key store: each key store has its region and its credentials,
//! and a request is verified with the credentials of the key store its path routed to.

pub mod replay;
pub mod sigv4;

pub use replay::ReplayCache;
pub use sigv4::{AuthError, Credential, RequestParts, Verifier};
