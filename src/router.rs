//! Routes built once at start-up from the configured key stores.
//!
//! A path is `{prefix}/kms/xks/v1/health` or `{prefix}/kms/xks/v1/keys/{id}/{op}`.
//! Routing splits the fixed tail off the right-hand end (an external key id cannot
//! contain `/`), then looks the remaining prefix up in a hash map: one pass over the
//! path and one lookup, whatever the number of key stores.

use foldhash::{HashMap, HashMapExt};

use http::Method;

use crate::xks::{ApiOperation, ErrorName, XksError};

/// The fixed part of every XKS API path (spec: XksProxyUriPath ends in it).
pub const API_ROOT: &str = "/kms/xks/v1";

/// Longest `XksProxyUriPath` (prefix + `/kms/xks/v1`) the spec allows.
pub const MAX_URI_PATH_LEN: usize = 128;

/// Longest external key id the spec allows.
pub const MAX_KEY_ID_LEN: usize = 128;

/// A routed request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteMatch<'p> {
    /// Index of the key store, as given to [`Router::new`].
    pub key_store: usize,
    /// The API.
    pub operation: ApiOperation,
    /// The external key id (empty for GetHealthStatus).
    pub key_id: &'p str,
}

/// Why a path prefix is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PrefixError {
    /// A character outside `a-zA-Z0-9/-_`.
    #[error("uri_prefix may contain only a-z, A-Z, 0-9, '/', '-' and '_'")]
    InvalidCharacter,
    /// Prefix + `/kms/xks/v1` longer than 128 characters.
    #[error("uri_prefix plus \"/kms/xks/v1\" must not exceed 128 characters")]
    TooLong,
    /// Empty segments (`//`).
    #[error("uri_prefix must not contain empty segments (\"//\")")]
    EmptySegment,
    /// Two key stores with the same prefix.
    #[error("two key stores use the uri_prefix {0:?}")]
    Duplicate(String),
}

/// Normalizes a configured prefix to `""` or `/a/b` (leading slash, no trailing one)
/// and checks it against the spec's rules on XksProxyUriPath.
pub fn normalize_prefix(prefix: &str) -> Result<String, PrefixError> {
    let trimmed = prefix.trim_matches('/');
    if !trimmed
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'/' | b'-' | b'_'))
    {
        return Err(PrefixError::InvalidCharacter);
    }
    if trimmed.contains("//") {
        return Err(PrefixError::EmptySegment);
    }
    let normalized = if trimmed.is_empty() {
        String::new()
    } else {
        format!("/{trimmed}")
    };
    if normalized.len() + API_ROOT.len() > MAX_URI_PATH_LEN {
        return Err(PrefixError::TooLong);
    }
    Ok(normalized)
}

/// Whether `id` is a valid external key id (spec: at most 128 characters of
/// `A-Za-z0-9`, `-`, `.`, `_`).
pub fn is_valid_key_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_KEY_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
}

/// Maps paths to key stores and operations.
#[derive(Debug, Clone)]
pub struct Router {
    prefixes: HashMap<String, usize>,
}

impl Router {
    /// Builds the routes from each key store's prefix (in key store order).
    pub fn new<'a>(prefixes: impl IntoIterator<Item = &'a str>) -> Result<Self, PrefixError> {
        let mut map = HashMap::new();
        for (index, prefix) in prefixes.into_iter().enumerate() {
            let normalized = normalize_prefix(prefix)?;
            if map.insert(normalized.clone(), index).is_some() {
                return Err(PrefixError::Duplicate(normalized));
            }
        }
        Ok(Self { prefixes: map })
    }

    /// Routes a request. Unknown paths are 404 InvalidUriPathException; a known API
    /// path with any method but POST is 405 (spec: API operations).
    pub fn route<'p>(&self, method: &Method, path: &'p str) -> Result<RouteMatch<'p>, XksError> {
        let (rest, operation, key_id) = split_api_path(path).ok_or_else(invalid_path)?;
        let prefix = rest.strip_suffix(API_ROOT).ok_or_else(invalid_path)?;
        let key_store = *self.prefixes.get(prefix).ok_or_else(invalid_path)?;
        if method != Method::POST {
            return Err(XksError::new(
                ErrorName::MethodNotAllowed,
                "XKS APIs accept only POST",
            ));
        }
        Ok(RouteMatch {
            key_store,
            operation,
            key_id,
        })
    }
}

fn invalid_path() -> XksError {
    XksError::new(
        ErrorName::InvalidUriPath,
        "URI path is not a valid XKS API path",
    )
}

