//! The library's error type: every failure names what went wrong and where.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A user-supplied value is out of range or malformed (flag, shape, size).
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// A file or folder the model needs is missing or unreadable.
    #[error("{what}: {path}")]
    MissingFile { what: String, path: String },
    /// A config or weights file exists but cannot be understood.
    #[error("bad model file {path}: {reason}")]
    BadModelFile { path: String, reason: String },
    /// Resolving a hub id failed (offline, no cache, unknown repo).
    #[error("{0}")]
    Hub(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Other(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::InvalidInput(msg.into())
    }
    pub fn other(msg: impl Into<String>) -> Self {
        Error::Other(msg.into())
    }
}
