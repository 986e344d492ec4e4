//! Reading JSON config files, with one set of errors: a file that cannot be read is a
//! [`Error::MissingFile`], one that does not parse or validate a [`Error::BadModelFile`]; every
//! message names the file and what it is (`what`, e.g. "Flux transformer config").

use std::path::Path;

use serde::de::DeserializeOwned;

use crate::error::{Error, Result};

/// Read and parse the JSON file at `path`.
pub fn read_config<T: DeserializeOwned>(path: &Path, what: &str) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::MissingFile {
        what: match e.kind() {
            std::io::ErrorKind::NotFound => format!("{what} not found"),
            _ => format!("cannot read {what} ({e})"),
        },
        path: path.display().to_string(),
    })?;
    serde_json::from_str(&text)
        .map_err(|e| Error::BadModelFile { path: path.display().to_string(), reason: format!("invalid {what}: {e}") })
}

/// As [`read_config`], then `check` the values; its message becomes a [`Error::BadModelFile`].
pub fn read_checked_config<T, R>(
    path: &Path,
    what: &str,
    check: impl FnOnce(&T) -> std::result::Result<R, String>,
) -> Result<T>
where
    T: DeserializeOwned,
{
    let config = read_config(path, what)?;
    check(&config).map_err(|reason| Error::BadModelFile { path: path.display().to_string(), reason })?;
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    struct Cfg {
        n: usize,
    }

    fn check(c: &Cfg) -> std::result::Result<(), String> {
        if c.n == 0 {
            return Err("n must be positive".into());
        }
        Ok(())
    }

    #[test]
    fn errors_name_the_file_and_what_it_is() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        let err = read_config::<Cfg>(&path, "test config").unwrap_err();
        assert!(matches!(err, Error::MissingFile { .. }), "{err}");
        let msg = err.to_string();
        assert!(msg.contains("test config not found") && msg.contains("config.json"), "{msg}");

        std::fs::write(&path, "{\"n\": \"x\"}").unwrap();
        let err = read_config::<Cfg>(&path, "test config").unwrap_err();
        assert!(matches!(err, Error::BadModelFile { .. }), "{err}");
        assert!(err.to_string().contains("invalid test config") && err.to_string().contains("config.json"));

        std::fs::write(&path, "{\"n\": 0}").unwrap();
        let err = read_checked_config(&path, "test config", check).unwrap_err();
        assert!(matches!(err, Error::BadModelFile { .. }) && err.to_string().contains("positive"), "{err}");

        std::fs::write(&path, "{\"n\": 3}").unwrap();
        assert_eq!(read_checked_config(&path, "test config", check).unwrap().n, 3);
    }

    #[test]
    fn unreadable_is_missing() {
        // A folder where a file should be cannot be read as one.
        let dir = tempfile::tempdir().unwrap();
        let err = read_config::<Cfg>(dir.path(), "test config").unwrap_err();
        assert!(matches!(err, Error::MissingFile { .. }), "{err}");
        assert!(err.to_string().contains("cannot read test config"), "{err}");
    }
}
