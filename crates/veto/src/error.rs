//! The library's error type: every failure names what went wrong and where. Errors name
//! request parameters as diffusers and the official code name them (`nag_tau`, `height`), never
//! as a front end spells them; the `veto` CLI maps them to its flags.

/// Everything that can go wrong in veto.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request parameter is out of range or malformed; `name` is its diffusers / official
    /// name (`nag_tau`, `height`, `init_latents`, ...).
    #[error("{name}: {reason}")]
    InvalidParameter {
        /// The parameter's name.
        name: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A guidance method the model family does not have.
    #[error("guidance '{method}' is not available for {family} (supported: {supported})")]
    UnsupportedMethod {
        /// The method as `--guidance` / [`crate::Method`]'s `Display` spells it.
        method: String,
        /// The family's name.
        family: &'static str,
        /// The methods it has.
        supported: String,
    },
    /// The latents stopped being finite at a step (a guidance scale too large for the
    /// precision, or a broken model); nothing is written.
    #[error(
        "step {step}/{total} (t = {timestep:.0}) produced non-finite latents under guidance '{method}'{}",
        lower_hint(parameters)
    )]
    NonFinite {
        /// 1-based step.
        step: usize,
        /// Number of steps.
        total: usize,
        /// The step's timestep.
        timestep: f64,
        /// The method as `Method`'s `Display` spells it.
        method: String,
        /// The scales in effect that can blow up, to lower (`nag_scale`, `guidance_scale`, ...).
        parameters: Vec<&'static str>,
    },
    /// Any other malformed input (a tensor of the wrong shape, an inconsistent combination).
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// A file or folder the model needs is missing or unreadable.
    #[error("{what}: {path}")]
    MissingFile {
        /// What was looked for.
        what: String,
        /// Where.
        path: String,
    },
    /// A config or weights file exists but cannot be understood.
    #[error("bad model file {path}: {reason}")]
    BadModelFile {
        /// The file or folder.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Resolving a hub id failed (offline, no cache, unknown repo).
    #[error("{0}")]
    Hub(String),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// Reading or writing a file failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// Anything else.
    #[error("{0}")]
    Other(String),
}

fn lower_hint(parameters: &[&str]) -> String {
    if parameters.is_empty() {
        "; the model produced non-finite values (with f16, try bf16 or f32)".into()
    } else {
        format!("; lower {}", parameters.join(" or "))
    }
}

/// `Result` with veto's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// An [`Error::InvalidInput`].
    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::InvalidInput(msg.into())
    }

    /// An [`Error::InvalidParameter`] naming the parameter.
    pub fn parameter(name: &'static str, reason: impl Into<String>) -> Self {
        Error::InvalidParameter { name, reason: reason.into() }
    }

    /// An [`Error::Other`].
    pub fn other(msg: impl Into<String>) -> Self {
        Error::Other(msg.into())
    }
}
