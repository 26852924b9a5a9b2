//! The XKS API's operations, a leaf that the API handlers, the router, authorization and
//! the metrics all name without depending on one another.

/// The four XKS APIs (spec: API operations).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ApiOperation {
    /// `POST .../health`
    GetHealthStatus,
    /// `POST .../keys/{id}/metadata`
    GetKeyMetadata,
    /// `POST .../keys/{id}/encrypt`
    Encrypt,
    /// `POST .../keys/{id}/decrypt`
    Decrypt,
}

impl ApiOperation {
    /// Every operation, for metrics.
    pub const ALL: [Self; 4] = [
        Self::GetHealthStatus,
        Self::GetKeyMetadata,
        Self::Encrypt,
        Self::Decrypt,
    ];

    /// The spec's name of the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::GetHealthStatus => "GetHealthStatus",
            Self::GetKeyMetadata => "GetKeyMetadata",
            Self::Encrypt => "Encrypt",
            Self::Decrypt => "Decrypt",
        }
    }
}