/// Splits the operation (and key id) off the end of the path; returns what is left.
fn split_api_path(path: &str) -> Option<(&str, ApiOperation, &str)> {
    if let Some(rest) = path.strip_suffix("/health") {
        return Some((rest, ApiOperation::GetHealthStatus, ""));
    }
    let (rest, operation) = path.rsplit_once('/')?;
    let operation = match operation {
        "metadata" => ApiOperation::GetKeyMetadata,
        "encrypt" => ApiOperation::Encrypt,
        "decrypt" => ApiOperation::Decrypt,
        _ => return None,
    };
    let (rest, key_id) = rest.rsplit_once('/')?;
    let rest = rest.strip_suffix("/keys")?;
    is_valid_key_id(key_id).then_some((rest, operation, key_id))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn router() -> Router {
        Router::new(["", "tenant/a", "/tenant/b/"]).unwrap()
    }

    fn post<'p>(r: &Router, path: &'p str) -> Result<RouteMatch<'p>, XksError> {
        r.route(&Method::POST, path)
    }

    #[test]
    fn routes_every_operation_under_every_prefix() {
        let r = router();
        for (prefix, store) in [("", 0), ("/tenant/a", 1), ("/tenant/b", 2)] {
            let health = format!("{prefix}/kms/xks/v1/health");
            let m = post(&r, &health).unwrap();
            assert_eq!(
                (m.key_store, m.operation, m.key_id),
                (store, ApiOperation::GetHealthStatus, "")
            );
            for (op, operation) in [
                ("metadata", ApiOperation::GetKeyMetadata),
                ("encrypt", ApiOperation::Encrypt),
                ("decrypt", ApiOperation::Decrypt),
            ] {
                let path = format!("{prefix}/kms/xks/v1/keys/Key-1.a_b/{op}");
                let m = post(&r, &path).unwrap();
                assert_eq!(m.key_store, store);
                assert_eq!(m.operation, operation);
                assert_eq!(m.key_id, "Key-1.a_b");
            }
        }
    }

    #[test]
    fn unknown_paths_are_invalid_uri_path() {
        let r = router();
        for path in [
            "/",
            "",
            "/kms/xks/v1",
            "/kms/xks/v1/",
            "/kms/xks/v2/health",
            "/other/kms/xks/v1/health",
            "/tenant/kms/xks/v1/health",
            "/tenant/a/kms/xks/v1/health/",
            "/tenant/a//kms/xks/v1/health",
            "/kms/xks/v1/keys/foo/sign",
            "/kms/xks/v1/keys//encrypt",
            "/kms/xks/v1/keys/a/b/encrypt",
            "/kms/xks/v1/keys/f%20o/encrypt",
            "/kms/xks/v1/key/foo/encrypt",
            "/kms/xks/v1/keys/foo/encrypt/",
            "/kms/xks/v1/keys/foo",
        ] {
            let e = post(&r, path).unwrap_err();
            assert_eq!(e.name(), ErrorName::InvalidUriPath, "{path:?}");
            assert_eq!(e.status(), 404);
        }
        let long_id = format!("/kms/xks/v1/keys/{}/encrypt", "a".repeat(129));
        assert_eq!(post(&r, &long_id).unwrap_err().status(), 404);
        let max_id = format!("/kms/xks/v1/keys/{}/encrypt", "a".repeat(128));
        assert!(post(&r, &max_id).is_ok());
    }

    #[test]
    fn other_methods_are_405_on_api_paths_only() {
        let r = router();
        for method in [
            Method::GET,
            Method::PUT,
            Method::DELETE,
            Method::HEAD,
            Method::PATCH,
        ] {
            let e = r
                .route(&method, "/tenant/a/kms/xks/v1/keys/foo/encrypt")
                .unwrap_err();
            assert_eq!(e.status(), 405);
            let e = r.route(&method, "/kms/xks/v1/health").unwrap_err();
            assert_eq!(e.status(), 405);
            let e = r.route(&method, "/nowhere").unwrap_err();
            assert_eq!(e.status(), 404);
        }
    }

    #[test]
    fn prefix_rules() {
        assert_eq!(normalize_prefix("").unwrap(), "");
        assert_eq!(normalize_prefix("/").unwrap(), "");
        assert_eq!(normalize_prefix("a/b-c_d/").unwrap(), "/a/b-c_d");
        assert_eq!(normalize_prefix("a.b"), Err(PrefixError::InvalidCharacter));
        assert_eq!(normalize_prefix("a//b"), Err(PrefixError::EmptySegment));
        let longest = "p".repeat(MAX_URI_PATH_LEN - API_ROOT.len() - 1);
        assert!(normalize_prefix(&longest).is_ok());
        assert_eq!(
            normalize_prefix(&format!("{longest}p")),
            Err(PrefixError::TooLong)
        );
        assert!(matches!(
            Router::new(["a", "/a/"]),
            Err(PrefixError::Duplicate(_))
        ));
    }

    proptest! {
        #[test]
        fn never_panics_and_only_routes_what_it_should(path in "[/a-zA-Z0-9._%-]{0,200}") {
            let r = router();
            if let Ok(m) = post(&r, &path) {
                prop_assert!(path.contains("/kms/xks/v1/"));
                prop_assert!(m.key_id.is_empty() || is_valid_key_id(m.key_id));
            }
        }
    }
}
